"""DepthModel: one family-specific encoder, the shared DPT decoder, and the official
pre/post-processing of that family.

    x, meta = model.preprocess(image)          # official resize + normalize
    feats = model.encode(x)                    # 4 tapped maps (+ per-block records if asked)
    depth = model.decode(feats, fusion_scales) # B x H x W
    model(x) == model.decode(model.encode(x))
    model.predict(image)                       # H x W float32 numpy at the image's resolution
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import fastpath
from .decoder import DPTDecoder, FusionStages
from .encoders.base import EncoderFeatures, Record, Resume
from .families import HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - importable from here as before


@dataclass
class ModelInfo:
    """Everything a tool needs to know about a loaded model, read from its tensors
    (sizes) and from its file name / config.json (what tensors cannot say)."""

    family: str                 # depth_anything_v1 | depth_anything_v2 | depth_anything_v2_metric | midas_beit | midas_swin2
    size: str                   # vits | vitb | vitl | vitg | beit_base | beit_large | swin2_tiny | swin2_base | swin2_large
    patch_size: int             # pixels per token side at the first stage
    tile: int                   # the input's height and width must be multiples of this
    base_size: int              # the official processing size (518, 384, 512, 256)
    multiple: int               # official sizes are rounded to multiples of this
    resize_rule: str            # lower_bound | minimal | stretch
    depth_resize: str           # how depth goes back to image size: bilinear_align | bilinear | bicubic
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_blocks: int
    num_heads: list[int]        # per block
    tap_blocks: tuple[int, ...]
    has_cls: bool
    metric: bool = False
    max_depth: Optional[float] = None
    width: int = 0
    native_grid: tuple[int, int] = (0, 0)
    window_sizes: Optional[tuple[int, ...]] = None   # SwinV2, per stage
    layout: str = "original"    # original | hf
    source: str = ""
    name: str = ""
    notes: list[str] = field(default_factory=list)
    compute_dtype: str = "float32"    # float16 / bfloat16: run under autocast (precision.py)

    @property
    def keep_aspect_default(self) -> bool:
        return self.resize_rule != "stretch"

    @property
    def depth_kind(self) -> str:
        return "metric depth (metres)" if self.metric else "inverse depth (relative)"

    def as_dict(self) -> dict:
        return asdict(self)


def _same_objects(a, b) -> bool:
    """Identity (not equality) of two nested tuples of objects; a weak reference stands
    for the object it refers to."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_objects(x, y) for x, y in zip(a, b))
    if isinstance(a, weakref.ref):
        a = a()
    if isinstance(b, weakref.ref):
        b = b()
    return a is b


