"""Feature lenses over the tokens of one recorded encode: PCA colours and similarity by click.

    fp = features.capture(model, x)            # ONE model.encode(x, Record(attention, norms, tokens))
    fp.num_blocks; fp.grid(block) -> (gh, gw); fp.tokens(block) -> (N, C), CLS first when there is one
    fp.pca(block) -> Pca                        # the first three principal components of the patch tokens
    fp.pca_rgb(block, basis_block=None, foreground=False) -> (gh, gw, 3) float32 in [0, 1]
    fp.similarity(block, token) -> (N,)         # cosine of `token` with every token of the block
    fp.most_similar(block, token, k) -> the k most similar patch tokens (the token itself left out)

A FeatureProbe IS an attention.AttentionProbe (the same encode also recorded q / k and the
norms), so the app keeps one object per encode and every lens reads it. Blocks are 0-based
like the attention probe's layers; tokens(block) is the residual stream right after that
block (before any final LayerNorm), in float32, as the encoder computed it: for the -hf
layouts it is transformers' hidden_states[block + 1]. SwinV2 blocks live on their stage's
grid and have no CLS.

PCA is fitted on the block's patch tokens (CLS left out), centred, from the eigenvectors
of their covariance in float64. Each component's sign is fixed so that results do not flip
between runs: the first so that the patches on the image border score below zero on
average (the background side, as DINOv2's demo uses it), the others so that their largest
coefficient is positive. pca_rgb maps each component to a colour channel over the 1st..99th
percentile of this block's projections (high-norm outlier tokens would otherwise take the
whole range). basis_block fits the basis on another block and projects this one onto it,
so colours compare across blocks of the same width. foreground=True keeps the patches
whose first component is positive (the foreground), fits the colours on them alone and
paints the rest black.

Rendering (`lens_image`) puts a grid of values or colours over the image, nearest patch,
with the clicked patch and the top-k most similar ones outlined.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .attention import AttentionError, AttentionProbe, LayerError, TokenError
from .encoders.base import Record
from .imaging import LENS_QUERY as QUERY  # noqa: F401 - the outline colours, as the tests read them
from .imaging import LENS_SIMILAR as SIMILAR  # noqa: F401
from .imaging import lens_image

__all__ = ["FeatureError", "TokenError", "Pca", "FeatureProbe", "capture", "lens_image", "similarity_grid",
           "add_subcommand", "main"]

QUANTILES = (0.01, 0.99)   # the colour range of each PCA channel
COMPONENTS = 3


class FeatureError(AttentionError):
    """A request the feature lenses cannot answer, and why (one line)."""


@dataclass
class Pca:
    """The first principal components of a block's patch tokens (rows of `components`)."""

    components: Tensor          # (3, C) float64, orthonormal rows
    mean: Tensor                # (C,) float64
    explained_variance: Tensor  # (3,) float64: variance along each component (ddof = 1)
    explained_ratio: Tensor     # (3,) its share of the total variance
    block: int

    def project(self, tokens: Tensor) -> Tensor:
        """(P, C) -> (P, 3) float64 coordinates on the components."""
        if tokens.shape[-1] != self.mean.shape[0]:
            raise FeatureError(f"tokens of width {tokens.shape[-1]} cannot use the basis of block {self.block} "
                               f"(width {self.mean.shape[0]}): pick a basis block of the same stage")
        return (tokens.double() - self.mean) @ self.components.T


