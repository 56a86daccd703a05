"""The page's quick path: the pictures that a click, a pointer move, a slider drag or a tab's
opening asks for, from one HTTP route outside Gradio's queue and its output processing.

Why: on this 2-core machine any Gradio event that returns an image costs ~60 ms whatever its
handler does (bench/ui_latency.py measures that floor: the queue's round trip, the output
copied into the cache, a second request for the file), which is most of what a click waits
for. So the page's script asks `GET ROUTE?tab=...&session=...` at the moment it starts the
Gradio event; the route answers with the tab's pictures as JPEG data URLs by element id, and
the script sets them on those <img> elements. The Gradio event still runs and sets every
output (state, text, numbers; the API endpoints are untouched): it stays the truth, and it
costs little, as the views it asks for are the ones just computed (the session's memos).

A tab declares `Tab(quick=view)`: view(session, state, query) -> {element id: RGB array}, or
None when it has nothing quicker to show (the Gradio event shows it, or its error). `state`
is a shallow copy of the session's gr.State value, read from Gradio's state holder and never
written back; `query` holds the request's other parameters (a pixel, slider values).
A tab that has not been rendered by Gradio yet in this session has no controls on record
(`remember`), so its first view always comes through Gradio.
"""

from __future__ import annotations

import base64
import collections
import threading
import time
from typing import Any, Callable, Optional

import numpy as np
from fastapi import Request  # at module level: FastAPI reads the route's annotations from here

from .. import memory, store
from .. import session as S
from .base import (  # noqa: F401 - app.py reads SESSION_FIELD here
    MODEL_CONCURRENCY,
    QUICK_ROUTE,
    SESSION_FIELD,
    page_jpeg,
    shows_current,
)

ROUTE = QUICK_ROUTE          # the route the page's script asks (base.PICK_JS)
_model_slots = threading.BoundedSemaphore(MODEL_CONCURRENCY)   # a quick view may run the decoder
# (tab, start, end) in time.time() seconds of the latest answered requests: bench/ui_latency.py's breakdown
served: collections.deque = collections.deque(maxlen=256)


def remember(st: dict, tab_id: str, **controls: Any) -> None:
    """Record the controls a tab's page render used: its quick views reuse them."""
    st.setdefault("controls", {})[tab_id] = controls


def controls(st: dict, tab_id: str) -> Optional[dict]:
    return (st.get("controls") or {}).get(tab_id)


def picked(lab, st: dict, tab_id: str, query: dict):
    """For a picker tab's quick view: (its recorded controls, x, y) of a click or hover (query
    x, y: display pixels -> pixels of the original image), or (controls, None, None) at the
    tab's opening (the last pick); None when there is nothing quicker to show (no page render
    on record, or the tab shows this encode already)."""
    c = controls(st, tab_id)
    if c is None:
        return None
    if "x" in query:
        return (c, *lab.display_to_image(st, query["x"], query.get("y")))
    return None if shows_current(st, tab_id, lab) else (c, None, None)


def data_url(rgb: np.ndarray) -> str:
    """A JPEG data URL of an RGB array, encoded as the page's pictures are (base.page_jpeg)."""
    return "data:image/jpeg;base64," + base64.b64encode(page_jpeg(rgb)).decode("ascii")


def session_state(demo, state_component, session: str) -> Optional[dict]:
    """The session's gr.State value, or None if Gradio holds no state for it (never creates one)."""
    holder = getattr(demo, "state_holder", None)
    data = getattr(holder, "session_data", None)
    if not session or data is None or session not in data:
        return None
    value = data[session].state_data.get(state_component._id)
    return value if isinstance(value, dict) else None


def render(views: dict[str, Callable], demo, state_component, query: dict, tidy: list
           ) -> Optional[dict[str, str]]:
    """{element id: data URL} for one request's query (tab, session, ...), or None.

    tidy: a list that gets what is left to do once the answer is sent (`tidy_up`): measuring
    the entries the view may have grown, and giving freed memory back."""
    start = time.time()
    query = dict(query)
    tab = query.pop("tab", "")
    view = views.get(tab)
    session = query.pop("session", "")
    st = session_state(demo, state_component, session) if view else None
    if st is None or st.get("image") is None:
        return None
    pending: list = []
    try:
        with _model_slots, S.cached_only(), store.measured_later() as pending:   # never an encode here
            pictures = view(session, dict(st), query)
        urls = {k: data_url(v) for k, v in (pictures or {}).items()} or None
    except Exception:        # noqa: BLE001 - the Gradio event that follows shows the error
        urls = None
    tidy.extend(pending)
    if urls:
        served.append((tab, start, time.time()))
    return urls


def tidy_up(pending: list) -> None:
    """After an answer: measure the entries its view used (store.remeasure_all); its freed
    memory goes back to the OS when requests pause (memory.release_soon)."""
    try:
        store.remeasure_all(pending)
    finally:
        memory.release_soon()


def mount(demo) -> None:
    """Add ROUTE to the launched app's server (demo.launch first): the views app.build_app
    collected from the tabs (demo.dpt_quick_views) over its gr.State (demo.dpt_state)."""
    from fastapi.responses import JSONResponse, Response
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool

    views, state_component = demo.dpt_quick_views, demo.dpt_state

    async def quick(request: Request):
        tidy: list = []
        pictures = await run_in_threadpool(render, views, demo, state_component, dict(request.query_params), tidy)
        after = BackgroundTask(tidy_up, tidy)        # once the answer is sent: the page does not wait for it
        if not pictures:
            return Response(status_code=204, background=after)
        return JSONResponse(pictures, headers={"Cache-Control": "no-store"}, background=after)

    demo.server_app.add_api_route(ROUTE, quick, methods=["GET"], include_in_schema=False)
