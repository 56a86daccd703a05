"""What every tab shares: the context a tab is built from, what it declares back, the glue
between Gradio and dpt_lab.session, and the wiring that refreshes tabs after a new encode.

A tab module has ID, TITLE and `build(ctx) -> Tab`. Inside `build` it makes its
components (app.py has opened its gr.Tab), wires its own handlers to `ctx.lab`, and
returns how it refreshes: `Tab(refresh=render, inputs=[...], outputs=[...])`, where
`render(*inputs, state, request)` returns the outputs for the session's current encode.
`wire_refreshes` runs every tab's render after each new encode (only the visible tab's,
and only once per encode) and when a tab is opened; `fit` declares the controls that
follow the model (a layer slider's range, say). Gradio itself is imported only here and
in the tab modules: `import dpt_lab` stays light.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr

from .. import memory
from .. import session as S
from ..errors import DPTLabError, one_line

MODEL_CONCURRENCY = 2          # events that run the model at once (CPU: ~one per core)
MODEL_EVENT = dict(concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)   # every model event shares it


# -- glue ----------------------------------------------------------------------------------
def user_error(message: str) -> gr.Error:
    """A message for the user; the server log stays quiet (it is not a server fault)."""
    return gr.Error(message, print_exception=False)


def user_errors(fn):
    """Run a handler; DPT Lab's own errors, bad files and memory trouble become gr.Error
    messages (the server keeps serving). Anything else is logged and shown briefly.
    Afterwards the request's freed memory goes back to the OS when requests pause (dpt_lab.memory)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (DPTLabError, OSError, ValueError) as exc:
            raise user_error(one_line(exc)) from None
        except MemoryError:
            raise user_error("out of memory: try a smaller image or base size") from None
        except Exception as exc:   # noqa: BLE001 - a bug: log it, answer with one line
            traceback.print_exc()
            raise user_error(f"internal error ({type(exc).__name__}: {exc}); see the server log") from None
        finally:
            memory.release_soon()

    return wrapper


def sid(request: gr.Request | None) -> str:
    return (getattr(request, "session_hash", None) or S.DEFAULT_SESSION) if request is not None else S.DEFAULT_SESSION


def out_dir(kind: str) -> Path:
    """A fresh folder inside Gradio's cache for files handed to the browser; Gradio deletes
    them on the delete_cache schedule (and at shutdown)."""
    root = Path(gr.utils.get_upload_folder()) / "dpt_lab"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))


PAGE_JPEG_QUALITY = 92


def page_image(rgb) -> str:
    """An image for the page, not for the API: a JPEG (quality 92, no chroma subsampling,
    so colour-map edges stay crisp) in Gradio's cache. 1 ms to write a 600x400 picture
    where Gradio's own PNG takes ~60 ms, and a sixth of the bytes to send; the API
    endpoints keep their lossless PNGs and the downloads their exact formats."""
    import uuid

    path = _page_folder() / f"{uuid.uuid4().hex}.jpg"
    path.write_bytes(page_jpeg(rgb))
    return str(path)


