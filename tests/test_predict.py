"""Image in, depth out: `model.preprocess` / `model.predict` against each family's official
run script, reproduced here with OpenCV (test-only) on the synthesized checkpoints.

The official scripts (Depth-Anything v2 `dpt.py` infer_image, Depth-Anything v1 `run.py`,
MiDaS 3.1 `run.py` + `model_loader.py`) all do:
    cv2.imread -> BGR2RGB -> / 255.0 (float64) -> Resize (their sizing rule, cv2 INTER_CUBIC)
    -> (x - mean) / std -> float32 CHW -> model -> F.interpolate back to the image's H x W.
Everything below (sizing rule, resize, normalisation, depth resize) is written from those
scripts, independently of dpt_lab.imaging; both pipelines run the same model, so the
comparison isolates the image handling (the model itself is test_parity.py's business).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import DATA, OFFICIAL_NAMES, FixtureModels, key_rows
from PIL import Image
from test_imaging import official_resize_size

import dpt_lab
from dpt_lab.imaging import load_image

cv2 = pytest.importorskip("cv2")

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STEMS = sorted(OFFICIAL_NAMES)
PRE_TOL = 1e-5     # preprocessed tensor, absolute (measured <= 1e-6; torch bicubic would be ~4e-5)
DEPTH_TOL = 1e-4   # depth, relative to its max (measured ~2e-6)


# ----------------------------------------------------------------------------- official
@dataclass(frozen=True)
class Official:
    target: int
    multiple: int
    keep_aspect: bool
    method: str             # Resize's resize_method
    mean: tuple
    std: tuple
    back: str               # F.interpolate mode for the depth
    align_corners: bool


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OFFICIAL = {
    "depth_anything_v2": Official(518, 14, True, "lower_bound", *IMAGENET, "bilinear", True),
    "depth_anything_v2_metric": Official(518, 14, True, "lower_bound", *IMAGENET, "bilinear", True),
    "depth_anything_v1": Official(518, 14, True, "lower_bound", *IMAGENET, "bilinear", False),
    "midas_beit": Official(384, 32, True, "minimal", *HALF, "bicubic", False),
    "midas_swin2": Official(256, 32, False, "minimal", *HALF, "bicubic", False),
}


def official_size(height, width, spec: Official, target=None, keep_aspect=None):
    """(new_h, new_w) of the official Resize transform (test_imaging's transcription)."""
    return official_resize_size(height, width, spec.target if target is None else target, spec.multiple, spec.method,
                                spec.keep_aspect if keep_aspect is None else keep_aspect)


def official_read(path) -> np.ndarray:
    """cv2.imread -> RGB -> / 255.0, as every official script reads an image."""
    img = cv2.imread(str(path))
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) / 255.0


def normalize_to_tensor(rgb: np.ndarray, spec: Official) -> torch.Tensor:
    rgb = (rgb - np.array(spec.mean)) / np.array(spec.std)
    return torch.from_numpy(np.ascontiguousarray(np.transpose(rgb, (2, 0, 1))).astype(np.float32))[None]


def official_input(rgb: np.ndarray, spec: Official, target=None, keep_aspect=None) -> torch.Tensor:
    h, w = official_size(*rgb.shape[:2], spec, target, keep_aspect)
    return normalize_to_tensor(cv2.resize(rgb, (w, h), interpolation=cv2.INTER_CUBIC), spec)


def official_depth_back(depth: torch.Tensor, size, spec: Official) -> np.ndarray:
    out = F.interpolate(depth[:, None], size=tuple(size), mode=spec.back, align_corners=spec.align_corners)
    return out[0, 0].numpy()


def run_model(model, x):
    with torch.inference_mode():
        return model(x)


