"""Each session operation's transient memory against what it reserves under the store's cap:
the figures behind store.WORKING_SET_FACTOR, DECODE_FACTOR, session.EXPORT_WEIGHT_COPIES,
attention.rollout_bytes and the video job's budget.

    python bench/memory_ops.py [--stems depth_anything_v2_vits] [--image assets/coffee.jpg]
                               [--base 518] [--runs 2] [--out bench/results/memory_ops.md]

Each --stems fixture checkpoint (tests/fixtures.py: the real layout, deterministic random
weights) runs in a fresh process with the app's allocator settings, through dpt_lab.session.Lab
as the app calls it: a warm-up of every operation (imports, packing, first buffers), then
--runs rounds. Before each operation the free pages go back to the OS and the peak RSS is
reset (/proc/self/clear_refs); after it, VmHWM gives its peak growth over the resting RSS.
Printed per operation: that peak (median over the rounds), what the operation reserved
under the cap (the largest store.reserved seen while it ran), the bytes the store keeps for
it afterwards, and whether the reservation plus what it keeps covers the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
stem, image, base, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, sys.argv[5]); sys.path.insert(0, sys.argv[5] + "/tests")
from dpt_lab import memory
memory.configure()
import numpy as np
from PIL import Image
from fixtures import save_fixture_checkpoint
from dpt_lab import session as S
from dpt_lab.models import ModelManager, weight_bytes


def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) << 10


tmp = Path(tempfile.mkdtemp())
(tmp / "w").mkdir()
save_fixture_checkpoint(stem, tmp / "w")
lab = S.Lab(ModelManager(weights_dir=tmp / "w"))
store = lab.store
seen = {"max": 0}
plain_reserve = store.reserve


def watched_reserve(nbytes, *args, **kwargs):
    seen["max"] = max(seen["max"], store.reserved + max(0, int(nbytes)))
    return plain_reserve(nbytes, *args, **kwargs)


store.reserve = watched_reserve
name = lab.manager.choices()[0][1]
rgb = np.asarray(Image.open(image).convert("RGB"))
state = {}


def depth(i):
    # a picture not encoded before (the store would answer a repeat without encoding)
    state["s"], _ = lab.depth_view("s", None, np.roll(rgb, 7 * i, axis=1), name, base)


def clip():
    import av
    path = tmp / "clip.mp4"
    if not path.exists():
        with av.open(str(path), "w") as out:
            st = out.add_stream("libx264", rate=10)
            st.width, st.height, st.pix_fmt = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2, "yuv420p"
            for i in range(10):
                frame = av.VideoFrame.from_ndarray(np.roll(rgb, 8 * i, axis=1)[:st.height, :st.width].copy(), format="rgb24")
                out.mux(st.encode(frame))
            out.mux(st.encode())
    return path


OPS = {
    "encode (depth)": lambda i: depth(2 * i),
    "attention row": lambda i: lab.attention_at("s", state["s"], 100, 100, 12, "row", False, False, "inferno", 0, False),
    "features (pca)": lambda i: lab.features_view("s", state["s"], None, "pca"),
    "rollout (first click)": lambda i: lab.rollout_at("s", state["s"], 100, 100),
    "norms": lambda i: lab.norms_view("s", state["s"]),
    "fusion (decoder)": lambda i: lab.fusion_view("s", state["s"], (1, 0.5, 0, 1 + i / 10), "turbo"),
    "ablation": lambda i: lab.ablation_view("s", state["s"], 1 + i % 2, source="patches", patches="3,3; 4,4"),
    "mask": lambda i: lab.mask_view("s", state["s"], 0.3, 1.0, False, 0.5 + i / 10),
    "video (10 frames)": lambda i: lab.video_job("s", clip(), name, tmp / f"v{i}", base, normalise="clip"),
    "export (base x base)": lambda i: lab.export_model(name, tmp / f"ex{i}", base_size=base),
}


def one(label, fn, i):
    store_before = store.nbytes
    memory.release()
    rest = status("VmRSS")
    seen["max"] = store.reserved
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    fn(i)
    peak = status("VmHWM") - rest
    return dict(op=label, peak=peak, reserved=seen["max"], kept=max(0, store.nbytes - store_before),
                seconds=time.perf_counter() - t0)


rows = []
for i in range(runs + 1):
    for label, fn in OPS.items():
        if label.startswith("rollout"):
            state["s"] = dict(state["s"])
            depth(2 * i + 1)             # a fresh encode: the rollout's matrices are not kept yet
        row = one(label, fn, i)
        if i:                            # round 0 warms up
            rows.append(row)
entry = store.entries("s")[-1]
print(json.dumps(dict(rows=rows, entry=entry.nbytes, weights=weight_bytes(lab.manager.get(name)),
                      input=list(entry.x.shape[-2:]))))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stems", default="depth_anything_v2_vits")
    ap.add_argument("--image", default=str(ROOT / "assets" / "coffee.jpg"))
    ap.add_argument("--base", type=int, default=518)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_ops.md"))
    args = ap.parse_args()
    mb = 1e6
    lines = ["## Transient memory of each operation against its reservation", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
             f"{platform.python_version()}. Command: `python bench/memory_ops.py --stems {args.stems} "
             f"--image {Path(args.image).name} --base {args.base} --runs {args.runs}`. MB, median over the runs.", ""]
    for stem in args.stems.split(","):
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", ""))
        env = {k: v for k, v in env.items() if v != ""}
        out = subprocess.run([sys.executable, "-c", CHILD, stem, args.image, str(args.base), str(args.runs), str(ROOT)],
                             capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            sys.exit(f"{stem}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'failed'}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        lines += [f"### {stem}: weights {res['weights'] / mb:.0f} MB, input {res['input'][1]}x{res['input'][0]}, "
                  f"one entry {res['entry'] / mb:.0f} MB", "",
                  "| operation | peak growth | reserved | kept after | reserved + kept covers the peak | s |",
                  "|---|---|---|---|---|---|"]
        by: dict[str, list] = {}
        for row in res["rows"]:
            by.setdefault(row["op"], []).append(row)
        for op, rs in by.items():
            peak = statistics.median(r["peak"] for r in rs)
            reserved = statistics.median(r["reserved"] for r in rs)
            kept = statistics.median(r["kept"] for r in rs)
            covered = "yes" if reserved + kept >= peak else f"no (short by {(peak - reserved - kept) / mb:.0f})"
            lines.append(f"| {op} | {peak / mb:.0f} | {reserved / mb:.0f} | {kept / mb:.0f} | {covered} | "
                         f"{statistics.median(r['seconds'] for r in rs):.1f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
