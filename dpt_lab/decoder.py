"""The one DPT decoder every family shares: reassemble -> fuse -> depth head.

    maps (4 tapped encoder feature maps, fine to coarse)
      -> Reassemble[i]: optional CLS readout, 1x1 projection, resize to 4x / 2x / 1x / 0.5x
      -> layer_rn[i]:   3x3 conv to the decoder width ("features")
      -> * fusion_scales[i]                       (the fusion-scaling experiment)
      -> Fusion[3] .. Fusion[0]: coarse to fine, each upsamples to the next finer map
      -> DepthHead: conv, upsample to the output size, conv, ReLU, conv, activation

Fusion scaling: factor i multiplies layer_rn[i]'s output, the reassembled map that
enters fusion block i (i = 0 is the finest, 3 the coarsest). A factor of 0 is the same as
feeding that fusion block a zero map; (1, 1, 1, 1) is the unmodified model.

Depth-Anything and MiDaS 3.1 differ only in data: which readout (ignore / project),
whether there are reassemble convs (SwinV2 has none), the head's hidden width, and the
head's last activation (sigmoid * max_depth for metric Depth-Anything).

On the CPU (float32, no autograd) the convolutions run channels-last through oneDNN with
their ReLU / residual add fused in (fastpath.py); each fusion block applies its 1x1
out_conv before the bilinear upsampling instead of after it (the two commute: bilinear
weights sum to 1), on a quarter of the pixels, and the head's convs read the finest
block's output and conv1's output upsampled in bands of rows (upsampled_conv_bands), so
that no full-size upsampled map is made. All of this changes only float rounding.

A slider of the fusion-scaling experiment reruns only what its factor reaches
(FusionStages, kept by DepthModel.decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fastpath


@dataclass(frozen=True)
class DecoderConfig:
    in_channels: tuple[int, ...]          # encoder width at each tap (4 values)
    reassemble_channels: tuple[int, ...]  # width after the 1x1 projection (4 values)
    features: int                         # decoder width
    readout: str = "ignore"               # "ignore" | "project" | "none" (no CLS at all)
    reassemble: bool = True               # False: maps go straight to layer_rn (SwinV2)
    head_hidden: int = 32
    metric: bool = False                  # sigmoid * max_depth instead of ReLU
    max_depth: float = 1.0


class Reassemble(nn.Module):
    """Tokens of one tap -> an image-like map at that tap's decoder resolution."""

    def __init__(self, in_ch: int, out_ch: int, resize: str, readout: str):
        super().__init__()
        self.readout_proj = nn.Linear(2 * in_ch, in_ch) if readout == "project" else None
        self.project = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        if resize == "up4":
            self.resize = nn.ConvTranspose2d(out_ch, out_ch, kernel_size=4, stride=4)
        elif resize == "up2":
            self.resize = nn.ConvTranspose2d(out_ch, out_ch, kernel_size=2, stride=2)
        elif resize == "down2":
            self.resize = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=2, padding=1)
        else:
            self.resize = nn.Identity()

    def forward(self, fmap: Tensor, cls: Optional[Tensor]) -> Tensor:
        fast = fastpath.active(fmap, self)
        if self.readout_proj is not None:
            b, c, h, w = fmap.shape
            tokens = fmap.flatten(2).transpose(1, 2)                     # (B, N, C)
            readout = cls[:, None, :].expand(-1, tokens.shape[1], -1)
            tokens = torch.cat([tokens, readout], dim=-1)
            if fast:
                tokens = fastpath.linear(self.readout_proj, tokens, gelu=True)
                fmap = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)     # channels-last view
            else:
                tokens = F.gelu(self.readout_proj(tokens))
                fmap = tokens.transpose(1, 2).reshape(b, c, h, w)
        if fast:
            fmap = fastpath.conv(self.project, fastpath.channels_last(fmap))
            if isinstance(self.resize, nn.ConvTranspose2d):
                return fastpath.conv_transpose(self.resize, fmap)
            return fastpath.conv(self.resize, fmap) if isinstance(self.resize, nn.Conv2d) else fmap
        return self.resize(self.project(fmap))


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """conv2(relu(conv1(relu(x)))) + x."""
        if fastpath.active(x, self):
            x = fastpath.channels_last(x)
            h = fastpath.conv(self.conv1, F.relu(x), relu=True)
            return fastpath.conv(self.conv2, h, add=x)
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    """out = out_conv(upsample(rcu2(coarser + rcu1(skip))))."""

    def __init__(self, features: int):
        super().__init__()
        self.rcu1 = ResidualConvUnit(features)   # exists in every checkpoint; unused by the coarsest block
        self.rcu2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, x: Tensor, skip: Optional[Tensor], size: tuple[int, int]) -> Tensor:
        return self.merge(x if skip is None else x + self.rcu1(skip), size)

    def merge(self, x: Tensor, size: Optional[tuple[int, int]]) -> Tensor:
        """The block after its two inputs are summed: out_conv(upsample(rcu2(x))); size None:
        out_conv(rcu2(x)), for the fast path's head to upsample (DepthHead.from_low_res)."""
        x = self.rcu2(x)
        if size is None:
            return fastpath.conv(self.out_conv, x)
        # out_conv is 1x1 and bilinear weights sum to 1, so conv-then-resize equals
        # resize-then-conv; upsampling, the conv runs on the smaller map (on any device;
        # fastpath.disabled() restores the original order)
        if fastpath.enabled() and size[0] * size[1] > x.shape[-2] * x.shape[-1]:
            x = fastpath.conv(self.out_conv, x) if fastpath.active(x, self) else self.out_conv(x)
            return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class FusionStages:
    """What a decode of the same fusion inputs with other factors can reuse (a slider move).

    Fusion block k's output depends only on factors k.. (its own and the coarser ones), and
    its skip branch rcu1(factor_k * input_k) only on factor k. Moving factor 2 of 4 thus
    reruns block 1, block 0's rcu2 and the head; the coarser blocks and block 0's skip
    branch (a fifth of the decoder) come from here. One value per slot, the latest: block
    outputs 3..1 and skip branches 2..0 (block 0's output, at twice the finest map, is not
    kept). ViT-S at 518 x 784: ~22 MB; DepthModel keeps one such set per model."""

    __slots__ = ("paths", "skips", "__weakref__")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        # replaced, never changed in place: a decode running in another thread keeps its copy
        self.paths: dict[int, tuple] = {}
        self.skips: dict[int, tuple] = {}


