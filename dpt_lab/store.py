"""Each session's one recorded encode, in a store bounded in bytes over all sessions.

    store = FeatureStore(max_bytes=2 << 30)      # or $DPT_LAB_CACHE_MB
    entry = store.get_or_compute(session, key, compute)
    with store.using(entry):                     # work that may grow the entry (caches)
        ...

An Entry holds the preprocessed input and its meta, the AttentionProbe of ONE recorded
encode (attention q/k, per-block token norms, the decoder's four maps and its fusion
inputs) and the unscaled depth; what the tabs derive from it later (the attention column
normalisers, the norms, rendered images in `entry.cache`) lives in it too. Its size is
measured by walking everything it keeps alive (`measure`: tensors by storage, NumPy
arrays by buffer, each counted once), when it is stored and again after every use that
may have grown it, so the byte count the cap is checked against is what the entry really
holds. An entry larger than the cap on its own is handed out but not kept.

The cap bounds the work in flight too: `with store.reserving(model, pixels):` around an
encode sets aside its estimated peak (WORKING_SET_FACTOR x the bytes per input pixel of
that model's largest entry), `with store.reserve(nbytes):` any other estimate (an export,
a rollout's matrices), and least recently used entries are evicted until what is kept
plus what is reserved fits under the cap. So two wide images encoded at once, or an
export beside them, do not add their working sets on top of a full store; when an empty
store still leaves no room, a reservation waits (up to RESERVE_WAIT_S) for the work in
flight to end. An entry that
is evicted while a request still holds it stays alive until that request ends: it counts
against the cap ("lingering", followed by a weak reference) until its last reference goes.

What no estimate covers is measured: with `store.outside_allowance` set (a callable: the
bytes the process may hold beyond what the store counts, e.g. the weights plus
PROCESS_ALLOWANCE_BYTES; app.main sets it for the server), every fit reads the process' RSS, and
what the process holds past counted + allowance (allocator slack, a library's caches, a
one-time import, output processing, work past its estimate) comes off the cap until it
goes. `store.watch()` runs that fit every WATCH_S seconds on a thread of its own, so a
spike between two requests is answered too.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

DEFAULT_CACHE_BYTES = 2 << 30
RESERVE_WAIT_S = 5.0         # the longest a reservation waits for room before going ahead
ENDED_KEPT = 10_000          # closed sessions remembered (a few hundred kB)
# An encode's peak working set against the entry it leaves: the entry itself plus the
# transients (decoder maps at full resolution, the MLP's hidden layer, the resize back).
# bench/working_set.py: 2.5-2.6x for ViT-S on the wide inputs that cost the most, 3-3.8x
# on small ones, where fixed costs weigh more but the bytes are few; 3x covers the large.
WORKING_SET_FACTOR = 3.0
# What the server process holds beyond its weights and what the store counts, before the store
# gives way (outside_allowance): Python, torch and Gradio (~0.35 GiB at rest), the packed weight
# copies, allocator slack. Soak of 8 sessions (bench/soak.py, ViT-S): median 0.42 GiB beyond the
# weights, p99 1.0; 0.75 leaves a quarter GiB of the goal (weights + cap + 1 GiB) for what
# happens between two fits.
PROCESS_ALLOWANCE_BYTES = 768 << 20
WATCH_S = 0.25               # store.watch(): how often the RSS is checked between requests
# The decoder alone (fusion scaling, ablation's tail, the mask's first depth): its maps at
# full resolution, about one entry's bytes per pixel (bench/memory_ops.py).
DECODE_FACTOR = 1.0


@dataclass
class Entry:
    """One image encoded by one model at one size: everything every tab needs."""

    key: tuple                      # (model, image hash, base size, keep_aspect)
    model_name: str
    info: Any                       # ModelInfo
    meta: Any                       # imaging.PreprocessMeta
    x: Any                          # 1 x 3 x h x w input tensor
    probe: Any                      # attention.AttentionProbe (its .features: maps, cls, blocks)
    depth: Any                      # 1 x h x w unscaled depth (decoder output)
    depth_image: np.ndarray         # H x W float32 at the image's size
    encode_s: float = 0.0
    nbytes: int = 0                 # measured by the store (see measure)
    cache: dict = field(default_factory=dict)    # what the tabs derive from the encode, by name
    # held while a view is made once for two callers at once (the page's quick path and its Gradio event)
    lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def feats(self):
        return self.probe.features

    def cached(self, name: str, make: Callable[[], Any]) -> Any:
        """`make()` once per entry, kept in `cache` (counted in the entry's bytes)."""
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]

    def norms(self):
        """Per-block token norms from the recorded encode (computed once, no second encode)."""
        from . import norms

        return self.cached("norms", lambda: norms.norms_from_features(self.feats))

    def measure(self) -> int:
        """Bytes this entry keeps alive (see `measure`); its features are reached through
        the probe, named here too in case a probe holds them other than as an attribute."""
        return measure((self, self.feats))


