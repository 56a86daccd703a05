"""The app as a person meets it: headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright for Python) on the real app, every tab. One server and one browser page for
the module; the page loads an example on the Depth tab first, then each test uses a tab.
Screenshots of every tab go to test-output/browser/ (git-ignored). Set
DPT_LAB_UPDATE_SCREENSHOT=1 to also copy the Attention tab to docs/screenshot.png."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]   # a fake webcam
ASSET = ROOT / "assets" / "chelsea.jpg"          # 451 x 300, the first example
BASE = 266                                       # small processing size: fast on CPU
OUT = ROOT / "test-output" / "browser"
TIMEOUT_MS = 120_000

pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is missing (.ci/run installs it)")


# an <img> that is loaded and decoded (its src may just have been set by the quick path)
IMG_READY = "(s) => { const e = document.querySelector(s); return e && e.complete && e.naturalWidth > 0; }"


def png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def img_pixels(page, selector: str, index: int = 0) -> np.ndarray:
    """The pixels of the index-th <img> under selector, fetched as the browser would (a data
    URL, as the quick path sets them, is decoded as it is)."""
    import base64

    src = page.locator(f"{selector} img").nth(index).get_attribute("src")
    if src.startswith("data:"):
        return png(base64.b64decode(src.split(",", 1)[1]))
    resp = page.request.get(src)
    assert resp.ok, (src, resp.status)
    return png(resp.body())


def assert_shown(shown: np.ndarray, want: np.ndarray) -> None:
    """The page's images are JPEGs (quality 92, no chroma subsampling): the pixels the app
    rendered, within JPEG's error; the API and the downloads keep them lossless. The random
    model's depth is pixel noise, JPEG's worst case (mean error ~2.4); another picture, colour
    map or crop differs by tens."""
    assert shown.shape == want.shape, (shown.shape, want.shape)
    err = np.abs(shown.astype(np.int16) - want.astype(np.int16))
    assert err.mean() < 4.0 and np.percentile(err, 99) < 32, (err.mean(), np.percentile(err, 99))


def src_of(page, selector: str, index: int = 0) -> str:
    return page.locator(f"{selector} img").nth(index).get_attribute("src")


def wait_src_change(page, selector: str, old: str | None) -> str:
    page.wait_for_function("([s, old]) => { const e = document.querySelector(s); return e && e.src && e.src !== old; }",
                           arg=[f"{selector} img", old], timeout=TIMEOUT_MS)
    return src_of(page, selector)


def wait_text(page, selector: str, needle: str, timeout_ms: int = TIMEOUT_MS) -> str:
    page.wait_for_function("([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
                           arg=[selector, needle], timeout=timeout_ms)
    return page.locator(selector).inner_text()


def download(page, selector: str, folder: Path, timeout_ms: int = TIMEOUT_MS) -> Path:
    """Click the first file link of the gr.File at `selector` as a user would; the saved file."""
    link = page.locator(f"{selector} a")
    link.first.wait_for(timeout=timeout_ms)
    with page.expect_download() as info:
        link.first.click()
    path = Path(folder) / info.value.suggested_filename
    info.value.save_as(path)
    return path


def shot(page, name: str, full_page: bool = False) -> Path:
    """Save the tab's screenshot; the page must show no error message (Gradio's toasts)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    toasts = page.locator(".toast-body").all_inner_texts()
    assert not toasts, toasts
    return path


