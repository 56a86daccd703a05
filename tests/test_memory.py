"""The allocator setting (dpt_lab.memory) is in force in the server process, and it is what
keeps freed tensor memory from staying resident."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpt_lab import memory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(memory._glibc() is None, reason="the allocator settings are glibc's")

# A pattern that strands memory in glibc's heap by default: blocks of a few MiB (the first
# free raises the mmap threshold past them), each round followed by a small block that
# outlives them and pins the heap top; release() after each round, as after a request.
FRAGMENT = """
import sys, numpy as np
from dpt_lab import memory
memory.configure(sys.argv[1])
keep, start = [], memory.rss_bytes()
for _ in range(20):
    big = [np.ones(3 << 20, np.uint8) for _ in range(8)]
    keep.append(np.ones(64 << 10, np.uint8))
    del big
    memory.release()
print((memory.rss_bytes() - start) >> 20)
"""

# Eight threads alive at once, each allocating: by default each gets an arena of its own.
THREADS = """
import sys, threading, numpy as np
from dpt_lab import memory
memory.configure(sys.argv[1])
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    blocks = [np.ones(1 << 16, np.uint8) for _ in range(50)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(memory.arena_count())
"""


def run(code: str, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_release_returns_freed_blocks_and_glibc_alone_does_not():
    assert run(FRAGMENT, "off") >= 15          # glibc's default keeps a round's blocks (24 MiB) resident
    assert run(FRAGMENT, "tuned") <= 5         # malloc_trim after each round: back to the OS


def test_arenas_are_capped():
    assert run(THREADS, "off") > memory.ARENA_MAX
    assert 1 <= run(THREADS, "tuned") <= memory.ARENA_MAX


def test_the_server_process_runs_with_the_tuned_allocator(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    for k in ("DPT_LAB_MODEL", "DPT_LAB_MALLOC", "DPT_LAB_WEIGHTS"):
        env.pop(k, None)
    from app_server import free_port

    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(free_port()), "--weights-dir",
                             str(tmp_path / "weights")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "allocator" in line:
                break
    finally:
        proc.terminate()
        proc.wait(30)
    said = [ln for ln in lines if "allocator" in ln]
    assert said, "".join(lines)[-2000:]
    assert f"M_ARENA_MAX={memory.ARENA_MAX}" in said[0] and "malloc_trim when requests pause" in said[0]
    assert said[0].rstrip().endswith("; in force")
    store_line = [ln for ln in lines if "feature store" in ln]      # the store measures the process too
    assert store_line and "giving way to the process' RSS past its weights + 0.75 GiB" in store_line[0], lines


def test_configure_checks_its_mode():
    with pytest.raises(ValueError, match="DPT_LAB_MALLOC"):
        memory.configure("sometimes")


def _record_trims(monkeypatch, quiet_s: float, latest_s: float) -> list:
    """release_soon's schedule shortened, with its trims recorded (their monotonic times)
    instead of made; the trimming thread looks these module names up on each round."""
    trims: list = []
    monkeypatch.setattr(memory, "_mode", "tuned")
    monkeypatch.setattr(memory, "release", lambda: trims.append(time.monotonic()))
    monkeypatch.setattr(memory, "QUIET_S", quiet_s)
    monkeypatch.setattr(memory, "LATEST_S", latest_s)
    return trims


def _until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_trim_waits_until_requests_pause(monkeypatch):
    """A trim hands back the pages the next request would reuse (and fault in again), so
    requests in quick succession trim once, QUIET_S after the last of them."""
    trims = _record_trims(monkeypatch, quiet_s=0.3, latest_s=60)
    for _ in range(6):                 # requests ending 0.1 s apart: no pause between them
        memory.release_soon()
        time.sleep(0.1)
    last = time.monotonic() - 0.1
    assert trims == [] and memory.trim_owed()
    assert _until(lambda: trims)
    time.sleep(0.4)
    assert len(trims) == 1 and trims[0] - last >= 0.3 - 0.02 and not memory.trim_owed()


def test_steady_traffic_still_trims(monkeypatch):
    """Requests that never pause still trim, LATEST_S after the first one since the last trim."""
    trims = _record_trims(monkeypatch, quiet_s=0.3, latest_s=0.5)
    start = time.monotonic()
    while time.monotonic() - start < 1.3:
        memory.release_soon()
        time.sleep(0.05)
    assert 2 <= len(trims) <= 3
    assert all(0.5 - 0.02 <= t - s <= 0.5 + 0.2 for s, t in zip([start, *trims], trims))
    assert _until(lambda: not memory.trim_owed())


def test_without_the_tuned_allocator_nothing_is_scheduled(monkeypatch):
    trims = _record_trims(monkeypatch, quiet_s=0.05, latest_s=0.05)
    monkeypatch.setattr(memory, "_mode", "off")
    memory.release_soon()
    time.sleep(0.2)
    assert trims == [] and not memory.trim_owed()


def test_the_memory_log_writes_rss_beside_the_stores_accounting(tmp_path):
    """DPT_LAB_MEMLOG: a row every interval with the RSS and what the store counts, including
    the work in flight named by its reservation."""
    import csv

    from dpt_lab.store import FeatureStore

    store = FeatureStore(max_bytes=1 << 30)
    path = tmp_path / "memlog.csv"
    # The RSS is sampled around the log's rows, not once after them: memory freed by an earlier
    # test can go back to the OS meanwhile (CI saw 3.6 GB in the row and 2.2 GB a moment later).
    seen = [memory.rss_bytes()]
    with store.reserve(123_456, "export"):
        memory.start_log(path, store.accounting, every_s=0.05)
        deadline = time.time() + 10
        while time.time() < deadline and len(path.read_text().splitlines() if path.exists() else []) < 3:
            seen.append(memory.rss_bytes())
            time.sleep(0.05)
    seen.append(memory.rss_bytes())
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"time", "rss", "kept", "reserved", "lingering", "work", "squeezed"}
    first = rows[0]
    assert 0.9 * min(seen) <= int(first["rss"]) <= 1.1 * max(seen)
    assert (first["kept"], first["reserved"], first["lingering"], first["work"]) == ("0", "123456", "0", "export")
    assert store.accounting() == dict(kept=0, reserved=0, lingering=0, work="", squeezed=0)
