"""ZeroGPU (Hugging Face Spaces): the functions that run a model ask for a GPU for their call.

On a ZeroGPU Space (the `spaces` package imports and SPACES_ZERO_GPU is set) a GPU is attached
only inside functions decorated with `@spaces.GPU(duration=...)`, for at most that many
seconds, and such a call may run outside the main process. `on_gpu(kind)` is that decorator
there and nothing anywhere else. session.py decorates the few functions that run a model (the
recorded encode, a scaled decode, the ablation's re-run, the ONNX export), each with the time
its work needs (DURATIONS), once at import. They take and return CPU data there
(`keep_on_cpu()`): the session's recorded encode lives in the main process, on the CPU, so
rows, norms, lenses and masks are computed there without a GPU, and the next click finds it.
Models are moved with `.to("cuda")` in the main process, which `spaces` defers until a
decorated call. `spaces` is optional: without it, or off ZeroGPU, nothing changes and nothing
is imported.
"""

from __future__ import annotations

import functools
import os

# seconds a call may hold the GPU: an encode at a large base size, a decode, a partial re-run, an export
DURATIONS = {"encode": 60, "decode": 30, "ablation": 60, "export": 180}


def _zero_gpu_env() -> bool:
    return (os.environ.get("SPACES_ZERO_GPU") or "").strip().lower() in ("1", "true", "yes")


if _zero_gpu_env():      # spaces patches torch: import it before anything imports torch
    try:
        import spaces  # noqa: F401
    except ImportError:
        pass


def on_zero_gpu() -> bool:
    """A ZeroGPU Space with the `spaces` package."""
    if not _zero_gpu_env():
        return False
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def on_gpu(kind: str):
    """@spaces.GPU(duration=DURATIONS[kind]) on ZeroGPU, else the function itself."""
    seconds = DURATIONS[kind]

    def wrap(fn):
        if not on_zero_gpu():
            return fn
        import spaces

        wrapped = spaces.GPU(duration=seconds)(fn)
        functools.update_wrapper(wrapped, fn)
        return wrapped

    return wrap


def startup_device(device: str) -> str:
    """The device to load models on: "cuda" on ZeroGPU for "auto" (spaces defers the move), else as asked."""
    if on_zero_gpu() and str(device or "auto").strip().lower() == "auto":
        return "cuda"
    return device


def keep_on_cpu() -> bool:
    """Whether model inputs and results stay on the CPU between calls (ZeroGPU: the GPU detaches)."""
    return on_zero_gpu()


def describe() -> str:
    return " · ZeroGPU: model calls run under @spaces.GPU" if on_zero_gpu() else ""
