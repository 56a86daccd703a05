"""Block norms: what recording the norms adds to an encode, and how heavy the figures are.

    python bench/norms.py [--runs 7] [--size 518] [--device cpu|cuda] [--threads N] [--out FILE]

ViT-L layout (the depth_anything_v2_vitl fixture: random weights, real shapes), one
image at size x size (518: 24 blocks of 37 x 37 tokens). Timed, interleaved, median of
--runs after a warm-up round:
  plain   model.encode(x)
  norms   model.encode(x, Record(norms=True)) + norms.norms_from_features (to numpy)
Then the figures of that result: build time, serialized size (len(fig.to_json())) and the
standalone HTML page (plotly.js inlined).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import interleaved, machine, median_ms, write_results
from fixtures import save_fixture_checkpoint

import dpt_lab
from dpt_lab import Record, norms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "norms.md"), help="'' to only print")
    args = ap.parse_args()
    if args.runs < 5:
        ap.error("--runs must be at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        model = dpt_lab.load_model(save_fixture_checkpoint("depth_anything_v2_vitl", Path(tmp))).to(device).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain():
        with torch.inference_mode():
            model.encode(x)
        sync()

    def with_norms():
        with torch.inference_mode():
            feats = model.encode(x, Record(norms=True))
        norms.norms_from_features(feats)

    times = interleaved({"plain": plain, "norms": with_norms}, runs=args.runs, warmup=1)
    p, n = median_ms(times["plain"]), median_ms(times["norms"])
    # paired per-round difference: robust to drift over the run
    paired = statistics.median(b - a for a, b in zip(times["plain"], times["norms"])) * 1000

    result = norms.block_norms(model, x)
    out = norms.find_outliers(result)
    t0 = time.perf_counter()
    heat = norms.heatmap_figure(result, outliers=out)
    t1 = time.perf_counter()
    heat_json = heat.to_json()
    t2 = time.perf_counter()
    stats = norms.stats_figure(result, out)
    hist = norms.histogram_figure(result, result.num_blocks, out)
    page = norms.figures_html(heat, stats, hist, outliers=out)
    csv = result.to_csv()

    g = result.grids[0]
    lines = [
        "## Block norms",
        "",
        f"Machine: {machine()}, device {device}. Command: `python bench/norms.py --runs {args.runs} --size {args.size}`.",
        f"ViT-L layout (depth_anything_v2_vitl fixture), {args.size}x{args.size}: {result.num_blocks} blocks of "
        f"{g[0]}x{g[1]} tokens; median of {args.runs} interleaved runs.",
        "",
        "| what | median ms | goal |",
        "|---|---|---|",
        f"| encode | {p:.1f} | |",
        f"| encode + norms (Record(norms=True) + to numpy) | {n:.1f} | |",
        f"| added cost | {n - p:+.1f} ms ({100 * (n - p) / p:+.2f}%; paired median {paired:+.1f} ms, "
        f"{100 * paired / p:+.2f}%) | <= 10% ({'ok' if n - p <= 0.1 * p else 'MISSED'}) |",
        f"| heatmap figure: build / to_json | {1000 * (t1 - t0):.0f} / {1000 * (t2 - t1):.0f} | |",
        "",
        f"Heatmap figure JSON: {len(heat_json) / 1e6:.3f} MB ({len(heat_json) / result.num_tokens:.1f} bytes a "
        f"token; limit 5 MB); stats figure {len(stats.to_json()) / 1e3:.1f} kB; histogram "
        f"{len(hist.to_json()) / 1e3:.1f} kB; standalone HTML (plotly.js inlined) {len(page) / 1e6:.2f} MB; "
        f"CSV {len(csv) / 1e6:.2f} MB.",
        "",
    ]
    write_results("\n".join(lines), args.out)

if __name__ == "__main__":
    main()
