"""The feature store's byte count is what its entries really keep alive, and the store
stays under its cap while many sessions use it at once (dpt_lab.store)."""

from __future__ import annotations

import gc
import random
import threading
import types
import weakref

import numpy as np
import pytest
import torch

from dpt_lab import session as S
from dpt_lab import store

BASE = 112                       # 8 x 8 patches of the random ViT-S: small, fast encodes


@pytest.fixture
def lab(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("DPT_LAB_WEIGHTS", raising=False)
    return S.Lab(S.ModelManager(weights_dir=tmp_path / "empty"))


def picture(seed: int, h: int = 90, w: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def live_bytes(roots) -> int:
    """Bytes of every tensor storage and NumPy buffer reachable from `roots` by the garbage
    collector's own reference graph (not the store's walker), models excluded: the memory
    the entries really keep alive."""
    seen, buffers, total = set(), set(), 0
    stack = list(roots)
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, (torch.nn.Module, type, types.ModuleType, types.FunctionType, weakref.ref)):
            continue
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            if st.data_ptr() not in buffers:
                buffers.add(st.data_ptr())
                total += st.nbytes()
            continue
        if isinstance(o, np.ndarray):
            # a view keeps its base alive (gc does not list it as a referent); the buffer is the
            # outermost array's, whether it owns it or wraps bytes (PIL's np.asarray does)
            root = o
            while isinstance(root.base, np.ndarray):
                root = root.base
            if root.ctypes.data not in buffers:
                buffers.add(root.ctypes.data)
                total += root.nbytes
            continue
        stack.extend(gc.get_referents(o))
    return total


def use_every_tab(lab, session, state, rng):
    lab.attention_at(session, state, rng.uniform(0, 119), rng.uniform(0, 89), rng.randint(1, 12), "column")
    lab.attention_at(session, state, rng.uniform(0, 119), rng.uniform(0, 89), rng.randint(1, 12), "row")
    lab.norms_view(session, state, threshold="auto", block=rng.randint(1, 12))
    lab.fusion_view(session, state, tuple(round(rng.uniform(-2, 2), 2) for _ in range(4)))


def test_entry_bytes_are_what_it_keeps_alive(lab):
    state, _ = lab.depth_view("s", None, picture(0), S.RANDOM_MODEL, BASE)
    entry = lab.store.entries("s")[0]
    at_encode = entry.nbytes
    assert at_encode == live_bytes([entry]) > 0
    rng = random.Random(0)
    for _ in range(3):
        use_every_tab(lab, "s", state, rng)
    # column normalisers of up to three layers and the norms were added: counted, exactly
    assert entry.probe._lse and "norms" in entry.cache
    assert entry.nbytes == live_bytes([entry]) > at_encode
    assert lab.store.nbytes == entry.nbytes


def test_inside_measured_later_the_caller_measures_when_it_has_answered(lab):
    state, _ = lab.depth_view("s", None, picture(0), S.RANDOM_MODEL, BASE)
    entry = lab.store.entries("s")[0]
    before = entry.nbytes
    with store.measured_later() as pending:
        lab.attention_at("s", state, 10, 10, 3, "column")        # caches layer 3's row normalisers
    assert entry.probe._lse and entry.nbytes == before            # grown, not measured yet
    assert [e for _, e in pending] == [entry]
    lab.attention_at("s", state, 10, 10, 3, "row")               # outside the block: measured at once
    assert entry.nbytes == live_bytes([entry]) > before
    entry.nbytes = before
    store.remeasure_all(pending + pending)                        # once per entry
    assert entry.nbytes == live_bytes([entry]) and lab.store.nbytes == entry.nbytes


def test_measure_counts_views_once_and_skips_models():
    base = np.zeros((100, 100), np.float32)
    t = torch.zeros(1000)
    holder = {"views": [base[:10], base[50:], base], "t": [t, t[10:]], "model": torch.nn.Linear(500, 500),
              "ref": weakref.ref(t)}
    assert store.measure(holder) == base.nbytes + t.untyped_storage().nbytes()


def test_an_entry_past_the_cap_is_served_but_not_kept(lab):
    lab.store.max_bytes = 1000
    state, res = lab.depth_view("s", None, picture(1), S.RANDOM_MODEL, BASE)
    assert res.depth.shape == (90, 120)
    assert lab.store.nbytes == 0 and lab.store.too_large == 1


def test_store_stays_under_its_cap_with_concurrent_sessions(lab):
    state, _ = lab.depth_view("probe", None, picture(99), S.RANDOM_MODEL, BASE)
    rng = random.Random(1)
    use_every_tab(lab, "probe", state, rng)
    one = lab.store.entries("probe")[0].nbytes
    lab.store.drop("probe")
    lab.store.max_bytes = int(2.5 * one)            # room for two sessions' encodes of six
    errors, peaks = [], {"recorded": 0, "live": 0}
    stop = threading.Event()

    def session(i):
        rng = random.Random(i)
        try:
            for round_no in range(6):
                st, _ = lab.depth_view(f"s{i}", None, picture(10 * i + round_no % 3), S.RANDOM_MODEL, BASE)
                use_every_tab(lab, f"s{i}", st, rng)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def watch():
        while not stop.is_set():
            with lab.store._lock:
                entries = list(lab.store._entries.values())
                recorded = sum(e.nbytes for e in entries)
            peaks["recorded"] = max(peaks["recorded"], recorded)
            peaks["live"] = max(peaks["live"], live_bytes(entries))
            stop.wait(0.005)

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=session, args=(i,)) for i in range(6)]
    watcher.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    watcher.join()
    assert not errors, errors[0]
    assert lab.store.encodes >= 18                                  # it had to evict and re-encode
    assert 0 < peaks["recorded"] <= lab.store.max_bytes
    # between an entry's growth and its re-measure the live count may run ahead by what one
    # request adds (a layer's column normalisers, the norms): a few kB here
    assert peaks["live"] <= lab.store.max_bytes + 64 * 1024
    entries = [e for s in lab.store.sessions() for e in lab.store.entries(s)]
    assert lab.store.nbytes == live_bytes(entries) <= lab.store.max_bytes


