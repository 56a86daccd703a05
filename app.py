"""DPT Lab web app: Gradio components wired to the plain functions of dpt_lab.session.

    python app.py [--host HOST] [--port PORT] [--share] [--model NAME_OR_PATH]
                  [--weights-dir DIR] [--device DEVICE]

No model or image logic lives here: each handler calls one function of
`dpt_lab.session.Lab` and turns DPT Lab's errors into `gr.Error` messages (the one check
made here: an image payload must be a file in Gradio's upload cache).
API endpoints (gradio_client, the "Use via API" page): /depth, /attention, /norms,
/norms_files, /fusion, /fusion_files, /export. /depth must run first in a session: the
other endpoints work on the image it encoded (kept per session, dropped on unload).
"""

import argparse
import functools
import os
import sys
import tempfile
import traceback
from pathlib import Path

import gradio as gr

from dpt_lab import memory
from dpt_lab import session as S  # light: torch loads on first use, after the page is up
from dpt_lab.errors import DPTLabError, ExportBusyError, one_line

COLORMAPS = S.COLORMAPS
HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
EXAMPLES = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "motorcycle_left.jpg"]
MAX_FILE_SIZE = "50mb"
QUEUE_MAX = 32
MODEL_CONCURRENCY = 2          # events that run the model at once (CPU: ~one per core)
CSS = """
.dpt-banner {background: #fff3cd; border: 2px solid #e0a800; border-radius: 8px; padding: 4px 12px;}
"""


