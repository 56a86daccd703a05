"""What each model family is, declared once: for every size its architecture numbers and
native input, the family's pre/post-processing, and what the tensors cannot tell.

    spec = FAMILY_SPECS["midas_swin2"]; spec.sizes["swin2_tiny"].depths   # (2, 2, 6, 2)
    model = dpt_lab.build("depth_anything_v2", "vits", seed=0)            # random weights

Read from here: layouts/base.py (FAMILIES, FAMILY_ALIASES), each layout's size names,
SwinV2's official windows, mean / std, resize rule and depth resize, the metric default;
export.py's per-family notes; weights.py's registry (`published()`: hub repo, file name,
licence and metric max depth of every published checkpoint); architectures.py's random
models (`dpt_lab.build`), which the app's offline model is one of. A checkpoint still
decides every shape it holds (another size loads too). Torch-free: the page and the
download code read it before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class SizeSpec:
    """One official size. `depth` / `heads` are ints for plain ViTs, per-stage tuples
    for SwinV2 (`depths`). The decoder numbers are the DPT head's."""

    name: str
    width: int
    depth: int | tuple[int, ...]
    heads: int | tuple[int, ...]
    features: int                          # decoder width (layer_rn / fusion)
    reassemble: tuple[int, ...]            # channels after each tap's 1x1 projection
    native_sizes: tuple[int, ...]          # official input sides in px; the first is the default
    mlp_hidden: int = 0                    # 0: 4 x width
    swiglu: bool = False                   # DINOv2 giant
    patch: int = 16
    window: int = 0                        # SwinV2 native window; BEiT's is native / patch
    pretrained_windows: tuple[int, ...] = ()   # SwinV2 continuous-bias coordinate scaling
    head_hidden: int = 32

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.width

    @property
    def depths(self) -> tuple[int, ...]:
        return self.depth if isinstance(self.depth, tuple) else (self.depth,)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    encoder: str                           # dinov2 | beit | swin2
    sizes: dict[str, SizeSpec]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_rule: str                       # lower_bound | minimal | stretch
    depth_resize: str                      # bilinear | bilinear_align | bicubic
    readout: str                           # how the decoder treats the CLS token
    multiple: Optional[int] = None         # official sizes round to this; None: the tile
    tap_version: int = 2                   # Depth-Anything: v1 taps the last four blocks, v2 a spread
    max_depth: Optional[float] = None      # metric head's scale when the file does not say (not in tensors)
    aliases: tuple[str, ...] = ()
    export_notes: tuple[str, ...] = ()     # what a dynamic-size export does for this family

    @property
    def metric(self) -> bool:
        return self.max_depth is not None

    def size(self, name: str) -> SizeSpec:
        if name not in self.sizes:
            raise KeyError(f"{self.name} has no size {name!r}; expected one of {', '.join(self.sizes)}")
        return self.sizes[name]

    def size_by_width(self) -> dict[int, str]:
        return {s.width: s.name for s in self.sizes.values()}


# Depth-Anything decodes every size with the same DPT head: features and projections
# grow with the ViT (depth_anything_v2/dpt.py's model_configs); DINOv2 heads are 64 wide.
_DA_SIZES = {
    "vits": SizeSpec("vits", 384, 12, 6, 64, (48, 96, 192, 384), (518,), patch=14),
    "vitb": SizeSpec("vitb", 768, 12, 12, 128, (96, 192, 384, 768), (518,), patch=14),
    "vitl": SizeSpec("vitl", 1024, 24, 16, 256, (256, 512, 1024, 1024), (518,), patch=14),
    # DINOv2-g: SwiGLU of 4096 hidden; announced for v2, never published
    "vitg": SizeSpec("vitg", 1536, 40, 24, 384, (1536,) * 4, (518,), mlp_hidden=4096, swiglu=True, patch=14),
}
_DA_EXPORT = ("dynamic sizes: the 37x37 position embedding is resized for the input's grid inside the graph "
              "(bicubic weights computed from the size, the unresized table at 518x518)",)
_DA = dict(encoder="dinov2", mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_rule="lower_bound",
           readout="ignore", export_notes=_DA_EXPORT)

