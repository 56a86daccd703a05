"""What a person waits for in the page: five interactions in headless Chromium on the
real app, each timed from the action to the pixels, next to the server-side work it
needs, with a breakdown of where the rest goes.

    python bench/ui_latency.py [--stem depth_anything_v2_vits] [--base 518] [--reps 5] [--clicks 8]
                               [--drags 8] [--out bench/results/ui_latency_vits.md]

The app runs in this process (tests/app_server.py: the fixture checkpoint --stem, real
layout, deterministic random weights) with Gradio's own profiler on (GRADIO_PROFILING=1),
so every event's queue wait, preprocess, handler and postprocess are known. Chromium
(Playwright) loads the page; per repetition a new picture (assets/coffee.jpg, 600x400,
with a one-pixel mark so each is a new encode):

1. upload -> depth shown: the file set on the Depth tab's input, until the depth <img>
   has loaded and decoded (reference: model.predict of the same picture, here);
2. open the Attention tab -> tiles shown (reference: one Lab.attention_at);
3. --clicks clicks on the image -> their tiles shown (reference: Lab.attention_at);
4. open the Block norms tab -> heatmap drawn: Plotly's `plotly_afterplot` for the new
   figure, then one animation frame (reference: Lab.norms_view);
5. --drags fusion slider positions -> scaled depth shown (reference: the decoder alone, every
   fusion block and the head, none taken from the previous position);
6. hover: on the Features tab's similarity image, with "follow the pointer" on, the pointer
   swept across the image for --hover-seconds (a move every 16 ms, as a mouse sends them):
   how many new maps the page showed per second while it moved, and whether the map left
   on screen is the last position's (reference: one Lab.features_view similarity). Goal:
   at least 5 updates per second.

Breakdown per interaction (medians, ms): `to server` (from the action to the first event's
start: the browser's dispatch, the request, the queue join), `handler` (the handlers' own time on the path),
`gradio` (queue wait + pre/postprocess of those events: image encoding, file caching),
`to browser` (from the last event's end to the image or figure data arriving: SSE,
Svelte, the file fetch from the Performance API's resource timing), `draw` (from the data
arriving to the decoded image or the drawn figure). Both clocks are this machine's wall
clock (time.time() and Date.now()). When the picture shown came from the page's quick path
(dpt_lab/ui/quick.py: a data URL from its route, ahead of the Gradio event), the breakdown is
the route's: `to server` until the route started, `handler` its whole answer (the view and
its JPEG), `gradio` 0, `to browser` until the response's end (resource timing), `draw`; the
last column counts how many of an interaction's repetitions the quick path showed.

`Shown` is the first animation frame that draws the new, decoded picture, taken once that
frame's rendering is done; the watch is armed in the page before the action, so Playwright's
own round trips after the action do not delay it (until stop 31 the watch started after the
action and took one more frame: ~15-40 ms later on this machine, BENCHMARKS.md).

Each interaction starts once the page has settled (the picture it watches unchanged for
0.5 s): an action's quick-path picture and then its Gradio event's output both change the
<img>, so without it the next action would be timed by the previous one's late output.

Then Gradio's own floor in the same browser: a button whose handler returns at once, until its
text or a 451x300 JPEG is shown. No interaction through Gradio's events is quicker than that.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GRADIO_PROFILING", "1")       # before gradio is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
GOALS = {"upload": "<= 1.3x predict", "attention_tab": "<= 250 ms", "click": "<= 80 ms median",
         "norms_tab": "<= 600 ms", "fusion": "<= 200 ms median"}

# Armed before the action (so that the watch does not start late, after Playwright's round trips):
# window.__dptWait resolves with {shown, arrived} (Date.now() ms) at the first animation frame in
# which the <img> under `sel` has a src other than `old`, is loaded and decoded: `shown` is taken
# once that frame's rendering is done (a task posted from its requestAnimationFrame callback runs
# after it), `arrived` is the file's responseEnd (resource timing).
WAIT_IMG = """([sel, old]) => { window.__dptWait = (async () => {
  const QUICK_ROUTE = "/dpt_lab/quick";
  const pick = () => { const all = document.querySelectorAll(sel + ' img');
                       return all.length ? all[all.length - 1] : null; };
  let asked = null, decoded = false;
  for (;;) {
    await new Promise(r => requestAnimationFrame(() => r()));
    const img = pick();
    if (!(img && img.src && img.src !== old && img.complete && img.naturalWidth > 0)) continue;
    if (asked !== img.src) {                     // a picture still decoding is drawn in a later frame
      asked = img.src; decoded = false;
      const src = img.src;
      img.decode().catch(() => {}).then(() => { if (asked === src) decoded = true; });
      await Promise.resolve();
    }
    if (!decoded) continue;
    const shown = await new Promise(r => setTimeout(() => r(Date.now()), 0));
    const quick = img.src.startsWith("data:");      // set by the quick path (ui/quick.py) from its route's answer
    const res = quick ? performance.getEntriesByType("resource").filter(e => e.name.includes(QUICK_ROUTE)).pop()
                      : performance.getEntriesByName(img.src).pop();
    const arrived = res ? performance.timeOrigin + res.responseEnd : shown;
    return {shown, arrived, quick, src: img.src};
  }
})(); }"""
# The same for a text field's value (Gradio's floor): the frame that shows the new text.
WAIT_TEXT = """([sel, old]) => { window.__dptWait = (async () => {
  for (;;) {
    await new Promise(r => requestAnimationFrame(() => r()));
    if (document.querySelector(sel).value !== old) return await new Promise(r => setTimeout(() => r(Date.now()), 0));
  }
})(); }"""
WAITED = "() => window.__dptWait"


def watched(page, watch: str, arg, action):
    """Arm `watch` (WAIT_IMG, WAIT_TEXT) with `arg`, run `action()`: (the page's Date.now()
    just before the action, what the watch resolved with)."""
    page.evaluate(watch, arg)
    t0 = page.evaluate("Date.now()")
    action()
    return t0, page.evaluate(WAITED)


def wait_img(page, sel: str, old, action) -> tuple[float, dict]:
    """`watched` for the <img> under `sel`: the WAIT_IMG timing of the new picture."""
    return watched(page, WAIT_IMG, [sel, old], action)


# Resolves once the <img> under `sel` has kept its src for `quiet` ms: the interaction before is over
# (the quick path's picture and then its Gradio event's both shown), so the next one's first new
# picture is its own.
SETTLE = """async ([sel, quiet]) => {
  let last = null, since = performance.now();
  for (;;) {
    const e = document.querySelector(sel + ' img');
    const src = e ? e.src : null;
    if (src !== last) { last = src; since = performance.now(); }
    else if (performance.now() - since >= quiet) return src;
    await new Promise(r => setTimeout(r, 20));
  }
}"""
SETTLE_MS = 500

# Plotly: a new figure object on the plot div, drawn (plotly_afterplot), then one frame.
WAIT_PLOT = """async ([sel, oldMark]) => {
  for (;;) {
    const gd = document.querySelector(sel + ' .js-plotly-plot');
    if (gd && gd.data && gd.__dptMark !== oldMark && gd._fullLayout && !gd._transitioning &&
        document.querySelectorAll(sel + ' g.hm, ' + sel + ' .heatmaplayer image, ' + sel + ' .imagelayer image').length) {
      gd.__dptMark = oldMark + 1;
      await new Promise(r => requestAnimationFrame(() => r()));
      return {shown: Date.now(), arrived: window.__dptPlotData || Date.now()};
    }
    await new Promise(r => requestAnimationFrame(() => r()));
  }
}"""


# Keeps Date.now() of every new, decoded picture under `sel` in window.__dptSeen until __dptWatch is false.
WATCH_IMG = """(sel) => {
  window.__dptSeen = []; window.__dptWatch = true; let last = null;
  const loop = () => {
    const e = document.querySelector(sel + ' img');
    if (e && e.src !== last && e.complete && e.naturalWidth > 0) { last = e.src; window.__dptSeen.push(Date.now()); }
    if (window.__dptWatch) requestAnimationFrame(loop);
  };
  loop();
}"""


def ms(seconds: float) -> float:
    return seconds * 1000.0


class Traces:
    """Gradio's profiler records, by time window."""

    def __init__(self):
        from gradio import profiling

        self.profiling = profiling
        profiling.collector.clear()

    def between(self, t0_ms: float, t1_ms: float) -> list[dict]:
        out = []
        for t in self.profiling.collector.get_all():
            start = t["timestamp"] * 1000.0
            if t["fn_name"] == "gradio_file_upload":
                continue
            if t0_ms - 5 <= start <= t1_ms:
                out.append(t)
        return out


