"""MiDaS v3.1 SwinV2 checkpoints: the original .pt layout (`pretrained.model.*` timm
SwinV2 + `scratch.*`) and the Hugging Face -hf layout of `DPTForDepthEstimation` with a
Swinv2 backbone (`backbone.*`, `neck.*`, `head.head.*`, as in Intel/dpt-swinv2-tiny-256).

What the tensors say: widths, depths, heads (logit_scale is (heads, 1, 1)), MLP width,
patch size. The original .pt also stores the shifted blocks' `attn_mask` buffers,
(windows, w*w, w*w) for the native grid: they give the native window w and the native
input size; they are checked against the masks DPT Lab computes, then dropped.
What they cannot say: the *pretrained* window sizes that scale the continuous position
bias coordinates. MiDaS builds base/large on timm's `swinv2_*_window12to24_192to384`
(pretrained windows 12, 12, 12, 6) and tiny on `swinv2_tiny_window16_256` (none); the
original layout takes them from the width (128 / 192 -> 12,12,12,6; 96 -> none), the -hf
layout from config.json (`pretrained_window_sizes`, which Intel's conversion sets the
same way). -hf folders hold no masks: window and native size come from config.json.
"""

from __future__ import annotations

import math
import re

import torch

from ..decoder import DecoderConfig, DPTDecoder
from ..encoders.swin2 import (
    Swin2Config,
    Swin2Encoder,
    relative_coords_table,
    relative_position_index,
    window_layout,
    window_mask,
)
from ..families import FAMILY_SPECS, FamilySpec, SizeSpec
from ..model import DepthModel, ModelInfo
from .base import (
    CheckpointError,
    Layout,
    LoadHints,
    RawCheckpoint,
    assemble,
    check_complete,
    check_family,
    count_indexed,
    few,
    rename_keys,
    reverse_fusion,
    shift_one_based,
    unsupported_dpt_head,
)

FAMILY = "midas_swin2"
SPEC = FAMILY_SPECS[FAMILY]
SIZE_BY_WIDTH = SPEC.size_by_width()
# the official models, by embed width: (native window, native input, pretrained windows)
OFFICIAL = {s.width: (s.window, s.native_sizes[0], s.pretrained_windows) for s in SPEC.sizes.values()}
BLOCK_PARAMS = (
    "attn.logit_scale", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
    "attn.cpb_mlp.0.weight", "attn.cpb_mlp.0.bias", "attn.cpb_mlp.2.weight",
    "norm1.weight", "norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "norm2.weight", "norm2.bias",
)


FAMILIES = (FAMILY,)


def model_info(cfg: Swin2Config, dec: DecoderConfig, family: str = FAMILY, max_depth=None, notes=()) -> ModelInfo:
    heads = [h for h, d in zip(cfg.heads, cfg.depths) for _ in range(d)]
    return ModelInfo(
        family=FAMILY, size=SIZE_BY_WIDTH.get(cfg.embed_dim, f"swin2_{cfg.embed_dim}"), patch_size=cfg.patch_size,
        tile=cfg.tile, base_size=cfg.native_size, multiple=cfg.tile, resize_rule=SPEC.resize_rule,
        depth_resize=SPEC.depth_resize, mean=SPEC.mean, std=SPEC.std, num_blocks=sum(cfg.depths), num_heads=heads,
        tap_blocks=cfg.tap_blocks, has_cls=False, width=cfg.embed_dim, native_grid=(cfg.native_grid, cfg.native_grid),
        window_sizes=cfg.window_sizes, notes=list(notes),
    )


def network(cfg: Swin2Config, dec: DecoderConfig, info: ModelInfo) -> DepthModel:
    return DepthModel(Swin2Encoder(cfg), DPTDecoder(dec), info)


def architecture(spec: FamilySpec, size: SizeSpec, native: int) -> tuple[Swin2Config, DecoderConfig]:
    """The configs of a declared size, as build_original reads them from its checkpoint."""
    cfg = Swin2Config(embed_dim=size.width, depths=size.depth, heads=size.heads, window=size.window,
                      native_size=native, pretrained_windows=size.pretrained_windows, patch_size=size.patch,
                      mlp_ratio=size.hidden / size.width)
    channels = tuple(size.width * 2 ** i for i in range(4))
    dec = DecoderConfig(in_channels=channels, reassemble_channels=channels, features=size.features,
                        readout=spec.readout, reassemble=False, head_hidden=size.head_hidden)
    return cfg, dec