def page_jpeg(rgb) -> bytes:
    """The page's JPEG encoding of an RGB array (page_image; the quick path's data URLs)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", quality=PAGE_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _page_folder() -> Path:
    """One folder in Gradio's cache for the page's images (deleted on its delete_cache schedule)."""
    root = Path(gr.utils.get_upload_folder()) / "dpt_lab" / "page"
    root.mkdir(parents=True, exist_ok=True)
    return root


def uploaded(image):
    """The upload payload if its file is in Gradio's upload cache, else a user error.
    (Events run with preprocess=False so DPT Lab reads the file itself; a payload naming a
    path elsewhere on this server must not be read.)"""
    if image is None:
        return None
    path = image.get("path") if isinstance(image, dict) else None
    if not isinstance(path, str) or not path:
        raise user_error("the image must be an uploaded file (gradio_client: handle_file(path))")
    if not gr.utils.is_in_or_equal(path, gr.utils.get_upload_folder()):
        raise user_error("the image must be an uploaded file, not a path on the server")
    return image


def progress_fn(progress):
    return lambda fraction, text: progress(fraction, desc=text)


def skips(n: int):
    return tuple(gr.skip() for _ in range(n))


def has_image(st) -> bool:
    return bool(st) and st.get("image") is not None


# -- picking a patch in the page ----------------------------------------------------------
QUICK_ROUTE = "/dpt_lab/quick"        # the quick path's route (ui/quick.py serves it)
SESSION_FIELD = "dpt-session"         # hidden textbox the page's load event fills with its session hash
HOVER_MS = 40       # at most one pointer position per 40 ms goes to the server (the last one always does)

# Run by the page on load (app.py passes it to launch, with the PICKERS of every tab). A click on
# a picker's image is taken at pointerdown, in the capture phase: the pixel of the served image
# under the pointer, computed as Gradio's image computes a select event's index (object-fit
# contain, never scaled above 1, rounded), written into the picker's hidden textbox with a count
# (so a second click on the same pixel is still a change). With the picker's hover checkbox on,
# pointer moves are written the same way, throttled, the last one always. Gradio's own select
# event is not used: it fires on "click", which the browser drops when the <img> is swapped for
# the next picture between the press and the release (a burst of clicks lost its last one that
# way), and a deferred select re-runs with its first event's data.
TAB_ELEM_PREFIX = "dpt-tab-"      # a tab's elem_id: this + its ID (the page's script finds tab buttons by it)
PICK_JS = """
const dptPick = (ev, hover) => {
  if (!(ev.target instanceof Element)) return;
  for (const [boxId, fieldId, hoverId, quickTab] of PICKERS) {
    const box = ev.target.closest("#" + boxId);
    if (!box) continue;
    if (hover) {
      const cb = hoverId ? document.querySelector(`#${hoverId} input[type=checkbox]`) : null;
      if (!cb || !cb.checked) return;
    }
    const img = box.querySelector("img");
    const field = document.querySelector(`#${fieldId} textarea, #${fieldId} input`);
    if (!img || !img.naturalWidth || !field) return;
    const r = img.getBoundingClientRect();
    const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight, 1);
    const ox = (r.width - img.naturalWidth * s) / 2, oy = (r.height - img.naturalHeight * s) / 2;
    const x = Math.round((ev.clientX - r.left - ox) / s), y = Math.round((ev.clientY - r.top - oy) / s);
    if (x < 0 || y < 0 || x >= img.naturalWidth || y >= img.naturalHeight) return;
    const write = () => {
      window.dptLabClicks = (window.dptLabClicks || 0) + 1;
      const value = `${x},${y},${window.dptLabClicks}`;
      // the click's Gradio event goes once the quick path's pictures are drawn: on two cores the two
      // would slow each other down (and the event's outputs are the same pictures, from the memo)
      const fire = () => { field.value = value; field.dispatchEvent(new Event("input", {bubbles: true})); };
      if (!quickTab || !window.dptQuick(quickTab, {x, y}, fire)) fire();
    };
    if (!hover) { write(); return; }
    const st = ((window.dptHover = window.dptHover || {})[boxId] = window.dptHover[boxId] || {t: 0, timer: 0});
    clearTimeout(st.timer);
    const wait = st.t + HOVER_MS - performance.now();
    const now = () => { st.t = performance.now(); write(); };
    if (wait <= 0) now(); else st.timer = setTimeout(now, wait);
    return;
  }
};
document.addEventListener("pointerdown", (ev) => { if (ev.button === 0) dptPick(ev, false); }, true);
document.addEventListener("pointermove", (ev) => { if (ev.buttons === 0) dptPick(ev, true); }, true);
// The quick path (ui/quick.py): the tab's pictures straight from QUICK_ROUTE. One request per tab at a
// time; a newer one waits and goes when it returns (the last always does). An answer is set only on an
// <img> that nothing else changed since the request left (a Gradio output that came meanwhile is newer
// and stays), or on one mounted since (a tab that was opening). `after` (a click's or a slider's Gradio
// event) runs once the latest request's pictures are decoded, or after `waitMs` (default QUICK_WAIT_MS)
// at the latest; dptQuick returns whether it will run it.
const QUICK_WAIT_MS = 500, SLIDER_WAIT_MS = 5000, MOUNT_WAIT_MS = 1500;
// `after` goes once the frame that draws the pictures is rendered (a task posted from its animation
// frame): Gradio's handling of an event takes the main thread for ~40 ms here, and would hold the frame back
const quickDone = (q) => {
  const after = q.after; q.after = null; clearTimeout(q.timer);
  if (after) requestAnimationFrame(() => setTimeout(after, 0));
};
window.dptQuick = (tab, params, after, waitMs) => {
  const session = document.querySelector(`#${SESSION_FIELD} textarea, #${SESSION_FIELD} input`);
  if (!session || !session.value) return false;
  const q = ((window.dptQuickState = window.dptQuickState || {})[tab] =
             window.dptQuickState[tab] || {busy: false, next: null, shown: {}, after: null, timer: 0, opened: -1e9});
  params = params || {};
  if (!Object.keys(params).length) {       // a tab's opening: asked at the pointer, then at Gradio's select
    if (performance.now() - q.opened < 1000) return false;
    q.opened = performance.now();
  }
  q.next = params;
  if (after) {
    q.after = after;
    clearTimeout(q.timer);
    q.timer = setTimeout(() => quickDone(q), waitMs || QUICK_WAIT_MS);
  }
  if (q.busy) return true;
  const send = () => {
    const query = new URLSearchParams({...q.next, tab, session: session.value});
    q.next = null;
    q.busy = true;
    const sentAt = performance.now(), before = {}, present = new Set();
    document.querySelectorAll(`[id^="${tab}-"] img`).forEach((img) => { before[img.src] = 1; present.add(img); });
    const put = (id, url) => new Promise((done) => {
      const look = () => {
        const img = document.querySelector(`#${id} img`);
        if (!img) {                        // the tab is still mounting: look again soon
          if (performance.now() - sentAt < MOUNT_WAIT_MS) setTimeout(look, 16); else done();
          return;
        }
        if (present.has(img) && !before[img.src] && img.src !== q.shown[id]) { done(); return; }
        img.src = url;
        q.shown[id] = url;
        img.decode().catch(() => {}).then(done);
      };
      look();
    });
    fetch(`${QUICK_ROUTE}?${query}`, {cache: "no-store"})
      .then((r) => (r.status === 200 ? r.json() : null))
      .then((pictures) => Promise.all(Object.entries(pictures || {}).map(([id, url]) => put(id, url))))
      .catch(() => {})
      .finally(() => {
        q.busy = false;
        if (q.next) send(); else quickDone(q);
      });
  };
  send();
  return true;
};
// resolves once the tab's quick requests are answered and drawn (QUICK_WAIT_MS at the latest): a tab's
// select event waits for it, so that its Gradio refresh does not share the cores with the quick answer
window.dptQuickIdle = (tab) => new Promise((resolve) => {
  const q = (window.dptQuickState || {})[tab], t0 = performance.now();
  const look = () => {
    if (!q || performance.now() - t0 > QUICK_WAIT_MS) resolve();
    else if (!q.busy) requestAnimationFrame(() => setTimeout(resolve, 0));   // its pictures drawn first
    else setTimeout(look, 8);
  };
  look();
});
// a tab's opening asks at the pointer, while Gradio mounts the tab (its select event comes after that)
document.addEventListener("pointerdown", (ev) => {
  const button = ev.target instanceof Element ? ev.target.closest(`button[aria-controls^="${TAB_PREFIX}"]`) : null;
  if (button && ev.button === 0 && button.getAttribute("aria-selected") !== "true")
    window.dptQuick(button.getAttribute("aria-controls").slice(TAB_PREFIX.length), {});
}, true);
document.addEventListener("pointerdown", () => { window.dptPointerDown = true; }, true);
document.addEventListener("pointerup", (ev) => { if (ev.isTrusted) window.dptPointerDown = false; }, true);
for (const [tab, ids] of Object.entries(QUICK_SLIDERS)) {
  document.addEventListener("input", (ev) => {
    if (!(ev.target instanceof Element) || !ids.some((id) => ev.target.closest("#" + id))) return;
    // the input that fired has the new value; of the others, the range (a slider's number box is
    // first in the page, and it follows the range a tick later)
    const params = {};
    for (const id of ids) {
      const box = ev.target.closest("#" + id) ? ev.target : document.querySelector(`#${id} input[type=range]`);
      if (box && box.value !== undefined) params[id] = box.value;
    }
    // a slider moved without a pointer on it (keys, a typed or scripted value) is let go of for Gradio
    // once its picture is drawn: the release event then sets every output from the decode just made.
    // A pointer drag gets its release from the pointer itself.
    const moved = ids.find((id) => ev.target.closest("#" + id));
    const range = document.querySelector(`#${moved} input[type=range]`);
    const release = () => {
      if (range && !window.dptPointerDown) range.dispatchEvent(new PointerEvent("pointerup", {bubbles: true}));
    };
    // (a decode takes longer than a click's view: its Gradio event would only wait for the same decode)
    if (!window.dptQuick(tab, params, release, SLIDER_WAIT_MS)) release();
  }, true);
}
"""


def page_script(pickers, quick_sliders: Optional[dict] = None) -> str:
    """The page's script (launch(js=...)): PICK_JS over these (image id, field id, hover id[, quick
    tab]) pickers; a picker with a quick tab also asks the quick path (ui/quick.py) for that tab's
    pictures. quick_sliders: {tab: slider element ids} whose drags ask it too, with every value."""
    import json

    rows = [list(p) + [None] * (4 - len(p)) for p in pickers]
    return ("() => {const PICKERS = " + json.dumps(rows) + f"; const HOVER_MS = {HOVER_MS}; "
            f"const QUICK_ROUTE = {json.dumps(QUICK_ROUTE)}; const SESSION_FIELD = {json.dumps(SESSION_FIELD)}; "
            f"const QUICK_SLIDERS = {json.dumps(quick_sliders or {})}; const TAB_PREFIX = {json.dumps(TAB_ELEM_PREFIX)};"
            + PICK_JS + "}")


def pick_field(picker) -> gr.Textbox:
    """The hidden textbox a picker's image writes "x,y,count" into (display pixels). Hidden by
    CSS, not visible=False, so that its field is in the page for the script."""
    return gr.Textbox("", show_label=False, container=False, elem_id=picker[1], elem_classes=["dpt-offscreen"])


def picked_pixel(lab: S.Lab, st, clicked_v) -> Optional[tuple[float, float]]:
    """The pixel of the original image a picker's "x,y,count" value names (None: nothing
    picked yet); a user error before any image is encoded."""
    if not clicked_v:
        return None
    if not has_image(st):
        raise user_error("no image yet: run the Depth tab on an image first")
    dx, dy, _ = (float(v) for v in clicked_v.split(","))
    return lab.display_to_image(st, dx, dy)


# -- what a tab is built from, and what it gives back -------------------------------------
@dataclass
class Context:
    lab: S.Lab
    state: gr.State                 # the session's SessionState
    model: gr.Dropdown              # the shared controls above the tabs
    base: gr.Slider
    aspect: gr.Radio
    model_info: gr.Markdown
    banner_text: str                # the untrained-model banner ('' for a trained startup model)
    banners: list = field(default_factory=list)
    encodes: list = field(default_factory=list)   # events after which the session has a new encode
    deferred: list = field(default_factory=list)  # wiring that needs every tab built (e.g. all banners)

    def later(self, wire: Callable[[], None]) -> None:
        """Run `wire()` once every tab is built (app.py calls finish())."""
        self.deferred.append(wire)

    def finish(self) -> None:
        for wire in self.deferred:
            wire()
        self.deferred.clear()

    def add_banner(self) -> gr.Markdown:
        md = gr.Markdown(self.banner_text, visible=bool(self.banner_text), elem_classes="dpt-banner")
        self.banners.append(md)
        return md


@dataclass
class Tab:
    refresh: Optional[Callable] = None          # render(*inputs, state, request) -> outputs
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    fit: Optional[Callable] = None              # fit(info, *fit_outputs' values) -> their updates
    fit_outputs: list = field(default_factory=list)
    # prepare(session, state, *inputs): what the tab will show, computed (and cached) while another
    # tab is visible, so that opening it only sends the result (the norms tab's figures)
    prepare: Optional[Callable] = None
    # quick(session, state, query) -> {element id: RGB} or None: the tab's pictures for the page's
    # quick path (ui/quick.py), asked at a click, a drag or the tab's opening (query empty)
    quick: Optional[Callable] = None


# -- wiring -------------------------------------------------------------------------------
def wire_refreshes(ctx: Context, tabs: list[tuple[str, Any, Tab]]) -> None:
    """After every new encode: fit the controls to the model, then re-render the visible
    tab if it has not shown this encode yet. Opening a tab does the same for it."""
    lab = ctx.lab
    # which tab is visible: set in the browser when a tab opens (a js-only event, no round trip
    # to the server before the tab's refresh), so a hidden component rather than a gr.State
    active_tab = gr.Textbox(tabs[0][0], visible=False, elem_id="active-tab")
    fitted = [t for _, _, t in tabs if t.fit]
    fit_outputs = [c for t in fitted for c in t.fit_outputs]

    def fit_controls(st, *values):
        if not has_image(st):
            return skips(len(fit_outputs))
        info = lab.manager.get(st["model"]).info
        out, k = [], 0
        for t in fitted:
            n = len(t.fit_outputs)
            out += list(t.fit(info, *values[k:k + n]))
            k += n
        return tuple(out)

    def render_if_stale(tab_id: str, tab: Tab, active, st, request, controls):
        """The tab's outputs if it is the visible one and has not shown this encode yet."""
        n_out = len(tab.outputs)
        if active != tab_id or not has_image(st) or shows_current(st, tab_id, lab):
            return skips(n_out)
        try:
            return tab.refresh(*controls, st, request)
        except gr.Error as exc:    # the tab's own button shows it; the log says why it is blank
            print(f"dpt-lab: {tab_id} tab not refreshed: {exc}", file=sys.stderr, flush=True)
            return skips(n_out)

    refreshing = [(tab_id, t) for tab_id, _, t in tabs if t.refresh]
    # After an encode, ONE event renders whichever tab is visible (one round trip, not one per tab):
    # its outputs are every tab's, each tab's controls are its inputs, state travels once.
    all_outputs: list = []
    all_inputs: list = []
    for _, t in refreshing:
        all_outputs += [c for c in t.outputs if c not in all_outputs]
        all_inputs += t.inputs

    def refresh_visible(active, st, request: gr.Request, *controls):
        values = {id(c): gr.skip() for c in all_outputs}
        later = []
        k = 0
        for tab_id, t in refreshing:
            mine = controls[k:k + len(t.inputs)]
            k += len(t.inputs)
            if tab_id == active:
                values.update((id(c), v) for c, v in zip(t.outputs, render_if_stale(tab_id, t, active, st, request,
                                                                                         mine)))
            elif t.prepare is not None and has_image(st):
                later.append((tab_id, t.prepare, mine))
        if later:
            _prepare_in_background(lab, sid(request), dict(st), later)
        return tuple(values[id(c)] for c in all_outputs)

    for event in ctx.encodes:
        synced = event.success(fit_controls, [ctx.state, *fit_outputs], fit_outputs, api_visibility="private",
                               queue=False)
        synced.success(refresh_visible, [active_tab, ctx.state, *all_inputs], all_outputs, api_visibility="private",
                       **MODEL_EVENT)
    for tab_id, ui, tab in tabs:
        ask = (f"if (window.dptQuick) {{ window.dptQuick({tab_id!r}, {{}}); await window.dptQuickIdle({tab_id!r}); }} "
               if tab.quick else "")
        opened = ui.select(None, None, active_tab, js=f"async () => {{ {ask}return {tab_id!r}; }}",
                           api_visibility="private", queue=False)
        if tab.refresh:           # opening a tab renders that tab only
            opened.then(_tab_refresh(render_if_stale, tab_id, tab), [active_tab, ctx.state, *tab.inputs],
                        tab.outputs, api_visibility="private", **MODEL_EVENT)


