"""Depth for every frame of a video, written as an H.264 MP4 (PyAV: FFmpeg in a wheel, no binary).

    report = video.depth_video(model, "in.mp4", "out.mp4", base_size=None, max_seconds=10.0, stride=1,
                               side_by_side=False, normalise="clip", cmap="turbo", npz=None, progress=None)
    report.frames_in, report.frames_out, report.seconds, report.fps_processed, report.stopped_early

How it runs:
- a reader thread decodes the next frames (every `stride`-th, up to `max_seconds` of the clip)
  while the model runs on the current batch; the batch size keeps its working set under
  BATCH_BYTES (batch_size); frames are written as they are done; the clip is never held in
  memory whole;
- each frame goes through the model's own pipeline (model.preprocess, the encoder and decoder
  on the batch, model.postprocess to the frame's size), so a frame's depth is model.predict's
  of that frame;
- normalise="frame" colours each frame over its own range (one pass; colours may flicker);
  "clip" uses one range for the whole clip: two passes, the first keeping each frame's depth at
  the model's resolution in a temporary file on disk (float16) and the range, the second
  decoding the video again (for side by side), resizing and colouring with that range;
- the output is H.264 (libx264) in yuv420p, in MP4, at the input's frame rate / stride, with
  even width and height (an odd last row or column is repeated), and no audio;
- npz: the raw depth as a float16 array (frames, h, w) at the model's resolution (the frame's
  own size would be gigabytes for 4K), with each frame's index and time and the video's size;
  png_zip: the same frames as 16-bit PNGs (each with its min / max in its text chunks).

Bad input raises VideoError: not a video, no video stream, no frames. A file damaged mid-stream
keeps the frames done, and report.stopped_early says where it stopped; so does a clip cut at
max_seconds, and a cancelled job (cancel() returned True).
"""

from __future__ import annotations

import argparse
import math
import queue
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import DPTLabError

__all__ = ["VideoError", "VideoReport", "depth_video", "batch_size", "NORMALISE", "add_subcommand", "main"]

NORMALISE = ("clip", "frame")
MAX_SECONDS = 600.0              # the longest clip a job takes (the app's default is 10 s)
BATCH_BYTES = 1 << 30            # a batch's estimated working set stays under this
MAX_BATCH = 8
CRF = 18                         # libx264 quality (lower is better; 18 is visually lossless)


def _spare_cores() -> bool:
    """More than 4 cores: FFmpeg may thread its decoding and encoding beside the model's threads."""
    import os

    return (os.cpu_count() or 1) > 4


class VideoError(DPTLabError, ValueError):
    """A video DPT Lab cannot read or write, and why (one line)."""


@dataclass
class VideoReport:
    frames_in: int                  # frames decoded (up to max_seconds)
    frames_out: int                 # frames written (every stride-th)
    seconds: float                  # length of the output clip
    fps_processed: float            # frames out per second of wall time
    stopped_early: Optional[str]    # why the job stopped before the end of the clip, or None
    out: Path
    fps: float                      # the output's frame rate
    size: tuple[int, int]           # (height, width) of the input frames
    normalise: str
    depth_range: tuple[float, float]
    npz: Optional[Path] = None
    png_zip: Optional[Path] = None
    wall_s: float = 0.0
    batch: int = 1
    notes: list = field(default_factory=list)

    def text(self) -> str:
        h, w = self.size
        parts = [f"{self.frames_out} frames at {self.fps:.3g} fps ({self.seconds:.1f} s) from {self.frames_in} "
                 f"decoded, {w}x{h}", f"{self.fps_processed:.2f} frames/s processed (batches of {self.batch})",
                 f"colours over {'the whole clip' if self.normalise == 'clip' else 'each frame'}",
                 "H.264 MP4, no audio"]
        if self.stopped_early:
            parts.append(self.stopped_early)
        return " · ".join(parts)


