"""The first run (issue: real weights on the first run): with nothing local, the app downloads
Depth-Anything-V2-Small from the Hub (a fake one here) and answers with it, the page up and its
banner showing the download meanwhile; with the Hub refusing or silent it starts the random
model within the stated seconds and says why. ZeroGPU's @spaces.GPU wrapping with a stand-in
`spaces`, and half precision (autocast) against float32 for every family."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_hub import serving_hub
from fixtures import save_fixture_checkpoint

from dpt_lab import imaging
from dpt_lab import session as S
from dpt_lab.models import DOWNLOAD_MODEL, HUB_PROBE_S

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "chelsea.jpg"
BASE = 266


@pytest.fixture
def first_run(monkeypatch, tmp_path):
    """An empty weights folder and Hub cache, online: what a new user has."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HUGGINGFACE_HUB_CACHE",
                "DPT_LAB_WEIGHTS", "DPT_LAB_MODEL", "DPT_LAB_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    (tmp_path / "weights").mkdir()
    return tmp_path


def test_first_run_downloads_the_small_model_and_answers_with_it(first_run, monkeypatch):
    from app_server import launch

    import dpt_lab

    (first_run / "source").mkdir()
    ckpt = save_fixture_checkpoint("depth_anything_v2_vits", first_run / "source")
    body = ckpt.read_bytes()
    # a slow Hub (about 2 s for the file), so the page is seen while the download runs
    delay = 2.0 / max(1, len(body) >> 22)
    with serving_hub({ckpt.name: body}, monkeypatch, chunk_delay_s=delay, chunk=1 << 22) as (url, seen):
        server = launch(first_run / "app", checkpoints=(), offline=False)
        try:
            manager = server.manager
            assert manager.startup == DOWNLOAD_MODEL and not manager.untrained
            assert "downloading depth-anything-v2-small" in manager.startup_reason
            config = json.loads(_get(f"{server.url.rstrip('/')}/config"))        # the page is up already
            texts = [c.get("props", {}).get("value") for c in config["components"]]
            assert any(isinstance(t, str) and "Downloading weights for depth-anything-v2-small" in t for t in texts)
            assert manager.loads == 0
            manager.preload()                              # what app.py does once the page is up
            client = server.client()
            from gradio_client import handle_file

            t0 = time.time()
            _, _, text, files = client.predict(handle_file(str(ASSET)), DOWNLOAD_MODEL, BASE, "default", "turbo",
                                               api_name="/depth")   # waits for the download, then answers
            assert time.time() - t0 < 120
            assert manager.downloading is None and manager.download_fraction == 1.0
            assert manager.loaded() == [DOWNLOAD_MODEL] and not manager.untrained
            assert manager.banner() == ""
            assert any(s.startswith("GET /") and ckpt.name in s for s in seen)
            # the answer is the downloaded model's, not the random one's
            png16 = next(f for f in files if f.endswith("_16bit.png"))
            arr, lo, hi = imaging.read_png16(png16)
            got = imaging.png16_to_depth(arr, lo, hi)
            want = dpt_lab.load_model(ckpt).predict(str(ASSET), base_size=BASE)
            np.testing.assert_allclose(got, want, rtol=0, atol=(hi - lo) / 65535 + 1e-5)
            rnd = S.build_random_model().predict(str(ASSET), base_size=BASE)
            assert np.abs(got - rnd).max() > 10 * (hi - lo) / 65535
        finally:
            server.close()


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    sock.close()


def _closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("hub", ["refusing", "silent", "offline"])
def test_without_the_hub_the_random_model_starts_within_seconds_and_says_why(first_run, monkeypatch, hub,
                                                                             silent_server):
    if hub == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", _closed_port() if hub == "refusing" else silent_server)
    t0 = time.time()
    manager = S.ModelManager(weights_dir=first_run / "weights")
    elapsed = time.time() - t0
    assert manager.startup == S.RANDOM_MODEL and manager.untrained and manager.downloading is None
    assert elapsed <= HUB_PROBE_S + 1.0, elapsed
    why = {"refusing": "refused", "silent": f"within {HUB_PROBE_S:g} s", "offline": "HF_HUB_OFFLINE"}[hub]
    assert "the Hub cannot be reached" in manager.startup_reason and why in manager.startup_reason, \
        manager.startup_reason
    assert "Untrained model" in manager.banner()


def test_a_failed_download_falls_back_to_the_random_model(first_run, monkeypatch, capsys):
    with serving_hub({"README.md": b"no weights here"}, monkeypatch):
        manager = S.ModelManager(weights_dir=first_run / "weights")
        assert manager.startup == DOWNLOAD_MODEL
        manager.preload().join(timeout=60)
    assert manager.startup == S.RANDOM_MODEL and manager.download_failed == DOWNLOAD_MODEL
    assert "the download of depth-anything-v2-small failed" in manager.startup_reason
    assert "download of depth-anything-v2-small failed" in capsys.readouterr().out
    assert manager.get(DOWNLOAD_MODEL).info.name == S.RANDOM_MODEL     # waiting requests get the random model
    assert "(the download of depth-anything-v2-small failed)" in manager.banner(DOWNLOAD_MODEL)


