"""The functions behind each tab, over each session's one recorded encode (store.py)
and the models shared by every session (models.py). No Gradio here: the tabs in ui/
wire these plain functions to components, and tests call them directly.

    manager = ModelManager(model=None, weights_dir=None, device=None)   # picks the startup model
    store = FeatureStore(max_bytes=2 << 30)
    lab = Lab(manager, store)
    state, view = lab.depth_view(session, image, model_name, base_size, keep_aspect, cmap)
    lab.attention_at(session, state, x, y, layer, mode, ...)   # x, y: pixels of the original image
    lab.norms_view(session, state, threshold, block, shared_scale)
    lab.fusion_view(session, state, (1, 0.5, 0, 1), cmap)
    lab.export_model(model_name, folder, dynamic=True, fp16=False, ...)

Models (ModelManager, models.py) are shared by all sessions; see that module for the
startup order and the random model. The tabs' functions live here (Lab).

Features (FeatureStore). Per session, the encode of the current image: keyed by (model,
image hash, base size, keep_aspect), an entry holds the preprocessed input and its meta,
the AttentionProbe of ONE recorded encode (attention q/k and per-block token norms, plus
the decoder's four feature maps), and the unscaled depth. Every tab reads that entry, so
switching tab, layer, threshold or fusion factor never re-encodes; a new image, model,
base size or aspect mode does. The store is an LRU bounded in bytes over all sessions;
a session's entries are dropped when it ends (Blocks.unload). `store.encodes` counts the
encoder passes (tests check it).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TypedDict

import numpy as np

from . import gpu

# the choices offered by the tabs (torch-free: the page is built before torch loads)
from .choices import COLORMAPS, FUSION_IDENTITY, FUSION_LABELS, FUSION_MAX, FUSION_MIN, FUSION_PRESETS  # noqa: F401
from .errors import DPTLabError, SessionError, finite_number  # noqa: F401 - raised by the tabs' functions
from .models import RANDOM_MODEL, ModelManager, ProgressFn, build_random_model, untrained_banner, weight_bytes  # noqa: F401 - as before
from .store import DECODE_FACTOR, DEFAULT_CACHE_BYTES, Entry, FeatureStore  # noqa: F401 - the store's names, as before

DEFAULT_SESSION = "default"
DISPLAY_MAX = 1024            # longest side of the clickable / overlay images (pixels)
TABLE_LIMIT = 500             # outlier rows sent to the browser (the CSV has all norms)
WEBCAM_MAX = 640              # longest side a webcam frame is worked on and shown at


FUSION_RANGE = (FUSION_MIN, FUSION_MAX)


# -- what the tabs show --------------------------------------------------------------------
@dataclass
class DepthResult:
    image: np.ndarray               # H x W x 3 the input as the model saw it (RGB, EXIF applied)
    view: Any                       # depth.DepthView (colored, colorbar, label)
    depth: np.ndarray               # H x W float32
    text: str
    files: dict = field(default_factory=dict)


@dataclass
class AttentionResult:
    tiles: np.ndarray
    marked: np.ndarray              # display-size image with the chosen patch outlined
    values: np.ndarray              # (heads, N)
    token: int
    patch: Optional[tuple[int, int]]
    layer: int                      # 1-based
    text: str


@dataclass
class NormsResult:
    heatmap: Any
    stats: Any
    histogram: Any
    table: list
    headers: tuple
    overlay: np.ndarray
    summary: str
    result: Any                     # norms.BlockNorms
    outliers: Any                   # norms.Outliers
    block: int


@dataclass
class FeaturesResult:
    image: np.ndarray               # display size: the lens over the image (query and top-k outlined)
    values: np.ndarray              # (gh, gw, 3) PCA colours in [0, 1] or (gh, gw) similarities
    token: Optional[int]            # similarity: the clicked token
    patch: Optional[tuple[int, int]]
    block: int                      # 1-based
    text: str


@dataclass
class RolloutResult:
    image: np.ndarray               # display size: the rollout over the image (query patch outlined)
    values: np.ndarray              # (N,) summing to 1
    token: int
    patch: Optional[tuple[int, int]]
    layer: int                      # 1-based
    text: str


@dataclass
class AblationView:
    ablated: Any                    # depth.DepthView of the ablated depth (the image's size)
    original: Any                   # depth.DepthView of the session's depth
    difference: np.ndarray          # ablated - original, coloured (spectral, 0 = the middle)
    marked: np.ndarray              # display size: the chosen patches outlined
    figure: Any                     # Plotly: attention share on the patches, before / after
    patches: list                   # (row, col) on the block's grid
    block: int                      # 1-based
    depth: np.ndarray               # H x W float32, ablated
    share: np.ndarray               # (layers, 2)
    text: str


@dataclass
class FusionResult:
    scaled: Any                     # depth.DepthView
    unscaled: Any
    difference: np.ndarray
    depth: np.ndarray               # H x W float32, scaled
    scales: tuple
    text: str


@dataclass
class MaskResult:
    preview: np.ndarray             # display size: the image where kept, a checkerboard elsewhere
    mask: np.ndarray                # display size, uint8 (255 = kept)
    flat_view: np.ndarray           # display size, the plane-removed depth coloured (equalised with contrast)
    masked: Any                     # mask.Masked at the image's size (keep, flat, plane)
    text: str


@dataclass
class SceneResult:
    glb: Path                       # the mesh (or point cloud) as GLB: what the page shows
    ply: Path                       # the vertices as a binary PLY point cloud
    mesh: Any                       # scene.Mesh
    text: str


class SessionState(TypedDict):
    """What one browser session keeps between events (gr.State; a plain dict, so it copies
    and serialises as Gradio expects). Small, except the image itself."""

    image: Optional[np.ndarray]        # H x W x 3 uint8, as the model saw it (EXIF applied)
    hash: Optional[str]                # of the image's pixels: part of the encode's key
    name: str                          # file stem for downloads
    model: Optional[str]               # model, base size and aspect mode of the current encode
    base_size: Optional[int]
    keep_aspect: Optional[bool]
    click: Any                         # the last attention click: (x, y) in image pixels, "cls" or None
    feature_click: Any                 # the last similarity click (Features tab), the same way
    rollout_click: Any                 # the last rollout click (Rollout tab)
    ablation_click: Any                # the last patch clicked on the Ablation tab
    display: Optional[np.ndarray]      # the image as served for clicking (longest side <= DISPLAY_MAX)
    picked: Optional[str]              # the model the picker last loaded (the app goes back to it)
    rendered: dict                     # tab -> the encode key it last showed (no re-render of the same)
    controls: dict                     # tab -> the controls of its last page render (ui/quick.py)


def new_state() -> SessionState:
    """A session's state before its first image."""
    return SessionState(image=None, hash=None, name="image", model=None, base_size=None, keep_aspect=None,
                        click=None, feature_click=None, rollout_click=None, ablation_click=None, display=None,
                        picked=None, rendered={}, controls={})


