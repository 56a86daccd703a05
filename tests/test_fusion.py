"""Fusion scaling (dpt_lab.fusion, DepthModel.decode(feats, fusion_scales)) on every family's
synthesized checkpoint: identity is the model, a 0 factor removes exactly that fusion
input, any factor equals a hand-built decoder run, bad factors are refused, the encoder
runs once for many slider changes, and the CLI renders PNGs and sweep GIFs from one encode."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import OFFICIAL_NAMES, FixtureModels, save_fixture_checkpoint, small_input
from PIL import Image

import dpt_lab
from dpt_lab import fastpath, fusion
from dpt_lab.encoders.base import EncoderFeatures
from dpt_lab.errors import DPTLabError
from dpt_lab.fusion import FusionError, check_scales, parse_scales

STEMS = sorted(OFFICIAL_NAMES)
# one checkpoint per family for the factor checks (ViT-B / ViT-L are DA v2 at other widths:
# the identity test covers them)
FAMILY_STEMS = ["depth_anything_v1_vits", "depth_anything_v2_vits", "depth_anything_v2_metric_vits",
                "dpt_beit_base_384", "dpt_swin2_tiny_256"]
PHOTO = str(Path(__file__).resolve().parents[1] / "assets" / "chelsea.jpg")   # 451 x 300


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    """stem -> (model, input, its features, the hand-computed fusion inputs), loaded on first use."""
    load = FixtureModels(checkpoint_dir)
    cache = {}

    def get(stem):
        if stem not in cache:
            model = load(stem).eval()
            x = small_input(stem)         # any valid size shows the same thing
            with torch.inference_mode():
                feats = model.encode(x)
                inputs = hand_fusion_inputs(model.decoder, feats)
            cache[stem] = (model, x, feats, inputs)
        return cache[stem]

    return get


def fresh(feats: EncoderFeatures, maps=None) -> EncoderFeatures:
    """The same features in a new object (no cached fusion inputs), maps optionally replaced."""
    return EncoderFeatures(list(maps if maps is not None else feats.maps), feats.cls, feats.out_size)


def hand_fusion_inputs(decoder, feats):
    """reassemble[i] -> layer_rn[i], run by hand from the decoder's modules."""
    inputs = []
    for i in range(4):
        m = feats.maps[i]
        if decoder.reassemble is not None:
            m = decoder.reassemble[i](m, None if feats.cls is None else feats.cls[i])
        inputs.append(decoder.layer_rn[i](m))
    return inputs


def hand_fuse(decoder, inputs, out_size, scales=(1.0, 1.0, 1.0, 1.0), zero: int | None = None):
    """The rest of the decoder by hand: each fusion input scaled (or replaced by a zero map
    for layer `zero`) -> fusion[3] .. fusion[0] -> head. Does not use decoder.fuse."""
    inputs = [torch.zeros_like(m) if i == zero else (m * scales[i] if scales[i] != 1.0 else m)
              for i, m in enumerate(inputs)]
    h = [m.shape[-2:] for m in inputs]
    path = decoder.fusion[3](inputs[3], None, h[2])
    path = decoder.fusion[2](path, inputs[2], h[1])
    path = decoder.fusion[1](path, inputs[1], h[0])
    path = decoder.fusion[0](path, inputs[0], (2 * h[0][0], 2 * h[0][1]))
    return decoder.head(path, out_size)


def same_but_rounding(got, ref) -> bool:
    """Equal up to float32 rounding: on the CPU the decoder's fast path upsamples the finest
    fusion block's output in bands inside the head (DepthHead.from_low_res), which the
    modules called one by one (hand_fuse) do in one resize."""
    return got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# ------------------------------------------------------------------ numbers, every family
