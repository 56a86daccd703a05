"""Tests of dpt_lab.imaging: official sizing, cv2-exact resize, loading, outputs."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dpt_lab.imaging import (
    COLORMAPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_PIXELS,
    ImageError,
    PreprocessMeta,
    colorize,
    colormap_lut,
    depth_to_png16,
    load_image,
    normalize,
    official_size,
    png16_to_depth,
    prepare,
    read_png16,
    resize_bicubic,
    resize_depth,
    save_npy,
    to_tensor,
)

HALF = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- sizing


def official_resize_size(h, w, target, m, method, keep_aspect=True):
    """Straight transcription of the official Resize.get_size / constrain_to_multiple_of."""

    def constrain(x, min_val=0, max_val=None):
        y = (np.round(x / m) * m).astype(int)
        if max_val is not None and y > max_val:
            y = (np.floor(x / m) * m).astype(int)
        if y < min_val:
            y = (np.ceil(x / m) * m).astype(int)
        return int(y)

    sh, sw = target / h, target / w
    if keep_aspect:
        if method == "lower_bound":
            if sw > sh:
                sh = sw
            else:
                sw = sh
        elif method == "upper_bound":
            if sw < sh:
                sh = sw
            else:
                sw = sh
        elif method == "minimal":
            if abs(1 - sw) < abs(1 - sh):
                sh = sw
            else:
                sw = sh
    if method == "lower_bound":
        return constrain(sh * h, min_val=target), constrain(sw * w, min_val=target)
    if method == "upper_bound":
        return constrain(sh * h, max_val=target), constrain(sw * w, max_val=target)
    return constrain(sh * h), constrain(sw * w)


SIZES = [(333, 517), (900, 600), (200, 300), (600, 900), (518, 518), (1080, 1920)]


@pytest.mark.parametrize(
    "size,expected",
    list(zip(SIZES, [(518, 798), (784, 518), (518, 784), (518, 784), (518, 518), (518, 924)])),
)
def test_official_size_da_lower_bound(size, expected):
    assert official_size(*size, target=518, multiple=14, rule="lower_bound") == expected


@pytest.mark.parametrize(
    "size,expected",
    list(zip(SIZES, [(384, 608), (576, 384), (256, 384), (384, 576), (384, 384), (384, 672)])),
)
def test_official_size_midas_minimal(size, expected):
    assert official_size(*size, target=384, multiple=32, rule="minimal") == expected


def test_official_size_special_cases():
    # 400/32 = 12.5 rounds half to even (12), not up (13)
    assert official_size(480, 500, target=384, multiple=32, rule="minimal") == (384, 384)
    # 777/14 = 55.5 -> 56
    assert official_size(900, 600, target=518, multiple=14, rule="lower_bound") == (784, 518)
    assert official_size(1080, 1920, target=518, multiple=14, rule="upper_bound") == (294, 518)
    assert official_size(1080, 1920, target=512, multiple=32, rule="minimal") == (512, 896)
    for s in SIZES + [(1, 1), (3000, 4000)]:
        assert official_size(*s, target=256, multiple=32, rule="stretch") == (256, 256)
        assert official_size(*s, target=384, multiple=32, rule="stretch") == (384, 384)
    assert official_size(100, 200, target=(256, 384), multiple=32, rule="stretch") == (256, 384)
    with pytest.raises(ValueError):
        official_size(10, 10, target=384, multiple=32, rule="bogus")
    with pytest.raises(ValueError):
        official_size(0, 10, target=384, multiple=32, rule="minimal")


def test_official_size_matches_reference_sweep():
    rng = np.random.default_rng(1)
    sizes = [tuple(int(v) for v in rng.integers(1, 6000, 2)) for _ in range(400)]
    sizes += [(h, w) for h in range(500, 540) for w in (333, 517, 518, 700)]
    for h, w in sizes:
        for target, m in ((518, 14), (384, 32), (512, 32), (256, 32)):
            for method in ("lower_bound", "upper_bound", "minimal"):
                assert official_size(h, w, target=target, multiple=m, rule=method) == official_resize_size(h, w, target, m, method), (h, w, target, method)
            assert official_size(h, w, target=target, multiple=m, rule="stretch") == official_resize_size(h, w, target, m, "minimal", keep_aspect=False)


# ---------------------------------------------------------------- resize vs cv2


def _detailed(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 0.5 + 0.5 * np.sin(xx / 7.0 + yy / 13.0)
    noise = rng.random((h, w, 3))
    img = np.where((xx // 9 + yy // 9)[..., None] % 2 == 0, noise, smooth[..., None])
    img[h // 3: h // 3 + 2] = 1.0  # sharp lines
    img[:, w // 2] = 0.0
    return img


RESIZE_CASES = [
    ((333, 517), (518, 798)),   # upscale, DA
    ((900, 600), (784, 518)),   # downscale
    ((1080, 1920), (518, 924)),
    ((7, 5), (20, 31)),         # tiny, heavy upscale: edge replication
    ((100, 100), (3, 3)),       # heavy downscale
    ((50, 41), (51, 39)),       # near identity, odd sizes
    ((1, 1), (5, 7)),
    ((17, 23), (17, 23)),       # identity
    ((64, 64), (64, 99)),       # one axis only
]


@pytest.mark.parametrize("src,dst", RESIZE_CASES)
def test_resize_bicubic_matches_cv2(src, dst):
    cv2 = pytest.importorskip("cv2")
    img = _detailed(*src)
    ref = cv2.resize(img, (dst[1], dst[0]), interpolation=cv2.INTER_CUBIC)
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    out64 = resize_bicubic(t, dst)[0].permute(1, 2, 0).numpy()
    out32 = resize_bicubic(t.float(), dst)[0].permute(1, 2, 0).numpy()
    assert out64.shape == ref.shape
    # float64: same arithmetic as OpenCV up to summation order (~1e-15 measured)
    assert np.abs(out64 - ref).max() <= 1e-9
    assert np.abs(out32 - ref).max() <= 2e-6


def test_resize_bicubic_12mp_random_vs_cv2():
    cv2 = pytest.importorskip("cv2")
    img = np.random.default_rng(3).random((1500, 2000, 3))
    ref = cv2.resize(img, (686, 518), interpolation=cv2.INTER_CUBIC)
    out = resize_bicubic(torch.from_numpy(img).permute(2, 0, 1)[None], (518, 686))
    assert np.abs(out[0].permute(1, 2, 0).numpy() - ref).max() <= 1e-9


def test_resize_bicubic_shapes_and_dtypes():
    x = torch.rand(2, 3, 10, 12)
    assert resize_bicubic(x, (5, 7)).shape == (2, 3, 5, 7)
    assert resize_bicubic(x[0], (5, 7)).shape == (3, 5, 7)
    assert resize_bicubic(x[0, 0], (5, 7)).shape == (5, 7)
    assert resize_bicubic(x.double(), (5, 7)).dtype == torch.float64
    assert resize_bicubic(x.half(), (5, 7)).dtype == torch.float16
    c = torch.full((1, 1, 4, 4), 0.25)
    assert torch.allclose(resize_bicubic(c, (9, 3)), torch.full((1, 1, 9, 3), 0.25))


# ---------------------------------------------------------------- prepare


PREP_CASES = [
    dict(target=518, multiple=14, rule="lower_bound", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    dict(target=518, multiple=14, rule="upper_bound", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    dict(target=384, multiple=32, rule="minimal", mean=HALF, std=HALF),
    dict(target=512, multiple=32, rule="minimal", mean=HALF, std=HALF),
    dict(target=256, multiple=32, rule="stretch", mean=HALF, std=HALF),
]


@pytest.mark.parametrize("kw", PREP_CASES, ids=lambda k: f"{k['rule']}-{k['target']}")
@pytest.mark.parametrize("hw", [(333, 517), (900, 600), (37, 61)])
def test_prepare_matches_official_cv2(kw, hw):
    cv2 = pytest.importorskip("cv2")
    img = (_detailed(*hw, seed=5) * 255).round().astype(np.uint8)
    x, meta = prepare(img, **kw)
    h, w = official_size(*hw, target=kw["target"], multiple=kw["multiple"], rule=kw["rule"])
    assert x.shape == (1, 3, h, w) and x.dtype == torch.float32
    assert meta.input_size == (h, w) and meta.image_size == hw
    assert meta.keep_aspect == (kw["rule"] != "stretch")
    ref = cv2.resize(img / 255.0, (w, h), interpolation=cv2.INTER_CUBIC)
    ref = (ref - np.array(kw["mean"])) / np.array(kw["std"])
    ref = ref.astype(np.float32).transpose(2, 0, 1)[None]
    assert np.abs(x.numpy() - ref).max() <= 2e-3
    assert np.abs(x.numpy() - ref).max() <= 1e-5  # measured ~1e-6
    x64, _ = prepare(img, dtype=torch.float64, **kw)
    assert x64.dtype == torch.float64 and np.abs(x64.numpy() - ref).max() <= 1e-6


def test_prepare_12mp_fast():
    img = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    prepare(img, target=518, multiple=14, rule="lower_bound", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    t = time.perf_counter()
    x, meta = prepare(img, target=518, multiple=14, rule="lower_bound", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    dt = time.perf_counter() - t
    assert x.shape == (1, 3, 518, 686)
    assert dt < 1.0, f"12 MP preprocess took {dt:.2f}s"


def test_prepare_rejects_extreme_aspect():
    img = np.zeros((2, 40_000, 3), np.uint8)  # would become 518 x 10_360_000
    t = time.perf_counter()
    with pytest.raises(ImageError, match="aspect ratio"):
        prepare(img, target=518, multiple=14, rule="lower_bound", mean=HALF, std=HALF)
    assert time.perf_counter() - t < 0.5
    x, _ = prepare(np.zeros((2, 40, 3), np.uint8), target=518, multiple=14, rule="lower_bound", mean=HALF, std=HALF)
    assert x.shape == (1, 3, 518, 10360)


def test_to_tensor_and_normalize():
    img = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    t = to_tensor(img)
    assert t.shape == (1, 3, 4, 5) and t.dtype == torch.float32
    assert torch.allclose(t[0, 1], torch.from_numpy(img[..., 1] / 255.0).float())
    t64 = to_tensor(img, torch.float64)
    assert np.array_equal(t64[0].permute(1, 2, 0).numpy(), img / 255.0)
    n = normalize(t64, IMAGENET_MEAN, IMAGENET_STD)
    ref = (img / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(n[0].permute(1, 2, 0).numpy(), ref, atol=1e-12)


# ---------------------------------------------------------------- meta


def test_meta_round_trip_and_corners():
    img = np.zeros((333, 517, 3), np.uint8)
    _, meta = prepare(img, target=518, multiple=14, rule="lower_bound", mean=HALF, std=HALF)
    H, W = meta.image_size
    h, w = meta.input_size
    assert meta.scale_y == h / H and meta.scale_x == w / W
    ys, xs = np.random.default_rng(0).uniform(-0.5, 400, (2, 50))
    yi, xi = meta.image_to_input(ys, xs)
    yb, xb = meta.input_to_image(yi, xi)
    assert np.allclose(yb, ys) and np.allclose(xb, xs)
    assert np.allclose(meta.image_to_input(-0.5, -0.5), (-0.5, -0.5))
    assert np.allclose(meta.image_to_input(H - 0.5, W - 0.5), (h - 0.5, w - 0.5))
    assert np.allclose(meta.input_to_image(h - 0.5, -0.5), (H - 0.5, -0.5))
    # the centre of the image maps to the centre of the input
    assert np.allclose(meta.image_to_input((H - 1) / 2, (W - 1) / 2), ((h - 1) / 2, (w - 1) / 2))
    # tensors work too
    yt, xt = meta.image_to_input(torch.tensor([0.0]), torch.tensor([0.0]))
    assert isinstance(yt, torch.Tensor)


def test_meta_matches_resize_sampling():
    # a bright pixel's position moves as the mapping says
    img = np.zeros((40, 60, 3), np.uint8)
    img[10, 45] = 255
    x, meta = prepare(img, target=120, multiple=1, rule="lower_bound", mean=(0, 0, 0), std=(1, 1, 1))
    yi, xi = meta.image_to_input(10, 45)
    peak = np.unravel_index(int(x[0, 0].argmax()), x.shape[2:])
    assert abs(peak[0] - yi) <= 1 and abs(peak[1] - xi) <= 1
    assert isinstance(meta, PreprocessMeta)


# ---------------------------------------------------------------- resize_depth


def test_resize_depth_modes():
    d = torch.rand(2, 37, 49)
    for mode in ("bilinear_align", "bilinear", "bicubic"):
        assert resize_depth(d, (100, 130), mode=mode).shape == (2, 100, 130)
        assert resize_depth(d[0], (100, 130), mode=mode).shape == (100, 130)
    out = resize_depth(d[0], (100, 130), mode="bilinear_align")
    # align_corners=True keeps the corner values exactly
    assert torch.allclose(out[0, 0], d[0, 0, 0]) and torch.allclose(out[-1, -1], d[0, -1, -1])
    ref = torch.nn.functional.interpolate(d[:, None], (100, 130), mode="bicubic", align_corners=False)[:, 0]
    assert torch.equal(resize_depth(d, (100, 130), mode="bicubic"), ref)
    ref = torch.nn.functional.interpolate(d[:, None], (100, 130), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(resize_depth(d, (100, 130), mode="bilinear"), ref)
    with pytest.raises(ValueError):
        resize_depth(d, (10, 10), mode="nearest")


# ---------------------------------------------------------------- load_image


def _save(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_load_exif_rotated_jpeg(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # stored: left half red, right half blue
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = _save(Image.fromarray(a), "JPEG", exif=exif.tobytes(), quality=95)
    p = tmp_path / "rot.jpg"
    p.write_bytes(data)
    for src in (p, str(p), data, io.BytesIO(data), Image.open(io.BytesIO(data))):
        out = load_image(src)
        assert out.shape == (40, 20, 3) and out.dtype == np.uint8
        assert out[5, 10, 0] > 200 and out[5, 10, 2] < 50   # top is red
        assert out[35, 10, 2] > 200 and out[35, 10, 0] < 50  # bottom is blue


def test_load_modes():
    g = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    out = load_image(_save(Image.fromarray(g, "L"), "PNG"))
    assert out.shape == (6, 8, 3) and np.array_equal(out, np.repeat(g[..., None], 3, 2))

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0, 3] = 255
    rgba[0, 1, 3] = 0
    rgba[0, 2, 3] = 128
    out = load_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)  # transparent -> white
    assert abs(int(out[0, 2, 0]) - round(10 * 128 / 255 + 255 * 127 / 255)) <= 1

    la = Image.fromarray(np.stack([g, np.zeros_like(g)], -1), "LA")
    assert np.all(load_image(_save(la, "PNG")) == 255)

    v16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 257 * 20)
    v16[0, 0] = 65535
    img16 = Image.fromarray(v16)
    assert img16.mode.startswith("I;16")
    out = load_image(_save(img16, "PNG"))
    exp = np.round(v16 / 257).astype(np.uint8)
    assert out.shape == (3, 4, 3) and np.array_equal(out[..., 0], exp) and out[0, 0, 0] == 255

    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    out = load_image(_save(cmyk, "JPEG", quality=95))
    assert out.shape == (16, 16, 3) and out[8, 8, 0] > 240 and out[8, 8, 1] < 15 and out[8, 8, 2] < 15

    pal = Image.new("P", (5, 3))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((2, 1), 1)
    out = load_image(_save(pal, "PNG"))
    assert tuple(out[1, 2]) == (200, 100, 50) and tuple(out[0, 0]) == (0, 0, 0)
    pal.info["transparency"] = 0  # index 0 transparent -> white
    out = load_image(_save(pal, "PNG", transparency=0))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 2]) == (200, 100, 50)

    one = Image.fromarray(np.eye(4, dtype=bool))
    out = load_image(_save(one, "PNG"))
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 0

    f = Image.fromarray(np.full((2, 3), 0.5, np.float32), "F")
    assert np.all(load_image(f) == 128)


def test_load_arrays():
    g = np.arange(20, dtype=np.uint8).reshape(4, 5)
    assert load_image(g).shape == (4, 5, 3)
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    assert np.array_equal(load_image(rgb), rgb)
    assert np.array_equal(load_image(rgb.astype(np.uint16) * 257), rgb)
    assert np.array_equal(load_image(rgb / 255.0), rgb)
    rgba = np.concatenate([rgb, np.zeros((4, 5, 1), np.uint8)], -1)
    assert np.all(load_image(rgba) == 255)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ImageError, match="zero size"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="over the limit"):
        load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=100)


def _png_header_only(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_load_errors(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, this is not an image\n" * 10)
    with pytest.raises(ImageError, match="not an image") as ei:
        load_image(txt)
    assert "notes.txt" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)

    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    jpg = _save(Image.fromarray(noise), "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(jpg[: len(jpg) // 2])
    png = _save(Image.fromarray(noise), "PNG")
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(png[: len(png) // 2])

    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError):
        load_image(12345)


def test_load_too_many_pixels_is_checked_before_decoding():
    t = time.perf_counter()
    # 60 MP: over our 50 MP default, under PIL's own limit
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_png_header_only(10_000, 6_000))
    # 10 gigapixels: PIL's bomb guard fires inside open -> still an ImageError
    with pytest.raises(ImageError, match="too large|over the limit"):
        load_image(_png_header_only(100_000, 100_000))
    assert time.perf_counter() - t < 1.0
    small = _save(Image.fromarray(np.zeros((20, 30, 3), np.uint8)), "PNG")
    with pytest.raises(ImageError, match="600") as ei:
        load_image(small, max_pixels=500)
    assert "max_pixels" in str(ei.value)
    assert load_image(small, max_pixels=600).shape == (20, 30, 3)
    assert MAX_PIXELS == 50_000_000


def test_load_raised_limit_is_not_blocked_by_pil(monkeypatch):
    # a header-only image over PIL's own default limit is rejected as corrupt
    # (no pixel data), not as a bomb, once the caller raises max_pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    pil_default = Image.MAX_IMAGE_PIXELS or 89_478_485
    w = 20_000
    h = pil_default // w + 10
    with pytest.raises(ImageError, match="corrupt|truncated"):
        load_image(_png_header_only(w, h), max_pixels=w * h)


# ---------------------------------------------------------------- outputs


def test_colorize():
    d = np.random.default_rng(0).random((7, 9)).astype(np.float32)
    for name in COLORMAPS:
        c = colorize(d, name)
        assert c.shape == (7, 9, 3) and c.dtype == np.uint8
        lut = colormap_lut(name)
        assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert {"turbo", "viridis", "inferno", "magma", "plasma", "spectral", "gray"} <= set(COLORMAPS)
    # high = warm for every map (spectral reversed)
    for name in ("turbo", "inferno", "magma", "plasma", "spectral"):
        lut = colormap_lut(name).astype(int)
        assert lut[255, 0] > lut[255, 2] and lut[0, 2] >= lut[0, 0] - 10, name
    g = colorize(np.array([[0.0, 1.0]]), "gray")
    assert tuple(g[0, 0]) == (0, 0, 0) and tuple(g[0, 1]) == (255, 255, 255)
    assert tuple(colorize(np.array([[0.0, 1.0]]), "gray", invert=True)[0, 0]) == (255, 255, 255)
    # constant map, NaN and inf, torch input, vmin/vmax
    assert colorize(np.full((3, 3), 2.5)).shape == (3, 3, 3)
    weird = np.array([[np.nan, np.inf], [-np.inf, 1.0]])
    c = colorize(weird, "gray")
    assert tuple(c[0, 0]) == (0, 0, 0)
    assert colorize(np.full((2, 2), np.nan)).shape == (2, 2, 3)
    assert colorize(torch.rand(1, 5, 6)).shape == (5, 6, 3)
    c = colorize(np.array([[0.0, 5.0, 10.0]]), "gray", vmin=0, vmax=5)
    assert c[0, 1, 0] == 255 and c[0, 2, 0] == 255
    with pytest.raises(ValueError):
        colorize(d, "jet")


def test_png16_round_trip(tmp_path):
    d = (np.random.default_rng(0).random((31, 47)) * 7.5 + 0.3).astype(np.float32)
    p = tmp_path / "depth.png"
    arr = depth_to_png16(d, p)
    assert arr.dtype == np.uint16 and arr.min() == 0 and arr.max() == 65535
    back, lo, hi = read_png16(p)
    assert np.array_equal(back, arr)
    assert lo == float(d.min()) and hi == float(d.max())
    rec = png16_to_depth(back, lo, hi)
    assert np.abs(rec - d).max() <= (hi - lo) / 65535
    with Image.open(p) as im:
        assert im.mode.startswith("I;16") and im.text["depth_min"]
    arr2, lo2, hi2 = depth_to_png16(torch.from_numpy(d), None, return_range=True)
    assert np.array_equal(arr2, arr) and (lo2, hi2) == (lo, hi)
    flat = depth_to_png16(np.full((4, 4), 3.0), tmp_path / "flat.png")
    assert np.all(flat == 0)
    b, lo, hi = read_png16(tmp_path / "flat.png")
    assert lo == hi == 3.0 and np.all(png16_to_depth(b, lo, hi) == 3.0)


def test_save_npy(tmp_path):
    d = torch.rand(5, 6, dtype=torch.float64)
    p = tmp_path / "depth.bin"  # exact path, no .npy appended
    save_npy(d, p)
    a = np.load(p)
    assert a.dtype == np.float32 and np.allclose(a, d.numpy())
