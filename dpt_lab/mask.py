"""Masking by depth: keep the pixels whose depth lies in a range (after removing the plane
of best fit, which often takes out the floor), as an RGBA cut-out, a mask and the
plane-removed depth. Works on a depth already computed; the geometry is in scene.py.

    python -m dpt_lab mask IMAGE --model M --range 0.3,1.0 [--invert] [--plane 1.0]
                                 --out cutout.png [--mask mask.png] [--depth flat.npy]

Relative models: the range is on the normalised inverse depth, 0..1 with 1 the nearest.
Metric models: the range is in metres (after plane removal: metres from the plane).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import scene
from .scene import SceneError

CHECKER_PX = 12


@dataclass
class Masked:
    keep: np.ndarray          # bool H x W, at the image's size
    flat: np.ndarray          # float32 H x W: the depth the range applies to (plane removed)
    plane: Optional[tuple]    # (a, b, c) removed x strength, or None at strength 0
    strength: float
    normalised: bool          # the range is on 0..1 (relative models) rather than metres

    @property
    def kept_share(self) -> float:
        return float(self.keep.mean()) if self.keep.size else 0.0


def range_label(metric: bool) -> str:
    return ("depth range in metres (after plane removal: from the plane)" if metric else
            "depth range on the normalised inverse depth (0 = farthest, 1 = nearest)")


def parse_range(text) -> tuple[float, float]:
    """'0.3,1.0' -> (0.3, 1.0)."""
    parts = str(text).replace(" ", "").split(",")
    if len(parts) != 2:
        raise SceneError(f"--range takes LOW,HIGH (e.g. 0.3,1.0), got {text!r}")
    return scene.number(parts[0], "range low"), scene.number(parts[1], "range high")


def mask_depth(depth, low, high, *, invert: bool = False, strength=0.0, metric: bool = False,
               plane: Optional[tuple] = None, flat: Optional[np.ndarray] = None) -> Masked:
    """The mask of `depth` (H x W) for a range, after removing strength x its plane (fitted
    robustly unless given). `flat` may pass the plane-removed depth already computed."""
    s = scene.number(strength, "plane strength")
    if s != 0.0 and plane is None:
        plane = scene.fit_plane(depth)
    if flat is None:
        flat = scene.remove_plane(depth, s, plane) if s != 0.0 else np.asarray(depth, dtype=np.float32)
    keep = scene.depth_mask(flat, low, high, invert=bool(invert), normalised=not metric)
    return Masked(keep, flat, plane if s != 0.0 else None, s, not metric)


def cut_out(rgb: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """RGBA (uint8) at the image's size: the image, alpha 255 where kept, 0 elsewhere."""
    rgb = np.asarray(rgb)
    if rgb.shape[:2] != keep.shape:
        raise SceneError(f"image {rgb.shape[1]}x{rgb.shape[0]} and mask {keep.shape[1]}x{keep.shape[0]} differ")
    return np.dstack([rgb[..., :3].astype(np.uint8), np.where(keep, 255, 0).astype(np.uint8)])


def mask_image(keep: np.ndarray) -> np.ndarray:
    """The mask as a grey image (uint8: 255 = kept, 0 = masked out)."""
    return np.where(keep, 255, 0).astype(np.uint8)


def save_cutout(rgb: np.ndarray, keep: np.ndarray, path, **png) -> None:
    from PIL import Image

    Image.fromarray(cut_out(rgb, keep), "RGBA").save(path, **png)


def save_mask(keep: np.ndarray, path, **png) -> None:
    from PIL import Image

    Image.fromarray(mask_image(keep), "L").save(path, **png)


def checkerboard(shape: tuple[int, int], square: int = CHECKER_PX) -> np.ndarray:
    """The usual grey squares that stand for transparency (H x W x 3 uint8)."""
    h, w = shape
    light = ((np.arange(h)[:, None] // square + np.arange(w)[None, :] // square) % 2) == 0
    return np.repeat(np.where(light, 204, 153).astype(np.uint8)[..., None], 3, axis=2)


def preview(rgb: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The image where kept, the checkerboard where masked out (RGB, shown in the page)."""
    return np.where(keep[..., None], np.asarray(rgb)[..., :3], checkerboard(keep.shape))


def shrink(keep: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask sampled (nearest) onto a smaller display grid of the same picture."""
    h, w = keep.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int), w - 1)
    return keep[rows[:, None], cols[None, :]]


def write_files(rgb: np.ndarray, masked: Masked, folder, stem: str = "mask") -> dict:
    """cutout (RGBA PNG), mask (PNG, 255 = kept), depth16 (16-bit PNG of the plane-removed
    depth, min/max in its text chunks) and npy (its float32 array), in `folder`."""
    from . import imaging

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"cutout": folder / f"{stem}_cutout.png", "mask": folder / f"{stem}_mask.png",
           "depth16": folder / f"{stem}_depth_16bit.png", "npy": folder / f"{stem}_depth.npy"}
    save_cutout(rgb, masked.keep, out["cutout"], compress_level=1)
    save_mask(masked.keep, out["mask"], compress_level=1)
    imaging.depth_to_png16(masked.flat, out["depth16"])
    imaging.save_npy(masked.flat, out["npy"])
    return out


# -- command line ------------------------------------------------------------------------
def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("mask", help="cut out the pixels in a depth range (after plane removal)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file")
    p.add_argument("--model", required=True, help="checkpoint file, -hf folder, local name or known model name")
    p.add_argument("--range", required=True, dest="depth_range", metavar="LOW,HIGH",
                   help="relative models: on the normalised inverse depth, 0..1 (1 = nearest); metric: metres")
    p.add_argument("--invert", action="store_true", help="keep what lies outside the range")
    p.add_argument("--plane", default="0", metavar="STRENGTH",
                   help="subtract STRENGTH x the robust plane of best fit first (0 = off, 1 = all of it)")
    p.add_argument("--out", required=True, help="RGBA cut-out PNG (alpha = mask)")
    p.add_argument("--mask", default=None, help="also write the mask PNG (255 = kept)")
    p.add_argument("--depth", default=None, metavar="PATH", help="also write the plane-removed depth (.npy or 16-bit .png)")
    p.add_argument("--base-size", type=int, default=None, help="processing size (default: the model's)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    import dpt_lab

    from . import imaging

    low, high = parse_range(args.depth_range)        # checked before the (slow) load and encode
    strength = scene.number(args.plane, "--plane")
    if low > high:
        raise SceneError(f"range low {low:g} is above range high {high:g}")
    rgb = imaging.load_image(args.image)
    model = dpt_lab.load_model(args.model, device=args.device)
    depth = model.predict(rgb, base_size=args.base_size)
    masked = mask_depth(depth, low, high, invert=args.invert, strength=strength, metric=bool(model.info.metric))
    save_cutout(rgb, masked.keep, args.out)
    written = [str(args.out)]
    if args.mask:
        save_mask(masked.keep, args.mask)
        written.append(str(args.mask))
    if args.depth:
        path = Path(args.depth)
        if path.suffix.lower() == ".png":
            imaging.depth_to_png16(masked.flat, path)
        else:
            imaging.save_npy(masked.flat, path)
        written.append(str(path))
    print(f"kept {masked.kept_share:.1%} of {rgb.shape[1]}x{rgb.shape[0]} pixels "
          f"({range_label(bool(model.info.metric))} {low:g}..{high:g}{', inverted' if args.invert else ''}); "
          f"wrote {', '.join(written)}")
    return 0