@pytest.mark.parametrize("stem", STEMS)
def test_identity_is_the_model_exactly(models, stem):
    model, x, feats, inputs = models(stem)
    with torch.inference_mode():
        full = model(x)
        feats = fresh(feats)
        first = model.decode(feats, (1, 1, 1, 1))      # computes and caches the fusion inputs
        again = model.decode(feats, (1.0, 1.0, 1.0, 1.0))  # from the cache
        plain = model.decode(feats)
        hand = hand_fuse(model.decoder, inputs, feats.out_size)
    assert full.shape == x.shape[:1] + x.shape[-2:]
    for got in (first, again, plain):
        assert torch.equal(got, full)
    assert same_but_rounding(hand, full)
    assert "fusion_inputs" in feats.extras
    assert all(torch.equal(a, b) for a, b in zip(model.fusion_inputs(feats), inputs))


@pytest.mark.parametrize("stem", FAMILY_STEMS)
def test_zero_factor_removes_that_layer(models, stem):
    model, _, feats, inputs = models(stem)
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        unscaled = model.decode(feats)
        for i in range(4):
            scales = tuple(0.0 if j == i else 1.0 for j in range(4))
            got = model.decode(feats, scales)
            # a fusion block fed a zero map where layer_rn[i]'s output was
            assert same_but_rounding(got, hand_fuse(model.decoder, inputs, feats.out_size, zero=i)), f"layer {i + 1}"
            assert not torch.equal(got, unscaled), f"layer {i + 1} contributes nothing even at 1"
            # its contribution is gone: whatever that encoder map holds, the depth stays
            noisy = list(feats.maps)
            noisy[i] = torch.randn(noisy[i].shape, generator=g) * noisy[i].std() * 3
            noisy_feats = fresh(feats, noisy)
            assert torch.equal(model.decode(noisy_feats, scales), got), f"layer {i + 1}"
            assert not torch.equal(model.fusion_inputs(noisy_feats)[i], inputs[i])  # the noise did reach it


@pytest.mark.parametrize("stem", FAMILY_STEMS)
def test_negative_and_large_factors(models, stem):
    model, _, feats, inputs = models(stem)
    with torch.inference_mode():
        unscaled = model.decode(feats)
        for scales in ((-5.0, 5.0, 2.5, -0.75), (0.37, -2.2, 4.99, 0.0)):
            got = model.decode(feats, scales)
            ref = hand_fuse(model.decoder, inputs, feats.out_size, scales)
            assert torch.isfinite(got).all() and got.shape == unscaled.shape
            assert same_but_rounding(got, ref), scales
            assert not torch.equal(got, unscaled), scales
            with fastpath.disabled():     # the modules' own order: the same loop, exactly
                assert torch.equal(model.decoder.fuse(inputs, feats.out_size, scales),
                                   hand_fuse(model.decoder, inputs, feats.out_size, scales)), scales


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("bad", [
    (math.nan, 1, 1, 1), (1, math.inf, 1, 1), (1, 1, -math.inf, 1), (1, 1, 1, 5.0001), (-5.01, 1, 1, 1),
    (1, 1, 1), (1, 1, 1, 1, 1), (), ("a", 1, 1, 1), (None, 1, 1, 1), None, 3.0, "1,1,1,1",
])
def test_check_scales_rejects(bad):
    with pytest.raises(FusionError):
        check_scales(bad)


def test_check_scales_accepts_and_parses():
    assert check_scales((-5, 5, 0, 1)) == (-5.0, 5.0, 0.0, 1.0)
    assert all(type(v) is float for v in check_scales(np.array([1, 2, 3, 4], dtype=np.int64)))
    assert parse_scales("1, 0.5,0,-1") == (1.0, 0.5, 0.0, -1.0)
    for text in ("1,0.5,0", "1,nan,1,1", "1,x,1,1", "6,1,1,1", ""):
        with pytest.raises(FusionError):
            parse_scales(text)
    assert issubclass(FusionError, DPTLabError) and issubclass(FusionError, ValueError)


def test_bad_factors_never_reach_the_decoder(models, monkeypatch):
    model, _, feats, _ = models("depth_anything_v2_vits")
    calls = []
    monkeypatch.setattr(model.decoder, "fuse", lambda *a, **k: calls.append(1))
    for bad in ((1, math.nan, 1, 1), (1, 1, 1), (9, 1, 1, 1)):
        with pytest.raises(FusionError):
            fusion.scaled_depth(model, feats, bad)
    assert calls == []


