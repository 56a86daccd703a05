"""Depth-Anything -hf folders (transformers' layout) load and match transformers' output."""

import pytest
import torch

import dpt_lab

pytest.importorskip("transformers")
from hf_reference import depth_anything_hf  # noqa: E402


def compare(model, reference, x):
    with torch.inference_mode():
        ours = model(x)
        theirs = reference(pixel_values=x).predicted_depth
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


# transformers resizes the position table with an explicit output size, the original
# DINOv2 with a scale factor of (grid + 0.1) / 37; they agree only at the native grid,
# so the comparison runs there (dpt_lab keeps the original arithmetic: test_parity).
@pytest.mark.parametrize("variant", [
    dict(out_indices=(1, 2, 3, 4)),
    dict(out_indices=(1, 2, 3, 4), metric=True),
    dict(out_indices=(1, 2, 3, 4), swiglu=True),
])
def test_hf_folder_matches_transformers(tmp_path, variant):
    reference = depth_anything_hf(tmp_path / "depth-anything-hf", **variant)
    model = dpt_lab.load_model(tmp_path / "depth-anything-hf")
    assert model.info.layout == "hf"
    assert model.info.metric == variant.get("metric", False)
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    compare(model, reference, x)


@pytest.mark.parametrize("out_indices, family", [((3, 4, 5, 6), "depth_anything_v1"), ((2, 3, 5, 6), "depth_anything_v2")])
def test_hf_taps_and_version_come_from_config(tmp_path, out_indices, family):
    """v1 taps the last four blocks, v2 a spread: config.json's out_indices tells them apart."""
    reference = depth_anything_hf(tmp_path / "m", layers=6, out_indices=out_indices)
    model = dpt_lab.load_model(tmp_path / "m")
    assert model.info.family == family
    assert model.info.tap_blocks == tuple(i - 1 for i in out_indices)
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    compare(model, reference, x)
