"""Block norms: values against transformers' hidden states (Depth-Anything and BEiT -hf),
SwinV2 stage grids, the outlier finder, the figures, the CSV, the overlay and the CLI."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from fixtures import save_fixture_checkpoint

import dpt_lab
from dpt_lab import Record, norms
from dpt_lab.norms import BlockError, BlockNorms, NormsError, ThresholdError


def synthetic(blocks=4, grid=(6, 8), seed=0, cls=True, loc=10.0, scale=1.0):
    rng = np.random.default_rng(seed)
    patch = [rng.normal(loc, scale, size=grid).astype(np.float32) for _ in range(blocks)]
    cls_norms = [float(v) for v in rng.uniform(20, 30, blocks)] if cls else None
    return BlockNorms(patch, cls_norms, [tuple(grid)] * blocks, cls, input_size=(grid[0] * 14, grid[1] * 14))


def close(ours, theirs, tol=1e-4):
    ours, theirs = torch.as_tensor(ours), torch.as_tensor(theirs)
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= tol * max(1.0, theirs.abs().max().item()), f"max abs error {err:.3g}"


# -- values against transformers --------------------------------------------------------
def test_depth_anything_norms_match_transformers_hidden_states(tmp_path):
    pytest.importorskip("transformers")
    from hf_reference import depth_anything_hf

    reference = depth_anything_hf(tmp_path / "da", layers=4)
    model = dpt_lab.load_model(tmp_path / "da")
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        hidden = reference(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hidden) == 5                     # embeddings + one per block
    for batch in (0, 1):
        result = norms.block_norms(model, x, batch=batch)
        assert result.num_blocks == 4 and result.has_cls and result.grids == [(4, 4)] * 4
        for b in range(4):
            want = hidden[b + 1][batch].norm(dim=-1)          # residual after block b, before the final norm
            close(result.patch_norms[b], want[1:].reshape(4, 4))
            close(torch.tensor(result.cls_norms[b]), want[0])


@pytest.mark.skipif(importlib.util.find_spec("dpt_lab.encoders.beit") is None, reason="BEiT encoder not written yet")
def test_beit_norms_match_transformers_hidden_states(tmp_path):
    pytest.importorskip("transformers")
    from test_beit import beit_hf

    reference = beit_hf(tmp_path / "beit", layers=4, out_indices=(1, 2, 3, 4))
    model = dpt_lab.load_model(tmp_path / "beit")
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))   # off the native 4 x 4 grid
    with torch.inference_mode():
        hidden = reference(pixel_values=x, output_hidden_states=True).hidden_states
    result = norms.block_norms(model, x)
    assert result.num_blocks == 4 and result.grids == [(4, 6)] * 4 and result.has_cls
    for b in range(4):
        want = hidden[b + 1][0].norm(dim=-1)
        close(result.patch_norms[b], want[1:].reshape(4, 6))
        close(torch.tensor(result.cls_norms[b]), want[0])


@pytest.mark.skipif(importlib.util.find_spec("dpt_lab.encoders.swin2") is None, reason="SwinV2 encoder not written yet")
def test_swin2_norms_on_each_stage_grid(tmp_path):
    model = dpt_lab.load_model(save_fixture_checkpoint("dpt_swin2_tiny_256", tmp_path))
    x = torch.randn(1, 3, 128, 192, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        feats = model.encode(x, Record(norms=True))
    result = norms.norms_from_features(feats)
    assert not result.has_cls and result.cls_norms is None
    grids = [(32 // 2 ** s, 48 // 2 ** s) for s in range(4)]
    assert sorted(set(result.grids), reverse=True) == grids
    assert [a.shape for a in result.patch_norms] == result.grids
    # the last block of each stage is the stage's output map (the residual stream, no norm)
    last = [max(i for i, g in enumerate(result.grids) if g == grid) for grid in grids]
    for stage, b in enumerate(last):
        close(result.patch_norms[b], feats.maps[stage][0].norm(dim=0))
    assert result.patch_size(last[0] + 1) == (4.0, 4.0) and result.patch_size(last[3] + 1) == (32.0, 32.0)
    out = norms.find_outliers(result)
    fig = norms.heatmap_figure(result, outliers=out)
    assert [np.shape(t.z) for t in fig.data if t.type == "heatmap"] == result.grids
    assert norms.draw_outliers(np.zeros((128, 192, 3), np.uint8), ((128, 192), (128, 192)), result, out).shape \
        == (128, 192, 3)


def test_norms_need_a_recorded_encode():
    feats = dpt_lab.EncoderFeatures(maps=[], cls=None, out_size=(14, 14))
    with pytest.raises(NormsError, match="Record\\(norms=True\\)"):
        norms.norms_from_features(feats)


# -- outliers ---------------------------------------------------------------------------
PLANTED = [(1, 2, 3), (2, 30, 17), (2, 0, 36)]       # (block 1-based, row, col)


def planted():
    result = synthetic(blocks=3, grid=(37, 37), seed=1)
    for b, r, c in PLANTED:
        result.patch_norms[b - 1][r, c] = 500.0
    return result


def test_auto_threshold_finds_exactly_the_planted_tokens():
    out = norms.find_outliers(planted())
    assert out.mode == "auto" and out.total == 3
    assert sorted((b, r, c) for b, r, c, _, _ in out.rows) == sorted(PLANTED)
    assert all(n == 500.0 for _, _, _, n, _ in out.rows)
    assert out.counts.tolist() == [1, 2, 0]
    assert all(15 < t < 30 for t in out.thresholds)          # ~ median 10 + 6 robust sigmas, or 2 x median


def test_flat_field_gives_no_outliers():
    flat = BlockNorms([np.full((37, 37), 12.5, np.float32) for _ in range(3)], None, [(37, 37)] * 3, False)
    assert norms.find_outliers(flat).total == 0
    assert norms.find_outliers(synthetic(blocks=3, grid=(37, 37), seed=2)).total == 0     # a normal field
    nearly = synthetic(blocks=2, grid=(37, 37), scale=1e-6)             # MAD ~ 0: float noise is not an outlier
    assert norms.find_outliers(nearly).total == 0
    zeros = BlockNorms([np.zeros((4, 4), np.float32)], [0.0], [(4, 4)], True)
    assert norms.find_outliers(zeros).total == 0


def test_fixed_threshold_and_bad_thresholds():
    result = planted()
    result.patch_norms[0][5, 5] = 149.0
    result.patch_norms[0][6, 6] = 151.0
    out = norms.find_outliers(result, threshold=150)
    assert out.mode == "fixed" and out.thresholds.tolist() == [150.0] * 3
    assert sorted((b, r, c) for b, r, c, _, _ in out.rows) == sorted(PLANTED + [(1, 6, 6)])
    assert norms.find_outliers(result, threshold="600").total == 0
    assert norms.find_outliers(result, threshold=" Auto ").mode == "auto"
    for bad in (-1, 0, "abc", float("nan"), True):
        with pytest.raises(ThresholdError):
            norms.find_outliers(result, threshold=bad)
    with pytest.raises(ThresholdError):
        norms.find_outliers(result, k=0)
    with pytest.raises(ThresholdError):
        norms.find_outliers(result, min_ratio=0.5)
    assert norms.find_outliers(result, k=1e6).total == 0 and norms.find_outliers(result, k=1).total >= 3


def test_nan_norms_are_ignored():
    result = planted()
    result.patch_norms[0][0, 0] = np.nan
    out = norms.find_outliers(result)
    assert sorted((b, r, c) for b, r, c, _, _ in out.rows) == sorted(PLANTED)
    assert np.isfinite(result.stats()["median"]).all()


# -- figures ----------------------------------------------------------------------------
TITLE = re.compile(r"^block (\d+) · min ([-\d.e+]+) / max ([-\d.e+]+)$")


@pytest.mark.parametrize("shared", [True, False])
def test_heatmap_figure_one_heatmap_per_block_with_titles(shared):
    result = planted()
    out = norms.find_outliers(result)
    fig = norms.heatmap_figure(result, shared_scale=shared, outliers=out)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == result.num_blocks
    titles = [a.text for a in fig.layout.annotations if a.text.startswith("block ")]
    assert len(titles) == result.num_blocks
    for b, (trace, title) in enumerate(zip(heat, titles)):
        k, lo, hi = TITLE.match(title).groups()
        a = result.patch_norms[b]
        assert int(k) == b + 1
        assert math.isclose(float(lo), a.min(), rel_tol=5e-3) and math.isclose(float(hi), a.max(), rel_tol=5e-3)
        assert np.shape(trace.z) == a.shape
        np.testing.assert_allclose(np.array(trace.z, dtype=float), a, rtol=1e-3)
        assert f"block {b + 1}" in trace.hovertemplate and all(s in trace.hovertemplate for s in ("%{x}", "%{y}", "%{z}"))
    if shared:
        assert all(t.coloraxis == "coloraxis" for t in heat)
        assert fig.layout.coloraxis.cmax == 500.0
    else:
        assert all(t.coloraxis is None for t in heat)
    marks = [t for t in fig.data if t.type == "scatter"]
    assert sorted((int(y), int(x)) for t in marks for x, y in zip(t.x, t.y)) == sorted((r, c) for _, r, c in PLANTED)


def decoded(trace_array) -> np.ndarray:
    """A figure array as the browser gets it: plotly sends numpy arrays as base64 typed arrays."""
    import base64

    if isinstance(trace_array, dict):
        shape = tuple(int(v) for v in str(trace_array["shape"]).split(","))
        return np.frombuffer(base64.b64decode(trace_array["bdata"]), dtype=trace_array["dtype"]).reshape(shape)
    return np.asarray(trace_array)


@pytest.mark.parametrize("grids", [[(37, 37)] * 3, [(12, 16), (6, 8), (3, 4), (3, 4)]],
                         ids=["vit", "swin-stages"])
def test_mosaic_figure_tiles_every_block_into_one_heatmap(grids):
    rng = np.random.default_rng(4)
    patch = [rng.uniform(1, 50, g).astype(np.float32) for g in grids]
    patch[-1][1, 2] = 900.0
    result = BlockNorms(patch, None, grids, False, (grids[0][0] * 14, grids[0][1] * 14))
    out = norms.find_outliers(result)
    fig = json.loads(norms.mosaic_figure(result, outliers=out).to_json())     # what the page receives
    (heat,) = [t for t in fig["data"] if t["type"] == "heatmap"]
    z, where = decoded(heat["z"]).astype(np.float64), decoded(heat["customdata"]).astype(int)
    for b, a in enumerate(patch):       # every token once, at the cell whose customdata names it
        cells = where[..., 0] == b + 1
        assert cells.sum() == a.size
        rows, cols = where[cells][:, 1], where[cells][:, 2]
        np.testing.assert_allclose(z[cells], a[rows, cols], rtol=1e-6)
    assert np.isnan(z[where[..., 0] == 0]).all()            # the gutters are gaps
    for w in ("block %{customdata[0]}", "row %{customdata[1]}, col %{customdata[2]}", "norm %{z"):
        assert w in heat["hovertemplate"]
    titles = [a["text"] for a in fig["layout"]["annotations"] if a["text"].startswith("block ")]
    assert [int(TITLE.match(t).group(1)) for t in titles] == list(range(1, len(grids) + 1))
    (marks,) = [t for t in fig["data"] if t["type"] == "scatter"]   # each outlier on its own cell
    for x, y, (blk, row, col, _norm) in zip(marks["x"], marks["y"], marks["customdata"]):
        assert tuple(where[int(y), int(x)]) == (blk, row, col)
    assert (len(grids), 1, 2) in {tuple(c[:3]) for c in marks["customdata"]}


def test_mosaic_json_of_vit_l_at_518_stays_under_a_megabyte():
    rng = np.random.default_rng(0)
    patch = [rng.lognormal(3, 0.6, (37, 56)).astype(np.float32) for _ in range(24)]
    result = BlockNorms(patch, [30.0] * 24, [(37, 56)] * 24, True, (518, 784))
    assert len(norms.mosaic_figure(result, outliers=norms.find_outliers(result)).to_json()) < 1_000_000


def test_heatmap_json_of_vit_l_at_518_is_small():
    """24 blocks of 37 x 37 (ViT-L at 518), heavy-tailed norms: the serialized figure < 5 MB."""
    rng = np.random.default_rng(0)
    patch = [(rng.lognormal(3, 0.6, (37, 37)) * (1 + 0.01 * rng.random((37, 37)))).astype(np.float32)
             for _ in range(24)]
    for a in patch[12:]:
        a[rng.integers(0, 37, 6), rng.integers(0, 37, 6)] = rng.uniform(150, 600, 6)
    result = BlockNorms(patch, [30.0] * 24, [(37, 37)] * 24, True, (518, 518))
    out = norms.find_outliers(result)
    size = len(norms.heatmap_figure(result, outliers=out).to_json())
    assert size < 5_000_000
    assert size < 600_000          # in fact ~ 7 bytes a token
    json.loads(norms.stats_figure(result, out).to_json())


def test_stats_and_histogram_figures():
    result = planted()
    out = norms.find_outliers(result)
    fig = norms.stats_figure(result, out)
    names = [t.name for t in fig.data]
    assert {"median", "p99", "max", "CLS", "threshold", "outliers"} <= set(names)
    s = result.stats()
    med = next(t for t in fig.data if t.name == "median")
    np.testing.assert_allclose(med.y, s["median"], rtol=1e-3)
    assert list(med.x) == [1, 2, 3]
    assert list(next(t for t in fig.data if t.name == "outliers").y) == [1, 2, 0]
    np.testing.assert_allclose(next(t for t in fig.data if t.name == "threshold").y, out.thresholds, rtol=1e-3)
    no_cls = BlockNorms(result.patch_norms, None, result.grids, False)
    assert "CLS" not in [t.name for t in norms.stats_figure(no_cls).data]

    h = norms.histogram_figure(result, 2, out, bins=40)
    bars = [t for t in h.data if t.type == "bar"]
    assert len(bars) == 1 and sum(bars[0].y) == 37 * 37 and len(bars[0].y) == 40
    assert "block 2" in h.layout.title.text and "2 outliers" in h.layout.title.text
    for bad in (0, 4, 1.5):
        with pytest.raises(BlockError):
            norms.histogram_figure(result, bad)


def test_figures_html_is_standalone():
    result = planted()
    out = norms.find_outliers(result)
    page = norms.figures_html(norms.heatmap_figure(result), norms.stats_figure(result, out),
                              norms.histogram_figure(result, 1, out), outliers=out, text="summary <x>",
                              images=[("overlay", np.zeros((8, 8, 3), np.uint8))])
    assert page.startswith("<!DOCTYPE html>") and "summary &lt;x&gt;" in page
    assert not re.search(r"<script[^>]*\ssrc=", page) and page.count("Plotly.newPlot") == 3
    assert len(page) > 1_000_000                           # plotly.js itself is inlined: works offline
    assert "data:image/png;base64," in page and "<td>500.0</td>" in page


# -- csv, overlay, summary ------------------------------------------------------------
def test_csv_has_every_norm():
    result = synthetic(blocks=2, grid=(3, 4))
    rows = list(csv.reader(io.StringIO(result.to_csv())))
    assert rows[0] == ["block", "row", "col", "norm"]
    assert len(rows) == 1 + 2 * (3 * 4 + 1)
    assert rows[1][:3] == ["1", "-1", "-1"] and float(rows[1][3]) == pytest.approx(result.cls_norms[0], rel=1e-6)
    b, r, c, n = rows[1 + 13 + 1 + 7]                       # block 2, token 7: row 1, col 3
    assert (b, r, c) == ("2", "1", "3") and float(n) == pytest.approx(result.patch_norms[1][1, 3], rel=1e-6)
    no_cls = result.to_csv(include_cls=False).splitlines()
    assert len(no_cls) == 1 + 2 * 12 and all(",-1," not in line for line in no_cls)


def test_patch_boxes_tile_the_image():
    for size, grid in [((100, 130), (7, 9)), ((518, 518), (37, 37)), ((37, 50), (37, 37))]:
        cover = np.zeros(size, int)
        for r in range(grid[0]):
            for c in range(grid[1]):
                x0, y0, x1, y1 = norms.patch_box(size, grid, r, c)
                cover[y0:y1 + 1, x0:x1 + 1] += 1
        if size[0] >= grid[0] and size[1] >= grid[1]:
            assert (cover == 1).all()


def test_draw_outliers_marks_the_planted_patches():
    result = synthetic(blocks=2, grid=(4, 6))
    result.patch_norms[1][2, 5] = 500.0
    result.patch_norms[0][0, 0] = 500.0
    out = norms.find_outliers(result, threshold=100)
    image = np.full((80, 120, 3), 128, np.uint8)             # 20 x 20 pixels per patch
    meta = ((80, 120), (56, 84))
    drawn = norms.draw_outliers(image, meta, result, out)
    changed = (drawn != image).any(-1)
    assert changed[40:60, 100:120].any() and changed[0:20, 0:20].any()
    assert not changed[20:40, 30:90].any()
    only = (norms.draw_outliers(image, meta, result, out, block=2) != image).any(-1)
    assert only[40:60, 100:120].any() and not only[0:15, 0:15].any()
    with pytest.raises(NormsError):
        norms.draw_outliers(np.zeros((10, 10, 3), np.uint8), meta, result, out)
    with pytest.raises(BlockError):
        norms.draw_outliers(image, meta, result, out, block=3)
    text = norms.summary(result, out)
    assert "2 outliers" in text and "block 2 row 2 col 5" in text


# -- end to end -------------------------------------------------------------------------
def test_block_norms_on_a_fixture_and_the_cli(tmp_path, capsys):
    path = save_fixture_checkpoint("depth_anything_v2_vits", tmp_path)
    model = dpt_lab.load_model(path)
    x = torch.randn(1, 3, 70, 98, generator=torch.Generator().manual_seed(6))
    result = norms.block_norms(model, x)
    assert result.num_blocks == 12 and result.grids == [(5, 7)] * 12 and len(result.cls_norms) == 12
    with torch.inference_mode():
        feats = model.encode(x, Record(norms=True))
    for a, b in zip(result.patch_norms, norms.norms_from_features(feats).patch_norms):
        np.testing.assert_array_equal(a, b)

    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(image)
    out_html, out_csv, out_png = tmp_path / "n.html", tmp_path / "n.csv", tmp_path / "o.png"
    rc = norms.main([str(image), "--model", str(path), "--out", str(out_html), "--csv", str(out_csv),
                     "--threshold", "auto", "--base-size", "70", "--overlay", str(out_png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "12 blocks" in printed and "outliers" in printed and str(out_html) in printed
    assert out_html.read_text().count("Plotly.newPlot") == 3
    header, *rows = out_csv.read_text().splitlines()
    assert header == "block,row,col,norm" and len(rows) % 12 == 0
    assert np.asarray(Image.open(out_png)).shape == (60, 90, 3)
    assert norms.main([str(image), "--model", str(path), "--out", str(out_html), "--block", "13",
                       "--base-size", "70"]) == 2
    assert "--block 13 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        norms.main([str(image), "--model", str(path), "--threshold", "-3"])