def build_swin2(cfg: Swin2Config, dec: DecoderConfig, state: dict, layout: str, notes: list[str]) -> DepthModel:
    info = model_info(cfg, dec, notes=notes)
    return assemble(lambda: network(cfg, dec, info), state, layout)


def stage_shapes(state: dict, block: str, stage_re: str, layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, heads) per stage; `block` formats (s, j) into a block's logit_scale key."""
    stages = count_indexed(state, stage_re)
    if stages == 0:
        raise CheckpointError(f"{layout}: no SwinV2 stages found")
    depths, heads = [], []
    for s in range(stages):
        rx = re.escape(block.format(s=s, j="@")).replace("@", r"(\d+)")
        depths.append(count_indexed(state, rx))
        if depths[-1] == 0:
            raise CheckpointError(f"{layout}: stage {s} has no blocks (missing keys {block.format(s=s, j=0)})")
        heads.append(int(state[block.format(s=s, j=0)].shape[0]))
    return tuple(depths), tuple(heads)


def check_against_config(cfg: Swin2Config, layout: str) -> None:
    if cfg.native_size % cfg.tile:
        raise CheckpointError(f"{layout}: native input {cfg.native_size} is not a multiple of {cfg.tile}")
    if len(cfg.pretrained_windows) != cfg.num_stages:
        raise CheckpointError(f"{layout}: {len(cfg.pretrained_windows)} pretrained window sizes for {cfg.num_stages} stages")


# -- original .pt ---------------------------------------------------------------------
ORIGINAL = "MiDaS 3.1 SwinV2 original (.pt)"
_OBLK = r"pretrained\.model\.layers\.(\d+)\.blocks\.(\d+)\."
ORIGINAL_RULES = [
    (r"pretrained\.model\.patch_embed\.(proj|norm)\.(weight|bias)", r"encoder.patch_embed.\1.\2"),
    (_OBLK + r"(attn\.(?:logit_scale|q_bias|v_bias|qkv\.weight|proj\.(?:weight|bias)"
             r"|cpb_mlp\.(?:0\.weight|0\.bias|2\.weight)))",
     r"encoder.stages.\1.blocks.\2.\3"),
    (_OBLK + r"((?:norm1|norm2|mlp\.fc1|mlp\.fc2)\.(?:weight|bias))", r"encoder.stages.\1.blocks.\2.\3"),
    (r"pretrained\.model\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
     r"encoder.stages.\1.downsample.\2"),
    (r"scratch\.layer(\d)_rn\.weight", r"decoder.layer_rn.\1.weight"),
    (r"scratch\.refinenet(\d)\.resConfUnit(\d)\.(conv\d)\.(weight|bias)", r"decoder.fusion.\1.rcu\2.\3.\4"),
    (r"scratch\.refinenet(\d)\.out_conv\.(weight|bias)", r"decoder.fusion.\1.out_conv.\2"),
    (r"scratch\.output_conv\.0\.(weight|bias)", r"decoder.head.conv1.\1"),
    (r"scratch\.output_conv\.2\.(weight|bias)", r"decoder.head.conv2.\1"),
    (r"scratch\.output_conv\.4\.(weight|bias)", r"decoder.head.conv3.\1"),
]
ORIGINAL_MASK = re.compile(_OBLK + r"attn_mask")
ORIGINAL_TABLE = re.compile(_OBLK + r"attn\.(relative_coords_table|relative_position_index)")
# The classifier (final norm, head) is not on DPT's path; the buffers are checked and
# recomputed by the encoder for every grid.
ORIGINAL_IGNORE = [
    r"pretrained\.model\.(norm|head)\.(weight|bias)",
    ORIGINAL_MASK.pattern,
    ORIGINAL_TABLE.pattern,
]


