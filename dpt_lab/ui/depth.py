"""Depth tab: upload, the one recorded encode every tab reads, depth beside the image,
downloads. Also the shared model picker's loading (a new model re-runs the depth).
API: /depth."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .. import session as S
from ..errors import DPTLabError, one_line
from .base import MODEL_EVENT, Context, Tab, has_image, out_dir, page_image, progress_fn, sid, skips, uploaded, user_errors

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
            picked = gr.Examples(examples, inputs=[image_in], label="Examples (assets/)",
                                 elem_id="depth-examples") if examples else None
        with gr.Column(scale=2):
            before_after = gr.ImageSlider(label="Image | depth", type="numpy", format="png",
                                          interactive=False, elem_id="depth-output")
            colorbar = gr.Image(label="Colour scale", format="png", interactive=False, height=90,
                                buttons=[], elem_id="depth-colorbar")
            depth_md = gr.Markdown(label="Depth info", elem_id="depth-info")
            depth_files = gr.File(label="Downloads: 16-bit PNG (min/max in its text chunks), "
                                        "float32 .npy, coloured PNG", file_count="multiple")

    def encode_and_render(image, model, base_size, keep_aspect, colormap, st, request, progress):
        return lab.depth_view(sid(request), st, uploaded(image), model, base_size, keep_aspect, colormap,
                              progress=progress_fn(progress))

    @user_errors
    def do_depth(image, model, base_size, keep_aspect, colormap, st, request: gr.Request,
                 progress=gr.Progress()):
        st, res = encode_and_render(image, model, base_size, keep_aspect, colormap, st, request, progress)
        files = lab.depth_files(st, res, out_dir("depth"))
        return st, (res.image, res.view.colored), res.view.colorbar, res.text, [str(p) for p in files.values()]

    @user_errors
    def show_depth(image, model, base_size, keep_aspect, colormap, st, request: gr.Request,
                   progress=gr.Progress()):
        """The page's path: the view first (JPEGs for the page), the downloads after it."""
        st, res = encode_and_render(image, model, base_size, keep_aspect, colormap, st, request, progress)
        return (st, (page_image(res.image), page_image(res.view.colored)), page_image(res.view.colorbar), res.text,
                None)

    def show_depth_auto(image, model, base_size, keep_aspect, colormap, st, request: gr.Request,
                        progress=gr.Progress()):
        if image is None:             # the picture was cleared, or a control moved before any upload
            return skips(5)
        return show_depth(image, model, base_size, keep_aspect, colormap, st, request, progress)

    @user_errors
    def write_downloads(colormap, st, request: gr.Request):
        if not has_image(st):         # the view was skipped (a control moved before any picture)
            return gr.skip()
        files = lab.depth_downloads(sid(request), st, out_dir("depth"), colormap)
        return [str(p) for p in files.values()]

    inputs = [image_in, ctx.model, ctx.base, ctx.aspect, cmap, ctx.state]
    outputs = [ctx.state, before_after, colorbar, depth_md, depth_files]
    api_btn = gr.Button(visible=False)          # /depth for scripts: everything in one answer, lossless PNGs
    ev_api = api_btn.click(do_depth, inputs, outputs, api_name="depth", preprocess=False, **MODEL_EVENT)
    # show_progress="minimal": Gradio's full progress overlay animates while the encode runs, and on a
    # 2-core machine the browser's drawing of it took ~15% from the model (bench/ui_latency.py)
    page_io = dict(inputs=inputs, outputs=outputs, preprocess=False, api_visibility="private",
                   show_progress="minimal", **MODEL_EVENT)
    ev_run = run_btn.click(show_depth, **page_io)
    # image_in.input, not .change: Gradio fires .change twice when a picture replaces another, and the
    # second run would encode (or wait for the encode) and send the whole view again
    ev_auto = gr.on([image_in.input, cmap.change, ctx.base.release, ctx.aspect.change], show_depth_auto,
                    trigger_mode="always_last", **page_io)
    page_events = [ev_run, ev_auto]
    if picked is not None:        # an example sets the picture from the server: no .input
        page_events.append(picked.load_input_event.then(show_depth_auto, **page_io))
    downloads = dict(inputs=[cmap, ctx.state], outputs=[depth_files], api_visibility="private")
    for ev in page_events:
        ev.success(write_downloads, **downloads)

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
        shown = ev_model.success(show_depth_auto, **page_io)
        shown.success(write_downloads, **downloads)
        ctx.encodes.append(shown)

    ctx.later(wire_model)
    ctx.encodes += [ev_api, *page_events]
    return Tab()
