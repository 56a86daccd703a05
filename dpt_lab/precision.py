"""Where the model runs and in what precision.

    precision.pick_device("auto")        # cuda, then mps, then cpu
    precision.check_dtype("float16")     # torch.float16 (None / "float32": full precision)
    precision.apply(model, torch.float16)

Half precision (float16, bfloat16: for GPUs; both also run on CPUs) keeps the weights in
float32 and runs encode / decode under torch.autocast: matrix products, attention and
convolutions in half precision, while the residual stream (float32 weights and adds), layer
norms, softmax and sums stay in float32, as do the norms' and attention tools' own math.
Pure float16 (model.half()) keeps the residual stream itself in float16, whose largest value
is 65504: trained ViTs carry "massive activations" (single channels of high-norm tokens in
the thousands and more), and once one passes 65504 the stream holds inf and the next
LayerNorm gives NaN depth (Depth-Anything v1 issue 49). `bench/precision.py` injects such a
token: on this CPU pure float16 stays finite up to 3e4 in one channel and gives NaN from the
next LayerNorm at 1e5, while autocast stays finite at every magnitude tried, with a depth
error against float32 of about 2e-3 (float16) and 1.6e-2 (bfloat16) of the depth's maximum.
The depth DepthModel returns is always float32.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import DPTLabError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PrecisionError(DPTLabError, ValueError):
    """A device or dtype DPT Lab cannot use here, and why."""


def pick_device(device=None) -> torch.device:
    """None / "auto": cuda if there is one, then mps, then cpu; else the device asked for
    (which must exist here)."""
    text = "auto" if device is None else str(device).strip().lower()
    if text in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise PrecisionError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrecisionError(f"--device {device}: this machine has no CUDA GPU (torch {torch.__version__}); "
                             "use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PrecisionError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    return dev


def check_dtype(dtype=None) -> Optional[torch.dtype]:
    """None for full precision (None, "float32", torch.float32), else torch.float16 / bfloat16."""
    from .choices import check_dtype as check_name

    try:
        name = check_name(dtype)
    except DPTLabError as exc:
        raise PrecisionError(str(exc)) from None
    return None if name is None else DTYPES[name]


def apply(model, dtype: Optional[torch.dtype]):
    """The model set to compute in `dtype` (None: float32) under autocast; its weights stay float32."""
    model.compute_dtype = check_dtype(dtype)
    model.info.compute_dtype = "float32" if model.compute_dtype is None else str(model.compute_dtype).split(".")[-1]
    return model