@pytest.fixture(scope="module")
def browser_page(app_server):
    """(page, app_server, page errors): Chromium on the app, the first example loaded."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            context.grant_permissions(["camera"])
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(app_server.url)
            page.wait_for_selector("#depth-input")
            number = page.locator("#base-size input[type=number]")
            number.fill(str(BASE))
            number.press("Enter")
            page.locator("#depth-examples").locator("button, img").first.click()
            page.wait_for_function("() => document.querySelectorAll('#depth-output img').length == 2")
            wait_text(page, "#depth-info", f"base size {BASE}")
            yield page, app_server, errors
        finally:
            browser.close()


def browser_session(server) -> str:
    (sess,) = server.lab.store.sessions()          # only the browser uses this server
    return sess


def test_depth_tab_shows_the_depth_of_the_example(browser_page):
    from dpt_lab import depth as depth_mod

    page, server, errors = browser_page
    text = page.locator("#depth-info").inner_text()
    assert "451x300 image → 406x266 model input" in text, text
    shown_input = img_pixels(page, "#depth-output", 0)
    shown_depth = img_pixels(page, "#depth-output", 1)
    with Image.open(ASSET) as im:
        assert_shown(shown_input, np.asarray(im.convert("RGB")))
    model = server.manager.get(server.model)
    want = depth_mod.render(model.predict(str(ASSET), base_size=BASE), metric=False, cmap="turbo").colored
    assert shown_depth.shape == (300, 451, 3)
    assert_shown(shown_depth, want)                   # the example's own depth, as the app computes it
    assert page.locator("#depth-colorbar img").count() == 1
    shot(page, "depth")
    assert not errors, errors


def test_attention_clicks_mark_the_patch_under_the_pointer(browser_page):
    from dpt_lab import attention

    page, server, errors = browser_page
    lab = server.lab
    page.get_by_role("tab", name="Attention").click()
    wait_text(page, "#attention-info", "patch row")              # the tab renders on its own (image centre)
    img = page.locator("#attention-image img")
    page.wait_for_function(IMG_READY, arg="#attention-image img")  # the quick path may have just set it
    natural = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    assert natural == [451, 300]                                 # the clickable image is served at full size
    (entry,) = lab.store.entries(browser_session(server))
    grid = entry.probe.grid(11)
    assert grid == (19, 29)
    state = {"image": np.asarray(Image.open(ASSET).convert("RGB")), "display": None}
    key = entry.key
    state.update(model=key[0], hash=key[1], base_size=key[2], keep_aspect=key[3])
    tiles_src = src_of(page, "#attention-tiles")
    seen_tiles = []
    for want_row, want_col in ((3, 22), (15, 5)):
        box = img.bounding_box()
        # the displayed box has the image's aspect (no letterbox): the click maps linearly
        assert abs(box["width"] / box["height"] - 451 / 300) < 0.01, box
        # the centre of the wanted patch, in pixels of the served image, then on screen
        ih, iw = entry.meta.input_size
        x_img = (want_col + 0.5) * (iw / grid[1]) * 451 / iw - 0.5
        y_img = (want_row + 0.5) * (ih / grid[0]) * 300 / ih - 0.5
        sx = box["x"] + (x_img + 0.5) * box["width"] / 451
        sy = box["y"] + (y_img + 0.5) * box["height"] / 300
        page.mouse.click(sx, sy)
        tiles_src = wait_src_change(page, "#attention-tiles", tiles_src)
        # the tiles may come first (the quick path); the text comes with the click's Gradio event
        text = wait_text(page, "#attention-info", f"patch row {want_row}, col {want_col}")
        assert f"patch row {want_row}, col {want_col}" in text, text
        # the patch the app computes for that screen point is the one under the pointer
        px = (sx - box["x"]) * 451 / box["width"] - 0.5
        py = (sy - box["y"]) * 300 / box["height"] - 0.5
        assert attention.patch_at_pixel(entry.meta, grid, px, py) == (want_row, want_col)
        assert "layer 12/12" in text
        marked = img_pixels(page, "#attention-image")
        assert_shown(marked, attention.mark_patch(state["image"], None, grid, want_row, want_col))
        tiles = img_pixels(page, "#attention-tiles")
        ref = lab.attention_at(browser_session(server), dict(state), x_img, y_img, 12, "row", False, False,
                               "inferno", 0.0, False)
        assert ref.patch == (want_row, want_col)
        assert_shown(tiles, ref.tiles)
        seen_tiles.append(tiles)
    assert not np.array_equal(seen_tiles[0], seen_tiles[1])       # the tile grid changed with the click
    shot(page, "attention")
    if os.environ.get("DPT_LAB_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(OUT / "attention.png", ROOT / "docs" / "screenshot.png")
    assert not errors, errors


def session_state(server) -> dict:
    """A state dict naming the browser session's current encode (for in-process references)."""
    (entry,) = server.lab.store.entries(browser_session(server))
    model, digest, base, keep = entry.key
    return {"image": np.asarray(Image.open(ASSET).convert("RGB")), "display": None, "hash": digest,
            "model": model, "base_size": base, "keep_aspect": keep, "name": "chelsea"}


