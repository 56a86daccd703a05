"""MiDaS v3.1 BEiT checkpoints: the original .pt layout (`pretrained.model.*` timm BEiT,
`pretrained.act_postprocess*`, `scratch.*`) and the Hugging Face -hf layout of
`DPTForDepthEstimation` with a BEiT backbone (`backbone.*`, `neck.*`, `head.head.*`, as in
Intel/dpt-beit-base-384 and Intel/dpt-beit-large-512).

Both hold the same numbers under different names; the -hf folders differ in three ways
that matter here: query/key/value are stored apart (the key has no bias), the fusion
stage is numbered coarse to fine, and config.json carries BeitConfig's default
layer_norm_eps of 1e-12 where timm's BEiT uses 1e-6 (the -hf eps is kept, so an -hf
folder computes what transformers computes; the difference is far below 1e-6 relative).
"""

from __future__ import annotations

import re

import torch

from ..decoder import DecoderConfig, DPTDecoder
from ..encoders.beit import BeitConfig, BeitEncoder, midas_taps, relative_position_index, window_from_table
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
    merge_qkv,
    rename_keys,
    reverse_fusion,
    shift_one_based,
    unsupported_dpt_head,
)

FAMILY = "midas_beit"
SPEC = FAMILY_SPECS[FAMILY]
SIZE_BY_WIDTH = SPEC.size_by_width()


def check_index_buffers(state: dict, pattern: str, window: tuple[int, int], layout: str) -> None:
    """The checkpoint's relative_position_index buffers must be the standard BEiT index for
    the native window (DPT Lab computes its own for every grid and drops them)."""
    rx = re.compile(pattern)
    expected = None
    for key, value in state.items():
        if rx.fullmatch(key):
            if expected is None:
                expected = relative_position_index(window)
            if tuple(value.shape) != tuple(expected.shape) or not torch.equal(value.long(), expected):
                raise CheckpointError(
                    f"{layout}: {key} is not the BEiT relative position index of a {window[0]}x{window[1]} window"
                )


FAMILIES = (FAMILY,)


def model_info(cfg: BeitConfig, dec: DecoderConfig, family: str = FAMILY, max_depth=None, notes=()) -> ModelInfo:
    return ModelInfo(
        family=FAMILY, size=SIZE_BY_WIDTH.get(cfg.width, f"beit{cfg.width}"), patch_size=cfg.patch_size,
        tile=cfg.patch_size, base_size=cfg.window[0] * cfg.patch_size, multiple=SPEC.multiple,
        resize_rule=SPEC.resize_rule, depth_resize=SPEC.depth_resize, mean=SPEC.mean, std=SPEC.std, num_blocks=cfg.depth,
        num_heads=[cfg.heads] * cfg.depth, tap_blocks=cfg.taps, has_cls=True, width=cfg.width,
        native_grid=tuple(cfg.window), notes=list(notes),
    )


def network(cfg: BeitConfig, dec: DecoderConfig, info: ModelInfo) -> DepthModel:
    return DepthModel(BeitEncoder(cfg), DPTDecoder(dec), info)


def architecture(spec: FamilySpec, size: SizeSpec, native: int) -> tuple[BeitConfig, DecoderConfig]:
    """The configs of a declared size, as build_original reads them from its checkpoint."""
    window = native // size.patch
    cfg = BeitConfig(width=size.width, depth=size.depth, heads=size.heads, mlp_hidden=size.hidden,
                     taps=midas_taps(size.depth), window=(window, window), patch_size=size.patch)
    dec = DecoderConfig(in_channels=(size.width,) * 4, reassemble_channels=size.reassemble, features=size.features,
                        readout=spec.readout, head_hidden=size.head_hidden)
    return cfg, dec


def build_beit(cfg: BeitConfig, dec: DecoderConfig, state: dict, layout: str, notes: list[str]) -> DepthModel:
    info = model_info(cfg, dec, notes=notes)
    return assemble(lambda: network(cfg, dec, info), state, layout)


