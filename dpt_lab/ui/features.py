"""Features tab: a block's patch tokens as PCA colours, or the similarity of a clicked patch's
token to every other patch, from the session's recorded encode. API: /features."""

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

ID, TITLE = "features", "Features"
PICKER = ("features-image", "features-clicked", "features-hover", ID)     # ID: clicks ask the quick path


def build(ctx: Context) -> Tab:
    lab = ctx.lab
    gr.Markdown("**PCA colours**: the first three principal components of the block's patch tokens as red, "
                "green and blue. **Similarity**: click a patch to see the cosine similarity of its token with "
                "every patch of the block (the most similar outlined in red).")
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(label="Click a patch (similarity)", format="png", interactive=False, buttons=[],
                             elem_id=PICKER[0])
            info = gr.Markdown(elem_id="features-info")
        with gr.Column(scale=1):
            block = gr.Slider(1, 12, value=12, step=1, label="Block", elem_id="features-block")
            mode = gr.Radio([("PCA colours", "pca"), ("similarity to a clicked patch", "similarity")], value="pca",
                            label="Lens", elem_id="features-mode")
            with gr.Group():
                same_basis = gr.Checkbox(False, label="PCA: one basis for every block (fitted on the basis block)")
                basis = gr.Slider(1, 12, value=12, step=1, label="PCA basis block")
                foreground = gr.Checkbox(False, label="PCA: foreground only (first component > 0)")
            with gr.Group():
                top_k = gr.Slider(0, 20, value=5, step=1, label="Similarity: most similar patches outlined")
                gr.Checkbox(False, label="Similarity: follow the pointer (hover)", elem_id=PICKER[2])
            alpha = gr.Slider(0, 1, value=0.35, step=0.05, label="Image under the map (alpha)")
            cmap = gr.Dropdown(list(S.COLORMAPS), value="inferno", label="Colormap (similarity)")
            with gr.Accordion("Exact position (pixels of the original image)", open=False):
                with gr.Row():
                    fx = gr.Number(label="x", precision=2)
                    fy = gr.Number(label="y", precision=2)
                show_btn = gr.Button("Show")
    outputs = [image, info, mode, fx, fy, ctx.state]

    def render(st, x, y, block_v, mode_v, same_v, basis_v, fg_v, k_v, alpha_v, cmap_v, request, page=True):
        r = lab.features_view(sid(request), st, block_v, mode_v, x, y, basis_v if same_v else None, fg_v, k_v,
                              alpha_v, cmap_v)
        mark_rendered(st, ID, lab)
        if page:
            quick.remember(st, ID, block=block_v, mode=mode_v, basis_block=basis_v if same_v else None,
                           foreground=fg_v, top_k=k_v, alpha=alpha_v, cmap=cmap_v)
        click = st.get("feature_click")
        cx, cy = click if isinstance(click, tuple) else (None, None)
        return (page_image(r.image) if page else r.image), r.text, mode_v, cx, cy, st

    @user_errors
    def do_features(block_v, mode_v, x, y, same_basis_v, basis_block, foreground_v, top_k_v, alpha_v, colormap, st,
                    request: gr.Request):
        """block 1..L; mode pca | similarity; x, y: pixel of the original image (similarity; empty:
        the last click, else the centre); basis_block (with same_basis) fits the PCA on that block."""
        return render(st, x, y, block_v, mode_v, same_basis_v, basis_block, foreground_v, top_k_v, alpha_v, colormap,
                      request, page=False)

    @user_errors
    def do_click(clicked_v, block_v, same_v, basis_v, fg_v, k_v, alpha_v, cmap_v, st, request: gr.Request):
        picked = picked_pixel(lab, st, clicked_v)
        if picked is None:
            return skips(len(outputs))
        x, y = picked       # a click always asks for the similarity
        return render(st, x, y, block_v, "similarity", same_v, basis_v, fg_v, k_v, alpha_v, cmap_v, request)

    @user_errors
    def do_controls(block_v, mode_v, same_v, basis_v, fg_v, k_v, alpha_v, cmap_v, st, request: gr.Request):
        if not has_image(st):
            return skips(len(outputs))
        return render(st, None, None, block_v, mode_v, same_v, basis_v, fg_v, k_v, alpha_v, cmap_v, request)

    lens = [same_basis, basis, foreground, top_k, alpha, cmap]
    show_btn.click(do_features, [block, mode, fx, fy, *lens, ctx.state], outputs, api_name="features",
                   preprocess=False, **MODEL_EVENT)
    clicked = pick_field(PICKER)
    clicked.change(do_click, [clicked, block, *lens, ctx.state], outputs, api_visibility="private",
                   trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)
    # .input (the user's own changes): a click sets the mode to similarity without a second render
    gr.on([block.release, mode.input, same_basis.input, basis.release, foreground.input, top_k.release,
           alpha.release, cmap.input], do_controls, [block, mode, *lens, ctx.state], outputs,
          api_visibility="private", trigger_mode="always_last", show_progress="hidden", **MODEL_EVENT)

    def fit(info_, block_value, basis_value):
        n = int(info_.num_blocks)
        return (gr.update(maximum=n, value=min(int(block_value or n), n)),
                gr.update(maximum=n, value=min(int(basis_value or n), n)))

    def quick_view(session, st, query):
        """The similarity map of a click or hover (query x, y: display pixels), or at the tab's
        opening the last view's lens when the tab has not shown this encode yet."""
        got = quick.picked(lab, st, ID, query)
        if got is None:
            return None
        c, x, y = got
        lens = c if x is None else dict(c, mode="similarity")       # a click always asks for the similarity
        return {PICKER[0]: lab.features_view(session, st, x=x, y=y, **lens).image}

    return Tab(refresh=do_controls, inputs=[block, mode, *lens], outputs=outputs, fit=fit, fit_outputs=[block, basis],
               quick=quick_view)