def test_presets_and_glitch():
    assert fusion.PRESETS["reset"] == (1.0, 1.0, 1.0, 1.0)
    assert fusion.PRESETS["solo 2"] == (0.0, 1.0, 0.0, 0.0)
    assert fusion.PRESETS["drop 4"] == (1.0, 1.0, 1.0, 0.0)
    for preset in fusion.PRESETS.values():
        check_scales(preset)
    glitch = fusion.random_glitch(3)
    assert glitch == fusion.random_glitch(3) and check_scales(glitch) == glitch
    assert glitch != (1.0, 1.0, 1.0, 1.0)
    assert len(fusion.LAYER_LABELS) == 4


# ------------------------------------------------------------------ one encode, many renders
class Counter:
    """Wraps a bound method and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def count_calls(monkeypatch, model):
    enc = Counter(model.encoder.forward)
    rea = Counter(model.decoder.reassembled)
    monkeypatch.setattr(model.encoder, "forward", enc)
    monkeypatch.setattr(model.decoder, "reassembled", rea)
    return enc, rea


def test_encoder_runs_once_for_many_slider_changes(models, monkeypatch):
    model = models("depth_anything_v2_vits")[0]
    enc, rea = count_calls(monkeypatch, model)
    x, meta = model.preprocess(PHOTO, base_size=140)
    with torch.inference_mode():
        feats = model.encode(x)
    # a slider dragged through 30 positions, then reset
    positions = [(1.0, round(v, 2), 1.0, 1.0) for v in np.linspace(-2, 3, 30)] + [(1.0, 1.0, 1.0, 1.0)]
    depths = [fusion.scaled_depth(model, feats, s) for s in positions]
    assert enc.calls == 1
    assert rea.calls == 1  # reassemble + layer_rn too: a slider change runs fusion + head only
    assert len({d.sum().item() for d in depths}) == len(positions)  # every position renders differently
    with torch.inference_mode():
        full = model(x)
    assert torch.equal(depths[-1], full)
    assert enc.calls == 2
    depth = model.postprocess(depths[3], meta)
    assert depth.shape == meta.image_size


def test_fusion_input_cache_is_per_model_and_per_maps(models):
    model, x, feats, _ = models("depth_anything_v2_vits")
    other = models("depth_anything_v1_vits")[0]  # same shapes, another decoder
    with torch.inference_mode():
        feats = fresh(feats)
        mine = model.decode(feats, (1, 2, 1, 1))
        theirs = other.decode(feats, (1, 2, 1, 1))  # must not take model's cached inputs
        assert torch.equal(theirs, other.decode(fresh(feats), (1, 2, 1, 1)))
        assert not torch.equal(mine, theirs)
        assert torch.equal(model.decode(feats, (1, 2, 1, 1)), mine)
        feats.maps[0] = feats.maps[0] * 0.5  # replaced map: recomputed
        assert torch.equal(model.decode(feats), model.decode(fresh(feats)))
        assert not torch.equal(model.decode(feats, (1, 2, 1, 1)), mine)
    # with autograd on, nothing is cached (and the numbers are the same)
    with torch.no_grad():
        feats2 = model.encode(x)
        ref = model.decode(fresh(feats2), (0.5, 1, 1, 1))
    got = model.decode(feats2, (0.5, 1, 1, 1))
    assert "fusion_inputs" not in feats2.extras
    assert torch.equal(got.detach(), ref)


def test_a_slider_move_reruns_only_the_blocks_its_factor_reaches(models, monkeypatch):
    """Block k's output depends on factors k.. and its skip branch on factor k alone: a move
    takes the rest from the last decode of the same features, with the same numbers."""
    model, _, feats, _ = models("depth_anything_v2_vits")
    moves = [(1, 0.9, 1, 1), (1, 0.5, 1, 1), (0.7, 0.5, 1, 1), (0.7, 0.5, 1, 2), (0.7, 0.5, 1, 2), (0.7, 0.5, -1, 2)]
    with torch.inference_mode():
        refs = [model.decode(fresh(feats), s) for s in moves]
    ran = []
    for k, block in enumerate(model.decoder.fusion):
        for part in ("rcu1", "rcu2"):
            unit = getattr(block, part)
            monkeypatch.setattr(unit, "forward", lambda x, _f=unit.forward, _n=f"{part}.{k}": (ran.append(_n), _f(x))[1])

    def decode(f, s):
        ran.clear()
        with torch.inference_mode():
            return model.decode(f, s), sorted(ran)

    feats = fresh(feats)
    decode(feats, (1, 1, 1, 1))          # a plain decode (a new image's depth) keeps no stages
    assert feats.extras["fusion_inputs"][2].paths == {}
    expected_runs = [
        ["rcu1.0", "rcu1.1", "rcu1.2", "rcu2.0", "rcu2.1", "rcu2.2", "rcu2.3"],   # first decode: everything
        ["rcu1.1", "rcu2.0", "rcu2.1"],                                            # factor 2: block 1, block 0 after its skip
        ["rcu1.0", "rcu2.0"],                                                      # factor 1: block 0 only
        ["rcu2.0", "rcu2.1", "rcu2.2", "rcu2.3"],                                  # factor 4: no skip branch changed
        ["rcu2.0"],                                                                # the same factors: block 0's output is not kept
        ["rcu1.2", "rcu2.0", "rcu2.1", "rcu2.2"],                                  # factor 3
    ]
    for scales, ref, expected in zip(moves, refs, expected_runs):
        got, runs = decode(feats, scales)
        assert torch.equal(got, ref), scales
        assert runs == expected, scales
    # another set of features decoded by the model: the first one's stages are let go
    other = fresh(feats)
    decode(other, moves[-1])
    assert feats.extras["fusion_inputs"][2].paths == {} and feats.extras["fusion_inputs"][2].skips == {}
    got, runs = decode(feats, moves[-1])
    assert torch.equal(got, refs[-1]) and len(runs) == 7
    # stages made with the fast path are not taken without it (other rounding; the cached
    # fusion inputs are the fast path's in both)
    with fastpath.disabled():
        got, runs = decode(feats, moves[-1])
        again, runs_again = decode(feats, moves[-1])
    assert len(runs) == 7 and runs_again == ["rcu2.0"] and torch.equal(got, again)
    assert torch.allclose(got, refs[-1], atol=1e-5)


def test_cached_features_do_not_keep_the_model_alive(tmp_path):
    """A session's features outlive an evicted model: their cache holds the decoder weakly."""
    import gc
    import weakref

    model = dpt_lab.load_model(save_fixture_checkpoint("depth_anything_v2_vits", tmp_path)).eval()
    with torch.inference_mode():
        feats = model.encode(small_input("depth_anything_v2_vits"))
        model.decode(feats, (1, 2, 1, 1))
    assert "fusion_inputs" in feats.extras
    alive = weakref.ref(model.decoder)   # the weights (a model is its encoder + decoder)
    del model
    gc.collect()
    assert alive() is None


