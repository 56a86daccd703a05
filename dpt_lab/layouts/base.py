"""What every family's layouts share: the checkpoint types, the family names, and the key
helpers (renaming by rules, completeness checks, assembling a model on the meta device,
and the renumberings the original and -hf layouts have in common). Imported by
checkpoints.py and by each layout module; it imports neither."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..families import FAMILIES, FAMILY_ALIASES  # noqa: F401 - declared once, in families.py


@dataclass
class RawCheckpoint:
    state: dict[str, Tensor]
    config: Optional[dict]      # config.json of an -hf folder
    path: Path
    name: str                   # file or folder name, lower case (official names carry meaning)


@dataclass
class LoadHints:
    """What the caller said, beside the tensors."""

    family: Optional[str] = None
    max_depth: Optional[float] = None


@dataclass
class Layout:
    name: str                                   # e.g. "Depth-Anything original (.pth)"
    signature: tuple[str, ...]                  # keys whose presence identifies it (for messages too)
    build: Callable[[RawCheckpoint, LoadHints], "object"]
    requires: tuple[str, ...] = field(default=())

    def matches(self, state: dict) -> bool:
        return all(k in state for k in self.signature)


def normalize_family(family: Optional[str]) -> Optional[str]:
    if family is None:
        return None
    key = family.strip().lower().replace("-", "_")
    key = FAMILY_ALIASES.get(key, key)
    if key not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return key


# -- key helpers --------------------------------------------------------------------
def few(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def rename_keys(state: dict[str, Tensor], rules: list[tuple[str, str]], ignore: Iterable[str],
                layout: str) -> dict[str, Tensor]:
    """Map checkpoint keys to DPT Lab's module names with ordered (regex, template) rules.
    Keys matching `ignore` (classifier heads and the like) are dropped; any other key no
    rule knows is an error, never silently skipped."""
    compiled = [(re.compile(p), r) for p, r in rules]
    ignored = [re.compile(p) for p in ignore]
    out, unexpected = {}, []
    for key, value in state.items():
        if any(p.fullmatch(key) for p in ignored):
            continue
        for pattern, template in compiled:
            m = pattern.fullmatch(key)
            if m:
                out[m.expand(template)] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{layout}: unexpected keys {few(unexpected)}")
    return out


def require(state: dict, key: str, layout: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{layout}: missing key {key}")
    return state[key]


def check_complete(state: dict, expected: list[str], layout: str) -> None:
    """Name, in the checkpoint's own terms, every key the layout needs and the file lacks."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{layout}: missing keys {few(missing)}")


def check_family(hints: LoadHints, family: str, layout: str) -> None:
    """An explicit family= that contradicts the file's layout is an error, not a hint."""
    if hints.family is not None and hints.family != family:
        raise CheckpointError(f"family {hints.family!r} was asked for, but the file has the {layout} layout")


def count_indexed(state: dict, pattern: str) -> int:
    """Number of distinct integers captured by `pattern` (a regex with one group) over the keys."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := rx.fullmatch(k))}
    if found and found != set(range(max(found) + 1)):
        raise CheckpointError(f"missing keys: indices {sorted(set(range(max(found) + 1)) - found)[:5]} of {pattern}")
    return len(found)


def assemble(model_factory: Callable[[], torch.nn.Module], state: dict[str, Tensor], layout: str):
    """Build the model on the meta device and assign the checkpoint's tensors into it,
    checking that keys and shapes agree exactly."""
    with torch.device("meta"):
        model = model_factory()
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing:
        raise CheckpointError(f"{layout}: missing keys {few(missing)}")
    if unexpected:
        raise CheckpointError(f"{layout}: unexpected keys {few(unexpected)}")
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if state[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{layout}: shape mismatch (checkpoint vs model): {'; '.join(mismatched[:3])}")
    state = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{layout}: model tensors left unset: {leftover[:3]}")
    model.requires_grad_(False)
    return model.eval()


# -- renumberings shared by the families' layouts ---------------------------------------
def shift_one_based(state: dict, patterns: tuple[str, ...]) -> dict:
    """The original names number layer_rn / refinenet from 1; DPT Lab's lists from 0."""
    out = {}
    for key, value in state.items():
        for prefix in patterns:
            m = re.match(rf"({re.escape(prefix)})(\d+)(\..*)", key)
            if m:
                key = f"{m.group(1)}{int(m.group(2)) - 1}{m.group(3)}"
                break
        out[key] = value
    return out


def merge_qkv(state: dict, layout: str) -> dict:
    """-hf checkpoints store query, key and value apart; DPT Lab uses one qkv matrix."""
    out, parts = {}, {}
    for key, value in state.items():
        if key.startswith("qkv."):
            _, block, which, kind = key.split(".")
            parts.setdefault((block, kind), {})[which] = value
        else:
            out[key] = value
    for (block, kind), p in parts.items():
        if set(p) != {"query", "key", "value"}:
            raise CheckpointError(f"{layout}: block {block} lacks one of query/key/value {kind}")
        out[f"encoder.blocks.{block}.attn.qkv.{kind}"] = torch.cat([p["query"], p["key"], p["value"]], dim=0)
    return out


def unsupported_dpt_head(config: dict) -> list[str]:
    """The DPTConfig (MiDaS -hf) options the shared decoder does not implement, as set in
    `config` (their defaults are what it implements)."""
    unsupported = []
    if config.get("add_projection"):
        unsupported.append("add_projection=true")
    if config.get("head_in_index", -1) not in (-1, 3):
        unsupported.append(f"head_in_index={config['head_in_index']}")
    if config.get("use_batch_norm_in_fusion_residual"):
        unsupported.append("use_batch_norm_in_fusion_residual=true")
    if config.get("neck_ignore_stages"):
        unsupported.append(f"neck_ignore_stages={config['neck_ignore_stages']}")
    return unsupported


def reverse_fusion(state: dict) -> dict:
    """-hf numbers fusion layers coarse to fine (layers.0 is the coarsest); DPT Lab fine to coarse."""
    out = {}
    for key, value in state.items():
        m = re.match(r"fusion\.(\d)\.(.*)", key)
        out[f"decoder.fusion.{3 - int(m.group(1))}.{m.group(2)}" if m else key] = value
    return out
