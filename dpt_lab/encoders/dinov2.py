"""DINOv2 ViT backbone, as used by Depth-Anything v1, v2 and v2-metric.

    image (B, 3, H, W), H and W multiples of 14
      -> 14x14 patch conv -> (B, gh*gw, C), CLS token prepended, position embedding added
         (the 37x37 table is resized bicubically to (gh, gw) exactly as DINOv2 does it)
      -> L pre-norm blocks: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))
      -> taps: the final LayerNorm applied to the residual stream after 4 chosen blocks

The MLP is GELU (ViT-S/B/L) or SwiGLU (ViT-G).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import cubic, fastpath
from .base import BlockRecord, EncoderFeatures, Mlp, Record, Resume, keep_record


@dataclass(frozen=True)
class DinoV2Config:
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    swiglu: bool
    taps: tuple[int, ...]
    patch_size: int = 14
    pos_grid: int = 37          # the position table is pos_grid x pos_grid (518 / 14)
    interpolate_offset: float = 0.1


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rec: BlockRecord | None) -> Tensor:
        b, n, c = x.shape
        qkv = fastpath.linear(self.qkv, x)
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if rec is not None:
            rec.q, rec.k, rec.scale = q, k, self.scale
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(b, n, c)
        return fastpath.linear(self.proj, out)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = fastpath.linear(self.w12, x).chunk(2, dim=-1)
        return fastpath.linear(self.w3, F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ls1 = nn.Parameter(torch.ones(cfg.width))
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = (SwiGLU if cfg.swiglu else Mlp)(cfg.width, cfg.mlp_hidden)
        self.ls2 = nn.Parameter(torch.ones(cfg.width))

    def forward(self, x: Tensor, rec: BlockRecord | None = None) -> Tensor:
        if fastpath.active(x, self):    # x + ls * y in one pass
            x = torch.addcmul(x, self.ls1, self.attn(self.norm1(x), rec))
            return torch.addcmul(x, self.ls2, self.mlp(self.norm2(x)))
        x = x + self.ls1 * self.attn(self.norm1(x), rec)
        return x + self.ls2 * self.mlp(self.norm2(x))


class DinoV2Encoder(nn.Module):
    has_cls = True

    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid ** 2, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    @property
    def tile(self) -> int:
        return self.cfg.patch_size

    def position_embedding(self, gh: int, gw: int) -> Tensor:
        """The pos table for a gh x gw grid, computed the way DINOv2 does (scale factor
        with a +0.1 offset, bicubic, no antialias), so numbers match the original."""
        m = self.cfg.pos_grid
        if not (isinstance(gh, int) and isinstance(gw, int)):   # symbolic sizes: ONNX export
            return self._position_embedding_graph(gh, gw)
        if gh == m and gw == m:
            return self.pos_embed
        table = self.pos_embed.float()
        grid = table[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        off = self.cfg.interpolate_offset
        grid = F.interpolate(grid, scale_factor=((gh + off) / m, (gw + off) / m), mode="bicubic", antialias=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([table[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def _position_embedding_graph(self, gh, gw) -> Tensor:
        """position_embedding for sizes only known when the graph runs (torch.export
        SymInts or traced tensors): the same bicubic resize as two matrix products whose
        weights, and the scale factor (g + 0.1) / 37, are computed from the sizes in the
        graph; the unresized table where gh = gw = 37, as above."""
        m = self.cfg.pos_grid
        table = self.pos_embed.float()
        grid = table[0, 1:].reshape(m, m, -1).permute(2, 0, 1)               # (C, m, m)
        rows = _cubic_matrix(gh, m, self.cfg.interpolate_offset)            # (gh, m)
        cols = _cubic_matrix(gw, m, self.cfg.interpolate_offset)            # (gw, m)
        native = (_size_tensor(gh) == m) & (_size_tensor(gw) == m)
        rows = torch.where(native, _identity(gh, m), rows)
        cols = torch.where(native, _identity(gw, m), cols)
        grid = rows @ grid @ cols.t()                                       # (C, gh, gw)
        grid = grid.permute(1, 2, 0).reshape(1, -1, table.shape[-1])
        return torch.cat([table[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: Tensor, record: Record = Record(), resume: Optional[Resume] = None) -> EncoderFeatures:
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        start = 0 if resume is None else resume.start
        if resume is None:
            tokens = fastpath.patch_tokens(self.patch_embed, x)
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
            tokens = tokens + self.position_embedding(gh, gw)
        else:
            tokens = resume.apply(resume.entering(), (gh, gw), fresh=False)
        embedded = tokens if record.tokens else None

        keep_blocks = record.keeps_blocks
        blocks: list[BlockRecord] | None = [] if keep_blocks else None
        if blocks is not None and resume is not None:
            blocks += resume.records[:start]
        taps = [self.norm(resume.tapped(i)) for i in self.cfg.taps if i < start] if resume is not None else []
        last = len(self.blocks) - 1 if keep_blocks else max(self.cfg.taps)
        for i in range(start, last + 1):
            rec = BlockRecord(grid=(gh, gw), has_cls=True) if keep_blocks else None
            tokens = self.blocks[i](tokens, rec if record.attention else None)
            if resume is not None:
                tokens = resume.apply(tokens, (gh, gw))
            if rec is not None:
                keep_record(record, rec, tokens, blocks)
            if i in self.cfg.taps:
                taps.append(self.norm(tokens))

        maps = [t[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw) for t in taps]
        cls = [t[:, 0] for t in taps]
        return EncoderFeatures(maps, cls, out_size=(gh * p, gw * p), blocks=blocks, input_size=(h, w),
                               embedded=embedded if resume is None else resume.embedded)


def _size_tensor(n) -> Tensor:
    """A grid size (int, SymInt or 0-dim traced tensor) as a float64 0-dim tensor."""
    if isinstance(n, Tensor):
        return n.to(torch.float64)
    return torch.scalar_tensor(n, dtype=torch.float64)


def _identity(n_out, n_in: int) -> Tensor:
    """(n_out, n_in) float32, 1 where row == column (the identity when n_out == n_in)."""
    return (torch.arange(n_out)[:, None] == torch.arange(n_in)[None, :]).to(torch.float32)


def _cubic_matrix(n_out, n_in: int, offset: float) -> Tensor:
    """(n_out, n_in) float32 weights of torch's bicubic resize (A = -0.75, half-pixel,
    edges clamped, no antialias) with scale_factor (n_out + offset) / n_in, written with
    tensor ops only so n_out may be symbolic. The source step n_in / (n_out + offset) is
    computed in float64 and rounded to float32, as the kernel does."""
    step = (n_in / (_size_tensor(n_out) + offset)).to(torch.float32)
    src = (torch.arange(n_out, dtype=torch.float32) + 0.5) * step - 0.5
    base = torch.floor(src)
    t = src - base
    weights = torch.stack(cubic.weights(t, opencv=False), dim=1)   # (n_out, 4)
    taps = (base[:, None] + torch.arange(-1, 3, dtype=torch.float32)).clamp(0, n_in - 1)
    onehot = (taps[:, :, None] == torch.arange(n_in, dtype=torch.float32)).to(torch.float32)
    return (weights[:, :, None] * onehot).sum(dim=1)


def tap_blocks(depth: int, version: int) -> tuple[int, ...]:
    """Depth-Anything's tapped blocks: v1 takes the last four; v2 a fixed spread per size."""
    if version == 1:
        return tuple(range(depth - 4, depth))
    spread = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}
    if depth in spread:
        return spread[depth]
    step = depth // 4  # not an official size: an even split ending at the last block
    return tuple(depth - 1 - step * i for i in (3, 2, 1, 0))


def pos_grid_from_table(num_positions: int) -> int:
    side = math.isqrt(num_positions - 1)
    if side * side != num_positions - 1:
        raise ValueError(f"position table of {num_positions} entries is not 1 + a square grid")
    return side
