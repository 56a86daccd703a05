"""When the server gives freed memory back (dpt_lab.memory): after every request, or once
requests pause. What a slider move waits for either way.

    python bench/trim.py [--stem depth_anything_v2_vits] [--image assets/coffee.jpg] [--base 518]
                         [--moves 8] [--blocks 4] [--gap 0.3] [--out bench/results/trim.md]

One process with the app's allocator settings (memory.configure: 2 arenas) and the ViT-S
fixture checkpoint (tests/fixtures.py: the real layout, deterministic random weights),
through dpt_lab.session.Lab as the app calls it. The picture is encoded once; then slider
moves, each a `Lab.fusion_view` with new factors (the decoder on the cached encode, its
colouring and difference), --gap seconds apart, as a drag sends them. Two ways of ending a
request, in alternating blocks of --moves moves (the first move of a block is dropped: it
follows the other way's block):

  trim after each   memory.release() after every move: glibc's malloc_trim hands the free
                    pages of every arena back to the OS at once (the app until stop 32)
  when they pause   memory.release_soon() after every move (the app now): one trim once no
                    request has ended for memory.QUIET_S (or memory.LATEST_S at most)

Printed: the move's time (median over the blocks' moves), process CPU time, the minor page
faults per move (getrusage), the process' RSS after the block, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, write_results  # noqa: E402  (sets sys.path)
from fixtures import save_fixture_checkpoint  # noqa: E402
from PIL import Image

from dpt_lab import memory  # noqa: E402
from dpt_lab import session as S  # noqa: E402
from dpt_lab.models import ModelManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WAYS = {"trim after each": memory.release, "when they pause": memory.release_soon}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stem", default="depth_anything_v2_vits")
    ap.add_argument("--image", default=str(ROOT / "assets" / "coffee.jpg"))
    ap.add_argument("--base", type=int, default=518)
    ap.add_argument("--moves", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between moves")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trim.md"), help="'' to only print")
    args = ap.parse_args()
    if memory.configure().mode != "tuned":
        raise SystemExit("the allocator is not tuned here (not glibc, or DPT_LAB_MALLOC=off): nothing to compare")
    with tempfile.TemporaryDirectory() as tmp:
        save_fixture_checkpoint(args.stem, Path(tmp))
        lab = S.Lab(ModelManager(weights_dir=Path(tmp)))
        name = lab.manager.choices()[0][1]
        state, _ = lab.depth_view("s", None, np.asarray(Image.open(args.image).convert("RGB")), name, args.base)
    values = iter(np.linspace(-2.0, 3.0, 10 ** 5))
    lab.fusion_view("s", state, (1, next(values), 1, 1))            # warm-up: packing, first buffers
    wall = {k: [] for k in WAYS}
    cpu = {k: [] for k in WAYS}
    faults = {k: [] for k in WAYS}
    rss = {k: [] for k in WAYS}
    for block in range(2 * args.blocks):
        way = list(WAYS)[block % 2]
        for move in range(args.moves):
            time.sleep(args.gap)
            f0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
            lab.fusion_view("s", state, (1, float(next(values)), 1, 1))
            WAYS[way]()                                     # the request's end, as app's handlers end it
            if move:
                wall[way].append(time.perf_counter() - w0)
                cpu[way].append(time.process_time() - c0)
                faults[way].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        rss[way].append(memory.rss_bytes())
        print(f"block {block + 1}/{2 * args.blocks} ({way}): median {1000 * statistics.median(wall[way][-args.moves + 1:]):.0f} ms",
              flush=True)
    memory.release()
    ms = {k: 1000 * statistics.median(v) for k, v in wall.items()}
    cmd = (f"python bench/trim.py --stem {args.stem} --image {Path(args.image).name} --base {args.base} "
           f"--moves {args.moves} --blocks {args.blocks} --gap {args.gap}")
    lines = ["## Trimming after each request or when requests pause: a fusion slider move", "",
             f"Machine: {machine()}. Command: `{cmd}`. `Lab.fusion_view` of a new set of factors on the cached "
             f"encode of {Path(args.image).name} at base {args.base}, {args.gap} s apart; medians over "
             f"{args.blocks} blocks of {args.moves - 1} moves each way, the blocks alternating in one process. "
             f"memory.QUIET_S = {memory.QUIET_S:g} s, LATEST_S = {memory.LATEST_S:g} s.", "",
             "| request end | move (ms) | CPU (ms) | minor page faults per move | RSS after a block (GB, median) | ratio |",
             "|---|---|---|---|---|---|"]
    base_ms = ms["trim after each"]
    for way in WAYS:
        lines.append(f"| {way} | {ms[way]:.0f} | {1000 * statistics.median(cpu[way]):.0f} | "
                     f"{statistics.median(faults[way]):.0f} | {statistics.median(rss[way]) / 1e9:.2f} | "
                     f"{ms[way] / base_ms:.2f}x |")
    write_results("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    sys.exit(main())