def test_norms_figure_renders_and_outlier_table_fills(browser_page):
    page, server, errors = browser_page
    page.get_by_role("tab", name="Block norms").click()
    # the Plotly figure is drawn in the page: one heatmap (the page's mosaic), a title per block
    page.wait_for_selector("#norms-heatmap .js-plotly-plot svg.main-svg")
    page.wait_for_function("() => document.querySelectorAll('#norms-heatmap g.hm').length == 1 && "
                           "[...document.querySelectorAll('#norms-heatmap .annotation-text')]"
                           ".filter(e => e.textContent.startsWith('block ')).length == 12")
    # hovering a cell of block 12 names that block's token
    (entry,) = server.lab.store.entries(browser_session(server))
    fig = server.lab.norms_view(browser_session(server), session_state(server), "auto", 12, True, light=True).heatmap
    where = np.asarray(fig.data[0].customdata)
    y, x = (int(v[0]) for v in np.nonzero((where == (12, 4, 7)).all(axis=-1)))
    px, py = page.evaluate("""([x, y]) => { const gd = document.querySelector('#norms-heatmap .js-plotly-plot');
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa.d2p(x), box.top + ya._offset + ya.d2p(y)]; }""", [x, y])
    page.mouse.move(px, py)
    page.wait_for_function("() => (document.querySelector('#norms-heatmap .hoverlayer') || {}).textContent"
                           "?.includes('row 4, col 7')")
    label = page.locator("#norms-heatmap .hoverlayer").text_content()
    assert "block 12" in label and f"norm {entry.norms().patch_norms[11][4, 7]:.4g}" in label, label
    page.mouse.move(5, 5)
    summary = page.locator("#norms-summary textarea")
    page.wait_for_function("() => document.querySelector('#norms-summary textarea').value.startsWith('12 blocks')")
    assert "grid 19x29" in summary.input_value()
    # a fixed threshold at the 99th percentile of every norm: a few dozen outliers
    (entry,) = server.lab.store.entries(browser_session(server))
    norms = np.concatenate([np.ravel(n) for n in entry.norms().patch_norms])
    threshold = round(float(np.percentile(norms, 99)), 2)
    want = server.lab.norms_view(browser_session(server), session_state(server), threshold, 12, True).table
    assert 0 < len(want) < 500
    page.locator("#norms-threshold input").fill(str(threshold))
    page.locator("#norms-threshold-mode").get_by_text("fixed", exact=True).click()
    cells = "#norms-table [role=gridcell][data-row='0']"            # the grid's first data row
    page.wait_for_function("(s) => document.querySelectorAll(s).length == 5", arg=cells)
    first = [c.strip() for c in page.locator(cells).all_inner_texts()]
    block, row, col, norm = want[0][:4]
    assert [int(first[0]), int(first[1]), int(first[2])] == [block, row, col], (first, want[0])
    assert float(first[3]) == pytest.approx(norm, abs=0.01) and float(first[3]) > threshold
    assert f"{len(want)} outlier" in summary.input_value()
    shot(page, "norms")
    assert not errors, errors


def test_fusion_slider_drag_changes_depth_and_reset_restores_it(browser_page):
    page, server, errors = browser_page
    page.get_by_role("tab", name="Fusion scaling").click()
    try:
        wait_text(page, "#fusion-info", "factors 1, 1, 1, 1 ", timeout_ms=30_000)
    except Exception:  # noqa: BLE001 - once seen in CI: the tab showed no render; select it again
        print("fusion tab: no render 30 s after it was selected; selecting it again")
        page.get_by_role("tab", name="Depth").click()
        page.get_by_role("tab", name="Fusion scaling").click()
        wait_text(page, "#fusion-info", "factors 1, 1, 1, 1 ")
    original = img_pixels(page, "#fusion-scaled")
    before = src_of(page, "#fusion-scaled")
    slider = page.locator("#fusion-scale-4 input[type=range]")
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    x0 = box["x"] + box["width"] * 0.6                   # the thumb: 1 on -5 .. 5
    page.mouse.move(x0, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.25, y, steps=8)
    page.mouse.up()
    value = float(slider.evaluate("e => e.value"))
    assert value < 0
    # the last value dragged to is the one shown (no pile-up, no lost final value)
    wait_text(page, "#fusion-info", f"factors 1, 1, 1, {value:g} ")
    scaled = img_pixels(page, "#fusion-scaled")
    assert src_of(page, "#fusion-scaled") != before
    assert scaled.shape == original.shape and not np.array_equal(scaled, original)
    ref = server.lab.fusion_view(browser_session(server), session_state(server), (1, 1, 1, value), "turbo")
    assert_shown(scaled, ref.scaled.colored)
    shot(page, "fusion")
    page.locator("#fusion-reset").click()
    wait_text(page, "#fusion-info", "factors 1, 1, 1, 1 ")
    assert float(slider.evaluate("e => e.value")) == 1.0
    assert_shown(img_pixels(page, "#fusion-scaled"), original)
    assert not errors, errors