# ------------------------------------------------------------------ CLI
def cli_args(*argv):
    parser = argparse.ArgumentParser()
    fusion.add_subcommand(parser.add_subparsers())
    return parser.parse_args(["fusion", *argv])


def test_cli_scales_png_and_sweep_gif(models, monkeypatch, tmp_path):
    model = models("depth_anything_v2_vits")[0]
    enc, rea = count_calls(monkeypatch, model)
    monkeypatch.setattr("dpt_lab.checkpoints.load_model", lambda *a, **k: model)
    photo = Image.open(PHOTO)

    png = tmp_path / "depth.png"
    fusion.run_cli(cli_args(PHOTO, "--model", "m", "--scales", "1,0.5,0,1", "--base-size", "140", "--out", str(png)))
    with Image.open(png) as img:
        assert img.size == photo.size and img.mode == "RGB"
        scaled = np.asarray(img)
    png1 = tmp_path / "identity.png"
    fusion.run_cli(cli_args(PHOTO, "--model", "m", "--base-size", "140", "--out", str(png1)))
    assert not np.array_equal(scaled, np.asarray(Image.open(png1)))
    assert enc.calls == 2

    gif = tmp_path / "sweep.gif"
    fusion.run_cli(cli_args(PHOTO, "--model", "m", "--sweep", "2", "-1", "3", "--frames", "6",
                            "--base-size", "140", "--out", str(gif)))
    assert enc.calls == 3 and rea.calls == 3  # one encode (and one reassemble) for all six frames
    with Image.open(gif) as img:
        assert img.format == "GIF" and img.n_frames == 6 and img.size == photo.size
        frames = []
        for k in range(img.n_frames):
            img.seek(k)
            frames.append(np.asarray(img.convert("RGB")))
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))

    # bad factors are refused before anything is loaded or encoded
    for argv in (("--sweep", "5", "0", "1"), ("--sweep", "x", "0", "1"), ("--sweep", "1", "0", "9"),
                 ("--sweep", "1", "0", "1", "--frames", "1"), ("--scales", "1,1,1"), ("--scales", "1,inf,1,1")):
        with pytest.raises(FusionError):
            fusion.run_cli(cli_args(PHOTO, "--model", "m", *argv, "--out", str(tmp_path / "x.out")))
    assert enc.calls == 3


