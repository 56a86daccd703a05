"""Attention explorer benchmark: Depth-Anything ViT-L layout at 518 x 518.

    python bench/attention.py [--size 518] [--runs 3] [--rows 200] [--write]

Builds the ViT-L model from the depth_anything_v2_vitl fixture (tests/fixtures.py: the
official layout with deterministic random weights; speed and memory do not depend on the
values) and measures
  - capture (one recorded encoder pass) against a plain encode, interleaved, median of --runs;
  - capture memory: probe.nbytes, the RSS held after capture, and the peak RSS during
    capture and during a plain encode (sampled every 2 ms from /proc/self/statm);
  - row latency over --rows random (layer, token) pairs (server side, before rendering);
  - column latency: first call of a layer (computes its normalisers) and cached calls;
  - the full attention matrices' size (L x H x N^2 float32) beside what the probe keeps.
--write replaces the "## Attention" section of BENCHMARKS.md with the results;
--results writes the section to bench/results/attention.md.
Timings are wall time (median) and, beside it, process CPU time (all threads, median): on
a shared machine the wall time of a 2-thread pass swings with what else runs, and the
CPU time says whether a pass did more work.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import interleaved, machine, median_ms, percentile_ms  # noqa: E402  (sets sys.path)
from fixtures import save_fixture_checkpoint  # noqa: E402

import dpt_lab  # noqa: E402
from dpt_lab import attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6


def trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS tracks live memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident set size while the block runs (sampled by a thread)."""

    def __enter__(self):
        trim()
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.end = rss()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--write", action="store_true", help="update the ## Attention section of BENCHMARKS.md")
    parser.add_argument("--results", action="store_true", help="write the section to bench/results/attention.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = dpt_lab.load_model(save_fixture_checkpoint("depth_anything_v2_vitl", Path(tmp)))
    model.eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

    def plain():
        with torch.inference_mode():
            model.encode(x)

    def recorded():
        attention.capture(model, x)

    plain()                 # pages in the (memory-mapped) weights and warms the allocator
    # memory first, then timing; RSS is measured from a trimmed heap (see trim)
    with PeakRSS() as plain_mem:
        plain()
    with PeakRSS() as cap_mem:
        probe = attention.capture(model, x)
    cap_peak = cap_mem.peak - cap_mem.start
    plain_peak = plain_mem.peak - plain_mem.start

    L = probe.num_layers
    H = probe.num_heads(0)
    N = probe.num_tokens(0)
    full_bytes = L * H * N * N * 4
    nbytes = probe.nbytes

    # row latency over random (layer, token)
    rng = random.Random(0)
    pairs = [(rng.randrange(L), rng.randrange(N)) for _ in range(args.rows)]
    probe.row(0, 0)
    trim()
    held = rss() - cap_mem.start         # what stays resident with the probe alive
    row_times = []
    for layer, token in pairs:
        t0 = time.perf_counter()
        probe.row(layer, token)
        row_times.append(time.perf_counter() - t0)

    # columns: first call per layer computes the normalisers, later calls reuse them
    first, cached = [], []
    for layer in rng.sample(range(L), 3):
        t0 = time.perf_counter()
        probe.column(layer, rng.randrange(N))
        first.append(time.perf_counter() - t0)
        for _ in range(20):
            t0 = time.perf_counter()
            probe.column(layer, rng.randrange(N))
            cached.append(time.perf_counter() - t0)
    del probe
    gc.collect()

    cpu = {"encode": [], "capture": []}

    def cpu_timed(name, fn):
        def run():
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)
        return run

    times = interleaved({"encode": cpu_timed("encode", plain), "capture": cpu_timed("capture", recorded)},
                        runs=args.runs, warmup=1)
    enc, cap = median_ms(times["encode"]), median_ms(times["capture"])
    enc_cpu, cap_cpu = median_ms(cpu["encode"][1:]), median_ms(cpu["capture"][1:])   # [0]: the warm-up round

    results = dict(
        machine=machine(), size=args.size, layers=L, heads=H, tokens=N,
        encode_ms=enc, capture_ms=cap, ratio=cap / enc, encode_cpu=enc_cpu, capture_cpu=cap_cpu,
        encode_runs=times["encode"], capture_runs=times["capture"],
        nbytes=nbytes, held=held, cap_peak=cap_peak, plain_peak=plain_peak, full=full_bytes,
        row_p50=percentile_ms(row_times, 50), row_p95=percentile_ms(row_times, 95), row_max=1000 * max(row_times),
        col_first=median_ms(first), col_cached_p50=percentile_ms(cached, 50), col_cached_p95=percentile_ms(cached, 95),
        runs=args.runs, rows=args.rows,
    )
    section = render(results)
    print(section)
    if args.write:
        write_section(section)
    if args.results:
        out = ROOT / "bench" / "results" / "attention.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(section)
        print(f"wrote {out}")


