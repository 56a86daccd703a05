"""Depth maps as pictures and files: the Depth tab and `python -m dpt_lab depth`.

    view = depth.render(depth_hw, metric=model.info.metric, cmap="turbo")
    view.colored      H x W x 3 uint8, the depth map coloured (same size as the image)
    view.colorbar     a small strip: the colour scale with its end values and what they mean
    view.label        "inverse depth (relative)" or "depth in metres (metric)" + the range
    paths = depth.write_files(depth_hw, view, folder, stem)   # 16-bit PNG, float32 .npy, coloured PNG

What the numbers are:
- relative models (Depth-Anything v1/v2, MiDaS) output *inverse* depth up to an unknown
  scale and shift: large = near. The colour map runs cold (far) to warm (near); there are
  no units, so the bar shows the raw range and says "relative".
- metric models (Depth-Anything v2 metric) output depth in metres: large = far. The map is
  inverted so near stays warm, and the bar is labelled in metres.

The 16-bit PNG maps the finite min..max of the depth to 0..65535 and stores min and max
in its text chunks (`imaging.read_png16` / `png16_to_depth` invert it); the .npy is the
float32 depth at the image's resolution, exactly as the model gave it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

RELATIVE_LABEL = "inverse depth (relative)"
METRIC_LABEL = "depth in metres (metric)"


@dataclass
class DepthView:
    """A depth map ready to show: the coloured map, its colour bar and its label."""

    colored: np.ndarray          # H x W x 3 uint8
    colorbar: np.ndarray         # h x w x 3 uint8 strip
    label: str                   # one line: kind and range
    vmin: float
    vmax: float
    metric: bool
    cmap: str


def kind_label(metric: bool) -> str:
    return METRIC_LABEL if metric else RELATIVE_LABEL


def _fmt(v: float, metric: bool) -> str:
    if not math.isfinite(v):
        return str(v)
    if metric:
        return f"{v:.2f} m" if abs(v) < 100 else f"{v:.0f} m"
    return f"{v:.4g}"


def render(depth, *, metric: bool, cmap: str = "turbo", vmin: Optional[float] = None,
           vmax: Optional[float] = None, bar_width: int = 480) -> DepthView:
    """Colour a depth map (H x W array or tensor). Relative: min..max -> cold..warm
    (near is warm); metric: inverted, so near (small) is warm too. vmin / vmax default
    to the finite range of the map."""
    from . import imaging

    a = imaging._as_numpy(depth).astype(np.float32, copy=False)
    lo, hi = imaging._finite_range(a)
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    colored = imaging.colorize(a, cmap, vmin=lo, vmax=hi, invert=bool(metric))
    label = f"{kind_label(metric)}: {_fmt(lo, metric)} … {_fmt(hi, metric)}"
    if not metric:
        label += " (large = near; no units)"
    bar = colorbar(cmap, lo, hi, metric=metric, width=bar_width)
    return DepthView(colored, bar, label, lo, hi, bool(metric), cmap)


def colorbar(cmap: str, vmin: float, vmax: float, *, metric: bool, width: int = 480, ticks: int = 5) -> np.ndarray:
    """A horizontal colour bar (RGB uint8) with tick values under it and a title above.
    Values grow left to right; for metric depth the colours run warm (near) to cold (far),
    as in the coloured map."""
    from PIL import Image, ImageDraw, ImageFont

    from . import imaging

    lut = imaging.colormap_lut(cmap)
    width = max(160, int(width))
    pad, title_h, bar_h, tick_h = 8, 16, 18, 16
    height = title_h + bar_h + tick_h + 2 * pad
    img = Image.new("RGB", (width, height), (255, 255, 255))
    t = np.linspace(0.0, 1.0, width - 2 * pad)
    if metric:
        t = 1.0 - t
    strip = lut[np.rint(t * 255).astype(np.intp)]
    img.paste(Image.fromarray(np.repeat(strip[None], bar_h, axis=0)), (pad, pad + title_h))
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    title = ("depth (metres): near = warm, far = cold" if metric
             else "inverse depth (relative, no units): near = warm, far = cold")
    draw.text((pad, pad), title, fill=(20, 20, 20), font=font)
    y = pad + title_h + bar_h
    n = max(2, int(ticks))
    for i in range(n):
        f = i / (n - 1)
        x = pad + f * (width - 2 * pad - 1)
        v = vmin + f * (vmax - vmin) if math.isfinite(vmin) and math.isfinite(vmax) else float("nan")
        draw.line([(x, y), (x, y + 3)], fill=(20, 20, 20))
        text = _fmt(v, metric)
        tw = draw.textlength(text, font=font)
        tx = min(max(pad, x - tw / 2), width - pad - tw)
        draw.text((tx, y + 3), text, fill=(20, 20, 20), font=font)
    return np.asarray(img)


def with_colorbar(view: DepthView) -> np.ndarray:
    """The coloured map with its colour bar underneath (white margin), for the CLI."""
    from PIL import Image

    h, w = view.colored.shape[:2]
    bar = colorbar(view.cmap, view.vmin, view.vmax, metric=view.metric, width=max(240, min(w, 720)))
    canvas = Image.new("RGB", (max(w, bar.shape[1]), h + bar.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(view.colored), (0, 0))
    canvas.paste(Image.fromarray(bar), (0, h))
    return np.asarray(canvas)


def write_files(depth, view: DepthView, folder, stem: str = "depth", *, png16: bool = True, npy: bool = True,
                color: bool = True) -> dict[str, Path]:
    """Write the downloads into `folder`: {stem}_16bit.png, {stem}.npy (float32) and
    {stem}_color.png. Returns {"png16": path, "npy": path, "color": path} for those written."""
    from PIL import Image

    from . import imaging

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if png16:
        out["png16"] = folder / f"{stem}_16bit.png"
        imaging.depth_to_png16(depth, out["png16"])
    if npy:
        out["npy"] = folder / f"{stem}.npy"
        imaging.save_npy(np.asarray(imaging._as_numpy(depth), dtype=np.float32), out["npy"])
    if color:
        out["color"] = folder / f"{stem}_color.png"
        Image.fromarray(view.colored).save(out["color"])
    return out


# -- command line ------------------------------------------------------------------------
def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `depth` on an argparse subparsers object; sets func=run_cli."""
    p = subparsers.add_parser(
        "depth", help="estimate depth for an image and write it as pictures and arrays",
        description="Estimate depth with a DPT model. Relative models give inverse depth (large = near, "
                    "no units); metric models give metres. Writes a coloured PNG, and optionally a "
                    "16-bit PNG (min/max in its text chunks) and a float32 .npy.")
    p.add_argument("image", help="image file")
    p.add_argument("--model", required=True, help="checkpoint file, -hf folder, local name or known model name")
    p.add_argument("--out", default="depth.png", help="coloured depth PNG (default depth.png)")
    p.add_argument("--png16", nargs="?", const="", default=None, metavar="PATH",
                   help="also write a 16-bit PNG (default path: OUT with _16bit.png)")
    p.add_argument("--npy", nargs="?", const="", default=None, metavar="PATH",
                   help="also write the float32 depth as .npy (default path: OUT with .npy)")
    p.add_argument("--cmap", default="turbo", help="colormap: turbo, viridis, inferno, magma, plasma, spectral, gray")
    p.add_argument("--colorbar", action="store_true", help="add the colour bar under the coloured PNG")
    p.add_argument("--base-size", type=int, default=None, help="processing size (default: the model's)")
    p.add_argument("--stretch", action="store_true", help="stretch to a square input instead of keeping the aspect")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    p.set_defaults(func=run_cli)
    return p


