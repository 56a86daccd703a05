"""DPT Lab web app: the tabs of dpt_lab.ui composed into one Gradio page, and launched.

    python app.py [--host HOST] [--port PORT] [--share] [--model NAME_OR_PATH]
                  [--weights-dir DIR] [--device auto|cpu|cuda|mps] [--dtype float32|float16|bfloat16]
                  [--max-models N]

Each tab is a module of dpt_lab/ui (its components, handlers and API names); the work is
in dpt_lab.session. API endpoints (gradio_client, the "Use via API" page): /depth,
/attention, /rollout, /attention_distance, /features, /norms, /norms_files, /ablation, /fusion,
/fusion_files, /mask, /scene3d, /video, /export. /depth must run first in
a session: the other endpoints work on the image it encoded (kept per session, dropped on
unload).
"""

import argparse
import os
import sys
from pathlib import Path

import gradio as gr

from dpt_lab import (
    gpu,  # first: on ZeroGPU, spaces must be imported before torch
    memory,
)
from dpt_lab import session as S  # light: torch loads on first use, after the page is up
from dpt_lab.errors import DPTLabError, one_line
from dpt_lab.store import PROCESS_ALLOWANCE_BYTES, WATCH_S
from dpt_lab.ui import (
    ablation,
    attention,
    depth,
    export,
    features,
    fusion,
    mask,
    norms,
    quick,
    rollout,
    scene3d,
    video,
)
from dpt_lab.ui.base import TAB_ELEM_PREFIX, Context, page_script, sid, wire_refreshes

# the page's tabs, in order
TABS = (depth, attention, rollout, features, norms, ablation, fusion, mask, scene3d, video, export)
HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
MAX_FILE_SIZE = "200mb"      # a 10 s 4K phone clip is ~100 MB (images are bounded by imaging.MAX_PIXELS)
QUEUE_MAX = 32
# run by the page on load (launch(js=...)): the pickers, and the sliders whose drags ask the quick path
JS = page_script([m.PICKER for m in TABS if hasattr(m, "PICKER")], {fusion.ID: fusion.SLIDERS})
CSS = """
.dpt-banner {background: #fff3cd; border: 2px solid #e0a800; border-radius: 8px; padding: 4px 12px;}
.dpt-offscreen {display: none !important;}
#attention-image img, #features-image img, #rollout-image img, #ablation-image img {cursor: crosshair;}
"""


def build_app(manager: S.ModelManager, lab: S.Lab | None = None) -> gr.Blocks:
    memory.configure()         # before any model loads: RSS levels off under traffic (idempotent)
    lab = lab or S.Lab(manager)
    with gr.Blocks(title="DPT Lab", delete_cache=(900, 3600)) as demo:
        state = gr.State(S.new_state())
        gr.Markdown("# DPT Lab\nLook inside Dense Prediction Transformer depth models: depth, attention of "
                    "every head, token norms after every block, fusion scaling, ONNX export.")
        with gr.Row():
            model_dd = gr.Dropdown(manager.choices(), value=manager.startup, label="Model", scale=3, elem_id="model",
                                   info="registry names download into the Hugging Face cache; local "
                                        "checkpoints come from the weights folder")
            base = gr.Slider(70, 1036, value=_native_size(manager.startup), step=2, label="Base size",
                             elem_id="base-size", info="processing size (re-encodes; rounded to the model's tile)",
                             scale=2)
            aspect = gr.Radio([("model default", "default"), ("keep aspect", "keep"), ("stretch", "stretch")],
                              value="default", label="Resize", scale=2)
        model_md = gr.Markdown(f"Startup model: **{manager.startup}** ({manager.startup_reason})")
        ctx = Context(lab, state, model_dd, base, aspect, model_md, manager.banner())
        tabs = []
        with gr.Tabs():
            for module in TABS:
                with gr.Tab(module.TITLE, id=module.ID, elem_id=f"{TAB_ELEM_PREFIX}{module.ID}") as ui:
                    ctx.add_banner()
                    tabs.append((module.ID, ui, module.build(ctx)))
        ctx.finish()
        wire_refreshes(ctx, tabs)

        # the page's session hash, for its quick path's requests (ui/quick.py)
        session_field = gr.Textbox("", elem_id=quick.SESSION_FIELD, elem_classes=["dpt-offscreen"],
                                   show_label=False, container=False)

        def on_page_load(request: gr.Request):
            """Fresh model list (the weights folder may have changed); the base size of the
            startup model once it is loaded; the session hash for the quick path."""
            startup = lab.manager.startup
            size = lab.manager.get(startup).info.base_size if startup in lab.manager.loaded() else gr.skip()
            return gr.update(choices=lab.manager.choices()), size, sid(request)

        demo.load(on_page_load, None, [model_dd, base, session_field], api_visibility="private", queue=False)
        _wire_download_banner(lab, ctx, model_md)
        def forget(request: gr.Request):
            lab.forget(sid(request))

        demo.unload(forget)
    demo.dpt_lab = lab   # for tests: the Lab behind this app
    demo.dpt_state = state
    demo.dpt_quick_views = {tab_id: t.quick for tab_id, _, t in tabs if t.quick}    # quick.mount serves them
    return demo


