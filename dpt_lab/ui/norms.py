"""Block norms tab: every token's norm after every block (Plotly), the high-norm outliers
listed and drawn on the image. API: /norms, /norms_files."""

from __future__ import annotations

import gradio as gr

from .. import session as S
from .base import MODEL_EVENT, Context, Tab, has_image, mark_rendered, out_dir, page_image, sid, user_errors

ID, TITLE = "norms", "Block norms"


def _threshold(mode_v, value_v):
    return "auto" if (mode_v or "auto") == "auto" else value_v


def build(ctx: Context) -> Tab:
    lab = ctx.lab
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
        ntable = gr.DataFrame(headers=["block", "row", "col", "norm", "threshold"],
                              label=f"Outlier tokens (first {S.TABLE_LIMIT}; the CSV has every norm)",
                              interactive=False, elem_id="norms-table")
        noverlay = gr.Image(label="Outliers on the image", format="png", interactive=False)
    nsummary = gr.Textbox(label="Summary", lines=5, interactive=False, elem_id="norms-summary")
    with gr.Row():
        nfiles_btn = gr.Button("Make CSV + HTML")
        nfiles = gr.File(label="Downloads", file_count="multiple")
    outputs = [heat, nstats, nhist, ntable, noverlay, nsummary, ctx.state]

    def render(threshold_mode, threshold, block, shared_scale, st, request, page=True):
        r = lab.norms_view(sid(request), st, _threshold(threshold_mode, threshold), block, shared_scale, light=page)
        mark_rendered(st, ID, lab)
        return (r.heatmap, r.stats, r.histogram, {"headers": list(r.headers), "data": r.table},
                page_image(r.overlay) if page else r.overlay, r.summary, st)

    @user_errors
    def do_norms(threshold_mode, threshold, block, shared_scale, st, request: gr.Request):
        """threshold_mode: auto | fixed (then `threshold` is the norm); block: histogram block 1..L."""
        return render(threshold_mode, threshold, block, shared_scale, st, request, page=False)

    @user_errors
    def show_norms(threshold_mode, threshold, block, shared_scale, st, request: gr.Request):
        return render(threshold_mode, threshold, block, shared_scale, st, request)

    @user_errors
    def do_histogram(threshold_mode, threshold, block_v, st, request: gr.Request):
        if not has_image(st):
            return gr.skip()
        return lab.norms_histogram(sid(request), st, _threshold(threshold_mode, threshold), block_v)

    @user_errors
    def do_files(threshold_mode, threshold, shared_scale, st, request: gr.Request):
        files = lab.norms_files(sid(request), st, out_dir("norms"), _threshold(threshold_mode, threshold),
                                shared_scale)
        return [str(p) for p in files.values()]

    inputs = [thr_mode, thr_value, block, nshared, ctx.state]
    norms_btn.click(do_norms, inputs, outputs, api_name="norms", preprocess=False, **MODEL_EVENT)
    gr.on([thr_mode.change, thr_value.submit, nshared.change], show_norms, inputs, outputs,
          api_visibility="private", trigger_mode="always_last", **MODEL_EVENT)
    block.release(do_histogram, [thr_mode, thr_value, block, ctx.state], [nhist], api_visibility="private",
                  **MODEL_EVENT)
    nfiles_btn.click(do_files, [thr_mode, thr_value, nshared, ctx.state], [nfiles], api_name="norms_files",
                     preprocess=False, **MODEL_EVENT)

    def fit(info, block_value):
        n = int(info.num_blocks)
        return (gr.update(maximum=n, value=min(int(block_value or n), n)),)

    def prepare(session, st, threshold_mode, threshold, block_v, shared_scale):
        lab.norms_view(session, st, _threshold(threshold_mode, threshold), block_v, shared_scale, light=True)

    return Tab(refresh=show_norms, inputs=[thr_mode, thr_value, block, nshared], outputs=outputs, fit=fit,
               fit_outputs=[block], prepare=prepare)
