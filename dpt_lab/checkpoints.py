"""Read a checkpoint (original .pth/.pt, .safetensors, or a Hugging Face -hf folder), find
which family's layout it has from its tensors, and turn it into a DepthModel.

Nothing in a checkpoint is executed: torch files are read with weights_only=True.
Models are built on the meta device and the (memory-mapped) tensors are assigned into
them, so loading needs about one copy of the weights.

Each family's layouts live in dpt_lab/layouts/: a Layout says how to recognise its key
signature and how to build the model (sizes from tensor shapes; what tensors cannot
tell from the file name, config.json or explicit arguments).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from .errors import CheckpointError
from .layouts import ALL_LAYOUTS
from .layouts.base import (  # noqa: F401 - the checkpoint types and helpers, importable from here as before
    FAMILIES,
    FAMILY_ALIASES,
    Layout,
    LoadHints,
    RawCheckpoint,
    assemble,
    check_complete,
    check_family,
    count_indexed,
    few,
    normalize_family,
    rename_keys,
    require,
)


# -- reading --------------------------------------------------------------------------
def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path.name}: refused to load: the file holds Python objects beyond tensors, which "
            f"could run code ({str(exc).splitlines()[-1][:160]})"
        ) from None
    except RuntimeError as exc:
        msg = str(exc)
        if "mmap" in msg:      # legacy (non-zip) torch.save format cannot be memory-mapped
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as inner:
                raise CheckpointError(f"{path.name}: refused to load: not a plain tensor file ({inner})") from None
            except Exception as inner:  # noqa: BLE001 - any failure here means unreadable
                raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint ({inner})") from None
        if "central directory" in msg or "zip archive" in msg or "PytorchStreamReader" in msg:
            raise CheckpointError(f"{path.name}: truncated or not a PyTorch checkpoint "
                                  "(the zip archive is incomplete)") from None
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint ({msg.splitlines()[0][:200]})") from None
    except (EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: truncated or not a PyTorch checkpoint ({exc})") from None


def _safetensors_load(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: truncated or not a safetensors file ({exc})") from None


def _unwrap(obj, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict", "model_state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], dict) and not isinstance(obj.get(wrapper), Tensor):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path.name}: not a checkpoint: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path.name}: not a checkpoint: non-tensor entries such as {bad[:3]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_checkpoint(source) -> RawCheckpoint:
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{source}: no such file or folder")
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path.name}: a folder must be a Hugging Face model folder with config.json")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path.name}/config.json is not valid JSON ({exc})") from None
        weights = path / "model.safetensors"
        if weights.is_file():
            state = _safetensors_load(weights)
        elif (path / "pytorch_model.bin").is_file():
            state = _unwrap(_torch_load(path / "pytorch_model.bin"), path)
        else:
            raise CheckpointError(f"{path.name}: no model.safetensors (or pytorch_model.bin) beside config.json")
        return RawCheckpoint(state, config, path, path.name.lower())
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name}: empty file, not a checkpoint")
    if path.suffix.lower() == ".safetensors":
        state = _safetensors_load(path)
    else:
        state = _unwrap(_torch_load(path), path)
    if not state:
        raise CheckpointError(f"{path.name}: holds no tensors")
    return RawCheckpoint(state, None, path, path.name.lower())


# -- mapping keys ---------------------------------------------------------------------
# -- the public entry -----------------------------------------------------------------
def layouts() -> list[Layout]:
    return ALL_LAYOUTS


def build_model(ckpt: RawCheckpoint, hints: LoadHints):
    for layout in layouts():
        if layout.matches(ckpt.state):
            return layout.build(ckpt, hints)
    sigs = "; ".join(f"{l.name}: {l.signature[0]}" for l in layouts())
    raise CheckpointError(
        f"{ckpt.path.name}: unknown layout, no known family signature found (looked for {sigs}); "
        f"first keys: {few(ckpt.state, 3)}"
    )


def load_model(source, *, family=None, max_depth=None, device=None, dtype=None, weights_dir=None, progress=None):
    """Load a depth model from an original .pth/.pt, a .safetensors file, a Hugging Face
    -hf folder, or a known model name (see dpt_lab.weights)."""
    path = Path(str(source)).expanduser()
    looks_like_path = (isinstance(source, Path) or "/" in str(source)
                       or path.suffix in (".pth", ".pt", ".safetensors", ".bin"))
    if not path.exists() and looks_like_path:
        raise CheckpointError(f"{source}: no such file or folder")
    if not path.exists():
        from . import weights

        try:
            path = weights.locate(str(source), weights_dir=weights_dir, progress=progress)
        except weights.UnknownModelError as exc:
            raise CheckpointError(str(exc)) from None
    hints = LoadHints(family=normalize_family(family), max_depth=None if max_depth is None else float(max_depth))
    model = build_model(read_checkpoint(path), hints)
    model.info.source = str(path)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
