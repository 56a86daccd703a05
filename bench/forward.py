"""Forward pass: dpt_lab against transformers on the same weights and the same input.

    python bench/forward.py [--size 518] [--runs 7] [--threads N] [--profile] [--compile] [--write]

Builds transformers' DepthAnythingForDepthEstimation in the Depth-Anything-V2-Small layout
(DINOv2 ViT-S/14: hidden 384, 12 layers, 6 heads, taps after blocks 3, 6, 9, 12; neck
[48, 96, 192, 384], fusion 64, head 32) with random weights (tests/hf_reference.randomize),
saves it with save_pretrained, loads that folder with dpt_lab.load_model, and runs both on
one random 3 x size x size input, CPU float32, under torch.inference_mode, in one process
with the same thread count:

  - the outputs' max abs difference, and relative to max |transformers| (goal <= 1e-4);
  - interleaved timing (one call of each per round, the order rotating, after a warm-up round), medians of
    --runs rounds: wall time, and process CPU time (all threads) as a second opinion on a
    busy machine; dpt_lab is timed as loaded (the CPU fast path, dpt_lab/fastpath.py) and
    with the fast path but its linear weights not packed (fastpath.PACK_WEIGHTS = False), and
    with fastpath.disabled() (the plain PyTorch ops: the code before the fast path);
  - --profile: torch.profiler self CPU time per op family, each model;
  - --compile: torch.compile (inductor, freezing=True) of the dpt_lab model: its first
    call (compilation) and its steady-state time, beside the eager one;
  - --rates: GFLOP/s of the forward's main kernels at its shapes (each linear layer, the
    attention, the largest decoder convs), beside a 2048 x 2048 matmul (what this CPU
    does in float32): how far from the floor each part runs; and what else PyTorch offers
    for the attention (plain ops per head, compiled flex_attention) at its shapes;
  - --write: bench/results/forward.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine  # noqa: E402  (sets sys.path)
from hf_reference import randomize  # noqa: E402

import dpt_lab  # noqa: E402
from dpt_lab import fastpath  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "forward.md"


def build_reference(folder: Path, seed: int = 0):
    """transformers' Depth-Anything-V2-Small layout, random weights, saved to `folder`."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, image_size=518, patch_size=14,
        layerscale_value=1.0, out_indices=[3, 6, 9, 12], apply_layernorm=True, reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=384, reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_hidden_size=32,
        depth_estimation_type="relative",
    )
    torch.manual_seed(seed)
    model = randomize(DepthAnythingForDepthEstimation(config), seed)
    model.save_pretrained(folder)
    return model


