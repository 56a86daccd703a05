"""Fusion scaling: multiply each of the four DPT fusion inputs and re-run only the decoder.

Factor i multiplies the reassembled map that enters fusion block i (the output of the
decoder's 3x3 `layer_rn[i]` conv, decoder width), for every family alike:
    factor 1: the finest map, 4x the ViT patch grid   (DA at 518: 148x148; BEiT at 384: 96x96; SwinV2: input / 4)
    factor 2: 2x the patch grid                       (74x74; 48x48; input / 8)
    factor 3: the patch grid                          (37x37; 24x24; input / 16)
    factor 4: the coarsest, half the patch grid       (19x19; 12x12; input / 32)
0 feeds that fusion block a zero map (its contribution is gone), 1 is the model as
trained; negative or large factors give glitch art. Only `model.decode` runs: the encoder
features are computed once per image, model and size, and `model.decode` keeps the four
layer_rn outputs with them (DepthModel.fusion_inputs), so a new set of factors runs only
the fusion blocks and the head.
"""

from __future__ import annotations

import argparse
import random
from typing import Sequence

import numpy as np
import torch

from .choices import FUSION_IDENTITY as IDENTITY  # noqa: F401 - fusion's public names, shared with the tab
from .choices import FUSION_LABELS as LAYER_LABELS  # noqa: F401
from .choices import FUSION_MAX as SCALE_MAX
from .choices import FUSION_MIN as SCALE_MIN
from .choices import FUSION_PRESETS as PRESETS  # noqa: F401 - name -> factors, offered by the tab
from .errors import DPTLabError


class FusionError(DPTLabError, ValueError):
    """Bad fusion factors (not four finite numbers in range)."""


def check_scales(scales: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise FusionError(f"fusion factors must be numbers, got {scales!r}") from None
    if len(values) != 4:
        raise FusionError(f"expected 4 fusion factors, got {len(values)}")
    for v in values:
        if not np.isfinite(v):
            raise FusionError(f"fusion factors must be finite, got {v}")
        if not SCALE_MIN <= v <= SCALE_MAX:
            raise FusionError(f"fusion factor {v} outside [{SCALE_MIN:g}, {SCALE_MAX:g}]")
    return values  # type: ignore[return-value]


def parse_scales(text: str) -> tuple[float, float, float, float]:
    return check_scales(text.replace(" ", "").split(","))


@torch.inference_mode()
def scaled_depth(model, feats, scales: Sequence[float]) -> torch.Tensor:
    """B x H x W depth from cached encoder features with the four fusion factors."""
    return model.decode(feats, check_scales(scales))


def random_glitch(seed: int | None = None) -> tuple[float, float, float, float]:
    """Factors far from 1 (some negative, some large): the glitch-art corner of the space."""
    rng = random.Random(seed)
    return tuple(round(rng.choice((-1, 1)) * rng.uniform(0.0, 4.0), 2) for _ in range(4))  # type: ignore[return-value]


def sweep_scales(layer: int, start: float, stop: float, frames: int) -> list[tuple[float, ...]]:
    """Factors for an animation where factor `layer` (1..4) goes from start to stop."""
    if layer not in (1, 2, 3, 4):
        raise FusionError(f"sweep layer must be 1..4, got {layer}")
    if frames < 2:
        raise FusionError("a sweep needs at least 2 frames")
    values = np.linspace(start, stop, frames)
    return [check_scales([float(v) if j == layer - 1 else 1.0 for j in range(4)]) for v in values]


def render_sweep(model, feats, meta, layer: int, start: float, stop: float, frames: int, cmap: str = "turbo"):
    """Coloured frames of a sweep, one decode each, sharing one colour range so the
    animation shows real change rather than per-frame renormalisation."""
    from . import imaging

    depths = [model.postprocess(scaled_depth(model, feats, s), meta) for s in sweep_scales(layer, start, stop, frames)]
    lo = float(min(np.nanmin(d) for d in depths))
    hi = float(max(np.nanmax(d) for d in depths))
    return [imaging.colorize(d, cmap, vmin=lo, vmax=hi) for d in depths]


def save_gif(frames: list[np.ndarray], path, fps: float = 12.0) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


# -- CLI ------------------------------------------------------------------------------
def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("fusion", help="depth with scaled fusion layers, or a sweep animation",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("--model", required=True, help="checkpoint path, -hf folder or known model name")
    p.add_argument("--scales", default="1,1,1,1", help="four factors, finest first, e.g. 1,0.5,0,1")
    p.add_argument("--sweep", nargs=3, metavar=("LAYER", "FROM", "TO"), help="animate one factor (layer 1..4)")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--out", required=True, help="depth .png (or .gif with --sweep)")
    p.add_argument("--cmap", default="turbo")
    p.add_argument("--base-size", type=int, default=None)
    aspect = p.add_mutually_exclusive_group()
    aspect.add_argument("--stretch", action="store_true", help="stretch to a square instead of keeping the aspect")
    aspect.add_argument("--keep-aspect", action="store_true", help="keep the aspect (default except for SwinV2)")
    p.set_defaults(func=run_cli)


def run_cli(args) -> None:
    from PIL import Image

    from . import imaging
    from .checkpoints import load_model

    # the factors are checked before the (slow) load and encode
    if args.sweep:
        try:
            layer, start, stop = int(args.sweep[0]), float(args.sweep[1]), float(args.sweep[2])
        except ValueError:
            raise FusionError(f"--sweep takes LAYER (1..4) FROM TO, got {' '.join(args.sweep)}") from None
        sweep_scales(layer, start, stop, args.frames)
    else:
        scales = parse_scales(args.scales)
    model = load_model(args.model)
    keep_aspect = False if args.stretch else (True if args.keep_aspect else None)  # None: the family's default
    x, meta = model.preprocess(args.image, base_size=args.base_size, keep_aspect=keep_aspect)
    with torch.inference_mode():
        feats = model.encode(x)
    if args.sweep:
        frames = render_sweep(model, feats, meta, layer, start, stop, args.frames, args.cmap)
        save_gif(frames, args.out)
        print(f"wrote {len(frames)} frames to {args.out} (factor {layer}: {start:g} -> {stop:g}, one encode)")
        return
    depth = model.postprocess(scaled_depth(model, feats, scales), meta)
    Image.fromarray(imaging.colorize(depth, args.cmap)).save(args.out)
    print(f"wrote {args.out} ({depth.shape[1]}x{depth.shape[0]}, factors {args.scales})")
