"""dpt_lab.families: every declared family x size builds with random weights, holds the
keys and shapes load_model builds from that family's checkpoint, and runs."""

from __future__ import annotations

import pytest
import torch
from fixtures import FixtureModels

import dpt_lab
from dpt_lab import architectures as A
from dpt_lab import families as F
from dpt_lab import session as S
from dpt_lab import weights as W

# fixture stem for each architecture that has one (the official sizes the fixtures copy)
FIXTURE_FOR = {
    ("depth_anything_v2", "vits", 518): "depth_anything_v2_vits",
    ("depth_anything_v2", "vitb", 518): "depth_anything_v2_vitb",
    ("depth_anything_v2", "vitl", 518): "depth_anything_v2_vitl",
    ("depth_anything_v1", "vits", 518): "depth_anything_v1_vits",
    ("depth_anything_v2_metric", "vits", 518): "depth_anything_v2_metric_vits",
    ("midas_beit", "beit_base", 384): "dpt_beit_base_384",
    ("midas_swin2", "swin2_tiny", 256): "dpt_swin2_tiny_256",
}
# two small inputs per encoder, multiples of its tile (14, 16, 32)
INPUTS = {"dinov2": ((70, 98), (98, 126)), "beit": ((64, 96), (96, 128)), "swin2": ((128, 128), (96, 160))}
INFO_FIELDS = ("family", "size", "patch_size", "tile", "base_size", "multiple", "resize_rule", "depth_resize", "mean",
               "std", "num_blocks", "num_heads", "tap_blocks", "has_cls", "metric", "max_depth", "width", "native_grid",
               "window_sizes")
# ViT-G (1.1 B parameters, about 4.5 GB of float32) is checked on the meta device only
TOO_BIG = {("depth_anything_v2", "vitg")}
RUNNABLE = [a for a in F.architectures() if a[:2] not in TOO_BIG]


def arch_id(arch) -> str:
    return "-".join(map(str, arch))


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    return FixtureModels(checkpoint_dir)


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", sorted(FIXTURE_FOR), ids=arch_id)
def test_build_has_the_checkpoints_keys_shapes_and_info(arch, models):
    family, size, native = arch
    built = dpt_lab.build(family, size, seed=1, native_size=native)
    loaded = models(FIXTURE_FOR[arch])
    assert shapes(built) == shapes(loaded)
    for name in INFO_FIELDS:
        assert getattr(built.info, name) == getattr(loaded.info, name), name


def test_every_fixture_architecture_is_declared():
    assert set(FIXTURE_FOR) <= set(F.architectures())


@pytest.mark.parametrize("arch", RUNNABLE, ids=arch_id)
def test_every_architecture_builds_and_runs(arch):
    family, size, native = arch
    model = dpt_lab.build(family, size, seed=0, native_size=native)
    spec = F.FAMILY_SPECS[family]
    assert (model.info.family, model.info.size, model.info.base_size) == (family, size, native)
    assert model.info.metric == spec.metric
    for h, w in INPUTS[spec.encoder]:
        assert h % model.info.tile == 0 and w % model.info.tile == 0
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h + w))
        with torch.no_grad():
            depth = model(x)
        assert depth.shape == (1, h, w)
        assert torch.isfinite(depth).all()
        assert depth.std() > 0   # the positive output bias keeps the final ReLU from flattening it


def test_giant_is_declared_with_its_shapes():
    from dpt_lab.layouts import depth_anything

    cfg, dec, info = A.configs("depth_anything_v2", "vitg")
    with torch.device("meta"):
        model = depth_anything.network(cfg, dec, info)
    s = shapes(model)
    assert s["encoder.blocks.39.mlp.w12.weight"] == (8192, 1536)
    assert s["encoder.pos_embed"] == (1, 1370, 1536)
    assert s["decoder.layer_rn.0.weight"] == (384, 1536, 3, 3)
    assert info.tap_blocks == (9, 19, 29, 39) and info.num_heads == [24] * 40


def test_build_is_reproducible_and_seeded():
    a, b = dpt_lab.build("v2", "vits", seed=5), dpt_lab.build("depth_anything_v2", "vits", seed=5)
    c = dpt_lab.build("depth_anything_v2", "vits", seed=6)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.state_dict()["encoder.pos_embed"], c.state_dict()["encoder.pos_embed"])


def test_random_model_is_the_v2_small_build():
    random, built = S.build_random_model(2), dpt_lab.build("depth_anything_v2", "vits", seed=2)
    assert all(torch.equal(v, built.state_dict()[k]) for k, v in random.state_dict().items())
    assert random.info.name == S.RANDOM_MODEL and random.info.source == "random weights (untrained)"
    assert random.info.notes == ["untrained: random weights, the outputs mean nothing"]


def test_unknown_family_size_or_native_size_is_refused():
    with pytest.raises(KeyError, match="unknown family"):
        A.configs("midas_vit", "vits")
    with pytest.raises(KeyError, match="no size"):
        A.configs("midas_beit", "vits")
    with pytest.raises(KeyError, match="native size"):
        A.configs("midas_beit", "beit_base", native_size=512)


def test_registry_and_layouts_agree_with_the_specs():
    from dpt_lab.layouts import base, beit, depth_anything, swin2

    for m in W.KNOWN_MODELS.values():
        spec = F.FAMILY_SPECS[m.family]
        assert m.native_size in spec.size(m.size).native_sizes, m.name
        assert m.metric == spec.metric, m.name
    assert set(W.FAMILIES) == set(F.FAMILIES) == set(base.FAMILIES)
    assert base.normalize_family("swinv2") == "midas_swin2" and base.normalize_family("da1") == "depth_anything_v1"
    assert depth_anything.SIZE_BY_WIDTH == {384: "vits", 768: "vitb", 1024: "vitl", 1536: "vitg"}
    assert beit.SIZE_BY_WIDTH == {768: "beit_base", 1024: "beit_large"}
    assert swin2.OFFICIAL == {96: (16, 256, (0, 0, 0, 0)), 128: (24, 384, (12, 12, 12, 6)),
                              192: (24, 384, (12, 12, 12, 6))}


def test_families_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, dpt_lab.families; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
