"""Every family reproduces what the ORIGINAL implementation returned (tests/data, made by
running the original Depth-Anything and MiDaS code) through load_model on a file saved
under its official name."""

import pytest
import torch
from fixtures import OFFICIAL_NAMES, fixture, fixture_checkpoint, save_fixture_checkpoint

import dpt_lab

EXPECTED_FAMILY = {
    "depth_anything_v2_vits": ("depth_anything_v2", "vits", (2, 5, 8, 11)),
    "depth_anything_v2_vitb": ("depth_anything_v2", "vitb", (2, 5, 8, 11)),
    "depth_anything_v2_vitl": ("depth_anything_v2", "vitl", (4, 11, 17, 23)),
    "depth_anything_v1_vits": ("depth_anything_v1", "vits", (8, 9, 10, 11)),
    "depth_anything_v2_metric_vits": ("depth_anything_v2_metric", "vits", (2, 5, 8, 11)),
    "dpt_beit_base_384": ("midas_beit", "beit_base", (2, 5, 8, 11)),
    "dpt_swin2_tiny_256": ("midas_swin2", "swin2_tiny", None),
}


@pytest.mark.parametrize("stem", sorted(OFFICIAL_NAMES))
def test_original_output_reproduced(stem, checkpoint_dir):
    model = dpt_lab.load_model(fixture_checkpoint(stem, checkpoint_dir))
    _, x, expected = fixture(stem)
    with torch.inference_mode():
        got = model(x)
    assert got.shape == expected.shape
    err = (got - expected).abs().max().item()
    assert err <= 1e-4 * expected.abs().max().item(), f"max abs error {err:.3g} vs max {expected.abs().max():.3g}"
    family, size, taps = EXPECTED_FAMILY[stem]
    assert (model.info.family, model.info.size) == (family, size)
    if taps is not None:
        assert model.info.tap_blocks == taps


def test_metric_max_depth_from_name_and_argument(tmp_path):
    path = save_fixture_checkpoint("depth_anything_v2_metric_vits", tmp_path)
    assert dpt_lab.load_model(path).info.max_depth == 20.0
    vkitti = path.with_name("depth_anything_v2_metric_vkitti_vits.pth")
    path.rename(vkitti)
    model = dpt_lab.load_model(vkitti)
    assert model.info.metric and model.info.max_depth == 80.0
    _, x, expected = fixture("depth_anything_v2_metric_vits")
    with torch.inference_mode():
        assert torch.allclose(model(x), expected * 4, atol=4e-4 * expected.abs().max())
    model = dpt_lab.load_model(vkitti, max_depth=20)
    assert model.info.max_depth == 20.0


def test_family_argument_overrides_file_name(tmp_path):
    """v1 and v2 have identical keys: the explicit family decides the tap blocks."""
    path = save_fixture_checkpoint("depth_anything_v1_vits", tmp_path)
    generic = path.with_name("my_model.pth")
    path.rename(generic)
    assumed = dpt_lab.load_model(generic)
    assert assumed.info.family == "depth_anything_v2" and assumed.info.notes
    model = dpt_lab.load_model(generic, family="depth_anything_v1")
    assert model.info.tap_blocks == (8, 9, 10, 11)
    _, x, expected = fixture("depth_anything_v1_vits")
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=1e-4 * expected.abs().max())
