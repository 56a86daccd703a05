"""An encode's peak working set against the entry it leaves in the feature store: the
figure behind store.WORKING_SET_FACTOR (what an encode in flight reserves under the cap).

    python bench/working_set.py [--archs depth_anything_v2:vits,midas_beit:beit_base,midas_swin2:swin2_tiny]
                                [--shapes 400x600,200x700,700x200,700x700] [--runs 3]

Each architecture runs in a fresh process (dpt_lab.build: random weights, the app's
allocator settings). After one warm-up encode (model packed, buffers allocated) it
encodes each picture shape at the family's native base size as the app does
(preprocess, attention.capture with norms, decode, postprocess), with the peak RSS reset
before (/proc/self/clear_refs) and read after (VmHWM). Reported per shape: tokens, the
entry's measured bytes, the peak RSS growth over the resting RSS, and their ratio
(median of --runs).
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
import json, sys
from pathlib import Path
family, size, shapes, runs = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
from dpt_lab import memory
memory.configure()
import numpy as np
import torch
import dpt_lab
from dpt_lab import attention, store


def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) << 10


def encode(model, rgb):
    x, meta = model.preprocess(rgb)
    with torch.inference_mode():
        probe = attention.capture(model, x, norms=True)
        depth = model.decode(probe.features)
    return x, (x, probe, depth, model.postprocess(depth, meta))


model = dpt_lab.build(family, size)
rng = np.random.default_rng(0)
encode(model, rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
out = []
for shape in shapes:
    h, w = map(int, shape.split("x"))
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for _ in range(runs):
        memory.release()
        rest = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        x, kept = encode(model, rgb)
        peak = status("VmHWM")
        entry = store.measure(kept)
        tile = model.info.tile
        out.append(dict(shape=shape, input=list(x.shape[-2:]), tokens=(x.shape[-2] // tile) * (x.shape[-1] // tile),
                        entry=entry, growth=peak - rest))
        del kept
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="depth_anything_v2:vits,midas_beit:beit_base,midas_swin2:swin2_tiny")
    ap.add_argument("--shapes", default="400x600,200x700,700x200,700x700")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from dpt_lab.store import WORKING_SET_FACTOR

    mb = 2 ** 20
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; WORKING_SET_FACTOR = {WORKING_SET_FACTOR}")
    print("| model | picture | model input | entry MB | peak growth MB | peak / entry |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for arch in args.archs.split(","):
        family, size = arch.split(":")
        res = subprocess.run([sys.executable, "-c", CHILD, family, size, args.shapes, str(args.runs)], cwd=ROOT,
                             capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-2000:])
        rows = json.loads(res.stdout.strip().splitlines()[-1])
        for shape in args.shapes.split(","):
            mine = [r for r in rows if r["shape"] == shape]
            entry = statistics.median(r["entry"] for r in mine)
            growth = statistics.median(r["growth"] for r in mine)
            worst = max(worst, growth / entry)
            print(f"| {family} {size} | {shape} | {'x'.join(map(str, mine[0]['input']))} | {entry / mb:.0f} | "
                  f"{growth / mb:.0f} | {growth / entry:.2f} |", flush=True)
    print(f"largest peak / entry: {worst:.2f} (the store reserves {WORKING_SET_FACTOR}x)")


if __name__ == "__main__":
    main()