def settled_text(page, selector: str, needle: str, quiet_ms: int = 1500, timeout_ms: int = 30_000) -> str:
    """The element's text once it holds `needle` and then stays the same for quiet_ms."""
    wait_text(page, selector, needle, timeout_ms)
    while True:
        before = page.locator(selector).inner_text()
        page.wait_for_timeout(quiet_ms)
        after = page.locator(selector).inner_text()
        if after == before:
            return after


def test_a_slider_dragged_through_ten_positions_ends_on_the_last(browser_page):
    page, server, errors = browser_page
    page.get_by_role("tab", name="Fusion scaling").click()
    slider = page.locator("#fusion-scale-3 input[type=range]")
    values = [round(0.9 - 0.35 * i, 2) for i in range(10)]          # 0.9 .. -2.25, without waiting
    for v in values:
        slider.fill(f"{v:g}")
    last = values[-1]
    text = settled_text(page, "#fusion-info", f"factors 1, 1, {last:g}, 1 ")
    assert f"factors 1, 1, {last:g}, 1 " in text
    ref = server.lab.fusion_view(browser_session(server), session_state(server), (1, 1, last, 1), "turbo")
    assert_shown(img_pixels(page, "#fusion-scaled"), ref.scaled.colored)
    page.locator("#fusion-reset").click()
    wait_text(page, "#fusion-info", "factors 1, 1, 1, 1 ")
    assert not errors, errors


def test_the_first_picture_after_a_fusion_slider_move_is_that_positions(browser_page):
    """The quick path answers a slider move with the depth of the slider's new value (not the
    value before it), and Gradio's output that follows shows the same."""
    page, server, errors = browser_page
    page.get_by_role("tab", name="Fusion scaling").click()
    wait_text(page, "#fusion-info", "factors 1, 1, 1, 1 ")
    slider = page.locator("#fusion-scale-2 input[type=range]")
    for value in (0.4, -0.8):
        page.wait_for_timeout(500)                            # the previous move's pictures are all in
        old = src_of(page, "#fusion-scaled")
        slider.fill(f"{value:g}")
        wait_src_change(page, "#fusion-scaled", old)          # the first new picture, from either path
        shown = img_pixels(page, "#fusion-scaled")
        ref = server.lab.fusion_view(browser_session(server), session_state(server), (1, value, 1, 1), "turbo")
        assert_shown(shown, ref.scaled.colored)
        wait_text(page, "#fusion-info", f"factors 1, {value:g}, 1, 1 ")
        assert_shown(img_pixels(page, "#fusion-scaled"), ref.scaled.colored)
    page.locator("#fusion-reset").click()
    wait_text(page, "#fusion-info", "factors 1, 1, 1, 1 ")
    assert not errors, errors


def test_a_burst_of_clicks_ends_on_the_last_clicks_tiles(browser_page):
    from dpt_lab import attention

    page, server, errors = browser_page
    lab = server.lab
    page.get_by_role("tab", name="Attention").click()
    wait_text(page, "#attention-info", "patch row")
    box = settled_box(page, "#attention-image")      # mounted afresh: click once it is decoded and still
    (entry,) = lab.store.entries(browser_session(server))
    grid = entry.probe.grid(11)
    points = [(0.1 + 0.1 * i, 0.85 - 0.09 * i) for i in range(8)]     # fractions of the shown image
    for fx, fy in points:
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
    fx, fy = points[-1]
    px, py = fx * 451 - 0.5, fy * 300 - 0.5                           # the last click, in image pixels
    row, col = attention.patch_at_pixel(entry.meta, grid, px, py)
    try:
        text = settled_text(page, "#attention-info", f"patch row {row}, col {col}")
    except Exception as exc:  # noqa: BLE001 - say what the page shows instead
        raise AssertionError(f"wanted patch row {row}, col {col}; the page shows "
                             f"{page.locator('#attention-info').inner_text()!r}, last click noted "
                             f"{page.evaluate('window.dptLabClick')!r}, clicks {points}, box {box}") from exc
    assert f"patch row {row}, col {col}" in text
    ref = lab.attention_at(browser_session(server), session_state(server), px, py, 12, "row", False, False,
                           "inferno", 0.0, False)
    assert_shown(img_pixels(page, "#attention-tiles"), ref.tiles)
    assert not errors, errors


