"""CPU inference fast path: oneDNN fused kernels for the shared decoder and the ViT MLPs.

Automatic, and used only where it cannot change what a caller sees beyond float rounding
(model(x) stays within ~1e-6 relative of the plain PyTorch ops; tests/test_parity.py and
the -hf comparison hold to 1e-4):

  - float32 tensors on the CPU, with oneDNN (mkldnn) available and enabled;
  - no autograd: grad mode off, or nothing involved requires grad (the fused kernels have
    no backward);
  - not while tracing, scripting, compiling or exporting (torch.compile / torch.export /
    ONNX see the plain ops and fuse them their own way).

What it does (see decoder.py and the encoders):
  - decoder convolutions run channels-last (NHWC), the layout oneDNN's convolutions use
    natively, instead of reordering every NCHW activation in and out of each conv;
  - a conv's following ReLU and a residual add are fused into the conv (one pass over the
    output, one allocation less: the head's 518 x 518 maps are tens of MB each);
  - fc1 + GELU of a ViT MLP is one oneDNN matmul with a GELU (erf) post-op;
  - a transposed conv or a patch embedding whose kernel equals its stride is one matmul;
  - linear and conv layers use a copy of their weight in oneDNN's blocked layout, made on
    first use and kept (`packed`): without it every call reorders the weight again (for
    the large ones a good part of the op's time). The cost is memory: the weights
    are held twice while the model lives on the CPU. So only small models pack: a
    DepthModel whose weights are at most PACK_MODEL_MAX_BYTES (256 MB: ViT-S, SwinV2-T;
    +100 MB for ViT-S, for 1.02-1.09x) runs inside `packing(True)`, a larger one
    (ViT-B, ViT-L: +1.3 GB for ViT-L) unpacked (BENCHMARKS.md, "Packed weights"). All
    copies together stay under PACK_LIMIT_BYTES (2 GiB). `PACK_WEIGHTS = False` turns
    packing off everywhere.

`disabled()` turns the fast path off for the calling thread (for A/B timing, or to get
the plain ops' exact bits); other threads' forwards stay on it:

    with fastpath.disabled():
        reference = model(x)
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from contextvars import ContextVar
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENABLED = True      # process-wide switch; `disabled()` turns it off for the calling thread only
PACK_WEIGHTS = True  # keep oneDNN-blocked copies of linear and conv weights (see the module doc)
PACK_MODEL_MAX_BYTES = 256 << 20   # a DepthModel with more weights than this runs unpacked
PACK_LIMIT_BYTES = 2 << 30   # at most this much in packed copies, process-wide; past it, weights run unpacked

# per thread / task (contextvars: a server runs several requests at once)
_off: ContextVar[bool] = ContextVar("dpt_lab_fastpath_off", default=False)
_pack: ContextVar[bool] = ContextVar("dpt_lab_fastpath_pack", default=True)

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
    """Run the plain PyTorch ops inside the block, in this thread (or asyncio task) only."""
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)


def enabled() -> bool:
    """The fast path is switched on here (ENABLED, and not inside `disabled()`)."""
    return ENABLED and not _off.get()


@contextlib.contextmanager
def packing(allowed: bool):
    """Whether weights used inside the block may be packed (this thread only)."""
    token = _pack.set(bool(allowed))
    try:
        yield
    finally:
        _pack.reset(token)


def packs(module: nn.Module) -> bool:
    """Whether a model this size packs its weights: at most PACK_MODEL_MAX_BYTES of them."""
    if tracing():
        return False          # (the fast path is off anyway; sizes would be traced values)
    return sum(p.numel() * p.element_size() for p in module.parameters()) <= PACK_MODEL_MAX_BYTES


def tracing() -> bool:
    """Scripting, tracing, compiling or exporting (torch.jit / torch.compile / torch.export /
    ONNX): the fast path is off, and nothing may be cached (a cache would keep proxies)."""
    return (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def active(x: Tensor, *modules: nn.Module) -> bool:
    """Whether the fast path applies to `x` going through `modules` (see the module doc)."""
    if not enabled() or tracing():
        return False
    if torch.is_autocast_enabled("cpu"):      # half precision asked for: the plain ops, which autocast casts
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


class Conv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters, same state_dict) that runs `conv` where the fast path
    applies: for convs called as modules, whose output nothing else fuses with."""

    def forward(self, x: Tensor) -> Tensor:
        if active(x, self):
            return conv(self, channels_last(x))
        return super().forward(x)


