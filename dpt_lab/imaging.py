"""Image input/output and the official Depth-Anything / MiDaS preprocessing.

Everything here is pure image handling (no model code).  The preprocessing
reproduces the official pipelines:

* the image is RGB, ``uint8 / 255`` (after EXIF orientation),
* it is resized with OpenCV ``INTER_CUBIC`` semantics to the size given by the
  official ``Resize`` transform's sizing rule (:func:`official_size`),
* it is normalised with a per-channel mean/std,
* the model's depth is resized back to the image's own size with the family's
  rule (:func:`resize_depth`).

Resampling (:func:`resize_bicubic`) is a separable cubic convolution with
``a = -0.75``, half-pixel centres, edge pixels replicated and no
antialiasing, i.e. ``cv2.resize(..., interpolation=INTER_CUBIC)``.  Like
OpenCV, the source coordinate of each output pixel is rounded to float32
before the tap weights are computed, so the result follows ``cv2.resize`` on
float64 input to about 1e-6 (``torch.nn.functional.interpolate(mode="bicubic")``,
which keeps the coordinate in full precision, differs from OpenCV by up to
~2e-4 on noisy 12 MP photos).  OpenCV itself is never imported here.

Coordinate convention (:class:`PreprocessMeta`): pixel ``i`` covers
``[i - 0.5, i + 0.5]``; the model input and the image share their outer
edges, so ``x_in = (x + 0.5) * scale_x - 0.5`` and
``x = (x_in + 0.5) / scale_x - 0.5`` with ``scale_x = input_w / image_w``.
This is exactly the mapping the resize uses.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from . import cubic
from .choices import COLORMAPS
from .errors import DPTLabError, first_line

__all__ = [
    "ImageError",
    "MAX_PIXELS",
    "MAX_INPUT_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HALF_MEAN",
    "HALF_STD",
    "RULES",
    "DEPTH_RESIZE_MODES",
    "load_image",
    "official_size",
    "resize_bicubic",
    "to_tensor",
    "normalize",
    "PreprocessMeta",
    "prepare",
    "resize_depth",
    "COLORMAPS",
    "colormap_lut",
    "colorize",
    "depth_to_png16",
    "read_png16",
    "png16_to_depth",
    "save_npy",
]


class ImageError(DPTLabError, ValueError):
    """An input that is not an image DPT Lab can use, and why (one line)."""


#: Default limit on width * height of an input image (decompression bombs).
MAX_PIXELS = 50_000_000

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

#: Sizing rules of the official ``Resize`` transform; "stretch" is
#: ``keep_aspect_ratio=False`` (each side to its own target, rounded).
RULES = ("lower_bound", "upper_bound", "minimal", "stretch")
#: "bilinear_align": DA v2 (bilinear, align_corners=True); "bilinear": DA v1
#: (align_corners=False); "bicubic": MiDaS (align_corners=False).
DEPTH_RESIZE_MODES = ("bilinear_align", "bilinear", "bicubic")



# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------

def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{Path(source).name}'"
    name = getattr(source, "name", None) or getattr(source, "filename", None)
    if isinstance(name, str) and name:
        return f"'{Path(name).name}'"
    return "the image data"


def _pil_guard(max_pixels: int) -> None:
    """Raise PIL's own bomb guard (``Image.MAX_IMAGE_PIXELS``) to at least our limit.

    PIL warns above its limit and refuses above twice it; both are turned into
    ImageError by _open_pil, so PIL can only fire for images we reject anyway.
    The global is only ever raised, never lowered.
    """
    cur = Image.MAX_IMAGE_PIXELS
    if cur is not None and cur < max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def _fmt_pixels(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels" if n >= 1_000_000 else f"{n:,} pixels"


def _too_many(h: int, w: int, max_pixels: int, what: str) -> ImageError:
    return ImageError(
        f"{what} is {w}x{h} ({_fmt_pixels(w * h)}), over the limit of "
        f"{_fmt_pixels(max_pixels)}; downscale it first (or raise max_pixels)"
    )


def _check_size(h: int, w: int, max_pixels: int, what: str) -> None:
    if h <= 0 or w <= 0:
        raise ImageError(f"{what} has zero size ({w}x{h})")
    if h * w > max_pixels:
        raise _too_many(h, w, max_pixels, what)


def _open_pil(fp: Any, what: str, max_pixels: int) -> Image.Image:
    _pil_guard(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses from the header before we see the size; its message has the pixel count
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f" ({_fmt_pixels(int(found.group(1)))})" if found else ""
        raise ImageError(f"{what} is too large{size}: over the limit of {_fmt_pixels(max_pixels)}; "
                         f"downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image in a format DPT Lab can read "
                         "(PNG, JPEG, WebP, TIFF, BMP, GIF, ...)") from None
    except FileNotFoundError:
        raise ImageError(f"{what} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{what} is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"{what} cannot be read (permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError) as e:
        raise ImageError(f"{what} is corrupt or not a valid image ({first_line(e)})") from None
    return img


def _decode(img: Image.Image, what: str, max_pixels: int) -> Image.Image:
    w, h = img.size
    _check_size(h, w, max_pixels, what)  # header only: nothing decoded yet
    try:
        img.load()  # force the full decode: truncated/corrupt data fails here
    except MemoryError:
        raise ImageError(f"{what} is too large to decode with the memory available") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        msg = first_line(e)
        if "truncated" in msg.lower():
            raise ImageError(f"{what} is truncated or incomplete ({msg})") from None
        raise ImageError(f"{what} is corrupt and cannot be decoded ({msg})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not make the pixels unreadable
        pass
    w, h = img.size
    _check_size(h, w, max_pixels, what)
    return img


def _composite_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """rgb HxWx3 uint8, alpha HxW uint8 -> rgb over a white background."""
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    a = np.clip(a, 0, 65535).astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_u8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0)
    # [0, 1] data (the usual float convention); data beyond 1 is taken as 0..255.
    scale = 255.0 if (a.max(initial=0.0) <= 1.0) else 1.0
    return np.clip(np.floor(a * scale + 0.5), 0, 255).astype(np.uint8)


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=2)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode == "L":
        return _gray_to_rgb(np.asarray(img, dtype=np.uint8))
    if mode == "1":
        return _gray_to_rgb(np.asarray(img.convert("L"), dtype=np.uint8))
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img.convert("I") if mode != "I" else img).astype(np.int64)
        return _gray_to_rgb(_u16_to_u8(a))
    if mode == "F":
        return _gray_to_rgb(_float_to_u8(np.asarray(img, dtype=np.float32)))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
        return _composite_white(rgba[..., :3], rgba[..., 3])
    # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _array_to_rgb(a: np.ndarray, max_pixels: int) -> np.ndarray:
    what = "the image array"
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)):
        raise ImageError(f"{what} has shape {tuple(a.shape)}; expected HxW, HxWx3 or HxWx4 (channels last)")
    _check_size(a.shape[0], a.shape[1], max_pixels, what)
    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype == np.bool_:
        u8 = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        u8 = _u16_to_u8(a)
    elif np.issubdtype(a.dtype, np.floating):
        u8 = _float_to_u8(a)
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ImageError(f"{what} has integer values in [{lo}, {hi}]; expected 0..255 or 0..65535")
        u8 = a.astype(np.uint8) if hi <= 255 else _u16_to_u8(a)
    else:
        raise ImageError(f"{what} has dtype {a.dtype}; expected uint8, uint16 or float")
    if u8.ndim == 2:
        return _gray_to_rgb(u8)
    c = u8.shape[2]
    if c == 3:
        return np.ascontiguousarray(u8)
    if c == 4:
        return _composite_white(u8[..., :3], u8[..., 3])
    return _composite_white(_gray_to_rgb(u8[..., 0]), u8[..., 1])  # gray + alpha


def load_image(source: Any, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Load an image as an ``H x W x 3`` uint8 RGB array.

    ``source`` may be a path (str / Path), bytes, a binary file-like object,
    a ``PIL.Image`` or a numpy array (HxW, HxWx3, HxWx4 channels-last; uint8,
    uint16 (scaled to 8 bit) or float (taken as [0, 1]; data above 1 as
    0..255)).  EXIF orientation is applied.  Alpha is composited on white;
    palette, CMYK, 1-bit, 16-bit (``I;16``/``I``: 0..65535 scaled to 0..255)
    and float (``F``) images are converted to RGB.  The first frame of an
    animation is used.

    Raises :class:`ImageError` (one line) for a missing or empty file, data
    that is not an image, a corrupt or truncated file, an image with more
    than ``max_pixels`` pixels (checked from the header, before decoding)
    and a zero-size image.
    """
    max_pixels = int(max_pixels)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_pixels)
    if isinstance(source, torch.Tensor):
        return _array_to_rgb(source.detach().cpu().numpy(), max_pixels)
    what = _describe(source)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(_decode(source, what, max_pixels))
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise ImageError(f"{what} does not exist ({p})")
        if p.is_dir():
            raise ImageError(f"{what} is a folder, not an image file")
        if p.stat().st_size == 0:
            raise ImageError(f"{what} is an empty file (0 bytes)")
        img = _open_pil(p, what, max_pixels)
        try:
            return _pil_to_rgb(_decode(img, what, max_pixels))
        finally:
            img.close()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            raise ImageError(f"{what} was opened in text mode; open it in binary mode ('rb')")
        data = bytes(data or b"")
    else:
        raise ImageError(f"cannot load an image from a {type(source).__name__}; "
                         "give a path, bytes, a file, a PIL image or an array")
    if not data:
        raise ImageError(f"{what} is empty (0 bytes)")
    img = _open_pil(io.BytesIO(data), what, max_pixels)
    try:
        return _pil_to_rgb(_decode(img, what, max_pixels))
    finally:
        img.close()


