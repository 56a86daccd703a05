"""Video throughput: video.depth_video against a per-frame loop and against the model's own time.

    python bench/video.py [--seconds 10] [--fps 30] [--bases 518,252] [--runs 1] [--rss-seconds 60] [--out FILE]

A synthetic clip of --seconds at 640 x 360 and --fps (H.264, a box moving over a gradient; made
with PyAV), the ViT-S layout (random weights, real shapes). For each base size, in this process:
  job        video.depth_video(model, clip, out, normalise="frame"), batches as it picks them
  job clip   the same with normalise="clip" (two passes)
  loop       the shape of the official run_video.py: per frame, model.predict + colour + PyAV write
  floor      the model alone on the same preprocessed frames: encode + decode, one frame at a time
  batched    the model alone on the same frames in the job's batches
Goals: job <= 1.15 x floor, and no slower than the loop. Then the peak RSS of a --rss-seconds
clip's job (base 252), in a fresh process (VmHWM), against the same process before the job.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, write_results
from fixtures import save_fixture_checkpoint

import dpt_lab
from dpt_lab import imaging, video

ROOT = Path(__file__).resolve().parents[1]


def make_clip(path: Path, seconds: float, fps: int, size=(360, 640)) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from clips import make_clip as make

    make(path, size=size, seconds=seconds, fps=fps)


def per_frame_loop(model, clip: Path, out: Path, base: int) -> int:
    """run_video.py's shape: decode, predict, colour, encode, one frame after another."""
    import av

    n = 0
    with av.open(str(clip)) as src:
        stream = src.streams.video[0]
        writer = video._Writer(out, float(stream.average_rate), stream.width, stream.height)
        for frame in src.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")
            writer.write(imaging.colorize(model.predict(rgb, base_size=base), "turbo"))
            n += 1
        writer.close()
    return n


def model_only(model, clip: Path, base: int, batch: int) -> float:
    """Seconds of encode + decode alone over the clip's preprocessed frames, `batch` at a time."""
    import av

    with av.open(str(clip)) as src:
        xs = [model.preprocess(f.to_ndarray(format="rgb24"), base)[0] for f in src.decode(src.streams.video[0])]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(xs), batch):
            model.decode(model.encode(torch.cat(xs[i:i + batch])))
    return time.perf_counter() - t0


RSS_SCRIPT = r"""
import sys, time, resource
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
import dpt_lab
from dpt_lab import video
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
model = dpt_lab.load_model(sys.argv[2])
before = hwm()
report = video.depth_video(model, sys.argv[3], sys.argv[4], base_size=252, max_seconds=600, normalise="clip")
print(before, hwm(), report.frames_out, report.batch)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--bases", default="518,252")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--rss-seconds", type=float, default=60.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "video.md"), help="'' to only print")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dpt_lab_video_"))
    ckpt = save_fixture_checkpoint("depth_anything_v2_vits", tmp)
    model = dpt_lab.load_model(ckpt)
    clip = tmp / "clip.mp4"
    make_clip(clip, args.seconds, args.fps)
    frames = int(round(args.seconds * args.fps))
    rows = []
    for base in (int(b) for b in args.bases.split(",")):
        video.depth_video(model, clip, tmp / "warm.mp4", base_size=base, max_seconds=0.5)      # warm-up
        timing = {k: [] for k in ("job", "job clip", "loop", "floor", "batched")}
        batch = 1
        for _ in range(args.runs):
            t0 = time.perf_counter()
            report = video.depth_video(model, clip, tmp / "job.mp4", base_size=base, max_seconds=600,
                                       normalise="frame")
            timing["job"].append(time.perf_counter() - t0)
            batch = report.batch
            t0 = time.perf_counter()
            video.depth_video(model, clip, tmp / "clip_job.mp4", base_size=base, max_seconds=600, normalise="clip")
            timing["job clip"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            per_frame_loop(model, clip, tmp / "loop.mp4", base)
            timing["loop"].append(time.perf_counter() - t0)
            timing["floor"].append(model_only(model, clip, base, 1))
            timing["batched"].append(model_only(model, clip, base, batch))
        med = {k: statistics.median(v) for k, v in timing.items()}
        rows.append(f"| {base} | {frames / med['job']:.2f} ({med['job']:.1f} s) | "
                    f"{frames / med['job clip']:.2f} ({med['job clip']:.1f} s) | {frames / med['loop']:.2f} | "
                    f"{frames / med['floor']:.2f} | {frames / med['batched']:.2f} (batch {batch}) | "
                    f"**{med['job'] / med['floor']:.3f}x** | {med['job'] / med['loop']:.3f}x |")
    rss = ""
    if args.rss_seconds > 0:
        long_clip = tmp / "long.mp4"
        make_clip(long_clip, args.rss_seconds, 15)
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(ROOT), str(ckpt), str(long_clip),
                              str(tmp / "long_out.mp4")], capture_output=True, text=True, check=True)
        before, after, n, b = (int(v) for v in out.stdout.split()[-4:])
        rss = (f"\nPeak RSS of a {args.rss_seconds:g} s clip's job (640 x 360 at 15 fps, {n} frames, base 252, "
               f"normalise clip, batches of {b}), in a fresh process: VmHWM {after / 2**20:.0f} MB, against "
               f"{before / 2**20:.0f} MB with the model loaded before the job (+{(after - before) / 2**20:.0f} MB). "
               "The job holds a batch of frames, the reader's queue (16 frames) and the writer; the clip's "
               "depth waits on disk for the second pass.\n")
    lines = [f"# Video: {args.seconds:g} s at 640 x 360, {args.fps} fps ({frames} frames), ViT-S layout", "",
             f"Machine: {machine()}. Command: `python bench/video.py --seconds {args.seconds:g} --fps {args.fps} "
             f"--bases {args.bases} --runs {args.runs}`. Frames per second of wall time (median of {args.runs}).", "",
             "| base | job (per-frame colours) | job (clip colours, 2 passes) | per-frame loop (run_video.py) | "
             "floor: model alone, 1 frame | model alone, batched | job / floor | job / loop |",
             "|---|---|---|---|---|---|---|---|"] + rows + [rss,
             "Goals: job <= 1.15x the floor, and no slower than the loop."]
    write_results("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