def original_keys(depths: tuple[int, ...]) -> list[str]:
    keys = [f"pretrained.model.patch_embed.{m}.{w}" for m in ("proj", "norm") for w in ("weight", "bias")]
    for s, depth in enumerate(depths):
        for j in range(depth):
            keys += [f"pretrained.model.layers.{s}.blocks.{j}.{p}" for p in BLOCK_PARAMS]
        if s < len(depths) - 1:
            keys += [f"pretrained.model.layers.{s}.downsample.{p}" for p in ("reduction.weight", "norm.weight", "norm.bias")]
    for i in range(1, 5):
        keys.append(f"scratch.layer{i}_rn.weight")
        keys += [f"scratch.refinenet{i}.{m}.{w}" for m in ("out_conv", "resConfUnit1.conv1", "resConfUnit1.conv2",
                                                           "resConfUnit2.conv1", "resConfUnit2.conv2")
                 for w in ("weight", "bias")]
    keys += [f"scratch.output_conv.{j}.{w}" for j in (0, 2, 4) for w in ("weight", "bias")]
    return keys


def native_from_masks(masks: dict, patch: int) -> tuple[int, int] | None:
    """(native window, native input size) from the attn_mask shapes, None without masks.
    A mask of stage s is (nW, w*w, w*w) with nW = (g_s / w)^2 on the native g_s grid."""
    found = set()
    for (s, j), mask in masks.items():
        if mask.ndim != 3 or mask.shape[1] != mask.shape[2]:
            raise CheckpointError(f"{ORIGINAL}: attn_mask of stage {s} block {j} has shape {tuple(mask.shape)}, "
                                  f"not (windows, w*w, w*w)")
        w, per_side = math.isqrt(mask.shape[1]), math.isqrt(mask.shape[0])
        if w * w != mask.shape[1] or per_side * per_side != mask.shape[0]:
            raise CheckpointError(f"{ORIGINAL}: attn_mask of stage {s} block {j} ({tuple(mask.shape)}) is not for "
                                  f"square windows on a square grid")
        found.add((w, w * per_side * 2 ** s * patch))
    if len(found) > 1:
        raise CheckpointError(f"{ORIGINAL}: the attn_mask buffers disagree on (window, native size): {sorted(found)}")
    return found.pop() if found else None