# -- glue ----------------------------------------------------------------------------------
def user_errors(fn):
    """Run a handler; DPT Lab's own errors, bad files and memory trouble become gr.Error
    messages (the server keeps serving). Anything else is logged and shown briefly."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (DPTLabError, OSError, ValueError) as exc:
            raise user_error(one_line(exc)) from None
        except MemoryError:
            raise user_error("out of memory: try a smaller image or base size") from None
        except Exception as exc:   # noqa: BLE001 - a bug: log it, answer with one line
            traceback.print_exc()
            raise user_error(f"internal error ({type(exc).__name__}: {exc}); see the server log") from None
        finally:
            memory.release()       # the request's freed pages back to the OS (see dpt_lab.memory)

    return wrapper


def user_error(message: str) -> gr.Error:
    """A message for the user; the server log stays quiet (it is not a server fault)."""
    return gr.Error(message, print_exception=False)


def sid(request: gr.Request | None) -> str:
    return (getattr(request, "session_hash", None) or S.DEFAULT_SESSION) if request is not None else S.DEFAULT_SESSION


def out_dir(kind: str) -> Path:
    """A fresh folder inside Gradio's cache for files handed to the browser; Gradio deletes
    them on the delete_cache schedule (and at shutdown)."""
    root = Path(gr.utils.get_upload_folder()) / "dpt_lab"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))


def uploaded(image):
    """The upload payload if its file is in Gradio's upload cache, else a user error.
    (Events run with preprocess=False so DPT Lab reads the file itself; a payload naming a
    path elsewhere on this server must not be read.)"""
    if image is None:
        return None
    path = image.get("path") if isinstance(image, dict) else None
    if not isinstance(path, str) or not path:
        raise user_error("the image must be an uploaded file (gradio_client: handle_file(path))")
    if not gr.utils.is_in_or_equal(path, gr.utils.get_upload_folder()):
        raise user_error("the image must be an uploaded file, not a path on the server")
    return image


def progress_fn(progress):
    return lambda fraction, text: progress(fraction, desc=text)


def skips(n: int):
    return tuple(gr.skip() for _ in range(n))


# -- the app -------------------------------------------------------------------------------
def build_app(manager: S.ModelManager, lab: S.Lab | None = None) -> gr.Blocks:
    memory.configure()         # before any model loads: RSS levels off under traffic (idempotent)
    lab = lab or S.Lab(manager)

    banner = manager.banner()
    examples = [[str(ASSETS / n)] for n in EXAMPLES if (ASSETS / n).is_file()]

    with gr.Blocks(title="DPT Lab", delete_cache=(900, 3600)) as demo:
        state = gr.State(S.new_state())
        active_tab = gr.State("depth")
        gr.Markdown("# DPT Lab\nLook inside Dense Prediction Transformer depth models: depth, attention of "
                    "every head, token norms after every block, fusion scaling, ONNX export.")
        with gr.Row():
            model_dd = gr.Dropdown(manager.choices(), value=manager.startup, label="Model", scale=3, elem_id="model",
                                   info="registry names download into the Hugging Face cache; local "
                                        "checkpoints come from the weights folder")
            base = gr.Slider(70, 1036, value=_native_size(manager.startup), step=2, label="Base size", elem_id="base-size",
                             info="processing size (re-encodes; rounded to the model's tile)", scale=2)
            aspect = gr.Radio([("model default", "default"), ("keep aspect", "keep"), ("stretch", "stretch")],
                              value="default", label="Resize", scale=2)
        model_md = gr.Markdown(f"Startup model: **{manager.startup}** ({manager.startup_reason})")
        banners = []

        def add_banner():
            banners.append(gr.Markdown(banner, visible=bool(banner), elem_classes="dpt-banner"))

        with gr.Tabs():
            # ---------------------------------------------------------------- Depth
            with gr.Tab("Depth", id="depth") as tab_depth:
                add_banner()
                with gr.Row():
                    with gr.Column(scale=1):
                        image_in = gr.Image(type="filepath", image_mode=None, label="Image",
                                            sources=["upload", "webcam", "clipboard"], elem_id="depth-input")
                        cmap = gr.Dropdown(list(COLORMAPS), value="turbo", label="Colormap")
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
            # ---------------------------------------------------------------- Attention
            with gr.Tab("Attention", id="attention") as tab_attention:
                add_banner()
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
                        acmap = gr.Dropdown(list(COLORMAPS), value="inferno", label="Colormap")
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
            # ---------------------------------------------------------------- Block norms
            with gr.Tab("Block norms", id="norms") as tab_norms:
                add_banner()
                gr.Markdown("L2 norm of every token after every block. Large ViTs without registers grow a few "
                            "high-norm tokens (arXiv 2309.16588); the outliers are listed and drawn on the image.")
                with gr.Row():
                    thr_mode = gr.Radio([("auto (median + k·MAD)", "auto"), ("fixed", "fixed")], value="auto",
                                        label="Outlier threshold", elem_id="norms-threshold-mode")
                    thr_value = gr.Number(150, label="fixed threshold", minimum=0, elem_id="norms-threshold")
                    block = gr.Slider(1, 12, value=12, step=1, label="Histogram block")
                    nshared = gr.Checkbox(True, label="one colour scale for all blocks")
                    norms_btn = gr.Button("Show norms", variant="primary", elem_id="norms-run")
                heat = gr.Plot(label="Norms per block", elem_id="norms-heatmap")
                with gr.Row():
                    nstats = gr.Plot(label="Distribution per block")
                    nhist = gr.Plot(label="Histogram")
                with gr.Row():
                    ntable = gr.DataFrame(headers=["block", "row", "col", "norm", "threshold"], label=
                                          f"Outlier tokens (first {S.TABLE_LIMIT}; the CSV has every norm)",
                                          interactive=False, elem_id="norms-table")
                    noverlay = gr.Image(label="Outliers on the image", format="png", interactive=False)
                nsummary = gr.Textbox(label="Summary", lines=5, interactive=False, elem_id="norms-summary")
                with gr.Row():
                    nfiles_btn = gr.Button("Make CSV + HTML")
                    nfiles = gr.File(label="Downloads", file_count="multiple")
            # ---------------------------------------------------------------- Fusion scaling
            with gr.Tab("Fusion scaling", id="fusion") as tab_fusion:
                add_banner()
                gr.Markdown("Each factor multiplies the map entering one fusion block of the DPT decoder "
                            "(finest first). 0 removes that scale, 1 is the trained model; only the decoder runs.")
                with gr.Row():
                    with gr.Column(scale=1):
                        scales = [gr.Slider(*S.FUSION_RANGE, value=1.0, step=0.01, label=lbl, elem_id=f"fusion-scale-{i}")
                                  for i, lbl in enumerate(S.FUSION_LABELS, start=1)]
                        with gr.Row():
                            preset = gr.Dropdown(list(S.FUSION_PRESETS), value=None, label="Preset")
                            glitch = gr.Button("Random glitch")
                            reset = gr.Button("Reset", elem_id="fusion-reset")
                        fcmap = gr.Dropdown(list(COLORMAPS), value="turbo", label="Colormap")
                        ffiles_btn = gr.Button("Downloads of the scaled depth")
                        ffiles = gr.File(label="16-bit PNG, float32 .npy, coloured PNG", file_count="multiple")
                    with gr.Column(scale=2):
                        fscaled = gr.Image(label="Scaled", format="png", interactive=False, elem_id="fusion-scaled")
                        with gr.Row():
                            funscaled = gr.Image(label="Unscaled (1, 1, 1, 1)", format="png", interactive=False)
                            fdiff = gr.Image(label="Difference (scaled − unscaled)", format="png",
                                             interactive=False)
                        fusion_md = gr.Markdown(label="Fusion info", elem_id="fusion-info")
            # ---------------------------------------------------------------- Export
            with gr.Tab("Export ONNX", id="export") as tab_export:
                add_banner()
                gr.Markdown("Export the chosen model to ONNX (input `image`, output `depth`), traced at the base "
                            "size above and verified with onnxruntime against PyTorch at three sizes before the "
                            "file is offered.")
                with gr.Row():
                    dynamic = gr.Checkbox(True, label="dynamic height and width")
                    fp16 = gr.Checkbox(False, label="fp16")
                    with_pre = gr.Checkbox(False, label="with preprocessing (uint8 H x W x 3 in)")
                    opset = gr.Number(0, label="opset (0 = automatic)", precision=0, minimum=0)
                export_btn = gr.Button("Export", variant="primary", elem_id="export-run")
                report = gr.DataFrame(label="Report", interactive=False)
                report_md = gr.Textbox(label="Report (text)", lines=6, interactive=False, elem_id="export-report")
                onnx_file = gr.File(label="ONNX file", elem_id="export-file")

        # ==================================================================== handlers
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

        depth_io = dict(inputs=[image_in, model_dd, base, aspect, cmap, state],
                        outputs=[state, before_after, colorbar, depth_md, depth_files],
                        preprocess=False, concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)
        ev_depth = run_btn.click(do_depth, api_name="depth", **depth_io)
        ev_auto = gr.on([image_in.change, cmap.change, base.release, aspect.change], do_depth_auto,
                        api_visibility="private", trigger_mode="always_last", **depth_io)

        @user_errors
        def do_model(model, st, progress=gr.Progress()):
            """Load the picked model (downloading it if needed). When it cannot be had, say why
            and go back to the model in use."""
            try:
                loaded = lab.manager.get(model, progress=progress_fn(progress))
            except DPTLabError as exc:
                gr.Warning(one_line(exc), duration=30)
                st = st or S.new_state()
                previous = st.get("picked") or st.get("model") or lab.manager.startup
                return (*skips(len(banners)), gr.skip(), gr.skip(), previous, st)
            st = st or S.new_state()
            st["picked"] = model
            text = lab.manager.banner(model)
            return (*(gr.update(value=text, visible=bool(text)) for _ in banners), lab.manager.describe(model),
                    loaded.info.base_size, gr.skip(), st)

        ev_model = model_dd.change(do_model, [model_dd, state], [*banners, model_md, base, model_dd, state],
                                  api_visibility="private", concurrency_id="model",
                                  concurrency_limit=MODEL_CONCURRENCY)
        ev_model_depth = ev_model.success(do_depth_auto, api_visibility="private", **depth_io)

        # after any depth run: fit the controls to the model, refresh the visible tab
        def sync_controls(st, layer_value, block_value):
            if not st or st.get("image") is None:
                return skips(3)
            info = lab.manager.get(st["model"]).info
            n = int(info.num_blocks)
            return (gr.update(maximum=n, value=min(int(layer_value or n), n)),
                    gr.update(maximum=n, value=min(int(block_value or n), n)),
                    gr.update(visible=True) if info.has_cls else gr.update(visible=False, value=False))

        # ---------------------------------------------------------------- attention
        attn_outputs = [tiles, attn_image, attn_md, ax, ay, state]

        def _attention(st, x, y, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v, request):
            r = lab.attention_at(sid(request), st, x, y, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v)
            st["rendered"]["attention"] = lab.entry_key(st)
            click = st.get("click")
            cx, cy = click if isinstance(click, tuple) else (None, None)
            return r.tiles, r.marked, r.text, cx, cy, st

        @user_errors
        def do_attention(x, y, layer, mode, log_contrast, shared_scale, colormap, alpha, cls_token, st,
                         request: gr.Request):
            """x, y: pixel of the original image (column, row); layer 1..L; mode row | column."""
            if x is None or y is None:
                if not cls_token:
                    raise user_error("give the x and y of a pixel (or click the image)")
            return _attention(st, x, y, layer, mode, log_contrast, shared_scale, colormap, alpha, cls_token, request)

        @user_errors
        def do_attention_click(layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, st, evt: gr.SelectData,
                               request: gr.Request):
            if not st or st.get("image") is None:
                raise user_error("no image yet: run the Depth tab on an image first")
            x, y = lab.display_to_image(st, *evt.index[:2])
            return _attention(st, x, y, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, False, request)

        @user_errors
        def do_attention_controls(layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v, st,
                                  request: gr.Request):
            if not st or st.get("image") is None:
                return skips(len(attn_outputs))
            return _attention(st, None, None, layer_v, mode_v, log_v, shared_v, cmap_v, alpha_v, cls_v, request)

        attn_controls = [layer, mode, log_c, shared, acmap, alpha]
        attn_btn.click(do_attention, [ax, ay, *attn_controls, cls_cb, state], attn_outputs, api_name="attention",
                       preprocess=False, concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)
        attn_image.select(do_attention_click, [*attn_controls, state], attn_outputs, api_visibility="private",
                          concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)
        gr.on([layer.change, mode.change, log_c.change, shared.change, acmap.change, alpha.release, cls_cb.change],
              do_attention_controls, [*attn_controls, cls_cb, state], attn_outputs, api_visibility="private",
              trigger_mode="always_last", show_progress="hidden", concurrency_id="model",
              concurrency_limit=MODEL_CONCURRENCY)

        # ---------------------------------------------------------------- norms
        norms_outputs = [heat, nstats, nhist, ntable, noverlay, nsummary, state]

        def _threshold(mode_v, value_v):
            return "auto" if (mode_v or "auto") == "auto" else value_v

        @user_errors
        def do_norms(threshold_mode, threshold, block, shared_scale, st, request: gr.Request):
            """threshold_mode: auto | fixed (then `threshold` is the norm); block: histogram block 1..L."""
            r = lab.norms_view(sid(request), st, _threshold(threshold_mode, threshold), block, shared_scale)
            st["rendered"]["norms"] = lab.entry_key(st)
            return (r.heatmap, r.stats, r.histogram, {"headers": list(r.headers), "data": r.table},
                    r.overlay, r.summary, st)

        @user_errors
        def do_norms_hist(threshold_mode, threshold, block_v, st, request: gr.Request):
            if not st or st.get("image") is None:
                return gr.skip()
            return lab.norms_histogram(sid(request), st, _threshold(threshold_mode, threshold), block_v)

        @user_errors
        def do_norms_files(threshold_mode, threshold, shared_scale, st, request: gr.Request):
            files = lab.norms_files(sid(request), st, out_dir("norms"), _threshold(threshold_mode, threshold),
                                    shared_scale)
            return [str(p) for p in files.values()]

        norms_in = [thr_mode, thr_value, block, nshared, state]
        norms_btn.click(do_norms, norms_in, norms_outputs, api_name="norms", preprocess=False,
                        concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)
        gr.on([thr_mode.change, thr_value.submit, nshared.change], do_norms, norms_in, norms_outputs,
              api_visibility="private", trigger_mode="always_last", concurrency_id="model",
              concurrency_limit=MODEL_CONCURRENCY)
        block.release(do_norms_hist, [thr_mode, thr_value, block, state], [nhist], api_visibility="private",
                      concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)
        nfiles_btn.click(do_norms_files, [thr_mode, thr_value, nshared, state], [nfiles], api_name="norms_files",
                         preprocess=False, concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)

        # ---------------------------------------------------------------- fusion
        fusion_outputs = [fscaled, funscaled, fdiff, fusion_md, state]

        @user_errors
        def do_fusion(scale_1, scale_2, scale_3, scale_4, colormap, st, request: gr.Request):
            """Four fusion factors (finest first, -5..5) on the session's cached encode."""
            r = lab.fusion_view(sid(request), st, (scale_1, scale_2, scale_3, scale_4), colormap)
            st["rendered"]["fusion"] = lab.entry_key(st)
            return r.scaled.colored, r.unscaled.colored, r.difference, r.text, st

        @user_errors
        def do_fusion_files(scale_1, scale_2, scale_3, scale_4, colormap, st, request: gr.Request):
            files = lab.fusion_files(sid(request), st, out_dir("fusion"), (scale_1, scale_2, scale_3, scale_4),
                                     colormap)
            return [str(p) for p in files.values()]

        gr.on([s.change for s in scales] + [fcmap.change], do_fusion, [*scales, fcmap, state], fusion_outputs,
              api_name="fusion", preprocess=False, trigger_mode="always_last", show_progress="hidden",
              concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)
        ffiles_btn.click(do_fusion_files, [*scales, fcmap, state], [ffiles], api_name="fusion_files",
                         preprocess=False, concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)
        preset.input(user_errors(lab.fusion_preset), [preset], scales, api_visibility="private", queue=False)
        glitch.click(lambda: lab.fusion_glitch(), None, scales, api_visibility="private", queue=False)
        reset.click(lambda: lab.fusion_preset("reset"), None, scales, api_visibility="private", queue=False)

        # ---------------------------------------------------------------- export
        @user_errors
        def do_export(model, dynamic_shapes, fp16_weights, with_preprocessing, opset_version, base_size,
                      progress=gr.Progress(track_tqdm=True)):
            """Export `model` to ONNX (traced at base_size, 0 = the model's); returns the report
            table, its text and the file."""
            try:
                rep = lab.export_model(model, out_dir("export"), dynamic=dynamic_shapes, fp16=fp16_weights,
                                       with_preprocessing=with_preprocessing, opset=opset_version,
                                       base_size=base_size, progress=progress_fn(progress))
            except ExportBusyError:
                raise user_error("another export is running: try again when it has finished") from None
            table = {"headers": list(type(rep).HEADERS), "data": [list(r) for r in rep.as_rows()]}
            return table, rep.as_text(), str(rep.path)

        export_btn.click(do_export, [model_dd, dynamic, fp16, with_pre, opset, base], [report, report_md, onnx_file],
                         api_name="export", preprocess=False, concurrency_id="model",
                         concurrency_limit=MODEL_CONCURRENCY)   # one of the model slots: memory peaks add up

        # ---------------------------------------------------------------- tabs and chains
        def make_refresh(tab: str, render, n_out: int):
            def refresh(active, st, request: gr.Request, *controls):
                if active != tab or not st or st.get("image") is None:
                    return skips(n_out)
                if st["rendered"].get(tab) == lab.entry_key(st):
                    return skips(n_out)
                try:
                    return render(*controls, st, request)
                except gr.Error as exc:    # the tab's own button shows it; the log says why it is blank
                    print(f"dpt-lab: {tab} tab not refreshed: {exc}", file=sys.stderr, flush=True)
                    return skips(n_out)
            return refresh

        refreshers = [
            (make_refresh("attention", do_attention_controls, len(attn_outputs)),
             [*attn_controls, cls_cb], attn_outputs),
            (make_refresh("norms", do_norms, len(norms_outputs)), [thr_mode, thr_value, block, nshared],
             norms_outputs),
            (make_refresh("fusion", do_fusion, len(fusion_outputs)), [*scales, fcmap], fusion_outputs),
        ]

        def chain(dep):
            synced = dep.success(sync_controls, [state, layer, block], [layer, block, cls_cb],
                                 api_visibility="private", queue=False)
            for fn, controls, outs in refreshers:
                synced.success(fn, [active_tab, state, *controls], outs, api_visibility="private",
                               concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)

        for dep in (ev_depth, ev_auto, ev_model_depth):
            chain(dep)
        for tab, name in ((tab_depth, "depth"), (tab_attention, "attention"), (tab_norms, "norms"),
                          (tab_fusion, "fusion"), (tab_export, "export")):
            ev = tab.select(_constant(name), None, active_tab, api_visibility="private", queue=False)
            for fn, controls, outs in refreshers:
                ev.then(fn, [active_tab, state, *controls], outs, api_visibility="private",
                        concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY)

        # ---------------------------------------------------------------- session life
        def on_page_load():
            """Fresh model list (the weights folder may have changed); the base size of the
            startup model once it is loaded."""
            startup = lab.manager.startup
            size = lab.manager.get(startup).info.base_size if startup in lab.manager.loaded() else gr.skip()
            return gr.update(choices=lab.manager.choices()), size

        demo.load(on_page_load, None, [model_dd, base], api_visibility="private", queue=False)

        def forget(request: gr.Request):
            lab.store.drop(sid(request))

        demo.unload(forget)
    demo.dpt_lab = lab   # for tests: the Lab behind this app
    return demo