_later = threading.local()


@contextmanager
def measured_later():
    """In this thread, `FeatureStore.using` only notes the entries it would measure; the block
    yields that list of (store, entry), for `remeasure_all` once the caller has answered.
    Why: walking an entry that holds figures takes ~5-10 ms, which a page's click would
    otherwise wait for (dpt_lab/ui/quick.py measures after its response is sent)."""
    outer = getattr(_later, "entries", None)
    _later.entries = pending = []
    try:
        yield pending
    finally:
        _later.entries = outer


def remeasure_all(pending) -> None:
    """Measure what a `measured_later` block left, once per entry."""
    done: set[int] = set()
    for store, entry in pending:
        if id(entry) not in done:
            done.add(id(entry))
            store.remeasure(entry)


def _pixels(x) -> int:
    shape = getattr(x, "shape", ())
    return int(shape[-2]) * int(shape[-1]) if len(shape) >= 2 else 0


def _not_walked(obj) -> bool:
    """Objects an entry may point at that are not its own memory: models (shared by every
    session, counted by the model manager), modules, classes, functions, weak references."""
    import types

    import torch

    return isinstance(obj, (torch.nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType,
                            weakref.ref, torch.dtype, torch.device))


def measure(obj, max_depth: int = 12) -> int:
    """Bytes of the tensors and NumPy arrays reachable from `obj` through containers,
    dataclasses and object attributes: the union of their memory, so a buffer shared by
    views, or by a tensor and the array made from it, counts once (a view counts its
    whole base)."""
    import torch

    seen: set[int] = set()
    spans: list[tuple[int, int]] = []          # (address, bytes) of every storage / buffer
    stack = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if o is None or isinstance(o, (str, bytes, int, float, bool, complex)) or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            spans.append((st.data_ptr(), st.nbytes()))
            continue
        if isinstance(o, np.ndarray):
            base = o
            while isinstance(base.base, np.ndarray):
                base = base.base
            spans.append((base.__array_interface__["data"][0], base.nbytes))
            continue
        if depth >= max_depth or _not_walked(o):
            continue
        if isinstance(o, dict):
            children = list(o.keys()) + list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            children = list(o)
        elif dataclasses.is_dataclass(o):
            children = [getattr(o, f.name, None) for f in dataclasses.fields(o)]
            children += list(getattr(o, "__dict__", {}).values())
        elif hasattr(o, "__dict__") or hasattr(type(o), "__slots__"):
            children = list(getattr(o, "__dict__", {}).values())
            for slot in getattr(type(o), "__slots__", ()):
                children.append(getattr(o, slot, None))
        else:
            continue
        stack.extend((c, depth + 1) for c in children)
    return _union_bytes(spans)


