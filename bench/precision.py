"""Half precision: where pure float16 overflows at realistic activation magnitudes, and what
autocast (the app's --dtype float16 / bfloat16) costs in accuracy against float32.

    python bench/precision.py [--fixture depth_anything_v2_vitl] [--size 266] [--device cpu|cuda] [--out FILE]

Random weights give small activations, so a trained model's high-norm tokens ("Vision
Transformers Need Registers": norms of a few hundred in DINOv2 ViT-L, more in ViT-g) are
injected: from the middle block on, one patch token of the residual stream is scaled to
each norm of --norms, spread over its channels, and of --massive, in one channel (the
"massive activations" trained ViTs show; encoders.base.Resume's edit, in every pass alike).
For each:
  fp16 pure   model.half(): weights and activations in float16; the first module whose
              output is not finite (forward hooks, in execution order)
  fp16 / bf16 autocast (precision.apply): finite or not, and the largest error of the depth
              relative to its float32 maximum
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from common import machine, write_results
from fixtures import save_fixture_checkpoint

import dpt_lab
from dpt_lab import Record, features, precision
from dpt_lab.encoders.base import Resume


def first_overflow(model, run) -> str:
    """The first module (in execution order) whose output holds inf or NaN, or 'none'."""
    found = []
    hooks = []
    for name, module in model.named_modules():
        if name:
            def hook(_m, _a, out, name=name):
                t = out[0] if isinstance(out, tuple) else out
                if not found and torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                    found.append(f"{name} ({type(_m).__name__})")
            hooks.append(module.register_forward_hook(hook))
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return (found[0] if found else "none"), bool(torch.isfinite(out).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="depth_anything_v2_vitl")
    ap.add_argument("--size", type=int, default=266)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--norms", default="0,300,1000,3000", help="norms spread over the token's channels")
    ap.add_argument("--massive", default="3000,30000,100000", help="norms in one channel (massive activations)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "precision.md"),
                    help="'' to only print")
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = dpt_lab.load_model(save_fixture_checkpoint(args.fixture, Path(tmp))).to(device).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        base = features.capture(model, x)
    block = base.num_blocks // 2
    gh, gw = base.grid(block)
    token = 1 + (gh // 3) * gw + gw // 3

    def injected(norm: float, spread: bool):
        """The token scaled to `norm` over all its channels (spread), or as one massive channel."""
        def edit(tokens, grid, fresh=False):
            out = tokens if fresh else tokens.clone()
            if norm:
                v = out[:, token].float()
                if not spread:
                    v = torch.zeros_like(v)
                    v[:, 0] = 1.0
                out[:, token] = (v / v.norm(dim=-1, keepdim=True) * norm).to(out.dtype)
            return out
        return edit

    def depth(m, norm, x_in, records):
        feats = m.encode(x_in, Record(), resume=Resume(block, records.blocks, records.embedded, injected(*norm)))
        return m.decode(feats).float()

    half = copy.deepcopy(model).half()
    with torch.inference_mode():
        half_base = features.capture(half, x.half()).features
    rows = []
    cases = [(float(v), True) for v in args.norms.split(",")] + [(float(v), False) for v in args.massive.split(",")]
    for norm in cases:
        with torch.inference_mode():
            ref = depth(model, norm, x, base.features)
            scale = float(ref.abs().max())
            where, finite = first_overflow(half, lambda: depth(half, norm, x.half(), half_base))
            errs = []
            for dt in (torch.float16, torch.bfloat16):
                precision.apply(model, dt)
                try:
                    out = depth(model, norm, x, base.features)
                finally:
                    precision.apply(model, None)
                ok = bool(torch.isfinite(out).all())
                errs.append(f"{'finite' if ok else 'NOT finite'}, max error {float((out - ref).abs().max()) / scale:.2e}"
                            if ok else "NOT finite")
        what = f"{norm[0]:g} over all channels" if norm[1] else f"{norm[0]:g} in one channel"
        rows.append(f"| {what} | {'finite' if finite else 'inf / NaN'}; first overflow: {where} | {errs[0]} | "
                    f"{errs[1]} |")
    lines = [f"# Half precision ({args.fixture}, {args.size} x {args.size}, {device.type})", "",
             f"Machine: {machine()}. Command: `python bench/precision.py --fixture {args.fixture} --size {args.size} "
             f"--device {device.type}`. One patch token scaled to the norm from block {block + 1} on; errors are of "
             "the depth, relative to its float32 maximum.", "",
             "| injected norm | pure float16 (model.half()) | autocast float16 | autocast bfloat16 |",
             "|---|---|---|---|"] + rows
    write_results("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
