"""Any declared architecture as a model with reproducible random weights (not a trained
model): `dpt_lab.build(family, size, seed=0)`. The app's offline model, the tests and the
benches use it. What the architectures are is declared in families.py; the family's
layout module turns a declared size into the encoder / decoder configs (`architecture`)
and describes the model (`model_info`) exactly as it does for an official checkpoint.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .families import family_spec
from .layouts import module_for


def configs(family: str, size: str, native_size: Optional[int] = None):
    """(encoder config, DecoderConfig, ModelInfo) of one declared architecture: the objects
    its layout builds from that family's official checkpoint of this size."""
    spec = family_spec(family)
    s = spec.size(size)
    native = s.native_sizes[0] if native_size is None else int(native_size)
    if native not in s.native_sizes:
        raise KeyError(f"{spec.name} {s.name} has no native size {native}; expected one of {s.native_sizes}")
    layout = module_for(spec.name)
    cfg, dec = layout.architecture(spec, s, native)
    return cfg, dec, layout.model_info(cfg, dec, spec.name, spec.max_depth)


def random_value(key: str, ref, gen):
    """Seeded noise for one tensor: scaled by fan-in, layer scales near 0.2, small
    position / CLS tokens; cosine-attention logit scales near log(10) as SwinV2 starts."""
    noise = torch.randn(ref.shape, generator=gen)
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("ls1", "ls2", "gamma_1", "gamma_2"):
        return 0.2 + 0.05 * noise
    if leaf == "logit_scale":
        return math.log(10.0) + 0.1 * noise
    if leaf in ("pos_embed", "cls_token", "relative_position_bias_table"):
        return 0.1 * noise
    if noise.ndim >= 2:
        return noise / math.sqrt(math.prod(ref.shape[1:]))
    if leaf == "weight":
        return 1.0 + 0.1 * noise
    return 0.1 * noise


def build(family: str, size: str, seed: int = 0, device=None, *, native_size: Optional[int] = None):
    """A declared architecture with reproducible random weights (not a trained model).
    Its state dict has the keys and shapes that load_model builds from that family's
    official checkpoint. The generator runs over the state dict in order, so a seed
    always gives the same numbers; the output bias is positive so the final ReLU does
    not flatten the map."""
    cfg, dec, info = configs(family, size, native_size)
    layout = module_for(info.family)
    with torch.device("meta"):
        model = layout.network(cfg, dec, info)
    gen = torch.Generator().manual_seed(int(seed))
    state = {key: random_value(key, ref, gen) for key, ref in model.state_dict().items()}
    state["decoder.head.conv3.bias"] = torch.ones_like(state["decoder.head.conv3.bias"])
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(False).eval()
    info.source = "random weights (untrained)"
    if device is not None:
        model = model.to(device)
    return model
