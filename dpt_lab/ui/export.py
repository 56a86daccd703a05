"""Export ONNX tab: the chosen model to ONNX, verified with onnxruntime before the file is
offered. API: /export."""

from __future__ import annotations

import gradio as gr

from ..errors import ExportBusyError
from .base import Context, Tab, out_dir, progress_fn, user_error, user_errors

ID, TITLE = "export", "Export ONNX"


def build(ctx: Context) -> Tab:
    lab = ctx.lab
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

    # exports queue one at a time, beside the model events (a second export waits its turn)
    export_btn.click(do_export, [ctx.model, dynamic, fp16, with_pre, opset, ctx.base], [report, report_md, onnx_file],
                     api_name="export", preprocess=False, concurrency_id="export", concurrency_limit=1)
    return Tab()
