"""BEiT backbone, as used by MiDaS v3.1 (dpt_beit_base_384, dpt_beit_large_384/512).

    image (B, 3, H, W), H and W multiples of 16
      -> 16x16 patch conv -> (B, gh*gw, C), CLS token prepended (NO absolute position embedding)
      -> L pre-norm blocks: x += gamma_1 * attn(norm1(x)); x += gamma_2 * mlp(norm2(x))
         attention logits: (q * d^-0.5) @ k^T + relative position bias
      -> taps: the residual stream after 4 chosen blocks (no final norm)

Relative position bias. Each block owns a table of (2*Wh-1)*(2*Ww-1) + 3 rows by heads,
for the native window Wh x Ww (24 x 24 at 384 px, 32 x 32 at 512 px). Token i (row hi,
column wi of the patch grid) attending to token j reads row
    (hi - hj + Wh - 1) * (2*Ww - 1) + (wi - wj + Ww - 1)
and the last three rows serve CLS -> token, token -> CLS and CLS -> CLS. For another grid
(gh, gw), MiDaS v3.1 resizes the (2Wh-1) x (2Ww-1) part of the table bilinearly
(align_corners=False) to (2gh-1) x (2gw-1), keeps the three extra rows, and indexes it
with the same formula for (gh, gw). This module does exactly that, lazily: nothing but
parameters is created in __init__ (models are built on the meta device); the resized
tables and index tables are computed in forward and kept in small per-grid caches.
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
from .base import BlockRecord, EncoderFeatures, Mlp, Record, Resume, keep_record

CACHE_GRIDS = 8   # grids remembered per cache (least recently used dropped first)


@dataclass(frozen=True)
class BeitConfig:
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    taps: tuple[int, ...]
    window: tuple[int, int]       # native relative-position window (patch grid of the training size)
    patch_size: int = 16
    eps: float = 1e-6             # timm BEiT; the -hf configs say 1e-12 (see layouts/beit.py)


def num_relative(window: tuple[int, int]) -> int:
    wh, ww = window
    return (2 * wh - 1) * (2 * ww - 1) + 3


def relative_position_index(grid: tuple[int, int], device=None) -> Tensor:
    """(N, N) long, N = gh*gw + 1 (CLS first): the row of the (resized) bias table that
    token i reads for key j. Same values as timm's / MiDaS's `relative_position_index`."""
    gh, gw = grid
    token = torch.arange(gh * gw, device=device)
    rows = token // gw                  # row of each patch token
    cols = token - rows * gw            # column (repeat_interleave and % of a symbolic size
                                        # do not export correctly with the ONNX dynamo exporter)
    dh = rows[:, None] - rows[None, :] + (gh - 1)
    dw = cols[:, None] - cols[None, :] + (gw - 1)
    r = num_relative(grid)
    index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long, device=device)
    index[1:, 1:] = dh * (2 * gw - 1) + dw
    index[0, :] = r - 3       # CLS -> token
    index[:, 0] = r - 2       # token -> CLS
    index[0, 0] = r - 1       # CLS -> CLS
    return index


def resize_table(table: Tensor, window: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """The (R, heads) table of the native window, resized for `grid` as MiDaS v3.1 does.

    MiDaS reshapes the sub-table to (old_w, old_h) before interpolating to (new_h, new_w);
    its windows are always square, where that equals the row-major (old_h, old_w) used
    here (the only reading consistent with how the index addresses the table)."""
    if all(isinstance(g, int) for g in grid) and tuple(grid) == tuple(window):
        return table    # (while exporting, the grid is symbolic: always resize; 1:1 is exact)
    (wh, ww), (gh, gw) = window, grid
    heads = table.shape[1]
    old = 2 * wh - 1, 2 * ww - 1
    new = 2 * gh - 1, 2 * gw - 1
    work = table.float() if table.dtype in (torch.float16, torch.bfloat16) else table
    sub = work[: old[0] * old[1]].reshape(1, old[0], old[1], heads).permute(0, 3, 1, 2)
    sub = F.interpolate(sub, size=new, mode="bilinear", align_corners=False)
    sub = sub.permute(0, 2, 3, 1).reshape(new[0] * new[1], heads).to(table.dtype)
    return torch.cat([sub, table[old[0] * old[1]:]], dim=0)


def _cacheable(*tensors: Tensor) -> bool:
    """Only plain eager tensors go in a cache: never while tracing / exporting / compiling
    (the cache would keep proxies), nor when autograd would need the graph."""
    if fastpath.tracing():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _lru_get(cache: OrderedDict, key, make):
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = make()
    cache[key] = value
    while len(cache) > CACHE_GRIDS:
        cache.popitem(last=False)
    return value


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, window: tuple[int, int]):
        super().__init__()
        self.heads = heads
        self.window = tuple(window)
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))      # the key has no bias (zeros)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative(self.window), heads))
        self.proj = nn.Linear(width, width)
        self._tables: OrderedDict = OrderedDict()           # not a buffer: filled lazily in forward

    def rel_table(self, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """(R, heads) bias table resized for `grid`, in `dtype`; cached per grid."""
        table = self.relative_position_bias_table

        def make():
            return resize_table(table, self.window, grid).to(dtype)

        if not _cacheable(table):
            return make()
        key = (tuple(grid), dtype, table.device, torch.is_inference_mode_enabled(), table.data_ptr(), table._version)
        return _lru_get(self._tables, key, make)

    def forward(self, x: Tensor, grid: tuple[int, int], index: Tensor, rec: BlockRecord | None) -> Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = fastpath.linear(self.qkv, x, bias=bias)
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        table = self.rel_table(grid, q.dtype)
        if rec is not None:
            rec.q, rec.k, rec.scale = q, k, self.scale
            rec.rel_table, rec.rel_index = table, index
        mask = table.t()[:, index]                           # (heads, N, N), one block at a time
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, c)
        return fastpath.linear(self.proj, out)


class Block(nn.Module):
    def __init__(self, cfg: BeitConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.heads, cfg.window)
        self.gamma_1 = nn.Parameter(torch.ones(cfg.width))
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)
        self.gamma_2 = nn.Parameter(torch.ones(cfg.width))

    def forward(self, x: Tensor, grid: tuple[int, int], index: Tensor, rec: BlockRecord | None = None) -> Tensor:
        if fastpath.active(x, self):    # x + gamma * y in one pass
            x = torch.addcmul(x, self.gamma_1, self.attn(self.norm1(x), grid, index, rec))
            return torch.addcmul(x, self.gamma_2, self.mlp(self.norm2(x)))
        x = x + self.gamma_1 * self.attn(self.norm1(x), grid, index, rec)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class BeitEncoder(nn.Module):
    has_cls = True

    def __init__(self, cfg: BeitConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self._indices: OrderedDict = OrderedDict()          # not a buffer: filled lazily in forward

    @property
    def tile(self) -> int:
        return self.cfg.patch_size

    def rel_index(self, grid: tuple[int, int], device) -> Tensor:
        """(N, N) long index for `grid`, shared by every block; cached per grid and device."""
        if not _cacheable():
            return relative_position_index(grid, device)
        key = (tuple(grid), torch.device(device), torch.is_inference_mode_enabled())
        return _lru_get(self._indices, key, lambda: relative_position_index(grid, device))

    def forward(self, x: Tensor, record: Record = Record(), resume: Optional[Resume] = None) -> EncoderFeatures:
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        start = 0 if resume is None else resume.start
        if resume is None:
            tokens = fastpath.patch_tokens(self.patch_embed, x)
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        else:
            tokens = resume.apply(resume.entering(), (gh, gw), fresh=False)
        embedded = tokens if record.tokens else None
        index = self.rel_index((gh, gw), x.device)

        keep_blocks = record.keeps_blocks
        blocks: list[BlockRecord] | None = [] if keep_blocks else None
        if blocks is not None and resume is not None:
            blocks += resume.records[:start]
        taps = [resume.tapped(i) for i in self.cfg.taps if i < start] if resume is not None else []
        last = len(self.blocks) - 1 if keep_blocks else max(self.cfg.taps)
        for i in range(start, last + 1):
            rec = BlockRecord(grid=(gh, gw), has_cls=True) if keep_blocks else None
            tokens = self.blocks[i](tokens, (gh, gw), index, rec if record.attention else None)
            if resume is not None:
                tokens = resume.apply(tokens, (gh, gw))
            if rec is not None:
                keep_record(record, rec, tokens, blocks)
            if i in self.cfg.taps:
                taps.append(tokens)

        maps = [t[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw) for t in taps]
        cls = [t[:, 0] for t in taps]
        return EncoderFeatures(maps, cls, out_size=(gh * p, gw * p), blocks=blocks, input_size=(h, w),
                               embedded=embedded if resume is None else resume.embedded)


def midas_taps(depth: int) -> tuple[int, ...]:
    """MiDaS v3.1 hooks: 2,5,8,11 (base, 12 blocks) and 5,11,17,23 (large, 24 blocks),
    i.e. the ends of four equal quarters."""
    step = depth // 4
    return tuple(step * k - 1 for k in (1, 2, 3, 4))


def window_from_table(rows: int) -> tuple[int, int]:
    """Native square window from a table of (2W-1)^2 + 3 rows."""
    side = math.isqrt(rows - 3)
    if side * side != rows - 3 or side % 2 == 0:
        raise ValueError(f"relative position table of {rows} rows is not (2W-1)^2 + 3")
    return (side + 1) // 2, (side + 1) // 2
