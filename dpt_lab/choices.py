"""The choices the user picks from (colormaps, fusion factors: labels, range, presets).

Plain data without torch, so that the app can build and serve its page before torch
loads; imaging.py, fusion.py and session.py all take them from here.
"""

from __future__ import annotations

COLORMAPS = ("turbo", "viridis", "inferno", "magma", "plasma", "spectral", "gray")

# fusion factor i multiplies the map entering fusion block i (fusion.py)
FUSION_LABELS = (
    "1 · finest (4x patch grid): detail",
    "2 · fine (2x patch grid)",
    "3 · coarse (patch grid)",
    "4 · coarsest (1/2 patch grid): layout",
)
FUSION_MIN, FUSION_MAX = -5.0, 5.0
FUSION_IDENTITY = (1.0, 1.0, 1.0, 1.0)
FUSION_PRESETS = {
    "reset": FUSION_IDENTITY,
    **{f"solo {i + 1}": tuple(1.0 if j == i else 0.0 for j in range(4)) for i in range(4)},
    **{f"drop {i + 1}": tuple(0.0 if j == i else 1.0 for j in range(4)) for i in range(4)},
}


# -- device and precision (checked here without torch; resolved by precision.py) ------------------
DTYPES = ("float32", "float16", "bfloat16")


def check_dtype(dtype) -> "str | None":
    """None for float32 (None, "float32", torch.float32), else "float16" / "bfloat16"."""
    from .errors import DPTLabError

    key = "float32" if dtype is None else str(dtype).strip().lower().replace("torch.", "")
    key = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "": "float32"}.get(key, key)
    if key not in DTYPES:
        raise DPTLabError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return None if key == "float32" else key


def check_device(device) -> str:
    """The device's name as asked ("auto" for None): auto, cpu, cuda, cuda:N or mps."""
    import re

    from .errors import DPTLabError

    key = "auto" if device is None else str(device).strip().lower() or "auto"
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", key):
        raise DPTLabError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return key