def _number(value, what: str, *, integer: bool = False, lo=None, hi=None):
    v = finite_number(value, what, SessionError)
    if integer:
        if v != int(v):
            raise SessionError(f"{what} must be a whole number, got {value!r}")
        v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise SessionError(f"{what} must be between {lo} and {hi}, got {value!r}")
    return v


def _cmap(name) -> str:
    key = str(name or "").strip().lower()
    if key not in COLORMAPS:
        raise SessionError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    return key


def _keep_aspect(value) -> Optional[bool]:
    """None / 'default' -> model default; True / 'keep' -> keep aspect; False / 'stretch'."""
    if value is None or isinstance(value, bool):
        return value
    key = str(value).strip().lower()
    if key in ("", "default", "model default", "auto"):
        return None
    if key in ("keep", "keep aspect", "keep_aspect", "true", "yes"):
        return True
    if key in ("stretch", "false", "no"):
        return False
    raise SessionError(f"aspect mode must be 'default', 'keep' or 'stretch', got {value!r}")


def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(name)).stem)[:40].strip("._")
    return stem or "image"


def image_source(image) -> tuple[Any, str]:
    """(what imaging.load_image takes, a file stem) from what Gradio hands over: a path, a
    FileData-like dict, a numpy array or a PIL image. None -> SessionError."""
    if image is None:
        raise SessionError("no image yet: upload an image (or pick an example) first")
    if isinstance(image, dict):
        path = image.get("path")
        name = image.get("orig_name") or path or "image"
        if not path:
            raise SessionError("the upload holds no file: upload the image again")
        return path, _safe_stem(name)
    if isinstance(image, (str, os.PathLike)):
        return image, _safe_stem(image)
    return image, "image"


def _display(rgb: np.ndarray, longest: int = DISPLAY_MAX) -> np.ndarray:
    """The image with its longest side at most `longest` (bilinear), or itself."""
    h, w = rgb.shape[:2]
    s = longest / max(h, w)
    if s >= 1:
        return rgb
    from PIL import Image

    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


# -- the calls that run a model (each one @spaces.GPU on ZeroGPU: gpu.py) -------------------------
# On ZeroGPU they take and return CPU data, so the recorded encode stays in this process, on
# the CPU, between calls (the GPU is detached then). On a machine of its own (CPU, CUDA, MPS)
# everything stays on the model's device: rows, norms and lenses are computed where q / k and
# the tokens already are, and the decoder's fusion cache stays beside the decoder.
@gpu.on_gpu("encode")
def _recorded_encode(model, x):
    """(features.FeatureProbe of ONE recorded encode of x, its depth 1 x h x w)."""
    import torch

    from . import features

    with torch.inference_mode():
        probe = features.capture(model, x.to(model.device))      # attention q / k, norms and tokens: every lens
        depth = model.decode(probe.features)
        if gpu.keep_on_cpu():
            probe = features.FeatureProbe(probe.features.to("cpu"), info=model.info)
            depth = depth.cpu()
    return probe, depth


@gpu.on_gpu("decode")
def _scaled_decode(model, feats, scales):
    """The decoder on recorded features with the four fusion factors (1 x h x w)."""
    import torch

    from . import fusion

    with torch.inference_mode():
        if gpu.keep_on_cpu():
            return fusion.scaled_depth(model, feats.to(model.device), scales).cpu()
        return fusion.scaled_depth(model, feats, scales)


@gpu.on_gpu("ablation")
def _ablated(model, entry: Entry, block: int, chosen, mode: str) -> dict:
    """The Ablation tab's run on the session's encode, compacted (see _compact)."""
    from . import ablation, features

    probe, depth, x = entry.probe, entry.depth, entry.x
    if gpu.keep_on_cpu():
        probe = features.FeatureProbe(probe.features.to(model.device), info=model.info)
        depth, x = depth.to(model.device), x.to(model.device)
    return _compact(ablation.ablate(model, x, block - 1, chosen, mode, baseline=probe, baseline_depth=depth),
                    model, entry.meta)


@gpu.on_gpu("export")
def _export(model, path, **options):
    from . import export

    return export.export_onnx(model, path, **options)


def _compact(result, model, meta) -> dict:
    """What the Ablation tab keeps of an ablation.AblationResult: its depth at the image's size,
    the shares and their figure, the two mean differences; not the re-run's records."""
    from . import ablation

    return {"depth": model.postprocess(result.depth, meta), "share": result.attention_share,
            "figure": ablation.share_figure(result), "near": result.delta_near, "elsewhere": result.delta_elsewhere,
            "rerun_s": result.rerun_s}


def _pixels(entry: Entry) -> int:
    """Input pixels of the entry's encode (what its working sets scale with)."""
    return int(entry.x.shape[-2]) * int(entry.x.shape[-1])


# An export's peak beside the encode-like check: the traced graph, the ONNX model's copies of
# the weights (serialised, then loaded by onnxruntime) (bench/memory_ops.py)
EXPORT_WEIGHT_COPIES = 4


def _difference_image(diff: np.ndarray) -> tuple[np.ndarray, float]:
    """(a depth difference coloured around 0: spectral over -max|d|..max|d|, mid grey when it is
    zero everywhere; max|d|)."""
    from . import imaging

    m = float(np.nanmax(np.abs(diff))) if diff.size else 0.0
    image = imaging.colorize(diff, "spectral", vmin=-m, vmax=m) if m > 0 else \
        np.full(diff.shape + (3,), 128, dtype=np.uint8)
    return image, m