def _prepare_in_background(lab: S.Lab, session: str, st: dict, jobs: list) -> None:
    """Run the hidden tabs' prepare hooks after this event has answered (a daemon thread: a
    failure only means the tab computes its view when opened, as it would anyway)."""
    def run():
        for tab_id, prepare, controls in jobs:
            if lab.store.ended(session):      # the page closed meanwhile: nothing to prepare for
                return
            try:
                with S.cached_only():        # an evicted encode is not encoded again for a hidden tab
                    prepare(session, st, *controls)
            except Exception as exc:      # noqa: BLE001 - logged; the tab's own refresh reports errors
                print(f"dpt-lab: {tab_id} tab not prepared: {one_line(exc)}", file=sys.stderr, flush=True)
    threading.Thread(target=run, name="dpt-lab-prepare", daemon=True).start()


def _tab_refresh(render_if_stale, tab_id: str, tab: Tab):
    def refresh(active, st, request: gr.Request, *controls):
        return render_if_stale(tab_id, tab, active, st, request, controls)
    return refresh


def mark_rendered(st, tab_id: str, lab: S.Lab) -> None:
    """The session's tab `tab_id` now shows its current encode (no refresh until a new one)."""
    st["rendered"][tab_id] = lab.entry_key(st)


def shows_current(st, tab_id: str, lab: S.Lab) -> bool:
    """Whether the session's tab `tab_id` shows its current encode already (mark_rendered)."""
    return st["rendered"].get(tab_id) == lab.entry_key(st)
