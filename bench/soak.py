"""Memory under traffic: N sessions through every endpoint for a set time; RSS over time,
requests served, errors and latency percentiles.

    python bench/soak.py [--sessions 8] [--minutes 30] [--base 518] [--images 40]
                         [--export-every 600] [--video-every 300] [--window 10]
                         [--reference [--reference-minutes M]] [--env K=V ...] [--out bench/results/soak.md]

Starts `python app.py` (offline, CPU) on the Depth-Anything-V2-S (ViT-S) fixture
checkpoint (tests/fixtures.py: the real layout, deterministic random weights). --images
pictures of random sizes (200-700 px a side, crops of the example photos) make the pool.
Each of --sessions gradio_client sessions loops, closed loop (the next request when the
answer, files included, is back), through every endpoint: a random picture -> /depth at
--base; three /attention clicks (random pixel, layer, row or column); /norms (auto or a
fixed threshold, a random block); two /fusion renders with random factors; /features (PCA
or similarity at a random pixel), /rollout (random pixel, layer, fusion, discard),
/ablation (two patches, a random block and mode), /mask (a random range, plane or not);
every fourth round /norms_files, /fusion_files, /attention_distance and /scene3d. Session
0 also runs /export every --export-every seconds, session 1 /video of a 2 s clip every
--video-every seconds (0: never). The server's RSS is read from /proc every second.

Printed and written to --out: RSS every minute, requests and errors per endpoint, latency
p50 / p95 / max per endpoint, requests per second, peak RSS (VmHWM) against the goal
(weights + the store's cap + 1 GB), and the RSS growth over the last --window minutes
(the least-squares line through the window's samples, start against end; goal < 5%);
the per-second samples go to --out with .csv for .md.
--reference first runs the same load on a server with the allocator left alone
(DPT_LAB_MALLOC=off), for --reference-minutes (default: --minutes), and reports both, and
the ratio of their throughputs (the measured run's first --reference-minutes against the
reference run: the same stretch of the same load).
--env K=V sets a variable for the measured server (repeatable).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import ROOT, app_env, proc_status, start_app, stop_app  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
PHOTOS = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "motorcycle_left.jpg")
MODEL = "depth-anything-v2-small"
CACHE_BYTES = 2 << 30          # the store's default cap (dpt_lab.session.DEFAULT_CACHE_BYTES)
ENDPOINTS = ("depth", "attention", "norms", "fusion", "features", "rollout", "ablation", "mask", "norms_files",
             "fusion_files", "attention_distance", "scene3d", "export", "video")


def make_clip(path: Path, picture: Path, seconds: float = 2.0, fps: int = 10) -> Path:
    """A short H.264 clip panning across one picture (what the /video calls send)."""
    import av

    rgb = np.asarray(Image.open(picture).convert("RGB").resize((320, 240)))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for k in range(int(seconds * fps)):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.roll(rgb, 6 * k, axis=1).copy(), format="rgb24")))
        out.mux(stream.encode())
    return path


def picture_pool(folder: Path, n: int, seed: int = 0) -> list[tuple[Path, tuple[int, int]]]:
    """n crops of the example photos, each resized to a random size of 200-700 px a side."""
    rng = random.Random(seed)
    photos = [Image.open(ROOT / "assets" / name).convert("RGB") for name in PHOTOS]
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = src.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        size = (rng.randint(200, 700), rng.randint(200, 700))
        path = folder / f"pic_{i:02d}.jpg"
        src.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BILINEAR).save(path, quality=90)
        out.append((path, size))
    return out


class Log:
    """Every request: endpoint, start (s since the run began), latency, error text."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.rows: list[tuple[str, float, float, str]] = []
        self.lock = threading.Lock()

    def call(self, endpoint: str, fn, *args):
        start = time.perf_counter()
        err = ""
        try:
            fn(*args, api_name=f"/{endpoint}")
        except Exception as exc:  # noqa: BLE001 - counted and reported
            err = " ".join(str(exc).split())[:160] or type(exc).__name__
        with self.lock:
            self.rows.append((endpoint, start - self.t0, time.perf_counter() - start, err))


CLIENT_TIMEOUT_S = 120