def _constant(value):
    return lambda: value


def _native_size(name: str) -> int:
    from dpt_lab import weights

    km = weights.KNOWN_MODELS.get(name)
    return int(km.native_size) if km else 518


# -- command line --------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description="DPT Lab web app (Gradio).")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; $GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860 or the next free one; "
                                                          "$GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--model", default=os.environ.get("DPT_LAB_MODEL") or None,
                   help="checkpoint path, -hf folder, local name or known model name (default $DPT_LAB_MODEL, "
                        "else a checkpoint in the weights folder, else random weights)")
    p.add_argument("--weights-dir", default=None, help="local weights folder (default $DPT_LAB_WEIGHTS or "
                                                       "./model_weights)")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--max-models", type=int, default=None, help="models kept loaded at once (default 2)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    memory.configure()         # first, while this process has one thread
    try:
        manager = S.ModelManager(args.model, weights_dir=args.weights_dir, device=args.device,
                                 max_models=args.max_models)
    except DPTLabError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"dpt-lab: model {manager.startup} ({manager.startup_reason})", flush=True)
    if manager.untrained:
        print("dpt-lab: WARNING: " + manager.banner().replace("**", "").replace("`", ""), flush=True)
    demo = build_app(manager)
    print(f"dpt-lab: {memory.state().line()}", flush=True)
    demo.queue(max_size=QUEUE_MAX, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share or None,
                max_file_size=MAX_FILE_SIZE, allowed_paths=[str(ASSETS)], css=CSS, show_error=False,
                prevent_thread_lock=True)
    manager.preload()          # after the page is up: the first request waits for it if needed
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
