"""Attention tab: click a patch, see its row (where it looks) or column (who looks at it)
for every head of a layer, from the session's recorded encode. API: /attention (a click
by pixel coordinates of the original image)."""

from __future__ import annotations

import gradio as gr

from .. import session as S
from . import quick
from .base import (
    MODEL_EVENT,
    Context,
    Tab,
    has_image,
    mark_rendered,
    page_image,
    pick_field,
    picked_pixel,
    sid,
    skips,
    user_error,
    user_errors,
)

ID, TITLE = "attention", "Attention"

# Clicks (and, with "follow the pointer", moves) reach the server through a hidden textbox
# written by the page's script: see base.PICK_JS and PICKERS.
PICKER = ("attention-image", "attention-clicked", "attention-hover", ID)     # ID: clicks ask the quick path


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
            gr.Checkbox(False, label="follow the pointer (hover)", elem_id=PICKER[2])
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
        if page:
            quick.remember(st, ID, layer=layer_v, mode=mode_v, log_contrast=log_v, shared_scale=shared_v,
                           cmap=cmap_v, alpha=alpha_v, cls=cls_v)
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
        picked = picked_pixel(lab, st, clicked_v)
        if picked is None:
            return skips(len(outputs))
        x, y = picked
        return render(st, x, y, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, False, request)

    @user_errors
    def do_controls(layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v, st, request: gr.Request):
        if not has_image(st):
            return skips(len(outputs))
        return render(st, None, None, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v, request)

    controls = [layer, mode, log_c, shared, acmap, alpha]
    attn_btn.click(do_attention, [ax, ay, *controls, cls_cb, ctx.state], outputs, api_name="attention",
                   preprocess=False, **MODEL_EVENT)
    # A burst of clicks (or moves) must end on the last one's tiles: .change of the hidden value
    # runs always_last (a deferred run reads the components afresh: the latest position).
    clicked = pick_field(PICKER)
    clicked.change(do_click, [clicked, *controls, ctx.state], outputs, api_visibility="private",
                   trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)
    gr.on([layer.change, mode.change, log_c.change, shared.change, acmap.change, alpha.release, cls_cb.change],
          do_controls, [*controls, cls_cb, ctx.state], outputs, api_visibility="private",
          trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)

    def fit(info, layer_value, _cls):
        n = int(info.num_blocks)
        return (gr.update(maximum=n, value=min(int(layer_value or n), n)),
                gr.update(visible=True) if info.has_cls else gr.update(visible=False, value=False))

    def quick_view(session, st, query):
        """The tiles and the marked image of a click (query x, y: display pixels), or at the
        tab's opening of the last click when the tab has not shown this encode yet."""
        got = quick.picked(lab, st, ID, query)
        if got is None:
            return None
        c, x, y = got
        r = lab.attention_at(session, st, x, y, **(c if x is None else dict(c, cls=False)))
        return {"attention-tiles": r.tiles, PICKER[0]: r.marked}

    return Tab(refresh=do_controls, inputs=[*controls, cls_cb], outputs=outputs, fit=fit, fit_outputs=[layer, cls_cb],
               quick=quick_view)
