"""MiDaS 3.1 BEiT: the -hf layout against transformers (output, attention, token norms),
the relative position index and bias resizing, and bad checkpoints.

The original .pt layout against the ORIGINAL MiDaS code is test_parity.py's
dpt_beit_base_384 case (256 x 384 input: grid 16 x 24, not the native 24 x 24)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import DATA, fixture

import dpt_lab
from dpt_lab import CheckpointError, Record
from dpt_lab.encoders.beit import relative_position_index, resize_table

transformers = pytest.importorskip("transformers")

NATIVE = 64   # the tiny -hf model's training size: a 4 x 4 window


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (HF init leaves the bias tables and biases at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "relative_position_bias_table" in name:
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "lambda" in name:
                p.copy_(0.2 + 0.05 * noise)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def beit_hf(folder, *, layers=5, out_indices=(2, 3, 4, 5), seed=0):
    """A tiny random DPT-BEiT saved with save_pretrained, configured as Intel's
    dpt-beit-* (relative position bias per block, readout "project", no head projection)."""
    backbone = transformers.BeitConfig(
        image_size=NATIVE, patch_size=16, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=128, use_relative_position_bias=True, use_absolute_position_embeddings=False,
        reshape_hidden_states=False, out_indices=list(out_indices), layer_scale_init_value=0.1,
    )
    config = transformers.DPTConfig(
        backbone_config=backbone, neck_hidden_sizes=[16, 32, 64, 64], reassemble_hidden_size=64,
        fusion_hidden_size=32, readout_type="project", head_in_index=-1, add_projection=False,
    )
    torch.manual_seed(seed)
    model = randomize(transformers.DPTForDepthEstimation(config), seed)
    model.save_pretrained(folder)
    return transformers.DPTForDepthEstimation.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("beit") / "dpt-beit-tiny"
    reference = beit_hf(folder)
    return dpt_lab.load_model(folder), reference, folder


def close(ours, theirs, tol=1e-4):
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= tol * theirs.abs().max().item(), f"max abs error {err:.3g} vs max {theirs.abs().max():.3g}"


# transformers' DPT-BEiT resizes the bias table exactly as MiDaS (bilinear, align_corners
# False, three extra rows kept), so the two agree at any size whose grid is even. (At an
# odd grid, e.g. 80 px, transformers' fusion stage upsamples the coarsest map by 2 and
# overshoots by one row; MiDaS, and DPT Lab, resize to the next map's size instead.)
@pytest.mark.parametrize("size", [(NATIVE, NATIVE), (96, 128), (128, 64)])
def test_hf_folder_matches_transformers(hf_pair, size):
    model, reference, _ = hf_pair
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        close(model(x), reference(pixel_values=x).predicted_depth)


def test_hf_info(hf_pair):
    model, _, _ = hf_pair
    info = model.info
    assert (info.family, info.layout, info.has_cls) == ("midas_beit", "hf", True)
    assert info.tap_blocks == (1, 2, 3, 4)          # out_indices (2, 3, 4, 5): stage k is block k-1
    assert info.native_grid == (4, 4) and info.num_heads == [4] * 5 and info.num_blocks == 5
    assert (info.tile, info.multiple, info.resize_rule, info.depth_resize) == (16, 32, "minimal", "bicubic")
    assert info.mean == info.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("size", [(NATIVE, NATIVE), (96, 128)])
def test_attention_and_norm_records_match_transformers(hf_pair, size):
    model, reference, _ = hf_pair
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        feats = model.encode(x, Record(norms=True, attention=True))
        out = reference(pixel_values=x, output_attentions=True, output_hidden_states=True)
        depth = model.decode(feats)
    close(depth, out.predicted_depth)
    n = size[0] // 16 * size[1] // 16 + 1
    assert len(feats.blocks) == len(out.attentions) == 5
    for b, rec in enumerate(feats.blocks):
        assert rec.grid == (size[0] // 16, size[1] // 16) and rec.has_cls
        assert rec.q.shape == rec.k.shape == (1, 4, n, 16)
        assert rec.rel_index.shape == (n, n) and rec.rel_index.dtype == torch.long
        assert rec.rel_table.shape == ((2 * rec.grid[0] - 1) * (2 * rec.grid[1] - 1) + 3, 4)
        bias = rec.rel_table[rec.rel_index].permute(2, 0, 1)
        probs = torch.softmax(rec.q @ rec.k.transpose(-1, -2) * rec.scale + bias, dim=-1)
        assert (probs - out.attentions[b]).abs().max() <= 1e-4
        close(rec.token_norms, out.hidden_states[b + 1].norm(dim=-1))


def test_plain_and_recorded_paths_agree(hf_pair):
    """The cached, no-record path and the recording path give the same depth, at two grids
    in turn (each grid has its own cached bias tables)."""
    model, _, _ = hf_pair
    for size in [(96, 128), (NATIVE, NATIVE), (96, 128)]:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            plain = model(x)
            recorded = model.decode(model.encode(x, Record(attention=True, norms=True)))
        assert torch.allclose(plain, recorded, atol=1e-6)
    with torch.no_grad():       # not inference mode: the cache keeps the two apart
        assert torch.allclose(model(x), plain, atol=1e-6)


def test_relative_position_index_is_timm_s():
    """The original checkpoint's buffer (24 x 24 window): CLS->token, token->CLS, CLS->CLS
    are the table's last three rows in that order."""
    buffer = np.load(DATA / "dpt_beit_base_384.npz")["buffer/pretrained.model.blocks.0.attn.relative_position_index"]
    index = relative_position_index((24, 24))
    assert torch.equal(index, torch.from_numpy(buffer).long())
    assert index[0, 1] == 2209 and index[1, 0] == 2210 and index[0, 0] == 2211


