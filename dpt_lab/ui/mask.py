"""Mask tab: cut out the pixels in a depth range, after removing the plane of best fit
(often the floor), with histogram equalisation for the shown map. Every control works on
the session's cached depth (no re-encode). API: /mask (the cut-out and mask PNG files)."""

from __future__ import annotations

import gradio as gr

from .. import mask as mask_mod
from .. import session as S
from .base import MODEL_EVENT, Context, Tab, has_image, mark_rendered, out_dir, page_image, sid, skips, user_errors

ID, TITLE = "mask", "Mask by depth"


def build(ctx: Context) -> Tab:
    lab = ctx.lab
    gr.Markdown("Keep the pixels whose depth lies in a range: the rest shows the checkerboard. "
                "Plane removal first subtracts the plane of best fit (fitted robustly, so what stands "
                "on the floor does not tilt it); contrast equalises the shown map's histogram.")
    with gr.Row():
        with gr.Column(scale=1):
            low = gr.Slider(0, 1, value=0.3, step=0.01, label="low", elem_id="mask-low")
            high = gr.Slider(0, 1, value=1.0, step=0.01, label="high", elem_id="mask-high")
            units = gr.Markdown(mask_mod.range_label(False), elem_id="mask-units")
            with gr.Row():
                invert = gr.Checkbox(False, label="invert (keep what lies outside)", elem_id="mask-invert")
                contrast = gr.Checkbox(False, label="contrast (equalise the map)")
            strength = gr.Slider(0, 1, value=0.0, step=0.05, label="plane removal strength",
                                 elem_id="mask-plane")
            mcmap = gr.Dropdown(list(S.COLORMAPS), value="turbo", label="Colormap")
            files_btn = gr.Button("Cut out: make the files", variant="primary", elem_id="mask-run")
            cutout_file = gr.File(label="RGBA cut-out PNG (alpha = mask)", elem_id="mask-cutout")
            mask_file = gr.File(label="Mask PNG (255 = kept)", elem_id="mask-file")
            depth_files = gr.File(label="Plane-removed depth: 16-bit PNG, float32 .npy", file_count="multiple")
        with gr.Column(scale=2):
            shown = gr.Image(label="Kept (checkerboard = masked out)", format="png", interactive=False,
                             elem_id="mask-preview")
            with gr.Row():
                mask_img = gr.Image(label="Mask", format="png", interactive=False, elem_id="mask-image")
                flat_img = gr.Image(label="Depth after plane removal", format="png", interactive=False,
                                    elem_id="mask-depth")
            info = gr.Markdown(elem_id="mask-info")
    outputs = [shown, mask_img, flat_img, info, ctx.state]
    controls = [low, high, invert, strength, contrast, mcmap]

    @user_errors
    def show_mask(low_v, high_v, invert_v, strength_v, contrast_v, cmap_v, st, request: gr.Request):
        if not has_image(st):
            return skips(len(outputs))
        r = lab.mask_view(sid(request), st, low_v, high_v, invert_v, strength_v, contrast_v, cmap_v)
        mark_rendered(st, ID, lab)
        return page_image(r.preview), page_image(r.mask), page_image(r.flat_view), r.text, st

    def write(low_v, high_v, invert_v, strength_v, st, request):
        return lab.mask_files(sid(request), st, out_dir("mask"), low_v, high_v, invert_v, strength_v)

    @user_errors
    def do_mask(low_v, high_v, invert_v, strength_v, st, request: gr.Request):
        """The session's depth (run /depth first) masked to [low, high] (relative models: the
        normalised inverse depth, 1 = nearest; metric: metres), inverted or not, after removing
        strength x the plane of best fit. Returns the RGBA cut-out PNG and the mask PNG."""
        files = write(low_v, high_v, invert_v, strength_v, st, request)
        return str(files["cutout"]), str(files["mask"])

    @user_errors
    def make_files(low_v, high_v, invert_v, strength_v, st, request: gr.Request):
        files = write(low_v, high_v, invert_v, strength_v, st, request)
        return str(files["cutout"]), str(files["mask"]), [str(files["depth16"]), str(files["npy"])]

    file_inputs = [low, high, invert, strength, ctx.state]
    api_btn = gr.Button(visible=False)          # /mask for scripts: the cut-out and the mask
    api_btn.click(do_mask, file_inputs, [cutout_file, mask_file], api_name="mask", preprocess=False, **MODEL_EVENT)
    files_btn.click(make_files, file_inputs, [cutout_file, mask_file, depth_files], api_visibility="private",
                    preprocess=False, **MODEL_EVENT)
    gr.on([low.change, high.change, invert.change, strength.change, contrast.change, mcmap.change], show_mask,
          [*controls, ctx.state], outputs, api_visibility="private", preprocess=False, trigger_mode="always_last",
          show_progress="hidden", **MODEL_EVENT)

    def fit(info, low_v, high_v, _units):
        """Relative models: 0..1 on the normalised inverse depth; metric: metres up to the model's range."""
        if info.metric:
            top = float(info.max_depth or 80.0)
            return (gr.update(maximum=top, step=0.05, value=min(float(low_v), top)),
                    gr.update(maximum=top, step=0.05, value=top), gr.update(value=mask_mod.range_label(True)))
        return (gr.update(maximum=1.0, step=0.01, value=min(float(low_v), 1.0)),
                gr.update(maximum=1.0, step=0.01, value=min(float(high_v), 1.0)),
                gr.update(value=mask_mod.range_label(False)))

    return Tab(refresh=show_mask, inputs=controls, outputs=outputs, fit=fit, fit_outputs=[low, high, units])
