"""Depth geometry and masking (dpt_lab.scene, dpt_lab.mask): the robust plane against a
floor with a box on it, its removal, masks against the threshold comparison, cut-outs,
equalisation, the Lab's mask view on the cached encode and the `mask` command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures import save_fixture_checkpoint
from PIL import Image

from dpt_lab import mask as mask_mod
from dpt_lab import scene
from dpt_lab.scene import SceneError

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "chelsea.jpg"          # 451 x 300
FLOOR = (0.002, 0.01, 1.0)                       # a, b, c: depth = a*x + b*y + c


def floor_and_box(noise=0.0, h=300, w=400, height=2.0):
    """A tilted floor plane with a raised box covering a third of the image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a, b, c = FLOOR
    depth = a * xx + b * yy + c
    box = (yy >= 50) & (yy < 223) & (xx >= 60) & (xx < 291)
    assert 0.32 < box.mean() < 0.34
    depth = depth + np.where(box, height, 0.0)
    if noise:
        depth = depth + np.random.default_rng(1).normal(0.0, noise, depth.shape)
    return depth.astype(np.float32), box


@pytest.mark.parametrize("noise", [0.0, 0.002])
def test_fit_plane_recovers_the_floor_with_a_box_on_it(noise):
    depth, box = floor_and_box(noise)
    got = scene.fit_plane(depth)
    for want, value in zip(FLOOR, got):
        assert value == pytest.approx(want, rel=0.01), (got, FLOOR)
    # a plain least-squares plane is tilted by the box: more than 1% off on some coefficient
    yy, xx = np.mgrid[0:depth.shape[0], 0:depth.shape[1]]
    design = np.stack([xx.ravel(), yy.ravel(), np.ones(depth.size)], axis=1)
    plain = np.linalg.lstsq(design, depth.ravel().astype(np.float64), rcond=None)[0]
    assert any(abs(p - w) > 0.01 * abs(w) for p, w in zip(plain, FLOOR)), plain


def test_fit_plane_inside_a_mask_and_on_degenerate_input():
    depth, box = floor_and_box()
    got = scene.fit_plane(depth, mask=box)                 # the box's top: the floor's tilt, lifted by 2
    assert got == pytest.approx((FLOOR[0], FLOOR[1], FLOOR[2] + 2.0), rel=1e-3)
    assert scene.fit_plane(np.full((5, 7), 3.0)) == (0.0, 0.0, 3.0)
    with pytest.raises(SceneError, match="fewer than 3"):
        scene.fit_plane(np.full((4, 4), np.nan))
    with pytest.raises(SceneError, match="mask shape"):
        scene.fit_plane(depth, mask=np.ones((3, 3), bool))


def test_remove_plane_levels_the_floor_and_keeps_the_box_height():
    depth, box = floor_and_box()
    flat = scene.remove_plane(depth, strength=1.0)
    assert flat.dtype == np.float32 and flat.shape == depth.shape
    floor = flat[~box]
    assert np.ptp(floor) <= 1e-3 * np.ptp(depth)            # constant to within 1e-3 of the range
    assert np.median(flat[box]) - np.median(floor) == pytest.approx(2.0, abs=1e-3)
    half = scene.remove_plane(depth, strength=0.5, plane=FLOOR)
    np.testing.assert_allclose(half, depth - 0.5 * scene.plane_values(depth.shape, FLOOR), atol=1e-5)
    np.testing.assert_array_equal(scene.remove_plane(depth, 0), depth)
    with pytest.raises(SceneError, match="plane strength must be a number"):
        scene.remove_plane(depth, "strong")


def test_depth_mask_is_the_threshold_comparison():
    rng = np.random.default_rng(2)
    depth = rng.uniform(3.0, 9.0, (40, 60)).astype(np.float32)
    depth[0, 0] = np.nan
    v = (depth.astype(np.float64) - np.nanmin(depth)) / (np.nanmax(depth) - np.nanmin(depth))
    want = (v >= 0.3) & (v <= 0.8)
    np.testing.assert_array_equal(scene.depth_mask(depth, 0.3, 0.8), want)
    np.testing.assert_array_equal(scene.depth_mask(depth, 0.3, 0.8, invert=True), ~want & np.isfinite(depth))
    metres = (depth >= 4.0) & (depth <= 6.5)
    np.testing.assert_array_equal(scene.depth_mask(depth, 4.0, 6.5, normalised=False), metres)
    assert not scene.depth_mask(depth, 0, 1)[0, 0] and not scene.depth_mask(depth, 0, 1, invert=True)[0, 0]


@pytest.mark.parametrize("low, high, normalised, message", [
    (0.8, 0.3, True, "is above range high"),
    (0.2, 1.5, True, "within 0..1"),
    (-0.1, 0.5, True, "within 0..1"),
    ("near", 0.5, True, "range low must be a number"),
    (0.1, float("nan"), False, "finite"),
])
def test_depth_mask_bad_ranges_say_why(low, high, normalised, message):
    with pytest.raises(SceneError, match=message):
        scene.depth_mask(np.ones((4, 4)), low, high, normalised=normalised)