def session_loop(i: int, url: str, pics, base: int, log: Log, stop_at: float, export_every: float,
                 downloads: Path, clip: Path, video_every: float) -> None:
    from gradio_client import Client, handle_file

    rng = random.Random(1000 + i)
    # a patient user: gradio_client's httpx calls (joining the queue, fetching an output file) time
    # out after 5 s by default, which a 2-core server busy with 8 sessions can take to answer
    client = Client(url, verbose=False, download_files=str(downloads / f"s{i}"),
                    httpx_kwargs={"timeout": CLIENT_TIMEOUT_S})
    call = client.predict
    next_export = time.perf_counter() + (export_every / 2 if export_every else float("inf"))
    next_video = time.perf_counter() + (video_every / 3 if video_every else float("inf"))
    round_no = 0
    while time.perf_counter() < stop_at:
        path, (w, h) = rng.choice(pics)
        log.call("depth", call, handle_file(str(path)), MODEL, base, "default", "turbo")
        for _ in range(3):
            log.call("attention", call, rng.uniform(0, w - 1), rng.uniform(0, h - 1), rng.randint(1, 12),
                     rng.choice(("row", "column")), False, False, "inferno", 0, False)
        fixed = rng.random() < 0.3
        log.call("norms", call, "fixed" if fixed else "auto", 150, rng.randint(1, 12), True)
        for _ in range(2):
            log.call("fusion", call, *(round(rng.uniform(-2, 2), 2) for _ in range(4)), "turbo")
        if rng.random() < 0.5:
            log.call("features", call, rng.randint(1, 12), "pca", None, None, False, 12, False, 5, 0.0, "inferno")
        else:
            log.call("features", call, rng.randint(1, 12), "similarity", rng.uniform(0, w - 1), rng.uniform(0, h - 1),
                     False, 12, False, 5, 0.35, "inferno")
        log.call("rollout", call, rng.uniform(0, w - 1), rng.uniform(0, h - 1), rng.randint(1, 12),
                 rng.choice(("mean", "max")), rng.choice((0.0, 0.5)), False, 0.35, "inferno")
        log.call("ablation", call, rng.randint(1, 12), "patches", f"{rng.randint(0, 9)},{rng.randint(0, 9)}; 10,12",
                 rng.choice(("neighbours", "zero", "mean")), "auto", "turbo")
        low = round(rng.uniform(0, 0.6), 2)
        log.call("mask", call, low, round(rng.uniform(low + 0.1, 1.0), 2), rng.random() < 0.3,
                 rng.choice((0.0, 1.0)))
        if round_no % 4 == 3:
            log.call("norms_files", call, "auto", 150, True)
            log.call("fusion_files", call, 1, 0.5, 0, 1, "turbo")
            log.call("attention_distance", call)
            log.call("scene3d", call, 60, 0, 1.0, 10.0, 0.05, 20_000, False)
        if i == 0 and time.perf_counter() >= next_export:
            log.call("export", call, MODEL, True, False, False, 0, base)
            next_export = time.perf_counter() + export_every
        if i == 1 and time.perf_counter() >= next_video:
            log.call("video", call, handle_file(str(clip)), MODEL, base, 10, 1, 0, "clip", False, "turbo", "npz")
            next_video = time.perf_counter() + video_every
        round_no += 1