def _wire_download_banner(lab: S.Lab, ctx: Context, model_md) -> None:
    """While the startup model downloads, every tab's banner shows its progress (once a second);
    then the model's own banner (none, or the untrained warning if the download failed)."""
    manager = lab.manager
    if not manager.downloading:
        return
    timer = gr.Timer(1.0)

    def tick():
        text = manager.banner()
        done = not manager.downloading
        info = f"Startup model: **{manager.startup}** ({manager.startup_reason})"
        return (*(gr.update(value=text, visible=bool(text)) for _ in ctx.banners), info,
                gr.Timer(active=not done))

    timer.tick(tick, None, [*ctx.banners, model_md, timer], api_visibility="private", queue=False,
               show_progress="hidden")


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
    p.add_argument("--device", default=os.environ.get("DPT_LAB_DEVICE") or "auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default auto; $DPT_LAB_DEVICE)")
    p.add_argument("--dtype", default=os.environ.get("DPT_LAB_DTYPE") or "float32",
                   choices=["float32", "float16", "bfloat16"],
                   help="compute precision: float16 / bfloat16 run under autocast, for GPUs (default float32)")
    p.add_argument("--max-models", type=int, default=None, help="models kept loaded at once (default 2)")
    return p.parse_args(argv)


def events_in_flight(demo: gr.Blocks) -> str:
    """The API names of the events Gradio's queue is running now ('+'-joined), for the memory log."""
    jobs = getattr(getattr(demo, "_queue", None), "active_jobs", None) or []
    return "+".join(sorted(str(getattr(e.fn, "api_name", None) or getattr(e.fn, "name", "?"))
                           for job in list(jobs) if job for e in job))


def main(argv=None) -> int:
    args = parse_args(argv)
    memory.configure()         # first, while this process has one thread
    try:
        manager = S.ModelManager(args.model, weights_dir=args.weights_dir, device=gpu.startup_device(args.device),
                                 max_models=args.max_models, dtype=args.dtype)
    except DPTLabError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"dpt-lab: model {manager.startup} ({manager.startup_reason}); device {manager.device_spec}"
          f"{'' if manager.dtype is None else f' in {args.dtype} (autocast)'}{gpu.describe()}", flush=True)
    if manager.untrained:
        print("dpt-lab: WARNING: " + manager.banner().replace("**", "").replace("`", ""), flush=True)
    demo = build_app(manager)
    # the server only (not build_app: a test process' RSS is not the app's): past its weights and
    # an allowance, the process' measured memory comes off the store's cap (store.outside_allowance).
    # Only with the allocator tuned: without malloc_trim, memory freed stays resident and the
    # store would give way to it until it is empty.
    store = demo.dpt_lab.store
    if memory.state().mode == "tuned":
        store.outside_allowance = lambda: manager.weight_bytes() + PROCESS_ALLOWANCE_BYTES
        store.watch()
        print(f"dpt-lab: feature store: cap {store.max_bytes / 2**30:.2f} GiB, giving way to the process' RSS "
              f"past its weights + {PROCESS_ALLOWANCE_BYTES / 2**30:.2f} GiB (checked every {WATCH_S} s)", flush=True)
    print(f"dpt-lab: {memory.state().line()}", flush=True)
    if os.environ.get("DPT_LAB_MEMLOG"):      # a CSV of RSS beside the store's accounting (bench/soak.py)
        memory.start_log(os.environ["DPT_LAB_MEMLOG"],
                         lambda: dict(demo.dpt_lab.store.accounting(), events=events_in_flight(demo)))
    demo.queue(max_size=QUEUE_MAX, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share or None,
                max_file_size=MAX_FILE_SIZE, allowed_paths=[str(ASSETS)], css=CSS, js=JS, show_error=False,
                prevent_thread_lock=True)
    quick.mount(demo)
    manager.preload()          # after the page is up: the first request waits for it if needed
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