class DepthModel(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: DPTDecoder, info: ModelInfo):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.info = info
        self.compute_dtype: Optional[torch.dtype] = None    # half precision under autocast (precision.apply)
        self._last_stages: Optional[weakref.ref] = None     # the FusionStages that hold tensors (decode)

    def _autocast(self):
        """torch.autocast in compute_dtype on the model's device, or nothing (float32)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() ...: the fast path's packed weight copies are stale
        fastpath.release(self)
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _packing(self):
        """The fast path packs this model's weights only if it is small (fastpath.packs)."""
        return fastpath.packing(fastpath.packs(self))

    def encode(self, x: Tensor, record: Record = Record(), resume: Optional[Resume] = None) -> EncoderFeatures:
        """The encoder's four tapped maps (and, as `record` asks, per-block records). With
        `resume` (encoders.base.Resume) it runs only blocks resume.start.. from an earlier
        pass's records; x then only gives the input size."""
        tile = self.info.tile
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W tensor, got {tuple(x.shape)}")
        if x.shape[-2] % tile or x.shape[-1] % tile:
            raise ValueError(f"input height and width must be multiples of {tile}, got {tuple(x.shape[-2:])}")
        with self._packing(), self._autocast():
            return self.encoder(x, record) if resume is None else self.encoder(x, record, resume)

    def decode(self, feats: EncoderFeatures, fusion_scales: Optional[Sequence[float]] = None) -> Tensor:
        """Depth (B x H x W) from encoder features; `fusion_scales` multiply the four
        fusion inputs (see decoder.py). The fusion inputs (reassemble + layer_rn, everything
        before the scaling) are computed once per `feats` and kept in it (`fusion_inputs`),
        and so are the fusion stages of the last decode with factors (decoder.FusionStages,
        for the features this model decoded so last), so a slider change runs only the fusion
        blocks its factor reaches and the head. The numbers are those of the uncached decoder
        exactly."""
        scaled = fusion_scales is not None and any(float(s) != 1.0 for s in fusion_scales)
        with self._packing(), self._autocast():
            # the stages are kept for a slider's decodes only: a plain decode (each new image's
            # depth) would add them to every encode kept (~22 MB for ViT-S, ~86 MB for ViT-L)
            layers, stages = self._fusion_cache(feats, keep_stages=scaled)
            return self.decoder.fuse(layers, feats.out_size, fusion_scales, stages).float()

    def fusion_inputs(self, feats: EncoderFeatures) -> list[Tensor]:
        """The four decoder-width maps entering the fusion blocks (layer_rn outputs, before
        any fusion scaling), cached in `feats.extras` under "fusion_inputs".

        The cache is used only by this model's decoder and only while `feats.maps` / `feats.cls`
        are the same tensor objects (replace them, and it is recomputed; in-place edits of
        those tensors are not detected). Nothing is cached while autograd records (a cached
        graph could not be backpropagated twice) or while tracing / compiling (export)."""
        return self._fusion_cache(feats)[0]

    def _fusion_cache(self, feats: EncoderFeatures, keep_stages: bool = False
                      ) -> tuple[list[Tensor], Optional[FusionStages]]:
        """(fusion inputs, the stages kept with them: None where nothing is cached or
        `keep_stages` is off)."""
        cls = tuple(feats.cls) if feats.cls is not None else None
        # the decoder by weak reference: cached features must not keep an evicted model alive
        key = (weakref.ref(self.decoder), tuple(feats.maps), cls)
        caching = not (torch.is_grad_enabled() or fastpath.tracing())
        cached = feats.extras.get("fusion_inputs")
        if cached is not None and _same_objects(cached[0], (self.decoder, *key[1:])):
            _, layers, stages = cached
        else:
            with self._autocast():
                layers = self.decoder.reassembled(feats.maps, feats.cls)
            if not caching:
                return layers, None
            stages = FusionStages()
            feats.extras["fusion_inputs"] = (key, layers, stages)
        if not (keep_stages and caching):
            return layers, None
        # one set of stages per model holds tensors: the features decoded last (a slider's)
        last = self._last_stages() if self._last_stages is not None else None
        if last is not None and last is not stages:
            last.clear()
        self._last_stages = weakref.ref(stages)
        return layers, stages

    def forward(self, x: Tensor) -> Tensor:
        # the uncached path (same code as decode): a forward never keeps fusion inputs alive
        feats = self.encode(x)
        with self._packing(), self._autocast():
            depth = self.decoder(feats.maps, feats.cls, feats.out_size)
        return depth if self.compute_dtype is None else depth.float()

    # -- images in, depth out (official pipelines; see imaging.py) --------------------
    def preprocess(self, image, base_size: Optional[int] = None, keep_aspect: Optional[bool] = None, device=None):
        """(1 x 3 x h x w input on `device` (default the model's), imaging.PreprocessMeta)."""
        from . import imaging

        if keep_aspect is None:
            keep_aspect = self.info.keep_aspect_default
        rgb = imaging.load_image(image)
        rule = self.info.resize_rule if keep_aspect else "stretch"
        if rule == "stretch" and keep_aspect:
            rule = "minimal"
        return imaging.prepare(
            rgb, target=int(base_size or self.info.base_size), multiple=self.info.multiple, rule=rule,
            mean=self.info.mean, std=self.info.std, dtype=self.dtype, device=self.device if device is None else device,
        )

    def postprocess(self, depth: Tensor, meta) -> np.ndarray:
        from . import imaging

        out = imaging.resize_depth(depth.float(), meta.image_size, mode=self.info.depth_resize)
        if out.dim() == 3 and out.shape[0] == 1:  # one image: H x W (squeeze() would also drop a side of 1)
            out = out[0]
        return out.cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def predict(self, image, base_size: Optional[int] = None, keep_aspect: Optional[bool] = None) -> np.ndarray:
        x, meta = self.preprocess(image, base_size, keep_aspect)
        return self.postprocess(self(x), meta)
