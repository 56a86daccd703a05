"""Many users at once: 8 gradio_client sessions in threads, each with its own image,
interleaving attention clicks and fusion changes on the real app. Every answer must be
the one a lone session gets for that image; the model is loaded once and shared; the
feature store stays under its byte limit (set low here, so entries are evicted and
re-encoded while the sessions run) and forgets a session when it ends."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
BASE = 140                      # a 10 x 15 patch grid for a 3:2 photo: quick on 2 CPU cores
SESSIONS = 8
CACHE_MB = 40                   # about 5 of the 8 sessions' encodes (6 - 9 MB each at BASE)

APP_SERVER_OPTIONS = {"cache_mb": CACHE_MB}


def synthetic_images(folder: Path) -> list[Path]:
    """Three images of distinct content and size."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    yy, xx = np.mgrid[0:240, 0:320]
    grad = np.stack([xx * 255 // 319, yy * 255 // 239, (xx + yy) * 255 // 558], -1).astype(np.uint8)
    img = Image.fromarray(grad)
    ImageDraw.Draw(img).ellipse((60, 40, 200, 180), fill=(250, 250, 30))
    out.append(folder / "gradient.png")
    img.save(out[-1])
    checker = ((np.indices((300, 200)) // 25).sum(0) % 2 * 200 + 30).astype(np.uint8)
    out.append(folder / "checker.png")
    Image.fromarray(np.stack([checker, 255 - checker, checker // 2], -1)).save(out[-1])
    noise = np.random.default_rng(7).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out.append(folder / "noise.png")
    Image.fromarray(noise).save(out[-1])
    return out


def rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def plan(i: int, image: Path) -> list[tuple]:
    """Session i's requests after /depth: attention clicks and fusion changes, interleaved."""
    w, h = Image.open(image).size
    return [
        ("attention", (round(w * (0.15 + 0.08 * i)), round(h * 0.3), 1 + i, "row" if i % 2 else "column")),
        ("fusion", (1, 1, 1, round(0.5 - 0.2 * i, 2))),
        ("attention", (round(w * 0.8), round(h * (0.9 - 0.07 * i)), 12 - i, "row")),
        ("fusion", (round(-1 + 0.3 * i, 2), 2, 0, 1)),
    ]


def test_eight_sessions_at_once_each_get_their_own_answers(app_server, tmp_path):
    from gradio_client import handle_file

    from dpt_lab import session as S

    server = app_server
    lab, model = server.lab, server.model
    images = [ASSETS / n for n in ("chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg",
                                   "motorcycle_left.jpg")]
    images += synthetic_images(tmp_path / "synthetic")
    assert len(images) == SESSIONS
    assert lab.store.max_bytes == CACHE_MB << 20 and lab.manager.loads == 0

    clients = [server.client() for _ in range(SESSIONS)]
    assert len({c.session_hash for c in clients}) == SESSIONS
    answers: dict[int, list] = {}
    errors: list[BaseException] = []
    peak = {"bytes": 0}
    done = threading.Event()
    start = threading.Barrier(SESSIONS)

    def watch():
        while not done.is_set():
            peak["bytes"] = max(peak["bytes"], lab.store.nbytes)
            time.sleep(0.02)

    def session(i: int):
        client, image = clients[i], images[i]
        try:
            start.wait(timeout=60)
            got = [client.predict(handle_file(str(image)), model, BASE, "default", "turbo", api_name="/depth")]
            for kind, args in plan(i, image):
                if kind == "attention":
                    x, y, layer, mode = args
                    got.append(client.predict(x, y, layer, mode, False, False, "inferno", 0, False,
                                              api_name="/attention"))
                else:
                    got.append(client.predict(*args, "turbo", api_name="/fusion"))
            answers[i] = got
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=session, args=(i,)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    done.set()
    watcher.join()
    assert not errors, errors
    assert sorted(answers) == list(range(SESSIONS))

    # one model, loaded once for all eight sessions (they all asked for it at the same moment)
    assert lab.manager.loads == 1 and lab.manager.loaded() == [model]
    # the store never held more than its byte limit; it had to evict, so it re-encoded
    assert 0 < peak["bytes"] <= lab.store.max_bytes
    assert lab.store.nbytes <= lab.store.max_bytes
    assert lab.store.encodes >= SESSIONS
    # what is cached belongs to the session whose image it encoded
    hashes = {}
    for i, client in enumerate(clients):
        for entry in lab.store.entries(client.session_hash):
            hashes.setdefault(i, set()).add(entry.key[1])
    assert hashes and all(len(v) == 1 for v in hashes.values())
    assert len({next(iter(v)) for v in hashes.values()}) == len(hashes)

    # every answer equals what a lone session gets for that image (a separate Lab and store)
    ref = S.Lab(lab.manager, S.FeatureStore())
    sizes = []
    for i, image in enumerate(images):
        state, res = ref.depth_view("reference", None, str(image), model, BASE, "default", "turbo")
        sizes.append(ref.store.entries("reference")[-1].nbytes)
        depth = answers[i][0]
        assert np.array_equal(rgb(depth[0][1]), res.view.colored), (i, image.name)
        assert np.array_equal(rgb(depth[0][0]), rgb(image))
        for (kind, args), got in zip(plan(i, image), answers[i][1:]):
            if kind == "attention":
                x, y, layer, mode = args
                want = ref.attention_at("reference", state, x, y, layer, mode, False, False, "inferno", 0.0, False)
                tiles, marked, text, gx, gy = got
                assert np.array_equal(rgb(tiles), want.tiles), (i, image.name, args)
                assert np.array_equal(rgb(marked), want.marked), (i, image.name, args)
                assert text == want.text and (gx, gy) == (x, y)
            else:
                want = ref.fusion_view("reference", state, args, "turbo")
                scaled, unscaled, _, text = got
                assert np.array_equal(rgb(scaled), want.scaled.colored), (i, image.name, args)
                assert np.array_equal(rgb(unscaled), res.view.colored), (i, image.name, args)
                assert text.startswith(f"factors {', '.join(f'{s:g}' for s in args)} ")
    assert lab.manager.loads == 1
    # the eight encodes do not fit the limit together: the store had to evict some
    assert sum(sizes) > lab.store.max_bytes and len(hashes) < SESSIONS

    # the sessions end (their browser tabs close): each one's features go
    streams = [urllib.request.urlopen(f"{server.url.rstrip('/')}/gradio_api/heartbeat/{c.session_hash}", timeout=10)
               for c in clients]
    for s in streams:
        assert s.readline().startswith(b"data: ALIVE")
        s.close()
    deadline = time.time() + 30
    mine = {c.session_hash for c in clients}
    while lab.store.sessions() & mine and time.time() < deadline:
        time.sleep(0.2)
    assert not (lab.store.sessions() & mine)
    assert lab.store.nbytes == 0
    assert not (set(lab.store._session_locks) & mine)