def pil_input(path, size, spec: Official) -> torch.Tensor:
    """What a re-implementation with PIL's BICUBIC would feed the model (same size)."""
    img = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    return normalize_to_tensor(np.asarray(img) / 255.0, spec)


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------- images
def mosaic() -> np.ndarray:
    """900 x 1350 canvas of real photo detail: 300 x 450 crops of the five photos and their mirrors."""
    tiles = []
    for name in sorted(p.name for p in ASSETS.glob("*.jpg")):
        a = np.asarray(Image.open(ASSETS / name).convert("RGB"))
        y, x = (a.shape[0] - 300) // 2, (a.shape[1] - 450) // 2
        tiles += [a[y:y + 300, x:x + 450], a[y:y + 300, x:x + 450][:, ::-1]]
    rows = [np.concatenate(tiles[i:i + 3], axis=1) for i in (0, 3, 6)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


CROPS = {  # name: (top, left, height, width)
    "landscape_900x600.png": (150, 300, 600, 900),   # downscaled by every family
    "portrait_333x517.png": (101, 211, 517, 333),    # odd sizes
    "landscape_517x333.png": (411, 707, 333, 517),
    "portrait_200x300.png": (350, 600, 300, 200),    # upscaled
    "tiny_7x5.png": (400, 700, 5, 7),                # tiny: heavy upscaling
}
ASSET_IMAGES = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "motorcycle_left.jpg", "rocket.jpg"]
IMAGES = ASSET_IMAGES + list(CROPS) + ["rocket_exif6.jpg", "gray.png"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict_images")
    paths = {name: ASSETS / name for name in ASSET_IMAGES}
    canvas = mosaic()
    for name, (t, l, h, w) in CROPS.items():
        Image.fromarray(canvas[t:t + h, l:l + w]).save(folder / name)
        paths[name] = folder / name
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: a 427 x 640 portrait
    Image.open(ASSETS / "rocket.jpg").save(folder / "rocket_exif6.jpg", quality=92, exif=exif.tobytes())
    Image.open(ASSETS / "coffee.jpg").convert("L").save(folder / "gray.png")
    paths["rocket_exif6.jpg"] = folder / "rocket_exif6.jpg"
    paths["gray.png"] = folder / "gray.png"
    return paths


FORWARD_STEMS = {"depth_anything_v2_vits", "depth_anything_v2_metric_vits", "depth_anything_v1_vits",
                 "dpt_beit_base_384", "dpt_swin2_tiny_256"}


def zero_weight_model(stem):
    """The fixture's model with zero weights (buffers exact): the same ModelInfo (family,
    sizes, pipeline) without drawing and writing ViT-L's 300M random numbers; only for
    tests that never run the model (preprocess, info)."""
    from dpt_lab.checkpoints import LoadHints, RawCheckpoint, build_model

    npz = np.load(DATA / f"{stem}.npz")
    state = {key: torch.from_numpy(np.array(npz["buffer/" + key])) if kind == "buffer" else torch.zeros(shape)
             for key, shape, kind in key_rows(stem)}
    name = OFFICIAL_NAMES[stem]
    return build_model(RawCheckpoint(state, None, Path(name), name.lower()), LoadHints())


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    """stem -> model: the synthesized checkpoint through load_model (the five that run),
    zero weights for the ViT-B / ViT-L layouts (only their preprocessing is tested)."""
    load = FixtureModels(checkpoint_dir)
    cache = {}

    def get(stem):
        if stem not in cache:
            cache[stem] = load(stem).eval() if stem in FORWARD_STEMS else zero_weight_model(stem)
        return cache[stem]

    return get


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("stem", STEMS)
def test_info_carries_the_official_pipeline(models, stem):
    info = models(stem).info
    spec = OFFICIAL[info.family]
    assert (info.base_size, info.multiple) == (spec.target, spec.multiple)
    assert info.keep_aspect_default == spec.keep_aspect
    assert info.resize_rule == ("stretch" if not spec.keep_aspect else spec.method)
    assert tuple(info.mean) == spec.mean and tuple(info.std) == spec.std
    expected_back = {("bilinear", True): "bilinear_align", ("bilinear", False): "bilinear", ("bicubic", False): "bicubic"}
    assert info.depth_resize == expected_back[(spec.back, spec.align_corners)]


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("stem", STEMS)
def test_preprocess_matches_official(models, images, stem, image):
    model = models(stem)
    spec = OFFICIAL[model.info.family]
    rgb = official_read(images[image])
    ref = official_input(rgb, spec)
    x, meta = model.preprocess(images[image])
    assert x.shape == ref.shape and x.dtype == torch.float32  # exactly the official input size
    assert meta.image_size == rgb.shape[:2] and meta.input_size == tuple(ref.shape[-2:])
    err = (x - ref).abs().max().item()
    assert err <= PRE_TOL, f"{err:.3g}"
    # the reference discriminates: PIL's BICUBIC at the same size is far off
    pil_err = (pil_input(images[image], meta.input_size, spec) - ref).abs().max().item()
    assert pil_err > 1e-2 and pil_err > 100 * err, (pil_err, err)


@pytest.mark.parametrize("stem,base_size,keep_aspect", [
    ("depth_anything_v2_vits", 392, None), ("depth_anything_v2_vits", 600, None), ("depth_anything_v1_vits", 266, None),
    ("dpt_beit_base_384", 512, None), ("dpt_beit_base_384", 300, False), ("dpt_beit_base_384", 256, True),
    ("dpt_swin2_tiny_256", 384, None), ("dpt_swin2_tiny_256", 200, None),
])
def test_preprocess_options_match_official(models, images, stem, base_size, keep_aspect):
    """base_size = the scripts' input size / --height; keep_aspect=False = MiDaS --square."""
    model = models(stem)
    spec = OFFICIAL[model.info.family]
    for image in ("portrait_333x517.png", "coffee.jpg"):
        rgb = official_read(images[image])
        ref = official_input(rgb, spec, target=base_size, keep_aspect=keep_aspect)
        x, meta = model.preprocess(images[image], base_size=base_size, keep_aspect=keep_aspect)
        assert x.shape == ref.shape, image
        assert (x - ref).abs().max().item() <= PRE_TOL
        if keep_aspect is False or (keep_aspect is None and not spec.keep_aspect):
            side = int(np.round(base_size / spec.multiple) * spec.multiple)
            assert meta.input_size == (side, side) and not meta.keep_aspect


def test_preprocess_da_stretch_rounds_to_the_multiple(models, images):
    """No official DA script stretches; keep_aspect=False gives base x base rounded to 14."""
    model = models("depth_anything_v2_vits")
    rgb = official_read(images["chelsea.jpg"])
    for base, side in ((518, 518), (300, 294), (310, 308)):
        x, meta = model.preprocess(images["chelsea.jpg"], base_size=base, keep_aspect=False)
        assert meta.input_size == (side, side) and meta.rule == "stretch"
        ref = normalize_to_tensor(cv2.resize(rgb, (side, side), interpolation=cv2.INTER_CUBIC), OFFICIAL["depth_anything_v2"])
        assert (x - ref).abs().max().item() <= PRE_TOL


PREDICT_CASES = [  # (stem, image, base_size): every family, up / down, landscape / portrait, odd, tiny
    ("depth_anything_v2_vits", "chelsea.jpg", None),                   # 518 x 784, upscaled (+ the PIL check)
    ("depth_anything_v2_vits", "landscape_900x600.png", 266),          # downscaled
    ("depth_anything_v2_vits", "tiny_7x5.png", 140),                   # 28x upscale
    ("depth_anything_v2_metric_vits", "portrait_333x517.png", 392),    # 602 x 392 portrait, odd size
    ("depth_anything_v2_metric_vits", "rocket_exif6.jpg", 196),        # EXIF orientation
    ("depth_anything_v1_vits", "portrait_200x300.png", 252),           # v1's own depth resize
    ("dpt_beit_base_384", "chelsea.jpg", None),                        # 256 x 384, downscaled
    ("dpt_swin2_tiny_256", "motorcycle_left.jpg", None),               # stretched to 256 x 256
]
PIL_CASE = ("depth_anything_v2_vits", "chelsea.jpg", None)
_official_depths: dict = {}


def official_predict(model, path, base_size=None, spec=None):
    key = (id(model), str(path), base_size)
    if key not in _official_depths:
        spec = spec or OFFICIAL[model.info.family]
        rgb = official_read(path)
        depth = run_model(model, official_input(rgb, spec, target=base_size))
        # the model is kept with its depth: a freed model's id can come back for another
        _official_depths[key] = (model, official_depth_back(depth, rgb.shape[:2], spec))
    return _official_depths[key][1]


@pytest.mark.parametrize("stem,image,base_size", PREDICT_CASES)
def test_predict_matches_official(models, images, stem, image, base_size):
    model = models(stem)
    ref = official_predict(model, images[image], base_size)
    depth = model.predict(images[image], base_size=base_size)
    assert isinstance(depth, np.ndarray) and depth.dtype == np.float32
    assert depth.shape == ref.shape == load_image(images[image]).shape[:2]
    assert np.isfinite(depth).all() and np.abs(ref).max() > 0
    err = rel_err(depth, ref)
    assert err <= DEPTH_TOL, f"{err:.3g}"
    if (stem, image, base_size) == PIL_CASE:
        # the comparison can fail: PIL's BICUBIC (another kernel; antialiasing when it
        # downscales) moves the depth by percents (every family's input: test_preprocess...)
        spec = OFFICIAL[model.info.family]
        x, meta = model.preprocess(images[image], base_size=base_size)
        pil = official_depth_back(run_model(model, pil_input(images[image], meta.input_size, spec)), meta.image_size, spec)
        pil_err = rel_err(pil, ref)
        assert pil_err > 1e-2 and pil_err > 100 * err, (pil_err, err)


@pytest.mark.parametrize("stem,base_size", [("depth_anything_v2_vits", 28), ("dpt_swin2_tiny_256", 64)])
def test_one_pixel_tall_or_wide_photo(models, tmp_path, stem, base_size):
    """A 1 x 9 or 9 x 1 image still gives a 1 x 9 / 9 x 1 depth map, as the official code."""
    model = models(stem)
    canvas = mosaic()
    for h, w in ((1, 9), (9, 1)):
        path = tmp_path / f"strip_{h}x{w}.png"
        Image.fromarray(canvas[400:400 + h, 700:700 + w]).save(path)
        ref = official_predict(model, path, base_size)
        depth = model.predict(path, base_size=base_size)
        assert depth.shape == ref.shape == (h, w)
        assert np.abs(depth - ref).max() <= DEPTH_TOL * max(np.abs(ref).max(), 1e-6)


@pytest.mark.parametrize("stem", ["depth_anything_v2_vits", "depth_anything_v1_vits", "depth_anything_v2_metric_vits",
                                  "dpt_beit_base_384", "dpt_swin2_tiny_256"])
def test_postprocess_is_the_official_depth_resize(models, stem):
    """Each family's way back to image size, and only it (the modes differ measurably)."""
    model = models(stem)
    spec = OFFICIAL[model.info.family]
    g = torch.Generator().manual_seed(1)
    depth = torch.rand(1, 37, 56, generator=g) + torch.linspace(0, 3, 56)
    x, meta = model.preprocess(np.zeros((333, 517, 3), np.uint8))
    for size in ((333, 517), (900, 1201), (5, 7)):
        meta.image_size = size
        ours = model.postprocess(depth, meta)
        assert ours.shape == size and ours.dtype == np.float32
        assert rel_err(ours, official_depth_back(depth, size, spec)) <= 1e-6
        for other in {(s.back, s.align_corners) for s in OFFICIAL.values()} - {(spec.back, spec.align_corners)}:
            alt = dataclasses.replace(spec, back=other[0], align_corners=other[1])
            if size != (5, 7):
                assert rel_err(ours, official_depth_back(depth, size, alt)) > 1e-3, other


def test_load_matches_cv2_imread(tmp_path):
    """load_image gives what the scripts' cv2.imread gives: every EXIF orientation, gray,
    palette, opaque RGBA exactly; CMYK and 16-bit within one level (rounding). Transparent
    pixels are the one deliberate difference: we composite on white, cv2 drops alpha."""
    src = np.asarray(Image.open(ASSETS / "chelsea.jpg"))

    def both(img, name, **kw):
        path = tmp_path / name
        img.save(path, **kw)
        ref = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        return load_image(path), ref

    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        ours, ref = both(Image.fromarray(src), f"o{orientation}.jpg", quality=92, exif=exif.tobytes())
        assert ours.shape == ref.shape and np.array_equal(ours, ref), orientation
        if orientation in (5, 6, 7, 8):
            assert ours.shape[:2] == src.shape[1::-1]
    for mode, name in (("L", "l.png"), ("L", "l.jpg"), ("P", "p.png"), ("RGBA", "rgba.png")):
        ours, ref = both(Image.fromarray(src).convert(mode), name)
        assert np.array_equal(ours, ref), name
    ours, ref = both(Image.fromarray(src).convert("CMYK"), "cmyk.jpg", quality=95)
    assert np.abs(ours.astype(int) - ref).max() <= 1
    g16 = np.asarray(Image.fromarray(src).convert("L")).astype(np.uint16) * 257 + 100
    ours, ref = both(Image.fromarray(g16), "g16.png")
    assert np.abs(ours.astype(int) - ref).max() <= 1
    rgba = np.asarray(Image.fromarray(src).convert("RGBA")).copy()
    rgba[:50, :, 3] = 0
    ours, ref = both(Image.fromarray(rgba), "transparent.png")
    assert np.array_equal(ours[50:], ref[50:]) and np.all(ours[:50] == 255)


@pytest.mark.parametrize("stem,base_size,keep_aspect", [
    ("depth_anything_v2_vits", None, None), ("dpt_beit_base_384", None, None),
    ("dpt_swin2_tiny_256", None, None), ("depth_anything_v1_vits", 280, False),
])
def test_meta_maps_image_pixels_to_the_input_and_back(models, stem, base_size, keep_aspect):
    """A smooth dot centred on image pixel (y, x) is centred on meta.image_to_input(y, x) in
    the model input (to ~0.02 px; the corner-aligned x * scale would be 0.09..0.28 px off)."""
    model = models(stem)
    H, W = 517, 333
    Y, X = np.mgrid[0:H, 0:W]
    for y, x in ((15, 20), (258, 166), (500, 312), (120, 40)):
        dot = np.rint(255 * np.exp(-((Y - y) ** 2 + (X - x) ** 2) / (2 * 3.0 ** 2))).astype(np.uint8)
        t, meta = model.preprocess(np.repeat(dot[..., None], 3, axis=2), base_size=base_size, keep_aspect=keep_aspect)
        plane = t[0, 0].double().numpy()
        weight = np.clip(plane - plane[-1, 0], 0, None)  # above the background
        gy, gx = np.mgrid[0:plane.shape[0], 0:plane.shape[1]]
        cy, cx = (weight * gy).sum() / weight.sum(), (weight * gx).sum() / weight.sum()
        ey, ex = meta.image_to_input(y, x)
        assert abs(cy - ey) <= 0.04 and abs(cx - ex) <= 0.04, ((cy, cx), (ey, ex))
        by, bx = meta.input_to_image(ey, ex)
        assert abs(by - y) < 1e-9 and abs(bx - x) < 1e-9
        # the token under that pixel: patch_size input pixels per token side (pixel i covers
        # [i - 0.5, i + 0.5], so the token is floor((coord + 0.5) / patch))
        patch = model.info.patch_size
        assert all(side % model.info.tile == 0 for side in meta.input_size)
        for e, c in ((ey, cy), (ex, cx)):
            pos = (e + 0.5) / patch
            if min(pos % 1, 1 - pos % 1) * patch > 0.05:  # not on a token boundary
                assert int(pos) == int((c + 0.5) / patch)
    # the outer edges coincide: the image corner is the input corner
    assert np.allclose(meta.image_to_input(-0.5, -0.5), (-0.5, -0.5))
    h, w = meta.input_size
    assert np.allclose(meta.image_to_input(H - 0.5, W - 0.5), (h - 0.5, w - 0.5))


def test_hf_folders_predict_like_the_official_script(models, images, tmp_path):
    """The pipeline comes from model.info, so an -hf folder predicts like its family's script
    (tiny random -hf models: Depth-Anything v1 and v2 (told apart by config.json's taps),
    v2 metric, BEiT, SwinV2), with the same pipeline fields as the original checkpoint."""
    pytest.importorskip("transformers")
    from hf_reference import depth_anything_hf
    from test_beit import beit_hf
    from test_swin2 import make_hf

    depth_anything_hf(tmp_path / "da1", layers=6, out_indices=(3, 4, 5, 6))
    depth_anything_hf(tmp_path / "da2", layers=6, out_indices=(2, 3, 5, 6))
    depth_anything_hf(tmp_path / "da2_metric", layers=6, out_indices=(2, 3, 5, 6), metric=True)
    beit_hf(tmp_path / "beit")
    make_hf(tmp_path / "swin2")
    originals = {"da1": "depth_anything_v1_vits", "da2": "depth_anything_v2_vits", "da2_metric": "depth_anything_v2_metric_vits",
                 "beit": "dpt_beit_base_384", "swin2": "dpt_swin2_tiny_256"}
    fields = ("resize_rule", "depth_resize", "multiple", "mean", "std", "keep_aspect_default")
    for folder, original in originals.items():
        model = dpt_lab.load_model(tmp_path / folder)
        orig = models(original).info
        assert model.info.layout == "hf" and model.info.family == orig.family, folder
        assert [getattr(model.info, f) for f in fields] == [getattr(orig, f) for f in fields], folder
        ref = official_predict(model, images["portrait_333x517.png"], model.info.base_size)
        assert rel_err(model.predict(images["portrait_333x517.png"]), ref) <= DEPTH_TOL, folder
