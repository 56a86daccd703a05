"""Attention explorer (dpt_lab.attention): rows against transformers' eager attention
probabilities for every family, row / column consistency, click-to-patch mapping,
rendering and the CLI."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from fixtures import save_fixture_checkpoint
from hf_reference import beit_hf, swin2_every_block, swin2_hf, windows_to_image

import dpt_lab
from dpt_lab import attention
from dpt_lab.attention import LayerError, PatchError, TokenError

HAS_BEIT = importlib.util.find_spec("dpt_lab.encoders.beit") is not None
HAS_SWIN2 = importlib.util.find_spec("dpt_lab.encoders.swin2") is not None


def all_rows(probe, layer):
    """(heads, N, N): every row of a layer, stacked as the attention matrix."""
    return torch.stack([probe.row(layer, i) for i in range(probe.num_tokens(layer))], dim=1)


def all_columns(probe, layer):
    return torch.stack([probe.column(layer, j) for j in range(probe.num_tokens(layer))], dim=2)


def assert_matches(probe, reference: list[torch.Tensor], tol=1e-5):
    """Rows and columns of every layer equal the reference (heads, N, N) matrices."""
    assert probe.num_layers == len(reference)
    for layer, ref in enumerate(reference):
        assert probe.num_heads(layer) == ref.shape[0]
        rows = all_rows(probe, layer)
        assert rows.shape == ref.shape
        assert (rows - ref).abs().max() <= tol, f"layer {layer}: rows differ by {(rows - ref).abs().max():.3g}"
        assert (rows.sum(-1) - 1).abs().max() <= 1e-5
        assert (all_columns(probe, layer) - ref).abs().max() <= tol


# -- Depth-Anything (DINOv2) --------------------------------------------------------------
@pytest.fixture(scope="module")
def dinov2_pair(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_reference import depth_anything_hf
    from transformers import DepthAnythingForDepthEstimation

    folder = tmp_path_factory.mktemp("da") / "depth-anything-hf"
    depth_anything_hf(folder)
    reference = DepthAnythingForDepthEstimation.from_pretrained(folder, attn_implementation="eager").eval()
    return dpt_lab.load_model(folder), reference, folder


def test_dinov2_rows_match_transformers(dinov2_pair):
    model, reference, _ = dinov2_pair
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))   # the native grid (see test_depth_anything_hf)
    probe = attention.capture(model, x)
    with torch.inference_mode():
        out = reference(pixel_values=x, output_attentions=True)
    assert probe.cls_token == 0 and probe.grid(0) == (4, 4) and probe.num_tokens(0) == 17
    assert_matches(probe, [a[0] for a in out.attentions])


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """The depth_anything_v2_vits fixture: the official layout, 12 layers x 6 heads."""
    return dpt_lab.load_model(save_fixture_checkpoint("depth_anything_v2_vits", tmp_path_factory.mktemp("vits")))


@pytest.fixture(scope="module")
def vits_probe(vits):
    x = torch.randn(1, 3, 70, 84, generator=torch.Generator().manual_seed(3))
    return attention.capture(vits, x), x


def test_column_is_row_transposed_and_rows_sum_to_one(vits_probe):
    probe, _ = vits_probe
    gen = torch.Generator().manual_seed(0)
    for layer in (0, 5, 11):
        n = probe.num_tokens(layer)
        assert n == 1 + 5 * 6
        for _ in range(6):
            i, j = (int(t) for t in torch.randint(0, n, (2,), generator=gen))
            row, col = probe.row(layer, i), probe.column(layer, j)
            assert row.shape == col.shape == (6, n) and row.dtype == torch.float32
            assert (row.sum(-1) - 1).abs().max() <= 1e-5
            assert torch.allclose(probe.column(layer, j)[:, i], probe.row(layer, i)[:, j], atol=1e-6, rtol=1e-5)
            assert torch.allclose(probe.column(layer, i)[:, j], probe.row(layer, j)[:, i], atol=1e-6, rtol=1e-5)


def test_rows_and_columns_run_on_the_calling_thread_alone(vits_probe, monkeypatch):
    """A row is a few hundred kFLOP: split over intra-op threads it only waits for them
    (a scheduler slice on a busy machine). The thread count is restored afterwards."""
    probe, _ = vits_probe
    before = torch.get_num_threads()
    probe.row_normalizers(4)
    seen = []
    softmax, exp = torch.softmax, torch.exp
    monkeypatch.setattr(torch, "softmax", lambda *a, **k: seen.append(torch.get_num_threads()) or softmax(*a, **k))
    monkeypatch.setattr(torch, "exp", lambda *a, **k: seen.append(torch.get_num_threads()) or exp(*a, **k))
    probe.row(4, 7)
    probe.column(4, 7)
    assert seen == [1, 1]
    assert torch.get_num_threads() == before


def test_capture_is_one_encode_and_keeps_features(vits, monkeypatch):
    calls = []
    encode = vits.encode
    monkeypatch.setattr(vits, "encode", lambda *a, **k: calls.append(a[1] if len(a) > 1 else k) or encode(*a, **k))
    x = torch.randn(1, 3, 56, 70, generator=torch.Generator().manual_seed(4))
    probe = attention.capture(vits, x)
    assert len(calls) == 1 and calls[0].attention
    for layer in range(probe.num_layers):
        probe.row(layer, layer)
        probe.column(layer, (2 * layer) % probe.num_tokens(layer))
    assert len(calls) == 1                                      # layers and modes never re-encode
    with torch.inference_mode():
        assert torch.allclose(vits.decode(probe.features), vits(x), atol=1e-5)


def test_capture_puts_no_hooks_on_the_shared_model(vits, monkeypatch):
    """The app runs captures and plain forwards of one model on many threads at once: a
    hook registered by one capture would run inside the others' passes (and a half-made
    registration once failed one of them). The encoder compacts each block's q / k in its
    own loop instead, while the pass runs."""
    compact_during_pass = []
    encode = vits.encode

    def spy(x, record):
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in vits.modules())
        feats = encode(x, record)
        compact_during_pass.extend(t.untyped_storage().nbytes() == t.numel() * t.element_size()
                                   for rec in feats.blocks for t in (rec.q, rec.k))
        return feats

    monkeypatch.setattr(vits, "encode", spy)
    attention.capture(vits, torch.randn(2, 3, 56, 70, generator=torch.Generator().manual_seed(5)), batch=1)
    assert compact_during_pass and all(compact_during_pass)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in vits.modules())


def test_nbytes_is_q_and_k_only(vits_probe):
    """The probe holds q and k per block (compact copies, v freed) and, once a column was
    asked, heads x N normalisers for that layer; never an N x N matrix."""
    probe, _ = vits_probe
    n, heads, d, layers = probe.num_tokens(0), 6, 64, probe.num_layers
    qk = layers * 2 * heads * n * d * 4
    for rec in probe.features.blocks:
        for t in (rec.q, rec.k):
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * 4
    before = probe.nbytes
    assert qk <= before <= qk + layers * heads * n * 4
    for layer in range(layers):
        probe.column(layer, 0)
    assert probe.nbytes == qk + layers * heads * n * 4


def test_errors_are_typed(vits_probe):
    probe, _ = vits_probe
    for bad in (-1, 12, 1.5, "3"):
        with pytest.raises(LayerError):
            probe.row(bad, 0)
    with pytest.raises(TokenError):
        probe.row(0, 31)
    with pytest.raises(PatchError, match="outside the 5 x 6 grid"):
        probe.token_at(5, 0)
    with pytest.raises(PatchError):
        attention.patch_at_pixel(((10, 20), (28, 56)), (2, 4), 20, 3)
    assert issubclass(LayerError, ValueError) and issubclass(PatchError, ValueError)
    assert probe.token_at(0, 0) == 1 and probe.token_at(4, 5) == 30 and probe.patch_of(30) == (4, 5)
    assert probe.patch_of(0) is None


# -- BEiT ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def beit_pair(tmp_path_factory):
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("beit") / "dpt-beit-tiny"
    reference = beit_hf(folder)
    return dpt_lab.load_model(folder), reference


@pytest.mark.skipif(not HAS_BEIT, reason="dpt_lab.encoders.beit is not there yet")
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])   # native grid, and a resized bias table
def test_beit_rows_match_transformers(beit_pair, size):
    model, reference = beit_pair
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(5))
    probe = attention.capture(model, x)
    with torch.inference_mode():
        out = reference(pixel_values=x, output_attentions=True)
    assert probe.cls_token == 0 and probe.grid(0) == (size[0] // 16, size[1] // 16)
    rec = probe.features.blocks[0]
    assert rec.rel_table is not None and rec.rel_index is not None
    assert_matches(probe, [a[0] for a in out.attentions])
    # the bias is really in there: without it the rows would differ
    plain = torch.softmax(rec.q[0, :, 3] @ rec.k[0].transpose(-1, -2) * rec.scale, dim=-1)
    assert (plain - probe.row(0, 3)).abs().max() > 1e-3


# -- SwinV2 -------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_SWIN2, reason="dpt_lab.encoders.swin2 is not there yet")
def test_swin2_rows_match_transformers(tmp_path):
    pytest.importorskip("transformers")
    reference = swin2_hf(tmp_path / "dpt-swinv2-tiny")
    model = dpt_lab.load_model(tmp_path / "dpt-swinv2-tiny")
    x = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(6))

    blocks, seen, _ = swin2_every_block(reference, x)
    probe = attention.capture(model, x)
    assert probe.cls_token is None and probe.num_layers == 8
    assert [probe.grid(l) for l in range(0, 8, 2)] == [(16, 32), (8, 16), (4, 8), (2, 4)]
    shifts = [blk.shift_size for blk in blocks]
    assert shifts == [0, 2, 0, 2, 0, 0, 0, 0]           # two shifted blocks are checked
    expected = [windows_to_image(a, probe.grid(l), blocks[l].window_size, blocks[l].shift_size)
                for l, a in enumerate(seen)]
    assert_matches(probe, expected)


@pytest.mark.skipif(not HAS_SWIN2, reason="dpt_lab.encoders.swin2 is not there yet")
def test_swin2_shifted_window_rows_and_clicks(tmp_path):
    """A shifted block's row is zero outside the token's window, whose outline is the
    rectangle of tokens it attends to; clicks map onto each stage's own grid."""
    pytest.importorskip("transformers")
    swin2_hf(tmp_path / "m")
    model = dpt_lab.load_model(tmp_path / "m")
    x = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(7))
    probe = attention.capture(model, x)
    layer = 1                                   # stage 0, shifted by 2, 16 x 32 grid, window 4
    assert probe.is_windowed(layer) and probe.features.blocks[layer].window.shift == 2
    with pytest.raises(PatchError, match="layer="):
        probe.token_at(0, 0)
    token = probe.token_at(0, 0, layer=layer)   # the top-left corner: its shifted window holds rows/cols 0..1
    assert sorted(probe.window_tokens(layer, token)) == [0, 1, 32, 33]
    row = probe.row(layer, token)
    assert set(torch.nonzero(row[0] > 1e-30).flatten().tolist()) == {0, 1, 32, 33}
    token = probe.token_at(5, 7, layer=layer)   # rows 2..5, cols 6..9 form one shifted window
    members = probe.window_tokens(layer, token)
    assert sorted(members) == sorted(r * 32 + c for r in range(2, 6) for c in range(6, 10))
    assert set(torch.nonzero(probe.row(layer, token)[1]).flatten().tolist()) == set(members)
    col = probe.column(layer, token)
    assert set(torch.nonzero(col[1]).flatten().tolist()) == set(members)
    # a click lands on each stage's grid: patches of 4, 8, 16, 32 input pixels
    meta = ((64, 128), (64, 128))
    for layer, patch in ((0, 4), (2, 8), (4, 16), (6, 32)):
        assert attention.patch_at_pixel(meta, probe.grid(layer), 127, 63) == (64 // patch - 1, 128 // patch - 1)
        assert attention.patch_at_pixel(meta, probe.grid(layer), 40, 20) == (20 // patch, 40 // patch)
    tiles, values = attention.attention_view(probe, 1, token)
    assert values.shape == (2, 512)
    assert tiles.shape == attention.tiles_shape(2, (16, 32))


# -- click mapping ------------------------------------------------------------------------
def reference_patch(meta, grid, x, y):
    """Through PreprocessMeta: the input pixel whose area holds the centre of image pixel
    (x, y), then its patch."""
    yi, xi = meta.image_to_input(y, x)
    ph, pw = meta.input_size[0] // grid[0], meta.input_size[1] // grid[1]
    return int(np.floor(yi + 0.5)) // ph, int(np.floor(xi + 0.5)) // pw


@pytest.mark.parametrize("case", ["lower_bound_518", "stretch_256"])
def test_click_maps_to_the_covering_patch(case):
    from dpt_lab import imaging

    image = np.random.default_rng(0).integers(0, 255, (333, 517, 3), dtype=np.uint8)
    if case == "lower_bound_518":      # Depth-Anything: keep aspect, short side >= 518, multiples of 14
        _, meta = imaging.prepare(image, target=518, multiple=14, rule="lower_bound",
                                  mean=(0.5,) * 3, std=(0.5,) * 3)
        grids = [(meta.input_size[0] // 14, meta.input_size[1] // 14)]
        assert meta.input_size[0] == 518 and meta.input_size[1] != 518
    else:                              # SwinV2 tiny: stretch to 256 x 256, stage patches 4..32
        _, meta = imaging.prepare(image, target=256, multiple=32, rule="stretch", mean=(0.5,) * 3, std=(0.5,) * 3)
        assert meta.input_size == (256, 256)
        grids = [(64, 64), (32, 32), (16, 16), (8, 8)]
    H, W = meta.image_size
    for grid in grids:
        gh, gw = grid
        assert attention.patch_at_pixel(meta, grid, 0, 0) == (0, 0)
        assert attention.patch_at_pixel(meta, grid, W - 1, 0) == (0, gw - 1)
        assert attention.patch_at_pixel(meta, grid, 0, H - 1) == (gh - 1, 0)
        assert attention.patch_at_pixel(meta, grid, W - 1, H - 1) == (gh - 1, gw - 1)
        centre = attention.patch_at_pixel(meta, grid, W // 2, H // 2)
        assert centre == reference_patch(meta, grid, W // 2, H // 2)
        assert abs(centre[0] - (gh - 1) / 2) <= 0.5 and abs(centre[1] - (gw - 1) / 2) <= 0.5
        # every column / row of pixels, and the sizes-only form
        sizes = (meta.image_size, meta.input_size)
        for x in range(W):
            assert attention.patch_at_pixel(sizes, grid, x, H // 2) == reference_patch(meta, grid, x, H // 2)
        for y in range(H):
            assert attention.patch_at_pixel(sizes, grid, W // 3, y) == reference_patch(meta, grid, W // 3, y)
        # the marked box is exactly the pixels that map to the patch
        r, c = centre
        x0, y0, x1, y1 = attention.patch_box((H, W), grid, r, c)
        assert attention.patch_at_pixel(meta, grid, x0, y0) == (r, c) == attention.patch_at_pixel(meta, grid, x1, y1)
        assert attention.patch_at_pixel(meta, grid, x0 - 1, y0 - 1) == (r - 1, c - 1)
        assert attention.patch_at_pixel(meta, grid, x1 + 1, y1 + 1) == (r + 1, c + 1)
    marked = attention.mark_patch(image, meta, grids[0], 0, 0)
    assert marked.shape == image.shape and (marked != image).any() and (marked[H // 2:, W // 2:] == image[H // 2:, W // 2:]).all()


def test_pixel_out_of_image_is_a_patch_error():
    sizes = ((333, 517), (518, 798))
    for x, y in ((-1, 0), (517, 0), (0, 333), (600, 400)):
        with pytest.raises(PatchError, match="outside the 517x333 image"):
            attention.patch_at_pixel(sizes, (37, 57), x, y)
    assert attention.patch_at_pixel(sizes, (37, 57), 516.4, 332.4) == (36, 56)


# -- rendering and the app view -------------------------------------------------------------
def test_render_tiles_layout_cls_marker_and_window():
    gen = np.random.default_rng(1)
    values = gen.random((6, 1 + 5 * 7))
    values /= values.sum(1, keepdims=True)
    out = attention.render_tiles(values, (5, 7), marker=(2, 3), tile_px=70)
    assert out.dtype == np.uint8 and out.shape == attention.tiles_shape(6, (5, 7), tile_px=70)
    assert (out == attention.MARKER).all(-1).any()
    # 7 tiles (6 heads + mean): 3 columns, 3 rows
    h, w, _ = out.shape
    th, tw = round(70 * 5 / 7), 70
    assert w > 3 * tw and w < 4 * tw and h > 3 * th
    no_mean = attention.render_tiles(values[:, 1:], (5, 7), include_mean=False, labels=False, tile_px=70)
    assert no_mean.shape == attention.tiles_shape(6, (5, 7), include_mean=False, labels=False, tile_px=70)
    win = attention.render_tiles(values[:, 1:], (5, 7), window=[0, 1, 7, 8], tile_px=70, log_contrast=True,
                                 shared_scale=True, cmap="viridis")
    assert (win == attention.WINDOW).all(-1).any()
    img = gen.integers(0, 255, (40, 100, 3), dtype=np.uint8)     # a wide image sets a wide tile
    over = attention.render_tiles(values, (5, 7), image=img, alpha=0.5, tile_px=70)
    assert over.shape == attention.tiles_shape(6, (5, 7), tile_px=70, image_shape=img.shape)
    with pytest.raises(ValueError):
        attention.render_tiles(values[:, :10], (5, 7))


def test_attention_view_is_row_or_column(vits_probe):
    probe, _ = vits_probe
    token = probe.token_at(2, 3)
    tiles, values = attention.attention_view(probe, 4, token, mode="column", log_contrast=True, alpha=0.0)
    assert np.allclose(values, probe.column(4, token).numpy())
    assert tiles.shape == attention.tiles_shape(6, (5, 6))
    _, values = attention.attention_view(probe, 4, probe.cls_token, include_mean=False)
    assert np.allclose(values, probe.row(4, 0).numpy())
    with pytest.raises(attention.AttentionError):
        attention.attention_view(probe, 4, token, mode="diagonal")


# -- command line ---------------------------------------------------------------------------
def test_cli_writes_png_and_npy(dinov2_pair, tmp_path, capsys):
    from PIL import Image

    _, _, folder = dinov2_pair
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(image)
    out, npy = tmp_path / "grid.png", tmp_path / "values.npy"
    rc = attention.main(["attention", str(image), "--model", str(folder), "--layer", "2", "--patch", "1,2",
                         "--column", "--out", str(out), "--npy", str(npy), "--base-size", "56", "--stretch",
                         "--alpha", "0.3", "--log", "--shared", "--cmap", "viridis"])
    assert rc == 0
    assert Image.open(out).mode == "RGB"
    values = np.load(npy)
    assert values.shape == (4, 17) and values.dtype == np.float32
    rc = attention.main([str(image), "--model", str(folder), "--pixel", "79,0", "--out", str(out), "--npy", str(npy),
                         "--base-size", "56", "--stretch"])
    assert rc == 0 and np.allclose(np.load(npy).sum(1), 1, atol=1e-5)
    capsys.readouterr()
    assert attention.main([str(image), "--model", str(folder), "--layer", "9", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layers 1..4" in err