FAMILY_SPECS: dict[str, FamilySpec] = {
    "depth_anything_v1": FamilySpec(
        "depth_anything_v1", sizes={k: v for k, v in _DA_SIZES.items() if k != "vitg"}, depth_resize="bilinear",
        tap_version=1, aliases=("v1", "depth_anything", "da1"), **_DA),
    "depth_anything_v2": FamilySpec(
        "depth_anything_v2", sizes=dict(_DA_SIZES), depth_resize="bilinear_align",
        aliases=("v2", "da2"), **_DA),
    # max depth: 20 m (hypersim, indoor) or 80 m (vkitti, outdoor); only file names / config.json say which
    "depth_anything_v2_metric": FamilySpec(
        "depth_anything_v2_metric", sizes={k: v for k, v in _DA_SIZES.items() if k != "vitg"},
        depth_resize="bilinear_align", max_depth=20.0, aliases=("metric", "v2_metric"), **_DA),
    "midas_beit": FamilySpec(
        "midas_beit", encoder="beit", mean=HALF_MEAN, std=HALF_STD, resize_rule="minimal", depth_resize="bicubic",
        readout="project", multiple=32, aliases=("beit",),
        sizes={
            "beit_base": SizeSpec("beit_base", 768, 12, 12, 256, (96, 192, 384, 768), (384,)),
            "beit_large": SizeSpec("beit_large", 1024, 24, 16, 256, (256, 512, 1024, 1024), (512, 384)),
        },
        export_notes=("dynamic sizes: each block's relative position bias table is resized (bilinear) and indexed "
                      "for the input's grid inside the graph",)),
    # MiDaS builds base/large on timm's swinv2_*_window12to24_192to384, tiny on swinv2_tiny_window16_256
    "midas_swin2": FamilySpec(
        "midas_swin2", encoder="swin2", mean=HALF_MEAN, std=HALF_STD, resize_rule="stretch", depth_resize="bicubic",
        readout="none", aliases=("swin2", "swinv2"),
        sizes={
            "swin2_tiny": SizeSpec("swin2_tiny", 96, (2, 2, 6, 2), (3, 6, 12, 24), 256, (96, 192, 384, 768), (256,),
                                   patch=4, window=16, pretrained_windows=(0, 0, 0, 0)),
            "swin2_base": SizeSpec("swin2_base", 128, (2, 2, 18, 2), (4, 8, 16, 32), 256, (128, 256, 512, 1024),
                                   (384,), patch=4, window=24, pretrained_windows=(12, 12, 12, 6)),
            "swin2_large": SizeSpec("swin2_large", 192, (2, 2, 18, 2), (6, 12, 24, 48), 256, (192, 384, 768, 1536),
                                    (384,), patch=4, window=24, pretrained_windows=(12, 12, 12, 6)),
        },
        export_notes=("dynamic sizes: native windows on any grid; padding, shifted-window rolls and masks are "
                      "computed from the input size inside the graph (sizes other than the native one follow "
                      "DPT Lab's rule, see encoders/swin2.py)",)),
}

FAMILIES = tuple(FAMILY_SPECS)
FAMILY_ALIASES = {alias: spec.name for spec in FAMILY_SPECS.values() for alias in spec.aliases}


def family_spec(family: str) -> FamilySpec:
    key = family.strip().lower().replace("-", "_")
    key = FAMILY_ALIASES.get(key, key)
    if key not in FAMILY_SPECS:
        raise KeyError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILY_SPECS[key]


def architectures() -> list[tuple[str, str, int]]:
    """Every (family, size, native size) the specs declare."""
    return [(f.name, s.name, n) for f in FAMILY_SPECS.values() for s in f.sizes.values() for n in s.native_sizes]


# -- the published checkpoints -------------------------------------------------------
@dataclass(frozen=True)
class KnownModel:
    """One published checkpoint.

    ``filename`` is None for Hugging Face ``-hf`` (transformers) repos: the checkpoint is
    then the whole folder (``config.json`` + ``model.safetensors``). ``layout`` tells the
    key naming: "original" (the authors' state dict) or "hf" (transformers' names).
    ``repo_type`` is "model" or "space" for the Hugging Face Hub, "url" for a file served
    elsewhere (then ``url`` is the direct link and ``repo_id`` names its project).
    """

    name: str
    family: str
    size: str
    repo_id: str
    filename: Optional[str]
    layout: str
    license: str
    native_size: int
    max_depth: Optional[float] = None
    display_name: str = ""
    repo_type: str = "model"
    url: Optional[str] = None

    @property
    def is_folder(self) -> bool:
        return self.filename is None

    @property
    def on_hub(self) -> bool:
        return self.repo_type in ("model", "space")

    @property
    def metric(self) -> bool:
        return self.max_depth is not None

    @property
    def page_url(self) -> str:
        """Human-facing page of the source (Hub repo, Space, or release page)."""
        if self.repo_type == "space":
            return f"https://huggingface.co/spaces/{self.repo_id}"
        if self.repo_type == "model":
            return f"https://huggingface.co/{self.repo_id}"
        if self.url and "/releases/download/" in self.url:
            return self.url.rsplit("/", 1)[0].replace("/releases/download/", "/releases/tag/")
        return f"https://github.com/{self.repo_id}"

    @property
    def file_url(self) -> str:
        """Direct link to the file (or to the repo's file list for a folder)."""
        if self.url:
            return self.url
        if self.is_folder:
            return f"{self.page_url}/tree/main"
        return f"{self.page_url}/resolve/main/{self.filename}"

    @property
    def local_name(self) -> str:
        """Name under which the checkpoint is looked for in the weights folder."""
        if self.filename:
            return Path(self.filename).name
        return self.repo_id.rsplit("/", 1)[-1]