def test_a_click_is_shown_by_the_quick_path_and_then_set_by_its_gradio_event(browser_page):
    """The page's script asks the quick route (dpt_lab/ui/quick.py) as it starts the click's
    Gradio event: the tiles first appear as the route's data URL, then Gradio's own output
    (a file URL) replaces them with the same picture and the info text follows."""
    from dpt_lab import attention

    page, server, errors = browser_page
    lab = server.lab
    page.get_by_role("tab", name="Attention").click()
    wait_text(page, "#attention-info", "patch row")
    assert page.locator("#dpt-session textarea, #dpt-session input").first.input_value() == browser_session(server)
    img = page.locator("#attention-image img")
    page.wait_for_function(IMG_READY, arg="#attention-image img")
    (entry,) = lab.store.entries(browser_session(server))
    grid = entry.probe.grid(11)
    page.evaluate("""() => { window.__tileSrcs = []; let last = null;
        const record = () => { const e = document.querySelector('#attention-tiles img');
            if (e && e.src !== last) { last = e.src; window.__tileSrcs.push(e.src.slice(0, 5)); } };
        new MutationObserver(record).observe(document.querySelector('#attention-tiles'),
            {subtree: true, childList: true, attributes: true, attributeFilter: ['src']}); }""")
    quick_seen = False
    for fx, fy in ((0.3, 0.4), (0.7, 0.6), (0.5, 0.2)):          # a loaded machine may answer Gradio first
        box = img.bounding_box()
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        px, py = fx * 451 - 0.5, fy * 300 - 0.5
        row, col = attention.patch_at_pixel(entry.meta, grid, px, py)
        settled_text(page, "#attention-info", f"patch row {row}, col {col}")
        srcs = page.evaluate("window.__tileSrcs.splice(0)")
        quick_seen = quick_seen or "data:" in srcs
        assert srcs and srcs[-1] != "data:", srcs                 # Gradio's output came last
        ref = lab.attention_at(browser_session(server), session_state(server), px, py, 12, "row", False, False,
                               "inferno", 0.0, False)
        assert_shown(img_pixels(page, "#attention-tiles"), ref.tiles)
        if quick_seen:
            break
    assert quick_seen, "the quick path never showed the tiles first"
    assert not errors, errors


def settled_box(page, selector: str) -> dict:
    """The bounding box of a freshly mounted tab's decoded image, once it stops moving."""
    page.wait_for_function(IMG_READY, arg=f"{selector} img")
    img = page.locator(f"{selector} img")
    box = None
    while box != (box := img.bounding_box()):
        page.wait_for_timeout(100)
    return box


def test_features_tab_pca_then_similarity_by_click_and_by_hover(browser_page):
    from dpt_lab import attention

    page, server, errors = browser_page
    lab = server.lab
    page.get_by_role("tab", name="Features").click()
    wait_text(page, "#features-info", "PCA colours fitted on this block")
    session, state = browser_session(server), session_state(server)
    ref = lab.features_view(session, dict(state), 12, "pca", alpha=0.35)
    assert_shown(img_pixels(page, "#features-image"), ref.image)
    shot(page, "features_pca")
    (entry,) = lab.store.entries(session)
    grid = entry.probe.grid(11)
    box = settled_box(page, "#features-image")

    def patch(fx, fy):
        return attention.patch_at_pixel(entry.meta, grid, fx * 451 - 0.5, fy * 300 - 0.5)

    page.mouse.click(box["x"] + 0.3 * box["width"], box["y"] + 0.4 * box["height"])    # a click: similarity
    row, col = patch(0.3, 0.4)
    wait_text(page, "#features-info", f"cosine similarity to patch row {row}, col {col}")
    assert page.locator("#features-mode input[value=similarity]").is_checked()
    page.locator("#features-hover input").check()
    points = [(0.15 + 0.17 * i, 0.8 - 0.14 * i) for i in range(5)]    # the pointer moves, no clicks
    for fx, fy in points:
        page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
    fx, fy = points[-1]
    row, col = patch(fx, fy)
    text = settled_text(page, "#features-info", f"cosine similarity to patch row {row}, col {col}")
    assert f"patch row {row}, col {col}" in text
    ref = lab.features_view(session, dict(state), 12, "similarity", fx * 451 - 0.5, fy * 300 - 0.5, alpha=0.35)
    assert_shown(img_pixels(page, "#features-image"), ref.image)
    page.mouse.move(0, 0)
    page.locator("#features-hover input").uncheck()
    shot(page, "features_similarity")
    assert not errors, errors


