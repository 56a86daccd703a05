"""Small random Hugging Face models saved with save_pretrained: the -hf layout reference.
transformers is a test-only dependency."""

from __future__ import annotations

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values (HF init leaves biases at 0, scales at 1),
    so a mapping mistake cannot hide behind a zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight") or "lambda" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def depth_anything_hf(folder, *, layers=4, out_indices=(1, 2, 3, 4), metric=False, swiglu=False, seed=0):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, image_size=56, patch_size=14,
        out_indices=list(out_indices), use_swiglu_ffn=swiglu, apply_layernorm=True, reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=64, neck_hidden_sizes=[16, 32, 64, 64],
        fusion_hidden_size=32, head_hidden_size=8,
        depth_estimation_type="metric" if metric else "relative", max_depth=20 if metric else 1,
    )
    torch.manual_seed(seed)
    model = randomize(DepthAnythingForDepthEstimation(config), seed)
    model.save_pretrained(folder)
    return model


def beit_hf(folder, seed=0):
    """A tiny random DPT-BEiT (4 x 4 native window, relative position bias per block)."""
    import transformers

    backbone = transformers.BeitConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, use_relative_position_bias=True, use_absolute_position_embeddings=False,
        reshape_hidden_states=False, out_indices=[1, 2, 3, 4], layer_scale_init_value=0.1,
    )
    config = transformers.DPTConfig(
        backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], reassemble_hidden_size=32,
        fusion_hidden_size=16, readout_type="project", head_in_index=-1, add_projection=False,
    )
    torch.manual_seed(seed)
    model = randomize(transformers.DPTForDepthEstimation(config), seed)
    with torch.no_grad():   # randomize() leaves the tables small (~N(0, 1/heads)): give the bias some weight
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.mul_(4.0)
    model.save_pretrained(folder)
    return transformers.DPTForDepthEstimation.from_pretrained(folder, attn_implementation="eager").eval()


def swin2_hf(folder, seed=0):
    """A tiny random DPT-SwinV2: 64 px native input, patch 4, window 4; stage grids at
    64 x 128 are 16x32, 8x16, 4x8, 2x4, windows 4, 4, 4, 2; stages 0 and 1 shift their
    second block by 2 (no padding anywhere, where transformers and DPT Lab agree)."""
    import transformers

    backbone = transformers.Swinv2Config(
        image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"], pretrained_window_sizes=[0, 0, 0, 0],
    )
    config = transformers.DPTConfig(
        backbone_config=backbone, neck_hidden_sizes=[16, 32, 64, 128], fusion_hidden_size=32,
        head_in_index=-1, add_projection=False, readout_type="project", reassemble_hidden_size=16,
    )
    torch.manual_seed(seed)
    randomize(transformers.DPTForDepthEstimation(config), seed).save_pretrained(folder)
    return transformers.DPTForDepthEstimation.from_pretrained(folder, attn_implementation="eager").eval()


def windows_to_image(win_attn: torch.Tensor, grid, window: int, shift: int) -> torch.Tensor:
    """transformers' (windows, heads, w^2, w^2) attention of a block that rolled its grid by
    -shift -> (heads, N, N) over the stage grid's own row-major positions."""
    h, w = grid
    heads = win_attn.shape[1]
    full = torch.zeros(heads, h * w, h * w)
    per_row = w // window
    for win in range(win_attn.shape[0]):
        top, left = (win // per_row) * window, (win % per_row) * window
        pos = torch.arange(window * window)
        rolled_r, rolled_c = top + pos // window, left + pos % window
        tokens = ((rolled_r + shift) % h) * w + (rolled_c + shift) % w      # undo the roll
        full[:, tokens[:, None], tokens[None, :]] = win_attn[win]
    return full


def swin2_every_block(reference, x):
    """(blocks, each block's attention probabilities, each block's output tokens) of a transformers
    DPT-SwinV2 on x: transformers returns only each stage's last block, so every block is hooked."""
    blocks = [blk for stage in reference.backbone.encoder.layers for blk in stage.blocks]
    attn, outs = [], []
    hooks = [blk.attention.register_forward_hook(lambda _m, _a, out: attn.append(out[1])) for blk in blocks]
    hooks += [blk.register_forward_hook(lambda _m, _a, out: outs.append(out[0])) for blk in blocks]
    try:
        with torch.inference_mode():
            reference(pixel_values=x, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    return blocks, attn, outs