def breakdown(traces: list[dict], t0: float, timing: dict) -> dict:
    """handler / gradio / to-browser / draw (ms) for one interaction started at t0: the
    events that ended before its pixels were shown (the rest, e.g. downloads written
    after the view, are not on its path)."""
    if timing.get("quick"):              # the quick path's answer was shown: its route's own time
        from dpt_lab.ui import quick

        answers = [(s, e) for _, s, e in quick.served if t0 - 5 <= s * 1000.0 <= timing["shown"]]
        if answers:
            start, end = (v * 1000.0 for v in answers[-1])
            arrived = max(timing["arrived"], end)
            return dict(total=timing["shown"] - t0, to_server=max(0.0, start - t0), handler=end - start, gradio=0.0,
                        to_browser=max(0.0, arrived - end), draw=max(0.0, timing["shown"] - arrived), events=0,
                        quick=True)
    traces = [t for t in traces if t["timestamp"] * 1000.0 + t["total_ms"] <= timing["shown"]]
    if traces:
        handler = sum(t["fn_call_ms"] for t in traces)
        gradio = sum(t["total_ms"] - t["fn_call_ms"] for t in traces)
        server_end = max(t["timestamp"] * 1000.0 + t["total_ms"] for t in traces)
    else:
        handler = gradio = 0.0
        server_end = t0
    total = timing["shown"] - t0
    arrived = max(timing["arrived"], server_end)
    first = min((t["timestamp"] * 1000.0 for t in traces), default=t0)
    return dict(total=total, to_server=max(0.0, first - t0), handler=handler, gradio=gradio,
                to_browser=max(0.0, arrived - server_end), draw=max(0.0, timing["shown"] - arrived),
                events=len(traces))


