"""The server's resident memory under traffic: glibc's allocator, kept in check from inside
the process.

Why: a forward at 518 allocates and frees tensors of tens of MB. glibc serves a block of
128 KiB or more with its own mmap and gives it back on free, but after such a free it
raises that threshold to the freed size (up to 32 MiB), so later tensors of that size come
from its heap arenas (up to 8 per core, one per thread at a time, and Gradio runs
handlers on many threads). Freed arena memory stays resident: a server's RSS grew from
3.5 GB to 8.4 GB in six minutes of traffic.

What is done (measured in BENCHMARKS.md, "Memory under traffic"): after every request the
app calls `release_soon()`, and once requests pause (QUIET_S without one ending, or LATEST_S
after the first, under steady traffic) a background thread's `release()` hands the free
pages of every arena back to the OS with malloc_trim(3); `configure()` caps the arenas at
ARENA_MAX with mallopt(3), so the memory one thread's request freed is reused by the next
request on another thread. Why not trim at once after each request: the pages handed back
are the ones the next request would reuse, and it faults them in again (a fusion slider
move at 518: ~13k more page faults, 0-10% of its time in bench/trim.py, 267 -> 216 ms for
the page's quick answer; BENCHMARKS.md "Trimming when requests pause"). The store trims at
once when it measures the process over its allowance. The
dynamic mmap threshold is kept on purpose: fixing it (M_MMAP_THRESHOLD, or any of
M_TRIM_THRESHOLD / M_TOP_PAD / M_MMAP_MAX, which also turn it off) maps and faults in
every large tensor afresh, 15-20% of the throughput. Both are plain glibc calls through
ctypes: they hold wherever the app runs on glibc (a Hugging Face Space included) and need
no environment variable set before the process starts. On another C library nothing
happens and `state()` says so. The library on its own never touches the allocator; the
app does (app.build_app).

    memory.configure()            # idempotent; DPT_LAB_MALLOC=off leaves glibc alone
    memory.release_soon()         # after a request: free pages back to the OS when requests pause
    memory.release()              # free pages back to the OS now
    memory.state()                # what is in force: arenas counted by malloc_info(3)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Optional

M_ARENA_MAX = -8             # mallopt(3) parameter (malloc.h)
ARENA_MAX = 2                # arenas for all threads: the app runs 2 model events at once
QUIET_S = 2.0                # release_soon: trim once no request has ended for this long,
LATEST_S = 10.0              # or this long after the first request since the last trim


@dataclass
class AllocatorState:
    """What configure() set and what the allocator shows now."""

    allocator: str                     # "glibc 2.36", or "not glibc"
    mode: str                          # "tuned", "off" (left as it is), "unsupported", "not configured"
    arena_max: Optional[int] = None    # the cap set (tuned)
    arenas: int = 0                    # arenas that exist now (malloc_info)
    trims: int = 0                     # malloc_trim calls so far

    @property
    def in_force(self) -> bool:
        return self.mode == "tuned" and 0 < self.arenas <= (self.arena_max or 0)

    def line(self) -> str:
        if self.mode != "tuned":
            return f"allocator {self.allocator}: left as it is ({self.mode})"
        return (f"allocator {self.allocator}: M_ARENA_MAX={self.arena_max} ({self.arenas} in use), malloc_trim "
                f"when requests pause ({QUIET_S:g} s quiet, {LATEST_S:g} s at most); "
                f"{'in force' if self.in_force else 'NOT in force'}")


_lock = threading.Lock()
_libc = None
_mode: Optional[str] = None
_trims = 0


def _glibc():
    """The process' glibc (its allocator calls typed for ctypes), or None elsewhere."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.gnu_get_libc_version.restype = ctypes.c_char_p
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
            lib.open_memstream.restype = ctypes.c_void_p
            lib.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
            lib.fclose.argtypes = [ctypes.c_void_p]
            lib.free.argtypes = [ctypes.c_void_p]
            lib.gnu_get_libc_version()
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def malloc_info() -> str:
    """glibc's malloc_info(3) XML: one <heap> per arena, with its sizes ('' elsewhere)."""
    lib = _glibc()
    if lib is None:
        return ""
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = lib.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return ""
    lib.malloc_info(0, stream)
    lib.fclose(stream)
    try:
        return ctypes.string_at(buf, size.value).decode("ascii", "replace")
    finally:
        lib.free(ctypes.cast(buf, ctypes.c_void_p))