# --------------------------------------------------------------------------
# official sizing
# --------------------------------------------------------------------------

def _constrain(x: float, m: int, min_val: int = 0, max_val: int | None = None) -> int:
    # exactly the official constrain_to_multiple_of (numpy round = half to even)
    y = int(np.round(x / m) * m)
    if max_val is not None and y > max_val:
        y = int(np.floor(x / m) * m)
    if y < min_val:
        y = int(np.ceil(x / m) * m)
    return y


def official_size(height: int, width: int, *, target: int | tuple[int, int], multiple: int, rule: str) -> tuple[int, int]:
    """Model input size ``(new_h, new_w)`` of the official ``Resize`` transform.

    ``target`` is the net size (an int, or ``(target_h, target_w)``), ``multiple``
    the ``ensure_multiple_of`` (14 for Depth-Anything, 32 for MiDaS).  ``rule``:
    ``"lower_bound"`` / ``"upper_bound"`` / ``"minimal"`` keep the aspect ratio
    (``resize_method`` of the official transform); ``"stretch"`` is
    ``keep_aspect_ratio=False`` with the "minimal" rounding (MiDaS SwinV2).
    """
    if rule not in RULES:
        raise ValueError(f"unknown sizing rule {rule!r}; expected one of {', '.join(RULES)}")
    height, width, multiple = int(height), int(width), int(multiple)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    th, tw = (target, target) if isinstance(target, (int, np.integer)) else target
    th, tw = int(th), int(tw)
    if th <= 0 or tw <= 0:
        raise ValueError(f"target must be positive, got {target}")
    scale_h = th / height
    scale_w = tw / width
    if rule == "lower_bound":
        if scale_w > scale_h:
            scale_h = scale_w
        else:
            scale_w = scale_h
        return (_constrain(scale_h * height, multiple, min_val=th),
                _constrain(scale_w * width, multiple, min_val=tw))
    if rule == "upper_bound":
        if scale_w < scale_h:
            scale_h = scale_w
        else:
            scale_w = scale_h
        return (_constrain(scale_h * height, multiple, max_val=th),
                _constrain(scale_w * width, multiple, max_val=tw))
    if rule == "minimal":
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h
    return (_constrain(scale_h * height, multiple), _constrain(scale_w * width, multiple))