def render(r: dict) -> str:
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    cmd = f"python bench/attention.py --size {r['size']} --runs {r['runs']} --rows {r['rows']}"
    return f"""## Attention

Attention explorer, Depth-Anything v2 ViT-L layout (depth_anything_v2_vitl fixture) at {r['size']}x{r['size']}:
{r['layers']} layers x {r['heads']} heads, N = {r['tokens']} tokens (CLS + {r['tokens'] - 1} patches).
Machine: {r['machine']}. Command: `{cmd}`.

| measure | result | goal |
|---|---|---|
| plain encode (median of {r['runs']}, interleaved) | {r['encode_ms']:.0f} ms | |
| capture: one recorded encode (median of {r['runs']}) | {r['capture_ms']:.0f} ms, {r['ratio']:.3f}x encode | <= 1.1x ({ok(r['ratio'] <= 1.1)}) |
| process CPU time (all threads, median): capture / plain encode | {r['capture_cpu']:.0f} ms / {r['encode_cpu']:.0f} ms, {r['capture_cpu'] / r['encode_cpu']:.3f}x | |
| every round, wall: capture / plain encode | {', '.join(f'{1000 * t:.0f}' for t in r['capture_runs'])} / {', '.join(f'{1000 * t:.0f}' for t in r['encode_runs'])} ms | |
| capture memory: probe.nbytes (q, k of every block) | {r['nbytes'] / MB:.0f} MB | <= 350 MB ({ok(r['nbytes'] <= 350 * MB)}) |
| capture memory: RSS held with the probe alive (heap trimmed) | {r['held'] / MB:.0f} MB | |
| peak RSS during the pass, over its start: capture / plain encode | {r['cap_peak'] / MB:.0f} MB / {r['plain_peak'] / MB:.0f} MB | |
| row latency p50 / p95 / max ({r['rows']} random layer, token) | {r['row_p50']:.2f} / {r['row_p95']:.2f} / {r['row_max']:.2f} ms | p50 <= 15, p95 <= 40 ({ok(r['row_p50'] <= 15 and r['row_p95'] <= 40)}) |
| column, first call of a layer (row normalisers, median of 3 layers) | {r['col_first']:.0f} ms | |
| column, cached layer, p50 / p95 | {r['col_cached_p50']:.2f} / {r['col_cached_p95']:.2f} ms | |
| full attention matrices (L x H x N^2 float32), for comparison | {r['full'] / 1e9:.2f} GB ({r['full'] / r['nbytes']:.0f}x the probe) | not stored |

Rows are computed from the recorded q, k (float32) on demand; a column uses the layer's
log-sum-exp per (head, query), computed once per layer in 256-query chunks and cached
({r['heads']} x {r['tokens']} floats per layer). Each block's q / k are copied out of its qkv output
right after the block runs, so v is freed during the pass and the pass holds about what
the probe keeps. A row or column is computed on the calling thread alone (a few hundred
kFLOP: split over the intra-op threads it only waited for them to be scheduled).
"""


def write_section(section: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# DPT Lab benchmarks\n"
    pattern = re.compile(r"^## Attention\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
    print(f"wrote the Attention section of {path}")


if __name__ == "__main__":
    main()
