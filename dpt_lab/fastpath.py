"""CPU inference fast path: oneDNN fused kernels for the shared decoder and the ViT MLPs.

Automatic, and used only where it cannot change what a caller sees beyond float rounding
(model(x) stays within ~1e-6 relative of the plain PyTorch ops; tests/test_parity.py and
the -hf comparison hold to 1e-4):

  - float32 tensors on the CPU, with oneDNN (mkldnn) available and enabled;
  - no autograd: grad mode off, or nothing involved requires grad (the fused kernels have
    no backward);
  - not while tracing, scripting, compiling or exporting (torch.compile / torch.export /
    ONNX see the plain ops and fuse them their own way).

What it does (see decoder.py and encoders/dinov2.py):
  - decoder convolutions run channels-last (NHWC), the layout oneDNN's convolutions use
    natively, instead of reordering every NCHW activation in and out of each conv;
  - a conv's following ReLU and a residual add are fused into the conv (one pass over the
    output, one allocation less: the head's 518 x 518 maps are tens of MB each);
  - fc1 + GELU of a ViT MLP is one oneDNN matmul with a GELU (erf) post-op.

`disabled()` turns it off (for A/B timing, or to get the plain ops' exact bits):

    with fastpath.disabled():
        reference = model(x)
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENABLED = True      # module switch; `disabled()` is the scoped way to turn it off

_available: Optional[bool] = None


def available() -> bool:
    """oneDNN's fused conv / linear ops exist in this torch build and work (checked once)."""
    global _available
    if _available is None:
        try:
            ok = torch.backends.mkldnn.is_available()
            if ok:
                x = torch.ones(1, 2, 3, 3)
                w = torch.ones(2, 2, 1, 1)
                y = torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "relu", [], "")
                z = torch.ops.mkldnn._convolution_pointwise.binary(
                    x, x, w, None, [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None)
                t = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), None, "gelu", [], "none")
                ok = bool((y == 2).all() and (z == 3).all() and t.shape == (2, 4))
        except Exception:  # noqa: BLE001 - any failure means: use the plain ops
            ok = False
        _available = ok
    return _available


@contextlib.contextmanager
def disabled():
    """Run the plain PyTorch ops inside the block (restores the previous setting)."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before


def _tracing() -> bool:
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def active(x: Tensor, *modules: nn.Module) -> bool:
    """Whether the fast path applies to `x` going through `modules` (see the module doc)."""
    if not ENABLED or _tracing():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.layout != torch.strided:
        return False
    if not torch.backends.mkldnn.enabled or not available():
        return False
    if torch.is_grad_enabled():
        if x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters()):
            return False
    return True


def channels_last(x: Tensor) -> Tensor:
    """x in channels-last (NHWC) memory with the canonical strides, copied only if needed.

    A channels-last view whose size-1 dims carry other strides (the encoder's tap maps:
    batch 1, a slice past the CLS token) passes is_contiguous(channels_last) but oneDNN
    does not take it as NHWC (it copies it to NCHW and answers NCHW); the same memory
    with the canonical strides it takes as is."""
    if x.dim() != 4:
        return x
    b, c, h, w = x.shape
    dense = (c * h * w, 1, w * c, c)
    if x.stride() == dense:
        return x
    if x.is_contiguous(memory_format=torch.channels_last):      # only size-1 dims differ
        return x.as_strided(x.shape, dense, x.storage_offset())
    return x.contiguous(memory_format=torch.channels_last)


def _plain_conv(conv: nn.Conv2d) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32)


def conv(conv: nn.Conv2d, x: Tensor, relu: bool = False, add: Optional[Tensor] = None,
         padding: Optional[tuple[int, int]] = None) -> Tensor:
    """conv(x), then + add (a tensor of the output's shape), then ReLU, in one oneDNN call
    (the output keeps x's memory format). `padding` overrides the module's zero padding.
    Falls back to the module where it does not fit."""
    pad = list(conv.padding if padding is None else padding)
    if not _plain_conv(conv) or (add is not None and (add.shape[1] != conv.out_channels or add.dtype != x.dtype)):
        y = conv(x) if padding is None else F.conv2d(x, conv.weight, conv.bias, conv.stride, pad, conv.dilation,
                                                     conv.groups)
        if add is not None:
            y = y + add
        return F.relu(y) if relu else y
    args = (conv.weight, conv.bias, pad, list(conv.stride), list(conv.dilation), conv.groups)
    if add is not None:
        if add.shape[0] != x.shape[0]:
            add = add.expand(x.shape[0], *add.shape[1:])
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            x, add.contiguous(memory_format=_memory_format(x)), *args, "add", None,
            "relu" if relu else None, [], None)
        return y
    return torch.ops.mkldnn._convolution_pointwise(x, *args, "relu" if relu else "none", [], "")


_ROWS: dict = {}


def bilinear_rows(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of an align_corners=True bilinear resize from n_in to n_out, as torch computes
    them (float32 source index = dst * (n_in - 1) / (n_out - 1)): (lower source row,
    upper source row, weight of the upper) per output row, cached per size pair."""
    key = (int(n_in), int(n_out))
    hit = _ROWS.get(key)
    if hit is None:
        scale = (n_in - 1) / (n_out - 1) if n_in > 1 and n_out > 1 else 0.0
        src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)
        lo = src.long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        hit = _ROWS[key] = (lo, hi, src - lo.float())
        if len(_ROWS) > 64:
            _ROWS.pop(next(iter(_ROWS)))
    return hit


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def linear(fc: nn.Linear, x: Tensor, gelu: bool = False) -> Tensor:
    """fc(x), or gelu(fc(x)) (the exact erf GELU) with the GELU as a post-op, as one oneDNN
    matmul (on this kind of CPU about 10% faster than the MKL sgemm behind F.linear, and
    the fused GELU saves a pass over the MLP's widest tensor)."""
    if x.dim() == 0 or fc.weight.dtype != torch.float32:
        y = fc(x)
        return F.gelu(y) if gelu else y
    return torch.ops.mkldnn._linear_pointwise(x, fc.weight, fc.bias, "gelu" if gelu else "none", [], "none")


def linear_gelu(fc: nn.Linear, x: Tensor) -> Tensor:
    return linear(fc, x, gelu=True)