# --------------------------------------------------------------------------
# cv2 INTER_CUBIC resampling in torch
# --------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _cubic_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (out*4,) int64 and weights (out, 4) float32 along one axis (cached: never modify)."""
    scale = 1.0 / (out_size / in_size)  # as OpenCV: 1 / inv_scale
    pos = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    base = np.floor(pos)
    t = (pos - base).astype(np.float32)
    weights = np.stack(cubic.weights(t, opencv=True), axis=1).astype(np.float32)
    idx = base.astype(np.int64)[:, None] + np.arange(-1, 3, dtype=np.int64)[None, :]
    np.clip(idx, 0, in_size - 1, out=idx)  # edge pixels replicated
    return torch.from_numpy(idx.reshape(-1)), torch.from_numpy(weights)


def _resample_front(x: torch.Tensor, out_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Cubic resample along dim 0 of x (any layout, any dtype) -> dtype, contiguous."""
    n_in = x.shape[0]
    idx, w = _cubic_taps(n_in, out_size)
    idx_t = idx.to(x.device)
    w_t = w.to(device=x.device, dtype=dtype)
    g = x.index_select(0, idx_t)  # (out*4, ...) gathered before any conversion
    rest = g.shape[1:]
    g = g.reshape(out_size, 4, -1).to(dtype)
    out = torch.bmm(w_t.unsqueeze(1), g)  # (out, 1, rest)
    return out.reshape((out_size,) + tuple(rest))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resize_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` (or ``(C, H, W)`` / ``(H, W)``) to ``size=(h, w)``.

    Semantics of ``cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)``:
    cubic convolution a=-0.75, half-pixel centres, replicated edges, no
    antialiasing, float32 source coordinates and tap weights.  float64 input
    is computed in float64, anything else in float32 and cast back (integer
    input comes back as float32).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError("resize_bicubic expects a torch.Tensor")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"output size must be positive, got {size}")
    if x.dim() < 2:
        raise ValueError(f"expected (B, C, H, W), (C, H, W) or (H, W), got shape {tuple(x.shape)}")
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    cdt = _compute_dtype(out_dtype)
    lead = x.shape[:-2]
    H, W = x.shape[-2:]
    if H == 0 or W == 0:
        raise ValueError("cannot resize an empty tensor")
    y = x.reshape((-1, H, W)).permute(1, 0, 2)  # (H, N, W), a view
    y = _resample_front(y, h, cdt) if h != H else y.to(cdt)  # (h, N, W)
    y = _resample_front(y.permute(2, 1, 0), w, cdt) if w != W else y.permute(2, 1, 0)  # (w, N, h)
    y = y.permute(1, 2, 0).contiguous()  # (N, h, w)
    return y.reshape(tuple(lead) + (h, w)).to(out_dtype)


def _resize_hwc_to_chw(img: torch.Tensor, size: tuple[int, int], cdt: torch.dtype) -> torch.Tensor:
    """HxWxC (uint8 or float) -> C x h x w in cdt, cv2 INTER_CUBIC, no full-size float copy."""
    h, w = size
    H, W = img.shape[:2]
    y = _resample_front(img, h, cdt) if h != H else img.to(cdt)  # (h, W, C)
    y = _resample_front(y.permute(1, 0, 2), w, cdt) if w != W else y.permute(1, 0, 2)  # (w, h, C)
    return y.permute(2, 1, 0).contiguous()  # (C, h, w)


def to_tensor(image_uint8: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``1 x 3 x H x W`` in [0, 1] (``x / 255``)."""
    a = np.asarray(image_uint8)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 array, got shape {a.shape} dtype {a.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).unsqueeze(0)
    return t.to(dtype).div_(255.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x - mean) / std`` per channel; x is ``(B, C, H, W)`` or ``(C, H, W)``."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    return (x - mean_t) / std_t


def meta_sizes(meta_or_sizes) -> tuple[Optional[tuple[int, int]], Optional[tuple[int, int]]]:
    """(image_size, input_size) as int pairs from a PreprocessMeta, a dict with those keys,
    a pair (image_size, input_size), or None (then (None, None))."""
    if meta_or_sizes is None:
        return None, None
    if hasattr(meta_or_sizes, "image_size") and hasattr(meta_or_sizes, "input_size"):
        image, inp = meta_or_sizes.image_size, meta_or_sizes.input_size
    elif isinstance(meta_or_sizes, dict):
        image, inp = meta_or_sizes["image_size"], meta_or_sizes["input_size"]
    else:
        image, inp = meta_or_sizes
    return (int(image[0]), int(image[1])), (int(inp[0]), int(inp[1]))


@dataclass
class PreprocessMeta:
    """How an image was mapped onto the model input.

    ``image_size`` / ``input_size`` are ``(h, w)``; ``scale_y`` / ``scale_x`` are
    ``input / image``.  Pixel coordinates use half-pixel centres: pixel ``i``
    covers ``[i - 0.5, i + 0.5]`` and the two grids share their outer edges,
    so ``x_in = (x + 0.5) * scale_x - 0.5`` (the mapping of the resize itself).
    The image corner ``(-0.5, -0.5)`` maps to the input corner ``(-0.5, -0.5)``
    and ``(H - 0.5, W - 0.5)`` to ``(h - 0.5, w - 0.5)``.
    Works on floats, numpy arrays and tensors.
    """

    image_size: tuple[int, int]
    input_size: tuple[int, int]
    rule: str
    keep_aspect: bool
    scale_y: float
    scale_x: float

    def image_to_input(self, y, x):
        return (y + 0.5) * self.scale_y - 0.5, (x + 0.5) * self.scale_x - 0.5

    def input_to_image(self, yi, xi):
        return (yi + 0.5) / self.scale_y - 0.5, (xi + 0.5) / self.scale_x - 0.5


#: Default limit on the model input size in prepare(): only an extreme aspect
#: ratio gets there (1:30 at 518), and a ViT could not run on it anyway.
MAX_INPUT_PIXELS = 8_000_000


def prepare(image_uint8: np.ndarray, *, target, multiple: int, rule: str, mean, std,
            dtype: torch.dtype = torch.float32, device=None,
            max_input_pixels: int | None = MAX_INPUT_PIXELS) -> tuple[torch.Tensor, PreprocessMeta]:
    """The official preprocess: ``/255``, cv2-cubic resize to :func:`official_size`, normalise.

    ``image_uint8`` is ``H x W x 3`` uint8 RGB (as from :func:`load_image`; an
    ``H x W x 3`` float array in [0, 1] is accepted too).  Returns a
    ``1 x 3 x h x w`` tensor of ``dtype`` on ``device`` and the
    :class:`PreprocessMeta`.  The resize runs on ``device`` straight from the
    uint8 pixels (the gathered taps are converted, never the full image), in
    float32 (float64 when ``dtype`` is float64); since the resize is linear,
    resizing 0..255 and folding ``/255`` into the normalisation equals the
    official order up to float rounding.

    Raises :class:`ImageError` when the model input would exceed
    ``max_input_pixels`` (an extreme aspect ratio under "lower_bound"/"minimal";
    ``None`` disables the check).
    """
    a = image_uint8
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        a = np.asarray(a)
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.dim() != 3 or t.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        pixel_scale = 255.0
    elif t.is_floating_point():
        pixel_scale = 1.0
    else:
        raise ValueError(f"expected uint8 (or [0, 1] float) pixels, got {t.dtype}")
    H, W = int(t.shape[0]), int(t.shape[1])
    if H == 0 or W == 0:
        raise ImageError(f"the image has zero size ({W}x{H})")
    h, w = official_size(H, W, target=target, multiple=multiple, rule=rule)
    if max_input_pixels is not None and h * w > max_input_pixels:
        raise ImageError(
            f"the image is {W}x{H}; this model would need a {w}x{h} input ({_fmt_pixels(h * w)}, over the "
            f"limit of {_fmt_pixels(int(max_input_pixels))}): crop it to a less extreme aspect ratio"
        )
    if device is not None:
        t = t.to(device)
    cdt = _compute_dtype(dtype)
    x = _resize_hwc_to_chw(t, (h, w), cdt)  # (3, h, w), 0..255 or 0..1
    mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
    gain = (1.0 / (pixel_scale * std_t)).to(device=x.device, dtype=cdt).reshape(-1, 1, 1)
    bias = (-mean_t / std_t).to(device=x.device, dtype=cdt).reshape(-1, 1, 1)
    x = torch.addcmul(bias, x, gain).unsqueeze(0).to(dtype)
    meta = PreprocessMeta(
        image_size=(H, W), input_size=(h, w), rule=rule, keep_aspect=rule != "stretch",
        scale_y=h / H, scale_x=w / W,
    )
    return x, meta


def resize_depth(depth: torch.Tensor, size: tuple[int, int], *, mode: str) -> torch.Tensor:
    """Resize a depth map ``(B, h, w)`` or ``(h, w)`` to ``size=(H, W)`` like the official code.

    ``mode``: ``"bilinear_align"`` (Depth-Anything v2: bilinear, align_corners=True),
    ``"bilinear"`` (Depth-Anything v1: align_corners=False) or ``"bicubic"``
    (MiDaS: torch bicubic, align_corners=False).
    """
    if mode not in DEPTH_RESIZE_MODES:
        raise ValueError(f"unknown depth resize mode {mode!r}; expected one of {', '.join(DEPTH_RESIZE_MODES)}")
    if depth.dim() not in (2, 3):
        raise ValueError(f"expected a (B, h, w) or (h, w) depth map, got shape {tuple(depth.shape)}")
    squeeze = depth.dim() == 2
    d = depth[None, None] if squeeze else depth[:, None]
    size = (int(size[0]), int(size[1]))
    if mode == "bilinear_align":
        out = F.interpolate(d, size=size, mode="bilinear", align_corners=True)
    elif mode == "bilinear":
        out = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
    else:
        out = F.interpolate(d, size=size, mode="bicubic", align_corners=False)
    return out[0, 0] if squeeze else out[:, 0]


# --------------------------------------------------------------------------
# output helpers
# --------------------------------------------------------------------------

# Colormaps (choices.COLORMAPS): every LUT runs from the low value (cold / dark) at
# index 0 to the high value (warm / bright) at index 255; plotly's Spectral (red first)
# is reversed for that. Relative models output disparity (large = near), so near is
# warm; for metric depth (large = far) pass ``invert=True`` to colorize.


def _parse_color(c) -> tuple[float, float, float]:
    if isinstance(c, str):
        s = c.strip()
        if s.startswith("#"):
            s = s[1:]
            if len(s) == 3:
                s = "".join(ch * 2 for ch in s)
            return tuple(float(int(s[i:i + 2], 16)) for i in (0, 2, 4))  # type: ignore[return-value]
        if s.startswith("rgb"):
            vals = s[s.index("(") + 1:s.rindex(")")].split(",")
            return tuple(float(v) for v in vals[:3])  # type: ignore[return-value]
        raise ValueError(f"cannot parse colour {c!r}")
    return tuple(float(v) for v in c[:3])  # type: ignore[return-value]


@lru_cache(maxsize=None)
def colormap_lut(name: str) -> np.ndarray:
    """256 x 3 uint8 LUT of a colormap in :data:`COLORMAPS` (read-only)."""
    key = name.lower()
    if key not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}; expected one of {', '.join(COLORMAPS)}")
    if key == "gray":
        ramp = np.arange(256, dtype=np.uint8)
        lut = np.stack([ramp, ramp, ramp], axis=1)
    else:
        import plotly.colors as pc

        scale = {
            "turbo": pc.sequential.Turbo,
            "viridis": pc.sequential.Viridis,
            "inferno": pc.sequential.Inferno,
            "magma": pc.sequential.Magma,
            "plasma": pc.sequential.Plasma,
            "spectral": pc.diverging.Spectral[::-1],
        }[key]
        stops = np.array([_parse_color(c) for c in scale], dtype=np.float64)
        xs = np.linspace(0.0, 1.0, len(stops))
        q = np.linspace(0.0, 1.0, 256)
        lut = np.stack([np.interp(q, xs, stops[:, k]) for k in range(3)], axis=1)
        lut = np.clip(np.round(lut), 0, 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def _as_numpy(depth) -> np.ndarray:
    if isinstance(depth, torch.Tensor):
        depth = depth.detach().cpu().float().numpy()
    a = np.asarray(depth)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"expected an HxW depth map, got shape {a.shape}")
    return a


