"""DPT Lab: look inside Dense Prediction Transformer depth models."""

from .errors import CheckpointError, DPTLabError

__all__ = ["load_model", "build", "CheckpointError", "DPTLabError", "DepthModel", "ModelInfo", "EncoderFeatures", "Record"]
__version__ = "0.1.0"

# The names below import torch; they load on first use (PEP 562), so `import dpt_lab`
# (and light modules such as dpt_lab.weights or dpt_lab.session) stays fast, e.g. for the
# web app's startup. `from dpt_lab import load_model, Record` works as before.
_LAZY = {
    "load_model": ".checkpoints",
    "build": ".architectures",
    "EncoderFeatures": ".encoders.base",
    "Record": ".encoders.base",
    "DepthModel": ".model",
    "ModelInfo": ".model",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