class FeatureProbe(AttentionProbe):
    """An AttentionProbe whose encode also recorded every block's output tokens."""

    def __init__(self, features, batch: int = 0, info=None):
        super().__init__(features, batch=batch, info=info)
        if any(b.tokens is None for b in features.blocks):
            raise FeatureError("the encoder pass recorded no tokens (use Record(tokens=True))")
        self._pca: dict[tuple, Pca] = {}

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    @property
    def token_offset(self) -> int:
        """Index of the first patch token (1 after a CLS token, else 0)."""
        return 0 if self.cls_token is None else 1

    def tokens(self, block: int) -> Tensor:
        """(N, C) float32: the residual stream after `block`, CLS first when there is one."""
        return self._layer_checked(block).record.tokens[self.batch].float()

    def patch_tokens(self, block: int) -> Tensor:
        """(gh * gw, C) float32: the patch tokens of `block`, row-major on its grid."""
        return self.tokens(block)[self.token_offset:]

    def _layer_checked(self, block):
        try:
            return self._layer(block)
        except LayerError as exc:
            raise LayerError(str(exc).replace("layer", "block")) from None

    # -- PCA ----------------------------------------------------------------------------
    def foreground(self, block: int) -> np.ndarray:
        """(gh, gw) bool: the patches whose first principal component is positive."""
        first = self.pca(block).project(self.patch_tokens(block))[:, 0]
        return (first > 0).reshape(self.grid(block)).cpu().numpy()

    def pca(self, block: int, foreground: bool = False) -> Pca:
        """The block's first three components, fitted once per block (and per foreground)."""
        key = (int(block), bool(foreground))
        if key not in self._pca:
            tokens = self.patch_tokens(block)
            border = _border(self.grid(block))
            if foreground:
                keep = torch.from_numpy(self.foreground(block).reshape(-1))
                if int(keep.sum()) < 2:
                    raise FeatureError(f"block {int(block)} has fewer than two foreground patches to fit colours on")
                tokens, border = tokens[keep], border[keep.numpy()]
            self._pca[key] = _fit_pca(tokens, border, int(block))
        return self._pca[key]

    def pca_rgb(self, block: int, basis_block: Optional[int] = None, foreground: bool = False) -> np.ndarray:
        """(gh, gw, 3) float32 in [0, 1]: the block's patch tokens on the three components of
        `basis_block` (default: its own), each channel over its 1st..99th percentile."""
        basis_block = block if basis_block is None else basis_block
        basis = self.pca(basis_block, foreground=foreground)
        tokens = self.patch_tokens(block)
        coords = basis.project(tokens)                                    # (P, 3)
        keep = np.ones(coords.shape[0], dtype=bool)
        if foreground:
            keep = self.foreground(block).reshape(-1)
        rgb = np.zeros((coords.shape[0], COMPONENTS), dtype=np.float32)
        if keep.any():
            shown = coords.cpu().numpy()[keep]
            lo, hi = np.quantile(shown, QUANTILES[0], axis=0), np.quantile(shown, QUANTILES[1], axis=0)
            span = np.where(hi > lo, hi - lo, 1.0)
            rgb[keep] = np.clip((shown - lo) / span, 0.0, 1.0)
        return rgb.reshape(*self.grid(block), COMPONENTS)

    # -- similarity ---------------------------------------------------------------------
    def similarity(self, block: int, token: int) -> Tensor:
        """(N,) float32: cosine similarity of `token`'s features with every token of `block`."""
        tokens = self.tokens(block)
        i = self._check_token(self._layer_checked(block), block, token)
        unit = torch.nn.functional.normalize(tokens, dim=-1)
        return unit @ unit[i]

    def most_similar(self, block: int, token: int, k: int = 5) -> list[int]:
        """The k patch tokens most similar to `token` (itself left out), most similar first."""
        sims = self.similarity(block, token).clone()
        off = self.token_offset
        sims[:off] = -float("inf")
        sims[int(token)] = -float("inf")
        k = max(0, min(int(k), sims.numel() - off - (int(token) >= off)))
        return [int(t) for t in torch.topk(sims, k).indices] if k else []


def _border(grid: tuple[int, int]) -> np.ndarray:
    gh, gw = grid
    edge = np.zeros((gh, gw), dtype=bool)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    return edge.reshape(-1)


def _fit_pca(tokens: Tensor, border: np.ndarray, block: int) -> Pca:
    x = tokens.double()
    n, c = x.shape
    mean = x.mean(0)
    centred = x - mean
    total = float(centred.pow(2).sum()) / max(1, n - 1)
    if n <= c:      # the smaller eigenproblem: the (n x n) Gram matrix shares the nonzero spectrum
        values, vectors = torch.linalg.eigh(centred @ centred.T / max(1, n - 1))
        values, vectors = values.flip(0)[:COMPONENTS].clamp(min=0), vectors.flip(1)[:, :COMPONENTS]
        comps = (centred.T @ vectors).T
        comps = comps / comps.norm(dim=1, keepdim=True).clamp(min=1e-300)
    else:
        values, vectors = torch.linalg.eigh(centred.T @ centred / max(1, n - 1))
        values, comps = values.flip(0)[:COMPONENTS].clamp(min=0), vectors.flip(1)[:, :COMPONENTS].T
    comps = comps.clone()
    for i in range(comps.shape[0]):
        if i == 0 and border.any():
            flip = float((centred[torch.from_numpy(border)] @ comps[0]).mean()) > 0
        else:
            flip = float(comps[i, int(comps[i].abs().argmax())]) < 0
        if flip:
            comps[i] = -comps[i]
    if comps.shape[0] < COMPONENTS:       # fewer patches or channels than three components
        pad = COMPONENTS - comps.shape[0]
        comps = torch.cat([comps, torch.zeros(pad, c, dtype=comps.dtype)])
        values = torch.cat([values, torch.zeros(pad, dtype=values.dtype)])
    ratio = values / total if total > 0 else torch.zeros_like(values)
    return Pca(comps, mean, values, ratio, block)