def _scaled(x: Tensor, factor: float) -> Tensor:
    return x if factor == 1.0 else x * factor


class DepthHead(nn.Module):
    BAND_ROWS = 64           # CPU fast path: output rows per band of conv2 (see _fast_tail)
    BAND_BYTES = 2 << 20     # ... and of conv1 from a low-resolution input, by its bytes (from_low_res)

    def __init__(self, features: int, hidden: int, metric: bool, max_depth: float):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(features // 2, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, 1, kernel_size=1)
        self.metric = metric
        self.max_depth = float(max_depth)

    def forward(self, x: Tensor, out_size: tuple[int, int]) -> Tensor:
        if fastpath.active(x, self):
            return self._fast_tail(fastpath.conv(self.conv1, fastpath.channels_last(x)), out_size)
        x = self.conv1(x)
        x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=True)
        x = self.conv3(F.relu(self.conv2(x)))
        if self.metric:
            return torch.sigmoid(x).squeeze(1) * self.max_depth
        return F.relu(x).squeeze(1)

    def _fast_tail(self, x: Tensor, out_size: tuple[int, int]) -> Tensor:
        """upsample -> conv2 -> ReLU -> conv3 -> activation, in bands of output rows
        (upsampled_conv_bands: a full-resolution map is never made)."""
        b = x.shape[0]
        height, width = int(out_size[0]), int(out_size[1])
        out = torch.empty(b, height, width, dtype=x.dtype, device=x.device)
        for r0, r1, y in upsampled_conv_bands(x, (height, width), self.conv2, self.BAND_ROWS, relu=True):
            y = fastpath.conv(self.conv3, y, relu=not self.metric)
            out[:, r0:r1] = torch.sigmoid(y[:, 0]) * self.max_depth if self.metric else y[:, 0]
        return out

    def from_low_res(self, x: Tensor, size: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        """The head on x upsampled (bilinear, align_corners) to `size`, without that map: the
        CPU fast path's finest fusion block hands over its output before the upsampling,
        which conv1 reads in bands (at 518 x 784 that map is 33 MB for ViT-S, 133 MB for
        ViT-L, allocated fresh and streamed through memory twice)."""
        b = x.shape[0]
        mid = torch.empty(b, size[0], size[1], self.conv1.out_channels, dtype=x.dtype, device=x.device)  # NHWC
        rows = max(4, self.BAND_BYTES // (size[1] * x.shape[1] * x.element_size()))
        for r0, r1, y in upsampled_conv_bands(x, size, self.conv1, rows):
            mid[:, r0:r1] = y.permute(0, 2, 3, 1)
        return self._fast_tail(mid.permute(0, 3, 1, 2), out_size)


def upsampled_conv_bands(x: Tensor, size: tuple[int, int], conv: nn.Conv2d, band_rows: int, relu: bool = False):
    """conv(upsample(x)) band by band, for a 3x3 conv with padding 1 and an align_corners
    bilinear upsampling of x (B x C x h x w, channels-last) to `size`: yields (r0, r1, rows
    r0..r1 of the conv's output, channels-last). A band's upsampled rows (one more on each
    side for the 3x3 conv, zero rows at the image edges as its padding) are blended from the
    two source rows the resize reads, then resized along the width by F.interpolate (the
    row count unchanged, so rows are copied as they are); a band stays in cache."""
    src = fastpath.channels_last(x).permute(0, 2, 3, 1)             # (B, h, w, C), contiguous
    height, width = int(size[0]), int(size[1])
    lo, hi, weight = fastpath.bilinear_rows(src.shape[1], height)
    for r0 in range(0, height, band_rows):
        r1 = min(height, r0 + band_rows)
        a, e = max(r0 - 1, 0), min(r1 + 1, height)
        rows = torch.lerp(src.index_select(1, lo[a:e]), src.index_select(1, hi[a:e]), weight[a:e].view(1, -1, 1, 1))
        band = F.interpolate(rows.permute(0, 3, 1, 2), size=(e - a, width), mode="bilinear", align_corners=True)
        if r0 == 0 or r1 == height:
            band = fastpath.channels_last(F.pad(band, (0, 0, int(r0 == 0), int(r1 == height))))
        yield r0, r1, fastpath.conv(conv, band, relu=relu, padding=(0, conv.padding[1]))


class DPTDecoder(nn.Module):
    RESIZES = ("up4", "up2", "none", "down2")

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.reassemble:
            self.reassemble = nn.ModuleList(
                Reassemble(cin, cout, resize, cfg.readout)
                for cin, cout, resize in zip(cfg.in_channels, cfg.reassemble_channels, self.RESIZES)
            )
            rn_in = cfg.reassemble_channels
        else:
            self.reassemble = None
            rn_in = cfg.in_channels
        self.layer_rn = nn.ModuleList(fastpath.Conv2d(c, cfg.features, 3, padding=1, bias=False) for c in rn_in)
        self.fusion = nn.ModuleList(FusionBlock(cfg.features) for _ in range(4))
        self.head = DepthHead(cfg.features, cfg.head_hidden, cfg.metric, cfg.max_depth)

    def reassembled(self, maps: Sequence[Tensor], cls: Optional[Sequence[Tensor]]) -> list[Tensor]:
        """The four decoder-width maps that enter the fusion blocks (before any scaling)."""
        if self.reassemble is not None:
            maps = [r(m, None if cls is None else c) for r, m, c in zip(self.reassemble, maps, cls or [None] * 4)]
        return [conv(m) for conv, m in zip(self.layer_rn, maps)]

    def fuse(self, layers: Sequence[Tensor], out_size: tuple[int, int],
             fusion_scales: Optional[Sequence[float]] = None, stages: Optional[FusionStages] = None) -> Tensor:
        """Fusion blocks 3..0 and the head. With `stages`, blocks whose inputs did not change
        since the last call with the same `stages` are taken from it, and it is updated."""
        factors = (1.0,) * 4 if fusion_scales is None else tuple(float(s) for s in fusion_scales)
        # the numbers differ (by rounding) with the fast path on or off and under autocast
        device = layers[0].device.type
        mode = (fastpath.enabled(), torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device))
        paths, skips = ({}, {}) if stages is None else (dict(stages.paths), dict(stages.skips))
        h0, w0 = layers[0].shape[-2:]
        targets = [(2 * h0, 2 * w0)] + [tuple(m.shape[-2:]) for m in layers[:3]]
        path = None
        for k in (3, 2, 1, 0):
            key = (mode, factors[k:])
            if k in paths and paths[k][0] == key:
                path = paths[k][1]
                continue
            block = self.fusion[k]
            if path is None:                    # the coarsest block has no skip input
                x = _scaled(layers[k], factors[k])
            else:
                skip_key = (mode, factors[k])
                kept = skips.get(k)
                branch = kept[1] if kept is not None and kept[0] == skip_key else block.rcu1(_scaled(layers[k], factors[k]))
                if stages is not None:
                    skips[k] = (skip_key, branch)
                x = path + branch
            if k == 0:
                break
            path = block.merge(x, targets[k])
            if stages is not None:
                paths[k] = (key, path)
        if stages is not None:
            stages.paths, stages.skips = paths, skips
        finest = self.fusion[0]
        if fastpath.active(x, finest, self.head):
            # the finest block's 2x upsampling is done in bands inside the head
            return self.head.from_low_res(finest.merge(x, None), targets[0], out_size)
        return self.head(finest.merge(x, targets[0]), out_size)

    def forward(self, maps, cls, out_size, fusion_scales=None) -> Tensor:
        return self.fuse(self.reassembled(maps, cls), out_size, fusion_scales)