def _derived(out: Path, given: str, suffix: str) -> Path:
    return Path(given) if given else out.with_name(out.stem + suffix)


def run_cli(args) -> int:
    from PIL import Image

    import dpt_lab

    from . import imaging
    from .errors import DPTLabError

    if args.cmap.lower() not in imaging.COLORMAPS:
        raise DPTLabError(f"unknown colormap {args.cmap!r}; expected one of {', '.join(imaging.COLORMAPS)}")
    if args.base_size is not None and args.base_size < 14:
        raise DPTLabError(f"--base-size must be at least 14, got {args.base_size}")
    rgb = imaging.load_image(args.image)
    model = dpt_lab.load_model(args.model, device=args.device)
    depth = model.predict(rgb, base_size=args.base_size, keep_aspect=False if args.stretch else None)
    view = render(depth, metric=model.info.metric, cmap=args.cmap.lower())
    out = Path(args.out)
    Image.fromarray(with_colorbar(view) if args.colorbar else view.colored).save(out)
    written = [str(out)]
    if args.png16 is not None:
        p = _derived(out, args.png16, "_16bit.png")
        imaging.depth_to_png16(depth, p)
        written.append(str(p))
    if args.npy is not None:
        p = _derived(out, args.npy, ".npy")
        imaging.save_npy(depth, p)
        written.append(str(p))
    h, w = depth.shape
    print(f"{w}x{h}, {view.label}: wrote {', '.join(written)}")
    return 0
