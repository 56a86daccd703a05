"""The one contract between every family's encoder and the rest of DPT Lab.

An encoder turns a normalized image batch into four feature maps for the shared DPT
decoder. When asked (an argument of the forward, not a hook), it also records, per
transformer block, what the norm and attention tools need:

    feats = encoder(x, record=Record(norms=True, attention=True))
    feats.maps        4 x (B, C_i, h_i, w_i) patch-token maps at the tapped blocks
    feats.cls         4 x (B, C_i) class token at the taps, or None (no CLS)
    feats.out_size    (H, W) of the depth map the decoder must produce
    feats.blocks      one BlockRecord per transformer block, or None when nothing was asked

The code that computes a block's attention is the code that records its inputs, so the
recorded q/k/bias cannot drift from what the model really does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import fastpath


@dataclass(frozen=True)
class Record:
    """What an encoder pass should keep besides the decoder's inputs."""

    norms: bool = False       # L2 norm of every token of the residual stream after each block
    attention: bool = False   # each block's attention inputs (q, k, bias), enough for any row
    tokens: bool = False      # the residual stream after each block, (B, N, C): the feature lenses

    @property
    def keeps_blocks(self) -> bool:
        """Whether the pass keeps a BlockRecord per block."""
        return self.norms or self.attention or self.tokens


@dataclass
class WindowLayout:
    """How a windowed (SwinV2) block cut its stage grid into attention windows.

    Tokens live on the stage grid (grid_h, grid_w). The block pads the grid at the bottom
    and right up to (padded_h, padded_w), a multiple of `window`, rolls it by -shift on
    both axes (only along an axis whose grid is longer than one window: see `shifts`),
    and attends inside each window x window tile. Padded tokens are masked out as keys.
    encoders/swin2.py has `window_row` / `window_of` to read a token's window from this.
    """

    window: int
    shift: int
    grid: tuple[int, int]
    padded: tuple[int, int]

    @property
    def shifts(self) -> tuple[int, int]:
        """The roll actually applied on (rows, cols)."""
        return (self.shift if self.grid[0] > self.window else 0, self.shift if self.grid[1] > self.window else 0)


@dataclass
class BlockRecord:
    """One transformer block as the norm and attention tools see it.

    Attention logits of block b are  q @ k^T * scale + bias  (then softmax over keys),
    with q, k of shape (B, heads, N, head_dim) over all tokens of the block (CLS first
    when the model has one). For windowed blocks (SwinV2) q and k are over the stage grid
    tokens in row-major order, and logits only exist inside a window (see `window`).
    """

    grid: tuple[int, int]                     # patch grid this block's tokens live on
    has_cls: bool
    token_norms: Optional[Tensor] = None      # (B, N) L2 norm after the block (CLS first)
    tokens: Optional[Tensor] = None           # (B, N, C) the residual stream after the block (CLS first)
    q: Optional[Tensor] = None                # (B, heads, N, d)
    k: Optional[Tensor] = None                # (B, heads, N, d)
    scale: Optional[Tensor | float] = None    # float, or (heads, 1, 1) tensor (SwinV2 logit scale)
    # Position bias, in the family's compact form (never an N x N x heads dense copy):
    #   BEiT:   rel_table (R, heads) and rel_index (N, N) long, bias = rel_table[rel_index]
    #   SwinV2: window_bias (heads, window^2, window^2), the same for every window
    rel_table: Optional[Tensor] = None
    rel_index: Optional[Tensor] = None
    window_bias: Optional[Tensor] = None
    window: Optional[WindowLayout] = None

    @property
    def num_heads(self) -> int:
        return int(self.q.shape[1])

    def compact(self) -> None:
        """Replace q / k (views into the block's qkv output, which also holds v) by tight
        copies, so the qkv tensor can be freed. Same values, same shapes."""
        for name in ("q", "k"):
            t = getattr(self, name)
            if isinstance(t, Tensor) and not _owns_storage(t):
                setattr(self, name, t.contiguous() if not t.is_contiguous() else t.clone())