def test_an_evicted_entry_still_in_use_counts_against_the_cap(lab):
    """A request that holds an entry keeps its memory alive after the store evicts it: until
    the request lets go, those bytes count against the cap, and the store keeps less."""
    lab.depth_view("a", None, picture(60), S.RANDOM_MODEL, BASE)
    held = lab.store.entries("a")[0]                       # a request in flight holds it
    n = held.nbytes
    pixels = held.x.shape[-2] * held.x.shape[-1]
    reserve = lab.store.working_set(S.RANDOM_MODEL, pixels)
    # one kept entry and one encode's working set fit, with room to spare for less than an entry
    lab.store.max_bytes = n + reserve + n // 2
    lab.store.drop("a")                                    # evicted (its page closed) while in use
    assert lab.store.nbytes == 0 and lab.store.lingering == n
    lab.depth_view("b", None, picture(61), S.RANDOM_MODEL, BASE)
    lab.depth_view("c", None, picture(62), S.RANDOM_MODEL, BASE)
    # b + c's working set + the held a do not fit: b went to make room
    assert lab.store.entries("b") == [] and len(lab.store.entries("c")) == 1
    assert lab.store.lingering == n
    del held
    gc.collect()
    assert lab.store.lingering == 0                        # let go: nothing lingers
    lab.depth_view("d", None, picture(63), S.RANDOM_MODEL, BASE)
    assert len(lab.store.entries("c")) == len(lab.store.entries("d")) == 1     # now c stays beside d


