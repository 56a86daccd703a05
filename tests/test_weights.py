"""The checkpoint registry, the local weights folder, and failing fast without a network."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import pytest
from fake_hub import serving_hub

from dpt_lab import weights as W
from dpt_lab.weights import (
    KNOWN_MODELS,
    UnknownModelError,
    WeightsError,
    download,
    known_model,
    locate,
    registry_table_markdown,
    resolve_in_weights_dir,
    scan_weights,
    weights_dir,
)

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No inherited Hub or weights settings; an empty Hub cache in tmp."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HOME",
                "HUGGINGFACE_HUB_CACHE", "DPT_LAB_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(W, "_reachable", refuse)


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """Lay files out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/)."""
    repo_dir = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(FAKE_COMMIT)
    snap = repo_dir / "snapshots" / FAKE_COMMIT
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    return snap


# ---------------------------------------------------------------- registry


def test_registry_entries_are_complete_and_unique():
    names = [m.name for m in KNOWN_MODELS.values()]
    assert len(names) == len(set(names))
    assert all(key == m.name for key, m in KNOWN_MODELS.items())
    sources = set()
    for m in KNOWN_MODELS.values():
        assert m.family in W.FAMILIES, m
        assert m.size and m.license and m.display_name, m
        assert m.native_size in (256, 384, 512, 518), m
        assert m.layout in ("original", "hf"), m
        assert m.repo_type in ("model", "space", "url"), m
        assert (m.filename is None) == (m.layout == "hf"), m
        if m.repo_type == "url":
            assert m.url and m.url.startswith("https://") and m.url.endswith(m.filename)
        else:
            assert "/" in m.repo_id and m.url is None
        assert (m.family == "depth_anything_v2_metric") == (m.max_depth is not None), m
        key = (m.repo_type, m.repo_id, m.filename)
        assert key not in sources, f"two entries for {key}"
        sources.add(key)
    # names in the weights folder must not collide either
    local = [m.local_name.lower() for m in KNOWN_MODELS.values()]
    assert len(local) == len(set(local))


def test_registry_covers_the_families_and_known_facts():
    for fam in W.FAMILIES:
        assert any(m.family == fam for m in KNOWN_MODELS.values()), fam
    small = known_model("depth-anything-v2-small")
    assert small.repo_id == "depth-anything/Depth-Anything-V2-Small"
    assert small.filename == "depth_anything_v2_vits.pth" and small.license == "Apache-2.0"
    assert known_model("depth-anything-v2-large").license == "CC-BY-NC-4.0"
    assert known_model("depth-anything-v2-metric-vkitti-small").max_depth == 80
    assert known_model("depth-anything-v2-metric-hypersim-base").max_depth == 20
    assert known_model("midas-dpt-beit-large-512").native_size == 512
    assert known_model("midas-dpt-swin2-tiny-256-hf").repo_id == "Intel/dpt-swinv2-tiny-256"
    assert not any(m.size == "vitg" for m in KNOWN_MODELS.values())  # Giant is not public


def test_known_model_lookup_and_suggestions():
    assert known_model("Depth-Anything-V2-Small").name == "depth-anything-v2-small"
    assert known_model("depth-anything/Depth-Anything-V2-Small").name == "depth-anything-v2-small"
    with pytest.raises(UnknownModelError) as err:
        known_model("depth-anything-v2-smal")
    assert isinstance(err.value, KeyError)
    assert "depth-anything-v2-small" in str(err.value)
    assert "depth-anything-v2-small" in err.value.suggestions


def test_registry_table_lists_every_model():
    table = registry_table_markdown()
    lines = table.strip().splitlines()
    assert lines[0].startswith("| name | family | size | source | license | native size |")
    assert len(lines) == 2 + len(KNOWN_MODELS)
    for m in KNOWN_MODELS.values():
        assert f"`{m.name}`" in table


# ---------------------------------------------------------------- weights folder


def test_weights_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DPT_LAB_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert weights_dir() == tmp_path / "model_weights"
    monkeypatch.setenv("DPT_LAB_WEIGHTS", str(tmp_path / "env"))
    assert weights_dir() == tmp_path / "env"
    assert weights_dir(tmp_path / "arg") == tmp_path / "arg"


def make_weights_folder(root: Path, outside: Path) -> Path:
    root.mkdir()
    (root / "depth_anything_v2_vits.pth").write_bytes(b"x" * 10)
    (root / "my_model.safetensors").write_bytes(b"s")
    (root / "notes.txt").write_text("not a checkpoint")
    (root / ".hidden.pth").write_bytes(b"h")
    hf = root / "Depth-Anything-V2-Small-hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"w" * 7)
    legacy = root / "old-hf"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "pytorch_model.bin").write_bytes(b"b")
    not_hf = root / "config_only"
    not_hf.mkdir()
    (not_hf / "config.json").write_text("{}")
    sub = root / "midas"
    sub.mkdir()
    (sub / "dpt_beit_base_384.pt").write_bytes(b"m")
    deep = sub / "deeper"
    deep.mkdir()
    (deep / "too_deep.pth").write_bytes(b"d")
    # symlinks: one staying inside, two leading out
    outside.mkdir()
    (outside / "secret.pth").write_bytes(b"secret")
    (root / "inside_link.pth").symlink_to(root / "depth_anything_v2_vits.pth")
    (root / "escape.pth").symlink_to(outside / "secret.pth")
    (root / "escape_dir").symlink_to(outside, target_is_directory=True)
    return root


def test_scan_finds_files_and_hf_folders(tmp_path):
    root = make_weights_folder(tmp_path / "w", tmp_path / "outside")
    found = {lw.name: lw for lw in scan_weights(root)}
    assert set(found) == {
        "depth_anything_v2_vits", "my_model", "Depth-Anything-V2-Small-hf", "old-hf",
        "midas/dpt_beit_base_384", "inside_link",
    }
    assert found["depth_anything_v2_vits"].kind == "file"
    assert found["depth_anything_v2_vits"].size_bytes == 10
    assert found["depth_anything_v2_vits"].known == "depth-anything-v2-small"
    assert found["Depth-Anything-V2-Small-hf"].kind == "hf_folder"
    assert found["Depth-Anything-V2-Small-hf"].known == "depth-anything-v2-small-hf"
    assert found["midas/dpt_beit_base_384"].known == "midas-dpt-beit-base-384"
    assert found["my_model"].known is None
    assert scan_weights(tmp_path / "missing") == []


def test_scan_loads_nothing(tmp_path, monkeypatch):
    root = make_weights_folder(tmp_path / "w", tmp_path / "outside")
    def refuse(*a, **k):
        raise AssertionError("scan_weights must not open checkpoints")
    import torch
    monkeypatch.setattr(torch, "load", refuse)
    assert scan_weights(root)


def test_resolve_in_weights_dir_accepts_local_names(tmp_path):
    root = make_weights_folder(tmp_path / "w", tmp_path / "outside")
    assert resolve_in_weights_dir("depth_anything_v2_vits.pth", root) == root / "depth_anything_v2_vits.pth"
    assert resolve_in_weights_dir("depth_anything_v2_vits", root) == root / "depth_anything_v2_vits.pth"
    assert resolve_in_weights_dir("midas/dpt_beit_base_384.pt", root) == root / "midas" / "dpt_beit_base_384.pt"
    assert resolve_in_weights_dir("Depth-Anything-V2-Small-hf", root) == root / "Depth-Anything-V2-Small-hf"
    assert resolve_in_weights_dir("inside_link.pth", root) == root / "inside_link.pth"


@pytest.mark.parametrize("bad", [
    "../outside/secret.pth",
    "midas/../../outside/secret.pth",
    "..",
    "escape.pth",
    "escape_dir/secret.pth",
    "",
    "   ",
    "a\x00b.pth",
    "notes.txt",
    "config_only",
    "does_not_exist.pth",
])
def test_resolve_in_weights_dir_refuses(tmp_path, bad):
    root = make_weights_folder(tmp_path / "w", tmp_path / "outside")
    with pytest.raises(WeightsError):
        resolve_in_weights_dir(bad, root)


def test_resolve_in_weights_dir_refuses_absolute_paths(tmp_path):
    root = make_weights_folder(tmp_path / "w", tmp_path / "outside")
    for bad in (str(tmp_path / "outside" / "secret.pth"),
                str(root / "depth_anything_v2_vits.pth"),  # absolute even though inside
                "/etc/passwd", "~/x.pth", "C:\\x.pth"):
        with pytest.raises(WeightsError):
            resolve_in_weights_dir(bad, root)
    assert issubclass(WeightsError, ValueError)


# ---------------------------------------------------------------- Hub cache, offline, unreachable


def test_cached_file_found_without_network(clean_env, no_network, tmp_path):
    model = known_model("depth-anything-v2-small")
    snap = put_in_hub_cache(clean_env, model.repo_id, {model.filename: b"weights"})
    calls = []
    path = download(model, progress=lambda f, t: calls.append((f, t)), weights_dir=tmp_path / "w")
    assert path == snap / model.filename
    assert path.read_bytes() == b"weights"
    assert calls and calls[-1][0] == 1.0
    # locate() by name goes the same way
    assert locate("depth-anything-v2-small", weights_dir=tmp_path / "w") == path


def test_cached_file_found_when_offline(clean_env, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = known_model("depth-anything-v1-small")  # lives in a Space
    snap = put_in_hub_cache(clean_env, model.repo_id, {model.filename: b"v1"}, repo_type="space")
    assert download(model) == snap / model.filename


def test_cached_hf_folder_found_without_network(clean_env, no_network):
    model = known_model("midas-dpt-swin2-tiny-256-hf")
    snap = put_in_hub_cache(clean_env, model.repo_id,
                            {"config.json": b"{}", "model.safetensors": b"st"})
    assert download(model) == snap
    # a folder with only the config is not complete
    other = known_model("depth-anything-v2-small-hf")
    put_in_hub_cache(clean_env, other.repo_id, {"config.json": b"{}"})
    assert W.find_in_cache(other) is None


def test_offline_without_cache_fails_fast_with_instructions(clean_env, no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    wdir = tmp_path / "my weights"
    for name in ("depth-anything-v2-small", "depth-anything-v2-small-hf", "midas-dpt-beit-base-384"):
        model = known_model(name)
        t0 = time.monotonic()
        with pytest.raises(WeightsError) as err:
            download(model, weights_dir=wdir)
        assert time.monotonic() - t0 < 10
        msg = str(err.value)
        assert name in msg
        assert "offline" in msg.lower() or "HF_HUB_OFFLINE" in msg
        assert str(wdir.resolve() / model.local_name) in msg
        assert model.file_url in msg


def test_unreachable_endpoint_fails_fast(clean_env, monkeypatch, tmp_path):
    # .invalid never resolves (RFC 6761), whatever network the machine has.
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    model = known_model("depth-anything-v2-base")
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as err:
        download(model, weights_dir=tmp_path / "w")
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert model.name in msg and "unreachable" in msg
    assert str((tmp_path / "w").resolve() / "depth_anything_v2_vitb.pth") in msg
    assert "https://huggingface.co/depth-anything/Depth-Anything-V2-Base" in msg


def test_unreachable_url_model_fails_fast(clean_env, tmp_path):
    model = dataclasses.replace(known_model("midas-dpt-swin2-tiny-256"),
                                url="https://github.invalid/dpt_swin2_tiny_256.pt")
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as err:
        download(model, weights_dir=tmp_path / "w")
    assert time.monotonic() - t0 < 10
    assert str((tmp_path / "w").resolve() / "dpt_swin2_tiny_256.pt") in str(err.value)
    assert not list((tmp_path / "w").glob("*.part")) if (tmp_path / "w").exists() else True


def test_real_hub_unreachable_fails_fast(clean_env, tmp_path):
    """The default endpoint, as the app would use it. Skipped where the Hub is reachable
    (the test must never start a real download)."""
    ok, _ = W._reachable("https://huggingface.co", 3.0)
    if ok:
        pytest.skip("huggingface.co is reachable here; not downloading in a test")
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as err:
        download(known_model("depth-anything-v2-small-hf"), weights_dir=tmp_path / "w")
    assert time.monotonic() - t0 < 20
    assert str((tmp_path / "w").resolve() / "Depth-Anything-V2-Small-hf") in str(err.value)


# ---------------------------------------------------------------- locate


def test_locate_order(clean_env, no_network, tmp_path, monkeypatch):
    root = make_weights_folder(tmp_path / "w", tmp_path / "outside")
    explicit = tmp_path / "outside" / "secret.pth"
    assert locate(explicit, weights_dir=root) == explicit            # existing path
    assert locate(str(explicit), weights_dir=root) == explicit
    assert locate("my_model", weights_dir=root) == root / "my_model.safetensors"   # scanned name
    assert locate("midas/dpt_beit_base_384", weights_dir=root) == root / "midas" / "dpt_beit_base_384.pt"
    # a known name whose file sits in the weights folder: no cache, no network
    assert locate("depth-anything-v2-small", weights_dir=root) == root / "depth_anything_v2_vits.pth"
    assert locate("depth-anything-v2-small-hf", weights_dir=root) == root / "Depth-Anything-V2-Small-hf"
    assert locate("midas-dpt-beit-base-384", weights_dir=root) == root / "midas" / "dpt_beit_base_384.pt"
    # env var decides the folder when no argument is given
    monkeypatch.setenv("DPT_LAB_WEIGHTS", str(root))
    assert locate("my_model") == root / "my_model.safetensors"
    with pytest.raises(UnknownModelError) as err:
        locate("my_modle")
    assert "my_model" in str(err.value)


def test_silent_server_fails_within_timeout(clean_env, monkeypatch, tmp_path):
    """A host that accepts connections but never answers (as some firewalls do)."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.delenv("HTTP_PROXY", raising=False)
        monkeypatch.delenv("http_proxy", raising=False)
        t0 = time.monotonic()
        with pytest.raises(WeightsError) as err:
            download(known_model("depth-anything-v2-small"), timeout=2, weights_dir=tmp_path / "w")
        assert time.monotonic() - t0 < 6
        assert "unreachable" in str(err.value)
    finally:
        stop.set()
        th.join(2)
        for c in held:
            c.close()
        server.close()


