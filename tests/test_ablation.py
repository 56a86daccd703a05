"""The high-norm token ablation (dpt_lab.ablation): the partial re-run from a block gives the
plain forward when nothing is replaced, leaves earlier blocks alone, replaces with the stated
values, and measures the attention share as attention.capture's columns do; every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import save_fixture_checkpoint
from hf_reference import beit_hf, swin2_hf
from PIL import Image

import dpt_lab
from dpt_lab import ablation, attention, features
from dpt_lab.attention import LayerError, PatchError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    beit_hf(root / "beit")
    swin2_hf(root / "swin")
    return {"dinov2": (dpt_lab.load_model(save_fixture_checkpoint("depth_anything_v2_vits", root)), (70, 84)),
            "beit": (dpt_lab.load_model(root / "beit"), (96, 128)),
            "swin2": (dpt_lab.load_model(root / "swin"), (64, 128))}


@pytest.fixture(scope="module", params=["dinov2", "beit", "swin2"])
def case(request, models):
    model, size = models[request.param]
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(21))
    return request.param, model, x, features.capture(model, x)


def test_no_tokens_gives_exactly_the_plain_forward(case):
    _, model, x, probe = case
    with torch.inference_mode():
        plain = model(x)
    for block in (0, probe.num_blocks // 2, probe.num_blocks - 1):
        res = ablation.ablate(model, x, block, [], baseline=probe)
        assert torch.equal(res.depth, plain) and torch.equal(res.baseline, plain)
        assert res.attention_share.shape == (probe.num_layers, 2) and not res.attention_share.any()


def test_blocks_before_are_unchanged_and_later_ones_change(case):
    name, model, x, probe = case
    block = probe.num_blocks // 2
    gh, gw = probe.grid(block)
    patches = [(0, 0), (gh // 2, gw // 2)]
    res = ablation.ablate(model, x, block, patches, "zero", baseline=probe)
    for b in range(block):
        assert torch.equal(res.probe.tokens(b), probe.tokens(b))
    assert not torch.equal(res.probe.tokens(block), probe.tokens(block))
    assert (res.depth - res.baseline).abs().max() > 0
    # zero mode: the chosen tokens are zero in everything later blocks read (SwinV2: on each stage's grid)
    off = 0 if probe.cls_token is None else 1
    for b in range(block, probe.num_blocks):
        grid = probe.grid(b)
        for r, c in patches:
            t = off + (r * grid[0] // gh) * grid[1] + c * grid[1] // gw
            assert not res.probe.tokens(b)[t].any(), (name, b, r, c)
    assert np.isfinite(res.delta_near) and np.isfinite(res.delta_elsewhere)


def test_neighbour_mode_is_the_mean_of_unchosen_neighbours_at_the_border_too(case):
    _, model, x, probe = case
    block = 1
    gh, gw = probe.grid(block)
    patches = [(0, 0), (0, 1), (gh - 1, gw - 1), (gh // 2, gw // 2)]
    res = ablation.ablate(model, x, block, patches, "neighbours", baseline=probe)
    tokens = res.probe.tokens(block)           # the stream after block `block`, as later blocks read it
    off = 0 if probe.cls_token is None else 1
    chosen = set(patches)
    for r, c in patches:
        near = [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                if (dr or dc) and 0 <= r + dr < gh and 0 <= c + dc < gw and (r + dr, c + dc) not in chosen]
        want = torch.stack([tokens[off + rr * gw + cc] for rr, cc in near]).mean(0)
        assert torch.allclose(tokens[off + r * gw + c], want, atol=1e-6), (r, c, near)


def test_editor_modes_on_a_known_stream():
    tokens = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)    # CLS + a 3 x 3 grid
    patches = [(0, 0), (1, 1)]
    zero = ablation._editor(patches, (3, 3), "zero", True)(tokens, (3, 3))
    assert not zero[:, [1, 5]].any() and torch.equal(zero[:, [0, 2, 3, 4, 6, 7, 8, 9]], tokens[:, [0, 2, 3, 4, 6, 7, 8, 9]])
    mean = ablation._editor(patches, (3, 3), "mean", True)(tokens, (3, 3))
    assert torch.allclose(mean[:, 1], tokens[:, 1:].mean(1)) and torch.allclose(mean[:, 5], tokens[:, 1:].mean(1))
    near = ablation._editor(patches, (3, 3), "neighbours", True)(tokens, (3, 3))
    assert torch.allclose(near[:, 1], tokens[:, [2, 4]].mean(1))                   # (0,1), (1,0); (1,1) is chosen
    assert torch.allclose(near[:, 5], tokens[:, [2, 3, 4, 6, 7, 8, 9]].mean(1))     # all but (0,0)
    assert torch.equal(tokens, torch.arange(60, dtype=torch.float32).reshape(2, 10, 3))   # not edited in place
    fresh = tokens.clone()
    out = ablation._editor(patches, (3, 3), "neighbours", True)(fresh, (3, 3), True)
    assert out is fresh and torch.equal(out, near)                                 # a block's own output: in place
    alone = ablation._editor([(0, 0), (0, 1), (1, 0), (1, 1)], (2, 2), "neighbours", False)(tokens[:, :4], (2, 2))
    assert torch.equal(alone, torch.zeros_like(alone))          # no unchosen patch at all: zero


def test_attention_share_before_is_the_sum_of_the_columns(case):
    _, model, x, probe = case
    block = probe.num_blocks // 2
    gh, gw = probe.grid(block)
    patches = [(1, 1), (gh - 1, 0)]
    res = ablation.ablate(model, x, block, patches, "mean", baseline=probe)
    plain = attention.capture(model, x)
    off = 0 if plain.cls_token is None else 1
    for layer in range(plain.num_layers):
        grid = plain.grid(layer)
        if grid[0] > gh:                 # SwinV2: a finer stage than the block's holds no such token
            assert res.attention_share[layer, 0] == 0
            continue
        tokens = {off + (r * grid[0] // gh) * grid[1] + c * grid[1] // gw for r, c in patches}
        want = sum(float(plain.column(layer, t).mean()) for t in tokens)
        assert res.attention_share[layer, 0] == pytest.approx(want, rel=1e-5, abs=1e-9)
    np.testing.assert_array_equal(res.attention_share[:block, 0], res.attention_share[:block, 1])
    assert np.abs(res.attention_share[block:, 0] - res.attention_share[block:, 1]).max() > 0


def test_outlier_patches_come_from_the_norms(models):
    from dpt_lab import norms

    model, size = models["dinov2"]
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(22))
    probe = features.capture(model, x)
    result = norms.norms_from_features(probe.features)
    out = norms.find_outliers(result, threshold=1.0)          # every token is over 1
    assert ablation.outlier_patches(probe, 3, threshold=1.0) == sorted({(r, c) for _, r, c, _, _ in out.rows})
    assert ablation.outlier_patches(probe, 3, threshold=1e9) == []


def test_errors_are_typed(case):
    _, model, x, probe = case
    with pytest.raises(LayerError, match="block"):
        ablation.ablate(model, x, 99, [(0, 0)], baseline=probe)
    with pytest.raises(PatchError):
        ablation.ablate(model, x, 0, [(99, 0)], baseline=probe)
    with pytest.raises(ablation.AblationError, match="mode"):
        ablation.ablate(model, x, 0, [(0, 0)], "median", baseline=probe)


def test_cli_writes_the_difference(tmp_path, models, capsys):
    from dpt_lab import cli

    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(image)
    ckpt = save_fixture_checkpoint("depth_anything_v2_vits", tmp_path)
    out = tmp_path / "diff.png"
    assert cli.main(["ablate", str(image), "--model", str(ckpt), "--block", "4", "--patches", "1,1;2,3",
                     "--mode", "zero", "--out", str(out), "--depth", str(tmp_path / "d.npy"),
                     "--share", str(tmp_path / "share.html")]) == 0
    assert Image.open(out).size == (70, 50) and np.load(tmp_path / "d.npy").shape == (50, 70)
    assert "2 patches replaced (zero) from block 4/12" in capsys.readouterr().out
    assert "Attention on the 2 chosen patches" in (tmp_path / "share.html").read_text()
    assert cli.main(["ablate", str(image), "--model", str(ckpt), "--threshold", "1e9", "--out", str(out)]) == 2
    assert "no tokens" in capsys.readouterr().err