# -- original .pt ---------------------------------------------------------------------
ORIGINAL = "MiDaS 3.1 BEiT original (.pt)"
ORIGINAL_RULES = [
    (r"pretrained\.model\.patch_embed\.proj\.(weight|bias)", r"encoder.patch_embed.\1"),
    (r"pretrained\.model\.cls_token", r"encoder.cls_token"),
    (r"pretrained\.model\.blocks\.(\d+)\.(.*)", r"encoder.blocks.\1.\2"),
    (r"pretrained\.act_postprocess(\d)\.0\.project\.0\.(weight|bias)", r"decoder.reassemble.\1.readout_proj.\2"),
    (r"pretrained\.act_postprocess(\d)\.3\.(weight|bias)", r"decoder.reassemble.\1.project.\2"),
    (r"pretrained\.act_postprocess(\d)\.4\.(weight|bias)", r"decoder.reassemble.\1.resize.\2"),
    (r"scratch\.layer(\d)_rn\.weight", r"decoder.layer_rn.\1.weight"),
    (r"scratch\.refinenet(\d)\.resConfUnit(\d)\.(conv\d)\.(weight|bias)", r"decoder.fusion.\1.rcu\2.\3.\4"),
    (r"scratch\.refinenet(\d)\.out_conv\.(weight|bias)", r"decoder.fusion.\1.out_conv.\2"),
    (r"scratch\.output_conv\.0\.(weight|bias)", r"decoder.head.conv1.\1"),
    (r"scratch\.output_conv\.2\.(weight|bias)", r"decoder.head.conv2.\1"),
    (r"scratch\.output_conv\.4\.(weight|bias)", r"decoder.head.conv3.\1"),
]
# The ImageNet classifier (fc_norm, head) is never used by DPT; the index buffers are
# checked, then recomputed per grid by the encoder.
ORIGINAL_IGNORE = [
    r"pretrained\.model\.(fc_norm|head|norm)\.(weight|bias)",
    r"pretrained\.model\.blocks\.\d+\.attn\.relative_position_index",
]
ORIGINAL_INDEX = r"pretrained\.model\.blocks\.\d+\.attn\.relative_position_index"