def interleaved(fns: dict, runs: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """One call of each function per round; wall and process CPU seconds per call.

    The order rotates from round to round, so that no function always runs right after
    the same one (transformers' forward hands ~250 MB back to the OS each call, and
    whatever runs next takes the page faults of reclaiming it)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: {"wall": [], "cpu": []} for name in fns}
    names = list(fns)
    for r in range(runs):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = fns[name]
            c, t = time.process_time(), time.perf_counter()
            fn()
            out[name]["wall"].append(time.perf_counter() - t)
            out[name]["cpu"].append(time.process_time() - c)
    return out


FAMILIES = [  # (label, substrings of profiler op names), first match wins
    ("linear (addmm / oneDNN matmul)", ("addmm", "linear_pointwise", "aten::mm", "matmul", "mkl_linear")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("convolution", ("convolution", "conv2d", "conv_transpose", "slow_conv")),
    ("upsample", ("upsample",)),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("copies (copy_ / contiguous / cat)", ("copy_", "clone", "cat")),
    ("elementwise (add / mul / relu / addcmul)", ("add", "mul", "clamp", "relu", "sigmoid")),
]


def profile_families(fn, rounds: int = 2) -> tuple[float, list[tuple[str, float]]]:
    """(total self CPU ms per call, [(family, share)]) of fn under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            fn()
    shares: dict[str, float] = {}
    total = 0.0
    for ev in prof.key_averages():
        us = ev.self_cpu_time_total
        total += us
        name = ev.key.lower()
        label = next((lab for lab, keys in FAMILIES if any(k in name for k in keys)), "other")
        shares[label] = shares.get(label, 0.0) + us
    order = [lab for lab, _ in FAMILIES] + ["other"]
    return total / rounds / 1000, [(lab, shares.get(lab, 0.0) / total) for lab in order if lab in shares]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(freezing) of dpt_lab")
    parser.add_argument("--rates", action="store_true", help="GFLOP/s of the main kernels at the forward's shapes")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "depth-anything-v2-small-hf"
        reference = build_reference(folder)
        t0 = time.perf_counter()
        model = dpt_lab.load_model(folder)
        load_s = time.perf_counter() - t0
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

    def ours():
        with torch.inference_mode():
            return model(x)

    def ours_plain():
        with torch.inference_mode(), fastpath.disabled():
            return model(x)

    def ours_unpacked():
        before, fastpath.PACK_WEIGHTS = fastpath.PACK_WEIGHTS, False
        try:
            return ours()
        finally:
            fastpath.PACK_WEIGHTS = before

    def theirs():
        with torch.inference_mode():
            return reference(pixel_values=x).predicted_depth

    a, p, b = ours(), ours_plain(), theirs()
    scale = b.abs().max().item()
    diff = dict(abs=(a - b).abs().max().item(), rel=(a - b).abs().max().item() / scale,
                plain_abs=(p - b).abs().max().item(), plain_rel=(p - b).abs().max().item() / scale,
                fast_vs_plain=(a - p).abs().max().item() / p.abs().max().item())
    print(f"max |dpt_lab - transformers| = {diff['abs']:.3g} ({diff['rel']:.3g} relative); "
          f"fast path off: {diff['plain_rel']:.3g}; fast vs off: {diff['fast_vs_plain']:.3g}", flush=True)

    fns = {"dpt_lab": ours, "dpt_lab, weights not packed": ours_unpacked, "dpt_lab, fastpath off": ours_plain,
           "transformers": theirs}
    times = interleaved(fns, runs=args.runs, warmup=1)
    med = {n: {k: 1000 * statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    # the calls of one round run back to back: their ratio is less exposed to the load of
    # the machine drifting between rounds than the ratio of the medians
    paired = {n: statistics.median(h / o for h, o in zip(times["transformers"]["wall"], times[n]["wall"]))
              for n in times}
    for n, m in med.items():
        print(f"{n:24s} wall {m['wall']:8.1f} ms   cpu {m['cpu']:8.1f} ms   "
              f"runs {', '.join(f'{1000 * s:.0f}' for s in times[n]['wall'])}", flush=True)

    prof = {}
    if args.profile:
        for n, fn in fns.items():
            prof[n] = profile_families(fn)
            print(n, f"{prof[n][0]:.0f} ms", ", ".join(f"{lab} {100 * s:.1f}%" for lab, s in prof[n][1]), flush=True)

    compiled = None
    if args.compile:
        compiled = time_compiled(model, x, ours, args.runs, b)
        print(compiled, flush=True)

    rates = kernel_rates(model, args.size) if args.rates else None
    text = render(dict(machine=machine(), size=args.size, runs=args.runs, threads=torch.get_num_threads(),
                       diff=diff, med=med, times=times, paired=paired, prof=prof, compiled=compiled, load_s=load_s,
                       rates=rates, cmd=command(args)))
    print(text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


def time_compiled(model, x, eager, runs: int, expected) -> dict:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(model)

    def run():
        with torch.inference_mode():
            return compiled(x)

    t0 = time.perf_counter()
    y = run()
    first = time.perf_counter() - t0
    rel = (y - expected).abs().max().item() / expected.abs().max().item()
    times = interleaved({"eager": eager, "compiled": run}, runs=runs, warmup=1)
    return dict(first_s=first, rel=rel, eager_ms=1000 * statistics.median(times["eager"]["wall"]),
                compiled_ms=1000 * statistics.median(times["compiled"]["wall"]))


def kernel_rates(model, size: int, rounds: int = 20) -> list[tuple[str, float, float]]:
    """[(kernel, ms per call, GFLOP/s)] at the shapes of this model's forward, as the fast
    path calls them (packed weights, channels-last maps)."""
    import torch.nn.functional as F

    def ms_per_call(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)

    gen = torch.Generator().manual_seed(0)
    patch = model.info.patch_size
    n = (size // patch) ** 2 + 1
    block = model.encoder.blocks[0]
    rows = []
    with torch.inference_mode():
        big = torch.randn(2048, 2048, generator=gen)
        ms = ms_per_call(lambda: torch.ops.mkldnn._linear_pointwise(big, fastpath.packed(big), None, "none", [], "none"))
        rows.append(("matmul 2048 x 2048 x 2048 (reference)", ms, 2 * 2048 ** 3 / ms / 1e6))
        for name, fc in (("qkv", block.attn.qkv), ("proj", block.attn.proj), ("fc1", block.mlp.fc1), ("fc2", block.mlp.fc2)):
            x = torch.randn(1, n, fc.in_features, generator=gen)
            ms = ms_per_call(lambda: fastpath.linear(fc, x))
            rows.append((f"linear {name} ({n} x {fc.in_features} -> {fc.out_features})", ms,
                         2 * n * fc.in_features * fc.out_features / ms / 1e6))
        heads, width = block.attn.heads, block.attn.qkv.in_features
        q, k, v = (torch.randn(1, heads, n, width // heads, generator=gen) for _ in range(3))
        ms = ms_per_call(lambda: F.scaled_dot_product_attention(q, k, v))
        flops = 4 * n * n * width
        rows.append((f"attention (SDPA, {heads} heads x {n} tokens x {width // heads})", ms, flops / ms / 1e6))
        rows += attention_alternatives(q, k, v, ms_per_call, flops)
        dec = model.decoder
        g = size // patch
        for name, conv, cin_hw in (("head conv1", dec.head.conv1, 8 * g), ("fusion 0 RCU conv", dec.fusion[0].rcu2.conv1, 4 * g),
                                   ("head conv2 (one band of 64 rows)", dec.head.conv2, None)):
            shape = (1, conv.in_channels, cin_hw, cin_hw) if cin_hw else (1, conv.in_channels, 66, size)
            x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
            pad = None if cin_hw else (0, 1)
            ms = ms_per_call(lambda: fastpath.conv(conv, x, padding=pad))
            out_hw = shape[2] * shape[3] if cin_hw else 64 * size
            rows.append((f"conv {name} ({conv.in_channels} -> {conv.out_channels}, {shape[2]} x {shape[3]})", ms,
                         2 * out_hw * conv.in_channels * conv.out_channels * 9 / ms / 1e6))
    return rows


def attention_alternatives(q, k, v, ms_per_call, flops: float) -> list[tuple[str, float, float]]:
    """What else PyTorch offers for the attention, at the same shapes: the plain ops one head
    at a time into buffers made once (a head's scores, 7.5 MB, stay in L3; all heads at once
    they are 45 MB of fresh memory per call), with the softmax in place; the two matrix
    products of that without the softmax (what any unfused version costs at least); and
    flex_attention compiled by inductor (needs a C++ compiler; skipped without one)."""
    scale = q.shape[-1] ** -0.5
    qs, ks, vs = q[0] * scale, k[0], v[0]
    scores = torch.empty(qs.shape[1], ks.shape[1])
    out = torch.empty_like(qs)

    def per_head(softmax: bool = True):
        for h in range(qs.shape[0]):
            torch.mm(qs[h], ks[h].t(), out=scores)
            if softmax:
                torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            torch.mm(scores, vs[h], out=out[h])

    rows = []
    for name, fn in (("attention, per head: mm, softmax in place, mm", per_head),
                     ("attention, per head: the two mm alone", lambda: per_head(softmax=False))):
        ms = ms_per_call(fn)
        rows.append((name, ms, flops / ms / 1e6))
    try:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention)
        with torch.no_grad():
            ms = ms_per_call(lambda: compiled(q, k, v, scale=scale))
        rows.append(("attention, flex_attention (torch.compile)", ms, flops / ms / 1e6))
    except Exception as e:  # noqa: BLE001 - no compiler or no CPU template: say so, go on
        print(f"flex_attention not timed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
    return rows


def command(args) -> str:
    parts = ["python bench/forward.py", f"--size {args.size}", f"--runs {args.runs}"]
    if args.threads:
        parts.append(f"--threads {args.threads}")
    parts += [f"--{flag}" for flag in ("profile", "compile", "rates") if getattr(args, flag)]
    return " ".join(parts)


def render(r: dict) -> str:
    med = r["med"]
    ours, unpacked, plain, hf = (med["dpt_lab"], med["dpt_lab, weights not packed"], med["dpt_lab, fastpath off"],
                                 med["transformers"])
    d = r["diff"]
    lines = [
        "## Forward pass: dpt_lab vs transformers",
        "",
        f"Depth-Anything-V2-Small layout (random weights, saved with save_pretrained and loaded with "
        f"`dpt_lab.load_model`), one {r['size']}x{r['size']} input, CPU float32, `torch.inference_mode`, "
        f"{r['threads']} threads, one process.",
        f"Machine: {r['machine']}. Command: `{r['cmd']}`.",
        "Interleaved rounds (one call of each per round, the order rotating round by round, after a "
        "warm-up round); medians of "
        f"{r['runs']} rounds. Process CPU time (all threads) is given beside wall time: the machine is shared.",
        "",
        "| model | wall (median) | CPU time (median) | transformers / this (wall) |",
        "|---|---|---|---|",
    ]
    for name, m in (("dpt_lab (default: CPU fast path)", ours),
                    ("dpt_lab, fast path without packed weights (`fastpath.PACK_WEIGHTS = False`)", unpacked),
                    ("dpt_lab, `fastpath.disabled()` (plain ops)", plain),
                    ("transformers DepthAnythingForDepthEstimation", hf)):
        lines.append(f"| {name} | {m['wall']:.0f} ms | {m['cpu']:.0f} ms | {hf['wall'] / m['wall']:.3f}x |")
    lines += [
        "",
        f"Speed-up of dpt_lab over transformers: **{hf['wall'] / ours['wall']:.2f}x** wall "
        f"({hf['cpu'] / ours['cpu']:.2f}x CPU time; median of the per-round ratios "
        f"{r['paired']['dpt_lab']:.2f}x); the fast path alone: {plain['wall'] / ours['wall']:.2f}x wall "
        f"({plain['cpu'] / ours['cpu']:.2f}x CPU time), of which the packed weights "
        f"{unpacked['wall'] / ours['wall']:.2f}x. Fastest round of each: "
        + ", ".join(f"{n} {1000 * min(t['wall']):.0f} ms" for n, t in r["times"].items()) + ".",
        "",
        f"Outputs: max |dpt_lab - transformers| = {d['abs']:.3g}, {d['rel']:.2g} of max |transformers| "
        f"(goal <= 1e-4); with the fast path off {d['plain_rel']:.2g}; fast path vs off {d['fast_vs_plain']:.2g}.",
        f"load_model of the -hf folder: {1000 * r['load_s']:.0f} ms.",
        "",
        "Every round (wall ms): " + "; ".join(
            f"{n}: {', '.join(f'{1000 * s:.0f}' for s in t['wall'])}" for n, t in r["times"].items()),
    ]
    if r["prof"]:
        names = list(r["prof"])
        labels = []
        for n in names:
            labels += [lab for lab, _ in r["prof"][n][1] if lab not in labels]
        lines += ["", "Profile (torch.profiler self CPU time per op family, share of each model's total):", "",
                  "| op family | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for lab in labels:
            cells = []
            for n in names:
                share = dict(r["prof"][n][1]).get(lab)
                cells.append("" if share is None else f"{100 * share:.1f}% ({share * r['prof'][n][0]:.0f} ms)")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("| total (profiled, per call) | " + " | ".join(f"{r['prof'][n][0]:.0f} ms" for n in names) + " |")
    if r["compiled"]:
        c = r["compiled"]
        lines += ["", f"torch.compile (inductor, freezing=True) of the dpt_lab model: first call (compile) "
                      f"{c['first_s']:.1f} s; then {c['compiled_ms']:.0f} ms vs eager {c['eager_ms']:.0f} ms "
                      f"(median, interleaved); output vs transformers {c['rel']:.2g} relative."]
    if r["rates"]:
        lines += ["", "Kernel rates at the forward's shapes (`--rates`; fast path, median of 20 calls each):", "",
                  "| kernel | ms per call | GFLOP/s |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.2f} | {rate:.0f} |" for name, ms, rate in r["rates"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
