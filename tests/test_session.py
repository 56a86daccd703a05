"""dpt_lab.session without Gradio: which model starts, loading once and the LRU bound,
names from the UI, the per-session feature store (one encode, byte bound, unload), and
the plain functions the tabs call."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import save_fixture_checkpoint

from dpt_lab import session as S
from dpt_lab.encoders.base import EncoderFeatures
from dpt_lab.errors import DPTLabError

ASSET = "assets/coffee.jpg"    # 600 x 400


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("DPT_LAB_WEIGHTS", raising=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("session_weights")
    save_fixture_checkpoint("depth_anything_v2_vits", folder)
    return folder


def test_no_weights_means_random_model_with_a_banner(offline, tmp_path):
    m = S.ModelManager(weights_dir=tmp_path / "empty")
    assert m.startup == S.RANDOM_MODEL and m.untrained
    text = m.banner()
    assert "Untrained" in text and "random weights" in text and "mean nothing" in text
    assert str(tmp_path / "empty") in text and "depth_anything_v2_vits.pth" in text
    assert S.RANDOM_MODEL in [v for _, v in m.choices()]
    model = m.get(m.startup)
    assert model.info.family == "depth_anything_v2" and model.info.num_blocks == 12
    depth = model.predict(np.zeros((40, 60, 3), np.uint8) + 100, base_size=56)
    assert depth.shape == (40, 60) and np.isfinite(depth).all()


def test_local_checkpoint_is_picked_and_loaded_once(offline, weights):
    m = S.ModelManager(weights_dir=weights)
    assert m.startup == "depth-anything-v2-small" and not m.untrained and m.banner() == ""
    assert str(weights) in m.startup_reason
    got = []
    threads = [threading.Thread(target=lambda: got.append(m.get(m.startup))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.loads == 1 and all(g is got[0] for g in got)
    assert got[0].info.name == "depth-anything-v2-small"


def test_model_argument_and_unknown_names(offline, weights, tmp_path):
    path = weights / "depth_anything_v2_vits.pth"
    m = S.ModelManager(str(path), weights_dir=tmp_path / "elsewhere")
    assert m.startup == str(path) and m.get(m.startup).info.size == "vits"
    with pytest.raises(DPTLabError, match="unknown model"):
        S.ModelManager("no-such-model", weights_dir=tmp_path)
    m = S.ModelManager(weights_dir=weights)
    for bad in ("../session_weights/depth_anything_v2_vits", "/etc/passwd", "", None, "nope"):
        with pytest.raises(S.SessionError):
            m.validate(bad)
    assert m.validate("depth_anything_v2_vits") == "depth_anything_v2_vits"          # a local name
    assert m.validate("depth-anything-v2-large") == "depth-anything-v2-large"


def test_registry_model_offline_fails_fast_with_where_to_put_it(offline, tmp_path):
    m = S.ModelManager(weights_dir=tmp_path)
    start = time.perf_counter()
    with pytest.raises(DPTLabError) as err:
        m.get("depth-anything-v2-base")
    assert time.perf_counter() - start < 10
    assert "depth_anything_v2_vitb.pth" in str(err.value) and str(tmp_path) in str(err.value)


def test_lru_keeps_at_most_max_models(offline, weights):
    m = S.ModelManager(weights_dir=weights, max_models=1)
    m.get(S.RANDOM_MODEL)
    m.get(m.startup)
    assert m.loaded() == [m.startup]
    m.get(S.RANDOM_MODEL)
    assert m.loaded() == [S.RANDOM_MODEL] and m.loads == 3


def fake_entry(key, nbytes):
    maps = [torch.zeros(nbytes // 4, dtype=torch.float32)]
    feats = EncoderFeatures(maps, None, (14, 14), blocks=[])
    probe = type("Probe", (), {"features": feats})()
    return S.Entry(key, "m", None, None, torch.zeros(1), probe, torch.zeros(1), np.zeros(1, np.float32))


def test_feature_store_computes_once_bounds_bytes_and_drops_sessions():
    store = S.FeatureStore(max_bytes=3_000_000, max_per_session=2)
    calls = []

    def compute(key, n=1_000_000):
        def run():
            calls.append(key)
            time.sleep(0.05)
            return fake_entry(key, n)
        return run

    threads = [threading.Thread(target=lambda: store.get_or_compute("a", ("k1",), compute(("k1",))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [("k1",)] and store.encodes == 1
    store.get_or_compute("a", ("k2",), compute(("k2",)))
    store.get_or_compute("a", ("k3",), compute(("k3",)))
    assert [e.key for e in store.entries("a")] == [("k2",), ("k3",)]          # two per session
    store.get_or_compute("b", ("k1",), compute(("k1",)))
    store.get_or_compute("c", ("k1",), compute(("k1",), 1_500_000))
    assert store.nbytes <= 3_000_000 + 64                                      # oldest evicted first
    assert store.get("c", ("k1",)) is not None and store.get("a", ("k2",)) is None
    assert store.drop("c") == 1 and "c" not in store.sessions()


def test_lab_one_encode_serves_every_tab(offline, tmp_path):
    lab = S.Lab(S.ModelManager(weights_dir=tmp_path))
    state, res = lab.depth_view("s", None, ASSET, S.RANDOM_MODEL, 112, "default", "magma")
    assert res.view.colored.shape == (400, 600, 3) and res.depth.shape == (400, 600)
    assert lab.store.encodes == 1
    first = lab.attention_at("s", state, 10, 10, 1, "row")
    assert first.patch == (0, 0) and first.layer == 1
    again = lab.attention_at("s", state, None, None, 12, "column")            # the last click, another layer
    assert again.patch == (0, 0) and again.values.shape[0] == 6
    with pytest.raises(S.SessionError, match="outside"):
        lab.attention_at("s", state, 600, 10, 1, "row")
    n = lab.norms_view("s", state, threshold=1.0)
    assert n.outliers.total > 0 and n.block == 12 and len(n.table) == min(S.TABLE_LIMIT, n.outliers.total)
    same = lab.fusion_view("s", state, (1, 1, 1, 1))
    assert np.array_equal(same.depth, res.depth)
    other = lab.fusion_view("s", state, (0, 1, 1, 1))
    assert not np.array_equal(other.depth, res.depth)
    assert lab.store.encodes == 1
    x, y = lab.display_to_image(state, 0, 0)
    assert (x, y) == (0, 0)
    # a new size re-encodes; the same request does not
    state, _ = lab.depth_view("s", state, ASSET, S.RANDOM_MODEL, 140, "stretch", "turbo")
    state, _ = lab.depth_view("s", state, ASSET, S.RANDOM_MODEL, 140, "stretch", "gray")
    assert lab.store.encodes == 2
    assert lab.store.drop("s") == 2 and lab.store.entries("s") == []
    with pytest.raises(S.SessionError, match="no image"):
        lab.attention_at("s", None, 1, 1)


def test_presets_and_the_app_builds_without_torch():
    assert S.Lab.fusion_preset("drop 2") == (1.0, 0.0, 1.0, 1.0)
    with pytest.raises(S.SessionError):
        S.Lab.fusion_preset("nope")
    assert all(-5 <= f <= 5 for f in S.Lab.fusion_glitch(seed=3))
    # building the page must not import torch (startup time): checked in a fresh interpreter
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path.insert(0, '.'); import app; from dpt_lab import session as S; "
            "app.build_app(S.ModelManager(weights_dir=sys.argv[1])); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(root / "no_such_weights_folder")], cwd=root,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