def _finite_range(a: np.ndarray) -> tuple[float, float]:
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())


def colorize(depth, cmap: str = "turbo", vmin: float | None = None, vmax: float | None = None,
             *, invert: bool = False) -> np.ndarray:
    """Depth map -> ``H x W x 3`` uint8 colour image.

    ``vmin``..``vmax`` (default: the finite min..max) map to LUT index 0..255
    (low = cold/dark end).  ``invert=True`` flips that (use it for metric depth
    so near stays warm).  A constant map gives index 0 everywhere; NaN pixels
    are black; +/-inf clip to the ends.
    """
    a = _as_numpy(depth).astype(np.float64, copy=False)
    lut = colormap_lut(cmap)
    lo, hi = _finite_range(a)
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    span = hi - lo
    with np.errstate(invalid="ignore", over="ignore"):
        if not (math.isfinite(span) and span > 0):
            t = np.zeros_like(a)
        else:
            t = np.clip((a - lo) / span, 0.0, 1.0)
    nan = np.isnan(a)
    t = np.where(nan, 0.0, t)
    if invert:
        t = 1.0 - t
    out = lut[np.rint(t * 255.0).astype(np.intp)]
    if nan.any():
        out[nan] = 0
    return out


def depth_to_png16(depth, path_or_None=None, *, return_range: bool = False):
    """Depth map -> uint16 (finite min..max -> 0..65535; NaN -> 0).

    With a path, writes a 16-bit grayscale PNG whose text chunks ``depth_min`` /
    ``depth_max`` record the range, so ``depth = min + v / 65535 * (max - min)``
    (see :func:`read_png16`, :func:`png16_to_depth`).  Returns the uint16 array,
    or ``(array, min, max)`` with ``return_range=True``.
    """
    a = _as_numpy(depth).astype(np.float64, copy=False)
    lo, hi = _finite_range(a)
    span = hi - lo
    with np.errstate(invalid="ignore", over="ignore"):
        if span > 0 and math.isfinite(span):
            v = np.clip((a - lo) / span, 0.0, 1.0) * 65535.0
        else:
            v = np.zeros_like(a)
    v = np.where(np.isnan(a), 0.0, v)
    out = np.rint(v).astype(np.uint16)
    if path_or_None is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("depth_min", repr(lo))
        info.add_text("depth_max", repr(hi))
        img = Image.fromarray(out)  # mode I;16
        img.save(path_or_None, format="PNG", pnginfo=info)
    return (out, lo, hi) if return_range else out


