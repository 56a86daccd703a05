"""DPT Lab on a CUDA GPU: parity with the CPU, half precision, and speed against transformers.

    python bench/gpu.py [--runs 10] [--size 518] [--out bench/results/gpu.md]

Needs a CUDA machine (exits with a message otherwise). On the parity fixtures' layouts
(random weights, the real architectures; tests/fixtures.py) it
1. checks CPU vs CUDA float32 parity of the depth for every family's fixture layout
   (<= 1e-4 relative to the depth's maximum), and the float16 / bfloat16 (autocast) errors
   against CUDA float32, with no non-finite values;
2. times the forward at size x size for ViT-S and ViT-L in float32 and float16 (autocast),
   against transformers' DepthAnythingForDepthEstimation of the same size with the same
   random weights (dpt_lab loads its -hf folder) on the same GPU, in float32 and in float16
   (model.half(), as transformers users run it);
3. times the attention capture (one recorded encode) and one attention row on the GPU;
and prints one table (written to --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import machine, write_results
from fixtures import OFFICIAL_NAMES, save_fixture_checkpoint

import dpt_lab
from dpt_lab import attention, precision


def cuda_ms(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max().cpu().clamp(min=1e-12))


# transformers' Depth-Anything-V2 layouts (ViT-S, ViT-L): the same weights load into dpt_lab from the -hf folder
HF_SIZES = {"vits": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, out_indices=[3, 6, 9, 12],
                         neck=[48, 96, 192, 384], fusion=64, head=32),
            "vitl": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, out_indices=[5, 12, 18, 24],
                         neck=[256, 512, 1024, 1024], fusion=256, head=32)}


def build_pair(size: str, folder: Path):
    """(dpt_lab model, transformers DepthAnythingForDepthEstimation) with the same random weights."""
    from hf_reference import randomize
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    h = HF_SIZES[size]
    backbone = Dinov2Config(hidden_size=h["hidden_size"], num_hidden_layers=h["num_hidden_layers"],
                            num_attention_heads=h["num_attention_heads"], mlp_ratio=4, image_size=518, patch_size=14,
                            layerscale_value=1.0, out_indices=h["out_indices"], apply_layernorm=True,
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=h["hidden_size"],
                                 reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=h["neck"],
                                 fusion_hidden_size=h["fusion"], head_hidden_size=h["head"],
                                 depth_estimation_type="relative")
    torch.manual_seed(0)
    reference = randomize(DepthAnythingForDepthEstimation(config), 0)
    reference.save_pretrained(folder)
    return dpt_lab.load_model(folder), reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.md"),
                    help="'' to only print")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; this machine has none (torch "
              f"{torch.__version__}). Nothing measured.", file=sys.stderr)
        sys.exit(2)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False       # float32 parity means float32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    lines = [f"# DPT Lab on CUDA ({torch.cuda.get_device_name(0)})", "",
             f"Machine: {machine()}, CUDA {torch.version.cuda}. Command: `python bench/gpu.py --runs {args.runs} "
             f"--size {args.size}`.", "",
             "## Parity and half precision (depth, relative to its maximum)", "",
             "| fixture | CPU vs CUDA float32 | float16 autocast vs float32 | bfloat16 autocast vs float32 | finite |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for stem in OFFICIAL_NAMES:
            model = dpt_lab.load_model(save_fixture_checkpoint(stem, tmp)).eval()
            tile = model.info.tile
            side = max(tile, (min(args.size, 384) // tile) * tile)
            x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                cpu = model(x)
                model.to(dev)
                gpu32 = model(x.to(dev))
                halves, finite = [], bool(torch.isfinite(gpu32).all())
                for dt in (torch.float16, torch.bfloat16):
                    precision.apply(model, dt)
                    out = model(x.to(dev))
                    precision.apply(model, None)
                    finite &= bool(torch.isfinite(out).all())
                    halves.append(relative(out, gpu32))
            lines.append(f"| {stem} ({side}) | {relative(gpu32, cpu):.2e} | {halves[0]:.2e} | {halves[1]:.2e} | "
                         f"{'yes' if finite else 'NO'} |")
            model = None
            torch.cuda.empty_cache()

        lines += ["", f"## Forward at {args.size} x {args.size} (ms, CUDA events, median of {args.runs})", "",
                  "| model | dpt_lab float32 | transformers float32 | ratio | dpt_lab float16 (autocast) | "
                  "transformers float16 | ratio | capture (recorded encode) | one row |",
                  "|---|---|---|---|---|---|---|---|---|"]
        x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(dev)
        for size in ("vits", "vitl"):
            model, twin = build_pair(size, tmp / f"depth-anything-v2-{size}-hf")
            model, twin = model.eval().to(dev), twin.eval().to(dev)
            with torch.inference_mode():
                ours32 = cuda_ms(lambda: model(x), args.runs)
                ref32 = cuda_ms(lambda: twin(pixel_values=x), args.runs)
                agree = relative(model(x), twin(pixel_values=x).predicted_depth)
                precision.apply(model, torch.float16)
                ours16 = cuda_ms(lambda: model(x), args.runs)
                precision.apply(model, None)
                twin = twin.half()
                ref16 = cuda_ms(lambda: twin(pixel_values=x.half()), args.runs)
                probe = attention.capture(model, x)
                capture = cuda_ms(lambda: attention.capture(model, x), args.runs)
                row = cuda_ms(lambda: probe.row(probe.num_layers - 1, 1), args.runs * 10)
            lines.append(f"| Depth-Anything-V2 {size} (vs transformers {agree:.1e}) | {ours32:.1f} | {ref32:.1f} | "
                         f"{ref32 / ours32:.2f}x | {ours16:.1f} | {ref16:.1f} | {ref16 / ours16:.2f}x | {capture:.1f} | "
                         f"{row:.2f} |")
            model = twin = probe = None        # freed before the next size
            torch.cuda.empty_cache()
    lines += ["", "Ratios are transformers' time over dpt_lab's (> 1: dpt_lab is faster). Goal: no slower than "
              "transformers in float32 and float16, and no non-finite output."]
    write_results("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