def _plain_conv(conv: nn.Conv2d) -> bool:
    return (type(conv) in (nn.Conv2d, Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32)


def conv(conv: nn.Conv2d, x: Tensor, relu: bool = False, add: Optional[Tensor] = None,
         padding: Optional[tuple[int, int]] = None) -> Tensor:
    """conv(x), then + add (a tensor of the output's shape), then ReLU, in one oneDNN call
    (the output keeps x's memory format). `padding` overrides the module's zero padding.
    Falls back to the module where it does not fit."""
    pad = list(conv.padding if padding is None else padding)
    if not _plain_conv(conv) or (add is not None and (add.shape[1] != conv.out_channels or add.dtype != x.dtype)):
        if padding is None:     # (not conv(x): a fastpath.Conv2d would come back here)
            y = conv._conv_forward(x, conv.weight, conv.bias) if isinstance(conv, nn.Conv2d) else conv(x)
        else:
            y = F.conv2d(x, conv.weight, conv.bias, conv.stride, pad, conv.dilation, conv.groups)
        if add is not None:
            y = y + add
        return F.relu(y) if relu else y
    args = (_conv_weight(conv, pad), conv.bias, pad, list(conv.stride), list(conv.dilation), conv.groups)
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


_MODULE_BIAS = object()


def linear(fc: nn.Linear, x: Tensor, gelu: bool = False, bias=_MODULE_BIAS) -> Tensor:
    """fc(x), or gelu(fc(x)) (the exact erf GELU) with the GELU as a post-op, as one oneDNN
    matmul on the packed weight (on this kind of CPU 10-15% faster than the MKL sgemm
    behind F.linear, and the fused GELU saves a pass over the MLP's widest tensor).
    `bias` replaces the module's (BEiT and SwinV2 build their qkv bias from q and v parts).
    Where the fast path does not apply: F.linear (+ F.gelu), the plain ops' exact bits."""
    if bias is _MODULE_BIAS:
        bias = fc.bias
    grad_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    if not active(x, fc) or grad_bias or x.dim() == 0 or fc.weight.dtype != torch.float32:
        y = F.linear(x, fc.weight, bias)
        return F.gelu(y) if gelu else y
    return torch.ops.mkldnn._linear_pointwise(x, packed(fc.weight), bias, "gelu" if gelu else "none", [], "none")


def _transpose_matrix(weight: Tensor) -> Tensor:
    """ConvTranspose2d weight (Cin, Cout, kh, kw) -> (kh * kw * Cout, Cin), rows (di, dj, o)."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])


def conv_transpose(conv: nn.ConvTranspose2d, x: Tensor) -> Tensor:
    """conv(x) for a transposed conv whose kernel equals its stride (the reassembly's x4 and
    x2 upsampling): each input pixel writes its own kh x kw block, so it is one matmul of
    the pixels by the weight and a copy into place (channels-last out), ~2x faster than
    oneDNN's deconvolution. Falls back to the module where it does not fit."""
    kh, kw = conv.kernel_size
    if (type(conv) is not nn.ConvTranspose2d or tuple(conv.stride) != (kh, kw) or conv.groups != 1
            or any(conv.padding) or any(conv.output_padding) or tuple(conv.dilation) != (1, 1)
            or conv.weight.dtype != torch.float32):
        return conv(x)
    b, _, h, w = x.shape
    bias = None if conv.bias is None else conv.bias.repeat(kh * kw)
    pixels = channels_last(x).permute(0, 2, 3, 1)                          # (B, h, w, Cin)
    y = torch.ops.mkldnn._linear_pointwise(pixels, packed(conv.weight, _transpose_matrix), bias, "none", [], "none")
    y = y.reshape(b, h, w, kh, kw, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h * kh, w * kw, -1)
    return y.permute(0, 3, 1, 2)


def _patch_matrix(weight: Tensor) -> Tensor:
    """Patch conv weight (C, 3, p, p) -> (C, 3 * p * p)."""
    return weight.reshape(weight.shape[0], -1)


def patch_tokens(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The patch embedding as tokens: conv(x) (kernel = stride = the patch size) flattened
    to (B, gh * gw, C). On the fast path the patches are cut out with one copy and go
    through one matmul on the packed weight (~1.5x faster than oneDNN's strided conv)."""
    ph, pw = conv.kernel_size
    if (not active(x, conv) or tuple(conv.stride) != (ph, pw) or any(conv.padding) or conv.groups != 1
            or tuple(conv.dilation) != (1, 1) or not _plain_conv(conv)):
        return conv(x).flatten(2).transpose(1, 2)
    b, c, h, w = x.shape
    gh, gw = h // ph, w // pw
    patches = x[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, gh * gw, c * ph * pw)
    return torch.ops.mkldnn._linear_pointwise(patches, packed(conv.weight, _patch_matrix), conv.bias,
                                              "none", [], "none")


# id(weight) -> (weakref to the weight, (version, data_ptr) when packed, {layout: (packed copy, bytes)})
_packs: dict[int, tuple[weakref.ref, tuple[int, int], dict]] = {}
_packs_lock = threading.RLock()    # re-entrant: a weakref callback may run inside it
_packed_bytes = 0       # held in packed copies, all models together (see PACK_LIMIT_BYTES)


def packed_bytes() -> int:
    """Bytes held in packed weight copies now, process-wide."""
    return _packed_bytes


def _packed(weight: Tensor, layout: tuple, make) -> Optional[Tensor]:
    """make(weight) (a oneDNN-blocked copy for `layout`), made once and reused; remade if
    the weight is changed in place (PyTorch's version counter) or given new storage.
    Edits that bypass the counter (through `weight.data`, or to an inference tensor inside
    inference_mode) are not seen: call `release` after them. The copies go with the
    weight (or with `release`). None (use the weight as it is) while another thread is
    making the copy, or when it would take the packed copies past PACK_LIMIT_BYTES."""
    global _packed_bytes
    # an inference tensor has no version counter; it cannot change outside inference_mode
    key, stamp = id(weight), (-1 if weight.is_inference() else weight._version, weight.data_ptr())
    size = weight.numel() * weight.element_size()
    with _packs_lock:
        hit = _packs.get(key)
        if hit is None or hit[0]() is not weight or hit[1] != stamp:
            _drop(key)
            hit = _packs[key] = (weakref.ref(weight, lambda ref, key=key: _drop(key, ref)), stamp, {})
        copy = hit[2].get(layout)
        if copy is not None:
            return copy[0]
        if _packed_bytes + size > PACK_LIMIT_BYTES:
            return None
        _packed_bytes += size
        hit[2][layout] = (None, size)                 # reserved: made outside the lock
    blocked = make(weight.detach())
    with _packs_lock:
        if _packs.get(key) is hit:                    # (not dropped meanwhile: that freed the bytes)
            hit[2][layout] = (blocked, size)
    return blocked


def _drop(key: int, ref: Optional[weakref.ref] = None) -> None:
    """Forget the packed copies of the weight with this id (if `ref` is given: only if the
    entry is still that weight's, as its weakref callback)."""
    global _packed_bytes
    with _packs_lock:
        hit = _packs.get(key)
        if hit is None or (ref is not None and hit[0] is not ref):
            return
        del _packs[key]
        _packed_bytes -= sum(size for _, size in hit[2].values())


def packed(weight: Tensor, as_linear=None) -> Tensor:
    """A linear weight (out x in, float32, CPU) in oneDNN's blocked layout for
    _linear_pointwise (see `_packed`). `as_linear(weight)`, if given, first turns another
    layer's weight into that out x in matrix."""
    blocked = None
    if PACK_WEIGHTS and _pack.get():
        blocked = _packed(weight, ("linear", as_linear), lambda w: torch.ops.mkldnn._reorder_linear_weight(
            (w if as_linear is None else as_linear(w)).contiguous(), None))
    if blocked is None:
        return weight if as_linear is None else as_linear(weight)
    return blocked


def _conv_weight(conv: nn.Conv2d, pad: list) -> Tensor:
    """The conv's weight in oneDNN's blocked layout for these padding/stride/dilation/groups
    (for a large weight, reordering it on every call is a large part of the conv's time:
    about a third for 384 -> 384 3x3 at 19 x 19)."""
    if not (PACK_WEIGHTS and _pack.get()):
        return conv.weight
    args = (list(pad), list(conv.stride), list(conv.dilation), conv.groups)
    blocked = _packed(conv.weight, ("conv", repr(args)), lambda w: torch.ops.mkldnn._reorder_convolution_weight(
        w.contiguous(), *args, None))
    return conv.weight if blocked is None else blocked


def release(module: nn.Module) -> None:
    """Drop the packed copies of `module`'s weights: after editing them through `.data`,
    or when the model moves off the CPU or changes dtype (the copies would only hold
    memory; DepthModel does this itself on .to() / .cuda() / .half())."""
    for p in module.parameters():
        _drop(id(p))