def batch_size(model, input_hw: tuple[int, int], budget: int = BATCH_BYTES) -> int:
    """Frames per encode so that the batch's working set stays under `budget`: per frame, the
    tokens' activations through one block (about 12 x tokens x width x 4 bytes: q/k/v, the MLP's
    4x hidden layer, the residual) plus the decoder's full-resolution maps (~3 x 4 bytes x
    features per input pixel)."""
    info = model.info
    h, w = input_hw
    patch = max(1, int(getattr(info, "patch_size", 14) or 14))
    tokens = (h // patch) * (w // patch) + 1
    width = int(getattr(info, "width", 0) or 768)
    per_frame = 12 * tokens * width * 4 + 3 * 4 * 256 * h * w // 4
    return int(max(1, min(MAX_BATCH, budget // max(1, per_frame))))


def _open(src):
    import av

    try:
        container = av.open(str(src))
    except (av.error.InvalidDataError, av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"not a video PyAV can read: {Path(str(src)).name} ({type(exc).__name__}: {exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{Path(str(src)).name} has no video stream")
    return container


class _Reader:
    """Decodes every `stride`-th frame up to max_seconds in a thread, into a bounded queue:
    items (index, time, rgb), then one ("end", why or None)."""

    def __init__(self, src, stride: int, max_seconds: float, depth: int):
        self.container = _open(src)
        stream = self.container.streams.video[0]
        if _spare_cores():
            stream.thread_type = "AUTO"
        else:                             # a few cores: FFmpeg's decoding threads would take them from the model
            stream.codec_context.thread_count = 1
        self.stream = stream
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        self.fps_in = float(rate)
        self.duration = (float(stream.duration * stream.time_base) if stream.duration is not None
                         else float(self.container.duration) / 1e6 if self.container.duration else None)
        self.stride, self.max_seconds = int(stride), float(max_seconds)
        self.items: "queue.Queue" = queue.Queue(maxsize=max(2, depth))
        self.decoded = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dpt-lab-video-reader", daemon=True)
        self.thread.start()

    def expected_out(self) -> Optional[int]:
        length = self.duration if self.duration else None
        if length is None and self.stream.frames:
            length = self.stream.frames / self.fps_in
        if length is None:
            return None
        return max(1, math.ceil(min(length, self.max_seconds) * self.fps_in / self.stride))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _frames(self):
        """Decoded frames, packet by packet; a packet the decoder refuses ends the clip (the frames
        it still holds are flushed out first) and leaves the reason in self.damaged."""
        import av

        self.damaged = None
        try:
            for packet in self.container.demux(self.stream):
                try:
                    yield from packet.decode()
                except (av.error.FFmpegError, ValueError) as exc:
                    self.damaged = exc
                    break
        except (av.error.FFmpegError, ValueError, OSError) as exc:     # the demuxer itself
            self.damaged = exc
        if self.damaged is not None:
            try:
                yield from self.stream.codec_context.decode(None)
            except (av.error.FFmpegError, ValueError):
                pass

    def _run(self):
        why = None
        index = 0
        try:
            for frame in self._frames():
                t = float(frame.time) if frame.time is not None else index / self.fps_in
                if t >= self.max_seconds - 1e-9:
                    total = f" of {self.duration:.1f} s" if self.duration else ""
                    why = f"cut at {self.max_seconds:g} s{total} (the maximum duration)"
                    break
                self.decoded += 1
                if index % self.stride == 0:
                    if not self._put((index, t, frame.to_ndarray(format="rgb24"))):
                        return
                index += 1
            declared = int(self.stream.frames or 0)
            if why is None and (self.damaged is not None or (declared and index < declared
                                                             and index / self.fps_in < self.max_seconds - 1)):
                reason = f" ({type(self.damaged).__name__})" if self.damaged is not None else ""
                of = f" of {declared}" if declared else ""
                why = (f"the video is damaged or truncated: it stopped after frame {index}{of} "
                       f"({index / self.fps_in:.2f} s); the frames before it are kept{reason}")
        finally:
            self._put(("end", why))

    def close(self):
        self._stop.set()
        self.thread.join(timeout=10)
        self.container.close()


class _Writer:
    """H.264 yuv420p MP4, frames written as they come (even sizes: an odd last row / column repeated)."""

    def __init__(self, out, fps: float, width: int, height: int):
        import av

        self.w, self.h = width + (width % 2), height + (height % 2)
        self.container = av.open(str(out), "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(100000))
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.w, self.h, "yuv420p"
        self.stream.options = {"crf": str(CRF), "preset": "veryfast", **({} if _spare_cores() else {"threads": "1"})}
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        if rgb.shape[0] != self.h or rgb.shape[1] != self.w:
            rgb = np.pad(rgb, ((0, self.h - rgb.shape[0]), (0, self.w - rgb.shape[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


class _RawDepth:
    """The raw depth, streamed: a float16 .npz (written into the zip frame by frame) and / or a
    zip of 16-bit PNG frames."""

    def __init__(self, npz: Optional[Path], png_zip: Optional[Path]):
        self.npz, self.png_zip = npz, png_zip
        self.index: list[int] = []
        self.times: list[float] = []
        self._npz_tmp = None
        self.shape = None
        if npz is not None:
            self._npz_tmp = tempfile.TemporaryFile()
        self._zip = zipfile.ZipFile(png_zip, "w", zipfile.ZIP_STORED) if png_zip is not None else None

    def add(self, index: int, t: float, depth: np.ndarray) -> None:
        from . import imaging

        self.index.append(index)
        self.times.append(t)
        self.shape = depth.shape
        if self._npz_tmp is not None:
            self._npz_tmp.write(np.ascontiguousarray(depth, dtype=np.float16).tobytes())
        if self._zip is not None:
            import io

            buf = io.BytesIO()
            imaging.depth_to_png16(depth, buf)
            self._zip.writestr(f"depth_{len(self.index) - 1:05d}_frame{index:05d}.png", buf.getvalue())

    def close(self, image_size) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._npz_tmp is None:
            return
        from numpy.lib import format as npformat

        n = len(self.index)
        h, w = self.shape if self.shape is not None else (0, 0)
        with zipfile.ZipFile(self.npz, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as z:
            with z.open("depth.npy", "w", force_zip64=True) as f:
                npformat.write_array_header_1_0(f, {"descr": npformat.dtype_to_descr(np.dtype(np.float16)),
                                                    "fortran_order": False, "shape": (n, h, w)})
                self._npz_tmp.seek(0)
                while chunk := self._npz_tmp.read(1 << 24):
                    f.write(chunk)
            for name, arr in (("frame_index", np.asarray(self.index, np.int64)),
                              ("time", np.asarray(self.times, np.float64)),
                              ("image_size", np.asarray(image_size, np.int64))):
                with z.open(f"{name}.npy", "w") as f:
                    npformat.write_array(f, arr)
        self._npz_tmp.close()


def _check(max_seconds, stride, normalise, cmap) -> tuple[float, int, str, str]:
    from .errors import finite_number
    from .imaging import COLORMAPS

    seconds = finite_number(max_seconds, "max_seconds", VideoError)
    if not 0 < seconds <= MAX_SECONDS:
        raise VideoError(f"max_seconds must be in (0, {MAX_SECONDS:g}], got {max_seconds!r}")
    try:
        stride = int(stride)
    except (TypeError, ValueError):
        raise VideoError(f"stride must be a whole number >= 1, got {stride!r}") from None
    if stride < 1:
        raise VideoError(f"stride must be a whole number >= 1, got {stride!r}")
    normalise = str(normalise or "clip").strip().lower()
    if normalise not in NORMALISE:
        raise VideoError(f"normalise must be 'clip' or 'frame', got {normalise!r}")
    if str(cmap).lower() not in COLORMAPS:
        raise VideoError(f"unknown colormap {cmap!r}; choose one of {', '.join(COLORMAPS)}")
    return seconds, stride, normalise, str(cmap).lower()


def depth_video(model, src, out, base_size=None, max_seconds: float = 10.0, stride: int = 1,
                side_by_side: bool = False, normalise: str = "clip", cmap: str = "turbo", npz=None,
                progress: Optional[Callable[[float, str], None]] = None, *, png_zip=None,
                cancel: Optional[Callable[[], bool]] = None, batch: Optional[int] = None,
                target_fps: Optional[float] = None, batch_bytes: int = BATCH_BYTES) -> VideoReport:
    """Depth for every stride-th frame of `src` (up to max_seconds), as an H.264 MP4 at `out`
    (see the module docstring). target_fps (instead of stride): the stride nearest that rate.
    progress(fraction, text) after every batch; cancel() -> True stops the job after the
    current batch (the frames done are kept). batch_bytes: the working-set budget that sizes
    the batches (batch_size), unless `batch` fixes it."""
    import torch

    max_seconds, stride, normalise, cmap = _check(max_seconds, stride, normalise, cmap)
    if target_fps:                       # every stride-th frame, the stride that comes nearest this rate
        probe = _open(src)
        rate = probe.streams.video[0].average_rate or probe.streams.video[0].guessed_rate or 25
        probe.close()
        stride = max(1, round(float(rate) / float(target_fps)))
    out = Path(out)
    t_start = time.perf_counter()
    metric = bool(model.info.metric)
    reader = _Reader(src, stride, max_seconds, depth=2 * MAX_BATCH)
    fps_out = reader.fps_in / stride
    raw = _RawDepth(Path(npz) if npz else None, Path(png_zip) if png_zip else None)
    expected = reader.expected_out()
    writer = None
    store = None                         # "clip": each frame's model-resolution depth, on disk
    lo, hi = math.inf, -math.inf
    stopped, done, size, meta, n_batch = None, 0, None, None, 1
    times: list[float] = []
    try:
        pending: list = []
        finished = False
        while not finished:
            item = reader.items.get()
            if item[0] == "end":
                stopped, finished = item[1], True
            else:
                pending.append(item)
            if not pending or (len(pending) < n_batch and not finished):
                continue
            if size is None:
                size = pending[0][2].shape[:2]
                x0, meta = model.preprocess(pending[0][2], base_size)
                n_batch = batch or batch_size(model, tuple(x0.shape[-2:]), batch_bytes)
                if normalise == "frame":
                    writer = _Writer(out, fps_out, size[1] * (2 if side_by_side else 1), size[0])
                if len(pending) < n_batch and not finished:
                    continue
            batch_items, pending = pending[:n_batch], pending[n_batch:]
            xs = [model.preprocess(rgb, base_size)[0] for _, _, rgb in batch_items]
            with torch.inference_mode():
                depths = model.decode(model.encode(torch.cat(xs)))
            for (index, t, rgb), d in zip(batch_items, depths):
                small = d.float().cpu().numpy()
                raw.add(index, t, small)
                full = model.postprocess(d[None], meta)
                lo, hi = min(lo, float(np.nanmin(full))), max(hi, float(np.nanmax(full)))
                times.append(t)
                if normalise == "frame":
                    writer.write(_frame(rgb, full, cmap, metric, side_by_side, None))
                else:
                    if store is None:
                        store = tempfile.TemporaryFile()
                    store.write(np.ascontiguousarray(small, dtype=np.float32).tobytes())
                done += 1
            if progress is not None:
                elapsed = time.perf_counter() - t_start
                total = max(expected or done, done)
                eta = elapsed / done * (total - done) if done else 0.0
                progress(min(0.99, done / total) * (0.5 if normalise == "clip" else 1.0),
                         f"frame {done} of {total}, ETA {eta:.0f} s")
            if cancel is not None and cancel():
                stopped = f"cancelled after {done} frames"
                break
        if done == 0:
            raise VideoError(f"no frames could be read from {Path(str(src)).name}"
                             + (f" ({stopped})" if stopped else ""))
        if normalise == "clip":
            writer = _Writer(out, fps_out, size[1] * (2 if side_by_side else 1), size[0])
            _second_pass(model, src, stride, max_seconds, store, done, meta, size, writer, cmap, metric,
                         side_by_side, (lo, hi), progress)
    finally:
        reader.close()
        if writer is not None:
            writer.close()
        if store is not None:
            store.close()
    raw.close(size)
    wall = time.perf_counter() - t_start
    return VideoReport(frames_in=reader.decoded, frames_out=done, seconds=done / fps_out,
                       fps_processed=done / wall if wall > 0 else 0.0, stopped_early=stopped, out=out, fps=fps_out,
                       size=tuple(size), normalise=normalise, depth_range=(lo, hi), npz=raw.npz, png_zip=raw.png_zip,
                       wall_s=wall, batch=n_batch)


def _frame(rgb, depth_full, cmap, metric, side_by_side, bounds) -> np.ndarray:
    from . import imaging

    lo, hi = bounds if bounds is not None else (None, None)
    coloured = imaging.colorize(depth_full, cmap, vmin=lo, vmax=hi, invert=metric)
    return np.concatenate([rgb, coloured], axis=1) if side_by_side else coloured


def _second_pass(model, src, stride, max_seconds, store, count, meta, size, writer, cmap, metric, side_by_side,
                 bounds, progress) -> None:
    """Colour the stored depths over the clip's range; the input frames decoded again when shown beside."""
    import torch

    h, w = meta.input_size
    store.seek(0)
    frames = None
    if side_by_side:
        reader = _Reader(src, stride, max_seconds, depth=4)
    try:
        for i in range(count):
            small = np.frombuffer(store.read(h * w * 4), dtype=np.float32).reshape(1, h, w)
            full = model.postprocess(torch.from_numpy(small.copy()), meta)
            if side_by_side:
                item = reader.items.get()
                frames = item[2] if item[0] != "end" else np.zeros((*size, 3), np.uint8)
            writer.write(_frame(frames, full, cmap, metric, side_by_side, bounds))
            if progress is not None and (i % 8 == 0 or i == count - 1):
                progress(0.5 + 0.5 * (i + 1) / count, f"writing frame {i + 1} of {count}")
    finally:
        if side_by_side:
            reader.close()


# -- command line ------------------------------------------------------------------------
def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `video` on an argparse subparsers object; sets func=run_cli."""
    p = subparsers.add_parser("video", help="depth for every frame of a video, as an H.264 MP4",
                              description="Depth for every frame (or every --stride-th) of a video, written as an "
                                          "H.264 MP4 (no audio); optionally the raw depth as a float16 .npz.")
    p.add_argument("input", help="video file (any container and codec PyAV reads)")
    p.add_argument("--model", required=True, help="checkpoint file or -hf folder")
    p.add_argument("--out", default="depth.mp4", help="output MP4 (default depth.mp4)")
    p.add_argument("--side-by-side", action="store_true", help="the input beside the depth")
    p.add_argument("--max-seconds", type=float, default=10.0, help="cut the clip here (default 10)")
    p.add_argument("--stride", type=int, default=1, help="every N-th frame (default 1)")
    p.add_argument("--normalise", choices=NORMALISE, default="clip",
                   help="one colour range for the whole clip (two passes), or per frame (default clip)")
    p.add_argument("--cmap", default="turbo", help="colormap (default turbo)")
    p.add_argument("--npz", default=None, help="also write the raw depth (float16, model resolution)")
    p.add_argument("--png-zip", default=None, help="also write the raw depth as 16-bit PNG frames in a zip")
    p.add_argument("--base-size", type=int, default=None, help="processing size (default: the model's)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    import dpt_lab

    model = dpt_lab.load_model(args.model)

    def say(fraction, text):
        print(f"\r{text}", end="", file=sys.stderr, flush=True)

    report = depth_video(model, args.input, args.out, base_size=args.base_size, max_seconds=args.max_seconds,
                         stride=args.stride, side_by_side=args.side_by_side, normalise=args.normalise, cmap=args.cmap,
                         npz=args.npz, png_zip=args.png_zip, progress=say)
    print("", file=sys.stderr)
    written = [str(report.out)] + [str(p) for p in (report.npz, report.png_zip) if p]
    print(f"{report.text()}: wrote {', '.join(written)}")
    return 0


def main(argv=None) -> int:
    """`python -m dpt_lab.video IN ...` (the same as `python -m dpt_lab video ...`)."""
    from .cli import run_one

    return run_one("video", argv)


if __name__ == "__main__":
    sys.exit(main())
