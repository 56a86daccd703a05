"""Attention explorer: one encoder pass, then any head's attention row or column on demand.

    probe = attention.capture(model, x)        # ONE model.encode(x, Record(attention=True))
    probe.num_layers, probe.num_heads(layer), probe.grid(layer), probe.nbytes
    token = probe.token_at(row, col)           # CLS, when there is one, is token 0 (probe.cls_token)
    probe.row(layer, token)     -> (heads, N)  how `token` attends to every token (sums to 1)
    probe.column(layer, token)  -> (heads, N)  how much every token attends to `token`

Layers and tokens are 0-based (the UI shows layers 1..L). N is the number of tokens of
that layer: 1 + gh*gw with a CLS token (Depth-Anything, BEiT), gh*gw on the stage grid for
SwinV2 (its grid halves at each stage, see `grid(layer)`).

Nothing N x N is stored. Per block the probe keeps what the encoder recorded: q and k
(heads, N, d), the logit scale, and the position bias in its compact form (BEiT: a
(R, heads) table and an (N, N) index; SwinV2: one (heads, w^2, w^2) window bias). A row is
softmax(q[i] @ k^T * scale + bias[i]) in float32, computed when asked. A column needs the
normaliser (log-sum-exp) of every row: it is computed once per layer, in chunks, the first
time a column of that layer is asked, and cached (heads x N floats).

SwinV2 blocks attend inside windows (WindowLayout: the stage grid padded at the bottom and
right to a multiple of the window, rolled by -shift, cut into window x window tiles).
A row there is the window's attention placed at the tokens' own grid positions, zero
elsewhere; pairs that the shifted-window mask separates get the usual -100 logit offset
(as timm and transformers do) and padded positions are not keys. `window_tokens(layer,
token)` lists the tokens it really attends to (its window less the other shift regions
and padding: a rectangle of the grid), which the tiles outline.

Over whole layers, still from q / k and one layer at a time: `mean_distance(probe)` (how far
each head looks, in input pixels) and `rollout(probe, token, layer)` (attention rollout,
Abnar & Zuidema 2020; within a stage on SwinV2). `probe.probabilities(layer)` yields a
layer's attention a chunk of rows (or a group of windows) at a time for such sums.

Rendering (`render_tiles`, `attention_view`, `mark_patch`) turns a (heads, N) array into
a grid of coloured tiles (one per head plus their mean), used by the app and the CLI
(`python -m dpt_lab attention IMAGE --model M --layer 9 --patch ROW,COL --out grid.png`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import operator
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .encoders.base import BlockRecord, EncoderFeatures, Record, WindowLayout
from .errors import DPTLabError
from .imaging import lens_image, meta_sizes, patch_box  # noqa: F401 - patch_box: part of this API

__all__ = [
    "AttentionError", "LayerError", "TokenError", "PatchError",
    "AttentionProbe", "capture", "patch_at_pixel", "patch_box",
    "render_tiles", "tiles_shape", "mark_patch", "attention_view",
    "mean_distance", "rollout", "rollout_start", "rollout_view", "distance_figure", "HEAD_FUSIONS",
    "add_subcommand", "main",
]

SHIFT_MASK_VALUE = -100.0   # timm / transformers / encoders.swin2: between regions the roll joined
LSE_CHUNK = 256             # queries per chunk when computing a layer's row normalisers
LOG_DECADES = 4.0           # log-contrast shows this many decades below each tile's maximum


# -- errors ---------------------------------------------------------------------------
class AttentionError(DPTLabError, ValueError):
    """A request the attention explorer cannot answer, and why (one line)."""


class LayerError(AttentionError):
    """A layer index outside 0..num_layers-1 (1..L in the UI / CLI)."""


class TokenError(AttentionError):
    """A token index outside the layer's tokens, or CLS asked of a model without one."""


class PatchError(AttentionError):
    """A patch (row, col) or pixel (x, y) outside the grid / image."""


