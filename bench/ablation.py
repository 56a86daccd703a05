"""The ablation's partial re-run against a full encode: replacing tokens from block b on runs
only blocks b.. and the decoder.

    python bench/ablation.py [--runs 5] [--size 518] [--fixture depth_anything_v2_vitl] [--out FILE]

ViT-L layout (random weights, real shapes), one image at size x size. Timed in this process,
interleaved, medians of --runs after a warm-up round:
  encode    model.encode(x, Record(attention, norms, tokens)): the recording the re-run does too
  decoder   model.decode of fresh features (nothing cached)
  re-run b  model.encode(x, ..., resume=Resume(b, ...)) with 4 patches replaced (neighbours) + decode
Goal: re-run b <= (L - b) / L x encode + decoder (b 0-based). The attention-share figures
(one pass over every layer's attention, before and after) are timed apart: they are not part of the
re-run.
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
from dpt_lab import Record, ablation, features
from dpt_lab.encoders.base import Resume


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--fixture", default="depth_anything_v2_vitl")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ablation.md"),
                    help="'' to only print")
    args = ap.parse_args()
    if args.runs < 5:
        ap.error("--runs must be at least 5")
    with tempfile.TemporaryDirectory() as tmp:
        model = dpt_lab.load_model(save_fixture_checkpoint(args.fixture, Path(tmp))).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    record = Record(attention=True, norms=True, tokens=True)
    probe = features.capture(model, x)
    layers = probe.num_blocks
    gh, gw = probe.grid(0)
    patches = [(2, 3), (gh // 2, gw // 2), (gh - 1, 0), (5, gw - 2)]
    starts = sorted({0, layers // 4, layers // 2, 3 * layers // 4, layers - 1})

    def rerun(b):
        edit = ablation._editor(patches, (gh, gw), "neighbours", True)
        feats = model.encode(x, record, resume=Resume(b, probe.features.blocks, probe.features.embedded, edit))
        return model.decode(feats)

    fresh = model.encode(x)

    def decoder():
        fresh.extras.clear()                 # no cached fusion inputs: the whole decoder runs
        return model.decode(fresh)

    fns = {"encode": lambda: model.encode(x, record), "decoder": decoder}
    fns.update({f"re-run {b}": (lambda b=b: rerun(b)) for b in starts})
    with torch.inference_mode():
        t = interleaved(fns, runs=args.runs)
    encode_ms, decoder_ms = median_ms(t["encode"]), median_ms(t["decoder"])

    t0 = time.perf_counter()
    res = ablation.ablate(model, x, layers // 2, patches, baseline=probe)
    share_ms = 1000 * (time.perf_counter() - t0) - 1000 * res.rerun_s

    lines = [f"# Ablation: partial re-run against an encode ({args.fixture}, {args.size} x {args.size}, CPU)", "",
             f"Machine: {machine()}. Command: `python bench/ablation.py --runs {args.runs} --size {args.size}`. "
             f"{layers} blocks; 4 patches replaced by their neighbours' mean; medians of {args.runs} interleaved "
             "rounds.", "",
             f"Encode with the same recording: {encode_ms:.0f} ms. Decoder alone: {decoder_ms:.0f} ms.", "",
             "| from block b (0-based) | re-run (blocks b.. + decoder) | goal (L - b) / L x encode + decoder | "
             "ratio to the goal |",
             "|---|---|---|---|"]
    for b in starts:
        got = median_ms(t[f"re-run {b}"])
        goal = (layers - b) / layers * encode_ms + decoder_ms
        lines.append(f"| {b} | {got:.0f} ms | {goal:.0f} ms | {got / goal:.2f} |")
    lines += ["", f"The attention-share figures of one ablation (every layer before, layers b.. after, b = "
              f"{layers // 2}): {share_ms:.0f} ms more, apart from the re-run "
              f"(spread of the re-runs: {statistics.pstdev([median_ms(t[f're-run {b}']) for b in starts]):.0f} ms)."]
    write_results("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
