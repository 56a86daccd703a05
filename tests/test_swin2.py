"""MiDaS 3.1 SwinV2: the original .pt (parity fixture), other input sizes, the -hf layout
against transformers (depth, per-block attention rows, token norms), bad checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F
from fixtures import fixture, save_fixture_checkpoint

import dpt_lab
from dpt_lab import CheckpointError, Record
from dpt_lab.encoders.swin2 import window_of, window_row

STEM = "dpt_swin2_tiny_256"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = save_fixture_checkpoint(STEM, tmp_path_factory.mktemp("swin2"))
    return dpt_lab.load_model(path)


def test_original_info(original):
    info = original.info
    assert (info.family, info.size, info.layout) == ("midas_swin2", "swin2_tiny", "original")
    assert info.num_blocks == 12 and info.tap_blocks == (1, 3, 9, 11)
    assert info.num_heads == [3, 3, 6, 6] + [12] * 6 + [24, 24]
    assert info.window_sizes == (16, 16, 16, 8) and info.native_grid == (64, 64)
    assert (info.base_size, info.tile, info.multiple, info.patch_size) == (256, 32, 32, 4)
    assert info.mean == info.std == (0.5, 0.5, 0.5) and not info.has_cls
    _, x, expected = fixture(STEM)
    with torch.inference_mode():
        feats = original.encode(x)
    assert [tuple(m.shape[1:]) for m in feats.maps] == [(96, 64, 64), (192, 32, 32), (384, 16, 16), (768, 8, 8)]
    assert feats.cls is None and feats.out_size == (256, 256)


@pytest.mark.parametrize("hw", [(320, 224), (192, 256), (64, 224)])
def test_other_multiples_of_32(original, hw):
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        depth = original(x)
    assert depth.shape == (1, *hw)
    assert torch.isfinite(depth).all()


def test_not_a_multiple_of_32(original):
    with pytest.raises(ValueError, match="multiples of 32"):
        original(torch.zeros(1, 3, 240, 256))


# -- bad checkpoints --------------------------------------------------------------------
def _save(state, tmp_path):
    path = tmp_path / "dpt_swin2_tiny_256.pt"
    torch.save(state, path)
    return path


def test_missing_key(tmp_path):
    state = fixture(STEM)[0]
    del state["pretrained.model.layers.2.blocks.3.attn.cpb_mlp.0.bias"]
    with pytest.raises(CheckpointError, match="missing keys.*layers.2.blocks.3.attn.cpb_mlp.0.bias"):
        dpt_lab.load_model(_save(state, tmp_path))


def test_missing_decoder_key(tmp_path):
    state = fixture(STEM)[0]
    del state["scratch.refinenet3.out_conv.weight"]
    with pytest.raises(CheckpointError, match="missing keys.*refinenet3.out_conv.weight"):
        dpt_lab.load_model(_save(state, tmp_path))


def test_changed_shape(tmp_path):
    state = fixture(STEM)[0]
    state["pretrained.model.layers.1.blocks.0.mlp.fc1.weight"] = torch.zeros(700, 192)
    with pytest.raises(CheckpointError, match="shape"):
        dpt_lab.load_model(_save(state, tmp_path))


def test_wrong_heads(tmp_path):
    state = fixture(STEM)[0]
    state["pretrained.model.layers.2.blocks.4.attn.logit_scale"] = torch.zeros(8, 1, 1)
    with pytest.raises(CheckpointError, match="shape"):
        dpt_lab.load_model(_save(state, tmp_path))


def test_attn_mask_checked(tmp_path):
    state = fixture(STEM)[0]
    state["pretrained.model.layers.1.blocks.1.attn_mask"] = torch.zeros(4, 256, 256)
    with pytest.raises(CheckpointError, match="attn_mask"):
        dpt_lab.load_model(_save(state, tmp_path))
    state = fixture(STEM)[0]
    del state["pretrained.model.layers.0.blocks.1.attn_mask"]
    with pytest.raises(CheckpointError, match="attn_mask"):
        dpt_lab.load_model(_save(state, tmp_path))


def test_unexpected_key(tmp_path):
    state = fixture(STEM)[0]
    state["pretrained.model.layers.0.blocks.0.attn.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected keys.*extra"):
        dpt_lab.load_model(_save(state, tmp_path))


# -- Hugging Face -hf ---------------------------------------------------------------------
# transformers is a test-only dependency: without it only these -hf tests are skipped
NATIVE = 128          # image_size of the small -hf model: stage grids 32, 16, 8, 4; window 8
DEPTHS = [2, 2, 3, 2]


def make_hf(folder, pretrained_windows=(0, 0, 0, 0), seed=0):
    """A small random DPT-SwinV2 in Intel/dpt-swinv2-*'s config style, saved with save_pretrained."""
    pytest.importorskip("transformers")
    from transformers import DPTConfig, DPTForDepthEstimation, Swinv2Config

    backbone = Swinv2Config(
        image_size=NATIVE, patch_size=4, embed_dim=16, depths=DEPTHS, num_heads=[1, 2, 2, 4], window_size=8,
        pretrained_window_sizes=list(pretrained_windows), out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = DPTConfig(
        backbone_config=backbone, neck_hidden_sizes=[16, 32, 64, 128], fusion_hidden_size=32, is_hybrid=False,
        readout_type="project", reassemble_factors=[4, 2, 1, 0.5],
    )
    torch.manual_seed(seed)
    model = DPTForDepthEstimation(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("logit_scale"):
                p.copy_(math.log(10.0) + 0.5 * noise)     # some heads above log(100): the clamp matters
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
        model.backbone.encoder.layers[0].blocks[1].attention.self.logit_scale[0] = 5.0
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpt-swinv2-hf")
    reference = make_hf(folder)
    return dpt_lab.load_model(folder), reference


def _compare(ours, reference, x):
    with torch.inference_mode():
        got = ours(x)
        want = reference(pixel_values=x).predicted_depth
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("pretrained_windows", [(0, 0, 0, 0), (6, 6, 6, 3)])
def test_hf_matches_transformers(tmp_path, pretrained_windows):
    reference = make_hf(tmp_path / "m", pretrained_windows)
    model = dpt_lab.load_model(tmp_path / "m")
    assert model.info.layout == "hf" and model.info.family == "midas_swin2"
    assert model.info.window_sizes == (8, 8, 8, 4) and model.info.base_size == NATIVE
    assert model.info.tap_blocks == (1, 3, 6, 8)
    x = torch.randn(2, 3, NATIVE, NATIVE, generator=torch.Generator().manual_seed(1))
    _compare(model, reference, x)


def test_hf_agrees_off_native_where_nothing_is_padded(hf_pair):
    """transformers pads to whole windows without masking the padding; DPT Lab masks it.
    At 256 x 128 every stage grid is a multiple of its window, so both must agree."""
    model, reference = hf_pair
    x = torch.randn(1, 3, 256, 128, generator=torch.Generator().manual_seed(2))
    _compare(model, reference, x)


def _hf_block_outputs(reference, x):
    """Every block's attention probabilities and output, from transformers, by hooks."""
    probs, outs, hooks = {}, {}, []
    for s, stage in enumerate(reference.backbone.encoder.layers):
        for j, layer in enumerate(stage.blocks):
            hooks.append(layer.attention.self.register_forward_hook(
                lambda m, a, o, key=(s, j): probs.__setitem__(key, o[1])))
            hooks.append(layer.register_forward_hook(lambda m, a, o, key=(s, j): outs.__setitem__(key, o[0])))
    try:
        with torch.inference_mode():
            result = reference(pixel_values=x, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return probs, outs, result


def _dense_from_windows(attn, layer, grid, batch):
    """transformers' (B*nW, heads, n, n) window attention (rolled, windowed order) ->
    (heads, N, N) over the stage grid's row-major tokens (native size: no padding)."""
    h, w = grid
    ws, shift = layer.window_size, layer.shift_size
    nh, nw = h // ws, w // ws
    heads = attn.shape[1]
    dense = torch.zeros(heads, h * w, h * w)
    tokens = []
    for win in range(nh * nw):
        r0, c0 = (win // nw) * ws, (win % nw) * ws
        tokens.append([((r0 + p // ws + shift) % h) * w + (c0 + p % ws + shift) % w for p in range(ws * ws)])
    tokens = torch.tensor(tokens)
    per_image = attn[batch * nh * nw:(batch + 1) * nh * nw]
    for win in range(nh * nw):
        idx = tokens[win]
        dense[:, idx[:, None], idx[None, :]] = per_image[win]
    return dense


def test_hf_attention_rows_and_norms(hf_pair):
    model, reference = hf_pair
    x = torch.randn(2, 3, NATIVE, NATIVE, generator=torch.Generator().manual_seed(3))
    probs, outs, result = _hf_block_outputs(reference, x)
    with torch.inference_mode():
        feats = model.encode(x, Record(norms=True, attention=True))
    assert len(feats.blocks) == sum(DEPTHS)

    # the hooks saw what transformers itself returns (last block of each stage)
    assert len(result.attentions) == 4
    for s, got in enumerate(result.attentions):
        assert torch.equal(got, probs[(s, DEPTHS[s] - 1)])

    layers = [(s, j) for s, d in enumerate(DEPTHS) for j in range(d)]
    for index, (s, j) in enumerate(layers):
        rec = feats.blocks[index]
        hf_out = outs[(s, j)]
        assert torch.allclose(rec.token_norms, hf_out.norm(dim=-1), atol=1e-4 * hf_out.norm(dim=-1).max())
    # hidden_states: the embedding, then each stage's last block BEFORE patch merging
    for s, hidden in enumerate(result.hidden_states[1:]):
        rec = feats.blocks[model.info.tap_blocks[s]]
        assert torch.allclose(rec.token_norms, hidden.norm(dim=-1), atol=1e-4 * hidden.norm(dim=-1).max())

    # every token's row, for an unshifted and a shifted block of a shifting stage, a shifted
    # block of the next stage, and a block of a stage that does not shift
    for s, j in [(0, 0), (0, 1), (1, 1), (2, 2)]:
        index = layers.index((s, j))
        rec = feats.blocks[index]
        layer = reference.backbone.encoder.layers[s].blocks[j]
        assert rec.window.shift == layer.shift_size and rec.window.window == layer.window_size
        assert rec.window.padded == rec.grid
        n = rec.grid[0] * rec.grid[1]
        for batch in range(2):
            want = _dense_from_windows(probs[(s, j)], layer, rec.grid, batch)
            got = torch.stack([window_row(rec, t, batch) for t in range(n)], dim=1)
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-4
            assert torch.allclose(got.sum(-1), torch.ones(got.shape[:2]), atol=1e-5)
    assert feats.blocks[layers.index((0, 1))].window.shift == 4


def _window_rows(rec, batch=0):
    n = rec.grid[0] * rec.grid[1]
    return torch.stack([window_row(rec, t, batch) for t in range(n)], dim=1)     # (heads, N, N)


@pytest.mark.parametrize("hw", [(96, 160), (32, 160)])
def test_padded_and_partly_shifted_blocks_follow_window_row(hf_pair, hw):
    """Off the native size (padding; an axis that fits in one window is not rolled), the
    block's output equals attention rebuilt from `window_row`: the recorded layout and
    the helper describe exactly what the model computed."""
    model, _ = hf_pair
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(4))
    inputs, hooks = {}, []
    blocks = [blk for stage in model.encoder.stages for blk in stage.blocks]
    for i, blk in enumerate(blocks):
        hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))
    try:
        with torch.inference_mode():
            feats = model.encode(x, Record(norms=True, attention=True))
    finally:
        for h in hooks:
            h.remove()
    checked = 0
    for i, rec in enumerate(feats.blocks):
        lay = rec.window
        if lay.padded == rec.grid and lay.shifts in ((0, 0), (lay.shift, lay.shift)):
            continue      # nothing special about this block
        checked += 1
        blk = blocks[i]
        with torch.inference_mode():
            xin = inputs[i]
            b, n, c = xin.shape
            heads = blk.attn.heads
            v = F.linear(xin, blk.attn.qkv.weight[2 * c:], blk.attn.v_bias).reshape(b, n, heads, c // heads)
            rows = _window_rows(rec)                                     # (heads, N, N)
            ctx = torch.einsum("hqk,khd->qhd", rows, v[0]).reshape(1, n, c)
            y = xin + blk.norm1(blk.attn.proj(ctx))
            y = y + blk.norm2(blk.mlp(y))
        assert torch.allclose(rec.token_norms, y.norm(dim=-1), atol=1e-4 * y.norm(dim=-1).max())
        for t in (0, n // 2, n - 1):
            inside = window_of(rec, t)
            assert t in inside
            outside = torch.ones(n, dtype=torch.bool)
            outside[inside] = False
            assert rows[:, t, outside].abs().max() < 1e-20
            r = sorted({k // rec.grid[1] for k in inside})
            cols = sorted({k % rec.grid[1] for k in inside})
            assert len(inside) == len(r) * len(cols)                         # a rectangle
            assert r == list(range(r[0], r[-1] + 1)) and cols == list(range(cols[0], cols[-1] + 1))
    assert checked >= 2


def test_grid_within_one_window_is_global(hf_pair):
    model, _ = hf_pair
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        feats = model.encode(x, Record(attention=True))
    last = feats.blocks[-1]                       # stage 3: grid 2 x 3, native window 4
    assert last.grid == (2, 3) and last.window.padded == (4, 4) and last.window.shifts == (0, 0)
    assert window_of(last, 0) == list(range(6))
    row = window_row(last, 4)
    assert row.shape == (4, 6) and torch.allclose(row.sum(-1), torch.ones(4), atol=1e-5)


def test_hf_bad_folders(tmp_path, hf_pair):
    from safetensors.torch import load_file, save_file  # noqa: I001 (installed with dpt_lab)

    model, reference = hf_pair
    folder = tmp_path / "bad"
    reference.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    key = "backbone.encoder.layers.1.blocks.0.attention.self.key.weight"

    broken = {k: v for k, v in state.items() if k != key}
    save_file(broken, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys.*layers.1.blocks.0.attention.self.key.weight"):
        dpt_lab.load_model(folder)

    broken = dict(state, **{key: torch.zeros(32, 16)})
    save_file(broken, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        dpt_lab.load_model(folder)