def test_rollout_tab_draws_the_map_and_the_distance_of_every_head(browser_page):
    from dpt_lab import attention

    page, server, errors = browser_page
    lab = server.lab
    page.get_by_role("tab", name="Rollout · distance").click()
    wait_text(page, "#rollout-info", "rollout of patch row")
    page.wait_for_selector("#distance-plot .js-plotly-plot")
    page.wait_for_function("() => document.querySelectorAll('#distance-plot .scatterlayer .point').length >= 72")
    session, state = browser_session(server), session_state(server)
    (entry,) = lab.store.entries(session)
    box = settled_box(page, "#rollout-image")
    page.mouse.click(box["x"] + 0.7 * box["width"], box["y"] + 0.25 * box["height"])
    row, col = attention.patch_at_pixel(entry.meta, entry.probe.grid(11), 0.7 * 451 - 0.5, 0.25 * 300 - 0.5)
    wait_text(page, "#rollout-info", f"rollout of patch row {row}, col {col} over layers 1..12")
    ref = lab.rollout_at(session, dict(state), 0.7 * 451 - 0.5, 0.25 * 300 - 0.5, 12, "mean", 0.0)
    assert_shown(img_pixels(page, "#rollout-image"), ref.image)
    shot(page, "rollout", full_page=True)
    assert not errors, errors


def test_ablation_tab_clicks_patches_and_shows_the_difference_map(browser_page):
    from dpt_lab import attention

    page, server, errors = browser_page
    lab = server.lab
    page.get_by_role("tab", name="Ablation").click()
    session, state = browser_session(server), session_state(server)
    (entry,) = lab.store.entries(session)
    box = settled_box(page, "#ablation-image")
    # Gradio 6 sometimes leaves a Textbox's output out of its textarea when it arrives within
    # ~1 s of the tab's first mount (its value is set, the next event gets it, the page shows
    # the old text): 2 runs in 16 here; none in 20 with this pause
    page.wait_for_timeout(1000)
    grid = entry.probe.grid(6)
    wanted = []
    for fx, fy in ((0.2, 0.3), (0.7, 0.6)):
        before = page.locator("#ablation-patches textarea, #ablation-patches input").first.input_value()
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        wanted.append(attention.patch_at_pixel(entry.meta, grid, fx * 451 - 0.5, fy * 300 - 0.5))
        page.wait_for_function("([s, old]) => document.querySelector(s).value !== old",
                               arg=["#ablation-patches textarea, #ablation-patches input", before])
    text = "; ".join(f"{r},{c}" for r, c in wanted)
    assert page.locator("#ablation-patches textarea, #ablation-patches input").first.input_value() == text
    assert page.locator("#ablation-source input[value=patches]").is_checked()
    page.locator("#ablation-run").click()
    wait_text(page, "#ablation-info", "2 patches replaced (neighbours) from block 7/12")
    page.wait_for_selector("#ablation-share .js-plotly-plot")
    ref = lab.ablation_view(session, dict(state), 7, "patches", text, "neighbours")
    assert_shown(img_pixels(page, "#ablation-difference"), ref.difference)
    shot(page, "ablation", full_page=True)
    assert not errors, errors


def test_video_tab_plays_the_depth_video(browser_page, tmp_path):
    from clips import make_clip

    page, server, errors = browser_page
    page.get_by_role("tab", name="Video", exact=True).click()
    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    page.set_input_files("#video-input input[type=file]", str(clip))
    page.wait_for_selector("#video-input video")
    page.locator("#video-run").click()
    wait_text(page, "#video-info", "24 frames at 12 fps")
    page.wait_for_selector("#video-output video")
    duration = page.evaluate("""async () => {
        const v = document.querySelector('#video-output video');
        if (!(v.readyState >= 1)) await new Promise(r => v.addEventListener('loadedmetadata', r, {once: true}));
        return v.duration; }""")
    assert duration == pytest.approx(2.0, abs=0.2)              # the browser plays the H.264 MP4 it got
    assert "no audio" in page.locator("#video-info").inner_text()
    shot(page, "video")
    assert not errors, errors


