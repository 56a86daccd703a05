"""Feature lenses and attention analytics on one recorded encode: what recording the tokens
adds, and what each lens costs once the encode is there.

    python bench/features.py [--runs 7] [--size 518] [--fixture depth_anything_v2_vitl] [--out FILE]

ViT-L layout (random weights, real shapes), one image at size x size (518: 24 blocks of
1 + 37 x 37 tokens). Timed in this process, medians:
  encode          model.encode(x, Record(attention=True, norms=True)): what the app recorded before
  encode+tokens   features.capture(model, x): the same pass keeping every block's output tokens
                  (interleaved with the above; the ratio is the time recording adds)
  PCA per block   probe.pca_rgb(block) on a fresh fit, over every block
  similarity      one click: probe.similarity + most_similar(k=5) + features.lens_image at the
                  page's display size (1024 x 1024 here), and the lens alone (goal p50 <= 15 ms)
  distance        attention.mean_distance over every layer (a fresh probe)
  rollout         the first click (builds the fused matrices of every layer), then further clicks
Memory: the bytes the tokens add to the probe (float32), and what float16 storage would
save with its error.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import interleaved, machine, median_ms, percentile_ms, write_results
from fixtures import save_fixture_checkpoint

import dpt_lab
from dpt_lab import Record, attention, features
from dpt_lab.store import measure


def times_ms(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--fixture", default="depth_anything_v2_vitl")
    ap.add_argument("--clicks", type=int, default=40)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "features.md"),
                    help="'' to only print")
    args = ap.parse_args()
    if args.runs < 5:
        ap.error("--runs must be at least 5")
    with tempfile.TemporaryDirectory() as tmp:
        model = dpt_lab.load_model(save_fixture_checkpoint(args.fixture, Path(tmp))).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    recorded = Record(attention=True, norms=True)

    with torch.inference_mode():
        t = interleaved({"encode": lambda: model.encode(x, recorded), "tokens": lambda: features.capture(model, x)},
                        runs=args.runs)
    encode_ms, tokens_ms = median_ms(t["encode"]), median_ms(t["tokens"])

    probe = features.capture(model, x)
    plain = attention.capture(model, x, norms=True)
    token_bytes = sum(b.tokens.untyped_storage().nbytes() for b in probe.features.blocks)
    half_error = max(float(((b.tokens.half().float() - b.tokens).abs().max() / b.tokens.abs().max()))
                     for b in probe.features.blocks)
    probe_bytes, plain_bytes = measure(probe), measure(plain)

    blocks = probe.num_blocks
    pca_ms = []
    for b in range(blocks):
        probe._pca.clear()
        t0 = time.perf_counter()
        probe.pca_rgb(b)
        pca_ms.append(1000 * (time.perf_counter() - t0))

    gh, gw = probe.grid(blocks - 1)
    rng = np.random.default_rng(0)
    clicks = [1 + int(r) * gw + int(c) for r, c in zip(rng.integers(0, gh, args.clicks), rng.integers(0, gw, args.clicks))]
    display = np.zeros((1024, 1024, 3), np.uint8)
    block = blocks - 1

    def lens(token):
        probe.similarity(block, token)
        return probe.most_similar(block, token, 5)

    def click(token):
        similar = [probe.patch_of(t, block) for t in lens(token)]
        features.lens_image(features.similarity_grid(probe, block, token), display, query=probe.patch_of(token, block),
                            similar=similar)

    lens_ms = [times_ms(lambda tok=tok: lens(tok), 1)[0] for tok in clicks]
    click_ms = [times_ms(lambda tok=tok: click(tok), 1)[0] for tok in clicks]

    fresh = features.capture(model, x)
    distance_ms = times_ms(lambda: attention.mean_distance(fresh), 1)[0]
    t0 = time.perf_counter()
    attention.rollout(fresh, clicks[0])
    rollout_first_ms = 1000 * (time.perf_counter() - t0)
    rollout_ms = [times_ms(lambda tok=tok: attention.rollout(fresh, tok), 1)[0] for tok in clicks]
    rollout_bytes = sum(m.untyped_storage().nbytes() for m, _ in fresh._derived["rollout"][1].values())

    mb = 1 / 2 ** 20
    lines = [
        f"# Feature lenses and attention analytics ({args.fixture}, {args.size} x {args.size}, CPU)",
        "",
        f"Machine: {machine()}. Command: `python bench/features.py --runs {args.runs} --size {args.size}`.",
        f"{blocks} blocks of {probe.num_tokens(0)} tokens x {probe.tokens(0).shape[1]} channels.",
        "",
        "| what | median | other figures |",
        "|---|---|---|",
        f"| encode, attention + norms recorded (before) | {encode_ms:.0f} ms | |",
        f"| encode, + every block's tokens (features.capture) | {tokens_ms:.0f} ms | "
        f"{tokens_ms / encode_ms:.3f}x the encode above (interleaved, {args.runs} rounds) |",
        f"| PCA colours, one block, fresh fit | {statistics.median(pca_ms):.1f} ms | "
        f"max {max(pca_ms):.1f} ms over {blocks} blocks |",
        f"| similarity per click: cosine + top-5 | {statistics.median(lens_ms):.2f} ms | "
        f"p90 {percentile_ms([v / 1000 for v in lens_ms], 90):.2f} ms |",
        f"| similarity per click, + map at 1024 x 1024 | {statistics.median(click_ms):.1f} ms | "
        f"p90 {percentile_ms([v / 1000 for v in click_ms], 90):.1f} ms (goal p50 <= 15 ms) |",
        f"| mean attention distance, all {blocks} layers | {distance_ms:.0f} ms | once per encode, then cached |",
        f"| rollout, first click (fused matrices of every layer) | {rollout_first_ms:.0f} ms | "
        f"keeps {rollout_bytes * mb:.0f} MB for the latest head fusion / discard ratio |",
        f"| rollout, further clicks | {statistics.median(rollout_ms):.1f} ms | "
        f"p90 {percentile_ms([v / 1000 for v in rollout_ms], 90):.1f} ms |",
        "",
        "Memory of one recorded encode (store.measure: every tensor it keeps alive, the decoder maps included):",
        "",
        f"- without tokens (attention q/k + norms): {plain_bytes * mb:.0f} MB;",
        f"- with tokens: {probe_bytes * mb:.0f} MB, i.e. +{token_bytes * mb:.0f} MB of float32 tokens "
        f"({token_bytes / plain_bytes:.0%} more);",
        f"- float16 storage would save {token_bytes / 2 * mb:.0f} MB at a max relative error of {half_error:.1e} "
        "(over 1e-4, the parity tolerance the tests hold the tokens to): they stay float32.",
    ]
    write_results("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
