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