def _union_bytes(spans: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for start, size in sorted(spans):
        stop = start + size
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


class FeatureStore:
    """Byte-bounded LRU of encodes over all sessions, keyed by (session id, entry key)."""

    def __init__(self, max_bytes: Optional[int] = None, max_per_session: int = 2):
        env = os.environ.get("DPT_LAB_CACHE_MB")
        self.max_bytes = int(max_bytes if max_bytes is not None else (int(env) << 20 if env else DEFAULT_CACHE_BYTES))
        self.max_per_session = max(1, int(max_per_session))
        self._entries: "OrderedDict[tuple[str, tuple], Entry]" = OrderedDict()
        self._lock = threading.Lock()
        self._session_locks: dict[str, threading.RLock] = {}
        # sessions whose page closed (Gradio's session hashes are not reused): a background job that
        # still asks for one gets its entry computed but not kept, and leaves no lock behind
        self._ended: "OrderedDict[str, None]" = OrderedDict()
        self.encodes = 0
        self.too_large = 0          # entries handed out but not kept (larger than the cap alone)
        self.reserved = 0           # bytes set aside for encodes in flight (see reserving)
        self._bytes_per_pixel: dict[str, float] = {}    # by model: the largest entry per input pixel seen
        # entries no longer kept but still alive (a handler in flight holds one): (weak reference, bytes);
        # they count against the cap until the last reference goes
        self._lingering: list[tuple[weakref.ref, int]] = []
        self._work: dict[int, str] = {}              # what each reservation in flight is for
        self._room = threading.Condition(self._lock)  # signalled when a reservation ends
        self.waits = 0              # times a reservation waited for room
        # bytes the process may hold beyond what the store counts (None: not measured; see the module doc)
        self.outside_allowance: Optional[Callable[[], int]] = None
        self.squeezed = 0           # what the last fit took off the cap: RSS past counted + allowance
        self.squeezes = 0           # fits that took something off

    @property
    def nbytes(self) -> int:
        """Bytes of the entries kept."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    @property
    def lingering(self) -> int:
        """Bytes of entries evicted (or never kept) that something still holds: work in flight."""
        with self._lock:
            return self._lingering_bytes()

    def _lingering_bytes(self) -> int:
        """Holds the lock."""
        self._lingering = [(ref, n) for ref, n in self._lingering if ref() is not None]
        return sum(n for _, n in self._lingering)

    def _evict(self, key: tuple) -> int:
        """Stop keeping an entry; it counts as lingering while anything still holds it. Holds the lock."""
        entry = self._entries.pop(key)
        self._lingering.append((weakref.ref(entry), entry.nbytes))
        return entry.nbytes

    def sessions(self) -> set[str]:
        with self._lock:
            return {s for s, _ in self._entries}

    def entries(self, session: str) -> list[Entry]:
        with self._lock:
            return [e for (s, _), e in self._entries.items() if s == session]

    def get(self, session: str, key: tuple) -> Optional[Entry]:
        with self._lock:
            e = self._entries.get((session, key))
            if e is not None:
                self._entries.move_to_end((session, key))
            return e

    def get_or_compute(self, session: str, key: tuple, compute: Callable[[], Entry]) -> Entry:
        """The entry for (session, key), computing it (once, even with concurrent events of
        the same session) when missing. Older entries are evicted to stay under max_bytes."""
        hit = self.get(session, key)
        if hit is not None:
            return hit
        with self._lock:
            if session in self._ended:      # a late call of a closed session (a background job): not kept
                ended = True
            else:
                ended = False
                lock = self._session_locks.setdefault(session, threading.RLock())
        if ended:
            entry = compute()
            entry.nbytes = entry.measure()
            with self._lock:
                self.encodes += 1
                self._lingering.append((weakref.ref(entry), entry.nbytes))     # alive while the job holds it
            return entry
        with lock:
            hit = self.get(session, key)
            if hit is not None:
                return hit
            entry = compute()
            entry.nbytes = entry.measure()
            with self._lock:
                self.encodes += 1
                pixels = _pixels(entry.x)
                if pixels:
                    seen = self._bytes_per_pixel.get(entry.model_name, 0.0)
                    self._bytes_per_pixel[entry.model_name] = max(seen, entry.nbytes / pixels)
                self._entries[(session, key)] = entry
                mine = [k for k in self._entries if k[0] == session]
                for k in mine[:-self.max_per_session]:
                    self._evict(k)
                self._fit((session, key))
            return entry

    def working_set(self, model_name: str, pixels: int, factor: float = WORKING_SET_FACTOR) -> int:
        """Estimated peak bytes of work on `pixels` input pixels with this model: `factor` x
        the bytes per input pixel of its largest entry (0 until the store has seen one)."""
        with self._lock:
            return int(factor * self._bytes_per_pixel.get(model_name, 0.0) * pixels)

    def reserving(self, model_name: str, pixels: int, factor: float = WORKING_SET_FACTOR, what: str = "encode",
                  keep: Optional[Entry] = None):
        """`reserve` the estimated working set of model work on `pixels` input pixels (an
        encode: the default factor; the decoder alone: DECODE_FACTOR)."""
        return self.reserve(self.working_set(model_name, pixels, factor), what, keep=keep)

    @contextmanager
    def reserve(self, nbytes: int, what: str = "work", wait_s: Optional[float] = None, keep: Optional[Entry] = None):
        """Set aside `nbytes` for work in flight (an encode, an export, a rollout) while it
        runs, evicting least recently used entries so that kept + lingering + reserved bytes
        stay under the cap: the cap bounds the transients as well as what is kept. When even
        an empty store leaves no room (other work in flight, entries still held), it waits up
        to `wait_s` (default RESERVE_WAIT_S) for that work to end, then goes ahead anyway
        (work that holds an entry may be what it waits for). When the work ends, its freed
        memory goes back to the OS once requests pause (memory.release_soon: the next
        decode of a slider drag reuses those pages); a fit that finds the process over its
        allowance before then trims at once (_squeeze), so what was freed is not counted. `what`
        names the work in `accounting()`; `keep`: the entry the work is on, never evicted for it."""
        from . import memory

        need = max(0, int(nbytes))
        token = object()
        deadline = time.monotonic() + (RESERVE_WAIT_S if wait_s is None else wait_s)
        with self._room:
            while True:
                self.reserved += need
                self._fit(self._key_of(keep))
                others = self.reserved > need or self._lingering_bytes() > 0
                if self._total() <= self.max_bytes - self.squeezed or not others or time.monotonic() >= deadline:
                    break
                self.reserved -= need
                self.waits += 1
                self._room.wait(0.05)      # entries still held go without a signal: look again soon
            self._work[id(token)] = what
        try:
            yield need
        finally:
            memory.release_soon()
            with self._room:
                self.reserved -= need
                self._work.pop(id(token), None)
                self._room.notify_all()

    def _key_of(self, entry: Optional[Entry]) -> Optional[tuple]:
        """The key under which `entry` is kept (None: not kept, or no entry). Holds the lock."""
        return next((k for k, e in self._entries.items() if e is entry), None) if entry is not None else None

    def _total(self) -> int:
        """Kept + reserved + lingering bytes. Holds the lock."""
        return sum(e.nbytes for e in self._entries.values()) + self.reserved + self._lingering_bytes()

    def accounting(self) -> dict:
        """What the store counts now: bytes kept, reserved and lingering, and the work in flight
        (DPT_LAB_MEMLOG logs it beside the RSS: memory.start_log)."""
        with self._lock:
            return dict(kept=sum(e.nbytes for e in self._entries.values()), reserved=self.reserved,
                        lingering=self._lingering_bytes(), work="+".join(sorted(self._work.values())),
                        squeezed=self.squeezed)

    @contextmanager
    def using(self, entry: Entry):
        """Work on `entry` that may grow it (caches): it is measured again afterwards and
        the store evicts others (or drops it, if it alone is past the cap) to fit. Inside
        `measured_later()`, the measuring waits for that block's caller instead."""
        try:
            yield entry
        finally:
            pending = getattr(_later, "entries", None)
            if pending is None:
                self.remeasure(entry)
            else:
                pending.append((self, entry))

    def remeasure(self, entry: Entry) -> None:
        """Measure `entry` again and fit the store to its new size."""
        size = entry.measure()
        with self._lock:
            if size != entry.nbytes:
                entry.nbytes = size
                key = self._key_of(entry)
                if key is not None:
                    self._fit(key)

    def _fit(self, newest: Optional[tuple]) -> None:
        """Evict least recently used entries (never `newest` while it fits alone) until the
        kept, lingering and reserved bytes together are under max_bytes; an entry past the
        cap on its own is not kept. Holds the lock."""
        if newest in self._entries and self._entries[newest].nbytes > self.max_bytes:
            self._evict(newest)
            self.too_large += 1
        total = self._total()
        limit = self.max_bytes - self._squeeze(total)
        for k in list(self._entries):
            if total <= limit:
                break
            if k != newest:
                total -= self._evict(k)

    def _squeeze(self, counted: int) -> int:
        """What the process holds past `counted` + outside_allowance() (0 when not measured):
        the fit's cap comes down by it. Freed memory goes back to the OS first, so that memory
        already let go (an entry evicted a moment ago) is not taken off twice. Holds the lock."""
        if self.outside_allowance is None:
            return 0
        from . import memory

        allowed = counted + int(self.outside_allowance())
        over = memory.rss_bytes() - allowed
        if over > 0:
            memory.release()
            over = memory.rss_bytes() - allowed
            self.squeezes += over > 0
        self.squeezed = max(0, over)
        return self.squeezed

    def watch(self, every_s: float = WATCH_S) -> threading.Thread:
        """Fit every `every_s` seconds on a daemon thread (with outside_allowance set): the store
        gives way to a spike of the process' memory between requests too. The thread holds
        the store weakly and ends with it."""
        held = weakref.ref(self)

        def run():
            while True:
                time.sleep(every_s)
                store = held()
                if store is None:
                    return
                with store._room:
                    store._fit(None)
                    store._room.notify_all()
                del store

        thread = threading.Thread(target=run, name="dpt-lab-store-watch", daemon=True)
        thread.start()
        return thread

    def drop(self, session: str) -> int:
        """Forget a session's entries (its tab was closed); returns how many."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == session]
            for k in keys:
                self._evict(k)
            self._session_locks.pop(session, None)
            self._ended[session] = None
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
            return len(keys)

    def revive(self, session: str) -> None:
        """The session is in use again (its page asked for a new encode after a reconnect)."""
        with self._lock:
            self._ended.pop(session, None)

    def ended(self, session: str) -> bool:
        """Whether this session was dropped (its page closed): nothing is kept for it any more."""
        with self._lock:
            return session in self._ended

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