def one_run(tmp: Path, args, extra_env: dict, label: str, minutes: float) -> dict:
    from fixtures import save_fixture_checkpoint

    run_dir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=tmp))
    weights = run_dir / "weights"
    weights.mkdir()
    ckpt = save_fixture_checkpoint("depth_anything_v2_vits", weights)
    pics = picture_pool(run_dir, args.images)
    clip = make_clip(run_dir / "clip.mp4", pics[0][0])
    memlog = run_dir / "memlog.csv"
    proc, url = start_app(run_dir, args.python, weights, app_env(run_dir, DPT_LAB_MEMLOG=str(memlog), **extra_env))
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    log = Log(t0)
    stop_at = t0 + 60 * minutes
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.perf_counter() - t0, proc_status(proc.pid).get("VmRSS", 0) << 10))
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    next_print = 60.0
    try:
        workers = [threading.Thread(target=session_loop, daemon=True,
                                    args=(i, url, pics, args.base, log, stop_at, args.export_every,
                                          run_dir / "downloads", clip, args.video_every))
                   for i in range(args.sessions)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            time.sleep(1)
            if time.perf_counter() - t0 >= next_print and samples:
                print(f"[{label}] {next_print / 60:.0f} min: RSS {samples[-1][1] / 2**30:.2f} GB, "
                      f"{len(log.rows)} requests, {sum(1 for r in log.rows if r[3])} errors", flush=True)
                next_print += 60
        wall = time.perf_counter() - t0
        final = proc_status(proc.pid)
    finally:
        done.set()
        sampler.join()
        stop_app(proc)
    app_log = (run_dir / "app.log").read_text(errors="replace")
    return dict(label=label, env=extra_env, minutes=minutes, rows=log.rows, samples=samples, wall=wall, peak=final.get("VmHWM", 0) << 10,
                weights=ckpt.stat().st_size, allocator=[ln for ln in app_log.splitlines() if "allocator" in ln][:1],
                memlog=read_memlog(memlog))


def read_memlog(path: Path) -> list[dict]:
    """The server's DPT_LAB_MEMLOG rows: time, rss, and the store's kept / reserved / lingering / work."""
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [dict(r, rss=int(r["rss"]), kept=int(r["kept"]), reserved=int(r["reserved"]),
                     lingering=int(r["lingering"]), squeezed=int(r.get("squeezed") or 0), time=float(r["time"]))
                for r in csv.DictReader(f)]


def accounting_lines(memlog: list[dict]) -> list[str]:
    """Where the resident memory went, from the server's own log (every 0.5 s): RSS against
    what the store counted (kept + reserved for work in flight + lingering), the rest being
    the process itself (Python, torch, Gradio, the weights) and whatever no estimate covers."""
    if len(memlog) < 10:
        return []
    gb = 2 ** 30
    base = memlog[0]["rss"]                 # before any request: the process with its weights
    rest = [r["rss"] - r["kept"] - r["reserved"] - r["lingering"] for r in memlog]
    peak = max(range(len(memlog)), key=lambda i: memlog[i]["rss"])
    worst = sorted(range(len(memlog)), key=lambda i: rest[i], reverse=True)[:5]

    def row(i):
        r = memlog[i]
        return (f"RSS {r['rss'] / gb:.2f} = kept {r['kept'] / gb:.2f} + reserved {r['reserved'] / gb:.2f} + "
                f"lingering {r['lingering'] / gb:.2f} + the rest {rest[i] / gb:.2f} GB (work in flight: "
                f"{r['work'] or 'none'}; events: {r.get('events') or 'none'})")

    q = np.percentile(np.asarray(rest) / gb, [50, 99])
    return ["", f"Accounting from the server's log ({len(memlog)} rows, every 0.5 s; the process alone at the start: "
            f"{base / gb:.2f} GB): the rest beyond what the store counts, median {q[0]:.2f} GB, p99 {q[1]:.2f}, max "
            f"{max(rest) / gb:.2f}.", f"- at the highest RSS: {row(peak)}",
            *[f"- the rest at its largest: {row(i)}" for i in worst[:3]], *by_event(memlog, rest),
            f"- the store gave way to the measured rest (store.outside_allowance) in "
            f"{sum(r['squeezed'] > 0 for r in memlog)} of {len(memlog)} samples, by at most "
            f"{max(r['squeezed'] for r in memlog) / gb:.2f} GB"]


def by_event(memlog: list[dict], rest: list[int]) -> list[str]:
    """The rest's median and max over the samples where each endpoint was running (Gradio's queue)."""
    seen = defaultdict(list)
    for r, x in zip(memlog, rest):
        for name in set((r.get("events") or "none").split("+")):
            seen[name].append(x)
    if set(seen) <= {"none"}:
        return []
    gb = 2 ** 30
    return ["- the rest while each endpoint ran (samples, median, max GB): " + ", ".join(
        f"{name} {len(xs)}, {np.median(xs) / gb:.2f}, {max(xs) / gb:.2f}"
        for name, xs in sorted(seen.items(), key=lambda kv: -max(kv[1])))]


def window_growth(samples, window_min: float) -> tuple[float, float, float]:
    """(RSS at the window's start, at its end, growth in %) from the least-squares line
    through the window's per-second samples: a request in flight at either end moves one
    sample by hundreds of MB, the trend is what the goal is about."""
    end = samples[-1][0]
    t, r = zip(*[(t, r) for t, r in samples if t >= end - 60 * window_min])
    slope, intercept = np.polyfit(np.asarray(t), np.asarray(r, dtype=np.float64), 1)
    a, b = intercept + slope * t[0], intercept + slope * t[-1]
    return a, b, 100 * (b - a) / a


def report(run: dict, args) -> list[str]:
    rows, samples = run["rows"], run["samples"]
    by = defaultdict(list)
    errs: dict[str, list] = defaultdict(list)
    for endpoint, _, lat, err in rows:
        by[endpoint].append(lat)
        if err:
            errs[endpoint].append(err)
    a, b, growth = window_growth(samples, min(args.window, run["minutes"]))
    peak_goal = run["weights"] + CACHE_BYTES + (1 << 30)
    rps = len(rows) / run["wall"]
    gb = 2 ** 30
    lines = [f"### {run['label']}" + (f" ({', '.join(f'{k}={v}' for k, v in run['env'].items())})" if run['env'] else ""),
             "", f"Server console: {run['allocator'][0].strip() if run['allocator'] else '(no allocator line)'}", "",
             "| endpoint | requests | errors | p50 ms | p95 ms | max ms |", "|---|---|---|---|---|---|"]
    for endpoint in ENDPOINTS:
        lat = by.get(endpoint)
        if not lat:
            continue
        q = np.percentile(np.asarray(lat) * 1000, [50, 95])
        lines.append(f"| /{endpoint} | {len(lat)} | {len(errs[endpoint])} | {q[0]:.0f} | {q[1]:.0f} | "
                     f"{1000 * max(lat):.0f} |")
    lines += ["", f"Requests: {len(rows)} in {run['wall'] / 60:.1f} min ({rps:.2f} per second), errors: "
              f"{sum(len(v) for v in errs.values())}."]
    for endpoint, v in errs.items():
        if v:
            lines.append(f"- /{endpoint} error, e.g.: {v[0]}")
    lines += ["", "| minute | server RSS GB |", "|---|---|"]
    for m in range(0, int(run["wall"] // 60) + 1):
        near = [r for t, r in samples if m * 60 <= t < m * 60 + 5]
        if near:
            lines.append(f"| {m} | {near[0] / gb:.2f} |")
    lines += ["", f"- RSS over the last {min(args.window, run['minutes']):g} min (least-squares line): "
              f"{a / gb:.2f} -> {b / gb:.2f} GB, growth {growth:+.1f}% (goal < 5%); range of the samples there "
              f"{min(r for t, r in samples if t >= samples[-1][0] - 60 * args.window) / gb:.2f}-"
              f"{max(r for t, r in samples if t >= samples[-1][0] - 60 * args.window) / gb:.2f} GB",
              f"- peak RSS (VmHWM): {run['peak'] / gb:.2f} GB; goal <= weights {run['weights'] / gb:.2f} + cap "
              f"{CACHE_BYTES / gb:.0f} + 1 GB = {peak_goal / gb:.2f} GB: {'met' if run['peak'] <= peak_goal else 'MISSED'}",
              *accounting_lines(run.get("memlog") or []), ""]
    run["rps"] = rps
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--base", type=int, default=518)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--export-every", type=float, default=600, help="seconds between exports (0: none)")
    ap.add_argument("--video-every", type=float, default=300, help="seconds between /video jobs of a 2 s clip (0: none)")
    ap.add_argument("--window", type=float, default=10, help="minutes at the end over which growth is measured")
    ap.add_argument("--reference", action="store_true", help="first run a server with DPT_LAB_MALLOC=off")
    ap.add_argument("--reference-minutes", type=float, default=None, help="length of the reference run")
    ap.add_argument("--env", action="append", default=[], help="K=V for the measured server")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.md"))
    args = ap.parse_args()
    if args.sessions < 1 or args.minutes <= 0:
        ap.error("--sessions must be at least 1 and --minutes positive")
    args.window = min(args.window, args.minutes)
    extra = dict(kv.split("=", 1) for kv in args.env)

    runs = []
    with tempfile.TemporaryDirectory(prefix="dpt_lab_soak_") as tmp:
        ref_minutes = args.reference_minutes or args.minutes
        if args.reference:
            runs.append(one_run(Path(tmp), args, {"DPT_LAB_MALLOC": "off"}, "reference", ref_minutes))
        runs.append(one_run(Path(tmp), args, extra, "measured", args.minutes))

    cmd = "python bench/soak.py " + " ".join(
        [f"--sessions {args.sessions}", f"--minutes {args.minutes:g}", f"--base {args.base}",
         f"--images {args.images}", f"--export-every {args.export_every:g}", f"--video-every {args.video_every:g}",
         f"--window {args.window:g}"]
        + ([f"--reference --reference-minutes {ref_minutes:g}"] if args.reference else [])
        + [f"--env {kv}" for kv in args.env])
    lines = ["## Soak: every endpoint, many sessions, a long time", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"python {platform.python_version()}. Command: `{cmd}`.", ""]
    for run in runs:
        lines += report(run, args)
    if args.reference:
        ref, meas = runs
        same = [r for r in meas["rows"] if r[1] + r[2] <= 60 * ref["minutes"]]
        lines.append(f"Throughput over the first {ref['minutes']:g} min, measured / reference: "
                     f"{len(same) / (60 * ref['minutes']) / (len(ref['rows']) / ref['wall']):.3f} "
                     f"(whole runs: {meas['rps']:.2f} / {ref['rps']:.2f} req/s).")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".csv").write_text("run,seconds,rss_bytes\n" + "".join(
        f"{run['label']},{t:.1f},{r}\n" for run in runs for t, r in run["samples"]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
