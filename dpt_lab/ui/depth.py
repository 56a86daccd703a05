"""Depth tab: upload, the one recorded encode every tab reads, depth beside the image,
downloads. Also the shared model picker's loading (a new model re-runs the depth).
API: /depth."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .. import session as S
from ..errors import DPTLabError, one_line
from .base import MODEL_EVENT, Context, Tab, out_dir, progress_fn, sid, skips, uploaded, user_errors

ID, TITLE = "depth", "Depth"
ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLES = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "motorcycle_left.jpg"]


def build(ctx: Context) -> Tab:
    lab = ctx.lab
    examples = [[str(ASSETS / n)] for n in EXAMPLES if (ASSETS / n).is_file()]
    with gr.Row():
        with gr.Column(scale=1):
            image_in = gr.Image(type="filepath", image_mode=None, label="Image",
                                sources=["upload", "webcam", "clipboard"], elem_id="depth-input")
            cmap = gr.Dropdown(list(S.COLORMAPS), value="turbo", label="Colormap")
            run_btn = gr.Button("Estimate depth", variant="primary", elem_id="depth-run")
            if examples:
                gr.Examples(examples, inputs=[image_in], label="Examples (assets/)", elem_id="depth-examples")
        with gr.Column(scale=2):
            before_after = gr.ImageSlider(label="Image | depth", type="numpy", format="png",
                                          interactive=False, elem_id="depth-output")
            colorbar = gr.Image(label="Colour scale", format="png", interactive=False, height=90,
                                buttons=[], elem_id="depth-colorbar")
            depth_md = gr.Markdown(label="Depth info", elem_id="depth-info")
            depth_files = gr.File(label="Downloads: 16-bit PNG (min/max in its text chunks), "
                                        "float32 .npy, coloured PNG", file_count="multiple")

    @user_errors
    def do_depth(image, model, base_size, keep_aspect, colormap, st, request: gr.Request,
                 progress=gr.Progress()):
        image = uploaded(image)
        st, res = lab.depth_view(sid(request), st, image, model, base_size, keep_aspect, colormap,
                                 progress=progress_fn(progress))
        files = lab.depth_files(st, res, out_dir("depth"))
        return st, (res.image, res.view.colored), res.view.colorbar, res.text, [str(p) for p in files.values()]

    def do_depth_auto(image, model, base_size, keep_aspect, colormap, st, request: gr.Request,
                      progress=gr.Progress()):
        if image is None:
            return skips(5)
        return do_depth(image, model, base_size, keep_aspect, colormap, st, request, progress)

    depth_io = dict(inputs=[image_in, ctx.model, ctx.base, ctx.aspect, cmap, ctx.state],
                    outputs=[ctx.state, before_after, colorbar, depth_md, depth_files], preprocess=False,
                    **MODEL_EVENT)
    ev_depth = run_btn.click(do_depth, api_name="depth", **depth_io)
    ev_auto = gr.on([image_in.change, cmap.change, ctx.base.release, ctx.aspect.change], do_depth_auto,
                    api_visibility="private", trigger_mode="always_last", **depth_io)

    @user_errors
    def do_model(model, st, progress=gr.Progress()):
        """Load the picked model (downloading it if needed). When it cannot be had, say why
        and go back to the model in use."""
        st = st or S.new_state()
        try:
            loaded = lab.manager.get(model, progress=progress_fn(progress))
        except DPTLabError as exc:
            gr.Warning(one_line(exc), duration=30)
            previous = st.get("picked") or st.get("model") or lab.manager.startup
            return (*skips(len(ctx.banners)), gr.skip(), gr.skip(), previous, st)
        st["picked"] = model
        text = lab.manager.banner(model)
        return (*(gr.update(value=text, visible=bool(text)) for _ in ctx.banners), lab.manager.describe(model),
                loaded.info.base_size, gr.skip(), st)

    def wire_model():     # its outputs are every tab's banner: wired once all tabs are built
        ev_model = ctx.model.change(do_model, [ctx.model, ctx.state],
                                    [*ctx.banners, ctx.model_info, ctx.base, ctx.model, ctx.state],
                                    api_visibility="private", **MODEL_EVENT)
        ctx.encodes.append(ev_model.success(do_depth_auto, api_visibility="private", **depth_io))

    ctx.later(wire_model)
    ctx.encodes += [ev_depth, ev_auto]
    return Tab()
