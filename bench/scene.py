"""From the cached depth to the 3D file on disk, for a 12 MP photo: dpt_lab.scene.build_mesh
+ write_glb (and the PLY), at the default vertex cap and at the 2M cap, with the file sizes.

    python bench/scene.py [--runs 5] [--width 4000 --height 3000]

The depth is a synthetic scene at the photo's size (a tilted floor, a box, a far wall, mild
noise: an edge cut that keeps most triangles, as real depth does) and the image random
colours; relative depth placed between near 1 and far 10, as the 3D tab does by default.
Goal (issue 20): at most 1 s to the GLB at the default cap on this CPU. Medians over --runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def synthetic(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inverse = 0.2 + 0.6 * yy / h + 0.05 * xx / w                    # nearer towards the bottom
    box = (yy > 0.4 * h) & (yy < 0.8 * h) & (xx > 0.3 * w) & (xx < 0.6 * w)
    inverse = np.where(box, inverse + 0.2, inverse)
    inverse = np.where(yy < 0.2 * h, 0.05, inverse) + rng.normal(0, 0.001, (h, w)).astype(np.float32)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), inverse.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scene.md"))
    args = ap.parse_args()

    from common import write_results

    from dpt_lab import scene

    rgb, depth = synthetic(args.height, args.width)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpt_lab_scene_") as tmp:
        for cap in (scene.DEFAULT_MAX_VERTICES, scene.MAX_VERTICES):
            times = {"mesh": [], "glb": [], "ply": [], "points glb": []}
            for _ in range(args.runs):
                t0 = time.perf_counter()
                mesh = scene.build_mesh(rgb, depth, inverse=True, near=1.0, far=10.0, max_vertices=cap)
                t1 = time.perf_counter()
                glb = scene.write_glb(mesh, Path(tmp) / "s.glb")
                t2 = time.perf_counter()
                ply = scene.write_ply(mesh, Path(tmp) / "s.ply")
                t3 = time.perf_counter()
                points = scene.write_glb(mesh, Path(tmp) / "p.glb", points=True)
                t4 = time.perf_counter()
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    times[k].append(v)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((cap, len(mesh.vertices), len(mesh.faces), mesh.step, med,
                         glb.stat().st_size, ply.stat().st_size, points.stat().st_size))
    lines = [f"## 3D: cached depth -> file on disk, {args.width}x{args.height} ({args.width * args.height / 1e6:.0f} MP)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}. "
             f"Command: `python bench/scene.py --runs {args.runs} --width {args.width} --height {args.height}`. "
             f"Seconds, median of {args.runs}.", "",
             "| cap | vertices | triangles | step (px) | build_mesh | write_glb | depth -> GLB | GLB MB | write_ply | "
             "PLY MB | points GLB | points GLB MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cap, nv, nf, step, med, glb_b, ply_b, pts_b in rows:
        lines.append(f"| {cap:,} | {nv:,} | {nf:,} | {step} | {med['mesh']:.3f} | {med['glb']:.3f} | "
                     f"**{med['mesh'] + med['glb']:.3f}** | {glb_b / 1e6:.1f} | {med['ply']:.3f} | {ply_b / 1e6:.1f} | "
                     f"{med['points glb']:.3f} | {pts_b / 1e6:.1f} |")
    lines += ["", "Goal: depth -> GLB at the default cap <= 1 s."]
    write_results("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