def test_cut_out_alpha_is_the_mask_and_preview_shows_the_checkerboard():
    rgb = np.asarray(Image.open(ASSET).convert("RGB"))
    keep = np.zeros(rgb.shape[:2], bool)
    keep[50:200, 100:300] = True
    rgba = mask_mod.cut_out(rgb, keep)
    assert rgba.shape == rgb.shape[:2] + (4,) and rgba.dtype == np.uint8
    np.testing.assert_array_equal(rgba[..., 3] == 255, keep)
    np.testing.assert_array_equal(rgba[..., :3], rgb)
    shown = mask_mod.preview(rgb, keep)
    np.testing.assert_array_equal(shown[keep], rgb[keep])
    assert set(np.unique(shown[~keep])) <= {153, 204}
    with pytest.raises(SceneError, match="differ"):
        mask_mod.cut_out(rgb, keep[:10])


def test_equalise_spreads_the_values_evenly_and_keeps_their_order():
    rng = np.random.default_rng(3)
    depth = rng.lognormal(0, 1.0, (200, 300)).astype(np.float32)       # heavily skewed
    out = scene.equalise(depth)
    assert out.min() >= 0 and out.max() <= 1
    counts, _ = np.histogram(out, bins=10, range=(0, 1))
    assert counts.min() > 0.8 * depth.size / 10                        # near uniform
    order = np.argsort(depth.ravel())
    assert np.all(np.diff(out.ravel()[order]) >= 0)                    # monotonic


def test_lab_mask_view_never_re_encodes(tmp_path, monkeypatch):
    from dpt_lab import session as S

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "w").mkdir()
    save_fixture_checkpoint("depth_anything_v2_vits", tmp_path / "w")
    lab = S.Lab(S.ModelManager(weights_dir=tmp_path / "w"))
    name = lab.manager.startup
    st, _ = lab.depth_view("s", None, str(ASSET), name, 140)
    encodes = lab.store.encodes
    views = [lab.mask_view("s", st, lo, 1.0, inv, plane, contrast)
             for lo, inv, plane, contrast in ((0.3, False, 0, False), (0.5, True, 1, True), (0.1, False, 0.5, False))]
    assert lab.store.encodes == encodes
    depth = lab.entry("s", st).depth_image
    first = views[0]
    np.testing.assert_array_equal(first.masked.keep, scene.depth_mask(depth, 0.3, 1.0))
    assert first.preview.shape == (300, 451, 3) and first.mask.shape == (300, 451)
    assert "kept" in first.text and "normalised inverse depth" in first.text
    assert "removed x 1" in views[1].text and "equalised" in views[1].text
    files = lab.mask_files("s", st, tmp_path / "out", 0.3, 0.9, False, 1.0)
    with Image.open(files["cutout"]) as im:
        assert im.mode == "RGBA" and im.size == (451, 300)
        alpha = np.asarray(im)[..., 3]
    with Image.open(files["mask"]) as im:
        np.testing.assert_array_equal(np.asarray(im) == 255, alpha == 255)
    flat = np.load(files["npy"])
    np.testing.assert_allclose(flat, scene.remove_plane(depth, 1.0, scene.fit_plane(depth)), atol=1e-5)
    assert lab.store.encodes == encodes
    with pytest.raises(SceneError, match="above range high"):
        lab.mask_view("s", st, 0.9, 0.2)


def test_mask_command_line_writes_the_cutout(tmp_path, capsys, monkeypatch):
    from dpt_lab import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = save_fixture_checkpoint("depth_anything_v2_vits", tmp_path)
    out, mask_png, flat = tmp_path / "cut.png", tmp_path / "mask.png", tmp_path / "flat.npy"
    rc = cli.main(["mask", str(ASSET), "--model", str(ckpt), "--range", "0.4,1.0", "--plane", "1", "--out", str(out),
                   "--mask", str(mask_png), "--depth", str(flat), "--base-size", "140"])
    assert rc in (0, None)
    assert "kept" in capsys.readouterr().out
    with Image.open(out) as im, Image.open(mask_png) as m:
        assert im.mode == "RGBA" and im.size == (451, 300)
        np.testing.assert_array_equal(np.asarray(im)[..., 3], np.asarray(m))
    assert np.load(flat).shape == (300, 451)
    for bad, message in ((["--range", "0.9,0.2"], "above range high"), (["--range", "0.5"], "LOW,HIGH"),
                         (["--range", "0,1", "--plane", "lots"], "--plane must be a number")):
        rc = cli.main(["mask", str(ASSET), "--model", str(ckpt), "--out", str(tmp_path / "x.png"), *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], err