def read_png16(path) -> tuple[np.ndarray, float, float]:
    """Read a PNG from :func:`depth_to_png16`: ``(uint16 array, depth_min, depth_max)``.

    A 16-bit PNG without the text chunks gives ``(array, 0.0, 65535.0)`` (so the
    recovered "depth" is the raw value).
    """
    try:
        with Image.open(path) as img:
            img.load()
            text = dict(getattr(img, "text", {}) or {})
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{_describe(path)} is not a readable PNG ({first_line(e)})") from None
    if mode.startswith("I;16") or mode == "I":
        arr = np.clip(arr.astype(np.int64), 0, 65535).astype(np.uint16)
    elif mode == "L":
        arr = arr.astype(np.uint16) * 257
    else:
        raise ImageError(f"{_describe(path)} is a {mode} image, not a 16-bit grayscale depth PNG")
    try:
        lo = float(text.get("depth_min", 0.0))
        hi = float(text.get("depth_max", 65535.0))
    except ValueError:
        raise ImageError(f"{_describe(path)} has unreadable depth_min/depth_max text chunks") from None
    return arr, lo, hi


def png16_to_depth(arr: np.ndarray, depth_min: float, depth_max: float) -> np.ndarray:
    """Invert :func:`depth_to_png16`: uint16 -> float32 depth."""
    return (depth_min + arr.astype(np.float64) / 65535.0 * (depth_max - depth_min)).astype(np.float32)


