"""SwinV2 backbone, as used by MiDaS v3.1 (dpt_swin2_tiny_256, dpt_swin2_base_384,
dpt_swin2_large_384; timm `swinv2_tiny_window16_256`, `swinv2_{base,large}_window12to24_192to384`).

    image (B, 3, H, W), H and W multiples of 32
      -> 4x4 patch conv, LayerNorm -> stage 0 grid (H/4, W/4), width C
      -> 4 stages of res-post-norm blocks:
             x = x + norm1(window_attention(x));  x = x + norm2(mlp(x))
         between stages, patch merging: the 2x2 neighbours at (row, col) offsets
         (0,0), (1,0), (0,1), (1,1) are concatenated (4C) -> Linear(4C, 2C, no bias) -> LayerNorm
      -> taps: the residual stream after the LAST block of every stage, before merging:
         (B, C, H/4, W/4), (B, 2C, H/8, W/8), (B, 4C, H/16, W/16), (B, 8C, H/32, W/32)

Window attention (cosine attention with a continuous position bias), per window of
w x w tokens:
    logits = normalize(q) @ normalize(k)^T * exp(min(logit_scale, log 100))
             + 16 * sigmoid(cpb_mlp(coords_table))[relative_position_index]   (+ masks)
q, k, v come from one Linear whose bias is (q_bias, 0, v_bias). The coordinates table
holds the offsets -(w-1)..(w-1) on both axes divided by (p - 1), where p is the stage's
*pretrained* window (12, 12, 12, 6 for base/large, which were fine-tuned from 192 px
window-12 models) or, when p is 0 (tiny), the window itself; then times 8, then
sign(t) * log2(|t| + 1) / log2(8).

Windows at the native size (what the original does). Stage s has grid g_s = native/4/2^s.
Its window is the native window w (16 for tiny 256, 24 for base/large 384), or g_s when
g_s <= w; the odd blocks of a stage shift by w // 2 only when g_s > w. So tiny 256 uses
windows 16, 16, 16, 8 and shifts in stages 0 and 1; base/large 384 use 24, 24, 24, 12.

Windows at any other size (DPT Lab's choice; the originals only accept the native size).
Every stage keeps its NATIVE window size w_s (the one above) and nothing is re-derived
from the new grid, so the position bias of every block is the one the model was trained
with. A block then
  1. pads its (h, w) grid at the bottom and right with zero tokens up to (hp, wp), the
     next multiples of w_s;
  2. if the block shifts (an odd block of a stage that shifts natively), rolls the padded
     grid by -w_s // 2 along every axis whose UNPADDED length is larger than w_s (an axis
     that fits in one window is not rolled: the original never shifts such a grid either);
  3. cuts the result into w_s x w_s windows and attends inside each one, with the
     original shifted-window mask (-100 between the cyclic-shift regions, computed on the
     padded grid exactly as the original computes it on its grid) and with every padded
     token masked out as a key (-inf: it receives exactly zero attention);
  4. rolls back, drops the padded tokens, and continues on the (h, w) grid.
At the native size no padding happens and every rolled axis is rolled, so this is the
original arithmetic; at other sizes it is deterministic and depends only on the grid.
A grid smaller than the window on both axes becomes one (padded) window, i.e. global
attention with the native position bias. The per-axis roll is `WindowLayout.shifts`.
(transformers' Swinv2 pads the same way but lets padded tokens be attended to, so the two
agree wherever no padding is needed, e.g. at 512 x 256 for tiny.)

Nothing but parameters is created in __init__ (models are built on the meta device):
coordinate tables, index tables and masks are computed in forward, cached per grid and
device (not while tracing/exporting). The window path has no Python branch on the grid
size (rolls are gathers, the per-axis shift is sym_min/sym_max arithmetic), so
`torch.onnx.export(..., dynamo=True)` with dynamic H = 32*h, W = 32*w gives one graph
that equals this module at every size (checked with onnxruntime).

Records: for every block the grid, the token norms after the block, and, for attention,
q and k (L2-normalized, (B, heads, N, d) over the stage grid in row-major order, NOT
padded), scale = exp(clamped logit_scale) of shape (heads, 1, 1), window_bias
(heads, w*w, w*w) and the WindowLayout. `window_row(record, token)` rebuilds the softmax
row of any token from these; `window_of(record, token)` lists the tokens it attends to.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fastpath
from .base import BlockRecord, EncoderFeatures, Mlp, Record, Resume, WindowLayout, keep_record

SHIFT_MASK = -100.0          # between cyclic-shift regions, as in the original
CACHE_SIZE = 32


@dataclass(frozen=True)
class Swin2Config:
    embed_dim: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]              # per stage
    window: int                         # native window (16 tiny_256, 24 base/large_384)
    native_size: int                    # native input side in pixels (256 / 384)
    pretrained_windows: tuple[int, ...] = (0, 0, 0, 0)   # per stage; 0: use the window itself
    mlp_ratio: float = 4.0
    patch_size: int = 4
    eps: float = 1e-5

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def native_grid(self) -> int:
        return self.native_size // self.patch_size

    def stage_window(self, stage: int) -> tuple[int, int]:
        """(window, shift of the odd blocks) of a stage, as the original sets them at the native size."""
        grid = self.native_grid // 2 ** stage
        if grid <= self.window:
            return grid, 0
        return self.window, self.window // 2

    @property
    def window_sizes(self) -> tuple[int, ...]:
        return tuple(self.stage_window(s)[0] for s in range(self.num_stages))

    @property
    def tap_blocks(self) -> tuple[int, ...]:
        ends, total = [], 0
        for d in self.depths:
            total += d
            ends.append(total - 1)
        return tuple(ends)

    @property
    def tile(self) -> int:
        return self.patch_size * 2 ** (self.num_stages - 1)


# -- geometry (pure functions of sizes; shared with the loaders and the tools) ---------
def window_layout(grid: tuple[int, int], window: int, shift: int) -> WindowLayout:
    """How a block with this native window / shift cuts a (h, w) stage grid. (h, w may be
    symbolic sizes while exporting: only arithmetic, no comparisons, is done on them.)"""
    h, w = grid
    padded = ((h + window - 1) // window * window, (w + window - 1) // window * window)
    return WindowLayout(window=int(window), shift=int(shift), grid=(h, w), padded=padded)


def axis_shifts(layout: WindowLayout) -> tuple[int, int]:
    """The roll actually applied on (rows, cols): none along an axis that fits in one
    window (= WindowLayout.shifts, written without a branch on the sizes so that an
    export with dynamic height / width keeps the rule instead of freezing one case)."""
    return tuple(layout.shift * _clamp01(g - layout.window) for g in layout.grid)


def _clamp01(n):
    """min(max(n, 0), 1) of an int, a SymInt (torch.export) or a traced 0-dim tensor
    (the TorchScript ONNX exporter, whose sizes are tensors; sym_min rejects those)."""
    if isinstance(n, Tensor):
        return n.clamp(0, 1)
    return torch.sym_min(torch.sym_max(n, 0), 1)


def _regions(n: int, window: int, shift: int, device) -> Tensor:
    """Cyclic-shift region (0, 1, 2) of each rolled coordinate along one axis: the slices
    [0, n-window), [n-window, n-shift), [n-shift, n) of the original. With shift 0 the last
    region is empty and the first two are whole windows, so nothing gets masked."""
    idx = torch.arange(n, device=device)
    return (idx >= n - window).long() + (idx >= n - shift).long()


def _partition(t: Tensor, window: int) -> Tensor:
    """(hp, wp, ...) -> (num_windows, window*window, ...), windows in row-major order."""
    hp, wp = t.shape[:2]
    rest = t.shape[2:]
    t = t.reshape(hp // window, window, wp // window, window, *rest).transpose(1, 2)
    return t.reshape((hp // window) * (wp // window), window * window, *rest)


def _wrap(idx: Tensor, n) -> Tensor:
    """idx % n for 0 <= idx < 2n (a comparison, which exports with a symbolic n)."""
    return torch.where(idx >= n, idx - n, idx)


def _roll(t: Tensor, size, shifts, back: bool) -> Tensor:
    """torch.roll(t, -shifts) on dims 1, 2 (or +shifts when `back`), as gathers: the same
    values, and an ONNX export keeps symbolic shift amounts."""
    for dim, (n, s) in enumerate(zip(size, shifts), start=1):
        idx = _wrap(torch.arange(n, device=t.device) + (n - s if back else s), n)
        t = t.index_select(dim, idx)
    return t


def window_tokens(layout: WindowLayout, device=None) -> Tensor:
    """(num_windows, window*window) long: the stage-grid token (row-major) at each window
    position, -1 for padding. Windows are in the order the block processes them."""
    (h, w), (hp, wp) = layout.grid, layout.padded
    sh, sw = axis_shifts(layout)
    rows = _wrap(torch.arange(hp, device=device) + sh, hp)     # rolled row -> grid row
    cols = _wrap(torch.arange(wp, device=device) + sw, wp)
    token = rows[:, None] * w + cols[None, :]
    token = token.masked_fill((rows[:, None] >= h) | (cols[None, :] >= w), -1)
    return _partition(token, layout.window)


def window_regions(layout: WindowLayout, device=None) -> Tensor:
    """(num_windows, window*window) long: cyclic-shift region id of each window position."""
    hp, wp = layout.padded
    sh, sw = axis_shifts(layout)
    region = _regions(hp, layout.window, sh, device)[:, None] * 3 + _regions(wp, layout.window, sw, device)[None, :]
    return _partition(region, layout.window)


def window_mask(layout: WindowLayout, device=None, dtype=torch.float32) -> Tensor:
    """(num_windows, window^2, window^2) additive mask: -100 between cyclic-shift regions
    (the original's attn_mask), -inf for padded keys, 0 elsewhere."""
    region = window_regions(layout, device)
    mask = torch.zeros(region.shape[0], region.shape[1], region.shape[1], device=device, dtype=dtype)
    mask = mask.masked_fill(region[:, :, None] != region[:, None, :], SHIFT_MASK)
    padded = window_tokens(layout, device) < 0
    return mask.masked_fill(padded[:, None, :], float("-inf"))


def relative_coords_table(window: int, pretrained_window: int, device=None) -> Tensor:
    """((2w-1)^2, 2) log-spaced relative coordinates fed to the cpb MLP (timm's order of ops)."""
    r = torch.arange(-(window - 1), window, device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1)
    if pretrained_window > 0:
        table = table / (pretrained_window - 1)
    elif window > 1:
        table = table / (window - 1)
    table = table * 8
    table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
    return table.reshape(-1, 2)


def relative_position_index(window: int, device=None) -> Tensor:
    """(w*w, w*w) long: the row of the coordinates table for query i, key j of a window."""
    pos = torch.arange(window, device=device)
    rows, cols = pos.repeat_interleave(window), pos.repeat(window)
    dh = rows[:, None] - rows[None, :] + (window - 1)
    dw = cols[:, None] - cols[None, :] + (window - 1)
    return dh * (2 * window - 1) + dw


_CACHE: "OrderedDict[tuple, Tensor]" = OrderedDict()


def _cached(key: tuple, make):
    if fastpath.tracing():
        return make()
    value = _CACHE.get(key)
    if value is None:
        value = make()
        _CACHE[key] = value
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return value


# -- modules ----------------------------------------------------------------------------
class WindowAttention(nn.Module):
    def __init__(self, width: int, heads: int, pretrained_window: int):
        super().__init__()
        self.heads = heads
        self.pretrained_window = pretrained_window
        self.logit_scale = nn.Parameter(torch.zeros(heads, 1, 1))
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, heads, bias=False))
        self.proj = nn.Linear(width, width)

    def scale(self) -> Tensor:
        return torch.clamp(self.logit_scale, max=math.log(100.0)).exp()

    def window_bias(self, window: int) -> Tensor:
        """(heads, w*w, w*w): 16 * sigmoid of the cpb MLP, read through the position index."""
        dev = self.logit_scale.device
        table = _cached(("coords", window, self.pretrained_window, str(dev)),
                        lambda: relative_coords_table(window, self.pretrained_window, dev))
        index = _cached(("index", window, str(dev)), lambda: relative_position_index(window, dev))
        bias = self.cpb_mlp(table.to(self.cpb_mlp[0].weight.dtype))          # ((2w-1)^2, heads)
        n = window * window
        bias = bias[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def forward(self, x: Tensor, layout: WindowLayout, rec: BlockRecord | None) -> Tensor:
        b, n_tok, c = x.shape
        (h, w), (hp, wp), ws = layout.grid, layout.padded, layout.window
        heads, d = self.heads, c // self.heads
        bias_qkv = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = fastpath.linear(self.qkv, x, bias=bias_qkv)
        qkv = qkv.reshape(b, n_tok, 3, heads, d)
        q = F.normalize(qkv[:, :, 0], dim=-1)            # (B, N, heads, d)
        k = F.normalize(qkv[:, :, 1], dim=-1)
        v = qkv[:, :, 2]
        scale = self.scale()
        bias = self.window_bias(ws)
        if rec is not None:
            rec.q, rec.k = q.transpose(1, 2), k.transpose(1, 2)
            rec.scale, rec.window_bias, rec.window = scale, bias, layout

        # (B, h, w, 3, heads, d) -> pad -> roll -> windows (3, B*nW, heads, n, d)
        t = torch.stack([q * scale.reshape(heads, 1), k, v], dim=2).reshape(b, h, w, 3 * c)
        t = F.pad(t, (0, 0, 0, wp - w, 0, hp - h))
        sh, sw = axis_shifts(layout)
        rolls = layout.shift > 0          # static per block; the amounts may be 0 per axis
        if rolls:
            t = _roll(t, (hp, wp), (sh, sw), back=False)
        nh, nw, n = hp // ws, wp // ws, ws * ws
        t = t.reshape(b, nh, ws, nw, ws, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
        qw, kw, vw = t.reshape(3, b * nh * nw, heads, n, d).unbind(0)

        if fastpath.tracing() or sh or sw or hp != h or wp != w:   # the mask is all zeros otherwise
            mask = _cached(("mask", layout.grid, layout.padded, ws, sh, sw, str(x.device), x.dtype),
                           lambda: window_mask(layout, x.device, x.dtype))
            attn_mask = (bias[None] + mask[:, None]).expand(b, -1, -1, -1, -1).reshape(b * nh * nw, heads, n, n)
        else:
            attn_mask = bias[None]
        out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=attn_mask, scale=1.0)

        # windows -> (B, hp, wp, C) -> roll back -> crop
        out = out.reshape(b, nh, nw, heads, ws, ws, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)
        if rolls:
            out = _roll(out, (hp, wp), (sh, sw), back=True)
        out = out[:, :h, :w].reshape(b, h * w, c)
        return fastpath.linear(self.proj, out)


class Block(nn.Module):
    """Res-post-norm SwinV2 block: the norms act on the branch outputs."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, pretrained_window: int, eps: float):
        super().__init__()
        self.attn = WindowAttention(width, heads, pretrained_window)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_hidden)
        self.norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, layout: WindowLayout, rec: BlockRecord | None = None) -> Tensor:
        x = x + self.norm1(self.attn(x, layout, rec))
        return x + self.norm2(self.mlp(x))


class PatchMerging(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.reduction = nn.Linear(4 * width, 2 * width, bias=False)
        self.norm = nn.LayerNorm(2 * width, eps=eps)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        h, w = grid
        x = x.reshape(b, h // 2, 2, w // 2, 2, c)
        # channel blocks ordered by (col offset, row offset): (0,0), (1,0), (0,1), (1,1) as (row, col)
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        return self.norm(fastpath.linear(self.reduction, x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(width, eps=eps)


class Stage(nn.Module):
    def __init__(self, cfg: Swin2Config, s: int):
        super().__init__()
        width = cfg.embed_dim * 2 ** s
        hidden = int(width * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            Block(width, cfg.heads[s], hidden, cfg.pretrained_windows[s], cfg.eps) for _ in range(cfg.depths[s])
        )
        self.downsample = PatchMerging(width, cfg.eps) if s < cfg.num_stages - 1 else None


class Swin2Encoder(nn.Module):
    has_cls = False

    def __init__(self, cfg: Swin2Config):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.embed_dim, cfg.patch_size, cfg.eps)
        self.stages = nn.ModuleList(Stage(cfg, s) for s in range(cfg.num_stages))

    @property
    def tile(self) -> int:
        return self.cfg.tile

    def layouts(self, grid: tuple[int, int]) -> list[list[WindowLayout]]:
        """The WindowLayout of every block (per stage) for a stage-0 grid."""
        out = []
        h, w = grid
        for s, depth in enumerate(self.cfg.depths):
            window, shift = self.cfg.stage_window(s)
            out.append([window_layout((h, w), window, shift if j % 2 else 0) for j in range(depth)])
            h, w = h // 2, w // 2
        return out

    def forward(self, x: Tensor, record: Record = Record(), resume: Optional[Resume] = None) -> EncoderFeatures:
        b, _, height, width = x.shape
        if height % self.tile or width % self.tile:
            raise ValueError(f"input height and width must be multiples of {self.tile}, got {(height, width)}")
        grid = (height // self.cfg.patch_size, width // self.cfg.patch_size)
        start = 0 if resume is None else resume.start
        tokens = self.patch_embed.norm(fastpath.patch_tokens(self.patch_embed.proj, x)) if resume is None else None
        embedded = tokens if record.tokens else None

        keep = record.keeps_blocks
        blocks: list[BlockRecord] | None = [] if keep else None
        if blocks is not None and resume is not None:
            blocks += resume.records[:start]
        maps = []
        i = 0                       # the block's index over all stages
        for s, (stage, layouts) in enumerate(zip(self.stages, self.layouts(grid))):
            for j, (block, layout) in enumerate(zip(stage.blocks, layouts)):
                if i < start:
                    i += 1
                    continue
                if resume is not None and i == start:     # the recorded stream, merged first at a stage's start
                    entering, fresh = resume.entering(), False
                    if j == 0 and s > 0:
                        prev = (grid[0] * 2, grid[1] * 2)
                        entering, fresh = self.stages[s - 1].downsample(entering, prev), True
                    tokens = resume.apply(entering, grid, fresh)
                rec = BlockRecord(grid=grid, has_cls=False, window=layout) if keep else None
                tokens = block(tokens, layout, rec if record.attention else None)
                if resume is not None:
                    tokens = resume.apply(tokens, grid)
                if rec is not None:
                    keep_record(record, rec, tokens, blocks)
                i += 1
            ran = i > start
            last = tokens if ran else resume.tapped(i - 1)
            maps.append(last.transpose(1, 2).reshape(b, -1, grid[0], grid[1]))
            if stage.downsample is not None:
                if ran:
                    tokens = stage.downsample(tokens, grid)
                grid = (grid[0] // 2, grid[1] // 2)
                if ran and resume is not None:
                    tokens = resume.apply(tokens, grid)
        return EncoderFeatures(maps, None, out_size=(height, width), blocks=blocks, input_size=(height, width),
                               embedded=embedded if resume is None else resume.embedded)


# -- what the attention tools call ------------------------------------------------------
def _query_window(layout: WindowLayout, token: int, device):
    """(window index, position in window) of a stage-grid token, and that window's tokens."""
    h, w = layout.grid
    if not 0 <= token < h * w:
        raise IndexError(f"token {token} is outside the {h}x{w} grid")
    hp, wp = layout.padded
    sh, sw = axis_shifts(layout)
    r, c = divmod(int(token), w)
    rr, rc = (r - sh) % hp, (c - sw) % wp                # where the roll put it
    ws = layout.window
    win = (rr // ws) * (wp // ws) + rc // ws
    pos = (rr % ws) * ws + rc % ws
    key = (layout.window, layout.shift, layout.grid, layout.padded, str(device))
    keys = _cached(("tokens",) + key, lambda: window_tokens(layout, device))[win]
    regions = _cached(("regions",) + key, lambda: window_regions(layout, device))[win]
    return pos, keys, regions


def window_row(record: BlockRecord, token: int, batch: int = 0) -> Tensor:
    """(heads, N) attention probabilities from `token` (row-major index on the stage grid)
    to every token of the stage grid, exactly as the block computed them (cosine logits
    times scale, plus the window bias, -100 for keys of another cyclic-shift region;
    padded keys excluded). Zero outside the token's window; each row sums to 1."""
    if record.q is None or record.window is None:
        raise ValueError("window_row needs a SwinV2 block recorded with Record(attention=True)")
    layout = record.window
    q, k = record.q[batch], record.k[batch]                     # (heads, N, d)
    pos, keys, regions = _query_window(layout, token, q.device)
    real = keys >= 0
    key_tok, key_pos = keys[real], torch.nonzero(real).squeeze(1)
    scale = record.scale if torch.is_tensor(record.scale) else torch.tensor(float(record.scale))
    qs = q[:, token] * scale.reshape(-1, 1).to(q.dtype)        # (heads, d)
    logits = torch.einsum("hd,hkd->hk", qs, k[:, key_tok]) + record.window_bias[:, pos, key_pos]
    other = regions[real] != regions[pos]
    logits = logits + other[None, :].to(logits.dtype) * SHIFT_MASK
    probs = torch.softmax(logits.float(), dim=-1)
    row = torch.zeros(q.shape[0], q.shape[1], dtype=probs.dtype, device=q.device)
    row[:, key_tok] = probs
    return row


def window_of(record: BlockRecord, token: int) -> list[int]:
    """The stage-grid tokens `token` attends to in this block: its window, less the keys of
    another cyclic-shift region (they get the -100 mask) and less padding. Always a
    rectangle of the stage grid, sorted row-major."""
    layout = record.window
    pos, keys, regions = _query_window(layout, token, None)
    keep = (keys >= 0) & (regions == regions[pos])
    return sorted(int(t) for t in keys[keep])


def window_probs(record: BlockRecord, batch: int = 0, windows: slice = slice(None)) -> tuple[Tensor, Tensor]:
    """Every window's attention probabilities, as the block computed them: ((nW, heads, n, n)
    float32 over the window positions, (nW, n) long stage-grid token at each position, -1
    for padding) for the windows in `windows`. Rows of padded positions are not queries
    of the block: callers drop them."""
    if record.q is None or record.window is None:
        raise ValueError("window_probs needs a SwinV2 block recorded with Record(attention=True)")
    layout = record.window
    q, k = record.q[batch], record.k[batch]                     # (heads, N, d)
    key = (layout.window, layout.shift, layout.grid, layout.padded, str(q.device))
    tokens = _cached(("tokens",) + key, lambda: window_tokens(layout, q.device))[windows]
    mask = _cached(("mask",) + key, lambda: window_mask(layout, q.device))[windows]
    gather = tokens.clamp(min=0)
    scale = record.scale if torch.is_tensor(record.scale) else torch.tensor(float(record.scale))
    qw = q[:, gather].float() * scale.reshape(-1, 1, 1, 1).float()     # (heads, nW, n, d)
    kw = k[:, gather].float()
    logits = torch.einsum("hwqd,hwkd->whqk", qw, kw) + record.window_bias.float()[None] + mask[:, None]
    return torch.softmax(logits, dim=-1), tokens
