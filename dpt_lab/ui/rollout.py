"""Rollout and distance tab: attention rollout from a clicked patch (or CLS) up to a layer, and
the mean attention distance of every head and layer, from the session's recorded encode.
API: /rollout, /attention_distance."""

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
    user_errors,
)

ID, TITLE = "rollout", "Rollout · distance"
PICKER = ("rollout-image", "rollout-clicked", "rollout-hover", ID)     # ID: clicks ask the quick path
FUSIONS = ("mean", "max", "min")


def build(ctx: Context) -> Tab:
    lab = ctx.lab
    gr.Markdown("**Rollout** (Abnar & Zuidema 2020): how much each patch of the image flows into the clicked "
                "patch up to a layer: every layer's attention with its heads fused, the residual added, rows "
                "renormalised, multiplied from the first layer (SwinV2: from its stage's first block). "
                "**Mean attention distance** (ViT paper, fig. 7): how far each head looks, in input pixels.")
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(label="Click a patch", format="png", interactive=False, buttons=[], elem_id=PICKER[0])
            info = gr.Markdown(elem_id="rollout-info")
        with gr.Column(scale=1):
            layer = gr.Slider(1, 12, value=12, step=1, label="Up to layer", elem_id="rollout-layer")
            fusion = gr.Radio(list(FUSIONS), value="mean", label="Heads fused by", elem_id="rollout-fusion")
            discard = gr.Slider(0, 0.95, value=0.0, step=0.05, label="Discard the lowest share of attention")
            with gr.Row():
                cls_cb = gr.Checkbox(False, label="CLS token")
                gr.Checkbox(False, label="follow the pointer (hover)", elem_id=PICKER[2])
            alpha = gr.Slider(0, 1, value=0.35, step=0.05, label="Image under the map (alpha)")
            cmap = gr.Dropdown(list(S.COLORMAPS), value="inferno", label="Colormap")
            with gr.Accordion("Exact position (pixels of the original image)", open=False):
                with gr.Row():
                    rx = gr.Number(label="x", precision=2)
                    ry = gr.Number(label="y", precision=2)
                show_btn = gr.Button("Show")
    distance_plot = gr.Plot(label="Mean attention distance per head", elem_id="distance-plot")
    distance_md = gr.Markdown(elem_id="distance-info")
    distance_btn = gr.Button(visible=False)      # /attention_distance for scripts
    outputs = [image, info, rx, ry, distance_plot, distance_md, ctx.state]

    def render(st, x, y, layer_v, fusion_v, discard_v, cls_v, alpha_v, cmap_v, request, page=True):
        session = sid(request)
        r = lab.rollout_at(session, st, x, y, layer_v, fusion_v, discard_v, cls_v, alpha_v, cmap_v)
        figure, _, text = lab.attention_distance(session, st)
        mark_rendered(st, ID, lab)
        if page:
            quick.remember(st, ID, layer=layer_v, head_fusion=fusion_v, discard_ratio=discard_v, cls=cls_v,
                           alpha=alpha_v, cmap=cmap_v)
        click = st.get("rollout_click")
        cx, cy = click if isinstance(click, tuple) else (None, None)
        return (page_image(r.image) if page else r.image), r.text, cx, cy, figure, text, st

    @user_errors
    def do_rollout(x, y, layer_v, head_fusion, discard_ratio, cls_token, alpha_v, colormap, st, request: gr.Request):
        """x, y: pixel of the original image (empty: the last click, else the centre); layer 1..L;
        head_fusion mean | max | min; discard_ratio 0..0.95; cls_token: roll out CLS instead."""
        return render(st, x, y, layer_v, head_fusion, discard_ratio, cls_token, alpha_v, colormap, request,
                      page=False)

    @user_errors
    def do_distance(st, request: gr.Request):
        """The mean attention distance of every head and layer: (Plotly figure, summary)."""
        figure, _, text = lab.attention_distance(sid(request), st)
        return figure, text

    @user_errors
    def do_click(clicked_v, layer_v, fusion_v, discard_v, alpha_v, cmap_v, st, request: gr.Request):
        picked = picked_pixel(lab, st, clicked_v)
        if picked is None:
            return skips(len(outputs))
        x, y = picked
        return render(st, x, y, layer_v, fusion_v, discard_v, False, alpha_v, cmap_v, request)

    @user_errors
    def do_controls(layer_v, fusion_v, discard_v, cls_v, alpha_v, cmap_v, st, request: gr.Request):
        if not has_image(st):
            return skips(len(outputs))
        return render(st, None, None, layer_v, fusion_v, discard_v, cls_v, alpha_v, cmap_v, request)

    show_btn.click(do_rollout, [rx, ry, layer, fusion, discard, cls_cb, alpha, cmap, ctx.state], outputs,
                   api_name="rollout", preprocess=False, **MODEL_EVENT)
    distance_btn.click(do_distance, [ctx.state], [distance_plot, distance_md], api_name="attention_distance",
                       preprocess=False, **MODEL_EVENT)
    clicked = pick_field(PICKER)
    clicked.change(do_click, [clicked, layer, fusion, discard, alpha, cmap, ctx.state], outputs,
                   api_visibility="private", trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)
    controls = [layer, fusion, discard, cls_cb, alpha, cmap]
    gr.on([layer.release, fusion.input, discard.release, cls_cb.input, alpha.release, cmap.input], do_controls,
          [*controls, ctx.state], outputs, api_visibility="private", trigger_mode="always_last",
          show_progress="hidden", **MODEL_EVENT)

    def fit(info_, layer_value, _cls):
        n = int(info_.num_blocks)
        return (gr.update(maximum=n, value=min(int(layer_value or n), n)),
                gr.update(visible=True) if info_.has_cls else gr.update(visible=False, value=False))

    def prepare(session, st, layer_v, fusion_v, discard_v, cls_v, alpha_v, cmap_v):
        """While another tab is shown: the distances and this setting's rollout matrices."""
        lab.attention_distance(session, st)
        lab.rollout_at(session, dict(st), None, None, layer_v, fusion_v, discard_v, cls_v, alpha_v, cmap_v)

    def quick_view(session, st, query):
        """The rollout map of a click or hover (query x, y: display pixels), or at the tab's
        opening of the last pick when the tab has not shown this encode yet."""
        got = quick.picked(lab, st, ID, query)
        if got is None:
            return None
        c, x, y = got
        return {PICKER[0]: lab.rollout_at(session, st, x, y, **(c if x is None else dict(c, cls=False))).image}

    return Tab(refresh=do_controls, inputs=controls, outputs=outputs, fit=fit, fit_outputs=[layer, cls_cb],
               prepare=prepare, quick=quick_view)
