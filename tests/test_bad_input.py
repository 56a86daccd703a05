"""Bad input everywhere, through the running app: one test per row of the README table
"Bad input: what happens". Each case gets a clear message (gradio_client's AppError
carries the gr.Error text); after every test a bystander session that encoded an image
before still gets the same answer (the server keeps serving), and at the end nothing has
been written outside the temporary folders (the weights folder and the repository tree
are unchanged)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "chelsea.jpg"           # 451 x 300
BASE = 140                                        # small processing size: fast on CPU
SWIN = "swin2-tiny-hf"                            # a tiny SwinV2 -hf folder in the weights folder (no CLS)
SKIP_DIRS = {".git", ".venv", "test-output", "__pycache__", ".pytest_cache", "dpt_lab.egg-info", "build",
             "model_weights"}


class Exploit:
    """Unpickling this would create a folder: proof that code in a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def tiny_swin2_hf(folder: Path) -> None:
    """A tiny random DPT-SwinV2 saved by transformers (64 px native, patch 4, window 4)."""
    import transformers
    from hf_reference import randomize

    backbone = transformers.Swinv2Config(
        image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"], pretrained_window_sizes=[0, 0, 0, 0])
    config = transformers.DPTConfig(
        backbone_config=backbone, neck_hidden_sizes=[16, 32, 64, 128], fusion_hidden_size=32, head_in_index=-1,
        add_projection=False, readout_type="project", reassemble_hidden_size=16)
    torch.manual_seed(0)
    randomize(transformers.DPTForDepthEstimation(config), 0).save_pretrained(folder)


def bad_weights(folder: Path) -> None:
    """Next to the good depth_anything_v2_vits.pth: truncated, wrong-family, unknown-layout
    and pickle-exploit checkpoints; a symlink to a good checkpoint outside the folder; a
    tiny SwinV2 model (no class token)."""
    good = folder / "depth_anything_v2_vits.pth"
    data = good.read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    shutil.copy(good, folder / "dpt_beit_base_384.pt")          # Depth-Anything tensors under a BEiT name
    torch.save({"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, folder / "mystery.pth")
    torch.save({"pretrained.cls_token": torch.zeros(1), "payload": Exploit(folder.parent / "exploit-ran")},
               folder / "exploit.pth")
    outside = folder.parent / "outside"
    outside.mkdir()
    shutil.copy(good, outside / "depth_anything_v2_vits.pth")
    (folder / "escape.pth").symlink_to(outside / "depth_anything_v2_vits.pth")
    tiny_swin2_hf(folder / SWIN)


APP_SERVER_OPTIONS = {"prepare_weights": bad_weights}


# -- helpers -------------------------------------------------------------------------------
def tree(root: Path, skip=frozenset()) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under root (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels and holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def error_of(client, *args, api_name: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        client.predict(*args, api_name=api_name)
    return str(err.value)


def depth(client, model, image, base=BASE, aspect="default", cmap="turbo"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), model, base, aspect, cmap, api_name="/depth")


def depth_error(client, model, image, base=BASE, aspect="default", cmap="turbo") -> str:
    from gradio_client import handle_file

    return error_of(client, handle_file(str(image)), model, base, aspect, cmap, api_name="/depth")


def attention(client, x, y, layer=12, mode="row", alpha=0, cls=False):
    return client.predict(x, y, layer, mode, False, False, "inferno", alpha, cls, api_name="/attention")


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def before(app_server):
    """What the weights folder and the repository tree hold before the first bad input."""
    return tree(app_server.weights), set(tree(ROOT, SKIP_DIRS))


@pytest.fixture(scope="module")
def bystander(app_server, before):
    """Another user, mid-way through: an encoded image and one attention answer."""
    client = app_server.client()
    depth(client, app_server.model, ASSET)
    tiles = rgb(attention(client, 200, 100, layer=6)[0])
    return client, tiles


@pytest.fixture(autouse=True)
def still_serving(app_server, bystander):
    yield
    client, tiles = bystander
    assert np.array_equal(rgb(attention(client, 200, 100, layer=6)[0]), tiles)
    assert app_server.lab.store.entries(client.session_hash)


@pytest.fixture(scope="module")
def user(app_server):
    """The session that sends the bad input, with a good image encoded (for the controls)."""
    client = app_server.client()
    depth(client, app_server.model, ASSET)
    return client


# -- one test per row of the README table ---------------------------------------------------
def test_no_image_yet(app_server):
    fresh = app_server.client()
    assert "no image yet" in error_of(fresh, None, app_server.model, BASE, "default", "turbo", api_name="/depth")
    # a click (or any other tab) before any image
    assert "no image yet" in error_of(fresh, 10, 10, 1, "row", False, False, "inferno", 0, False,
                                      api_name="/attention")
    assert "no image yet" in error_of(fresh, "auto", 150, 12, True, api_name="/norms")
    assert "no image yet" in error_of(fresh, "auto", 150, True, api_name="/norms_files")
    assert "no image yet" in error_of(fresh, 1, 1, 1, 1, "turbo", api_name="/fusion")
    assert "no image yet" in error_of(fresh, 1, 1, 1, 1, "turbo", api_name="/fusion_files")
    assert not app_server.lab.store.entries(fresh.session_hash)


def test_a_path_on_the_server_instead_of_an_upload(app_server):
    client, model = app_server.client(), app_server.model
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own error types; a bare string is not even a file payload (gradio refuses it)
        client.predict(str(ASSET), model, BASE, "default", "turbo", api_name="/depth")
    for not_uploaded in ({"path": str(ASSET)}, {"path": "/etc/hostname"}, {"path": "../../etc/hostname"},
                         {"path": str(app_server.weights / "depth_anything_v2_vits.pth")}):
        msg = error_of(client, not_uploaded, model, BASE, "default", "turbo", api_name="/depth")
        assert "the image must be an uploaded file" in msg, (not_uploaded, msg)
    assert not app_server.lab.store.entries(client.session_hash)


def test_a_file_that_is_not_an_image(app_server, tmp_path):
    (tmp_path / "notes.png").write_text("this is text, not a picture\n")
    (tmp_path / "paper.jpg").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 20)
    for name in ("notes.png", "paper.jpg"):
        msg = depth_error(app_server.client(), app_server.model, tmp_path / name)
        assert f"'{name}' is not an image in a format DPT Lab can read" in msg


def test_an_empty_file(app_server, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty file (0 bytes)" in depth_error(app_server.client(), app_server.model, tmp_path / "empty.png")


def test_truncated_and_corrupt_jpegs(app_server, tmp_path):
    data = ASSET.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:2000])
    assert "'cut.jpg' is truncated" in depth_error(app_server.client(), app_server.model, tmp_path / "cut.jpg")
    bad_header = bytearray(data)
    bad_header[2:600] = np.random.default_rng(1).integers(0, 256, 598, dtype=np.uint8).tobytes()
    (tmp_path / "mangled.jpg").write_bytes(bytes(bad_header))
    assert "'mangled.jpg' is not an image" in depth_error(app_server.client(), app_server.model,
                                                          tmp_path / "mangled.jpg")
    # damaged entropy-coded data decodes (as browsers show it): an image, not an error
    scan = bytearray(data)
    rng = np.random.default_rng(2)
    for i in rng.integers(len(data) // 2, len(data) - 100, 50):
        scan[i] = int(rng.integers(0, 256))
    (tmp_path / "damaged.jpg").write_bytes(bytes(scan))
    pair, _, _, _ = depth(app_server.client(), app_server.model, tmp_path / "damaged.jpg")
    assert rgb(pair[1]).shape == (300, 451, 3)


def test_tiny_and_extremely_long_images(app_server, tmp_path):
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tmp_path / "dot.png")
    Image.new("RGB", (10, 10000), (30, 120, 30)).save(tmp_path / "pole.png")
    client = app_server.client()
    pair, _, text, files = depth(client, app_server.model, tmp_path / "dot.png")
    assert rgb(pair[1]).shape == (1, 1, 3) and "1x1 image" in text and len(files) == 3
    tiles, marked, text, x, y = attention(client, 0, 0)
    assert rgb(marked).shape == (1, 1, 3) and "patch row" in text
    # keeping the aspect ratio would need a 140 x 140000 input: refused, with what to do
    msg = depth_error(client, app_server.model, tmp_path / "pole.png")
    assert "10x10000" in msg and "megapixels" in msg and "crop it" in msg
    pair, _, text, _ = depth(client, app_server.model, tmp_path / "pole.png", aspect="stretch")
    assert rgb(pair[1]).shape == (10000, 10, 3) and "stretch" in text


def test_a_200_megapixel_png_is_refused_from_its_header(app_server, tmp_path):
    png_header_only(tmp_path / "huge.png", 20000, 10000)
    rss = peak_rss_mb()
    t0 = time.perf_counter()
    msg = depth_error(app_server.client(), app_server.model, tmp_path / "huge.png")
    assert "200.0 megapixels" in msg and "50.0 megapixels" in msg, msg
    assert time.perf_counter() - t0 < 30
    assert peak_rss_mb() - rss < 200            # never decoded: 200 MP of RGB would be 600 MB


def test_an_upload_over_the_size_limit(app_server, tmp_path):
    import httpx
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(201 << 20)                    # sparse: 201 MB of zeros without writing them
    # gradio_client checks the limit the app declares before uploading ...
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        app_server.client().predict(handle_file(str(big)), app_server.model, BASE, "default", "turbo",
                                    api_name="/depth")
    # ... and the server refuses a raw upload itself (max_file_size)
    with open(big, "rb") as f:
        r = httpx.post(f"{app_server.url.rstrip('/')}/gradio_api/upload", files={"files": ("big.png", f)},
                       timeout=120)
    assert r.status_code == 413 and "maximum allowed size" in r.text
    assert not list(app_server.gradio_tmp.rglob("big.png"))


ODD = {
    "gray.png": lambda im: im.convert("L"),
    "la.png": lambda im: im.convert("LA"),
    "rgba.png": lambda im: im.convert("RGBA"),
    "palette.png": lambda im: im.convert("P"),
    "sixteen.png": lambda im: Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257),
    "cmyk.jpg": lambda im: im.convert("CMYK"),
    "bilevel.png": lambda im: im.convert("1"),
    "float.tif": lambda im: Image.fromarray(np.asarray(im.convert("L"), np.float32) / 255),
}


@pytest.mark.parametrize("name", [*ODD, "rotated.jpg"])
def test_odd_image_modes_are_converted_not_refused(app_server, tmp_path, name):
    base = Image.open(ASSET).convert("RGB").resize((90, 60))
    if name == "rotated.jpg":
        exif = Image.Exif()
        exif[0x0112] = 6                          # rotate 90 degrees clockwise to display
        base.save(tmp_path / name, exif=exif)
    else:
        img = ODD[name](base)
        if img.mode in ("RGBA", "LA"):           # the left half transparent: shown on white
            alpha = np.full((60, 90), 255, np.uint8)
            alpha[:, :45] = 0
            img.putalpha(Image.fromarray(alpha))
        img.save(tmp_path / name)
    pair, _, text, _ = depth(app_server.client(), app_server.model, tmp_path / name)
    shown, coloured = rgb(pair[0]), rgb(pair[1])
    want_shape = (90, 60, 3) if name == "rotated.jpg" else (60, 90, 3)
    assert shown.shape == coloured.shape == want_shape, name
    gray = np.asarray(base.convert("L"))
    if name in ("gray.png", "sixteen.png", "float.tif"):
        assert np.abs(shown.astype(int) - gray[..., None]).max() <= 1, name
    if name in ("la.png", "rgba.png"):
        assert (shown[:, :45] == 255).all() and not (shown[:, 45:] == 255).all(), name
    if name == "palette.png":
        assert np.array_equal(shown, np.asarray(base.convert("P").convert("RGB")))
    if name == "bilevel.png":
        assert set(np.unique(shown)) <= {0, 255}


def test_unknown_model_names_and_paths_out_of_the_weights_folder(app_server):
    lab, client = app_server.lab, app_server.client()
    loads, loaded = lab.manager.loads, lab.manager.loaded()
    outside = app_server.tmp / "outside" / "depth_anything_v2_vits.pth"
    assert outside.is_file() and (app_server.weights / "escape.pth").resolve() == outside.resolve()
    offered = [value for _, value in lab.manager.choices()]
    assert "escape" not in offered and "mystery" in offered          # the symlink out is not offered
    names = ["no-such-model", "../../etc/passwd", "/etc/passwd", str(outside), "../outside/depth_anything_v2_vits",
             "escape", "escape.pth", str(app_server.weights / "escape.pth"), "~/.ssh/id_rsa"]
    for name in names:
        msg = depth_error(client, name, ASSET)
        assert f"unknown model {name!r}: pick one from the model list" in msg, (name, msg)
        msg = error_of(client, name, True, False, False, 0, 56, api_name="/export")
        assert f"unknown model {name!r}" in msg, (name, msg)
    assert lab.manager.loads == loads and lab.manager.loaded() == loaded


def test_a_known_model_that_is_not_here_fails_fast_offline(app_server):
    t0 = time.perf_counter()
    msg = depth_error(app_server.client(), "depth-anything-v2-base", ASSET)
    assert time.perf_counter() - t0 < 30
    assert "Cannot get model 'depth-anything-v2-base'" in msg and "depth_anything_v2_vitb.pth" in msg
    assert "put it at" in msg


@pytest.mark.parametrize("name, message", [
    ("truncated", "truncated.pth: truncated or not a PyTorch checkpoint"),
    ("midas-dpt-beit-base-384", "family 'midas_beit' was asked for, but the file has the Depth-Anything layout"),
    ("mystery", "unknown layout"),
    ("exploit", "exploit.pth: refused to load: the file holds Python objects beyond tensors"),
])
def test_bad_checkpoints_in_the_weights_folder(app_server, name, message):
    lab = app_server.lab
    assert name in [value for _, value in lab.manager.choices()]      # offered: they are in the folder
    msg = depth_error(app_server.client(), name, ASSET)
    assert message in msg, msg
    assert not (app_server.tmp / "exploit-ran").exists()              # nothing in a checkpoint ran
    assert name not in lab.manager.loaded()


def test_clicks_outside_the_image(app_server, user):
    for x, y in ((451, 10), (10, 300), (-1, 10), (10, -1), (1e9, 1e9)):
        msg = error_of(user, x, y, 12, "row", False, False, "inferno", 0, False, api_name="/attention")
        assert f"the click ({x:g}, {y:g}) is outside the 451x300 image" in msg
    for x, y in ((450, 299), (0, 0), (-0.5, -0.5), (450.4, 299.4)):       # the edge pixels are inside
        _, _, text, _, _ = attention(user, x, y)
        assert "patch row" in text


def test_the_class_token_of_a_model_without_one(app_server, tmp_path):
    client = app_server.client()
    Image.open(ASSET).convert("RGB").resize((128, 96)).save(tmp_path / "small.png")
    pair, _, _, _ = depth(client, SWIN, tmp_path / "small.png", base=128)
    assert rgb(pair[1]).shape == (96, 128, 3)
    msg = error_of(client, None, None, 1, "row", False, False, "inferno", 0, True, api_name="/attention")
    assert "this model has no class token (SwinV2): click a patch instead" in msg
    _, _, text, _, _ = attention(client, 10, 10, layer=1)               # a patch is fine
    assert "patch row" in text


# (endpoint, arguments) that must work: the controls at their bounds
AT_BOUNDS = [
    ("/fusion", (5, -5, 5, -5, "turbo")),
    ("/fusion", (-5, 5, 0, 1, "gray")),
    ("/attention", (10, 10, 1, "row", False, False, "inferno", 0, False)),
    ("/attention", (10, 10, 12, "column", True, True, "viridis", 1, False)),
    ("/norms", ("fixed", 0.001, 1, True)),
    ("/norms", ("auto", 150, 12, False)),
]
# (endpoint, arguments, message) beyond the bounds or not numbers
BEYOND = [
    ("/fusion", (5.01, 1, 1, 1, "turbo"), "fusion factor 5.01 outside [-5, 5]"),
    ("/fusion", (1, 1, 1, -5.5, "turbo"), "fusion factor -5.5 outside [-5, 5]"),
    ("/fusion", ("a lot", 1, 1, 1, "turbo"), "number"),
    ("/fusion", ("nan", 1, 1, 1, "turbo"), "finite"),
    ("/attention", (10, 10, 0, "row", False, False, "inferno", 0, False), "layer must be between 1 and 12, got 0"),
    ("/attention", (10, 10, 13, "row", False, False, "inferno", 0, False), "layer must be between 1 and 12, got 13"),
    ("/attention", (10, 10, 2.5, "row", False, False, "inferno", 0, False), "layer must be a whole number"),
    ("/attention", (10, 10, 12, "row", False, False, "inferno", 1.01, False), "overlay alpha must be between"),
    ("/attention", (10, 10, 12, "row", False, False, "inferno", -0.01, False), "overlay alpha must be between"),
    ("/attention", (10, 10, 12, "diagonal", False, False, "inferno", 0, False), "mode must be 'row' or 'column'"),
    ("/attention", ("inf", 10, 12, "row", False, False, "inferno", 0, False), "x must be finite"),
    ("/norms", ("auto", 150, 0, True), "block must be between 1 and 12, got 0"),
    ("/norms", ("auto", 150, 13, True), "block must be between 1 and 12, got 13"),
    ("/norms", ("fixed", 0, 12, True), "threshold must be 'auto' or a positive number, got 0"),
    ("/norms", ("fixed", -3, 12, True), "threshold must be 'auto' or a positive number"),
    ("/norms", ("fixed", "nan", 12, True), "threshold"),
]


def test_controls_at_and_beyond_their_bounds(app_server, user):
    encodes = app_server.lab.store.encodes
    for api_name, args in AT_BOUNDS:
        assert user.predict(*args, api_name=api_name), (api_name, args)
    for api_name, args, message in BEYOND:
        msg = error_of(user, *args, api_name=api_name)
        assert message in msg, (api_name, args, msg)
    assert app_server.lab.store.encodes == encodes                  # none of it re-encoded
    # base size: the API takes 28 .. 2048 (the slider shows 70 .. 1036)
    pair, _, text, _ = depth(app_server.client(), app_server.model, ASSET, base=28)
    assert "base size 28" in text and rgb(pair[1]).shape == (300, 451, 3)
    for bad in (27, 2049, 140.5):
        assert "base size must be" in depth_error(app_server.client(), app_server.model, ASSET, base=bad)


def test_nan_and_infinity_sent_as_json_numbers(app_server, user):
    """gradio_client refuses to send NaN (not JSON); a raw HTTP client can (Python's JSON
    reader accepts NaN and Infinity). The app answers with a message all the same."""
    import httpx

    url = app_server.url.rstrip("/")
    with pytest.raises(ValueError, match="JSON"):
        user.predict(float("nan"), 1, 1, 1, "turbo", api_name="/fusion")
    cases = [
        ("fusion", "[NaN, 1, 1, 1, \"turbo\"]", "fusion factors must be finite, got nan"),
        ("fusion", "[1, Infinity, 1, 1, \"turbo\"]", "fusion factors must be finite, got inf"),
        ("attention", "[NaN, 10, 12, \"row\", false, false, \"inferno\", 0, false]", "x must be finite, got nan"),
        ("attention", "[10, 10, NaN, \"row\", false, false, \"inferno\", 0, false]", "layer must be finite"),
        ("attention", "[10, 10, 12, \"row\", false, false, \"inferno\", -Infinity, false]",
         "overlay alpha must be finite"),
        ("norms", "[\"fixed\", NaN, 12, true]", "threshold"),
        ("depth", None, "base size must be finite"),
    ]
    with open(ASSET, "rb") as f:
        up = httpx.post(f"{url}/gradio_api/upload", files={"files": ("chelsea.jpg", f)}, timeout=30)
    path = up.json()[0]
    image = json.dumps({"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "chelsea.jpg"})
    for api, data, message in cases:
        if data is None:
            data = f"[{image}, \"{app_server.model}\", NaN, \"default\", \"turbo\"]"
        body = f"{{\"data\": {data}, \"session_hash\": \"{user.session_hash}\"}}"
        r = httpx.post(f"{url}/gradio_api/call/{api}", content=body, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 200, r.text
        event = r.json()["event_id"]
        with httpx.stream("GET", f"{url}/gradio_api/call/{api}/{event}", timeout=60) as s:
            lines = [line for line in s.iter_lines() if line.startswith(("event:", "data:"))]
        kinds = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
        assert "error" in kinds and "complete" not in kinds, (api, lines)
        error = json.loads(lines[lines.index("event: error") + 1].split(":", 1)[1])
        assert message in error["error"], (api, error)


def test_an_unknown_colormap(app_server, user):
    msg = depth_error(app_server.client(), app_server.model, ASSET, cmap="rainbow")
    assert "unknown colormap 'rainbow'; choose one of turbo, viridis" in msg
    assert "unknown colormap" in error_of(user, 1, 1, 1, 1, "jet", api_name="/fusion")
    assert "unknown colormap" in error_of(user, 10, 10, 12, "row", False, False, "hot", 0, False,
                                          api_name="/attention")


def test_two_exports_at_once_run_one_after_the_other(app_server, monkeypatch):
    """Two users press Export together: the app runs one export at a time (its queue), so
    the second waits its turn and both get a verified file."""
    lab = app_server.lab
    spans, original = [], lab.export_model

    def timed_export(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spans.append((t0, time.perf_counter()))

    monkeypatch.setattr(lab, "export_model", timed_export)
    a, b = app_server.client(), app_server.client()
    jobs = [c.submit(app_server.model, True, False, False, 0, 56, api_name="/export") for c in (a, b)]
    results = [job.result(timeout=600) for job in jobs]
    assert len(spans) == 2
    (s1, e1), (s2, e2) = sorted(spans)
    assert e1 <= s2                                   # never at the same time
    paths = [Path(r[2]) for r in results]             # (the same bytes: gradio_client may keep one copy)
    assert all(p.is_file() and p.stat().st_size > 1e6 for p in paths)
    assert all(r[1].strip() for r in results)


def test_an_export_that_fails_its_check_offers_no_file(app_server, monkeypatch):
    from dpt_lab import export

    def failing(model, path, **kwargs):
        raise export.VerificationError("onnxruntime vs PyTorch at 56x56: max rel err 0.31 > 0.0001")

    monkeypatch.setattr(export, "export_onnx", failing)
    msg = error_of(app_server.client(), app_server.model, True, False, False, 0, 56, api_name="/export")
    assert "onnxruntime vs PyTorch at 56x56: max rel err 0.31" in msg


def test_out_of_memory_is_a_message(app_server, monkeypatch, tmp_path):
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(app_server.lab, "_encode", no_memory)
    Image.new("RGB", (64, 48), (10, 200, 90)).save(tmp_path / "green.png")
    client = app_server.client()
    assert "out of memory: try a smaller image or base size" in depth_error(client, app_server.model,
                                                                           tmp_path / "green.png")
    monkeypatch.undo()
    pair, _, _, _ = depth(client, app_server.model, tmp_path / "green.png")   # and it works once memory is back
    assert rgb(pair[1]).shape == (48, 64, 3)


def test_nothing_was_written_outside_the_temporary_folders(app_server, before):
    """Runs last: every bad input above left the weights folder and the repository alone
    (uploads, outputs and exports live in GRADIO_TEMP_DIR, under the test's own folder)."""
    weights, files = before
    assert tree(app_server.weights) == weights
    new = set(tree(ROOT, SKIP_DIRS)) - files
    assert not new, sorted(new)[:20]
    assert not (app_server.tmp / "exploit-ran").exists()