def original_keys(depth: int) -> list[str]:
    keys = ["pretrained.model.cls_token", "pretrained.model.patch_embed.proj.weight",
            "pretrained.model.patch_embed.proj.bias"]
    for i in range(depth):
        b = f"pretrained.model.blocks.{i}."
        keys += [b + k for k in (
            "gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
            "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.relative_position_bias_table",
            "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        )]
    for i in range(1, 5):
        a = f"pretrained.act_postprocess{i}."
        parts = ("0.project.0", "3") + (("4",) if i != 3 else ())
        keys += [f"{a}{p}.{w}" for p in parts for w in ("weight", "bias")]
        keys.append(f"scratch.layer{i}_rn.weight")
        r = f"scratch.refinenet{i}."
        keys += [f"{r}{m}.{w}" for m in ("out_conv", "resConfUnit1.conv1", "resConfUnit1.conv2",
                                         "resConfUnit2.conv1", "resConfUnit2.conv2") for w in ("weight", "bias")]
    keys += [f"scratch.output_conv.{j}.{w}" for j in (0, 2, 4) for w in ("weight", "bias")]
    return keys


def build_original(ckpt: RawCheckpoint, hints: LoadHints) -> DepthModel:
    check_family(hints, FAMILY, ORIGINAL)
    s = ckpt.state
    depth = count_indexed(s, r"pretrained\.model\.blocks\.(\d+)\.norm1\.weight")
    check_complete(s, original_keys(depth), ORIGINAL)
    width = s["pretrained.model.cls_token"].shape[-1]
    table = s["pretrained.model.blocks.0.attn.relative_position_bias_table"]
    try:
        window = window_from_table(table.shape[0])
    except ValueError as exc:
        raise CheckpointError(f"{ORIGINAL}: {exc}") from None
    check_index_buffers(s, ORIGINAL_INDEX, window, ORIGINAL)
    cfg = BeitConfig(
        width=width, depth=depth, heads=table.shape[1], mlp_hidden=s["pretrained.model.blocks.0.mlp.fc1.weight"].shape[0],
        taps=midas_taps(depth), window=window, patch_size=s["pretrained.model.patch_embed.proj.weight"].shape[-1],
    )
    dec = DecoderConfig(
        in_channels=(width,) * 4,
        reassemble_channels=tuple(s[f"pretrained.act_postprocess{i}.3.weight"].shape[0] for i in range(1, 5)),
        features=s["scratch.layer1_rn.weight"].shape[0], readout="project",
        head_hidden=s["scratch.output_conv.2.weight"].shape[0],
    )
    state = rename_keys(s, ORIGINAL_RULES, ORIGINAL_IGNORE, ORIGINAL)
    state = shift_one_based(state, ("decoder.reassemble.", "decoder.layer_rn.", "decoder.fusion."))
    return build_beit(cfg, dec, state, ORIGINAL, [])


# -- Hugging Face -hf -----------------------------------------------------------------
HF = "MiDaS 3.1 BEiT Hugging Face (-hf folder)"
_LAYER = r"backbone\.encoder\.layer\.(\d+)\."
HF_RULES = [
    (r"backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"encoder.patch_embed.\1"),
    (r"backbone\.embeddings\.cls_token", r"encoder.cls_token"),
    (_LAYER + r"layernorm_before\.(weight|bias)", r"encoder.blocks.\1.norm1.\2"),
    (_LAYER + r"layernorm_after\.(weight|bias)", r"encoder.blocks.\1.norm2.\2"),
    (_LAYER + r"lambda_([12])", r"encoder.blocks.\1.gamma_\2"),
    (_LAYER + r"attention\.attention\.(query|key|value)\.weight", r"qkv.\1.\2.weight"),
    (_LAYER + r"attention\.attention\.query\.bias", r"encoder.blocks.\1.attn.q_bias"),
    (_LAYER + r"attention\.attention\.value\.bias", r"encoder.blocks.\1.attn.v_bias"),
    (_LAYER + r"attention\.attention\.relative_position_bias\.relative_position_bias_table",
     r"encoder.blocks.\1.attn.relative_position_bias_table"),
    (_LAYER + r"attention\.output\.dense\.(weight|bias)", r"encoder.blocks.\1.attn.proj.\2"),
    (_LAYER + r"intermediate\.dense\.(weight|bias)", r"encoder.blocks.\1.mlp.fc1.\2"),
    (_LAYER + r"output\.dense\.(weight|bias)", r"encoder.blocks.\1.mlp.fc2.\2"),
    (r"neck\.reassemble_stage\.readout_projects\.(\d)\.0\.(weight|bias)", r"decoder.reassemble.\1.readout_proj.\2"),
    (r"neck\.reassemble_stage\.layers\.(\d)\.projection\.(weight|bias)", r"decoder.reassemble.\1.project.\2"),
    (r"neck\.reassemble_stage\.layers\.(\d)\.resize\.(weight|bias)", r"decoder.reassemble.\1.resize.\2"),
    (r"neck\.convs\.(\d)\.weight", r"decoder.layer_rn.\1.weight"),
    (r"neck\.fusion_stage\.layers\.(\d)\.residual_layer(\d)\.convolution(\d)\.(weight|bias)", r"fusion.\1.rcu\2.conv\3.\4"),
    (r"neck\.fusion_stage\.layers\.(\d)\.projection\.(weight|bias)", r"fusion.\1.out_conv.\2"),
    (r"head\.head\.0\.(weight|bias)", r"decoder.head.conv1.\1"),
    (r"head\.head\.2\.(weight|bias)", r"decoder.head.conv2.\1"),
    (r"head\.head\.4\.(weight|bias)", r"decoder.head.conv3.\1"),
]
# BeitModel's final layernorm / pooler (present only with use_mean_pooling=False) are not
# on DPT's path; older transformers saved the index buffer, which is checked then dropped.
HF_INDEX = _LAYER.replace(r"(\d+)", r"\d+") + r"attention\.attention\.relative_position_bias\.relative_position_index"
HF_IGNORE = [r"backbone\.(layernorm|pooler\.layernorm|fc_norm)\.(weight|bias)", HF_INDEX]


def hf_keys(depth: int) -> list[str]:
    keys = ["backbone.embeddings.cls_token", "backbone.embeddings.patch_embeddings.projection.weight",
            "backbone.embeddings.patch_embeddings.projection.bias"]
    for i in range(depth):
        b = f"backbone.encoder.layer.{i}."
        keys += [b + k for k in (
            "lambda_1", "lambda_2", "layernorm_before.weight", "layernorm_before.bias",
            "layernorm_after.weight", "layernorm_after.bias",
            "attention.attention.query.weight", "attention.attention.query.bias", "attention.attention.key.weight",
            "attention.attention.value.weight", "attention.attention.value.bias",
            "attention.attention.relative_position_bias.relative_position_bias_table",
            "attention.output.dense.weight", "attention.output.dense.bias",
            "intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias",
        )]
    for i in range(4):
        r = "neck.reassemble_stage."
        parts = [f"readout_projects.{i}.0", f"layers.{i}.projection"] + ([f"layers.{i}.resize"] if i != 2 else [])
        keys += [f"{r}{p}.{w}" for p in parts for w in ("weight", "bias")]
        keys.append(f"neck.convs.{i}.weight")
        f = f"neck.fusion_stage.layers.{i}."
        keys += [f"{f}{m}.{w}" for m in ("projection", "residual_layer1.convolution1", "residual_layer1.convolution2",
                                         "residual_layer2.convolution1", "residual_layer2.convolution2")
                 for w in ("weight", "bias")]
    keys += [f"head.head.{j}.{w}" for j in (0, 2, 4) for w in ("weight", "bias")]
    return keys


def hf_taps(backbone: dict, depth: int) -> tuple[int, ...]:
    """Tapped blocks from config.json: out_indices (or out_features "stageK") count the
    embedding as stage 0, so stage K is the output of block K-1."""
    stages = backbone.get("out_indices")
    if not stages and backbone.get("out_features"):
        stages = [int(re.fullmatch(r"stage(\d+)", f).group(1)) for f in backbone["out_features"]]
    if not stages:
        return midas_taps(depth)
    taps = tuple(int(k) - 1 for k in stages)
    if len(taps) != 4 or min(taps) < 0 or max(taps) >= depth:
        raise CheckpointError(f"{HF}: config.json out_indices {list(stages)} do not name 4 of the {depth} blocks")
    return taps


def check_hf_config(config: dict, backbone: dict) -> None:
    """Settings of DPTConfig / BeitConfig that MiDaS BEiT never uses and DPT Lab does not model."""
    unsupported = []
    if config.get("readout_type", "project") != "project":
        unsupported.append(f"readout_type={config['readout_type']!r}")
    if list(config.get("reassemble_factors", [4, 2, 1, 0.5])) != [4, 2, 1, 0.5]:
        unsupported.append(f"reassemble_factors={config['reassemble_factors']}")
    unsupported += unsupported_dpt_head(config)
    if backbone.get("use_absolute_position_embeddings"):
        unsupported.append("use_absolute_position_embeddings=true")
    if backbone.get("use_shared_relative_position_bias"):
        unsupported.append("use_shared_relative_position_bias=true")
    for name, cfg in (("hidden_act", config), ("backbone hidden_act", backbone)):
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            unsupported.append(f"{name}={act!r}")
    if unsupported:
        raise CheckpointError(f"{HF}: unsupported config.json settings: {', '.join(unsupported)}")


def native_window(backbone: dict, rows: int) -> tuple[int, int]:
    try:
        window = window_from_table(rows)
    except ValueError as exc:
        raise CheckpointError(f"{HF}: {exc}") from None
    size, patch = backbone.get("image_size"), backbone.get("patch_size") or 16
    if size is not None:
        hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        said = (int(hw[0]) // int(patch), int(hw[1]) // int(patch))
        if said != window:
            raise CheckpointError(f"{HF}: relative position table is for a {window[0]}x{window[1]} window, "
                                  f"config.json image_size {size} says {said[0]}x{said[1]}")
    return window


def build_hf(ckpt: RawCheckpoint, hints: LoadHints) -> DepthModel:
    check_family(hints, FAMILY, HF)
    s, config = ckpt.state, ckpt.config or {}
    backbone = config.get("backbone_config") or {}
    check_hf_config(config, backbone)
    if "head.projection.weight" in s:
        raise CheckpointError(f"{HF}: unsupported head projection (head.projection.*, add_projection)")
    depth = count_indexed(s, _LAYER + r"layernorm_before\.weight")
    check_complete(s, hf_keys(depth), HF)
    width = s["backbone.embeddings.cls_token"].shape[-1]
    table = s["backbone.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"]
    window = native_window(backbone, table.shape[0])
    heads = table.shape[1]
    if backbone.get("num_attention_heads") not in (None, heads):
        raise CheckpointError(f"{HF}: config.json says {backbone['num_attention_heads']} heads, the tables hold {heads}")
    check_index_buffers(s, HF_INDEX, window, HF)
    cfg = BeitConfig(
        width=width, depth=depth, heads=heads, mlp_hidden=s["backbone.encoder.layer.0.intermediate.dense.weight"].shape[0],
        taps=hf_taps(backbone, depth), window=window,
        patch_size=s["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1],
        eps=float(backbone.get("layer_norm_eps", 1e-12)),
    )
    dec = DecoderConfig(
        in_channels=(width,) * 4,
        reassemble_channels=tuple(s[f"neck.reassemble_stage.layers.{i}.projection.weight"].shape[0] for i in range(4)),
        features=s["neck.convs.0.weight"].shape[0], readout="project",
        head_hidden=s["head.head.2.weight"].shape[0],
    )
    state = reverse_fusion(merge_qkv(rename_keys(s, HF_RULES, HF_IGNORE, HF), HF))
    notes = []
    if cfg.eps != 1e-6:
        notes.append(f"LayerNorm eps {cfg.eps:g} from config.json (the original MiDaS BEiT uses 1e-6)")
    model = build_beit(cfg, dec, state, HF, notes)
    model.info.layout = "hf"
    return model


LAYOUTS = [
    Layout(ORIGINAL, ("pretrained.model.blocks.0.attn.relative_position_bias_table", "scratch.layer1_rn.weight"),
           build_original),
    Layout(HF, ("backbone.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table",
                "neck.reassemble_stage.layers.0.projection.weight"), build_hf),
]
