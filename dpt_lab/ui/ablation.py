"""Ablation tab: replace the high-norm tokens (or patches you click) from a block on, re-run the
rest of the encoder and the decoder, and see what it does to the depth and to the attention
those tokens get. API: /ablation."""

from __future__ import annotations

import gradio as gr

from .. import session as S
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

ID, TITLE = "ablation", "Ablation"
PICKER = ("ablation-image", "ablation-clicked", None)
SOURCES = [("high-norm outliers (the norms tab's threshold)", "outliers"), ("patches I click", "patches")]
MODES = [("mean of the 8 neighbours", "neighbours"), ("mean patch token", "mean"), ("zero", "zero")]


def build(ctx: Context) -> Tab:
    lab = ctx.lab
    gr.Markdown("ViTs without registers grow a few high-norm tokens (arXiv 2309.16588). Replace them from a "
                "block on, re-run only the blocks from there and the decoder, and compare the depth. Click the "
                "image to choose patches yourself.")
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(label="Chosen patches (click to add or remove)", format="png", interactive=False,
                             buttons=[], elem_id=PICKER[0])
            source = gr.Radio(SOURCES, value="outliers", label="Tokens", elem_id="ablation-source")
            patches = gr.Textbox("", label="Patches (row,col; ...) on the block's grid", elem_id="ablation-patches")
            threshold = gr.Textbox("auto", label="Outlier threshold ('auto' or a norm)")
            block = gr.Slider(1, 12, value=7, step=1, label="Replaced from block", elem_id="ablation-block")
            mode = gr.Radio(MODES, value="neighbours", label="Replaced by", elem_id="ablation-mode")
            cmap = gr.Dropdown(list(S.COLORMAPS), value="turbo", label="Colormap")
            run_btn = gr.Button("Run the ablation", variant="primary", elem_id="ablation-run")
        with gr.Column(scale=2):
            difference = gr.Image(label="Difference (ablated − original)", format="png", interactive=False,
                                  elem_id="ablation-difference")
            with gr.Row():
                ablated = gr.Image(label="Ablated depth", format="png", interactive=False, elem_id="ablation-depth")
                original = gr.Image(label="Original depth", format="png", interactive=False)
            share = gr.Plot(label="Attention on the chosen patches", elem_id="ablation-share")
            info = gr.Markdown(elem_id="ablation-info")
    outputs = [difference, ablated, original, share, info, image, ctx.state]

    def render(st, block_v, source_v, patches_v, mode_v, threshold_v, cmap_v, request, page=True):
        r = lab.ablation_view(sid(request), st, block_v, source_v, patches_v, mode_v, threshold_v, cmap_v)
        show = page_image if page else (lambda a: a)
        return (show(r.difference), show(r.ablated.colored), show(r.original.colored), r.figure, r.text,
                show(r.marked), st)

    @user_errors
    def do_ablation(block_v, source_v, patches_v, mode_v, threshold_v, colormap, st, request: gr.Request):
        """block 1..L (replaced from there on); source outliers | patches; patches 'R,C; R,C' on the
        block's grid (source patches); mode neighbours | mean | zero; threshold: the outliers'."""
        return render(st, block_v, source_v, patches_v, mode_v, threshold_v, colormap, request, page=False)

    @user_errors
    def show_ablation(block_v, source_v, patches_v, mode_v, threshold_v, cmap_v, st, request: gr.Request):
        return render(st, block_v, source_v, patches_v, mode_v, threshold_v, cmap_v, request)

    @user_errors
    def do_click(clicked_v, block_v, patches_v, st, request: gr.Request):
        picked = picked_pixel(lab, st, clicked_v)
        if picked is None:
            return skips(3)
        chosen = lab.toggle_patch(sid(request), st, *picked, block=block_v, patches=patches_v)
        return chosen, "patches", page_image(lab.ablation_marked(sid(request), st, block_v, chosen))

    @user_errors
    def show_chosen(block_v, source_v, patches_v, threshold_v, st, request: gr.Request):
        """The chosen patches on the image (no re-run): the tab's refresh, and the token controls."""
        if not has_image(st):
            return skips(2)
        b, chosen = lab.ablation_patches(sid(request), st, block_v, source_v, patches_v, threshold_v)
        mark_rendered(st, ID, lab)
        return page_image(lab.ablation_marked(sid(request), st, b, chosen)), st

    run_btn.click(do_ablation, [block, source, patches, mode, threshold, cmap, ctx.state], outputs,
                  api_name="ablation", preprocess=False, **MODEL_EVENT)
    gr.on([block.release, source.input, patches.submit, threshold.submit], show_chosen,
          [block, source, patches, threshold, ctx.state], [image, ctx.state], api_visibility="private",
          trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)
    clicked = pick_field(PICKER)
    clicked.change(do_click, [clicked, block, patches, ctx.state], [patches, source, image],
                   api_visibility="private", trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)

    def refresh(block_v, source_v, patches_v, threshold_v, st, request: gr.Request):
        return show_chosen(block_v, source_v, patches_v, threshold_v, st, request)

    def fit(info_, block_value):
        n = int(info_.num_blocks)
        return (gr.update(maximum=n, value=min(int(block_value or (n // 2 + 1)), n)),)

    return Tab(refresh=refresh, inputs=[block, source, patches, threshold], outputs=[image, ctx.state], fit=fit,
               fit_outputs=[block])