def _owns_storage(t: Tensor) -> bool:
    """True when `t` is contiguous and its storage holds nothing else (no v, no batch)."""
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def keep_record(record: "Record", rec: BlockRecord, tokens: Tensor, blocks: list) -> None:
    """After a block has run: its token norms and output tokens if asked for, its q / k compacted right away
    (so the pass holds about what the attention tool keeps, not every block's qkv output),
    and the record appended to `blocks`. Done inside the encoder's loop, not by forward
    hooks: hooks on a shared model would reach other threads' passes."""
    if record.norms:
        rec.token_norms = token_norms(tokens)
    if record.tokens:       # the block's own output tensor: nothing later writes into it
        rec.tokens = tokens.detach()
    if record.attention:
        rec.compact()
    blocks.append(rec)


@dataclass
class Resume:
    """Run an encoder from block `start` on, from an earlier pass's records, instead of from the
    image: the ablation experiment's partial re-run. The stream entering block `start` is the
    recorded output of block start - 1 (`records[start - 1].tokens`; `embedded` for block 0;
    SwinV2 merges patches first at a stage's first block), so nothing before it runs again; the
    taps before `start` come from the records too, and their records are reused as they are.
    `edit(tokens, grid, fresh)` (optional) rewrites the stream entering block `start`, after every
    later block and after each later patch merging: whatever any later block or the decoder reads.
    fresh: the tensor is a block's own new output, so the edit may write into it; the recorded
    stream it starts from is never written."""

    start: int
    records: list                      # every block's BlockRecord of the earlier pass (tokens recorded)
    embedded: Optional[Tensor] = None  # the stream entering block 0 (EncoderFeatures.embedded)
    edit: Optional[Callable[..., Tensor]] = None

    def entering(self) -> Tensor:
        """The recorded stream entering block `start` (before any patch merging)."""
        if self.start == 0:
            if self.embedded is None:
                raise ValueError("resuming at block 0 needs the recorded embedding (Record(tokens=True))")
            return self.embedded
        tokens = self.records[self.start - 1].tokens
        if tokens is None:
            raise ValueError("resuming needs the earlier pass's tokens (Record(tokens=True))")
        return tokens

    def tapped(self, block: int) -> Tensor:
        """The recorded output of a block before `start` (a tap the re-run does not recompute)."""
        return self.records[block].tokens

    def apply(self, tokens: Tensor, grid: tuple[int, int], fresh: bool = True) -> Tensor:
        return tokens if self.edit is None else self.edit(tokens, grid, fresh)


@dataclass
class EncoderFeatures:
    """What `DepthModel.encode` returns: everything `decode` needs, plus any records."""

    maps: list[Tensor]
    cls: Optional[list[Tensor]]
    out_size: tuple[int, int]
    blocks: Optional[list[BlockRecord]] = None
    input_size: tuple[int, int] = (0, 0)
    extras: dict = field(default_factory=dict)
    embedded: Optional[Tensor] = None         # the stream entering block 0 (Record(tokens=True))

    def to(self, device) -> "EncoderFeatures":
        """A copy with every tensor (maps, CLS, records, embedding) on `device`; the decoder's
        cached fusion inputs are left behind (they are recomputed where the decoder runs)."""
        def move(t):
            return t.to(device) if isinstance(t, Tensor) else t

        blocks = None if self.blocks is None else [
            dataclasses.replace(b, **{f.name: move(getattr(b, f.name)) for f in dataclasses.fields(b)})
            for b in self.blocks]
        return EncoderFeatures([move(m) for m in self.maps], None if self.cls is None else [move(c) for c in self.cls],
                               self.out_size, blocks, self.input_size, {}, move(self.embedded))

    def detach_records(self) -> "EncoderFeatures":
        """A copy without the per-block records (what the fusion tool caches)."""
        return EncoderFeatures(self.maps, self.cls, self.out_size, None, self.input_size)


def token_norms(x: Tensor) -> Tensor:
    """(B, N, C) -> (B, N) L2 norm per token, computed in float32."""
    return torch.linalg.vector_norm(x.float(), dim=-1)


class Mlp(nn.Module):
    """The transformer MLP of DINOv2, BEiT and SwinV2: fc1, exact (erf) GELU, fc2. On the
    CPU fast path fc1 and its GELU are one oneDNN matmul (fastpath.linear; elsewhere it
    runs F.linear and F.gelu)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return fastpath.linear(self.fc2, fastpath.linear(self.fc1, x, gelu=True))