def test_resize_table_keeps_extra_rows_and_native_is_identity():
    table = torch.randn(7 * 7 + 3, 2)
    assert resize_table(table, (4, 4), (4, 4)) is table
    wide = resize_table(table, (4, 4), (3, 6))
    assert wide.shape == (5 * 11 + 3, 2)
    assert torch.equal(wide[-3:], table[-3:])


@pytest.fixture(scope="module")
def original_state():
    state, _, _ = fixture("dpt_beit_base_384")
    return state


def test_original_missing_key_is_named(original_state, tmp_path):
    state = dict(original_state)
    del state["pretrained.model.blocks.7.attn.v_bias"]
    torch.save(state, tmp_path / "dpt_beit_base_384.pt")
    with pytest.raises(CheckpointError, match=r"missing key.*pretrained\.model\.blocks\.7\.attn\.v_bias"):
        dpt_lab.load_model(tmp_path / "dpt_beit_base_384.pt")


def test_original_shape_mismatch(original_state, tmp_path):
    state = dict(original_state)
    state["pretrained.model.blocks.4.mlp.fc2.bias"] = torch.zeros(700)
    torch.save(state, tmp_path / "dpt_beit_base_384.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        dpt_lab.load_model(tmp_path / "dpt_beit_base_384.pt")


def test_original_bad_index_buffer(original_state, tmp_path):
    state = dict(original_state)
    state["pretrained.model.blocks.3.attn.relative_position_index"] = torch.zeros(577, 577, dtype=torch.long)
    torch.save(state, tmp_path / "dpt_beit_base_384.pt")
    with pytest.raises(CheckpointError, match=r"blocks\.3\.attn\.relative_position_index"):
        dpt_lab.load_model(tmp_path / "dpt_beit_base_384.pt")


def test_hf_missing_key_is_named(hf_pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, folder = hf_pair
    state = load_file(str(folder / "model.safetensors"))
    key = "backbone.encoder.layer.2.attention.attention.key.weight"
    del state[key]
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(state, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        dpt_lab.load_model(broken)


def test_family_argument_must_agree(hf_pair):
    _, _, folder = hf_pair
    with pytest.raises(CheckpointError, match="midas_beit|BEiT"):
        dpt_lab.load_model(folder, family="depth_anything_v2")
    assert dpt_lab.load_model(folder, family="beit").info.family == "midas_beit"