def pictures(n: int, folder: Path) -> list[Path]:
    import numpy as np
    from PIL import Image

    with Image.open(ROOT / "assets" / "coffee.jpg") as im:
        base = np.asarray(im.convert("RGB").resize((600, 400), Image.BICUBIC))
    out = []
    for i in range(n + 1):
        a = base.copy()
        a[0, i, :] = 255 - a[0, i, :]                   # a new hash: a new encode, same size
        p = folder / f"pic{i}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


def summary(rows: list[dict]) -> dict:
    keys = ("total", "to_server", "handler", "gradio", "to_browser", "draw")
    return {k: (statistics.median(r[k] for r in rows), max(r[k] for r in rows)) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stem", default="depth_anything_v2_vits")
    ap.add_argument("--base", type=int, default=518)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clicks", type=int, default=8)
    ap.add_argument("--drags", type=int, default=8)
    ap.add_argument("--hover-seconds", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--traces", action="store_true", help="print every Gradio event on each interaction's path")
    args = ap.parse_args()
    out_path = Path(args.out or ROOT / "bench" / "results" / f"ui_latency_{args.stem.split('_')[-1]}.md")

    from app_server import launch
    from playwright.sync_api import sync_playwright

    from dpt_lab import memory

    memory.configure()
    results: dict[str, list[dict]] = {k: [] for k in GOALS}
    results["hover"] = []
    refs: dict[str, list[float]] = {k: [] for k in GOALS}
    with tempfile.TemporaryDirectory(prefix="dpt_lab_ui_latency_") as tmp:
        tmp = Path(tmp)
        server = launch(tmp, checkpoints=(args.stem,), heartbeat_s=15)    # Gradio's own interval, as the app runs
        lab, model = server.lab, server.manager.get(server.model)
        pics = pictures(args.reps, tmp)
        traces = Traces()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                page.set_default_timeout(300_000)
                page.goto(server.url)
                page.wait_for_selector("#depth-input")
                number = page.locator("#base-size input[type=number]")
                number.fill(str(args.base))
                number.press("Enter")
                # warm-up: one picture through every tab (model packed, Plotly loaded)
                run_once(page, pics[-1], None, args, traces, lab, model, warm=True)
                for rep in range(args.reps):
                    run_once(page, pics[rep], results, args, traces, lab, model, refs=refs)
                    print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                        f"{k} {results[k][-1]['total']:.0f} ms" for k in GOALS if results[k])
                        + f", hover {results['hover'][-1]['rate']:.1f}/s", flush=True)
                floor = gradio_floor(browser, tmp)
                browser.close()
        finally:
            server.close()
    write(results, refs, args, out_path, floor)