def test_sweep_frames_are_the_scaled_depths(models):
    model = models("depth_anything_v2_vits")[0]
    x, meta = model.preprocess(PHOTO, base_size=140)
    with torch.inference_mode():
        feats = model.encode(x)
    scales = fusion.sweep_scales(4, -2.0, 2.0, 5)
    assert [s[3] for s in scales] == [-2.0, -1.0, 0.0, 1.0, 2.0] and all(s[:3] == (1.0, 1.0, 1.0) for s in scales)
    frames = fusion.render_sweep(model, feats, meta, 4, -2.0, 2.0, 5, cmap="gray")
    depths = [model.postprocess(fusion.scaled_depth(model, feats, s), meta) for s in scales]
    lo, hi = min(d.min() for d in depths), max(d.max() for d in depths)
    for frame, d in zip(frames, depths):  # one shared colour range across the frames
        expected = np.rint(np.clip((d.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        assert frame.shape == meta.image_size + (3,)
        assert np.abs(frame[..., 0].astype(int) - expected).max() <= 1
    with pytest.raises(FusionError):
        fusion.sweep_scales(1, 0, 1, 1)


def test_app_session_slider_runs_only_fusion_and_head(monkeypatch, tmp_path):
    """Through the app's own path (session.Lab.fusion_view, what the Fusion tab calls): one
    encode and one reassemble for a whole drag; each move re-runs fusion + head only."""
    from dpt_lab import session as S

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("DPT_LAB_WEIGHTS", raising=False)
    lab = S.Lab(S.ModelManager(weights_dir=tmp_path / "none"))
    model = lab.manager.get(S.RANDOM_MODEL)
    enc, rea = count_calls(monkeypatch, model)
    fuse = Counter(model.decoder.fuse)
    monkeypatch.setattr(model.decoder, "fuse", fuse)
    state, res = lab.depth_view("s", None, PHOTO, S.RANDOM_MODEL, 112, "default", "gray")
    drag = [(1.0, 1.0, round(v, 2), 1.0) for v in np.linspace(1.0, -3.0, 12)[1:]]
    views = [lab.fusion_view("s", state, scales) for scales in drag]
    assert enc.calls == 1 and rea.calls == 1
    assert fuse.calls == 1 + len(drag)                        # the unscaled depth, then one per move
    assert all(not np.array_equal(v.depth, res.depth) for v in views)
    assert np.array_equal(lab.fusion_view("s", state, (1, 1, 1, 1)).depth, res.depth)
    assert enc.calls == 1
