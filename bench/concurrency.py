"""Attention clicks with many users at once: requests per second, latency and the
server's peak memory.

    python bench/concurrency.py [--sessions 8] [--clicks 25] [--runs 3] [--base 518]
                                [--out bench/results/concurrency.md]

Starts `python app.py` as a subprocess (offline, CPU) with the Depth-Anything-V2-S (ViT-S)
fixture checkpoint (tests/fixtures.py: the real layout, deterministic random weights) in a
temporary weights folder. --sessions gradio_client sessions each upload their own image
(the five example photos, then synthetic ones) and run /depth at --base; then, per run,
every session sends --clicks /attention requests back to back (a random pixel and layer,
row or column), all sessions at the same time (closed loop: a session sends its next
click when the previous answer, tiles and marked image downloaded, is back). A run
records every click's latency and the run's requests per second (clicks / wall time). A
single-session run gives the baseline. Peak server memory is the app process' VmHWM
(/proc, peak resident set size), also sampled every 50 ms. Medians over --runs runs are
written as a Markdown table to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import ROOT, app_env, proc_status, start_app, stop_app  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
PHOTOS = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "motorcycle_left.jpg")


def images(folder: Path, n: int) -> list[Path]:
    out = [ROOT / "assets" / name for name in PHOTOS[:n]]
    rng = np.random.default_rng(0)
    for i in range(n - len(out)):
        h, w = 300 + 40 * i, 400 + 30 * i
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * (i + 2)) % 256, (yy * (i + 3)) % 256, rng.integers(0, 256, (h, w))], -1)
        out.append(folder / f"synthetic_{i}.png")
        Image.fromarray(img.astype(np.uint8)).save(out[-1])
    return out


def launch(tmp: Path, python: str, threads: int | None):
    from fixtures import save_fixture_checkpoint

    weights = tmp / "weights"
    weights.mkdir()
    save_fixture_checkpoint("depth_anything_v2_vits", weights)
    extra = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    return start_app(tmp, python, weights, app_env(tmp, **extra))


def clicks_run(sessions: list, clicks: int, seed: int) -> tuple[list[float], float]:
    """All sessions click at once; (latencies in s, requests per second)."""
    latencies: list[list[float]] = [[] for _ in sessions]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(sessions) + 1)

    def run(i: int):
        client, (w, h) = sessions[i]
        rng = random.Random(seed * 1000 + i)
        try:
            barrier.wait()
            for _ in range(clicks):
                x, y = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
                layer, mode = rng.randint(1, 12), rng.choice(("row", "column"))
                t0 = time.perf_counter()
                client.predict(x, y, layer, mode, False, False, "inferno", 0, False, api_name="/attention")
                latencies[i].append(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} sessions failed: {errors[0]!r}")
    flat = [v for per in latencies for v in per]
    return flat, len(flat) / wall


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--clicks", type=int, default=25, help="clicks per session per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--base", type=int, default=518, help="base (processing) size of the encodes")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the app (default: torch's)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "concurrency.md"))
    args = ap.parse_args()
    if args.runs < 1 or args.sessions < 1:
        ap.error("--runs and --sessions must be at least 1")

    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="dpt_lab_concurrency_") as tmp:
        tmp = Path(tmp)
        pics = images(tmp, args.sessions)
        proc, url = launch(tmp, args.python, args.threads)
        peak = {"rss": 0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak["rss"] = max(peak["rss"], proc_status(proc.pid).get("VmRSS", 0))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            idle = proc_status(proc.pid).get("VmRSS", 0)
            sessions = []
            t0 = time.perf_counter()
            for pic in pics:
                client = Client(url, verbose=False, download_files=str(tmp / "downloads"))
                client.predict(handle_file(str(pic)), "depth-anything-v2-small", args.base, "default", "turbo",
                               api_name="/depth")
                with Image.open(pic) as im:
                    sessions.append((client, im.size))
            setup_s = time.perf_counter() - t0
            after_setup = proc_status(proc.pid)
            print(f"{len(sessions)} sessions encoded at base {args.base} in {setup_s:.1f} s; server RSS "
                  f"{after_setup.get('VmRSS', 0) / 1024:.0f} MB", flush=True)
            clicks_run(sessions[:1], 3, seed=99)                       # warm-up
            single = []
            for r in range(args.runs):
                lat, rps = clicks_run(sessions[:1], args.clicks, seed=r)
                single.append((statistics.median(lat), pct(lat, 95), rps))
                print(f"1 session, run {r + 1}: {rps:.2f} req/s, p50 {1000 * single[-1][0]:.0f} ms, "
                      f"p95 {1000 * single[-1][1]:.0f} ms", flush=True)
            many = []
            for r in range(args.runs):
                lat, rps = clicks_run(sessions, args.clicks, seed=100 + r)
                many.append((statistics.median(lat), pct(lat, 95), rps, max(lat)))
                print(f"{len(sessions)} sessions, run {r + 1}: {rps:.2f} req/s, p50 {1000 * many[-1][0]:.0f} ms, "
                      f"p95 {1000 * many[-1][1]:.0f} ms, max {1000 * many[-1][3]:.0f} ms", flush=True)
            final = proc_status(proc.pid)
        finally:
            done.set()
            sampler.join()
            stop_app(proc)

    med = lambda rows, k: statistics.median(row[k] for row in rows)  # noqa: E731
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import torch

    n = len(sessions)
    cmd = (f"python bench/concurrency.py --sessions {args.sessions} --clicks {args.clicks} --runs {args.runs} "
           f"--base {args.base}" + (f" --threads {args.threads}" if args.threads else ""))
    lines = [
        "## Concurrency: attention clicks with many sessions at once",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"(CPU), python {platform.python_version()}; 1-min load average at the end: {load:.2f}.",
        f"Command: `{cmd}`.",
        "",
        f"`python app.py` (offline, CPU) serving the Depth-Anything-V2-S layout (ViT-S/14, 12 blocks x 6 heads; "
        f"fixture weights). {n} gradio_client sessions, each with its own image (5 example photos"
        + (f", {n - 5} synthetic" if n > 5 else "") + f") encoded at base size {args.base} "
        f"(e.g. chelsea.jpg: a 518 x 784 input, 37 x 56 patches, when the base is 518); then every session "
        f"sends {args.clicks} attention clicks back to back (random pixel, layer, row or column), all at once. "
        f"Latency is per click as the client sees it (request, queue, compute, the tiles and marked image "
        f"downloaded). Medians of {args.runs} runs.",
        "",
        "| measure | 1 session | %d sessions at once |" % n,
        "|---|---|---|",
        f"| requests per second (clicks answered / wall time) | {med(single, 2):.2f} | {med(many, 2):.2f} |",
        f"| latency p50 | {1000 * med(single, 0):.0f} ms | {1000 * med(many, 0):.0f} ms |",
        f"| latency p95 | {1000 * med(single, 1):.0f} ms | {1000 * med(many, 1):.0f} ms |",
        f"| latency max (median over runs) | | {1000 * med(many, 3):.0f} ms |",
        "",
        "| server memory (app process) | MB |",
        "|---|---|",
        f"| RSS, idle (page up, model loading) | {idle / 1024:.0f} |",
        f"| RSS after the {n} encodes (model + {n} sessions' features) | {after_setup.get('VmRSS', 0) / 1024:.0f} |",
        f"| RSS at the end | {final.get('VmRSS', 0) / 1024:.0f} |",
        f"| peak RSS (VmHWM) | {final.get('VmHWM', 0) / 1024:.0f} |",
        f"| peak RSS sampled every 50 ms | {peak['rss'] / 1024:.0f} |",
        "",
        f"Setup ({n} uploads and encodes, one after the other): {setup_s:.1f} s. The app runs at most "
        "2 model events at once (`MODEL_CONCURRENCY`), so more sessions queue rather than "
        f"oversubscribe the cores: with {n} sessions the throughput is {med(many, 2) / med(single, 2):.1f}x the "
        "single-session figure (two clicks computed at once, and one session's transfers overlap "
        "another's compute) and the latency grows with the queue. The attention of a click is computed from "
        "the session's recorded encode (no re-encode); per-session features are kept in a "
        "byte-bounded store (default 2 GiB, `DPT_LAB_CACHE_MB`) and dropped when the session ends.",
        "",
        "Runs (8 sessions: req/s, p95 ms): " + ", ".join(f"{r[2]:.2f} / {1000 * r[1]:.0f}" for r in many),
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
