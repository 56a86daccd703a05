"""Deterministic random checkpoints in the original layouts, rebuilt from the key lists in
tests/data (copied from the parity fixtures) by the weight recipe of their README:

each `param` tensor is drawn from torch.Generator(seed * 1_000_003 + crc32(key)) as
standard normal noise, then scaled by the first rule that fits its key; each `buffer`
takes its exact value from the .npz.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data"

# fixture stem -> the official file name it stands for
OFFICIAL_NAMES = {
    "depth_anything_v2_vits": "depth_anything_v2_vits.pth",
    "depth_anything_v2_vitb": "depth_anything_v2_vitb.pth",
    "depth_anything_v2_vitl": "depth_anything_v2_vitl.pth",
    "depth_anything_v1_vits": "depth_anything_vits14.pth",
    "depth_anything_v2_metric_vits": "depth_anything_v2_metric_hypersim_vits.pth",
    "dpt_beit_base_384": "dpt_beit_base_384.pt",
    "dpt_swin2_tiny_256": "dpt_swin2_tiny_256.pt",
}
SCALE_GAMMAS = ("gamma", "gamma_1", "gamma_2", "lambda1", "lambda2")
SMALL_TOKENS = ("pos_embed", "cls_token", "mask_token", "register_tokens")


def key_rows(stem: str):
    for line in (DATA / f"{stem}.keys.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, kind = line.split("\t")
            yield key, tuple(int(d) for d in shape.split("x")) if shape else (), kind


def recipe_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "logit_scale":
        return math.log(10.0) + 0.1 * noise
    if leaf in SCALE_GAMMAS:
        return 0.2 + 0.05 * noise
    if "relative_position_bias_table" in key:
        return 0.5 * noise
    if leaf in SMALL_TOKENS:
        return 0.1 * noise
    if len(shape) >= 2:
        return noise / math.sqrt(math.prod(shape[1:]))
    if leaf == "weight":
        return 1.0 + 0.1 * noise
    return 0.1 * noise


def fixture(stem: str):
    """(state_dict, input, expected) of one parity fixture."""
    npz = np.load(DATA / f"{stem}.npz")
    seed = int(npz["seed"])
    state = {}
    for key, shape, kind in key_rows(stem):
        state[key] = torch.from_numpy(np.array(npz["buffer/" + key])) if kind == "buffer" else recipe_tensor(key, shape, seed)
    return state, torch.from_numpy(npz["input"]), torch.from_numpy(npz["expected"])


def save_fixture_checkpoint(stem: str, folder: Path) -> Path:
    """Write the fixture's checkpoint under its official file name; return the path."""
    state, _, _ = fixture(stem)
    path = Path(folder) / OFFICIAL_NAMES[stem]
    torch.save(state, path)
    return path


# a small valid input per family (multiples of its tile; small keeps the tests fast)
SMALL_SIZES = {"depth_anything": (98, 126), "dpt_beit": (96, 128), "dpt_swin2": (128, 128)}


def small_input(stem: str, batch: int = 1) -> torch.Tensor:
    size = next(v for k, v in SMALL_SIZES.items() if stem.startswith(k))
    return torch.randn((batch, 3) + size, generator=torch.Generator().manual_seed(len(stem)))


class FixtureModels:
    """stem -> dpt_lab.load_model of that fixture's checkpoint (saved under its official
    name in `folder` unless already there: the conftest's session-wide `checkpoint_dir`
    lets modules share the files), loaded on first use and kept. One per test module: its
    tests may change their models, never the files."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._loaded = {}

    def __call__(self, stem: str):
        import dpt_lab

        if stem not in self._loaded:
            self._loaded[stem] = dpt_lab.load_model(fixture_checkpoint(stem, self.folder))
        return self._loaded[stem]


def fixture_checkpoint(stem: str, folder: Path) -> Path:
    """The fixture's checkpoint under its official name in `folder`, written if not there."""
    path = Path(folder) / OFFICIAL_NAMES[stem]
    return path if path.exists() else save_fixture_checkpoint(stem, folder)
