"""Synthetic video clips for the tests, made with PyAV: a bright box moving over a gradient."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def frame_picture(i: int, n: int, h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs * 200 // max(1, w - 1), ys * 200 // max(1, h - 1), np.full_like(xs, 90)], -1)
    x = int(i * (w - w // 4) / max(1, n))
    img[h // 5: h // 5 + h // 3, x: x + w // 4] = (250, 210, 40)
    return img.astype(np.uint8)


def make_clip(path: Path, *, size=(98, 132), seconds: float = 2.0, fps: int = 12, codec: str = "libx264",
              container: str | None = None, pix_fmt: str = "yuv420p", options=None) -> list[np.ndarray]:
    """Write the clip; returns its frames as written (RGB)."""
    import av

    h, w = size
    n = int(round(seconds * fps))
    frames = [frame_picture(i, n, h, w) for i in range(n)]
    out = av.open(str(path), "w", format=container, options=options or {})
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
    for img in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return frames


def read_frames(path: Path) -> tuple[list[np.ndarray], dict]:
    """Every frame of a video as RGB, and its stream's codec, pixel format, size and rate."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        info = {"codec": s.codec_context.name, "pix_fmt": s.codec_context.pix_fmt, "width": s.width,
                "height": s.height, "fps": float(s.average_rate), "audio": len(c.streams.audio)}
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    return frames, info
