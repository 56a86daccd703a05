"""Depth-Anything v1 / v2 / v2-metric checkpoints: the original .pth layout
(`pretrained.*` DINOv2 + `depth_head.*`) and the Hugging Face -hf layout
(`backbone.*`, `neck.*`, `head.*` with config.json)."""

from __future__ import annotations

import re

from ..decoder import DecoderConfig, DPTDecoder
from ..encoders.dinov2 import DinoV2Config, DinoV2Encoder, pos_grid_from_table, tap_blocks
from ..families import FAMILY_SPECS, FamilySpec, SizeSpec
from ..model import DepthModel, ModelInfo
from .base import (
    CheckpointError,
    Layout,
    LoadHints,
    RawCheckpoint,
    assemble,
    count_indexed,
    merge_qkv,
    rename_keys,
    require,
    reverse_fusion,
    shift_one_based,
)

SIZE_BY_WIDTH = FAMILY_SPECS["depth_anything_v2"].size_by_width()   # every size v1 / metric have too
BASE_SIZE = FAMILY_SPECS["depth_anything_v2"].size("vits").native_sizes[0]   # 518: the same at every size
METRIC_DATASETS = {"hypersim": 20.0, "vkitti": 80.0, "indoor": 20.0, "outdoor": 80.0}


def family_from_name(name: str) -> tuple[str | None, float | None]:
    """What the official file names say: depth_anything_vits14.pth is v1,
    depth_anything_v2_*.pth is v2, ..._metric_hypersim_/vkitti_ are metric (20 m / 80 m)."""
    if "metric" in name:
        for dataset, max_depth in METRIC_DATASETS.items():
            if dataset in name:
                return "depth_anything_v2_metric", max_depth
        return "depth_anything_v2_metric", None
    if "depth_anything_v2" in name or "depth-anything-v2" in name:
        return "depth_anything_v2", None
    if re.search(r"depth[_-]anything[_-]vit[sblg]14", name) or "depth-anything-small" in name:
        return "depth_anything_v1", None
    return None, None


def resolve_family(hints: LoadHints, named: str | None, named_max: float | None, fallback: str, notes: list[str]):
    family = hints.family or named
    if family is None:
        family = fallback
        notes.append(f"v1/v2 cannot be told from the tensors or the file name; assumed {fallback} "
                     "(pass family= to override)")
    if not family.startswith("depth_anything"):
        raise CheckpointError(f"family {family!r} was asked for, but the file has the Depth-Anything layout")
    max_depth = None
    if family == "depth_anything_v2_metric":
        max_depth = hints.max_depth or named_max
        if max_depth is None:
            max_depth = FAMILY_SPECS[family].max_depth
            notes.append("metric max_depth is not stored in the checkpoint; assumed 20 m (hypersim); pass max_depth=")
    return family, max_depth


FAMILIES = ("depth_anything_v1", "depth_anything_v2", "depth_anything_v2_metric")   # the ones this module loads


def model_info(cfg: DinoV2Config, dec: DecoderConfig, family: str, max_depth=None, notes=()) -> ModelInfo:
    spec = FAMILY_SPECS[family]
    return ModelInfo(
        family=family, size=SIZE_BY_WIDTH.get(cfg.width, f"vit{cfg.width}"), patch_size=cfg.patch_size,
        tile=cfg.patch_size, base_size=BASE_SIZE, multiple=cfg.patch_size, resize_rule=spec.resize_rule,
        depth_resize=spec.depth_resize, mean=spec.mean, std=spec.std, num_blocks=cfg.depth,
        num_heads=[cfg.heads] * cfg.depth,
        tap_blocks=cfg.taps, has_cls=True, metric=dec.metric, max_depth=max_depth, width=cfg.width,
        native_grid=(cfg.pos_grid, cfg.pos_grid), notes=list(notes),
    )


def network(cfg: DinoV2Config, dec: DecoderConfig, info: ModelInfo) -> DepthModel:
    return DepthModel(DinoV2Encoder(cfg), DPTDecoder(dec), info)