def test_work_on_an_entry_never_evicts_that_entry_for_its_own_reservation(lab):
    """A rollout, a fusion decode or an ablation reserves room beside the entry it works on:
    other entries go to make room, never that one (it would be encoded again next time)."""
    lab.depth_view("b", None, picture(71), S.RANDOM_MODEL, BASE)
    st, _ = lab.depth_view("a", None, picture(70), S.RANDOM_MODEL, BASE)
    lab.store.max_bytes = int(2.5 * lab.store.entries("a")[0].nbytes)   # a, b and any reservation do not fit
    encodes = lab.store.encodes
    lab.fusion_view("a", st, (1, 0.5, 1, 1))
    lab.rollout_at("a", st, 10, 10)
    lab.ablation_view("a", st, 3, source="patches", patches="1,1")
    assert len(lab.store.entries("a")) == 1 and lab.store.entries("b") == []
    assert lab.store.encodes == encodes


def test_background_work_never_encodes_an_evicted_image_again(lab):
    """A hidden tab's prepare (and the page's quick path) run inside cached_only(): once the
    encode they were for is gone, they fail instead of encoding it again, which would push
    out the encode on screen."""
    st, _ = lab.depth_view("a", None, picture(80), S.RANDOM_MODEL, BASE)
    with S.cached_only():
        assert lab.norms_view("a", st).result.num_blocks == 12         # kept: served
    lab.store.clear()
    encodes = lab.store.encodes
    with S.cached_only(), pytest.raises(S.SessionError, match="no longer kept"):
        lab.norms_view("a", st)
    assert lab.store.encodes == encodes and lab.store.nbytes == 0
    lab.norms_view("a", st)                                            # a request of the user's own encodes
    assert lab.store.encodes == encodes + 1


def test_a_reservation_waits_for_room_while_other_work_holds_it():
    """Kept + lingering + reserved stay under the cap when other work in flight holds the
    room: a new reservation waits for it (up to its limit), and goes ahead at once when no
    other work could free anything."""
    import time

    st = store.FeatureStore(max_bytes=1000)
    entered, seen = threading.Event(), []

    def second():
        with st.reserve(500, "encode", wait_s=30):
            seen.append(st.accounting())
            entered.set()

    with st.reserve(800, "export"):
        worker = threading.Thread(target=second)
        worker.start()
        assert not entered.wait(0.3) and st.waits > 0        # no room beside the export: it waits
        assert st.accounting()["work"] == "export"
    assert entered.wait(10)                                  # the export ended: room
    worker.join()
    assert seen == [dict(kept=0, reserved=500, lingering=0, work="encode", squeezed=0)]
    with st.reserve(5000):                                   # alone, past the cap: nothing to wait for
        assert st.reserved == 5000
    with st.reserve(800):
        t0 = time.monotonic()
        with st.reserve(500, wait_s=0.2):                    # waiting has its limit
            assert st.reserved == 1300
        assert time.monotonic() - t0 >= 0.2
    assert st.reserved == 0


def test_an_encode_in_flight_reserves_its_working_set(lab, monkeypatch):
    """While a model encodes, kept + reserved bytes stay under the cap: older entries are
    evicted for the encode's estimated peak, not only after it has finished."""
    lab.depth_view("a", None, picture(20), S.RANDOM_MODEL, BASE)
    one = lab.store.entries("a")[0]
    pixels = one.x.shape[-2] * one.x.shape[-1]
    assert lab.store.working_set(S.RANDOM_MODEL, pixels) == int(store.WORKING_SET_FACTOR * one.nbytes)
    assert lab.store.working_set("another model", pixels) == 0       # nothing learnt of it yet
    del one                          # held here, an evicted entry would still count (it lingers)
    lab.depth_view("b", None, picture(21), S.RANDOM_MODEL, BASE)
    assert len(lab.store.entries("a")) == len(lab.store.entries("b")) == 1
    need = lab.store.working_set(S.RANDOM_MODEL, pixels)
    lab.store.max_bytes = lab.store.nbytes + need - 1                # both fit, but not with a working set too

    seen = {}
    from dpt_lab import features

    real = features.capture

    def watching(model, x, **kw):
        with lab.store._lock:
            seen["reserved"] = lab.store.reserved
            seen["kept"] = sum(e.nbytes for e in lab.store._entries.values())
            seen["sessions"] = {s for s, _ in lab.store._entries}
        return real(model, x, **kw)

    monkeypatch.setattr(features, "capture", watching)
    lab.depth_view("c", None, picture(22), S.RANDOM_MODEL, BASE)
    assert seen["reserved"] == need > 0
    assert seen["kept"] + seen["reserved"] <= lab.store.max_bytes
    assert seen["sessions"] == {"b"}              # the least recently used went first
    assert lab.store.reserved == 0                # given back once the encode is done
    assert lab.store.nbytes <= lab.store.max_bytes