def test_webcam_streams_depth(browser_page):
    """Chromium's fake camera (--use-fake-device-for-media-stream) through the webcam component:
    depth frames come back while it streams."""
    page, server, errors = browser_page
    page.get_by_role("tab", name="Video", exact=True).click()
    page.get_by_text("Webcam: depth live").click()
    cam = page.locator("#webcam-input")
    cam.wait_for()
    cam.get_by_text("Click to Access Webcam").click()              # the browser's camera: Chromium's fake one
    cam.get_by_role("button", name="capture photo").click()          # "Record": the stream starts
    page.wait_for_function("() => { const e = document.querySelector('#webcam-depth img'); "
                           "return e && e.naturalWidth > 0; }", timeout=60_000)
    text = wait_text(page, "#webcam-info", "frames/s shown", timeout_ms=60_000)
    assert "at base size 252" in text
    shot(page, "webcam")
    stop = cam.get_by_role("button", name=re.compile("stop", re.I))
    if stop.count():
        stop.first.click()
    assert not errors, errors


def test_mask_range_changes_the_preview_and_the_cutout_has_the_image_size(browser_page, tmp_path):
    from dpt_lab import mask as mask_mod
    from dpt_lab import scene

    page, server, errors = browser_page
    page.get_by_role("tab", name="Mask by depth").click()
    wait_text(page, "#mask-info", "kept ")
    assert "normalised inverse depth" in page.locator("#mask-units").inner_text()
    before_src = src_of(page, "#mask-preview")
    before = img_pixels(page, "#mask-preview")
    page.locator("#mask-low input[type=range]").fill("0.6")
    wait_text(page, "#mask-info", "0.6..1")
    src = wait_src_change(page, "#mask-preview", before_src)
    after = img_pixels(page, "#mask-preview")
    assert src != before_src and after.shape == before.shape == (300, 451, 3)
    depth = server.lab.entry(browser_session(server), session_state(server)).depth_image
    keep = scene.depth_mask(depth, 0.6, 1.0)
    checker = mask_mod.preview(np.asarray(Image.open(ASSET).convert("RGB")), keep)
    assert_shown(after, checker)                          # the image where kept, the checkerboard elsewhere
    page.locator("#mask-run").click()
    path = download(page, "#mask-cutout", tmp_path)
    with Image.open(path) as im:
        assert im.mode == "RGBA" and im.size == (451, 300)
        np.testing.assert_array_equal(np.asarray(im)[..., 3] == 255, keep)
    shot(page, "mask")
    assert not errors, errors


def test_3d_tab_draws_the_scene_and_downloads_a_glb(browser_page, tmp_path):
    page, server, errors = browser_page
    page.get_by_role("tab", name="3D").click()
    wait_text(page, "#scene-info", "vertices")               # the tab builds its scene when opened
    assert "depends on these two numbers" in page.locator("#scene-units").inner_text()
    canvas = page.locator("#scene-model canvas")
    canvas.wait_for()
    # what the page shows over the canvas (a WebGL canvas's own buffer reads back blank), inside
    # the label and the buttons that sit on top of it
    background = np.array([0.1, 0.1, 0.12]) * 255
    drawn = cleared = 0.0
    for _ in range(120):                                    # software WebGL: the mesh comes in seconds
        box = canvas.bounding_box()
        shown = png(page.screenshot(clip=box))[..., :3].astype(float)
        h, w = shown.shape[:2]
        inner = shown[int(0.15 * h):int(0.95 * h), int(0.05 * w):int(0.95 * w)]
        cleared = (np.abs(inner - background).max(axis=-1) <= 30).mean()     # WebGL is drawing
        drawn = ((np.abs(inner - background).max(axis=-1) > 30) & (inner.min(axis=-1) < 230)).mean()
        if cleared > 0.5 and drawn > 0.01:                  # the scene, not the blank page before it
            OUT.mkdir(parents=True, exist_ok=True)
            Image.fromarray(shown.astype(np.uint8)).save(OUT / "scene3d_canvas.png")
            break
        page.wait_for_timeout(250)
    assert cleared > 0.5 and drawn > 0.01, f"the 3D canvas: {cleared:.0%} background, {drawn:.1%} scene"
    path = download(page, "#scene-glb", tmp_path)
    assert path.suffix == ".glb" and path.read_bytes()[:4] == b"glTF"
    before = page.locator("#scene-info").inner_text()
    drop = page.locator("#scene-drop input")
    drop.fill("4")                                         # no points beyond 4 (between near 1 and far 10)
    drop.press("Tab")
    page.locator("#scene-run").click()
    count = r"([\d,]+) vertices"
    n_before = int(re.search(count, before).group(1).replace(",", ""))
    after = page.wait_for_function(
        """(old) => { const t = document.querySelector('#scene-info').innerText;
                      const m = t.match(/([\\d,]+) vertices/);
                      return !t.includes('processing') && m && m[1] !== old ? t : null; }""",
        arg=re.search(count, before).group(1)).json_value()
    n_after = int(re.search(count, after).group(1).replace(",", ""))
    assert 0 < n_after < n_before
    shot(page, "scene3d")
    assert not errors, errors


