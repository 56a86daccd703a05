"""The real app, launched once in this process on a free port (offline, a synthesized
Depth-Anything-V2-S checkpoint in a temporary weights folder: tests/app_server.py),
driven through gradio_client like any API user; plus `python app.py` with no weights in a
subprocess. Bad input of every kind: tests/test_bad_input.py; a real browser:
tests/test_browser.py; many sessions at once: tests/test_concurrency.py."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app_server import free_port  # noqa: E402

ASSET = ROOT / "assets" / "chelsea.jpg"          # 451 x 300
BASE = 266                                       # small processing size: fast on CPU


@pytest.fixture(scope="module")
def served(app_server):
    """(client, demo, lab, model_name, tmp): the app on a free port (tests/app_server.py),
    one gradio_client session."""
    return app_server.client(), app_server.demo, app_server.lab, app_server.model, app_server.tmp


def rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def run_depth(client, model, image=ASSET, base=BASE, cmap="turbo"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), model, base, "default", cmap, api_name="/depth")


@pytest.fixture(scope="module")
def depth_result(served):
    client, _, _, model, _ = served
    return run_depth(client, model)


def test_startup_pick_and_endpoints(served):
    client, _, lab, model, _ = served
    assert model == "depth-anything-v2-small" and not lab.manager.untrained
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/depth", "/attention", "/rollout", "/attention_distance", "/features", "/norms", "/ablation",
                 "/fusion", "/mask", "/scene3d", "/video", "/export"):
        assert name in api
    params = {name: [p["parameter_name"] for p in api[name]["parameters"]] for name in api}
    assert params["/depth"] == ["image", "model", "base_size", "keep_aspect", "colormap"]
    assert params["/attention"][:3] == ["x", "y", "layer"]
    assert params["/fusion"][:4] == ["scale_1", "scale_2", "scale_3", "scale_4"]
    assert params["/features"][:4] == ["block_v", "mode_v", "x", "y"]
    assert params["/rollout"][:3] == ["x", "y", "layer_v"]


def test_depth_image_size_and_16bit_png_equal_predict(served, depth_result):
    from dpt_lab import imaging

    _, _, lab, model_name, _ = served
    pair, bar, text, files = depth_result
    image, colored = pair
    h, w = rgb(ASSET).shape[:2]
    assert rgb(colored).shape == (h, w, 3) and rgb(image).shape == (h, w, 3)
    assert "inverse depth (relative)" in text
    assert rgb(bar).shape[1] >= 160
    by_suffix = {Path(f).name.split("_depth")[-1]: f for f in files}
    assert set(by_suffix) == {"_16bit.png", ".npy", "_color.png"}

    want = lab.manager.get(model_name).predict(str(ASSET), base_size=BASE)
    arr, lo, hi = imaging.read_png16(by_suffix["_16bit.png"])
    got = imaging.png16_to_depth(arr, lo, hi)
    assert got.shape == want.shape == (h, w)
    assert hi > lo
    np.testing.assert_allclose(got, want, rtol=0, atol=(hi - lo) / 65535 + 1e-5)
    np.testing.assert_allclose(np.load(by_suffix[".npy"]), want, rtol=0, atol=1e-5)
    assert np.array_equal(rgb(by_suffix["_color.png"]), rgb(colored))


def test_attention_click_gives_tiles_of_the_grid(served, depth_result):
    from dpt_lab import attention

    client, _, lab, _, _ = served
    (entry,) = lab.store.entries(client.session_hash)
    encodes = lab.store.encodes
    probe = entry.probe
    grid = probe.grid(2)
    assert entry.meta.input_size == (266, 406) and grid == (19, 29)
    tiles, marked, text, x, y = client.predict(100, 50, 3, "row", False, False, "inferno", 0, False,
                                               api_name="/attention")
    assert rgb(tiles).shape == attention.tiles_shape(probe.num_heads(2), grid, tile_px=160)
    row, col = attention.patch_at_pixel(entry.meta, grid, 100, 50)
    assert f"patch row {row}, col {col}" in text and "layer 3/12" in text
    assert (x, y) == (100, 50)
    assert rgb(marked).shape == (300, 451, 3)
    # a column of the last layer, then the CLS token: still the same encode
    client.predict(450, 299, 12, "column", True, True, "viridis", 0.5, False, api_name="/attention")
    _, _, text, _, _ = client.predict(None, None, 12, "row", False, False, "inferno", 0, True, api_name="/attention")
    assert "CLS" in text
    assert lab.store.encodes == encodes


def test_feature_lenses_come_from_the_recorded_encode(served, depth_result):
    from dpt_lab import attention, features

    client, _, lab, _, _ = served
    (entry,) = lab.store.entries(client.session_hash)
    probe = entry.probe
    encodes = lab.store.encodes
    picture, text, mode, x, y = client.predict(4, "pca", None, None, False, 12, False, 5, 0.0, "inferno",
                                               api_name="/features")
    assert rgb(picture).shape == (300, 451, 3) and mode == "pca" and "block 4/12" in text
    expected = features.lens_image(probe.pca_rgb(3), lab.display_image({"image": rgb(ASSET), "display": None}),
                                   alpha=0.0)
    assert np.abs(rgb(picture).astype(int) - expected).max() <= 1
    # similarity of the patch under (100, 50): its own patch is the brightest, the top 3 outlined
    picture, text, mode, x, y = client.predict(9, "similarity", 100, 50, False, 12, False, 3, 0.0, "gray",
                                               api_name="/features")
    row, col = attention.patch_at_pixel(entry.meta, probe.grid(8), 100, 50)
    assert f"patch row {row}, col {col}" in text and (x, y) == (100, 50)
    sims = features.similarity_grid(probe, 8, probe.token_at(row, col))
    assert sims[row, col] == pytest.approx(1.0, abs=1e-5)
    # rollout of that patch sums to 1 over the image; the distance figure has a point per head
    picture, text, _, _, plot, summary = client.predict(100, 50, 6, "max", 0.2, False, 0.0, "inferno",
                                                        api_name="/rollout")
    assert rgb(picture).shape == (300, 451, 3) and "over layers 1..6" in text and "max" in text
    fig, dsummary = client.predict(api_name="/attention_distance")
    ys = json.loads(fig["plot"])["data"][0]["y"]
    ys = np.frombuffer(base64.b64decode(ys["bdata"]), dtype=ys["dtype"]) if isinstance(ys, dict) else np.asarray(ys)
    assert len(ys) == 12 * probe.num_heads(0) and dsummary.startswith("12 layers")
    np.testing.assert_allclose(np.sort(ys), np.sort(attention.mean_distance(probe).ravel()), rtol=1e-5)
    assert lab.store.encodes == encodes
    with pytest.raises(Exception, match="block must be between 1 and 12"):
        client.predict(13, "pca", None, None, False, 12, False, 5, 0.0, "inferno", api_name="/features")
    with pytest.raises(Exception, match="outside"):
        client.predict(1000, 50, 6, "max", 0.2, False, 0.0, "inferno", api_name="/rollout")


def test_ablation_replaces_the_patches_and_shows_the_difference(served, depth_result):
    from dpt_lab import ablation, depth

    client, _, lab, model_name, _ = served
    (entry,) = lab.store.entries(client.session_hash)
    encodes = lab.store.encodes
    diff, ablated, original, share, text, marked = client.predict(7, "patches", "3,4; 10,12", "zero", "auto",
                                                                  "turbo", api_name="/ablation")
    assert "2 patches replaced (zero) from block 7/12" in text
    for picture in (diff, ablated, original, marked):
        assert rgb(picture).shape == (300, 451, 3)
    model = lab.manager.get(model_name)
    ref = ablation.ablate(model, entry.x, 6, [(3, 4), (10, 12)], "zero", baseline=entry.probe)
    want = depth.render(model.postprocess(ref.depth, entry.meta), metric=False, cmap="turbo").colored
    assert np.array_equal(rgb(ablated), want)
    assert not np.array_equal(rgb(ablated), rgb(original))
    traces = json.loads(share["plot"])["data"]
    assert [t["name"] for t in traces] == ["before", "after"]
    assert lab.store.encodes == encodes
    with pytest.raises(Exception, match="no tokens to replace"):
        client.predict(7, "outliers", "", "zero", "1e9", "turbo", api_name="/ablation")
    with pytest.raises(Exception, match="outside"):
        client.predict(7, "patches", "99,0", "zero", "auto", "turbo", api_name="/ablation")


def test_video_gives_an_h264_mp4_of_the_depth_and_the_raw_depth(served, tmp_path):
    from clips import make_clip, read_frames
    from gradio_client import handle_file

    client, _, lab, model, _ = served
    clip = tmp_path / "clip.mp4"
    make_clip(clip)                                            # 2 s at 12 fps, 132 x 98
    mp4, raw, text = client.predict(handle_file(str(clip)), model, 140, 10, 2, 0, "clip", True, "turbo", "npz",
                                    api_name="/video")
    frames, info = read_frames(mp4)
    assert len(frames) == 12 and (info["codec"], info["pix_fmt"], info["width"]) == ("h264", "yuv420p", 264)
    assert np.load(raw)["depth"].shape[0] == 12
    assert "12 frames at 6 fps" in text and "no audio" in text
    mp4, raw, text = client.predict(handle_file(str(clip)), model, 140, 1, 1, 4, "frame", False, "gray", "none",
                                    api_name="/video")
    assert raw is None and len(read_frames(mp4)[0]) == 4 and "cut at 1 s" in text     # target 4 fps: every 3rd
    not_video = tmp_path / "not_a_video.mp4"
    not_video.write_bytes(b"plain bytes")
    with pytest.raises(Exception, match="not a video"):
        client.predict(handle_file(str(not_video)), model, 140, 10, 1, 0, "clip", False, "turbo", "none",
                       api_name="/video")


def test_norms_gives_figures_and_table(served, depth_result):
    client, _, lab, _, _ = served
    encodes = lab.store.encodes
    heat, stats, hist, table, overlay, summary = client.predict("auto", 150, 12, True, api_name="/norms")
    fig = json.loads(heat["plot"])
    heatmaps = [t for t in fig["data"] if t["type"] == "heatmap"]
    assert len(heatmaps) == 12
    assert fig["layout"]["annotations"][0]["text"].startswith("block 1 · min")
    assert json.loads(hist["plot"])["data"] and json.loads(stats["plot"])["data"]
    assert table["headers"] == ["block", "row", "col", "norm", "threshold"]
    assert rgb(overlay).shape == (300, 451, 3)
    assert summary.startswith("12 blocks")
    # a low fixed threshold flags tokens; they come back as rows of the table
    _, _, _, table, _, summary = client.predict("fixed", 1.0, 3, False, api_name="/norms")
    assert len(table["data"]) > 0 and all(row[3] > 1.0 for row in table["data"])
    csv_path, html_path = client.predict("auto", 150, True, api_name="/norms_files")
    head = Path(csv_path).read_text().splitlines()
    assert head[0] == "block,row,col,norm" and len(head) == 1 + 12 * (1 + 19 * 29)
    assert Path(html_path).read_text().startswith("<!DOCTYPE html>")
    assert lab.store.encodes == encodes


def test_fusion_changes_depth_and_identity_gives_it_back(served, depth_result):
    client, _, lab, _, _ = served
    encodes = lab.store.encodes
    original = rgb(depth_result[0][1])
    scaled, unscaled, diff, text = client.predict(1, 0.5, 0, 1, "turbo", api_name="/fusion")
    assert rgb(scaled).shape == original.shape
    assert not np.array_equal(rgb(scaled), original)
    assert np.array_equal(rgb(unscaled), original)
    assert "decoder only" in text
    scaled, _, diff, _ = client.predict(1, 1, 1, 1, "turbo", api_name="/fusion")
    assert np.array_equal(rgb(scaled), original)
    assert len(set(map(tuple, rgb(diff).reshape(-1, 3)))) == 1          # zero difference: one flat colour
    files = client.predict(-2.5, 3, 0, 1, "gray", api_name="/fusion_files")
    assert len(files) == 3
    assert lab.store.encodes == encodes                                   # sliders never re-encode


def test_mask_cuts_out_the_depth_range_without_re_encoding(served, depth_result):
    from dpt_lab import scene

    client, _, lab, _, _ = served
    encodes = lab.store.encodes
    npy = next(f for f in depth_result[3] if f.endswith(".npy"))
    depth = np.load(npy)                                   # the session's depth, as /depth wrote it
    cutout, mask_png = client.predict(0.4, 1.0, False, 1.0, api_name="/mask")
    with Image.open(cutout) as im, Image.open(mask_png) as m:
        assert im.mode == "RGBA" and im.size == (451, 300)
        alpha, kept = np.asarray(im)[..., 3], np.asarray(m) == 255
    np.testing.assert_array_equal(alpha == 255, kept)
    np.testing.assert_array_equal(np.asarray(Image.open(cutout))[..., :3], rgb(ASSET))
    want = scene.depth_mask(scene.remove_plane(depth, 1.0), 0.4, 1.0)
    np.testing.assert_array_equal(kept, want)
    _, inverted = client.predict(0.4, 1.0, True, 1.0, api_name="/mask")
    np.testing.assert_array_equal(np.asarray(Image.open(inverted)) == 255, ~want)
    assert lab.store.encodes == encodes                    # every control works on the cached depth
    with pytest.raises(Exception, match="above range high"):
        client.predict(0.9, 0.1, False, 0, api_name="/mask")


def test_scene3d_gives_a_glb_and_a_ply_of_the_cached_depth(served, depth_result):
    import trimesh

    client, _, lab, _, _ = served
    encodes = lab.store.encodes
    glb, ply = client.predict(60, 0, 1.0, 10.0, 0.05, 20_000, False, api_name="/scene3d")
    assert Path(glb).read_bytes()[:4] == b"glTF"
    (mesh,) = trimesh.load(glb).geometry.values()
    cloud = trimesh.load(ply)
    assert 0 < len(mesh.vertices) == len(cloud.vertices) <= 20_000 and len(mesh.faces) > 0
    z = cloud.vertices[:, 2]                                 # camera frame: between near and far
    assert 1.0 - 1e-4 <= z.min() and z.max() <= 10.0 + 1e-3
    assert lab.store.encodes == encodes
    with pytest.raises(Exception, match="less than far"):
        client.predict(60, 0, 10.0, 1.0, 0.05, 20_000, False, api_name="/scene3d")


def test_requests_hand_freed_memory_back(served, depth_result, monkeypatch):
    """The served app runs with the tuned allocator (app.build_app) and trims once requests
    pause (dpt_lab.memory.release_soon; the server here is this process)."""
    import time

    from dpt_lab import memory

    monkeypatch.setattr(memory, "QUIET_S", 0.2)
    client = served[0]
    before = memory.state()
    assert before.mode == "tuned" and before.arena_max == memory.ARENA_MAX
    client.predict(100, 50, 3, "row", False, False, "inferno", 0, False, api_name="/attention")
    deadline = time.monotonic() + 10
    while memory.state().trims == before.trims and time.monotonic() < deadline:
        time.sleep(0.05)
    assert memory.state().trims > before.trims and not memory.trim_owed()


def test_closing_a_session_drops_its_features(served):
    from gradio_client import Client

    client, _, lab, model, _ = served
    other = Client(client.src, verbose=False)
    run_depth(other, model, base=140)
    assert len(lab.store.entries(other.session_hash)) == 1
    # what a browser tab does while open: the heartbeat stream; closing it ends the session
    url = f"{client.src.rstrip('/')}/gradio_api/heartbeat/{other.session_hash}"
    with urllib.request.urlopen(url, timeout=10) as stream:
        assert stream.readline().startswith(b"data: ALIVE")
    deadline = time.time() + 20
    while lab.store.entries(other.session_hash) and time.time() < deadline:
        time.sleep(0.2)
    assert lab.store.entries(other.session_hash) == []
    assert lab.store.entries(client.session_hash)              # other sessions keep theirs


@pytest.mark.skipif(not (ROOT / "dpt_lab" / "export.py").is_file(), reason="dpt_lab/export.py is not there yet")
def test_export_downloads_a_file_onnxruntime_runs(served):
    import onnxruntime as ort

    client, _, lab, model, _ = served
    table, text, path = client.predict(model, True, False, False, 0, 140, api_name="/export")
    assert table["headers"] and table["data"] and text
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 14 * 9, 14 * 11)).astype(np.float32)
    (depth,) = sess.run(None, {sess.get_inputs()[0].name: x})
    assert depth.shape == (1, 14 * 9, 14 * 11)


def test_app_without_weights_or_internet_shows_the_untrained_banner(tmp_path):
    import app as app_module

    port = free_port()
    weights = tmp_path / "empty_weights"
    weights.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    env.pop("DPT_LAB_WEIGHTS", None)
    for k in ("DPT_LAB_MODEL", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--weights-dir", str(weights)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        config = None
        while time.time() < deadline and config is None:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                    config = json.loads(r.read())
            except OSError:
                time.sleep(0.25)
        assert config is not None, "the app did not answer within 180 s"
        texts = [c.get("props", {}).get("value") for c in config["components"]]
        banners = [t for t in texts if isinstance(t, str) and "Untrained model" in t]
        assert len(banners) == len(app_module.TABS)                # one per tab
        assert "random weights" in banners[0] and "mean nothing" in banners[0]
        assert "depth_anything_v2_vits.pth" in banners[0]         # how to get real weights
        dropdowns = [c["props"] for c in config["components"] if c.get("type") == "dropdown"
                     and c["props"].get("label") == "Model"]
        assert dropdowns and "random weights" in dropdowns[0]["value"]
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert "random weights" in out                                # and said so on the console,
    assert "the Hub cannot be reached" in out and "HF_HUB_OFFLINE is set" in out   # with why