def test_heavy_work_on_an_encode_reserves_its_transients(lab, monkeypatch, tmp_path):
    """The decoder of a fusion view, an ablation's re-run, a rollout's matrices, a video job
    and an export each hold memory beyond what they keep: while they run, their estimate is
    reserved under the cap (older entries evicted for it) and given back afterwards."""
    from dpt_lab import ablation, attention, fusion, video

    st, _ = lab.depth_view("a", None, picture(40), S.RANDOM_MODEL, BASE)
    entry = lab.store.entries("a")[0]
    pixels = entry.x.shape[-2] * entry.x.shape[-1]
    model = lab.manager.get(S.RANDOM_MODEL)
    seen: dict[str, int] = {}

    def watch(name, module, fn_name):
        real = getattr(module, fn_name)

        def watched(*args, **kwargs):
            seen[name] = lab.store.reserved
            return real(*args, **kwargs)
        monkeypatch.setattr(module, fn_name, watched)

    watch("fusion", fusion, "scaled_depth")
    watch("ablation", ablation, "ablate")
    watch("rollout", attention, "rollout")
    watch("video", video, "depth_video")
    from dpt_lab import export
    watch("export", export, "export_onnx")
    probe = entry.probe
    rollout_need = attention.rollout_bytes(probe, 11)
    n = probe._layer(11).n
    assert rollout_need == 4 * n * n * (12 + 3)          # every layer's matrix, and room for one layer's work
    lab.fusion_view("a", st, (1, 0.5, 1, 1))
    lab.ablation_view("a", st, 3, source="patches", patches="1,1")
    lab.rollout_at("a", st, 10, 10)
    assert attention.rollout_bytes(probe, 11) == 0        # kept now: nothing more to reserve
    from clips import make_clip
    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    lab.video_job("a", clip, S.RANDOM_MODEL, tmp_path / "video", base_size=BASE, max_seconds=0.5)
    lab.export_model(S.RANDOM_MODEL, tmp_path / "onnx", base_size=BASE)
    assert seen["fusion"] == lab.store.working_set(S.RANDOM_MODEL, pixels, store.DECODE_FACTOR) > 0
    assert seen["ablation"] == lab.store.working_set(S.RANDOM_MODEL, pixels) > 0
    assert seen["rollout"] == rollout_need
    assert seen["video"] == min(video.BATCH_BYTES, lab.store.max_bytes // 4)
    assert seen["export"] == (S.EXPORT_WEIGHT_COPIES * sum(p.numel() * 4 for p in model.parameters())
                              + lab.store.working_set(S.RANDOM_MODEL, BASE * BASE))
    assert lab.store.reserved == 0
    # a reservation evicts: with the cap just above what is kept, an export leaves room for itself
    lab.store.max_bytes = lab.store.nbytes + 1
    lab.export_model(S.RANDOM_MODEL, tmp_path / "onnx2", base_size=BASE)
    assert lab.store.entries("a") == []


def test_a_closed_session_keeps_nothing_from_late_work(lab):
    """A background job (a hidden tab's prepare) that asks for a session after its page closed
    gets its answer, but the store keeps neither an entry nor a lock for that session."""
    st, _ = lab.depth_view("gone", None, picture(30), S.RANDOM_MODEL, BASE)
    assert lab.store.entries("gone") and not lab.store.ended("gone")
    assert lab.store.drop("gone") == 1
    assert lab.store.ended("gone") and lab.store.nbytes == 0
    encodes = lab.store.encodes
    view = lab.norms_view("gone", st)                 # the late job re-encodes the image ...
    assert view.result.num_blocks == 12 and lab.store.encodes > encodes
    assert lab.store.entries("gone") == [] and lab.store.nbytes == 0       # ... and nothing stays
    assert "gone" not in lab.store._session_locks
    lab.depth_view("new", None, picture(31), S.RANDOM_MODEL, BASE)        # other sessions are as before
    assert len(lab.store.entries("new")) == 1
    lab.depth_view("gone", st, picture(30), S.RANDOM_MODEL, BASE)         # the page came back and encodes:
    assert len(lab.store.entries("gone")) == 1 and not lab.store.ended("gone")   # kept again


def bytes_entry(n: int) -> store.Entry:
    """An entry that keeps `n` bytes alive (a buffer), nothing else."""
    probe = types.SimpleNamespace(features=None)
    return store.Entry(key=(n,), model_name="m", info=None, meta=None, x=None, probe=probe, depth=None,
                       depth_image=np.zeros(n, np.uint8))


def test_the_store_gives_way_to_what_the_process_holds_past_its_allowance(monkeypatch):
    """With outside_allowance set, the RSS beyond what the store counts plus that allowance
    comes off the cap at every fit (after the free pages go back to the OS), and the cap is
    whole again once the process is back under it; watch() does it between requests too."""
    import time

    from dpt_lab import memory

    rss, trims = {"outside": 0}, []
    st = store.FeatureStore(max_bytes=1000)
    # the process: the entries it keeps, plus the rest (read under the store's lock, as fits do)
    monkeypatch.setattr(memory, "rss_bytes", lambda: sum(e.nbytes for e in st._entries.values()) + rss["outside"])
    monkeypatch.setattr(memory, "release", lambda: trims.append(1))
    for i in range(4):
        st.get_or_compute(f"s{i}", ("k",), lambda: bytes_entry(200))
    assert st.nbytes == 800 and st.squeezed == 0                # not measured: the cap alone
    st.outside_allowance = lambda: 500
    rss["outside"] = 500                                         # within the allowance: nothing given
    st.get_or_compute("s4", ("k",), lambda: bytes_entry(200))
    assert st.nbytes == 1000 and st.squeezed == 0 and not trims
    rss["outside"] = 850                                         # 350 past it: the cap is 650 now
    st.get_or_compute("s5", ("k",), lambda: bytes_entry(200))
    assert trims and st.squeezed == 350 and st.squeezes == 1
    assert st.nbytes == 600 and st.sessions() == {"s3", "s4", "s5"}     # least recently used first
    rss["outside"] = 500
    with st.reserve(400):                                        # back within it: the whole cap
        assert st.squeezed == 0 and st.nbytes == 600
    rss["outside"] = 1100                                        # a spike between requests
    st.watch(every_s=0.02)
    deadline = time.monotonic() + 10
    while st.nbytes > 400 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert st.nbytes == 400 and st.squeezed == 600 and st.accounting()["squeezed"] == 600


def test_the_watch_thread_ends_with_its_store():
    """A store's watch holds it weakly: a store let go takes its thread with it (one left
    running would trim the process' heap every few ms from then on)."""
    import time

    st = store.FeatureStore(max_bytes=1000)
    st.outside_allowance = lambda: 0
    thread = st.watch(every_s=0.01)
    time.sleep(0.05)
    assert thread.is_alive()
    del st
    gc.collect()
    thread.join(timeout=2)
    assert not thread.is_alive()