def save_npy(depth, path) -> None:
    """Save a depth map (array or tensor) as ``.npy`` (float32) at exactly ``path``."""
    if isinstance(depth, torch.Tensor):
        depth = depth.detach().cpu().numpy()
    a = np.asarray(depth)
    if a.dtype != np.float32 and np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    with open(path, "wb") as f:
        np.save(f, a)


# -- patches on the image ------------------------------------------------------------------
LENS_QUERY = (0, 255, 255)      # the clicked patch
LENS_SIMILAR = (255, 45, 85)    # the patches found for it


def patch_box(image_size: tuple[int, int], grid: tuple[int, int], row: int, col: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive pixel box of patch (row, col) on an image of image_size
    (h, w): the pixels whose centres patch_at_pixel maps to that patch."""
    h, w = image_size
    gh, gw = grid

    def first(k, n, g):       # first pixel p with floor((2p + 1) * g / (2n)) >= k
        return max(0, -(-(2 * k * n - g) // (2 * g)))

    x0, x1 = first(col, w, gw), first(col + 1, w, gw) - 1
    y0, y1 = first(row, h, gh), first(row + 1, h, gh) - 1
    return x0, y0, max(x0, min(x1, w - 1)), max(y0, min(y1, h - 1))


def lens_image(grid_values, image, *, cmap: str = "inferno", alpha: float = 0.5, vmin=None, vmax=None,
               query: Optional[tuple[int, int]] = None, similar: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """(gh, gw) values (coloured with cmap over vmin..vmax) or (gh, gw, 3) colours in
    [0, 1] over an H x W x 3 uint8 image, one colour per patch (each pixel takes its
    patch's, as patch_at_pixel maps it), blended with the image by alpha (0 = the map
    alone). The query patch is outlined in cyan, the `similar` ones in red."""
    arr = np.asarray(image, dtype=np.uint8)
    h, w = arr.shape[:2]
    values = np.asarray(grid_values, dtype=np.float32)
    if values.ndim == 2:
        colours = colorize(values, cmap, vmin=vmin, vmax=vmax)
    elif values.ndim == 3 and values.shape[2] == 3:
        colours = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"expected (gh, gw) values or (gh, gw, 3) colours, got shape {values.shape}")
    gh, gw = colours.shape[:2]
    # each patch's run of pixels (pixel p belongs to patch floor((2p + 1) * g / (2n))): two repeats,
    # memory copies, rather than a gather per pixel; PIL's blend does the rest in C
    rows = np.bincount(np.minimum(((2 * np.arange(h) + 1) * gh) // (2 * h), gh - 1), minlength=gh)
    cols = np.bincount(np.minimum(((2 * np.arange(w) + 1) * gw) // (2 * w), gw - 1), minlength=gw)
    painted = Image.fromarray(np.ascontiguousarray(np.repeat(np.repeat(colours, rows, axis=0), cols, axis=1)))
    a = float(min(max(alpha, 0.0), 1.0))
    out = painted if a == 0 else Image.blend(painted, Image.fromarray(arr), a)
    _outline(out, (gh, gw), [(p, LENS_SIMILAR) for p in similar] + ([(query, LENS_QUERY)] if query is not None else []))
    return np.asarray(out)


def outline_patches(image, grid: tuple[int, int], patches, colour=LENS_SIMILAR) -> np.ndarray:
    """A copy of an H x W x 3 uint8 image with the patches ((row, col) of `grid`) outlined."""
    out = Image.fromarray(np.array(image, dtype=np.uint8))
    _outline(out, grid, [(p, colour) for p in patches])
    return np.asarray(out)


def _outline(picture, grid, boxes) -> None:
    """Outline ((row, col), colour) patch boxes on a PIL image, in place (a black rim under each)."""
    from PIL import ImageDraw

    w, h = picture.size
    draw = ImageDraw.Draw(picture)
    lw = max(1, round(min(h, w) / 250))
    for (r, c), colour in boxes:
        x0, y0, x1, y1 = patch_box((h, w), grid, int(r), int(c))
        draw.rectangle([x0 - lw, y0 - lw, x1 + lw, y1 + lw], outline=(0, 0, 0), width=lw)
        draw.rectangle([x0, y0, x1, y1], outline=tuple(colour), width=max(1, min(lw, x1 - x0 + 1)))
