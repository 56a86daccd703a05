"""The page's quick path (dpt_lab/ui/quick.py): its route answers a session's click, drag or
tab opening with the pictures the tab's Gradio event sets, from the session's recorded encode
and the controls of the tab's last page render; it answers nothing (204) for what it cannot
show, never writes the session's state, and leaves one decode for both paths to share."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpt_lab import session as S
from dpt_lab.ui import quick

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "chelsea.jpg"          # 451 x 300
BASE = 140


def ask(server, **query) -> tuple[int, dict]:
    url = f"{server.url.rstrip('/')}{quick.ROUTE}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=60) as resp:
        body = resp.read()
        return resp.status, (json.loads(body) if body else {})


def pixels(data_url: str) -> np.ndarray:
    head, payload = data_url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
        return np.asarray(im.convert("RGB"))


def close_to(shown: np.ndarray, want: np.ndarray) -> None:
    """Within the page JPEG's error (quality 92, no chroma subsampling)."""
    assert shown.shape == want.shape
    err = np.abs(shown.astype(np.int16) - want.astype(np.int16))
    assert err.mean() < 4.0 and np.percentile(err, 99) < 32, (err.mean(), np.percentile(err, 99))


@pytest.fixture(scope="module")
def session(app_server):
    """A gradio_client session that has encoded the example: (server, session hash, its gr.State)."""
    from gradio_client import handle_file

    client = app_server.client()
    client.predict(handle_file(str(ASSET)), app_server.model, BASE, "default", "turbo", api_name="/depth")
    st = quick.session_state(app_server.demo, app_server.demo.dpt_state, client.session_hash)
    assert st is not None and st["image"].shape == (300, 451, 3)
    yield app_server, client.session_hash, st
    client.close()          # not before: a closed client's page unloads, and the app forgets its encode


def test_a_click_gets_the_tiles_and_the_marked_image_the_tab_shows(session):
    server, sess, st = session
    lab = server.lab
    assert ask(server, tab="attention", session=sess, x=40, y=30)[0] == 204     # no page render on record yet
    quick.remember(st, "attention", layer=12, mode="column", log_contrast=False, shared_scale=True, cmap="viridis",
                   alpha=0.0, cls=False)
    click_before = st.get("click")
    status, pictures = ask(server, tab="attention", session=sess, x=40, y=30)
    assert status == 200 and set(pictures) == {"attention-tiles", "attention-image"}
    x, y = lab.display_to_image(st, 40, 30)
    want = lab.attention_at(sess, dict(st), x, y, 12, "column", False, True, "viridis", 0.0, False)
    close_to(pixels(pictures["attention-tiles"]), want.tiles)
    close_to(pixels(pictures["attention-image"]), want.marked)
    assert st.get("click") == click_before               # the session's state is the Gradio event's to write
    other = ask(server, tab="attention", session=sess, x=400, y=250)[1]
    assert not np.array_equal(pixels(other["attention-tiles"]), pixels(pictures["attention-tiles"]))


def test_a_tab_opening_gets_its_view_only_when_it_has_not_shown_this_encode(session):
    server, sess, st = session
    quick.remember(st, "attention", layer=6, mode="row", log_contrast=False, shared_scale=False, cmap="inferno",
                   alpha=0.0, cls=False)
    st["rendered"].pop("attention", None)
    status, pictures = ask(server, tab="attention", session=sess)
    assert status == 200 and "attention-tiles" in pictures
    st["rendered"]["attention"] = server.lab.entry_key(st)          # the tab shows this encode already
    assert ask(server, tab="attention", session=sess)[0] == 204


def test_a_fusion_drag_gets_the_scaled_depth_and_one_decode_serves_both_paths(session, monkeypatch):
    server, sess, st = session
    lab = server.lab
    decodes = []
    real = S._scaled_decode
    monkeypatch.setattr(S, "_scaled_decode", lambda *a: decodes.append(a[2]) or real(*a))
    quick.remember(st, "fusion", scales=(1.0, 1.0, 1.0, 1.0), cmap="turbo")
    drag = {f"fusion-scale-{i}": v for i, v in enumerate(("1", "0.25", "1", "-0.5"), start=1)}
    status, pictures = ask(server, tab="fusion", session=sess, **drag)
    assert status == 200 and set(pictures) == {"fusion-scaled", "fusion-difference"}
    assert decodes == [(1.0, 0.25, 1.0, -0.5)]
    # the Gradio event that follows asks for the same factors: the decode just made serves it
    want = lab.fusion_view(sess, dict(st), (1, 0.25, 1, -0.5), "turbo")
    assert len(decodes) == 1
    close_to(pixels(pictures["fusion-scaled"]), want.scaled.colored)
    close_to(pixels(pictures["fusion-difference"]), want.difference)
    lab.fusion_view(sess, dict(st), (1, 0.5, 1, -0.5), "turbo")
    assert len(decodes) == 2                                        # other factors decode afresh


def test_a_similarity_click_gets_the_features_map(session):
    server, sess, st = session
    lab = server.lab
    quick.remember(st, "features", block=9, mode="pca", basis_block=None, foreground=False, top_k=3, alpha=0.0,
                   cmap="gray")
    status, pictures = ask(server, tab="features", session=sess, x=100, y=50)
    assert status == 200 and set(pictures) == {"features-image"}
    x, y = lab.display_to_image(st, 100, 50)
    want = lab.features_view(sess, dict(st), 9, "similarity", x, y, None, False, 3, 0.0, "gray")
    close_to(pixels(pictures["features-image"]), want.image)


def test_what_a_view_adds_to_the_encode_is_measured_after_the_answer(session):
    server, sess, st = session
    (entry,) = server.lab.store.entries(sess)
    quick.remember(st, "attention", layer=7, mode="column", log_contrast=False, shared_scale=False, cmap="inferno",
                   alpha=0.0, cls=False)
    before = entry.nbytes
    assert 6 not in entry.probe._lse                                # layer 7's row normalisers: not made yet
    assert ask(server, tab="attention", session=sess, x=60, y=60)[0] == 200
    assert 6 in entry.probe._lse
    deadline = time.monotonic() + 10
    while entry.nbytes == before and time.monotonic() < deadline:   # measured once the answer is sent
        time.sleep(0.02)
    assert entry.nbytes == entry.measure() > before


def test_what_it_cannot_answer_gets_nothing_and_the_server_keeps_serving(session):
    server, sess, st = session
    quick.remember(st, "attention", layer=12, mode="row", log_contrast=False, shared_scale=False, cmap="inferno",
                   alpha=0.0, cls=False)
    assert ask(server, tab="attention", session="no-such-session", x=1, y=1)[0] == 204
    assert ask(server, tab="no-such-tab", session=sess, x=1, y=1)[0] == 204
    assert ask(server, tab="attention", session=sess, x="nan", y=1)[0] == 204      # the Gradio event says why
    assert ask(server, tab="fusion", session=sess, **{f"fusion-scale-{i}": "99" for i in range(1, 5)})[0] == 204
    assert ask(server, tab="attention", session=sess, x=10, y=10)[0] == 200