def architecture(spec: FamilySpec, size: SizeSpec, native: int) -> tuple[DinoV2Config, DecoderConfig]:
    """The configs of a declared size, as build_original reads them from its checkpoint."""
    cfg = DinoV2Config(width=size.width, depth=size.depth, heads=size.heads, mlp_hidden=size.hidden,
                       swiglu=size.swiglu, taps=tap_blocks(size.depth, spec.tap_version), patch_size=size.patch,
                       pos_grid=native // size.patch)
    dec = DecoderConfig(in_channels=(size.width,) * 4, reassemble_channels=size.reassemble, features=size.features,
                        readout=spec.readout, head_hidden=size.head_hidden, metric=spec.metric,
                        max_depth=spec.max_depth or 1.0)
    return cfg, dec


def build_depth_anything(cfg: DinoV2Config, dec: DecoderConfig, family: str, max_depth, state, layout: str,
                         notes) -> DepthModel:
    info = model_info(cfg, dec, family, max_depth, notes)
    return assemble(lambda: network(cfg, dec, info), state, layout)


def heads_for_width(width: int) -> int:
    """DINOv2 uses 64-dimensional heads at every size (ViT-S 6, B 12, L 16, G 24)."""
    return max(width // 64, 1)


# -- original .pth --------------------------------------------------------------------
ORIGINAL = "Depth-Anything original (.pth)"
ORIGINAL_RULES = [
    (r"pretrained\.patch_embed\.proj\.(weight|bias)", r"encoder.patch_embed.\1"),
    (r"pretrained\.(cls_token|pos_embed)", r"encoder.\1"),
    (r"pretrained\.blocks\.(\d+)\.ls([12])\.gamma", r"encoder.blocks.\1.ls\2"),
    (r"pretrained\.blocks\.(\d+)\.(.*)", r"encoder.blocks.\1.\2"),
    (r"pretrained\.norm\.(weight|bias)", r"encoder.norm.\1"),
    (r"depth_head\.projects\.(\d)\.(weight|bias)", r"decoder.reassemble.\1.project.\2"),
    (r"depth_head\.resize_layers\.(\d)\.(weight|bias)", r"decoder.reassemble.\1.resize.\2"),
    (r"depth_head\.readout_projects\.(\d)\.0\.(weight|bias)", r"decoder.reassemble.\1.readout_proj.\2"),
    (r"depth_head\.scratch\.layer(\d)_rn\.weight", r"decoder.layer_rn.\1.weight"),
    (r"depth_head\.scratch\.refinenet(\d)\.resConfUnit(\d)\.(conv\d)\.(weight|bias)", r"decoder.fusion.\1.rcu\2.\3.\4"),
    (r"depth_head\.scratch\.refinenet(\d)\.out_conv\.(weight|bias)", r"decoder.fusion.\1.out_conv.\2"),
    (r"depth_head\.scratch\.output_conv1\.(weight|bias)", r"decoder.head.conv1.\1"),
    (r"depth_head\.scratch\.output_conv2\.0\.(weight|bias)", r"decoder.head.conv2.\1"),
    (r"depth_head\.scratch\.output_conv2\.2\.(weight|bias)", r"decoder.head.conv3.\1"),
]
ORIGINAL_IGNORE = [r"pretrained\.mask_token", r"pretrained\.register_tokens"]


def build_original(ckpt: RawCheckpoint, hints: LoadHints) -> DepthModel:
    s = ckpt.state
    width = require(s, "pretrained.cls_token", ORIGINAL).shape[-1]
    depth = count_indexed(s, r"pretrained\.blocks\.(\d+)\.norm1\.weight")
    patch = require(s, "pretrained.patch_embed.proj.weight", ORIGINAL).shape[-1]
    swiglu = "pretrained.blocks.0.mlp.w12.weight" in s
    hidden = (s["pretrained.blocks.0.mlp.w12.weight"].shape[0] // 2 if swiglu
              else require(s, "pretrained.blocks.0.mlp.fc1.weight", ORIGINAL).shape[0])
    notes: list[str] = []
    named, named_max = family_from_name(ckpt.name)
    family, max_depth = resolve_family(hints, named, named_max, "depth_anything_v2", notes)
    cfg = DinoV2Config(
        width=width, depth=depth, heads=heads_for_width(width), mlp_hidden=hidden, swiglu=swiglu,
        taps=tap_blocks(depth, 1 if family == "depth_anything_v1" else 2), patch_size=patch,
        pos_grid=pos_grid_from_table(require(s, "pretrained.pos_embed", ORIGINAL).shape[1]),
    )
    dec = DecoderConfig(
        in_channels=(width,) * 4,
        reassemble_channels=tuple(require(s, f"depth_head.projects.{i}.weight", ORIGINAL).shape[0] for i in range(4)),
        features=require(s, "depth_head.scratch.layer1_rn.weight", ORIGINAL).shape[0],
        readout="project" if "depth_head.readout_projects.0.0.weight" in s else "ignore",
        head_hidden=require(s, "depth_head.scratch.output_conv2.0.weight", ORIGINAL).shape[0],
        metric=max_depth is not None, max_depth=max_depth or 1.0,
    )
    state = rename_keys(s, ORIGINAL_RULES, ORIGINAL_IGNORE, ORIGINAL)
    state = shift_one_based(state, ("decoder.layer_rn.", "decoder.fusion."))
    return build_depth_anything(cfg, dec, family, max_depth, state, ORIGINAL, notes)


# -- Hugging Face -hf -----------------------------------------------------------------
HF = "Depth-Anything Hugging Face (-hf folder)"
HF_RULES = [
    (r"backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"encoder.patch_embed.\1"),
    (r"backbone\.embeddings\.cls_token", r"encoder.cls_token"),
    (r"backbone\.embeddings\.position_embeddings", r"encoder.pos_embed"),
    (r"backbone\.encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.blocks.\1.norm\2.\3"),
    (r"backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", r"qkv.\1.\2.\3"),
    (r"backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"encoder.blocks.\1.attn.proj.\2"),
    (r"backbone\.encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"encoder.blocks.\1.ls\2"),
    (r"backbone\.encoder\.layer\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.blocks.\1.mlp.\2.\3"),
    (r"backbone\.encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)", r"encoder.blocks.\1.mlp.w12.\2"),
    (r"backbone\.encoder\.layer\.(\d+)\.mlp\.weights_out\.(weight|bias)", r"encoder.blocks.\1.mlp.w3.\2"),
    (r"backbone\.layernorm\.(weight|bias)", r"encoder.norm.\1"),
    (r"neck\.reassemble_stage\.layers\.(\d)\.projection\.(weight|bias)", r"decoder.reassemble.\1.project.\2"),
    (r"neck\.reassemble_stage\.layers\.(\d)\.resize\.(weight|bias)", r"decoder.reassemble.\1.resize.\2"),
    (r"neck\.convs\.(\d)\.weight", r"decoder.layer_rn.\1.weight"),
    (r"neck\.fusion_stage\.layers\.(\d)\.residual_layer(\d)\.convolution(\d)\.(weight|bias)", r"fusion.\1.rcu\2.conv\3.\4"),
    (r"neck\.fusion_stage\.layers\.(\d)\.projection\.(weight|bias)", r"fusion.\1.out_conv.\2"),
    (r"head\.conv([123])\.(weight|bias)", r"decoder.head.conv\1.\2"),
]
HF_IGNORE = [r"backbone\.embeddings\.mask_token", r"backbone\.embeddings\.register_tokens"]


def build_hf(ckpt: RawCheckpoint, hints: LoadHints) -> DepthModel:
    s, config = ckpt.state, ckpt.config or {}
    backbone = config.get("backbone_config") or {}
    width = require(s, "backbone.embeddings.cls_token", HF).shape[-1]
    depth = count_indexed(s, r"backbone\.encoder\.layer\.(\d+)\.norm1\.weight")
    patch = require(s, "backbone.embeddings.patch_embeddings.projection.weight", HF).shape[-1]
    swiglu = "backbone.encoder.layer.0.mlp.weights_in.weight" in s
    hidden = (s["backbone.encoder.layer.0.mlp.weights_in.weight"].shape[0] // 2 if swiglu
              else require(s, "backbone.encoder.layer.0.mlp.fc1.weight", HF).shape[0])
    heads = int(backbone.get("num_attention_heads") or heads_for_width(width))
    out_indices = backbone.get("out_indices")
    if out_indices:
        taps = tuple(int(i) - 1 for i in out_indices)   # hidden_states[0] is the embedding
    else:
        taps = tap_blocks(depth, 2)
    notes: list[str] = []
    named = "depth_anything_v1" if taps == tuple(range(depth - 4, depth)) else "depth_anything_v2"
    named_max = None
    if config.get("depth_estimation_type") == "metric":
        named, named_max = "depth_anything_v2_metric", float(config.get("max_depth") or 20.0)
    family, max_depth = resolve_family(hints, named, named_max, "depth_anything_v2", notes)
    if hints.family in ("depth_anything_v1", "depth_anything_v2") and hints.family != named:
        taps = tap_blocks(depth, 1 if family == "depth_anything_v1" else 2)   # explicit family wins
    cfg = DinoV2Config(
        width=width, depth=depth, heads=heads, mlp_hidden=hidden, swiglu=swiglu, taps=taps, patch_size=patch,
        pos_grid=pos_grid_from_table(require(s, "backbone.embeddings.position_embeddings", HF).shape[1]),
    )
    dec = DecoderConfig(
        in_channels=(width,) * 4,
        reassemble_channels=tuple(require(s, f"neck.reassemble_stage.layers.{i}.projection.weight", HF).shape[0]
                                  for i in range(4)),
        features=require(s, "neck.convs.0.weight", HF).shape[0], readout="ignore",
        head_hidden=require(s, "head.conv2.weight", HF).shape[0],
        metric=max_depth is not None, max_depth=max_depth or 1.0,
    )
    state = reverse_fusion(merge_qkv(rename_keys(s, HF_RULES, HF_IGNORE, HF), HF))
    model = build_depth_anything(cfg, dec, family, max_depth, state, HF, notes)
    model.info.layout = "hf"
    return model


LAYOUTS = [
    Layout(ORIGINAL, ("pretrained.blocks.0.attn.qkv.weight", "depth_head.scratch.layer1_rn.weight"), build_original),
    Layout(HF, ("backbone.embeddings.position_embeddings", "head.conv1.weight",
                "neck.reassemble_stage.layers.0.projection.weight"), build_hf),
]