def _as_index(value) -> Optional[int]:
    """int of an integer-like value (int, numpy / 0-d torch integer), None otherwise."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


# -- the probe ------------------------------------------------------------------------
@dataclass
class _Layer:
    q: Tensor                          # (heads, N, d), stored dtype
    k: Tensor                          # (heads, N, d)
    scale: Tensor                      # (heads, 1) float32
    grid: tuple[int, int]
    has_cls: bool
    rel_table: Optional[Tensor] = None     # (R, heads)
    rel_index: Optional[Tensor] = None     # (N, N) long
    window_bias: Optional[Tensor] = None   # (heads, w^2, w^2)
    window: Optional[WindowLayout] = None
    record: Optional[BlockRecord] = None

    @property
    def heads(self) -> int:
        return int(self.q.shape[0])

    @property
    def n(self) -> int:
        return int(self.q.shape[1])


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """Run a small CPU computation (one row or column: a few hundred kFLOP) on the calling
    thread alone. Split over the intra-op threads it gains nothing, and on a busy machine
    each parallel region waits until every thread of the team is scheduled, which made a
    row take a scheduler slice (~16 ms) instead of ~1 ms. torch.set_num_threads acts on
    the calling thread's OpenMP / MKL settings; the previous count is restored."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class AttentionProbe:
    """What one recorded encoder pass keeps, and rows / columns of any layer on demand."""

    def __init__(self, features: EncoderFeatures, batch: int = 0, info=None):
        if not features.blocks or any(b.q is None or b.k is None for b in features.blocks):
            raise AttentionError("the encoder pass recorded no attention inputs (use Record(attention=True))")
        self.features = features
        self.info = info
        self.batch = int(batch)
        self.input_size = tuple(features.input_size)
        self._layers: list[_Layer] = []
        for rec in features.blocks:
            rec.compact()
            q, k = rec.q[batch], rec.k[batch]
            heads = q.shape[0]
            s = rec.scale
            scale = (s.detach().float().reshape(heads, 1) if isinstance(s, Tensor) and s.numel() > 1
                     else torch.full((heads, 1), float(s), dtype=torch.float32, device=q.device))
            self._layers.append(_Layer(
                q=q, k=k, scale=scale, grid=tuple(int(g) for g in rec.grid), has_cls=bool(rec.has_cls),
                rel_table=rec.rel_table, rel_index=rec.rel_index, window_bias=rec.window_bias, window=rec.window,
                record=rec,
            ))
        self._lse: dict[int, Tensor] = {}
        self._derived: dict[str, object] = {}     # mean_distance, rollout: kept with the probe
        has_cls = {l.has_cls for l in self._layers}
        self.cls_token: Optional[int] = 0 if has_cls == {True} else None

    # -- sizes ----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def num_heads(self, layer: int) -> int:
        return self._layer(layer).heads

    def grid(self, layer: int) -> tuple[int, int]:
        return self._layer(layer).grid

    def num_tokens(self, layer: int) -> int:
        return self._layer(layer).n

    def is_windowed(self, layer: int) -> bool:
        return self._layer(layer).window is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded tensors (q, k, biases, shared ones once) and the
        cached row normalisers. The decoder's feature maps are not counted."""
        seen, total = set(), 0
        tensors = [t for l in self._layers for t in (l.q, l.k, l.rel_table, l.rel_index, l.window_bias)]
        tensors += list(self._lse.values())
        for t in tensors:
            if t is None:
                continue
            st = t.untyped_storage()
            key = (st.data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        return total

    # -- tokens and patches -----------------------------------------------------------
    def _layer(self, layer) -> _Layer:
        index = _as_index(layer)
        if index is None:
            raise LayerError(f"layer must be an integer 0..{self.num_layers - 1}, got {layer!r}")
        if not 0 <= index < self.num_layers:
            raise LayerError(f"layer {index} is out of range: this model has layers 0..{self.num_layers - 1} "
                             f"(1..{self.num_layers} in the UI)")
        return self._layers[index]

    def _check_token(self, l: _Layer, layer: int, token) -> int:
        index = _as_index(token)
        if index is None:
            raise TokenError(f"token must be an integer, got {token!r}")
        if not 0 <= index < l.n:
            raise TokenError(f"token {index} is out of range: layer {int(layer)} has tokens 0..{l.n - 1}")
        return index

    def _grid_for(self, layer: Optional[int]) -> tuple[int, int]:
        if layer is not None:
            return self.grid(layer)
        grids = {l.grid for l in self._layers}
        if len(grids) > 1:
            raise PatchError("this model's grid changes from stage to stage: pass layer= to say which grid")
        return next(iter(grids))

    def token_at(self, row: int, col: int, layer: Optional[int] = None) -> int:
        """Token index of patch (row, col) of the layer's grid (CLS, if any, is token 0).
        `layer` is needed only when grids differ between layers (SwinV2)."""
        gh, gw = self._grid_for(layer)
        row, col = int(row), int(col)
        if not (0 <= row < gh and 0 <= col < gw):
            raise PatchError(f"patch ({row}, {col}) is outside the {gh} x {gw} grid (rows 0..{gh - 1}, cols 0..{gw - 1})")
        return (0 if self.cls_token is None else 1) + row * gw + col

    def patch_of(self, token: int, layer: Optional[int] = None) -> Optional[tuple[int, int]]:
        """(row, col) of a token on the layer's grid, or None for CLS."""
        gh, gw = self._grid_for(layer)
        offset = 0 if self.cls_token is None else 1
        if self.cls_token is not None and token == self.cls_token:
            return None
        t = int(token) - offset
        if not 0 <= t < gh * gw:
            raise TokenError(f"token {token} is not a patch of the {gh} x {gw} grid")
        return divmod(t, gw)

    def token_at_pixel(self, meta, x: float, y: float, layer: Optional[int] = None) -> int:
        """Token of the patch covering pixel (x, y) of the original image (see patch_at_pixel)."""
        grid = self._grid_for(layer)
        return self.token_at(*patch_at_pixel(meta, grid, x, y), layer=layer)

    def window_tokens(self, layer: int, token: int) -> Optional[list[int]]:
        """Grid tokens sharing `token`'s attention window (windowed layers), else None."""
        l = self._layer(layer)
        if l.window is None:
            return None
        from .encoders import swin2

        return swin2.window_of(l.record, self._check_token(l, layer, token))

    # -- rows and columns -------------------------------------------------------------
    def row(self, layer: int, token: int) -> Tensor:
        """(heads, N) float32: softmax-normalised attention of `token` over the layer's tokens."""
        l = self._layer(layer)
        i = self._check_token(l, layer, token)
        with torch.inference_mode(), _one_thread(l.q.device):
            if l.window is not None:
                return _window_row(l, i, self.batch)
            k = l.k.float()
            qi = l.q[:, i].float().unsqueeze(-1)                    # (heads, d, 1)
            logits = torch.bmm(k, qi).squeeze(-1).mul_(l.scale)      # (heads, N)
            if l.rel_table is not None:
                logits += l.rel_table[l.rel_index[i]].t().float()
            return torch.softmax(logits, dim=-1)

    def column(self, layer: int, token: int) -> Tensor:
        """(heads, N) float32: entry [h, i] is row(layer, i)[h, token]."""
        l = self._layer(layer)
        j = self._check_token(l, layer, token)
        lse = None if l.window is not None else self.row_normalizers(layer)   # (multi-threaded, once per layer)
        with torch.inference_mode(), _one_thread(l.q.device):
            if l.window is not None:
                return _window_column(l, j)
            q = l.q.float()
            kj = l.k[:, j].float().unsqueeze(-1)                    # (heads, d, 1)
            logits = torch.bmm(q, kj).squeeze(-1).mul_(l.scale)      # (heads, N) over queries
            if l.rel_table is not None:
                logits += l.rel_table[l.rel_index[:, j]].t().float()
            return torch.exp(logits - lse)

    def row_normalizers(self, layer: int) -> Tensor:
        """(heads, N) log-sum-exp of every row's logits, computed once per layer (chunked)."""
        l = self._layer(layer)
        if l.window is not None:
            raise AttentionError("windowed layers have no global row normalisers (columns stay inside a window)")
        cached = self._lse.get(int(layer))
        if cached is not None:
            return cached
        out = torch.empty(l.heads, l.n, dtype=torch.float32, device=l.q.device)
        for s, e, logits in self._logit_chunks(l):
            out[:, s:e] = torch.logsumexp(logits, dim=-1)
        self._lse[int(layer)] = out
        return out

    @torch.inference_mode()
    def _logit_chunks(self, l: _Layer):
        """(start, end, (heads, end - start, N) float32 logits) of a global layer's rows, LSE_CHUNK
        queries at a time: nothing N x N is held."""
        k_t = l.k.float().transpose(1, 2)                       # (heads, d, N)
        table = l.rel_table.float() if l.rel_table is not None else None
        for s in range(0, l.n, LSE_CHUNK):
            e = min(l.n, s + LSE_CHUNK)
            logits = torch.bmm(l.q[:, s:e].float(), k_t).mul_(l.scale.unsqueeze(-1))
            if table is not None:
                logits += table[l.rel_index[s:e]].permute(2, 0, 1)
            yield s, e, logits

    def probabilities(self, layer: int):
        """The layer's whole attention, a piece at a time, as (queries, keys, probs):
        global layers yield (chunk of query tokens, None = every token, (heads, c, N));
        windowed layers (queries (nW, n), keys the same, (nW, heads, n, n)) per group of
        windows, tokens -1 at padding. Each row sums to 1 over its keys."""
        l = self._layer(layer)
        if l.window is None:
            for s, e, logits in self._logit_chunks(l):
                yield torch.arange(s, e, device=l.q.device), None, torch.softmax(logits, dim=-1)
            return
        from .encoders import swin2

        count = len(swin2.window_tokens(l.window))
        step = max(1, (LSE_CHUNK * 16) // (l.window.window ** 2))
        for s in range(0, count, step):
            probs, tokens = swin2.window_probs(l.record, self.batch, slice(s, s + step))
            yield tokens, tokens, probs

    def attention(self, layer: int, token: int, mode: str = "row") -> Tensor:
        if mode not in ("row", "column"):
            raise AttentionError(f"mode must be 'row' or 'column', got {mode!r}")
        return self.row(layer, token) if mode == "row" else self.column(layer, token)


@torch.inference_mode()
def capture(model, x: Tensor, *, batch: int = 0, norms: bool = False) -> AttentionProbe:
    """One recorded encoder pass of `model` on `x` (B x 3 x H x W, normalised as by
    model.preprocess); the probe explores image `batch` of the batch. With norms=True the
    same pass also records every block's token norms (probe.features for
    norms.norms_from_features), so one encode serves the attention and norm tools
    (features.capture records the tokens too, for the feature lenses).

    The encoder compacts each block's q / k as soon as the block has run (its qkv output,
    v included, is freed then: encoders/base.py keep_record), so the pass holds about what
    the probe keeps."""
    if x.ndim != 4 or not 0 <= batch < x.shape[0]:
        raise AttentionError(f"batch index {batch} is outside the input batch (shape {tuple(x.shape)})")
    features = model.encode(x, Record(attention=True, norms=bool(norms)))
    return AttentionProbe(features, batch=batch, info=getattr(model, "info", None))


# -- analytics over a whole layer -----------------------------------------------------------
HEAD_FUSIONS = ("mean", "max", "min")


def _patch_centres(probe: AttentionProbe, layer: int) -> Tensor:
    """(gh * gw, 2) float64 (y, x) of each patch of the layer's grid, in model-input pixels."""
    (h, w), (gh, gw) = probe.input_size, probe.grid(layer)
    ys = torch.arange(gh, dtype=torch.float64) * (h / gh)
    xs = torch.arange(gw, dtype=torch.float64) * (w / gw)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def _distances(a: Tensor, b: Tensor) -> Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _layer_distance(probe: AttentionProbe, layer: int) -> Tensor:
    """(heads,) float64 mean attention distance of one layer (see mean_distance)."""
    l = probe._layer(layer)
    centres = _patch_centres(probe, layer).to(l.q.device)
    offset = 1 if l.has_cls else 0
    total = torch.zeros(l.heads, dtype=torch.float64, device=l.q.device)
    queries_seen = 0
    with torch.inference_mode():
        for queries, keys, probs in probe.probabilities(layer):
            if keys is None:                          # global: (heads, c, N) rows of these queries
                patch = queries >= offset
                rows = queries[patch] - offset
                dist = _distances(centres[rows], centres).float()                # (c, P)
                total += torch.einsum("hqk,qk->h", probs[:, patch, offset:], dist).double()
                queries_seen += int(rows.numel())
            else:                                     # windows: (nW, heads, n, n), tokens -1 at padding
                real = queries >= 0
                where = centres[queries.clamp(min=0)]                              # (nW, n, 2)
                dist = (_distances(where, where) * (real[:, :, None] & real[:, None, :])).float()
                total += torch.einsum("whqk,wqk->h", probs, dist).double()
                queries_seen += int(real.sum())
    return total / max(1, queries_seen)


def mean_distance(probe: AttentionProbe) -> np.ndarray:
    """(layers, heads) float32: for each head of each layer, the attention-weighted distance
    in model-input pixels from a query patch to the patches it attends to, averaged over all
    query patches (figure 7 of the ViT paper). Patch tokens only: the CLS row and column
    are left out and the rows are not renormalised (the convention of probing-vits), so a
    head that looks at CLS counts as looking near. Distances are between patch centres.
    Exact, from the stored q / k one layer at a time, a chunk of rows at a time (windowed
    SwinV2 layers: their windows). Layers with fewer heads than the most (SwinV2's early
    stages) are NaN past their own. Computed once per probe."""
    cached = probe._derived.get("mean distance")
    if cached is None:
        heads = max(probe.num_heads(i) for i in range(probe.num_layers))
        cached = np.full((probe.num_layers, heads), np.nan, dtype=np.float32)
        for layer in range(probe.num_layers):
            cached[layer, :probe.num_heads(layer)] = _layer_distance(probe, layer).cpu().numpy()
        probe._derived["mean distance"] = cached
    return cached.copy()


def _check_rollout(head_fusion, discard_ratio) -> tuple[str, float]:
    fusion = str(head_fusion or "mean").strip().lower()
    if fusion not in HEAD_FUSIONS:
        raise AttentionError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    try:
        ratio = float(discard_ratio or 0.0)
    except (TypeError, ValueError):
        raise AttentionError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}") from None
    if not 0.0 <= ratio < 1.0:
        raise AttentionError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    return fusion, ratio


def _fuse(probs: Tensor, fusion: str, head_dim: int) -> Tensor:
    if fusion == "mean":
        return probs.mean(head_dim)
    return probs.amax(head_dim) if fusion == "max" else probs.amin(head_dim)


def _discard(values: Tensor, ratio: float, allowed: Optional[Tensor] = None) -> None:
    """Zero (in place) the lowest `ratio` share of the entries (of those `allowed`)."""
    flat = values.reshape(-1)
    count = flat.numel() if allowed is None else int(allowed.sum())
    k = int(ratio * count)
    if k <= 0:
        return
    ranked = flat if allowed is None else torch.where(allowed.reshape(-1), flat, torch.full_like(flat, math.inf))
    flat[torch.topk(ranked, k, largest=False).indices] = 0.0


def _rollout_matrix(probe: AttentionProbe, layer: int, fusion: str, ratio: float):
    """One layer's step of the rollout: heads fused, the lowest entries discarded, the
    identity added and the rows renormalised; global (N, N), or windowed ((nW, n, n), tokens)."""
    l = probe._layer(layer)
    with torch.inference_mode():
        if l.window is None:
            fused = torch.empty(l.n, l.n, dtype=torch.float32, device=l.q.device)
            for queries, _, probs in probe.probabilities(layer):
                fused[queries] = _fuse(probs, fusion, 0)
            _discard(fused, ratio)
            fused.diagonal().add_(1.0)
            return fused.div_(fused.sum(-1, keepdim=True)), None
        parts, tokens = [], []
        for queries, _, probs in probe.probabilities(layer):
            parts.append(_fuse(probs, fusion, 1))
            tokens.append(queries)
        fused, tokens = torch.cat(parts), torch.cat(tokens)                    # (nW, n, n), (nW, n)
        real = tokens >= 0
        pairs = real[:, :, None] & real[:, None, :]
        fused = fused * pairs
        _discard(fused, ratio, pairs)
        fused = fused + torch.diag_embed(real.to(fused.dtype))
        return fused.div_(fused.sum(-1, keepdim=True).clamp(min=1e-30)), tokens


def rollout(probe: AttentionProbe, token: int, layer: Optional[int] = None, head_fusion: str = "mean",
            discard_ratio: float = 0.0) -> Tensor:
    """(N,) float32 summing to 1: attention rollout (Abnar & Zuidema 2020) of `token` of
    `layer` (0-based; default the last): row `token` of A_layer @ ... @ A_first, where each
    A is the layer's attention with its heads fused (mean, max or min), the lowest
    `discard_ratio` share of its entries set to zero, the identity added (the residual) and
    its rows renormalised. It says how much each token of the first layer's input flows
    into `token` at `layer`.

    ViT families roll out from block 0. SwinV2 rolls out within the stage of `layer`, from the
    stage's first block: its windows tile one stage grid, and patch merging between stages
    is not attention, so the product stops there (the result is over that stage's grid).
    On windowed layers the discard ratio applies to the pairs a window holds.
    The per-layer matrices are kept for the latest (head_fusion, discard_ratio), so another
    token or layer costs a few vector-matrix products."""
    fusion, ratio = _check_rollout(head_fusion, discard_ratio)
    last = probe.num_layers - 1 if layer is None else layer
    l = probe._layer(last)
    last = int(last)
    i = probe._check_token(l, last, token)
    first = rollout_start(probe, last)
    steps = probe._derived.get("rollout")
    if steps is None or steps[0] != (fusion, ratio):
        steps = ((fusion, ratio), {})
        probe._derived["rollout"] = steps
    v = torch.zeros(l.n, dtype=torch.float32, device=l.q.device)
    v[i] = 1.0
    with torch.inference_mode():
        for b in range(last, first - 1, -1):
            if b not in steps[1]:
                steps[1][b] = _rollout_matrix(probe, b, fusion, ratio)
            matrix, tokens = steps[1][b]
            if tokens is None:
                v = v @ matrix
            else:
                real = tokens >= 0
                moved = torch.einsum("wi,wij->wj", v[tokens.clamp(min=0)] * real, matrix)
                v = torch.zeros_like(v)
                v[tokens[real]] = moved[real]
    return v


def rollout_bytes(probe: AttentionProbe, layer: Optional[int] = None, head_fusion: str = "mean",
                  discard_ratio: float = 0.0) -> int:
    """Estimated peak bytes of the rollout matrices `rollout` still has to compute up to
    `layer` for these settings (0 when they are kept): each one it keeps, plus a few more of
    the largest for one layer's transients (its probabilities in chunks, the discard's sort).
    The app reserves this under the store's cap while they are computed."""
    fusion, ratio = _check_rollout(head_fusion, discard_ratio)
    last = probe.num_layers - 1 if layer is None else int(layer)
    probe._layer(last)
    steps = probe._derived.get("rollout")
    kept = steps[1] if steps is not None and steps[0] == (fusion, ratio) else {}

    def matrix_bytes(b: int) -> int:
        l = probe._layer(b)
        if l.window is None:
            return 4 * l.n * l.n
        ph, pw = l.window.padded
        return 4 * ph * pw * l.window.window ** 2

    missing = [matrix_bytes(b) for b in range(rollout_start(probe, last), last + 1) if b not in kept]
    return sum(missing) + 3 * max(missing) if missing else 0


def rollout_start(probe: AttentionProbe, layer: Optional[int] = None) -> int:
    """The first layer `rollout` multiplies from, for `layer` (0 for ViTs; the stage's first on SwinV2)."""
    last = probe.num_layers - 1 if layer is None else int(layer)
    first = last
    while first > 0 and probe.grid(first - 1) == probe.grid(last):
        first -= 1
    return first


def distance_figure(distances: np.ndarray, *, title: str = "Mean attention distance"):
    """Plotly scatter of mean_distance's (layers, heads) array: x the layer (1-based), y the
    distance in input pixels, one point per head (hover names it), and the mean per layer."""
    import plotly.graph_objects as go

    d = np.asarray(distances, dtype=np.float64)
    layers, heads = np.nonzero(np.isfinite(d))
    fig = go.Figure()
    jitter = (heads - (d.shape[1] - 1) / 2) * (0.3 / max(1, d.shape[1]))   # heads side by side
    fig.add_trace(go.Scatter(
        x=layers + 1 + jitter, y=d[layers, heads], mode="markers", name="head",
        marker=dict(size=7, color=heads, colorscale="Viridis", showscale=False, line=dict(width=0.5, color="#222")),
        customdata=np.stack([layers + 1, heads + 1], axis=1),
        hovertemplate="layer %{customdata[0]}, head %{customdata[1]}: %{y:.1f} px<extra></extra>"))
    mean = np.nanmean(d, axis=1)
    fig.add_trace(go.Scatter(x=np.arange(1, d.shape[0] + 1), y=mean, mode="lines", name="mean of the heads",
                             line=dict(color="#888", dash="dot"),
                             hovertemplate="layer %{x}: mean %{y:.1f} px<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="mean distance (input pixels)",
                      template="plotly_white", height=380, margin=dict(l=50, r=20, t=50, b=40),
                      legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(dtick=1 if d.shape[0] <= 24 else None)
    return fig


def rollout_view(probe: AttentionProbe, token: int, layer: int, image, *, head_fusion: str = "mean",
                 discard_ratio: float = 0.0, cmap: str = "inferno", alpha: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(the rollout over the image (H x W x 3 uint8, the query patch outlined; the colours span
    0 .. the largest share of another patch), values (N,))."""
    values = rollout(probe, token, layer, head_fusion, discard_ratio).cpu().numpy()
    offset = 1 if probe.cls_token is not None else 0
    grid = probe.grid(layer)
    patches = values[offset:]
    others = np.delete(patches, token - offset) if token >= offset and patches.size > 1 else patches
    # the token's own share (the residual) dwarfs the rest: the colours span the other patches
    vmax = float(others.max()) if others.size and others.max() > 0 else None
    picture = lens_image(patches.reshape(grid), image, cmap=cmap, alpha=alpha, vmin=0.0, vmax=vmax,
                         query=probe.patch_of(token, layer))
    return picture, values


# -- windows (SwinV2) -------------------------------------------------------------------
# The window geometry (pad, per-axis roll, cyclic-shift regions) is the encoder's own:
# encoders/swin2.py window_tokens / window_regions / window_row / window_of.
def _window_geometry(layout: WindowLayout, token: int) -> tuple[Tensor, Tensor, int]:
    """Of `token`'s window: (w^2,) grid token at each window position (-1 = padding),
    (w^2,) cyclic-shift region of each position, and the token's own position."""
    from .encoders import swin2

    (_, w), (hp, wp), ws = layout.grid, layout.padded, int(layout.window)
    sh, sw = layout.shifts
    r, c = divmod(int(token), w)
    rr, rc = (r - sh) % hp, (c - sw) % wp                   # where the roll put it
    win = (rr // ws) * (wp // ws) + rc // ws
    pos = (rr % ws) * ws + rc % ws
    return swin2.window_tokens(layout)[win], swin2.window_regions(layout)[win], int(pos)


def _window_row(l: _Layer, token: int, batch: int) -> Tensor:
    from .encoders import swin2

    return swin2.window_row(l.record, token, batch).float()


def _window_column(l: _Layer, token: int) -> Tensor:
    """Column of a windowed block: only the queries of `token`'s window can attend to it;
    each of their rows is the softmax over that window, computed as window_row does."""
    keys, regions, pos = _window_geometry(l.window, token)
    real = keys >= 0
    dev = l.q.device
    key_tok = keys[real].to(dev)
    key_pos = torch.nonzero(real).squeeze(1).to(dev)
    q = l.q[:, key_tok] * l.scale.to(l.q.dtype).unsqueeze(-1)             # (heads, n, d)
    logits = torch.einsum("hqd,hkd->hqk", q, l.k[:, key_tok])
    logits = logits + l.window_bias[:, key_pos][:, :, key_pos]
    reg = regions[real].to(dev)
    logits = logits + (reg[:, None] != reg[None, :]).to(logits.dtype) * SHIFT_MASK_VALUE
    probs = torch.softmax(logits.float(), dim=-1)
    j = int(torch.nonzero(key_pos == pos)[0, 0])
    out = torch.zeros(l.heads, l.n, dtype=torch.float32, device=dev)
    out[:, key_tok] = probs[:, :, j]
    return out


# -- clicks -------------------------------------------------------------------------------
def patch_at_pixel(meta_or_sizes, layer_grid: tuple[int, int], x: float, y: float) -> tuple[int, int]:
    """(row, col) of the patch whose area of the model input covers pixel (x, y) of the
    original image (x = column, y = row, pixel i covering [i - 0.5, i + 0.5]).

    Stretched and aspect-kept inputs alike scale each axis by input / image, with the
    image and input sharing their outer edges (imaging.PreprocessMeta): the centre of
    pixel x lies at (x + 0.5) * input_w / image_w in input edge coordinates, and the
    layer's patches are input_w / grid_w pixels wide (14 for DINOv2, 16 for BEiT, 4, 8,
    16, 32 along SwinV2's stages). Integer pixels are mapped in exact integer arithmetic."""
    (ih, iw), (nh, nw) = meta_sizes(meta_or_sizes)
    gh, gw = int(layer_grid[0]), int(layer_grid[1])
    if nh % gh or nw % gw:
        raise PatchError(f"the {nw}x{nh} input is not a whole number of patches of the {gh} x {gw} grid")
    if not (-0.5 <= x < iw - 0.5 and -0.5 <= y < ih - 0.5):
        raise PatchError(f"pixel ({x}, {y}) is outside the {iw}x{ih} image")
    return _axis_patch(y, ih, nh, gh), _axis_patch(x, iw, nw, gw)


def _axis_patch(p: float, image: int, inp: int, grid: int) -> int:
    patch = inp // grid
    if float(p).is_integer():
        # input pixel covering the centre: floor((2p + 1) * inp / (2 * image)), exactly
        pix = ((2 * int(p) + 1) * inp) // (2 * image)
    else:
        pix = math.floor((p + 0.5) * inp / image)
    return min(grid - 1, max(0, pix // patch))


# -- rendering ----------------------------------------------------------------------------
BACKGROUND = (24, 24, 24)
MARKER = (0, 255, 255)
WINDOW = (80, 255, 80)
LABEL = (230, 230, 230)
PAD = 4


def _lut(cmap: str) -> np.ndarray:
    from .imaging import colormap_lut

    return colormap_lut(cmap)


@lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except TypeError:          # Pillow < 10.1
        return ImageFont.load_default()


def _tile_size(grid: tuple[int, int], tile_px: int, image_shape=None) -> tuple[int, int]:
    """(tile_h, tile_w): the longer side is tile_px, the aspect that of the image (if
    given) or of the grid (patches are square on the model input)."""
    ah, aw = (image_shape[0], image_shape[1]) if image_shape is not None else grid
    if aw >= ah:
        return max(1, round(tile_px * ah / aw)), int(tile_px)
    return int(tile_px), max(1, round(tile_px * aw / ah))


def _layout(n_tiles: int, grid, tile_px: int, image_shape, labels: bool):
    th, tw = _tile_size(grid, tile_px, image_shape)
    border = max(2, tile_px // 40)
    label_h = 14 if labels else 0
    cols = math.ceil(math.sqrt(n_tiles))
    rows = math.ceil(n_tiles / cols)
    cell_h, cell_w = label_h + th + 2 * border, tw + 2 * border
    return dict(th=th, tw=tw, border=border, label_h=label_h, rows=rows, cols=cols, cell_h=cell_h, cell_w=cell_w,
                height=PAD + rows * (cell_h + PAD), width=PAD + cols * (cell_w + PAD))


def tiles_shape(num_heads: int, grid: tuple[int, int], *, include_mean: bool = True, tile_px: int = 160,
                image_shape=None, labels: bool = True) -> tuple[int, int, int]:
    """Shape (H, W, 3) of what render_tiles returns: ceil(sqrt(n)) columns of n tiles
    (heads, then the mean), each tile framed by a border and topped by a label strip."""
    g = _layout(num_heads + bool(include_mean), grid, tile_px, image_shape, labels)
    return g["height"], g["width"], 3


def _as_array(values) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _normalise(maps: np.ndarray, vmax: np.ndarray, log_contrast: bool) -> np.ndarray:
    """maps (T, ...) -> [0, 1] with 0 at zero (linear) or LOG_DECADES below vmax (log)."""
    vmax = vmax.reshape((-1,) + (1,) * (maps.ndim - 1))
    ok = vmax > 0
    safe = np.where(ok, vmax, 1.0)
    if log_contrast:
        floor = safe * 10.0 ** (-LOG_DECADES)
        t = (np.log10(np.maximum(maps, floor)) - np.log10(floor)) / LOG_DECADES
    else:
        t = maps / safe
    return np.where(ok, np.clip(np.nan_to_num(t), 0.0, 1.0), 0.0)


def _edges(n_cells: int, n_px: int) -> np.ndarray:
    return np.round(np.arange(n_cells + 1) * n_px / n_cells).astype(int)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of the boundary of a boolean mask (inside it)."""
    inner = mask.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def render_tiles(values, grid: tuple[int, int], *, image=None, alpha: float = 0.0, cmap: str = "inferno",
                 log_contrast: bool = False, shared_scale: bool = False, include_mean: bool = True,
                 marker: Optional[tuple[int, int]] = None, cls_values=None, window: Optional[Sequence[int]] = None,
                 tile_px: int = 160, labels: bool = True) -> np.ndarray:
    """(heads, N) attention values -> H x W x 3 uint8 grid of tiles, one per head (plus
    their mean), each the (gh, gw) map coloured with `cmap`.

    N is gh*gw, or 1 + gh*gw with the CLS value first (then shown as the colour of the
    tile's border, unless cls_values is given). Colour scale: 0 .. max of each tile
    (shared_scale: of all tiles); log_contrast spans LOG_DECADES decades below the max.
    image (H x W x 3 uint8, the original or the model input): blended under the maps with
    weight alpha (0 = maps only); it also sets the tiles' aspect. marker (row, col) is
    outlined on every tile; window (layer token indices) is outlined as a region."""
    from PIL import Image, ImageDraw

    v = _as_array(values)
    if v.ndim != 2:
        raise ValueError(f"expected (heads, N) values, got shape {v.shape}")
    gh, gw = int(grid[0]), int(grid[1])
    heads, n = v.shape
    offset = 0
    if n == gh * gw + 1:
        offset = 1
        if cls_values is None:
            cls_values = v[:, 0]
        v = v[:, 1:]
    elif n != gh * gw:
        raise ValueError(f"{n} values per head fit neither a {gh} x {gw} grid nor it plus a CLS token")
    maps = v.reshape(heads, gh, gw)
    cls = None if cls_values is None else _as_array(cls_values).reshape(heads)
    names = [f"head {h + 1}" for h in range(heads)]
    if include_mean:
        maps = np.concatenate([maps, maps.mean(0, keepdims=True)])
        cls = None if cls is None else np.concatenate([cls, [cls.mean()]])
        names.append("mean")
    count = maps.shape[0]
    vmax = maps.reshape(count, -1).max(1)
    if shared_scale:
        vmax = np.full(count, vmax.max())
    t = _normalise(maps, vmax, log_contrast)
    lut = _lut(cmap)
    colored = lut[np.rint(t * 255).astype(np.intp)]                     # (T, gh, gw, 3)

    g = _layout(count, (gh, gw), tile_px, None if image is None else np.asarray(image).shape, labels)
    th, tw, border = g["th"], g["tw"], g["border"]
    ys, xs = _edges(gh, th), _edges(gw, tw)
    row_of = np.searchsorted(ys, np.arange(th), side="right") - 1
    col_of = np.searchsorted(xs, np.arange(tw), side="right") - 1
    tiles = colored[:, row_of][:, :, col_of].astype(np.float32)         # (T, th, tw, 3)

    if image is not None and alpha > 0:
        img = np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((tw, th), Image.BILINEAR),
                         dtype=np.float32)
        a = float(min(max(alpha, 0.0), 1.0))
        tiles = (1 - a) * tiles + a * img[None]
    tiles = np.clip(np.rint(tiles), 0, 255).astype(np.uint8)

    if window is not None:
        cells = np.zeros(gh * gw, dtype=bool)
        idx = np.asarray(list(window), dtype=np.int64) - offset
        cells[idx[(idx >= 0) & (idx < gh * gw)]] = True
        edge = _outline(cells.reshape(gh, gw)[row_of][:, col_of], max(1, tile_px // 80))
        tiles[:, edge] = WINDOW

    canvas = Image.new("RGB", (g["width"], g["height"]), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font() if labels else None
    cls_t = None
    if cls is not None:
        cls_t = _normalise(cls.reshape(count, 1), vmax, log_contrast)[:, 0]
    for i in range(count):
        r, c = divmod(i, g["cols"])
        x0, y0 = PAD + c * (g["cell_w"] + PAD), PAD + r * (g["cell_h"] + PAD)
        ty = y0 + g["label_h"]
        if cls_t is not None:
            color = tuple(int(u) for u in lut[int(round(cls_t[i] * 255))])
            draw.rectangle([x0, ty, x0 + g["cell_w"] - 1, ty + th + 2 * border - 1], fill=color)
        canvas.paste(Image.fromarray(tiles[i]), (x0 + border, ty + border))
        if marker is not None:
            mr, mc = int(marker[0]), int(marker[1])
            if 0 <= mr < gh and 0 <= mc < gw:
                bx0, bx1 = x0 + border + xs[mc], x0 + border + max(xs[mc], xs[mc + 1] - 1)
                by0, by1 = ty + border + ys[mr], ty + border + max(ys[mr], ys[mr + 1] - 1)
                draw.rectangle([bx0 - 1, by0 - 1, bx1 + 1, by1 + 1], outline=(0, 0, 0), width=1)
                draw.rectangle([bx0, by0, bx1, by1], outline=MARKER, width=max(1, min(2, bx1 - bx0)))
        if labels:
            text = names[i] + (f"  CLS {cls[i]:.3f}" if cls is not None else "")
            draw.text((x0 + 1, y0 + 1), text, fill=LABEL, font=font)
    return np.asarray(canvas)


def mark_patch(image, meta, grid: tuple[int, int], row: int, col: int, *, color=MARKER) -> np.ndarray:
    """A copy of `image` (H x W x 3 uint8: the original, or the model input) with patch
    (row, col) of the layer grid outlined. The box is computed from the image's own size,
    so it is the area whose pixels patch_at_pixel maps to that patch. `meta` (or
    (image_size, input_size)) is checked against the image when it is the original."""
    from PIL import Image, ImageDraw

    arr = np.asarray(image, dtype=np.uint8)
    h, w = arr.shape[:2]
    gh, gw = int(grid[0]), int(grid[1])
    if not (0 <= row < gh and 0 <= col < gw):
        raise PatchError(f"patch ({row}, {col}) is outside the {gh} x {gw} grid")
    if meta is not None:
        (ih, iw), (nh, nw) = meta_sizes(meta)
        if (h, w) not in ((ih, iw), (nh, nw)):
            raise ValueError(f"the image is {w}x{h}, but meta describes a {iw}x{ih} image and a {nw}x{nh} input")
    x0, y0, x1, y1 = patch_box((h, w), (gh, gw), row, col)
    out = Image.fromarray(arr.copy())
    draw = ImageDraw.Draw(out)
    lw = max(1, round(min(h, w) / 200))
    draw.rectangle([x0 - lw, y0 - lw, x1 + lw, y1 + lw], outline=(0, 0, 0), width=lw)
    draw.rectangle([x0, y0, x1, y1], outline=tuple(color), width=max(1, min(lw, x1 - x0 + 1)))
    return np.asarray(out)


def attention_view(probe: AttentionProbe, layer: int, token: int, *, mode: str = "row",
                   log_contrast: bool = False, shared_scale: bool = False, cmap: str = "inferno",
                   alpha: float = 0.0, image=None, include_mean: bool = True, tile_px: int = 160,
                   labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The app's one call: (tiles_rgb, values) for `token` of `layer` (0-based), values
    (heads, N) float32 as returned by probe.row / probe.column. The token's patch is
    marked on every tile, a windowed layer's window outlined, and CLS shown as borders."""
    values = probe.attention(layer, token, mode)
    arr = values.cpu().numpy()
    grid = probe.grid(layer)
    marker = probe.patch_of(token, layer)
    tiles = render_tiles(arr, grid, image=image, alpha=alpha, cmap=cmap, log_contrast=log_contrast,
                         shared_scale=shared_scale, include_mean=include_mean, marker=marker,
                         window=probe.window_tokens(layer, token), tile_px=tile_px, labels=labels)
    return tiles, arr


# -- command line ------------------------------------------------------------------------
def _pair(text: str, what: str, cast=int) -> tuple:
    try:
        a, b = (cast(p) for p in text.split(","))
        return a, b
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be two numbers separated by a comma, got {text!r}") from None


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `attention` on an argparse subparsers object; sets func=run_cli."""
    p = subparsers.add_parser(
        "attention", help="render one patch's attention for every head of a layer",
        description="Attention of one patch (row) or to one patch (--column), for every head of a layer, as a tile grid.")
    p.add_argument("image", help="image file")
    p.add_argument("--model", required=True, help="checkpoint file or -hf folder")
    p.add_argument("--layer", type=int, default=None, help="layer 1..L (default: the last)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--patch", type=lambda s: _pair(s, "--patch"), metavar="ROW,COL",
                       help="patch of the layer's grid (default: the patch under the image centre)")
    which.add_argument("--pixel", type=lambda s: _pair(s, "--pixel", float), metavar="X,Y",
                       help="pixel of the original image")
    which.add_argument("--cls", action="store_true", help="the class token (models with one)")
    p.add_argument("--column", action="store_true", help="how much every token attends to the patch")
    p.add_argument("--distance", action="store_true",
                   help="mean attention distance of every head and layer: --out is a Plotly HTML page")
    p.add_argument("--rollout", action="store_true",
                   help="attention rollout of the patch (or --cls) up to --layer: --out is a map over the image")
    p.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean", help="--rollout: how heads are fused")
    p.add_argument("--discard", type=float, default=0.0, help="--rollout: share of the lowest attention dropped")
    p.add_argument("--out", default=None, help="tile grid PNG (default attention.png; distance.html, rollout.png)")
    p.add_argument("--npy", default=None, help="also write the raw values ((heads, N); distance (layers, heads); "
                                               "rollout (N,))")
    p.add_argument("--cmap", default="inferno", help="colormap (default inferno)")
    p.add_argument("--log", action="store_true", help="log contrast")
    p.add_argument("--shared", action="store_true", help="one colour scale for all heads")
    p.add_argument("--alpha", type=float, default=0.0, help="weight of the image under the maps (0..1)")
    p.add_argument("--base-size", type=int, default=None, help="processing size (default: the model's)")
    p.add_argument("--stretch", action="store_true", help="stretch to a square input instead of keeping the aspect")
    p.add_argument("--tile-px", type=int, default=160, help="tile size in pixels (default 160)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    from PIL import Image

    import dpt_lab

    from . import imaging

    if args.alpha < 0 or args.alpha > 1:
        raise AttentionError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if sum((args.column, args.distance, args.rollout)) > 1:
        raise AttentionError("choose one of --column, --distance and --rollout")
    model = dpt_lab.load_model(args.model)
    rgb = imaging.load_image(args.image)
    x, meta = model.preprocess(rgb, base_size=args.base_size, keep_aspect=False if args.stretch else None)
    probe = capture(model, x)
    if args.distance:
        out = args.out or "distance.html"
        distances = mean_distance(probe)
        distance_figure(distances).write_html(out, include_plotlyjs=True, full_html=True)
        written = [out] + _save_npy(args.npy, distances)
        print(f"mean attention distance of {distances.shape[0]} layers: wrote {', '.join(written)}")
        return 0
    layer = probe.num_layers if args.layer is None else args.layer
    if not 1 <= layer <= probe.num_layers:
        raise LayerError(f"--layer {layer} is out of range: this model has layers 1..{probe.num_layers}")
    layer -= 1
    if args.cls:
        if probe.cls_token is None:
            raise TokenError("--cls: this model has no class token")
        token = probe.cls_token
    elif args.patch is not None:
        token = probe.token_at(*args.patch, layer=layer)
    else:
        h, w = meta.image_size
        px, py = args.pixel if args.pixel is not None else ((w - 1) / 2, (h - 1) / 2)
        token = probe.token_at_pixel(meta, px, py, layer=layer)
    where = "CLS" if token == probe.cls_token else "patch {} {}".format(*probe.patch_of(token, layer))
    if args.rollout:
        out = args.out or "rollout.png"
        picture, values = rollout_view(probe, token, layer, rgb, head_fusion=args.head_fusion,
                                       discard_ratio=args.discard, cmap=args.cmap, alpha=args.alpha)
        Image.fromarray(picture).save(out)
        written = [out] + _save_npy(args.npy, values)
        print(f"rollout of {where} over layers {rollout_start(probe, layer) + 1}..{layer + 1}: wrote "
              f"{', '.join(written)}")
        return 0
    out = args.out or "attention.png"
    tiles, values = attention_view(probe, layer, token, mode="column" if args.column else "row",
                                   log_contrast=args.log, shared_scale=args.shared, cmap=args.cmap,
                                   alpha=args.alpha, image=rgb if args.alpha > 0 else None, tile_px=args.tile_px)
    Image.fromarray(tiles).save(out)
    written = [out] + _save_npy(args.npy, values)
    print(f"layer {layer + 1}/{probe.num_layers}, {where}, {'column' if args.column else 'row'}: wrote {', '.join(written)}")
    return 0


def _save_npy(path, values) -> list:
    if not path:
        return []
    np.save(path, np.asarray(values, dtype=np.float32))
    return [path]


def main(argv=None) -> int:
    """`python -m dpt_lab.attention IMAGE ...` (the same as `python -m dpt_lab attention ...`)."""
    from .cli import run_one

    return run_one("attention", argv)

if __name__ == "__main__":
    sys.exit(main())