def arena_count() -> int:
    return len(re.findall(r"<heap nr=", malloc_info()))


def configure(mode: Optional[str] = None) -> AllocatorState:
    """Cap glibc's arenas and turn on release() (once per process). mode: None reads
    $DPT_LAB_MALLOC ("tuned", the default, or "off")."""
    global _mode
    mode = (mode or os.environ.get("DPT_LAB_MALLOC") or "tuned").strip().lower()
    if mode not in ("tuned", "off"):
        raise ValueError(f"DPT_LAB_MALLOC must be 'tuned' or 'off', got {mode!r}")
    with _lock:
        if _mode is None:
            lib = _glibc()
            if lib is None:
                _mode = "unsupported"
            elif mode == "tuned" and lib.mallopt(M_ARENA_MAX, ARENA_MAX) == 1:
                _mode = "tuned"
            else:
                _mode = "off" if mode == "off" else "unsupported"
    return state()


_due = threading.Condition()      # release_soon's schedule, read by the trimming thread
_owed_since: Optional[float] = None   # monotonic time of the first request since the last trim
_last_end = 0.0                        # ... and of the latest one
_trimmer: Optional[threading.Thread] = None


def release() -> None:
    """Give the free pages of every arena back to the OS (malloc_trim) now, when configured
    (a trim release_soon owes is made by it)."""
    global _trims, _owed_since
    if _mode != "tuned":
        return
    with _due:
        _owed_since = None
    _glibc().malloc_trim(0)
    with _lock:
        _trims += 1


def release_soon() -> None:
    """After a request: its freed pages go back to the OS (release) once requests pause,
    QUIET_S after the latest one ended, or LATEST_S after the first one since the last trim,
    whichever comes first, from a background thread (see the module doc for why)."""
    global _owed_since, _last_end, _trimmer
    if _mode != "tuned":
        return
    with _due:
        _last_end = time.monotonic()
        if _owed_since is None:
            _owed_since = _last_end
        if _trimmer is None or not _trimmer.is_alive():
            _trimmer = threading.Thread(target=_trim_when_due, name="dpt-lab-trim", daemon=True)
            _trimmer.start()
        _due.notify()


def _trim_when_due() -> None:
    global _owed_since
    while True:
        with _due:
            while _owed_since is None:
                _due.wait()
            wait = min(_last_end + QUIET_S, _owed_since + LATEST_S) - time.monotonic()
            if wait > 0:
                _due.wait(wait)        # a request ending meanwhile moves the quiet deadline
                continue
            _owed_since = None
        release()


def trim_owed() -> bool:
    """A release_soon() is waiting for its trim."""
    with _due:
        return _owed_since is not None


def state() -> AllocatorState:
    lib = _glibc()
    name = f"glibc {lib.gnu_get_libc_version().decode()}" if lib else "not glibc"
    mode = _mode or "not configured"
    return AllocatorState(name, mode, ARENA_MAX if mode == "tuned" else None, arena_count(), _trims)


def rss_bytes() -> int:
    """This process' resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def start_log(path, fields, every_s: float = 0.5) -> threading.Thread:
    """Append a CSV row to `path` every `every_s` seconds (a daemon thread): the time, this
    process' RSS and the columns of `fields()` (the app passes store.accounting: what the
    store counts beside what is resident; DPT_LAB_MEMLOG, read by bench/soak.py)."""
    import csv

    def run():
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            header = None
            while True:
                row = dict(time=f"{time.time():.3f}", rss=rss_bytes(), **fields())
                if header is None:
                    header = list(row)
                    out.writerow(header)
                out.writerow([row.get(k, "") for k in header])
                f.flush()
                time.sleep(every_s)

    thread = threading.Thread(target=run, name="dpt-lab-memlog", daemon=True)
    thread.start()
    return thread
