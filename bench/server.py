"""Start and stop `python app.py` as a subprocess for the benchmarks, and read its /proc
figures. Torch-free (bench/startup.py times the app's start and must not load torch)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_ENV_DROPPED = ("DPT_LAB_MODEL", "DPT_LAB_WEIGHTS", "DPT_LAB_CACHE_MB", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process from /proc."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc), NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def app_env(tmp: Path, **extra: str) -> dict:
    """The app's environment: offline, a private HF_HOME and Gradio cache under `tmp`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"), GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(tmp / "gradio"))
    for k in APP_ENV_DROPPED:
        env.pop(k, None)
    env.update(extra)
    return env


def start_app(tmp: Path, python: str, weights: Path, env: dict, timeout: float = 180,
              log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`python app.py --weights-dir weights` on a free port; returns once /config answers.
    The console goes to `log` (default tmp/app.log), so a long run cannot fill a pipe."""
    port = free_port()
    log = log or tmp / "app.log"
    out = open(log, "w")
    proc = subprocess.Popen([python, str(ROOT / "app.py"), "--port", str(port), "--weights-dir", str(weights)],
                            cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    out.close()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if http_status(url + "config", timeout=2) == 200:
            return proc, url
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s")


def stop_app(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