def test_device_and_dtype_are_checked_without_torch_and_resolved_on_load(tmp_path):
    from dpt_lab.errors import DPTLabError

    with pytest.raises(DPTLabError, match="unknown device"):
        S.ModelManager(weights_dir=tmp_path, device="tpu")
    with pytest.raises(DPTLabError, match="unknown dtype"):
        S.ModelManager(weights_dir=tmp_path, dtype="int8")
    m = S.ModelManager(weights_dir=tmp_path, device="auto", dtype="bf16")
    assert m.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    model = m.get(S.RANDOM_MODEL)
    assert model.compute_dtype == torch.bfloat16 and model.info.compute_dtype == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32          # weights stay float32 under autocast


# -- ZeroGPU ------------------------------------------------------------------------------------
SPACES_STANDIN = '''
"""A stand-in for Hugging Face's `spaces` package: GPU(duration) records what it wraps and each call."""
import functools, json, os

def _log(entry):
    with open(os.environ["SPACES_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")

def GPU(fn=None, duration=60):
    def wrap(f):
        _log({"wrapped": f.__name__, "duration": duration})
        @functools.wraps(f)
        def call(*a, **k):
            _log({"called": f.__name__})
            return f(*a, **k)
        return call
    return wrap(fn) if fn is not None else wrap
'''

ZERO_GPU_SCRIPT = '''
import sys, json
sys.path.insert(0, sys.argv[1])
from app_server import launch
from gradio_client import handle_file
server = launch(sys.argv[2])
try:
    client = server.client()
    client.predict(handle_file(sys.argv[3]), server.model, 140, "default", "turbo", api_name="/depth")
    client.predict(1.0, 0.5, 1.0, 1.0, "turbo", api_name="/fusion")
    client.predict(70, 40, 12, "row", False, False, "inferno", 0, False, api_name="/attention")
    (entry,) = server.lab.store.entries(client.session_hash)
    print(json.dumps({"devices": sorted({str(b.q.device) for b in entry.probe.features.blocks}),
                      "x": str(entry.x.device)}))
finally:
    server.close()
'''


def test_zero_gpu_wraps_the_model_calls_and_the_app_still_answers_on_the_cpu(tmp_path):
    standin = tmp_path / "standin"
    (standin / "spaces").mkdir(parents=True)
    (standin / "spaces" / "__init__.py").write_text(SPACES_STANDIN)
    log = tmp_path / "spaces.log"
    env = dict(os.environ, SPACES_ZERO_GPU="true", SPACES_LOG=str(log), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(standin), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", ZERO_GPU_SCRIPT, str(ROOT / "tests"), str(tmp_path / "app"),
                          str(ASSET)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    wrapped = {r["wrapped"]: r["duration"] for r in records if "wrapped" in r}
    assert wrapped == {"_recorded_encode": 60, "_scaled_decode": 30, "_ablated": 60, "_export": 180}
    called = [r["called"] for r in records if "called" in r]
    assert called.count("_recorded_encode") == 1 and called.count("_scaled_decode") == 1
    assert "_ablated" not in called                          # an attention row needs no GPU: it is not wrapped
    where = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert where == {"devices": ["cpu"], "x": "cpu"}          # the recorded encode lives on the CPU there


# -- half precision ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_reference import beit_hf, swin2_hf

    import dpt_lab

    root = tmp_path_factory.mktemp("precision")
    beit_hf(root / "beit")
    swin2_hf(root / "swin")
    return {"dinov2": (dpt_lab.load_model(save_fixture_checkpoint("depth_anything_v2_vits", root)), (1, 3, 126, 168)),
            "beit": (dpt_lab.load_model(root / "beit"), (1, 3, 96, 128)),
            "swin2": (dpt_lab.load_model(root / "swin"), (1, 3, 64, 128))}


# the stated errors of autocast against float32, relative to the depth's maximum: bench/precision.py
# measures ~2e-3 for float16 and ~1.6e-2 for bfloat16 on ViT-S; SwinV2's bfloat16 reaches ~5e-2
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 1e-1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["dinov2", "beit", "swin2"])
def test_half_precision_is_finite_and_within_the_stated_error(family_models, family, dtype):
    from dpt_lab import features, precision

    model, shape = family_models[family]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        ref = model(x)
        precision.apply(model, dtype)
        try:
            out = model(x)
            probe = features.capture(model, x)
            row = probe.row(probe.num_layers - 1, 0)
            decoded = model.decode(probe.features)
        finally:
            precision.apply(model, None)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err <= HALF_TOLERANCE[dtype], err
    assert err > 0                                       # it did run in half precision
    assert torch.isfinite(row).all() and torch.allclose(row.sum(-1), torch.ones(row.shape[0]), atol=1e-3)
    assert torch.equal(decoded, out) or float((decoded - out).abs().max() / ref.abs().max()) <= HALF_TOLERANCE[dtype]
