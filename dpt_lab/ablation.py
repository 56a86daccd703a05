"""Do the high-norm tokens matter for depth? Replace chosen tokens from a block on and see.

    res = ablation.ablate(model, x, block, patches, mode="neighbours")
    res.depth, res.baseline          # B x h x w: the ablated depth and the plain one (model input size)
    res.attention_share              # (layers, 2): share of all attention mass on the patches, before / after
    res.delta_near, res.delta_elsewhere   # mean |depth - baseline| on and around the patches, and elsewhere
    ablation.outlier_patches(probe, block)    # the norms tab's outliers on that block's grid ("auto")

"Vision Transformers Need Registers" (arXiv 2309.16588) finds a few high-norm tokens in
ViTs without registers, on low-information patches, holding global information. Here the
chosen patch tokens are replaced from block `block` on (0-based, like attention.capture's
layers) by

- "neighbours": the mean of their 8 neighbours on the grid that are not chosen (fewer at the
  image border; a patch with no such neighbour takes the mean of all unchosen patches);
- "mean": the mean patch token of the image at that point (all patches, CLS left out);
- "zero": zeros,

in the residual stream entering block `block`, after every later block and after every later
patch merging: whatever a later block or the decoder reads. Only blocks block.. and the
decoder run again, from the recorded input of block `block` (encoders.base.Resume: one
partial re-run, not a full encode); blocks before it keep their records as they are.

SwinV2: the tokens are positions of the grid of `block`'s stage; each later stage's merged
position (row // 2, col // 2 per merging) is replaced there too. Replacement acts on the grid,
before the blocks cut it into windows, so windows need no special case; a windowed layer's
attention mass on a token comes from the queries of its window (zero elsewhere), averaged over
all queries like everywhere else.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .attention import AttentionError, AttentionProbe, LayerError, PatchError
from .encoders.base import Record, Resume

__all__ = ["AblationError", "MODES", "AblationResult", "ablate", "outlier_patches", "attention_share",
           "share_figure", "parse_patches", "format_patches", "add_subcommand", "main"]

MODES = ("neighbours", "mean", "zero")


class AblationError(AttentionError):
    """An ablation the experiment cannot run, and why (one line)."""


@dataclass
class AblationResult:
    depth: Tensor                       # B x h x w, the ablated depth (decoder output, model input size)
    baseline: Tensor                    # B x h x w, the plain depth of the same encode
    attention_share: np.ndarray         # (layers, 2): before / after
    block: int                          # 0-based
    patches: list[tuple[int, int]]      # on `block`'s grid
    mode: str
    probe: AttentionProbe               # the ablated pass (blocks before `block` are the baseline's records)
    baseline_probe: AttentionProbe
    delta_near: float                   # mean |depth - baseline| over the patches and their 8 neighbours
    delta_elsewhere: float              # ... over every other pixel (NaN when nothing is left)
    rerun_s: float = 0.0                # seconds of the partial re-run (blocks block.. and the decoder)

    @property
    def difference(self) -> Tensor:
        return self.depth - self.baseline


def _check(probe: AttentionProbe, block, patches, mode) -> tuple[int, list[tuple[int, int]], str]:
    mode = str(mode or "neighbours").strip().lower()
    if mode not in MODES:
        raise AblationError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        probe._layer(block)
    except LayerError as exc:
        raise LayerError(str(exc).replace("layer", "block")) from None
    block = int(block)
    gh, gw = probe.grid(block)
    chosen = []
    for p in patches or ():
        try:
            r, c = (int(v) for v in p)
        except (TypeError, ValueError):
            raise PatchError(f"a patch must be (row, col), got {p!r}") from None
        if not (0 <= r < gh and 0 <= c < gw):
            raise PatchError(f"patch ({r}, {c}) is outside block {block}'s {gh} x {gw} grid")
        if (r, c) not in chosen:
            chosen.append((r, c))
    return block, chosen, mode


def _on_grid(patches: Sequence[tuple[int, int]], grid0: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(gh, gw) bool mask of the patches (given on grid0) on `grid` (the same, or a merged one)."""
    mask = np.zeros(grid, dtype=bool)
    for r, c in patches:
        mask[r * grid[0] // grid0[0], c * grid[1] // grid0[1]] = True
    return mask


def _editor(patches, grid0, mode: str, has_cls: bool):
    """edit(tokens, grid, fresh): the chosen patches of the stream replaced (see the module
    docstring), in place when `fresh` (a block's own output, referenced nowhere else yet), on a
    copy otherwise. Every mode is one small matrix product: each replaced token is a weighted sum
    of the stream's tokens (its unchosen neighbours, every patch, or nothing), computed before
    any is written."""
    offset = 1 if has_cls else 0
    plans: dict = {}

    def plan(grid, n_tokens, device, dtype):
        key = (grid, n_tokens, str(device), dtype)
        if key not in plans:
            chosen = _on_grid(patches, grid0, grid)
            gh, gw = grid
            targets = np.flatnonzero(chosen)
            weights = np.zeros((len(targets), n_tokens), dtype=np.float64)
            unchosen = np.flatnonzero(~chosen) + offset
            for row, t in enumerate(targets):
                if mode == "mean":
                    weights[row, offset:] = 1.0 / (gh * gw)
                elif mode == "neighbours":
                    r, c = divmod(int(t), gw)
                    near = [(r + dr) * gw + (c + dc) + offset for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                            if (dr or dc) and 0 <= r + dr < gh and 0 <= c + dc < gw and not chosen[r + dr, c + dc]]
                    near = near or list(unchosen)          # no unchosen neighbour: every unchosen patch
                    if near:
                        weights[row, near] = 1.0 / len(near)
            plans[key] = (torch.from_numpy(targets + offset).to(device), torch.from_numpy(weights).to(device, dtype))
        return plans[key]

    def edit(tokens: Tensor, grid, fresh: bool = False) -> Tensor:
        targets, weights = plan(tuple(grid), tokens.shape[1], tokens.device, tokens.dtype)
        if targets.numel() == 0:
            return tokens
        values = torch.einsum("tn,bnc->btc", weights, tokens)
        out = tokens if fresh else tokens.clone()
        out[:, targets] = values
        return out

    return edit


def attention_share(probe: AttentionProbe, block: int, patches: Sequence[tuple[int, int]],
                    layers: Optional[range] = None) -> np.ndarray:
    """(layers,) the share of all attention mass that lands on the patches (given on `block`'s
    grid; mapped onto each layer's grid): the sum over those keys of the attention, averaged over
    heads and queries. Zero for layers on a finer grid than `block`'s (SwinV2's earlier stages)
    and for those left out of `layers` (default: all)."""
    grid0 = probe.grid(block)
    out = np.zeros(probe.num_layers, dtype=np.float64)
    if not patches:
        return out
    offset = 0 if probe.cls_token is None else 1
    with torch.inference_mode():
        for layer in (range(probe.num_layers) if layers is None else layers):
            grid = probe.grid(layer)
            if grid[0] > grid0[0]:
                continue
            device = probe.features.blocks[layer].q.device
            keys = torch.from_numpy(np.flatnonzero(_on_grid(patches, grid0, grid)) + offset).to(device)
            total = 0.0
            heads, n = probe.num_heads(layer), probe.num_tokens(layer)
            for queries, window_keys, probs in probe.probabilities(layer):
                if window_keys is None:                       # (heads, c, N)
                    total += float(probs[:, :, keys].sum())
                else:                                         # windows: (nW, heads, n, n), keys by token
                    hit = torch.isin(window_keys, keys) & (queries >= 0)           # (nW, n) key slots
                    real_q = (queries >= 0)[:, None, :, None]
                    total += float((probs * real_q * hit[:, None, None, :]).sum())
            out[layer] = total / (heads * n)
    return out


def outlier_patches(probe: AttentionProbe, block: int, threshold="auto", *, result=None) -> list[tuple[int, int]]:
    """The norms tab's outliers (norms.find_outliers with `threshold`) of every block on `block`'s
    grid (SwinV2: the blocks of its stage): the high-norm tokens, wherever they show up. result:
    the probe's norms when already at hand (norms.norms_from_features of the same encode)."""
    from . import norms

    if result is None:
        result = norms.norms_from_features(probe.features, batch=probe.batch)
    out = norms.find_outliers(result, threshold=threshold)
    grid = probe.grid(block)
    return sorted({(r, c) for b, r, c, _, _ in out.rows if tuple(result.grids[b - 1]) == tuple(grid)})


def _near(patches, grid, size) -> np.ndarray:
    """(h, w) bool: the pixels of the patches and their 8 neighbours."""
    from .imaging import patch_box

    mask = np.zeros(size, dtype=bool)
    gh, gw = grid
    for r, c in patches:
        for rr in range(max(0, r - 1), min(gh, r + 2)):
            for cc in range(max(0, c - 1), min(gw, c + 2)):
                x0, y0, x1, y1 = patch_box(size, grid, rr, cc)
                mask[y0:y1 + 1, x0:x1 + 1] = True
    return mask


@torch.inference_mode()
def ablate(model, x: Tensor, block: int, patches: Sequence[tuple[int, int]], mode: str = "neighbours", *,
           baseline: Optional[AttentionProbe] = None, baseline_depth: Optional[Tensor] = None) -> AblationResult:
    """Replace `patches` ((row, col) on `block`'s grid) from `block` (0-based) on by `mode`, run
    blocks block.. and the decoder again from the recorded input of `block`, and compare.
    `baseline` (a features.FeatureProbe of x: the session's recorded encode) saves the first
    encode; `baseline_depth` its depth. No patches: the plain forward's depth, exactly."""
    from . import features

    if baseline is None:
        baseline = features.capture(model, x)
    if baseline.features.embedded is None or any(b.tokens is None for b in baseline.features.blocks):
        raise AblationError("the baseline encode recorded no tokens (use features.capture)")
    block, chosen, mode = _check(baseline, block, patches, mode)
    base_depth = model.decode(baseline.features) if baseline_depth is None else baseline_depth
    edit = _editor(chosen, baseline.grid(block), mode, baseline.cls_token is not None) if chosen else None
    resume = Resume(block, baseline.features.blocks, baseline.features.embedded, edit)
    t0 = time.perf_counter()
    feats = model.encode(x, Record(attention=True, norms=True, tokens=True), resume=resume)
    depth = model.decode(feats)
    rerun_s = time.perf_counter() - t0
    probe = features.FeatureProbe(feats, batch=baseline.batch, info=getattr(model, "info", None))
    before = attention_share(baseline, block, chosen)
    later = range(block, probe.num_layers)
    after = np.concatenate([before[:block], attention_share(probe, block, chosen, later)[block:]])
    diff = (depth - base_depth).abs()[baseline.batch].float().cpu().numpy()
    near = _near(chosen, baseline.grid(block), diff.shape)
    d_near = float(diff[near].mean()) if near.any() else float("nan")
    d_else = float(diff[~near].mean()) if (~near).any() else float("nan")
    return AblationResult(depth, base_depth, np.stack([before, after], axis=1).astype(np.float32), block, chosen,
                          mode, probe, baseline, d_near, d_else, rerun_s)


def share_figure(result: AblationResult):
    """Plotly lines: the share of attention on the chosen patches per layer (1-based), before
    and after the ablation, with the ablated block marked."""
    import plotly.graph_objects as go

    layers = np.arange(1, result.attention_share.shape[0] + 1)
    fig = go.Figure()
    for k, (name, dash) in enumerate((("before", "solid"), ("after", "dash"))):
        fig.add_trace(go.Scatter(x=layers, y=result.attention_share[:, k] * 100, mode="lines+markers", name=name,
                                 line=dict(dash=dash),
                                 hovertemplate=f"layer %{{x}}, {name}: %{{y:.2f}}%<extra></extra>"))
    fig.add_vline(x=result.block + 1, line=dict(color="#999", dash="dot"),
                  annotation_text=f"replaced from block {result.block + 1}", annotation_position="top left")
    fig.update_layout(title=f"Attention on the {len(result.patches)} chosen patches", xaxis_title="layer",
                      yaxis_title="share of all attention (%)", template="plotly_white", height=340,
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    return fig


def parse_patches(text) -> list[tuple[int, int]]:
    """'R,C; R,C; ...' -> [(R, C), ...] (empty text: none)."""
    out = []
    for part in str(text or "").replace(" ", "").split(";"):
        if not part:
            continue
        try:
            r, c = part.split(",")
            out.append((int(r), int(c)))
        except ValueError:
            raise AblationError(f"patches must be ROW,COL;ROW,COL;..., got {text!r}") from None
    return out


def format_patches(patches) -> str:
    return "; ".join(f"{r},{c}" for r, c in patches)


# -- command line ------------------------------------------------------------------------
def _patch_list(text: str) -> list[tuple[int, int]]:
    try:
        return parse_patches(text)
    except AblationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `ablate` on an argparse subparsers object; sets func=run_cli."""
    p = subparsers.add_parser(
        "ablate", help="replace tokens from a block on and show what it does to the depth",
        description="Replace chosen patch tokens (the high-norm outliers, or given patches) from a block on, "
                    "re-run the rest of the encoder and the decoder, and write the depth difference.")
    p.add_argument("image", help="image file")
    p.add_argument("--model", required=True, help="checkpoint file or -hf folder")
    p.add_argument("--block", type=int, default=None, help="first block replaced, 1..L (default: the middle one)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tokens", choices=["auto"], default="auto",
                       help="auto: the high-norm outliers the norms tool finds (default)")
    which.add_argument("--patches", type=_patch_list, metavar="R,C;R,C", help="patches of the block's grid")
    p.add_argument("--threshold", default="auto", help="--tokens auto: 'auto' or a fixed norm")
    p.add_argument("--mode", choices=MODES, default="neighbours", help="what replaces them (default neighbours)")
    p.add_argument("--out", default="ablation_diff.png", help="the depth difference, coloured (PNG)")
    p.add_argument("--depth", default=None, help="also write the ablated depth (.npy)")
    p.add_argument("--share", default=None, help="also write the attention-share plot (HTML)")
    p.add_argument("--base-size", type=int, default=None, help="processing size (default: the model's)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    from PIL import Image

    import dpt_lab

    from . import features, imaging

    model = dpt_lab.load_model(args.model)
    rgb = imaging.load_image(args.image)
    x, meta = model.preprocess(rgb, base_size=args.base_size)
    probe = features.capture(model, x)
    n = probe.num_blocks
    block = (n // 2 + 1) if args.block is None else args.block
    if not 1 <= block <= n:
        raise LayerError(f"--block {block} is out of range: this model has blocks 1..{n}")
    patches = args.patches if args.patches is not None else outlier_patches(probe, block - 1, args.threshold)
    if not patches:
        raise AblationError("no tokens to replace: no outliers at this threshold (give --patches or --threshold)")
    res = ablate(model, x, block - 1, patches, args.mode, baseline=probe)
    diff = model.postprocess(res.difference, meta)
    m = float(np.nanmax(np.abs(diff))) or 1.0
    Image.fromarray(imaging.colorize(diff, "spectral", vmin=-m, vmax=m)).save(args.out)
    written = [args.out]
    if args.depth:
        np.save(args.depth, model.postprocess(res.depth, meta))
        written.append(args.depth)
    if args.share:
        share_figure(res).write_html(args.share, include_plotlyjs=True, full_html=True)
        written.append(args.share)
    print(f"{len(res.patches)} patches replaced ({res.mode}) from block {block}/{n}: mean |difference| "
          f"{res.delta_near:.4g} on and around them, {res.delta_elsewhere:.4g} elsewhere; wrote {', '.join(written)}")
    return 0


def main(argv=None) -> int:
    """`python -m dpt_lab.ablation IMAGE ...` (the same as `python -m dpt_lab ablate ...`)."""
    from .cli import run_one

    return run_one("ablate", argv)


if __name__ == "__main__":
    sys.exit(main())
