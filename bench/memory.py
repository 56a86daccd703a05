"""How much memory a model needs: resident memory after loading it and after its first
forward at 518, with and without packed weights, with the tuned allocator and without.

    python bench/memory.py [--stems depth_anything_v2_vits,depth_anything_v2_vitb,depth_anything_v2_vitl]
                           [--size 518] [--out bench/results/memory.md]

Each measurement runs in a fresh Python process (the allocator's state is per process):
it sets the allocator (dpt_lab.memory.configure, or leaves glibc alone), loads the
fixture checkpoint (tests/fixtures.py: the real layout, deterministic random weights),
then runs one forward at size x size under inference_mode, as the app's encode does. It
reports RSS after `import torch, dpt_lab`, after the load, after the forward, the peak
(VmHWM), and the bytes of packed weight copies. Packing is the default (fastpath.packs:
models with at most PACK_MODEL_MAX_BYTES of weights), or forced on for every size ("pack
all", the old default), or off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r"""
import json, sys
from pathlib import Path
mode, pack, path, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from dpt_lab import memory
memory.configure(mode)
import torch
import dpt_lab
from dpt_lab import fastpath


def status():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) << 10
    return out


if pack == "all":
    fastpath.PACK_MODEL_MAX_BYTES = 1 << 62
elif pack == "off":
    fastpath.PACK_WEIGHTS = False
start = status()["VmRSS"]
model = dpt_lab.load_model(path)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
loaded = status()["VmRSS"]
x = torch.randn(1, 3, size, size)
with torch.inference_mode():
    model(x)
memory.release()
after = status()
print(json.dumps(dict(start=start, weights=weights, loaded=loaded, after=after["VmRSS"], peak=after["VmHWM"],
                      packed=fastpath.packed_bytes(), packs=fastpath.packs(model))))
"""


def measure(path: Path, mode: str, pack: str, size: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, pack, str(path), str(size)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stems", default="depth_anything_v2_vits,depth_anything_v2_vitb,depth_anything_v2_vitl")
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.md"))
    args = ap.parse_args()
    from fixtures import save_fixture_checkpoint

    gb = 2 ** 30
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpt_lab_memory_") as tmp:
        for stem in args.stems.split(","):
            path = save_fixture_checkpoint(stem, Path(tmp))
            for mode, pack in (("tuned", "default"), ("tuned", "all"), ("tuned", "off"), ("off", "all")):
                r = measure(path, mode, pack, args.size)
                rows.append((stem, mode, pack, r))
                print(stem, mode, pack, json.dumps({k: (round(v / gb, 3) if isinstance(v, int) and not
                                                        isinstance(v, bool) else v) for k, v in r.items()}),
                      flush=True)
            path.unlink()
    lines = ["## Memory per model: after loading, after the first forward", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}. "
             f"Command: `python bench/memory.py --stems {args.stems} --size {args.size}`. One fresh process per "
             f"row; fixture checkpoints (real layouts, random weights); one forward at {args.size} x {args.size}.",
             "",
             "| model | allocator | packing | weights GB | RSS: torch + dpt_lab | + model loaded | after 1st forward "
             "| after - weights | peak (VmHWM) | packed copies GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for stem, mode, pack, r in rows:
        label = {"default": f"default ({'packs' if r['packs'] else 'unpacked'})", "all": "pack all (old default)",
                 "off": "off"}[pack]
        lines.append(f"| {stem} | {mode} | {label} | {r['weights'] / gb:.2f} | {r['start'] / gb:.2f} | "
                     f"{r['loaded'] / gb:.2f} | {r['after'] / gb:.2f} | {(r['after'] - r['weights']) / gb:+.2f} | "
                     f"{r['peak'] / gb:.2f} | {r['packed'] / gb:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
