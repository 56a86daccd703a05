"""Feature lenses (dpt_lab.features) and attention analytics (attention.mean_distance,
attention.rollout) against transformers: recorded tokens against output_hidden_states,
similarity against the cosine of those hidden states, mean distance and rollout against
brute-force computations from the full eager attention matrices; PCA against numpy's SVD;
the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import beit_hf, depth_anything_hf, swin2_every_block, swin2_hf, windows_to_image
from PIL import Image

import dpt_lab
from dpt_lab import attention, features
from dpt_lab.attention import AttentionError, LayerError

pytest.importorskip("transformers")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


# -- brute force references from full (heads, N, N) matrices ---------------------------------
def brute_distance(mats, grid, input_size, has_cls) -> np.ndarray:
    """(layers, heads): sum_j A[i, j] * |p_i - p_j| over patch keys, mean over patch queries."""
    (h, w), (gh, gw) = input_size, grid
    ys, xs = np.meshgrid(np.arange(gh) * h / gh, np.arange(gw) * w / gw, indexing="ij")
    p = np.stack([ys.ravel(), xs.ravel()], 1)
    dist = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    o = 1 if has_cls else 0
    return np.stack([(a.double().numpy()[:, o:, o:] * dist).sum(-1).mean(-1) for a in mats])


def brute_rollout(mats, token, fusion="mean", ratio=0.0) -> torch.Tensor:
    """Row `token` of the product of (fused + I, renormalised) matrices, first layer rightmost."""
    n = mats[0].shape[-1]
    result = torch.eye(n, dtype=torch.float64)
    for a in mats:
        f = {"mean": a.mean(0), "max": a.amax(0), "min": a.amin(0)}[fusion].double().clone()
        k = int(ratio * f.numel())
        if k:
            flat = f.view(-1)
            flat[torch.topk(flat, k, largest=False).indices] = 0
        f = f + torch.eye(n, dtype=torch.float64)
        f = f / f.sum(-1, keepdim=True)
        result = f @ result
    return result[token]


def probe_matrices(probe, layers):
    """The probe's own full (heads, N, N) matrices (rows are tested against transformers in
    test_attention): the reference for discard ratios, whose ties must not depend on 1e-7."""
    return [torch.stack([probe.row(b, i) for i in range(probe.num_tokens(b))], dim=1) for b in layers]


# -- Depth-Anything (DINOv2) and BEiT ---------------------------------------------------------
@pytest.fixture(scope="module")
def vit_pairs(tmp_path_factory):
    from transformers import DepthAnythingForDepthEstimation

    root = tmp_path_factory.mktemp("lenses")
    depth_anything_hf(root / "da", layers=4)
    da = DepthAnythingForDepthEstimation.from_pretrained(root / "da", attn_implementation="eager").eval()
    beit = beit_hf(root / "beit")
    return {"dinov2": (dpt_lab.load_model(root / "da"), da, (56, 56)),
            "beit": (dpt_lab.load_model(root / "beit"), beit, (96, 128))}


@pytest.fixture(scope="module", params=["dinov2", "beit"])
def vit_case(request, vit_pairs):
    model, reference, size = vit_pairs[request.param]
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        out = reference(pixel_values=x, output_hidden_states=True, output_attentions=True)
    return features.capture(model, x), [h[0] for h in out.hidden_states], [a[0] for a in out.attentions]


def test_tokens_and_similarity_match_hidden_states(vit_case):
    probe, hidden, _ = vit_case
    assert probe.num_blocks == len(hidden) - 1 and probe.cls_token == 0
    for block in range(probe.num_blocks):
        ref = hidden[block + 1]
        assert probe.tokens(block).shape == ref.shape
        assert relative_error(probe.tokens(block), ref) <= 1e-4
        for token in (0, 1, ref.shape[0] - 1):
            cos = torch.nn.functional.cosine_similarity(ref, ref[token][None], dim=-1)
            sim = probe.similarity(block, token)
            assert sim.shape == (ref.shape[0],) and (sim - cos).abs().max() <= 1e-4
            assert abs(float(sim[token]) - 1) <= 1e-5


def test_mean_distance_matches_brute_force(vit_case):
    probe, _, mats = vit_case
    got = attention.mean_distance(probe)
    expected = brute_distance(mats, probe.grid(0), probe.input_size, True)
    assert got.shape == expected.shape == (probe.num_layers, probe.num_heads(0)) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert np.all(got > 0)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_matches_brute_force(vit_case, fusion):
    probe, _, mats = vit_case
    for token, layer in ((0, None), (5, 1), (probe.num_tokens(0) - 1, 2)):
        last = probe.num_layers - 1 if layer is None else layer
        got = attention.rollout(probe, token, layer=layer, head_fusion=fusion)
        expected = brute_rollout(mats[: last + 1], token, fusion)
        assert got.shape == (probe.num_tokens(0),) and abs(float(got.sum()) - 1) <= 1e-5
        assert (got.double() - expected).abs().max() <= 1e-5


def test_rollout_discard_ratio(vit_case):
    probe, _, _ = vit_case
    mats = probe_matrices(probe, range(probe.num_layers))
    for ratio in (0.3, 0.9):
        got = attention.rollout(probe, 3, head_fusion="mean", discard_ratio=ratio)
        assert (got.double() - brute_rollout(mats, 3, "mean", ratio)).abs().max() <= 1e-5
    assert (attention.rollout(probe, 3, discard_ratio=0.9) - attention.rollout(probe, 3)).abs().max() > 1e-4


def test_pca_is_orthonormal_and_explains_what_svd_does(vit_case):
    probe, _, _ = vit_case
    block = probe.num_blocks - 1
    pca = probe.pca(block)
    gram = pca.components @ pca.components.T
    assert torch.allclose(gram, torch.eye(3, dtype=gram.dtype), atol=1e-9)
    tokens = probe.patch_tokens(block).double().numpy()
    centred = tokens - tokens.mean(0)
    s = np.linalg.svd(centred, compute_uv=False)
    n = tokens.shape[0]
    np.testing.assert_allclose(pca.explained_variance.numpy(), s[:3] ** 2 / (n - 1), rtol=1e-7)
    np.testing.assert_allclose(pca.explained_ratio.numpy(), s[:3] ** 2 / (s ** 2).sum(), rtol=1e-7)
    # the same directions as the SVD's, up to sign
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs((vt[:3] * pca.components.numpy()).sum(1)), 1.0, atol=1e-6)
    rgb = probe.pca_rgb(block)
    assert rgb.shape == (*probe.grid(block), 3) and rgb.dtype == np.float32
    assert rgb.min() == 0.0 and rgb.max() == 1.0
    # the first component is oriented so that the border averages below zero
    border = np.ones(probe.grid(block), bool)
    border[1:-1, 1:-1] = False
    first = pca.project(probe.patch_tokens(block))[:, 0].numpy().reshape(probe.grid(block))
    assert first[border].mean() < 0


def test_pca_basis_block_and_foreground(vit_case):
    probe, _, _ = vit_case
    own, shared = probe.pca_rgb(1), probe.pca_rgb(1, basis_block=3)
    assert own.shape == shared.shape and not np.allclose(own, shared)
    np.testing.assert_array_equal(probe.pca_rgb(3, basis_block=3), probe.pca_rgb(3))
    fg = probe.foreground(3)
    rgb = probe.pca_rgb(3, foreground=True)
    assert fg.any() and not fg.all()
    assert np.all(rgb[~fg] == 0) and rgb[fg].max() == 1.0


def test_most_similar_is_the_top_k_patches(vit_case):
    probe, _, _ = vit_case
    block, token = 2, 4
    sims = probe.similarity(block, token).numpy()
    top = probe.most_similar(block, token, k=3)
    order = [t for t in np.argsort(-sims) if t != token and t != 0][:3]
    assert top == [int(t) for t in order]


# -- SwinV2 -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swin_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("swin") / "dpt-swinv2-tiny"
    reference = swin2_hf(folder)
    model = dpt_lab.load_model(folder)
    x = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(12))
    blocks, attn, outs = swin2_every_block(reference, x)
    probe = features.capture(model, x)
    mats = [windows_to_image(a, probe.grid(b), blocks[b].window_size, blocks[b].shift_size)
            for b, a in enumerate(attn)]
    return probe, [o[0] for o in outs], mats


def test_swin2_tokens_distance_and_rollout(swin_case):
    probe, outs, mats = swin_case
    assert probe.cls_token is None and probe.num_blocks == 8
    for block in range(8):
        assert relative_error(probe.tokens(block), outs[block]) <= 1e-4
        cos = torch.nn.functional.cosine_similarity(outs[block], outs[block][7][None], dim=-1)
        assert (probe.similarity(block, 7) - cos).abs().max() <= 1e-4
    got = attention.mean_distance(probe)
    assert got.shape == (8, 4) and np.isnan(got[0, 2:]).all()        # stages 0, 1 have 2 heads
    for block in range(8):
        expected = brute_distance([mats[block]], probe.grid(block), probe.input_size, False)[0]
        np.testing.assert_allclose(got[block, :len(expected)], expected, rtol=1e-4)
    # within a stage: layer 3 (stage 1, shifted) rolls out over blocks 2 and 3 only
    assert attention.rollout_start(probe, 3) == 2 and attention.rollout_start(probe, 0) == 0
    for fusion in ("mean", "max"):
        for token, layer in ((5, 1), (40, 3)):
            start = attention.rollout_start(probe, layer)
            got_r = attention.rollout(probe, token, layer=layer, head_fusion=fusion)
            expected_r = brute_rollout(mats[start: layer + 1], token, fusion)
            assert abs(float(got_r.sum()) - 1) <= 1e-5
            assert (got_r.double() - expected_r).abs().max() <= 1e-5
    rgb = probe.pca_rgb(0)
    assert rgb.shape == (16, 32, 3)
    with pytest.raises(features.FeatureError, match="basis"):
        probe.pca_rgb(0, basis_block=2)          # stage 1's tokens are twice as wide


# -- errors, rendering and the CLI ----------------------------------------------------------------
def test_errors_are_typed(vit_case, vit_pairs):
    probe, _, _ = vit_case
    with pytest.raises(LayerError, match="block"):
        probe.tokens(99)
    with pytest.raises(attention.TokenError):
        probe.similarity(0, 10_000)
    with pytest.raises(AttentionError, match="head_fusion"):
        attention.rollout(probe, 0, head_fusion="median")
    with pytest.raises(AttentionError, match="discard_ratio"):
        attention.rollout(probe, 0, discard_ratio=1.0)
    with pytest.raises(features.FeatureError, match="tokens"):
        features.FeatureProbe(attention.capture(vit_pairs["dinov2"][0], torch.zeros(1, 3, 56, 56)).features)


def test_lens_image_paints_each_patch_and_marks(vit_case):
    probe, _, _ = vit_case
    image = np.full((60, 90, 3), 200, np.uint8)
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = features.lens_image(values, image, alpha=0.0, cmap="gray")
    assert out.shape == (60, 90, 3)
    assert out[5, 5, 0] == 0 and out[55, 85, 0] == 255                     # first and last patch
    marked = features.lens_image(values, image, alpha=0.0, cmap="gray", query=(1, 1), similar=[(2, 3)])
    assert tuple(marked[20, 30]) == features.QUERY and tuple(marked[40, 68]) == features.SIMILAR


def test_cli_features_and_attention_analytics(vit_pairs, tmp_path, capsys):
    from dpt_lab import cli

    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(image)
    model = str(tmp_path / "da")
    depth_anything_hf(tmp_path / "da", layers=4)
    out = tmp_path / "pca.png"
    assert cli.main(["features", str(image), "--model", model, "--block", "2", "--pca", "--out", str(out),
                     "--npy", str(tmp_path / "pca.npy")]) == 0
    assert Image.open(out).size == (70, 50) and np.load(tmp_path / "pca.npy").shape[-1] == 3
    out = tmp_path / "sim.png"
    assert cli.main(["features", str(image), "--model", model, "--similar", "1,2", "--out", str(out)]) == 0
    assert Image.open(out).size == (70, 50)
    html = tmp_path / "distance.html"
    assert cli.main(["attention", str(image), "--model", model, "--distance", "--out", str(html)]) == 0
    assert "mean attention distance" in html.read_text().lower()
    out = tmp_path / "rollout.png"
    assert cli.main(["attention", str(image), "--model", model, "--rollout", "--patch", "1,1", "--out", str(out),
                     "--npy", str(tmp_path / "rollout.npy")]) == 0
    assert Image.open(out).size == (70, 50)
    assert abs(np.load(tmp_path / "rollout.npy").sum() - 1) < 1e-5
    assert cli.main(["features", str(image), "--model", model, "--block", "9", "--pca"]) == 2
    assert "block" in capsys.readouterr().err
