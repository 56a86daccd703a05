"""Attention tab: click a patch, see its row (where it looks) or column (who looks at it)
for every head of a layer, from the session's recorded encode. API: /attention (a click
by pixel coordinates of the original image)."""

from __future__ import annotations

import gradio as gr

from .. import session as S
from .base import MODEL_EVENT, Context, Tab, has_image, mark_rendered, page_image, sid, skips, user_error, user_errors

ID, TITLE = "attention", "Attention"

# Run by the page on load (app.py passes it to launch). A click on the image is taken at
# pointerdown, in the capture phase: the pixel of the served image under the pointer, computed
# as Gradio's image computes a select event's index (object-fit contain, never scaled above 1,
# rounded), written into the hidden #attention-clicked textbox with a count (so that a second
# click on the same pixel is still a change). Gradio's own select event is not used: it fires
# on "click", which the browser drops when the <img> is swapped for the next marked one
# between the press and the release (a burst of clicks lost its last one that way), and a
# deferred select re-runs with its first event's data.
PAGE_JS = """
document.addEventListener("pointerdown", (ev) => {
  if (ev.button !== 0) return;
  const box = ev.target instanceof Element ? ev.target.closest("#attention-image") : null;
  const img = box ? box.querySelector("img") : null;
  const field = document.querySelector("#attention-clicked textarea, #attention-clicked input");
  if (!img || !img.naturalWidth || !field) return;
  const r = img.getBoundingClientRect();
  const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight, 1);
  const ox = (r.width - img.naturalWidth * s) / 2, oy = (r.height - img.naturalHeight * s) / 2;
  const x = Math.round((ev.clientX - r.left - ox) / s), y = Math.round((ev.clientY - r.top - oy) / s);
  if (x < 0 || y < 0 || x >= img.naturalWidth || y >= img.naturalHeight) return;
  window.dptLabClicks = (window.dptLabClicks || 0) + 1;
  field.value = `${x},${y},${window.dptLabClicks}`;
  field.dispatchEvent(new Event("input", {bubbles: true}));
}, true);
"""


def build(ctx: Context) -> Tab:
    lab = ctx.lab
    gr.Markdown("Click a point of the image: the tiles show how that patch's token attends to every "
                "other token (row) or how every token attends to it (column), per head and their mean.")
    with gr.Row():
        with gr.Column(scale=1):
            attn_image = gr.Image(label="Click a patch", format="png", interactive=False,
                                  buttons=[], elem_id="attention-image")
            layer = gr.Slider(1, 12, value=12, step=1, label="Layer", elem_id="attention-layer")
            mode = gr.Radio([("row: where it looks", "row"), ("column: who looks at it", "column")],
                            value="row", label="Mode")
            with gr.Row():
                log_c = gr.Checkbox(False, label="log contrast")
                shared = gr.Checkbox(False, label="one scale for all heads")
                cls_cb = gr.Checkbox(False, label="CLS token")
            acmap = gr.Dropdown(list(S.COLORMAPS), value="inferno", label="Colormap")
            alpha = gr.Slider(0, 1, value=0.0, step=0.05, label="Image under the maps (alpha)")
            with gr.Accordion("Exact position (pixels of the original image)", open=False):
                with gr.Row():
                    ax = gr.Number(label="x", precision=2)
                    ay = gr.Number(label="y", precision=2)
                attn_btn = gr.Button("Show")
        with gr.Column(scale=2):
            tiles = gr.Image(label="Heads (and mean)", format="png", interactive=False,
                             elem_id="attention-tiles")
            attn_md = gr.Markdown(label="Attention info", elem_id="attention-info")
    outputs = [tiles, attn_image, attn_md, ax, ay, ctx.state]

    def render(st, x, y, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v, request, page=True):
        """page: JPEGs for the page (clicks, controls, the tab's refresh); the API keeps PNGs."""
        r = lab.attention_at(sid(request), st, x, y, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v)
        mark_rendered(st, ID, lab)
        click = st.get("click")
        cx, cy = click if isinstance(click, tuple) else (None, None)
        show = page_image if page else (lambda a: a)
        return show(r.tiles), show(r.marked), r.text, cx, cy, st

    @user_errors
    def do_attention(x, y, layer, mode, log_contrast, shared_scale, colormap, alpha, cls_token, st,
                     request: gr.Request):
        """x, y: pixel of the original image (column, row); layer 1..L; mode row | column."""
        if (x is None or y is None) and not cls_token:
            raise user_error("give the x and y of a pixel (or click the image)")
        return render(st, x, y, layer, mode, log_contrast, shared_scale, colormap, alpha, cls_token, request,
                      page=False)

    @user_errors
    def do_click(clicked_v, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, st, request: gr.Request):
        if not clicked_v:
            return skips(len(outputs))
        if not has_image(st):
            raise user_error("no image yet: run the Depth tab on an image first")
        dx, dy, _ = (float(v) for v in clicked_v.split(","))
        x, y = lab.display_to_image(st, dx, dy)
        return render(st, x, y, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, False, request)

    @user_errors
    def do_controls(layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v, st, request: gr.Request):
        if not has_image(st):
            return skips(len(outputs))
        return render(st, None, None, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v, request)

    controls = [layer, mode, log_c, shared, acmap, alpha]
    attn_btn.click(do_attention, [ax, ay, *controls, cls_cb, ctx.state], outputs, api_name="attention",
                   preprocess=False, **MODEL_EVENT)
    # A burst of clicks must end on the last click's tiles: the page script (PAGE_JS) writes each
    # click into this hidden value, and its .change renders, always_last (a deferred run reads
    # the components afresh, so it is the latest click). Hidden by CSS, not visible=False, so
    # that its field is in the page for the script.
    clicked = gr.Textbox("", show_label=False, container=False, elem_id="attention-clicked",
                         elem_classes=["dpt-offscreen"])
    clicked.change(do_click, [clicked, *controls, ctx.state], outputs, api_visibility="private",
                   trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)
    gr.on([layer.change, mode.change, log_c.change, shared.change, acmap.change, alpha.release, cls_cb.change],
          do_controls, [*controls, cls_cb, ctx.state], outputs, api_visibility="private",
          trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)

    def fit(info, layer_value, _cls):
        n = int(info.num_blocks)
        return (gr.update(maximum=n, value=min(int(layer_value or n), n)),
                gr.update(visible=True) if info.has_cls else gr.update(visible=False, value=False))

    return Tab(refresh=do_controls, inputs=[*controls, cls_cb], outputs=outputs, fit=fit, fit_outputs=[layer, cls_cb])