@torch.inference_mode()
def capture(model, x: Tensor, *, batch: int = 0) -> FeatureProbe:
    """One recorded encoder pass of `model` on `x` (B x 3 x H x W, normalised as by
    model.preprocess): attention inputs, token norms and every block's output tokens."""
    if x.ndim != 4 or not 0 <= batch < x.shape[0]:
        raise FeatureError(f"batch index {batch} is outside the input batch (shape {tuple(x.shape)})")
    features = model.encode(x, Record(attention=True, norms=True, tokens=True))
    return FeatureProbe(features, batch=batch, info=getattr(model, "info", None))


# -- rendering ----------------------------------------------------------------------------
def similarity_grid(probe: FeatureProbe, block: int, token: int) -> np.ndarray:
    """(gh, gw) float32: the similarity of `token` with each patch of `block`."""
    return probe.similarity(block, token)[probe.token_offset:].reshape(probe.grid(block)).cpu().numpy()


# -- command line ------------------------------------------------------------------------
def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `features` on an argparse subparsers object; sets func=run_cli."""
    from .attention import _pair

    p = subparsers.add_parser(
        "features", help="PCA colours or similarity to one patch of a block's tokens",
        description="Feature lenses of one block: the first three principal components of its patch tokens "
                    "as RGB (--pca), or the cosine similarity of one patch's token with every patch (--similar).")
    p.add_argument("image", help="image file")
    p.add_argument("--model", required=True, help="checkpoint file or -hf folder")
    p.add_argument("--block", type=int, default=None, help="block 1..L (default: the last)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--pca", action="store_true", help="PCA colours of the patch tokens")
    which.add_argument("--similar", type=lambda s: _pair(s, "--similar"), metavar="ROW,COL",
                       help="similarity to the patch at ROW,COL of the block's grid")
    p.add_argument("--basis-block", type=int, default=None, help="--pca: fit the basis on this block (1..L)")
    p.add_argument("--foreground", action="store_true", help="--pca: colour the foreground only")
    p.add_argument("--top-k", type=int, default=5, help="--similar: outline this many most similar patches")
    p.add_argument("--alpha", type=float, default=0.3, help="weight of the image under the map (0..1)")
    p.add_argument("--cmap", default="inferno", help="--similar: colormap (default inferno)")
    p.add_argument("--out", default="features.png", help="PNG at the image's size (default features.png)")
    p.add_argument("--npy", default=None, help="also write the raw grid (gh, gw[, 3]) as .npy")
    p.add_argument("--base-size", type=int, default=None, help="processing size (default: the model's)")
    p.set_defaults(func=run_cli)
    return p


def _block_arg(value: Optional[int], n: int, flag: str) -> int:
    block = n if value is None else value
    if not 1 <= block <= n:
        raise LayerError(f"{flag} {block} is out of range: this model has blocks 1..{n}")
    return block - 1


def run_cli(args) -> int:
    from PIL import Image

    import dpt_lab

    from . import imaging

    if not 0 <= args.alpha <= 1:
        raise FeatureError(f"--alpha must be between 0 and 1, got {args.alpha}")
    model = dpt_lab.load_model(args.model)
    rgb = imaging.load_image(args.image)
    x, _ = model.preprocess(rgb, base_size=args.base_size)
    probe = capture(model, x)
    block = _block_arg(args.block, probe.num_blocks, "--block")
    if args.pca:
        basis = None if args.basis_block is None else _block_arg(args.basis_block, probe.num_blocks, "--basis-block")
        grid = probe.pca_rgb(block, basis, foreground=args.foreground)
        picture = lens_image(grid, rgb, alpha=args.alpha)
        ratio = probe.pca(block if basis is None else basis, foreground=args.foreground).explained_ratio
        what = f"PCA colours (explained {', '.join(f'{float(r):.1%}' for r in ratio)})"
    else:
        token = probe.token_at(*args.similar, layer=block)
        grid = similarity_grid(probe, block, token)
        similar = [probe.patch_of(t, block) for t in probe.most_similar(block, token, args.top_k)]
        picture = lens_image(grid, rgb, cmap=args.cmap, alpha=args.alpha,
                             query=tuple(args.similar), similar=similar)
        what = f"similarity to patch {args.similar[0]},{args.similar[1]}"
    Image.fromarray(picture).save(args.out)
    written = [args.out]
    if args.npy:
        np.save(args.npy, grid)
        written.append(args.npy)
    print(f"block {block + 1}/{probe.num_blocks}, {what}: wrote {', '.join(written)}")
    return 0


def main(argv=None) -> int:
    """`python -m dpt_lab.features IMAGE ...` (the same as `python -m dpt_lab features ...`)."""
    from .cli import run_one

    return run_one("features", argv)


if __name__ == "__main__":
    sys.exit(main())