def published() -> list[KnownModel]:
    """Every published checkpoint of the declared families, in the picker's order."""
    out: list[KnownModel] = []
    sizes = {"vits": "Small", "vitb": "Base", "vitl": "Large"}
    # Depth Anything V2 Small is Apache-2.0; Base and Large are CC-BY-NC-4.0 (the Giant
    # checkpoint was announced but never published, so it is not listed).
    lic = {"vits": "Apache-2.0", "vitb": "CC-BY-NC-4.0", "vitl": "CC-BY-NC-4.0"}
    da_native = FAMILY_SPECS["depth_anything_v2"].size("vits").native_sizes[0]   # 518 at every size

    for enc, word in sizes.items():
        low = word.lower()
        out.append(KnownModel(
            name=f"depth-anything-v2-{low}", family="depth_anything_v2", size=enc,
            repo_id=f"depth-anything/Depth-Anything-V2-{word}",
            filename=f"depth_anything_v2_{enc}.pth", layout="original", license=lic[enc],
            native_size=da_native, display_name=f"Depth Anything V2 {word}",
        ))
        out.append(KnownModel(
            name=f"depth-anything-v2-{low}-hf", family="depth_anything_v2", size=enc,
            repo_id=f"depth-anything/Depth-Anything-V2-{word}-hf",
            filename=None, layout="hf", license=lic[enc],
            native_size=da_native, display_name=f"Depth Anything V2 {word} (transformers)",
        ))
    for scene, hub_scene, hf_scene, max_depth in (
        ("hypersim", "Hypersim", "Indoor", 20.0),
        ("vkitti", "VKITTI", "Outdoor", 80.0),
    ):
        for enc, word in sizes.items():
            low = word.lower()
            out.append(KnownModel(
                name=f"depth-anything-v2-metric-{scene}-{low}",
                family="depth_anything_v2_metric", size=enc,
                repo_id=f"depth-anything/Depth-Anything-V2-Metric-{hub_scene}-{word}",
                filename=f"depth_anything_v2_metric_{scene}_{enc}.pth", layout="original",
                license=lic[enc], native_size=da_native, max_depth=max_depth,
                display_name=f"Depth Anything V2 Metric {hub_scene} {word} ({max_depth:g} m)",
            ))
            out.append(KnownModel(
                name=f"depth-anything-v2-metric-{hf_scene.lower()}-{low}-hf",
                family="depth_anything_v2_metric", size=enc,
                repo_id=f"depth-anything/Depth-Anything-V2-Metric-{hf_scene}-{word}-hf",
                filename=None, layout="hf", license=lic[enc], native_size=da_native,
                max_depth=max_depth,
                display_name=(f"Depth Anything V2 Metric {hf_scene} {word} "
                              f"({max_depth:g} m, transformers)"),
            ))
    # Depth Anything V1: the original checkpoints sit in the authors' demo Space.
    for enc, word in sizes.items():
        low = word.lower()
        out.append(KnownModel(
            name=f"depth-anything-v1-{low}", family="depth_anything_v1", size=enc,
            repo_id="LiheYoung/Depth-Anything", repo_type="space",
            filename=f"checkpoints/depth_anything_{enc}14.pth", layout="original",
            license="Apache-2.0", native_size=da_native, display_name=f"Depth Anything V1 {word}",
        ))
        out.append(KnownModel(
            name=f"depth-anything-v1-{low}-hf", family="depth_anything_v1", size=enc,
            repo_id=f"LiheYoung/depth-anything-{low}-hf", filename=None, layout="hf",
            license="Apache-2.0", native_size=da_native,
            display_name=f"Depth Anything V1 {word} (transformers)",
        ))
    # MiDaS 3.1: original files are GitHub release assets; Intel converted them for transformers.
    midas = (
        ("midas_beit", "beit_base", "dpt_beit_base_384", "dpt-beit-base-384", 384, "BEiT-Base 384"),
        ("midas_beit", "beit_large", "dpt_beit_large_384", "dpt-beit-large-384", 384, "BEiT-Large 384"),
        ("midas_beit", "beit_large", "dpt_beit_large_512", "dpt-beit-large-512", 512, "BEiT-Large 512"),
        ("midas_swin2", "swin2_tiny", "dpt_swin2_tiny_256", "dpt-swinv2-tiny-256", 256, "SwinV2-Tiny 256"),
        ("midas_swin2", "swin2_base", "dpt_swin2_base_384", "dpt-swinv2-base-384", 384, "SwinV2-Base 384"),
        ("midas_swin2", "swin2_large", "dpt_swin2_large_384", "dpt-swinv2-large-384", 384, "SwinV2-Large 384"),
    )
    for family, size, stem, intel, native, label in midas:
        short = stem.replace("_", "-")  # e.g. dpt-beit-base-384
        out.append(KnownModel(
            name=f"midas-{short}", family=family, size=size, repo_id="isl-org/MiDaS",
            repo_type="url", filename=f"{stem}.pt",
            url=f"https://github.com/isl-org/MiDaS/releases/download/v3_1/{stem}.pt",
            layout="original", license="MIT", native_size=native,
            display_name=f"MiDaS 3.1 {label}",
        ))
        out.append(KnownModel(
            name=f"midas-{short}-hf", family=family, size=size, repo_id=f"Intel/{intel}",
            filename=None, layout="hf", license="MIT", native_size=native,
            display_name=f"MiDaS 3.1 {label} (transformers)",
        ))
    return out