def run_once(page, pic: Path, results, args, traces, lab, model, *, warm=False, refs=None) -> None:
    import torch

    def record(name, t0, timing, ref_ms=None):
        if results is None:
            return
        found = traces.between(t0, timing["shown"])
        row = breakdown(found, t0, timing)
        results[name].append(row)
        if args.traces:
            print(f"  {name}: shown after {timing['shown'] - t0:.0f} ms")
            for t in found:
                print(f"    {t['fn_name']}: +{t['timestamp'] * 1000 - t0:.0f} ms, queue {t['queue_wait_ms']:.0f}, "
                      f"pre {t['preprocess_ms']:.0f}, fn {t['fn_call_ms']:.0f}, post {t['postprocess_ms']:.0f}, "
                      f"total {t['total_ms']:.0f}")
        if ref_ms is not None:
            refs[name].append(ref_ms)

    def now():
        return page.evaluate("Date.now()")

    # 1. upload -> depth shown
    page.get_by_role("tab", name="Depth", exact=True).click()
    old = page.evaluate("() => { const a = document.querySelectorAll('#depth-output img'); "
                        "return a.length ? a[a.length - 1].src : null; }")
    t0, timing = wait_img(page, "#depth-output", old,
                          lambda: page.set_input_files("#depth-input input[type=file]", str(pic)))
    page.wait_for_function("(t) => document.querySelector('#depth-info').innerText.includes(t)", arg="600x400")
    ref = None
    if results is not None:
        with torch.inference_mode():
            t = time.perf_counter()
            model.predict(str(pic), base_size=args.base)
            ref = ms(time.perf_counter() - t)
    record("upload", t0, timing, ref)
    (sess,) = {s for s in lab.store.sessions()}
    entry = lab.store.entries(sess)[-1]
    model_name, digest, base, keep = entry.key
    state = {"image": load_rgb(pic), "display": None, "hash": digest, "model": model_name, "base_size": base,
             "keep_aspect": keep, "name": "pic", "rendered": {}, "click": None}

    def ref_of(fn):
        t = time.perf_counter()
        fn()
        return ms(time.perf_counter() - t)

    # 2. open the Attention tab -> tiles shown
    old = page.evaluate("() => { const e = document.querySelector('#attention-tiles img'); return e ? e.src : null; }")
    t0, timing = wait_img(page, "#attention-tiles", old,
                          lambda: page.get_by_role("tab", name="Attention", exact=True).click())
    timing["src"] = page.evaluate(SETTLE, ["#attention-tiles", SETTLE_MS])
    record("attention_tab", t0, timing,
           ref_of(lambda: lab.attention_at(sess, dict(state), None, None, 12, "row", False, False, "inferno", 0.0,
                                           False)) if results is not None else None)

    # 3. clicks -> tiles shown
    img = page.locator("#attention-image img")
    box = img.bounding_box()
    rng = np.random.default_rng(len(str(pic)))
    for _ in range(1 if warm else args.clicks):
        fx, fy = rng.uniform(0.05, 0.95, 2)
        old = timing["src"]
        t0, timing = wait_img(page, "#attention-tiles", old,
                              lambda: page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"]))
        timing["src"] = page.evaluate(SETTLE, ["#attention-tiles", SETTLE_MS])
        record("click", t0, timing,
               ref_of(lambda: lab.attention_at(sess, dict(state), fx * 600, fy * 400, 12, "row", False, False,
                                               "inferno", 0.0, False)) if results is not None else None)

    # 4. open the Block norms tab -> heatmap drawn
    mark = page.evaluate("() => { const gd = document.querySelector('#norms-heatmap .js-plotly-plot'); "
                         "return gd ? (gd.__dptMark || 0) : 0; }")
    t0 = now()
    page.get_by_role("tab", name="Block norms", exact=True).click()
    timing = page.evaluate(WAIT_PLOT, ["#norms-heatmap", mark])
    record("norms_tab", t0, timing,
           ref_of(lambda: lab.norms_view(sess, dict(state), "auto", 12, True, light=True)) if results is not None else None)

    # 5. fusion slider -> scaled depth shown
    old = page.evaluate("() => { const e = document.querySelector('#fusion-scaled img'); return e ? e.src : null; }")
    _, timing = wait_img(page, "#fusion-scaled", old,
                         lambda: page.get_by_role("tab", name="Fusion scaling", exact=True).click())
    timing["src"] = page.evaluate(SETTLE, ["#fusion-scaled", SETTLE_MS])
    entry = lab.store.entries(sess)[-1]
    values = np.linspace(0.9, -1.5, 2 if warm else args.drags)
    for v in values:
        old = timing["src"]
        t0, timing = wait_img(page, "#fusion-scaled", old,
                              lambda: page.locator("#fusion-scale-2 input[type=range]").fill(f"{v:.2f}"))
        timing["src"] = page.evaluate(SETTLE, ["#fusion-scaled", SETTLE_MS])
        if results is not None:
            with torch.inference_mode():   # every fusion block and the head (no stages kept from a move)
                layers = model.fusion_inputs(entry.feats)
                t = time.perf_counter()
                model.decoder.fuse(layers, entry.feats.out_size, (1, float(v), 1, 1))
                ref = ms(time.perf_counter() - t)
            record("fusion", t0, timing, ref)
    page.locator("#fusion-reset").click()
    page.wait_for_function("() => document.querySelector('#fusion-info').innerText.includes('factors 1, 1, 1, 1 ')")

    # 6. hover: the pointer sweeps the similarity image; maps shown per second while it moves
    page.get_by_role("tab", name="Features", exact=True).click()
    page.wait_for_function("() => document.querySelector('#features-info').innerText.includes('block')")
    img = page.locator("#features-image img")
    box = None
    while box != (box := img.bounding_box()):
        page.wait_for_timeout(100)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_function("() => document.querySelector('#features-info').innerText.includes('cosine')")
    hover = page.locator("#features-hover input")
    hover.check()
    page.evaluate(WATCH_IMG, "#features-image")
    seconds = 0.5 if warm else args.hover_seconds
    steps = max(2, int(seconds * 1000 / 16))
    t0 = now()
    for i in range(steps):
        f = i / (steps - 1)
        fx, fy = 0.05 + 0.9 * f, 0.5 + 0.4 * np.sin(6.283 * f) * 0.9
        page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        page.wait_for_timeout(16)
    t1 = now()
    page.wait_for_timeout(1500)                               # the last position's map arrives
    seen = page.evaluate("() => { window.__dptWatch = false; return window.__dptSeen; }")
    text = page.locator("#features-info").inner_text()
    page.mouse.move(0, 0)
    hover.uncheck()
    if results is not None:
        from dpt_lab import attention
        grid = entry.probe.grid(entry.probe.num_layers - 1)
        row, col = attention.patch_at_pixel(entry.meta, grid, fx * 600 - 0.5, fy * 400 - 0.5)
        shown = [t for t in seen if t0 <= t <= t1]
        rate = len(shown) / ((t1 - t0) / 1000)
        ref = ref_of(lambda: lab.features_view(sess, dict(state), 12, "similarity", fx * 600, fy * 400))
        results["hover"].append({"rate": rate, "last_ok": f"patch row {row}, col {col}" in text, "ref": ref})


def gradio_floor(browser, tmp: Path, n: int = 15) -> dict[str, list[float]]:
    """What any Gradio event costs here, whatever its handler: a click on a button whose
    handler returns at once, until the page shows the answer (text; a 451x300 JPEG), queued
    and not. The app's interactions cannot be quicker than these."""
    import gradio as gr
    from PIL import Image

    jpeg = tmp / "floor.jpg"
    Image.fromarray(np.full((300, 451, 3), 128, np.uint8)).save(jpeg, quality=92)
    count = [0]

    def text():
        count[0] += 1
        return f"answer {count[0]}"

    def picture():
        count[0] += 1
        out = tmp / f"floor{count[0]}.jpg"
        out.write_bytes(jpeg.read_bytes())
        return str(out)

    with gr.Blocks() as demo:
        b1, b2, b3 = (gr.Button(k, elem_id=k) for k in ("queued", "unqueued", "image"))
        t1, t2 = gr.Textbox(elem_id="t1"), gr.Textbox(elem_id="t2")
        im = gr.Image(elem_id="im", interactive=False)
        b1.click(text, None, t1, show_progress="hidden")
        b2.click(text, None, t2, queue=False, show_progress="hidden")
        b3.click(picture, None, im, show_progress="hidden")
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, allowed_paths=[str(tmp)])
    out: dict[str, list[float]] = {"queued text": [], "unqueued text": [], "queued image": []}
    try:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#queued")
        for key, button, done in (("queued text", "#queued", "#t1 textarea"), ("unqueued text", "#unqueued", "#t2 textarea"),
                                  ("queued image", "#image", None)):
            box = page.locator(button).bounding_box()
            for i in range(n + 2):
                old = (page.locator(done).input_value() if done else
                       page.evaluate("() => { const e = document.querySelector('#im img'); return e ? e.src : null; }"))
                def click():
                    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                if done:
                    t0, shown = watched(page, WAIT_TEXT, [done, old], click)
                else:
                    t0, timing = wait_img(page, "#im", old, click)
                    shown = timing["shown"]
                if i >= 2:                                   # the first two warm up
                    out[key].append(shown - t0)
        page.close()
    finally:
        demo.close()
    return out


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write(results, refs, args, out_path: Path, floor: dict) -> None:
    lines = [f"## Page latency: {args.stem} at {args.base} (headless Chromium)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}. Command: "
             f"`python bench/ui_latency.py --stem {args.stem} --base {args.base} --reps {args.reps} "
             f"--clicks {args.clicks} --drags {args.drags} --hover-seconds {args.hover_seconds:g}`. ms, median (max) over {args.reps} pictures "
             f"(clicks and drags: all of them).", "",
             "| interaction | shown after | server-side work | ratio | goal | to server | handler | gradio | to browser "
             "| draw | shown by the quick path |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        if not rows or name == "hover":
            continue
        s = summary(rows)
        ref = statistics.median(refs[name]) if refs[name] else float("nan")
        lines.append(f"| {name} | {s['total'][0]:.0f} ({s['total'][1]:.0f}) | {ref:.0f} | {s['total'][0] / ref:.2f}x | "
                     f"{GOALS[name]} | {s['to_server'][0]:.0f} | {s['handler'][0]:.0f} | {s['gradio'][0]:.0f} | "
                     f"{s['to_browser'][0]:.0f} | {s['draw'][0]:.0f} | {sum(bool(r.get('quick')) for r in rows)}/"
                     f"{len(rows)} |")
    if results["hover"]:
        rates = [r["rate"] for r in results["hover"]]
        lines += ["", f"Hover on the similarity image (pointer swept for {args.hover_seconds:g} s, a move every 16 ms): "
                  f"{statistics.median(rates):.1f} new maps per second, median (min {min(rates):.1f}) over "
                  f"{len(rates)} sweeps (goal: at least 5); the map left on screen was the last position's in "
                  f"{sum(r['last_ok'] for r in results['hover'])} of {len(rates)}; one similarity view in process: "
                  f"{statistics.median(r['ref'] for r in results['hover']):.0f} ms."]
    if floor:
        lines += ["", "Gradio's own floor in the same browser and process (a page with one button, its "
                  "handler returning at once; median (max) of 15): "
                  + ", ".join(f"{k} {statistics.median(v):.0f} ({max(v):.0f}) ms" for k, v in floor.items()) + "."]
    text = "\n".join(lines) + "\n"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
