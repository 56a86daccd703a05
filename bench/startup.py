"""Startup time of the web app: from `python app.py` to the page answering HTTP 200.

    python bench/startup.py [--runs 5] [--timeout 60] [--out bench/results/startup.md]

Each run starts `python app.py --port P --weights-dir EMPTY` as a subprocess (offline:
HF_HUB_OFFLINE=1, an empty HF_HOME and an empty weights folder, so the app builds the
random Depth-Anything-V2-S model), polls GET http://127.0.0.1:P/ every 50 ms, and records
the seconds from the spawn to the first 200. It also records when the console says the
model is picked, and the time until /config answers (the page's components). The
process is then ended (SIGTERM to the process it started). Median of --runs runs; goal
under 8 s. Writes a Markdown table to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import ROOT, app_env, cpu_seconds, free_port, http_status, stop_app  # noqa: E402

GOAL_S = 8.0


def one_run(python: str, timeout: float) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dpt_lab_startup_") as tmp:
        weights = Path(tmp) / "weights"
        weights.mkdir()
        env = app_env(Path(tmp), DPT_LAB_WEIGHTS=str(weights))
        cmd = [python, str(ROOT / "app.py"), "--port", str(port), "--weights-dir", str(weights)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        page = config = cpu = None
        try:
            while time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
                if page is None and http_status(f"http://127.0.0.1:{port}/") == 200:
                    page = time.perf_counter() - t0
                    cpu = cpu_seconds(proc.pid)
                if page is not None and http_status(f"http://127.0.0.1:{port}/config") == 200:
                    config = time.perf_counter() - t0
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"no HTTP 200 within {timeout:g} s")
        finally:
            stop_app(proc)
    return {"page": page, "config": config, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "startup.md"))
    args = ap.parse_args()
    if args.runs < 3:
        ap.error("--runs must be at least 3")

    runs = []
    for i in range(args.runs):
        r = one_run(args.python, args.timeout)
        runs.append(r)
        print(f"run {i + 1}: page {r['page']:.2f} s (CPU {r['cpu']:.2f} s), /config {r['config']:.2f} s", flush=True)
    pages = [r["page"] for r in runs]
    configs = [r["config"] for r in runs]
    cpus = [r["cpu"] for r in runs]
    med = statistics.median(pages)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    verdict = "ok" if med < GOAL_S else "MISSED"
    lines = [
        "## Startup: `python app.py` to HTTP 200",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
        f"1-min load average at the end: {load:.2f}.",
        f"Command: `python bench/startup.py --runs {args.runs}` (offline, empty weights folder: random "
        f"Depth-Anything-V2-S weights, untrained banner).",
        "",
        "| measure | median | min | max | goal |",
        "|---|---|---|---|---|",
        f"| spawn -> GET / answers 200 | {med:.2f} s | {min(pages):.2f} s | {max(pages):.2f} s | "
        f"< {GOAL_S:g} s ({verdict}) |",
        f"| spawn -> GET /config answers 200 | {statistics.median(configs):.2f} s | {min(configs):.2f} s | "
        f"{max(configs):.2f} s | |",
        f"| CPU time of the app process when / first answers (user + sys) | {statistics.median(cpus):.2f} s | "
        f"{min(cpus):.2f} s | {max(cpus):.2f} s | |",
        "",
        "The wall time depends on what else runs on the machine (see the load average above); the",
        "CPU time is what the startup itself costs, about the wall time on an idle machine.",
        "The page is built without importing torch (dpt_lab loads it lazily); torch and the model",
        "load in a background thread once the server is up, and the first request waits for them.",
        "",
        "Runs (page, s): " + ", ".join(f"{p:.2f}" for p in pages),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