# ---------------------------------------------------------------- downloads from a stand-in Hub


@pytest.fixture
def fake_hub(clean_env, monkeypatch):
    """A local HTTP server answering the few Hub routes huggingface_hub uses for downloads."""
    files = {
        "depth_anything_v2_vits.pth": b"p" * 200_000,
        "config.json": b'{"model_type": "depth_anything"}',
        "preprocessor_config.json": b"{}",
        "model.safetensors": b"s" * 5_000,
        "README.md": b"not fetched",
        "dpt_swin2_tiny_256.pt": b"m" * 3_000,
    }
    with serving_hub(files, monkeypatch) as (url, seen):
        yield url, files, seen


def test_download_file_into_cache_then_reuse(fake_hub, tmp_path):
    url, files, seen = fake_hub
    calls = []
    path = download(known_model("depth-anything-v2-small"),
                    progress=lambda f, t: calls.append((f, t)), weights_dir=tmp_path / "w")
    assert path.read_bytes() == files["depth_anything_v2_vits.pth"]
    assert Path(os.environ["HF_HUB_CACHE"]) in path.parents
    assert calls[0][0] == 0.0 and calls[-1][0] == 1.0
    assert all(0.0 <= f <= 1.0 for f, _ in calls)
    n = len(seen)
    assert download(known_model("depth-anything-v2-small")) == path   # from the cache
    assert len(seen) == n


def test_download_hf_folder(fake_hub):
    url, files, seen = fake_hub
    folder = download(known_model("depth-anything-v2-small-hf"))
    assert (folder / "config.json").read_bytes() == files["config.json"]
    assert (folder / "model.safetensors").is_file()
    assert not (folder / "README.md").exists()
    assert not (folder / "depth_anything_v2_vits.pth").exists()
    assert W.find_in_cache(known_model("depth-anything-v2-small-hf")) == folder


def test_download_url_model_into_weights_dir(fake_hub, tmp_path):
    url, files, seen = fake_hub
    model = dataclasses.replace(known_model("midas-dpt-swin2-tiny-256"),
                                url=f"{url}/releases/dpt_swin2_tiny_256.pt")
    wdir = tmp_path / "w"
    path = download(model, weights_dir=wdir)
    assert path == wdir.resolve() / "dpt_swin2_tiny_256.pt"
    assert path.read_bytes() == files["dpt_swin2_tiny_256.pt"]
    assert [p.name for p in wdir.iterdir()] == ["dpt_swin2_tiny_256.pt"]   # no .part left
    assert [lw.known for lw in scan_weights(wdir)] == ["midas-dpt-swin2-tiny-256"]