def _base_size(value) -> Optional[int]:
    """A base size from a control (None, '', 0: the model's own)."""
    if value in (None, "", 0, "0"):
        return None
    return _number(value, "base size", integer=True, lo=28, hi=2048)


def _latest(entry: Entry, kind: str, params, make):
    """`make()` for these params, kept in the entry as the one latest of its kind."""
    hit = entry.cache.get(kind)
    if hit is not None and hit[0] == params:
        return hit[1]
    value = make()
    entry.cache[kind] = (params, value)
    return value


_cached_only = threading.local()


@contextlib.contextmanager
def cached_only():
    """In this thread, work only on encodes the store still keeps: a background job (a hidden
    tab's prepare) whose encode was evicted must not encode it again (a ViT-L page's old
    picture, encoded again that way, pushed out the picture on screen)."""
    _cached_only.active = True
    try:
        yield
    finally:
        _cached_only.active = False


class Lab:
    """The plain functions behind the tabs, over one ModelManager and one FeatureStore."""

    def __init__(self, manager: ModelManager, store: Optional[FeatureStore] = None):
        import threading

        self.manager = manager
        self.store = store or FeatureStore()
        self._video_lock = threading.Lock()
        self._video_cancel: dict[str, Any] = {}      # session -> the Event that cancels its running video job
        self._webcam: dict[str, list] = {}           # session -> times of its last webcam frames

    def forget(self, session: str) -> None:
        """The session's page closed: its encodes, its webcam timing and any video job go."""
        self.store.drop(session)
        self._webcam.pop(session, None)
        self.cancel_video(session)

    # -- the shared encode ---------------------------------------------------------------
    def _encode(self, model_name: str, rgb: np.ndarray, base_size: Optional[int], keep_aspect: Optional[bool],
                key: tuple, progress: Optional[ProgressFn] = None) -> Entry:
        import torch

        model = self.manager.get(model_name, progress)
        t0 = time.perf_counter()
        x, meta = model.preprocess(rgb, base_size, keep_aspect, device="cpu" if gpu.keep_on_cpu() else None)
        with self.store.reserving(model_name, x.shape[-2] * x.shape[-1]), torch.inference_mode():
            probe, depth = _recorded_encode(model, x)
        depth_image = model.postprocess(depth, meta)
        return Entry(key, model_name, model.info, meta, x, probe, depth, depth_image,
                     encode_s=time.perf_counter() - t0)

    def entry_key(self, state: dict) -> tuple:
        """(model, image hash, base size, keep_aspect): what an encode depends on."""
        return (state["model"], state["hash"], state["base_size"], state["keep_aspect"])

    def entry(self, session: str, state: Optional[dict], progress: Optional[ProgressFn] = None) -> Entry:
        """The session's encode of its current image (re-encoded only when missing, except
        inside `cached_only()`)."""
        if not state or state.get("image") is None:
            raise SessionError("no image yet: run the Depth tab on an image first")
        key = self.entry_key(state)
        if getattr(_cached_only, "active", False):
            hit = self.store.get(session or DEFAULT_SESSION, key)
            if hit is None:
                raise SessionError("that encode is no longer kept (background work does not encode)")
            return hit
        return self.store.get_or_compute(
            session or DEFAULT_SESSION, key,
            lambda: self._encode(state["model"], state["image"], state["base_size"], state["keep_aspect"], key,
                                 progress))

    def _unscaled_view(self, entry: Entry, cmap: str):
        """The session's depth coloured (depth.DepthView), rendered once per colormap and kept."""
        from . import depth as depth_mod

        with self.store.using(entry):
            return entry.cached(("unscaled view", cmap),
                                lambda: depth_mod.render(entry.depth_image, metric=bool(entry.info.metric), cmap=cmap))

    # -- Depth tab -----------------------------------------------------------------------
    def depth_view(self, session: str, state: Optional[dict], image, model_name, base_size=None,
                   keep_aspect=None, cmap="turbo", progress: Optional[ProgressFn] = None
                   ) -> tuple[dict, DepthResult]:
        """Load the image, encode it once (recorded: attention, norms, decoder features),
        and render its depth. Returns the new session state and what the tab shows."""
        from . import depth as depth_mod
        from . import imaging

        source, stem = image_source(image)
        cmap = _cmap(cmap)
        name = self.manager.validate(model_name)
        keep = _keep_aspect(keep_aspect)
        size = _base_size(base_size)
        rgb = imaging.load_image(source)
        model = self.manager.get(name, progress)
        info = model.info
        size = int(size or info.base_size)
        keep = info.keep_aspect_default if keep is None else keep
        digest = hashlib.blake2b(rgb.tobytes(), digest_size=16)
        digest.update(repr(rgb.shape).encode())
        new = dict(new_state() if state is None else state)
        same_image = new.get("hash") == digest.hexdigest()
        new.update(image=rgb, hash=digest.hexdigest(), name=stem, model=name, base_size=size, keep_aspect=keep)
        if not same_image:
            new.update(click=None, feature_click=None, rollout_click=None, ablation_click=None)
        new["display"] = None
        self.store.revive(session or DEFAULT_SESSION)     # a user's own encode: keep it, even after a reconnect
        entry = self.entry(session, new, progress)
        view = depth_mod.render(entry.depth_image, metric=bool(info.metric), cmap=cmap)
        h, w = rgb.shape[:2]
        ih, iw = entry.meta.input_size
        text = (f"{w}x{h} image → {iw}x{ih} model input ({'keep aspect' if keep else 'stretch'}, base size {size}) · "
                f"{view.label}")
        return new, DepthResult(rgb, view, entry.depth_image, text)

    def depth_files(self, state: dict, result: DepthResult, folder) -> dict:
        """16-bit PNG, float32 .npy and coloured PNG of a depth_view result, in `folder`."""
        from . import depth as depth_mod

        return depth_mod.write_files(result.depth, result.view, folder, f"{state['name']}_depth")

    def depth_downloads(self, session: str, state: Optional[dict], folder, cmap="turbo") -> dict:
        """The same files for the session's current encode (the page writes them once its
        view is shown)."""
        from . import depth as depth_mod

        entry = self.entry(session, state)
        view = depth_mod.render(entry.depth_image, metric=bool(entry.info.metric), cmap=_cmap(cmap))
        return self.depth_files(state, DepthResult(state["image"], view, entry.depth_image, ""), folder)

    # -- Attention tab -------------------------------------------------------------------
    def display_image(self, state: dict) -> np.ndarray:
        """The image as served for clicking (longest side <= DISPLAY_MAX), cached in state."""
        if state.get("display") is None:
            state["display"] = _display(state["image"])
        return state["display"]

    def display_to_image(self, state: dict, x, y) -> tuple[float, float]:
        """Pixel (x, y) of the served (display) image -> pixel of the original image."""
        disp = self.display_image(state)
        h, w = state["image"].shape[:2]
        dh, dw = disp.shape[:2]
        x = _number(x, "x")
        y = _number(y, "y")
        return (x + 0.5) * w / dw - 0.5, (y + 0.5) * h / dh - 0.5

    def _pick(self, state: dict, key: str, entry: Entry, probe, x, y, layer: int, cls=False) -> int:
        """The token of `layer` under pixel (x, y) of the original image, or CLS; x, y None:
        the last pick kept in state[key], else the image centre. The pick is kept there."""
        h, w = state["image"].shape[:2]
        if cls:
            if probe.cls_token is None:
                raise SessionError("this model has no class token (SwinV2): click a patch instead")
            state[key] = "cls"
            return probe.cls_token
        if x is None or y is None:
            last = state.get(key)
            x, y = last if isinstance(last, tuple) else ((w - 1) / 2, (h - 1) / 2)
        x = _number(x, "x")
        y = _number(y, "y")
        if not (-0.5 <= x < w - 0.5 and -0.5 <= y < h - 0.5):
            raise SessionError(f"the click ({x:g}, {y:g}) is outside the {w}x{h} image")
        state[key] = (float(x), float(y))
        return probe.token_at_pixel(entry.meta, x, y, layer=layer)

    def attention_at(self, session: str, state: Optional[dict], x=None, y=None, layer=None, mode="row",
                     log_contrast=False, shared_scale=False, cmap="inferno", alpha=0.0, cls=False,
                     tile_px: int = 160) -> AttentionResult:
        """Attention of the patch under pixel (x, y) of the original image (or of the CLS
        token), for every head of `layer` (1-based; None = the last), as tiles. x, y None:
        the last click, else the image centre. Never re-encodes an encoded image."""
        from . import attention

        entry = self.entry(session, state)
        probe = entry.probe
        n_layers = probe.num_layers
        layer = self._block(probe, layer, "layer")
        l0 = layer - 1
        mode = str(mode or "row").strip().lower()
        if mode not in ("row", "column"):
            raise SessionError(f"mode must be 'row' or 'column', got {mode!r}")
        cmap = _cmap(cmap)
        alpha = _number(alpha, "overlay alpha", lo=0.0, hi=1.0)
        token = self._pick(state, "click", entry, probe, x, y, l0, cls)
        disp = self.display_image(state)
        with self.store.using(entry):      # a column caches its layer's row normalisers
            tiles, values = attention.attention_view(
                probe, l0, token, mode=mode, log_contrast=bool(log_contrast), shared_scale=bool(shared_scale),
                cmap=cmap, alpha=alpha, image=disp if alpha > 0 else None, tile_px=tile_px)
        grid = probe.grid(l0)
        patch = probe.patch_of(token, l0)
        marked = disp if patch is None else attention.mark_patch(disp, None, grid, *patch)
        where = "CLS token" if patch is None else f"patch row {patch[0]}, col {patch[1]}"
        window = " · windowed layer (window outlined)" if probe.is_windowed(l0) else ""
        text = (f"layer {layer}/{n_layers} · {probe.num_heads(l0)} heads · grid {grid[0]}x{grid[1]} · {where} · "
                f"{'row: where it looks' if mode == 'row' else 'column: who looks at it'}{window}")
        return AttentionResult(tiles, marked, values, int(token), patch, layer, text)

    # -- Features tab --------------------------------------------------------------------
    def _block(self, probe, block, what="block") -> int:
        n = probe.num_layers
        return n if block is None or block == "" else _number(block, what, integer=True, lo=1, hi=n)

    def features_view(self, session: str, state: Optional[dict], block=None, mode="pca", x=None, y=None,
                      basis_block=None, foreground=False, top_k=5, alpha=0.35, cmap="inferno") -> FeaturesResult:
        """A feature lens of `block` (1-based; None = the last) from the session's recorded
        encode: mode "pca" (the first three principal components as RGB; basis_block fits
        them on another block, foreground keeps the patches on the positive side of the
        first) or "similarity" (cosine of the token under pixel (x, y) of the original image
        with every patch, the top_k most similar outlined; x, y None: the last click, else the
        image centre). The picture is at the display size. Never re-encodes."""
        from . import features

        entry = self.entry(session, state)
        probe = entry.probe
        block = self._block(probe, block)
        b0 = block - 1
        mode = str(mode or "pca").strip().lower()
        if mode not in ("pca", "similarity"):
            raise SessionError(f"mode must be 'pca' or 'similarity', got {mode!r}")
        cmap = _cmap(cmap)
        alpha = _number(alpha, "image alpha", lo=0.0, hi=1.0)
        shown = self.display_image(state)
        grid = probe.grid(b0)
        with self.store.using(entry):      # the PCA fits are kept with the probe
            if mode == "pca":
                basis = None if basis_block in (None, "") else self._block(probe, basis_block, "basis block") - 1
                values = probe.pca_rgb(b0, basis, foreground=bool(foreground))
                ratio = probe.pca(b0 if basis is None else basis, foreground=bool(foreground)).explained_ratio
                picture = features.lens_image(values, shown, alpha=alpha)
                fitted = "this block" if basis in (None, b0) else f"block {basis + 1}"
                text = (f"block {block}/{probe.num_layers} · grid {grid[0]}x{grid[1]} · PCA colours fitted on {fitted}"
                        f"{' (foreground only)' if foreground else ''} · the three components explain "
                        f"{', '.join(f'{float(r):.1%}' for r in ratio)} of the variance")
                return FeaturesResult(picture, values, None, None, block, text)
            token = self._pick(state, "feature_click", entry, probe, x, y, b0)
            k = _number(top_k, "top-k", integer=True, lo=0, hi=100)
            values = features.similarity_grid(probe, b0, token)
            similar = [probe.patch_of(t, b0) for t in probe.most_similar(b0, token, k)]
        patch = probe.patch_of(token, b0)
        picture = features.lens_image(values, shown, cmap=cmap, alpha=alpha, query=patch, similar=similar)
        text = (f"block {block}/{probe.num_layers} · grid {grid[0]}x{grid[1]} · cosine similarity to patch row "
                f"{patch[0]}, col {patch[1]} · range {float(values.min()):.3f}..{float(values.max()):.3f}"
                f"{f' · top {k} outlined in red' if k else ''}")
        return FeaturesResult(picture, values, int(token), patch, block, text)

    # -- Rollout tab ---------------------------------------------------------------------
    def rollout_at(self, session: str, state: Optional[dict], x=None, y=None, layer=None, head_fusion="mean",
                   discard_ratio=0.0, cls=False, alpha=0.35, cmap="inferno") -> RolloutResult:
        """Attention rollout of the token under pixel (x, y) (or CLS) up to `layer` (1-based;
        None = the last), as a map over the image at the display size."""
        from . import attention

        entry = self.entry(session, state)
        probe = entry.probe
        layer = self._block(probe, layer, "layer")
        l0 = layer - 1
        cmap = _cmap(cmap)
        alpha = _number(alpha, "image alpha", lo=0.0, hi=1.0)
        token = self._pick(state, "rollout_click", entry, probe, x, y, l0, cls)
        try:
            # each layer's fused matrix is kept for these settings; computing them holds more
            with self.store.using(entry), self.store.reserve(attention.rollout_bytes(probe, l0, head_fusion,
                                                                                     discard_ratio), "rollout",
                                                                keep=entry):
                picture, values = attention.rollout_view(probe, token, l0, self.display_image(state),
                                                         head_fusion=head_fusion, discard_ratio=discard_ratio,
                                                         cmap=cmap, alpha=alpha)
        except attention.AttentionError as exc:
            raise SessionError(str(exc)) from None
        patch = probe.patch_of(token, l0)
        start = attention.rollout_start(probe, l0) + 1
        where = "CLS token" if patch is None else f"patch row {patch[0]}, col {patch[1]}"
        cls_share = "" if probe.cls_token is None else f" · on CLS {float(values[probe.cls_token]):.1%}"
        stage = " (this stage's blocks: SwinV2 rolls out within a stage)" if probe.is_windowed(l0) else ""
        text = (f"rollout of {where} over layers {start}..{layer}{stage} · heads fused by "
                f"{str(head_fusion).lower()}, {float(discard_ratio or 0):.0%} discarded{cls_share}")
        return RolloutResult(picture, values, int(token), patch, layer, text)

    def attention_distance(self, session: str, state: Optional[dict]):
        """(Plotly figure, (layers, heads) distances, summary) of the mean attention distance."""
        from . import attention

        entry = self.entry(session, state)
        with self.store.using(entry):      # computed once per encode
            distances = attention.mean_distance(entry.probe)
            figure = entry.cached("distance figure", lambda: attention.distance_figure(distances))
        first, last = np.nanmean(distances[0]), np.nanmean(distances[-1])
        text = (f"{distances.shape[0]} layers · mean over heads {first:.1f} px in layer 1, {last:.1f} px in layer "
                f"{distances.shape[0]} (model input {entry.meta.input_size[1]}x{entry.meta.input_size[0]})")
        return figure, distances, text

    # -- Ablation tab --------------------------------------------------------------------
    def ablation_patches(self, session: str, state: Optional[dict], block=None, source="outliers", patches="",
                         threshold="auto") -> tuple[int, list]:
        """(1-based block, the chosen patches on its grid): the norms' outliers (source
        "outliers", with the norms tab's threshold) or the given 'R,C; R,C' patches."""
        from . import ablation, norms

        entry = self.entry(session, state)
        probe = entry.probe
        block = self._block(probe, block)
        source = str(source or "outliers").strip().lower()
        if source not in ("outliers", "patches"):
            raise SessionError(f"tokens must be 'outliers' or 'patches', got {source!r}")
        if source == "patches":
            return block, ablation.parse_patches(patches)
        try:
            with self.store.using(entry):      # the norms are computed once and kept
                return block, ablation.outlier_patches(probe, block - 1, norms.parse_threshold(threshold),
                                                       result=entry.norms())
        except norms.ThresholdError as exc:
            raise SessionError(str(exc)) from None

    def toggle_patch(self, session: str, state: Optional[dict], x, y, block=None, patches="") -> str:
        """The 'R,C; ...' patches with the one under pixel (x, y) of the image added, or removed
        if it was there (the clicks of the Ablation tab), on `block`'s grid."""
        from . import ablation

        entry = self.entry(session, state)
        probe = entry.probe
        b0 = self._block(probe, block) - 1
        token = self._pick(state, "ablation_click", entry, probe, x, y, b0)
        patch = probe.patch_of(token, b0)
        chosen = ablation.parse_patches(patches)
        chosen = [p for p in chosen if p != patch] if patch in chosen else chosen + [patch]
        return ablation.format_patches(chosen)

    def ablation_marked(self, session: str, state: Optional[dict], block, patches) -> np.ndarray:
        """The display image with the chosen patches of `block`'s grid (a list, or 'R,C; ...') outlined."""
        from . import ablation, imaging

        if isinstance(patches, str):
            patches = ablation.parse_patches(patches)
        probe = self.entry(session, state).probe
        return imaging.outline_patches(self.display_image(state), probe.grid(self._block(probe, block) - 1), patches)

    def ablation_view(self, session: str, state: Optional[dict], block=None, source="outliers", patches="",
                      mode="neighbours", threshold="auto", cmap="turbo") -> AblationView:
        """Replace the chosen tokens from `block` (1-based) on (ablation.ablate: one partial re-run
        from the recorded input of that block, plus the decoder) and compare the depth."""
        from . import ablation
        from . import depth as depth_mod

        cmap = _cmap(cmap)
        block, chosen = self.ablation_patches(session, state, block, source, patches, threshold)
        if not chosen:
            raise SessionError("no tokens to replace: no outliers at this threshold; lower it, or click patches "
                               "and choose 'patches I click'")
        entry = self.entry(session, state)
        model = self.manager.get(entry.model_name)
        mode = str(mode or "neighbours").strip().lower()
        try:
            # the latest run is kept (its depth and shares, not its records); while it runs, its
            # re-run of the blocks and the decoder holds about an encode's working set
            with self.store.using(entry), self.store.reserving(entry.model_name, _pixels(entry), what="ablation",
                                                                           keep=entry):
                res = _latest(entry, "ablation", (block, tuple(chosen), mode),
                              lambda: _ablated(model, entry, block, chosen, mode))
        except ablation.AblationError as exc:
            raise SessionError(str(exc)) from None
        metric = bool(entry.info.metric)
        diff_img, m = _difference_image(res["depth"] - entry.depth_image)
        n_layers = entry.probe.num_layers
        text = (f"{len(chosen)} patch{'es' if len(chosen) != 1 else ''} replaced ({mode}) from block {block}/{n_layers} "
                f"· blocks {block}..{n_layers} and the decoder re-run in {res['rerun_s'] * 1000:.0f} ms (encode was "
                f"{entry.encode_s * 1000:.0f} ms) · mean |difference| {res['near']:.4g} on and around the patches, "
                f"{res['elsewhere']:.4g} elsewhere · max {m:.4g}")
        return AblationView(depth_mod.render(res["depth"], metric=metric, cmap=cmap), self._unscaled_view(entry, cmap),
                            diff_img,
                            self.ablation_marked(session, state, block, chosen), res["figure"], chosen, block,
                            res["depth"], res["share"], text)

    # -- Block norms tab -----------------------------------------------------------------
    def norms_view(self, session: str, state: Optional[dict], threshold="auto", block=None,
                   shared_scale=True, k=None, *, light=False) -> NormsResult:
        """Figures, outlier table and overlay from the session's recorded encode. light: the
        page's heatmap (norms.mosaic_figure: one trace, ~3x quicker to draw) when one colour
        scale is shared; the API and the downloads keep one subplot per block."""
        from . import norms

        result, out, block = self._norms_outliers(session, state, threshold, block, k)
        entry = self.entry(session, state)
        thr = (out.mode, out.thresholds.tobytes(), out.k)        # what the outliers depend on
        with self.store.using(entry):      # each view is kept for its controls: switching back costs nothing
            overlay = _latest(entry, "norms overlay", thr,
                              lambda: norms.draw_outliers(self.display_image(state), None, result, out))
            if light and shared_scale:
                heatmap = _latest(entry, "norms mosaic", thr, lambda: norms.mosaic_figure(result, outliers=out))
            else:
                heatmap = _latest(entry, "norms heatmap", (thr, bool(shared_scale)),
                                  lambda: norms.heatmap_figure(result, shared_scale=bool(shared_scale), outliers=out))
            stats = _latest(entry, "norms stats", thr, lambda: norms.stats_figure(result, out))
            histogram = _latest(entry, "norms histogram", (thr, block),
                                lambda: norms.histogram_figure(result, block, out))
        return NormsResult(
            heatmap=heatmap, stats=stats, histogram=histogram,
            table=out.table(limit=TABLE_LIMIT), headers=tuple(norms.Outliers.HEADERS), overlay=overlay,
            summary=norms.summary(result, out), result=result, outliers=out, block=block)

    def norms_histogram(self, session: str, state: Optional[dict], threshold="auto", block=None, k=None):
        """Only the histogram of one block (the block slider)."""
        from . import norms

        result, out, block = self._norms_outliers(session, state, threshold, block, k)
        return norms.histogram_figure(result, block, out)

    def _norms_outliers(self, session: str, state: Optional[dict], threshold, block, k):
        """(norms result, outliers, 1-based block) of the session's image, the controls checked."""
        from . import norms

        entry = self.entry(session, state)
        with self.store.using(entry):      # the norms are computed once and kept
            result = entry.norms()
        try:
            thr = norms.parse_threshold(threshold)
        except norms.ThresholdError as exc:
            raise SessionError(str(exc)) from None
        kwargs = {} if k in (None, "") else {"k": _number(k, "k", lo=0.5, hi=100)}
        out = norms.find_outliers(result, threshold=thr, **kwargs)
        n = result.num_blocks
        block = n if block is None or block == "" else _number(block, "block", integer=True, lo=1, hi=n)
        return result, out, block

    def norms_files(self, session: str, state: Optional[dict], folder, threshold="auto", shared_scale=True,
                    k=None) -> dict:
        """CSV of every norm and a standalone HTML page of the figures, in `folder`."""
        from . import norms

        view = self.norms_view(session, state, threshold, None, shared_scale, k)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{state['name']}_norms"
        csv_path, html_path = folder / f"{stem}.csv", folder / f"{stem}.html"
        view.result.to_csv(csv_path)
        page = norms.figures_html(view.heatmap, view.stats, view.histogram,
                                  title=f"DPT Lab · block norms · {state['name']} · {state['model']}",
                                  text=view.summary, outliers=view.outliers,
                                  images=[("outliers on the image (all blocks)", view.overlay)])
        html_path.write_text(page, encoding="utf-8")
        return {"csv": csv_path, "html": html_path}

    # -- Fusion tab ----------------------------------------------------------------------
    def fusion_view(self, session: str, state: Optional[dict], scales: Sequence[float] = (1, 1, 1, 1),
                    cmap="turbo") -> FusionResult:
        """Depth with the four fusion factors, from the cached encoder features (only the
        decoder runs), beside the unscaled depth and their difference."""
        from . import depth as depth_mod
        from . import fusion

        try:
            scales = fusion.check_scales(scales)
        except fusion.FusionError as exc:
            raise SessionError(str(exc)) from None
        cmap = _cmap(cmap)
        entry = self.entry(session, state)
        t0 = time.perf_counter()
        if tuple(scales) == FUSION_IDENTITY:
            scaled, dt = entry.depth_image, time.perf_counter() - t0
        else:
            model = self.manager.get(entry.model_name)
            key = tuple(scales)
            with entry.lock:      # the page's quick path and its Gradio event ask at once: one decode
                hit = entry.cache.get("fusion scaled")
                if hit is not None and hit[0] == key:
                    scaled, dt = hit[1]
                else:
                    # the latest factors' depth is kept (and the fusion inputs, again for a reloaded
                    # model); the decoder's maps are transient
                    with self.store.using(entry), self.store.reserving(entry.model_name, _pixels(entry),
                                                                       DECODE_FACTOR, "decode", keep=entry):
                        scaled, dt = _latest(entry, "fusion scaled", key, lambda: (model.postprocess(
                            _scaled_decode(model, entry.feats, scales), entry.meta), time.perf_counter() - t0))
        metric = bool(entry.info.metric)
        diff_img, m = _difference_image(scaled - entry.depth_image)
        text = (f"factors {', '.join(f'{s:g}' for s in scales)} · decoder only: {dt * 1000:.0f} ms "
                f"(encode was {entry.encode_s * 1000:.0f} ms) · max |difference| {m:.4g}")
        unscaled = self._unscaled_view(entry, cmap)
        identity = tuple(scales) == FUSION_IDENTITY
        return FusionResult(unscaled if identity else depth_mod.render(scaled, metric=metric, cmap=cmap), unscaled,
                            diff_img, scaled, tuple(scales), text)

    @staticmethod
    def fusion_preset(name) -> tuple:
        """The four factors of a preset ('reset', 'solo 2', 'drop 4', ...)."""
        if name not in FUSION_PRESETS:
            raise SessionError(f"unknown preset {name!r}; choose one of {', '.join(FUSION_PRESETS)}")
        return tuple(FUSION_PRESETS[name])

    @staticmethod
    def fusion_glitch(seed: Optional[int] = None) -> tuple:
        """Four random factors far from 1 (fusion.random_glitch)."""
        from . import fusion

        return tuple(fusion.random_glitch(seed))

    def fusion_files(self, session: str, state: Optional[dict], folder, scales=(1, 1, 1, 1), cmap="turbo") -> dict:
        from . import depth as depth_mod

        view = self.fusion_view(session, state, scales, cmap)
        tag = "_".join(f"{s:g}" for s in view.scales)
        return depth_mod.write_files(view.depth, view.scaled, folder, f"{state['name']}_fusion_{tag}")

    # -- Mask tab ------------------------------------------------------------------------
    def _masked(self, session: str, state: Optional[dict], low, high, invert, strength):
        """(entry, mask.Masked) of the session's cached depth. The plane is fitted once per encode
        and the plane-removed depth kept for the latest strength (at 0 it is the depth itself)."""
        from . import mask as mask_mod
        from . import scene

        entry = self.entry(session, state)
        s = scene.number(strength, "plane strength")
        plane = flat = None
        if s:
            with self.store.using(entry):
                plane = entry.cached("plane", lambda: scene.fit_plane(entry.depth_image))
                flat = _latest(entry, "plane removed", s, lambda: scene.remove_plane(entry.depth_image, s, plane))
        masked = mask_mod.mask_depth(entry.depth_image, low, high, invert=bool(invert), strength=s,
                                     metric=bool(entry.info.metric), plane=plane, flat=flat)
        return entry, masked

    def mask_view(self, session: str, state: Optional[dict], low=0.3, high=1.0, invert=False, strength=0.0,
                  contrast=False, cmap="turbo") -> MaskResult:
        """Mask the session's cached depth by a range (relative models: on the normalised
        inverse depth, 1 = nearest; metric: metres), after removing strength x its robust
        plane; no re-encode. The previews are at the display size."""
        from . import imaging, scene
        from . import mask as mask_mod

        cmap = _cmap(cmap)
        entry, masked = self._masked(session, state, low, high, invert, strength)
        metric = bool(entry.info.metric)
        shown = self.display_image(state)
        keep = mask_mod.shrink(masked.keep, shown.shape[:2])
        flat_small = mask_mod.shrink(masked.flat, shown.shape[:2])
        values = scene.equalise(flat_small) if contrast else flat_small
        plane = masked.plane
        plane_text = (f"plane a={plane[0]:.3g}/px, b={plane[1]:.3g}/px, c={plane[2]:.4g} removed x {masked.strength:g}"
                      if plane is not None else "no plane removed")
        text = (f"kept {masked.kept_share:.1%} of the pixels · {mask_mod.range_label(metric)} "
                f"{scene.number(low, 'range low'):g}..{scene.number(high, 'range high'):g}"
                f"{' (inverted)' if invert else ''} · {plane_text}{' · contrast: equalised' if contrast else ''}")
        return MaskResult(mask_mod.preview(shown, keep), mask_mod.mask_image(keep), imaging.colorize(values, cmap),
                          masked, text)

    def mask_files(self, session: str, state: Optional[dict], folder, low=0.3, high=1.0, invert=False,
                   strength=0.0) -> dict:
        """cutout (RGBA PNG at the image's size), mask PNG, the plane-removed depth as a
        16-bit PNG and .npy, in `folder`."""
        from . import mask as mask_mod

        _, masked = self._masked(session, state, low, high, invert, strength)
        return mask_mod.write_files(state["image"], masked, folder, f"{state['name']}_mask")

    # -- 3D tab --------------------------------------------------------------------------
    def scene_view(self, session: str, state: Optional[dict], folder, fov=60.0, focal=None, near=1.0, far=10.0,
                   edge=0.05, max_vertices=500_000, points=False, drop_beyond=None) -> SceneResult:
        """The session's cached depth in 3D (no re-encode): a GLB mesh (or point cloud) with the
        image's colours and a PLY point cloud, in `folder`. Metric models: metres as predicted
        (near / far unused). Relative models: the normalised inverse depth placed between
        near and far (the shape depends on them)."""
        from . import scene

        entry = self.entry(session, state)
        metric = bool(entry.info.metric)
        mesh = scene.build_mesh(state["image"], entry.depth_image, fov_deg=fov, focal_px=focal, inverse=not metric,
                                near=None if metric else near, far=None if metric else far, edge=edge,
                                max_vertices=max_vertices, drop_beyond=drop_beyond)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{state['name']}_scene"
        glb = scene.write_glb(mesh, folder / f"{stem}{'_points' if points else ''}.glb", points=bool(points))
        ply = scene.write_ply(mesh, folder / f"{stem}.ply")
        h, w = entry.depth_image.shape
        f = scene.focal_length(w, fov, focal)
        units = ("metres, as the model predicts them" if metric else
                 f"relative depth placed between near {scene.number(near, 'near'):g} and far "
                 f"{scene.number(far, 'far'):g}: the shape depends on these two numbers")
        text = (f"{len(mesh.vertices):,} vertices (every {mesh.step} px of {w}x{h}), "
                f"{'point cloud' if points else f'{len(mesh.faces):,} triangles'} · focal {f:.1f} px "
                f"(horizontal field of view {math.degrees(2 * math.atan(w / 2 / f)):.1f}°) · {units}")
        return SceneResult(glb, ply, mesh, text)

    # -- Video tab -----------------------------------------------------------------------
    def video_job(self, session: str, source, model_name, folder, base_size=None, max_seconds=10.0, stride=1,
                  target_fps=0, side_by_side=False, normalise="clip", cmap="turbo", raw="none",
                  progress: Optional[ProgressFn] = None):
        """Depth of a video (video.depth_video) into `folder`: the MP4 and, as `raw` asks, the
        raw depth (npz | png zip). One job per session at a time; cancel_video stops it."""
        import threading

        from . import video

        name = self.manager.validate(model_name)
        raw = str(raw or "none").strip().lower()
        if raw not in ("none", "npz", "png zip"):
            raise SessionError(f"raw depth must be 'none', 'npz' or 'png zip', got {raw!r}")
        size = _base_size(base_size)
        fps = 0 if target_fps in (None, "") else _number(target_fps, "target fps", lo=0, hi=240)
        key = session or DEFAULT_SESSION
        with self._video_lock:
            if key in self._video_cancel:
                raise SessionError("a video job is already running in this session: wait for it, or cancel it")
            cancel = self._video_cancel[key] = threading.Event()
        try:
            model = self.manager.get(name, progress)
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            stem = _safe_stem(Path(str(source)).stem) + "_depth"
            # the job's batches are sized to a budget it reserves under the store's cap
            budget = min(video.BATCH_BYTES, self.store.max_bytes // 4)
            with self.store.reserve(budget, "video"):
                report = video.depth_video(
                    model, source, folder / f"{stem}.mp4", base_size=size, max_seconds=max_seconds, stride=stride,
                    side_by_side=bool(side_by_side), normalise=normalise, cmap=_cmap(cmap),
                    npz=folder / f"{stem}.npz" if raw == "npz" else None, progress=progress,
                    png_zip=folder / f"{stem}_png16.zip" if raw == "png zip" else None, cancel=cancel.is_set,
                    target_fps=fps or None, batch_bytes=budget)
        except video.VideoError as exc:
            raise SessionError(str(exc)) from None
        finally:
            with self._video_lock:
                self._video_cancel.pop(key, None)
        return report

    def cancel_video(self, session: str) -> bool:
        """Ask the session's running video job to stop after its current batch (False: none runs)."""
        with self._video_lock:
            event = self._video_cancel.get(session or DEFAULT_SESSION)
        if event is None:
            return False
        event.set()
        return True

    def webcam_frame(self, session: str, frame, model_name, base_size=252, cmap="turbo") -> tuple[np.ndarray, str]:
        """One webcam frame's depth, coloured (model.predict at a small base size), and the
        frames per second this session's stream runs at (over its last frames)."""
        from . import depth as depth_mod
        from . import imaging

        if frame is None:
            raise SessionError("no webcam frame yet")
        model = self.manager.get(self.manager.validate(model_name))
        size = _number(base_size, "webcam base size", integer=True, lo=28, hi=1036)
        t0 = time.perf_counter()
        rgb = _display(imaging.load_image(frame), WEBCAM_MAX)   # cameras send up to 4K: shown small, worked small
        d = model.predict(rgb, base_size=size)
        work = time.perf_counter() - t0
        coloured = depth_mod.render(d, metric=bool(model.info.metric), cmap=_cmap(cmap)).colored
        stamps = self._webcam.setdefault(session or DEFAULT_SESSION, [])
        stamps.append(time.perf_counter())
        del stamps[:-20]
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
        return coloured, (f"{rate:.1f} frames/s shown · {work * 1000:.0f} ms of depth per frame at base size {size} · "
                          f"{rgb.shape[1]}x{rgb.shape[0]}")

    # -- Export tab ----------------------------------------------------------------------
    def export_model(self, model_name, folder, *, dynamic=True, fp16=False, with_preprocessing=False,
                     opset=None, base_size=None, progress: Optional[ProgressFn] = None):
        """Export `model_name` to ONNX in `folder` with dpt_lab.export (verified there);
        returns its ExportReport. base_size (default the model's): the traced (and, when not
        dynamic, the fixed) size is base x base; with preprocessing, the size the graph
        resizes images to."""
        name = self.manager.validate(model_name)
        opset = None if opset in (None, "", 0, "0", "auto") else _number(opset, "opset", integer=True, lo=7, hi=30)
        size = _base_size(base_size)
        try:
            from . import export  # noqa: F401 - is it there (onnx, onnxruntime)?
        except ImportError as exc:
            raise SessionError(f"ONNX export is not available in this installation ({exc})") from None
        model = self.manager.get(name, progress)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = _safe_stem(name.replace(" ", "_")) + ("-fp16" if fp16 else "") + ("-pre" if with_preprocessing else "")
        if progress:
            progress(0.05, f"exporting {name} to ONNX and verifying it with onnxruntime")
        # tracing, the ONNX graph's copies of the weights and onnxruntime's check at base x base
        # (bench/memory_ops.py: ~5.5x the weights and an encode's working set at that size)
        export_bytes = EXPORT_WEIGHT_COPIES * weight_bytes(model) + self.store.working_set(
            name, (size or model.info.base_size) ** 2)
        with self.store.reserve(export_bytes, "export"):
            return _export(model, folder / f"{stem}.onnx", dynamic=bool(dynamic), fp16=bool(fp16),
                           with_preprocessing=bool(with_preprocessing), opset=opset, verify=True, base_size=size)