def test_export_download_runs_in_onnxruntime(browser_page, tmp_path):
    import onnxruntime as ort
    import torch

    page, server, errors = browser_page
    page.get_by_role("tab", name="Export ONNX").click()
    page.locator("#export-run").click()
    link = page.locator("#export-file a")
    link.wait_for(timeout=300_000)
    assert page.locator("#export-report textarea").input_value().strip()      # the verification report
    with page.expect_download() as info:
        link.first.click()
    download = info.value
    assert download.suggested_filename.endswith(".onnx")
    path = tmp_path / download.suggested_filename
    download.save_as(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 14 * 9, 14 * 11)).astype(np.float32)
    (depth,) = sess.run(None, {sess.get_inputs()[0].name: x})
    assert depth.shape == (1, 14 * 9, 14 * 11)
    with torch.inference_mode():
        want = server.manager.get(server.model)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(depth, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
    shot(page, "export")
    assert not errors, errors


# Last in the module: it leaves the session with a second encode.
def test_a_tab_opened_after_a_new_encode_is_drawn_by_the_quick_path_first(browser_page, tmp_path):
    """Opening a tab asks the quick route (base.PICK_JS: at the pointer on the tab button, and
    at the tab's select event if that one has not answered yet):
    after a new encode, the Attention tab's tiles first appear as the route's data URL, then
    the tab's Gradio refresh sets its own file with the same picture: the new encode's tiles
    at the last click, drawn with the tab's controls."""
    from dpt_lab.ui import quick

    page, server, errors = browser_page
    lab = server.lab
    sess = browser_session(server)
    page.get_by_role("tab", name="Attention").click()
    wait_text(page, "#attention-info", "patch row")
    with Image.open(ASSET) as im:
        flipped = np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, ::-1])
    quick_seen = False
    for attempt in range(2):                   # a loaded machine may answer Gradio first
        picture = tmp_path / f"flipped{attempt}.png"
        variant = flipped.copy()
        variant[0, attempt] ^= 0xFF                                # a new picture: a new encode
        Image.fromarray(variant).save(picture)
        page.get_by_role("tab", name="Depth", exact=True).click()
        old = src_of(page, "#depth-output", 0)
        page.set_input_files("#depth-input input[type=file]", str(picture))
        wait_src_change(page, "#depth-output", old)
        settled_text(page, "#depth-info", "451x300 image")
        page.evaluate("""() => { window.__tileSrcs = [];          // the previous encode's tiles are not news
            const first = document.querySelector('#attention-tiles img'); let last = first ? first.src : null;
            const record = () => { const e = document.querySelector('#attention-tiles img');
                if (e && e.src !== last) { last = e.src; window.__tileSrcs.push(e.src.slice(0, 5)); } };
            new MutationObserver(record).observe(document.body,
                {subtree: true, childList: true, attributes: true, attributeFilter: ['src']}); }""")
        page.get_by_role("tab", name="Attention").click()
        page.wait_for_function("() => window.__tileSrcs.length > 0")
        settled_text(page, "#attention-info", "patch row")
        page.wait_for_timeout(1000)
        srcs = page.evaluate("window.__tileSrcs.splice(0)")
        assert srcs[-1] != "data:", srcs                             # Gradio's refresh came last
        quick_seen = srcs[0] == "data:"
        digest = lab.store.entries(sess)[-1].key[1]
        st = dict(quick.session_state(server.demo, server.demo.dpt_state, sess))
        assert st["hash"] == digest                                 # the page shows the newest encode
        c = quick.controls(st, "attention")
        want = lab.attention_at(sess, st, None, None, **c)          # the last click, on the new encode
        assert_shown(img_pixels(page, "#attention-tiles"), want.tiles)
        if quick_seen:
            break
    assert quick_seen, "the tab's opening never showed the quick path's tiles first"
    assert not errors, errors