def check_original_buffers(s: dict, cfg: Swin2Config, masks: dict) -> None:
    """Every shifted block of the native grid has the original's mask, with its values;
    stored coordinate / index tables (older timm) equal the ones DPT Lab computes."""
    expected = {}
    for st, depth in enumerate(cfg.depths):
        window, shift = cfg.stage_window(st)
        for j in range(1, depth, 2):
            if shift:
                expected[(st, j)] = (window, shift, cfg.native_grid // 2 ** st)
    if set(masks) != set(expected):
        extra = sorted(set(masks) - set(expected))
        lacking = sorted(set(expected) - set(masks))
        detail = (f"missing keys {few(f'pretrained.model.layers.{a}.blocks.{b}.attn_mask' for a, b in lacking)}"
                  if lacking else f"attn_mask on blocks that do not shift {extra[:3]}")
        raise CheckpointError(f"{ORIGINAL}: shifted-window masks do not fit a {cfg.window}-window model at "
                              f"{cfg.native_size} px: {detail}")
    for (st, j), (window, shift, grid) in expected.items():
        ours = window_mask(window_layout((grid, grid), window, shift))
        if masks[(st, j)].shape != ours.shape or not torch.equal(masks[(st, j)].float(), ours):
            raise CheckpointError(f"{ORIGINAL}: pretrained.model.layers.{st}.blocks.{j}.attn_mask is not the "
                                  f"shifted-window mask of a {window}-window, shift-{shift} block on a {grid}x{grid} grid")
    for key, value in s.items():
        m = ORIGINAL_TABLE.fullmatch(key)
        if not m:
            continue
        st = int(m.group(1))
        window = cfg.stage_window(st)[0]
        if m.group(3) == "relative_position_index":
            ours = relative_position_index(window)
            ok = value.shape == ours.shape and torch.equal(value.long(), ours)
        else:
            ours = relative_coords_table(window, cfg.pretrained_windows[st])
            ok = value.numel() == ours.numel() and torch.allclose(value.float().reshape(-1, 2), ours, atol=1e-5)
        if not ok:
            raise CheckpointError(f"{ORIGINAL}: {key} does not match a {window}-window block "
                                  f"(pretrained window {cfg.pretrained_windows[st]})")


def build_original(ckpt: RawCheckpoint, hints: LoadHints) -> DepthModel:
    check_family(hints, FAMILY, ORIGINAL)
    s = ckpt.state
    depths, heads = stage_shapes(s, "pretrained.model.layers.{s}.blocks.{j}.attn.logit_scale",
                                 r"pretrained\.model\.layers\.(\d+)\.blocks\.0\.attn\.logit_scale", ORIGINAL)
    check_complete(s, original_keys(depths), ORIGINAL)
    proj = s["pretrained.model.patch_embed.proj.weight"]
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    notes: list[str] = []
    masks = {}
    for key, value in s.items():
        m = ORIGINAL_MASK.fullmatch(key)
        if m:
            masks[(int(m.group(1)), int(m.group(2)))] = value
    native = native_from_masks(masks, patch)
    official = OFFICIAL.get(width)
    if native is None:
        if official is None:
            raise CheckpointError(f"{ORIGINAL}: no attn_mask buffers to tell the native window, and embed width "
                                  f"{width} is not an official MiDaS SwinV2 size")
        native = official[:2]
        notes.append(f"no attn_mask buffers in the file: assumed the official window {native[0]} at {native[1]} px")
    if official is not None:
        pretrained = official[2][: len(depths)]
    else:
        pretrained = (0,) * len(depths)
        notes.append(f"embed width {width} is not an official size: assumed no pretrained window (coordinates / (w-1))")
    cfg = Swin2Config(
        embed_dim=width, depths=depths, heads=heads, window=native[0], native_size=native[1],
        pretrained_windows=tuple(pretrained), patch_size=patch,
        mlp_ratio=s["pretrained.model.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / width,
    )
    check_against_config(cfg, ORIGINAL)
    check_original_buffers(s, cfg, masks)
    dec = DecoderConfig(
        in_channels=tuple(width * 2 ** i for i in range(4)), reassemble_channels=tuple(width * 2 ** i for i in range(4)),
        features=s["scratch.layer1_rn.weight"].shape[0], readout="none", reassemble=False,
        head_hidden=s["scratch.output_conv.2.weight"].shape[0],
    )
    state = rename_keys(s, ORIGINAL_RULES, ORIGINAL_IGNORE, ORIGINAL)
    state = shift_one_based(state, ("decoder.layer_rn.", "decoder.fusion."))
    return build_swin2(cfg, dec, state, ORIGINAL, notes)


# -- Hugging Face -hf -----------------------------------------------------------------
HF = "MiDaS 3.1 SwinV2 Hugging Face (-hf folder)"
_HBLK = r"backbone\.encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_TO = r"encoder.stages.\1.blocks.\2."
HF_RULES = [
    (r"backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"encoder.patch_embed.proj.\1"),
    (r"backbone\.embeddings\.norm\.(weight|bias)", r"encoder.patch_embed.norm.\1"),
    (_HBLK + r"attention\.self\.logit_scale", _TO + "attn.logit_scale"),
    (_HBLK + r"attention\.self\.continuous_position_bias_mlp\.(0\.weight|0\.bias|2\.weight)", _TO + r"attn.cpb_mlp.\3"),
    (_HBLK + r"attention\.self\.(query|key|value)\.weight", r"qkv.\1.\2.\3"),
    (_HBLK + r"attention\.self\.query\.bias", _TO + "attn.q_bias"),
    (_HBLK + r"attention\.self\.value\.bias", _TO + "attn.v_bias"),
    (_HBLK + r"attention\.output\.dense\.(weight|bias)", _TO + r"attn.proj.\3"),
    (_HBLK + r"layernorm_before\.(weight|bias)", _TO + r"norm1.\3"),
    (_HBLK + r"layernorm_after\.(weight|bias)", _TO + r"norm2.\3"),
    (_HBLK + r"intermediate\.dense\.(weight|bias)", _TO + r"mlp.fc1.\3"),
    (_HBLK + r"output\.dense\.(weight|bias)", _TO + r"mlp.fc2.\3"),
    (r"backbone\.encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
     r"encoder.stages.\1.downsample.\2"),
    (r"neck\.convs\.(\d)\.weight", r"decoder.layer_rn.\1.weight"),
    (r"neck\.fusion_stage\.layers\.(\d)\.residual_layer(\d)\.convolution(\d)\.(weight|bias)", r"fusion.\1.rcu\2.conv\3.\4"),
    (r"neck\.fusion_stage\.layers\.(\d)\.projection\.(weight|bias)", r"fusion.\1.out_conv.\2"),
    (r"head\.head\.0\.(weight|bias)", r"decoder.head.conv1.\1"),
    (r"head\.head\.2\.(weight|bias)", r"decoder.head.conv2.\1"),
    (r"head\.head\.4\.(weight|bias)", r"decoder.head.conv3.\1"),
]
# transformers recomputes these non-persistent buffers; an older save may hold them
HF_IGNORE = [_HBLK + r"attention\.self\.(relative_coords_table|relative_position_index)"]
HF_BLOCK_PARAMS = (
    "attention.self.logit_scale", "attention.self.continuous_position_bias_mlp.0.weight",
    "attention.self.continuous_position_bias_mlp.0.bias", "attention.self.continuous_position_bias_mlp.2.weight",
    "attention.self.query.weight", "attention.self.query.bias", "attention.self.key.weight",
    "attention.self.value.weight", "attention.self.value.bias", "attention.output.dense.weight",
    "attention.output.dense.bias", "layernorm_before.weight", "layernorm_before.bias", "intermediate.dense.weight",
    "intermediate.dense.bias", "output.dense.weight", "output.dense.bias", "layernorm_after.weight", "layernorm_after.bias",
)


def hf_keys(depths: tuple[int, ...]) -> list[str]:
    keys = ["backbone.embeddings.patch_embeddings.projection.weight", "backbone.embeddings.patch_embeddings.projection.bias",
            "backbone.embeddings.norm.weight", "backbone.embeddings.norm.bias"]
    for s, depth in enumerate(depths):
        for j in range(depth):
            keys += [f"backbone.encoder.layers.{s}.blocks.{j}.{p}" for p in HF_BLOCK_PARAMS]
        if s < len(depths) - 1:
            keys += [f"backbone.encoder.layers.{s}.downsample.{p}" for p in ("reduction.weight", "norm.weight", "norm.bias")]
    for i in range(4):
        keys.append(f"neck.convs.{i}.weight")
        keys += [f"neck.fusion_stage.layers.{i}.{m}.{w}" for m in (
            "projection", "residual_layer1.convolution1", "residual_layer1.convolution2",
            "residual_layer2.convolution1", "residual_layer2.convolution2") for w in ("weight", "bias")]
    keys += [f"head.head.{j}.{w}" for j in (0, 2, 4) for w in ("weight", "bias")]
    return keys


def merge_swin_qkv(state: dict) -> dict:
    """-hf stores query / key / value weights apart; DPT Lab (like timm) uses one matrix.
    The biases map directly: query.bias -> q_bias, value.bias -> v_bias (the key has none)."""
    out, parts = {}, {}
    for key, value in state.items():
        if key.startswith("qkv."):
            _, stage, block, which = key.split(".")
            parts.setdefault((stage, block), {})[which] = value
        else:
            out[key] = value
    for (stage, block), p in parts.items():
        if set(p) != {"query", "key", "value"}:
            raise CheckpointError(f"{HF}: stage {stage} block {block} lacks one of query/key/value")
        shapes = {w: tuple(t.shape) for w, t in p.items()}
        if len(set(shapes.values())) != 1:
            raise CheckpointError(f"{HF}: shape mismatch in stage {stage} block {block} attention: "
                                  + ", ".join(f"{w} {shp}" for w, shp in shapes.items()))
        out[f"encoder.stages.{stage}.blocks.{block}.attn.qkv.weight"] = torch.cat([p["query"], p["key"], p["value"]], dim=0)
    return out


def check_hf_config(config: dict, backbone: dict, stages: int) -> None:
    """Settings of DPTConfig / Swinv2Config that MiDaS SwinV2 never uses and DPT Lab does not model."""
    unsupported = []
    if backbone.get("model_type", "swinv2") != "swinv2":
        unsupported.append(f"backbone model_type={backbone['model_type']!r}")
    if config.get("is_hybrid"):
        unsupported.append("is_hybrid=true")
    unsupported += unsupported_dpt_head(config)
    if backbone.get("use_absolute_embeddings"):
        unsupported.append("use_absolute_embeddings=true")
    if backbone.get("hidden_act", "gelu") != "gelu":
        unsupported.append(f"backbone hidden_act={backbone['hidden_act']!r}")
    out = backbone.get("out_indices")
    if not out and backbone.get("out_features"):
        out = [int(m.group(1)) if (m := re.fullmatch(r"stage(\d+)", f)) else -1 for f in backbone["out_features"]]
    if out and list(out) != list(range(1, stages + 1)):
        unsupported.append(f"out_indices={list(out)} (DPT taps every stage)")
    if stages != 4:
        unsupported.append(f"{stages} stages (DPT needs 4)")
    if unsupported:
        raise CheckpointError(f"{HF}: unsupported config.json settings: {', '.join(unsupported)}")


def build_hf(ckpt: RawCheckpoint, hints: LoadHints) -> DepthModel:
    check_family(hints, FAMILY, HF)
    s, config = ckpt.state, ckpt.config or {}
    backbone = config.get("backbone_config") or {}
    depths, heads = stage_shapes(s, "backbone.encoder.layers.{s}.blocks.{j}.attention.self.logit_scale",
                                 r"backbone\.encoder\.layers\.(\d+)\.blocks\.0\.attention\.self\.logit_scale", HF)
    check_hf_config(config, backbone, len(depths))
    check_complete(s, hf_keys(depths), HF)
    proj = s["backbone.embeddings.patch_embeddings.projection.weight"]
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    said = {"depths": backbone.get("depths"), "num_heads": backbone.get("num_heads"), "embed_dim": backbone.get("embed_dim")}
    found = {"depths": list(depths), "num_heads": list(heads), "embed_dim": width}
    for name, value in said.items():
        if value is not None and (list(value) if isinstance(value, (list, tuple)) else value) != found[name]:
            raise CheckpointError(f"{HF}: config.json says {name}={value}, the tensors hold {found[name]}")
    # transformers' Swinv2Config defaults where config.json is silent
    size = backbone.get("image_size", 224)
    hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if int(hw[0]) != int(hw[1]):
        raise CheckpointError(f"{HF}: non-square native image_size {size} is not supported")
    pretrained = tuple(int(p) for p in backbone.get("pretrained_window_sizes") or (0,) * len(depths))
    cfg = Swin2Config(
        embed_dim=width, depths=depths, heads=heads, window=int(backbone.get("window_size", 7)),
        native_size=int(hw[0]), pretrained_windows=pretrained, patch_size=patch,
        mlp_ratio=s["backbone.encoder.layers.0.blocks.0.intermediate.dense.weight"].shape[0] / width,
        eps=float(backbone.get("layer_norm_eps", 1e-5)),
    )
    check_against_config(cfg, HF)
    dec = DecoderConfig(
        in_channels=tuple(width * 2 ** i for i in range(4)), reassemble_channels=tuple(width * 2 ** i for i in range(4)),
        features=s["neck.convs.0.weight"].shape[0], readout="none", reassemble=False,
        head_hidden=s["head.head.2.weight"].shape[0],
    )
    state = reverse_fusion(merge_swin_qkv(rename_keys(s, HF_RULES, HF_IGNORE, HF)))
    notes = []
    if width in OFFICIAL and (cfg.window, cfg.native_size, cfg.pretrained_windows) != OFFICIAL[width]:
        notes.append(f"config.json sets window {cfg.window}, image_size {cfg.native_size}, pretrained windows "
                     f"{list(cfg.pretrained_windows)}; the official MiDaS model of this width uses {OFFICIAL[width]}")
    model = build_swin2(cfg, dec, state, HF, notes)
    model.info.layout = "hf"
    return model


LAYOUTS = [
    Layout(ORIGINAL, ("pretrained.model.layers.0.blocks.0.attn.cpb_mlp.0.weight", "scratch.layer1_rn.weight"),
           build_original),
    Layout(HF, ("backbone.encoder.layers.0.blocks.0.attention.self.continuous_position_bias_mlp.0.weight",
                "neck.convs.0.weight"), build_hf),
]
