"""Video tab: depth for every frame of an uploaded video, as an H.264 MP4 (depth alone or beside
the input), with the raw depth to download; and the webcam's depth live. API: /video."""

from __future__ import annotations

import gradio as gr

from .. import session as S
from .base import MODEL_EVENT, Context, Tab, out_dir, progress_fn, sid, user_error, user_errors

ID, TITLE = "video", "Video"
RAW = [("no raw depth", "none"), ("float16 .npz", "npz"), ("16-bit PNG frames (zip)", "png zip")]
WEBCAM_BASE = 252                 # small: the webcam's depth should keep up
WEBCAM_SECONDS = 120              # a stream runs this long at most (time_limit)


def build(ctx: Context) -> Tab:
    lab = ctx.lab
    gr.Markdown("Depth for every frame of a video (any container and codec FFmpeg reads), written as an H.264 "
                "MP4. **The output has no audio.** The model and base size are the ones above.")
    with gr.Row():
        with gr.Column(scale=1):
            video_in = gr.Video(label="Video", sources=["upload"], elem_id="video-input")
            with gr.Row():
                max_seconds = gr.Number(10, label="Maximum duration (s)", minimum=0.1, maximum=600,
                                        elem_id="video-max-seconds")
                stride = gr.Slider(1, 10, value=1, step=1, label="Every N-th frame")
                target_fps = gr.Number(0, label="or target fps (0: use N)", minimum=0, maximum=240)
            normalise = gr.Radio([("one range for the clip (no flicker; two passes)", "clip"),
                                  ("each frame its own range", "frame")], value="clip", label="Colours")
            with gr.Row():
                side = gr.Checkbox(False, label="side by side with the input")
                vcmap = gr.Dropdown(list(S.COLORMAPS), value="turbo", label="Colormap")
            raw = gr.Radio(RAW, value="none", label="Raw depth download")
            with gr.Row():
                run_btn = gr.Button("Make the depth video", variant="primary", elem_id="video-run")
                cancel_btn = gr.Button("Cancel", elem_id="video-cancel")
        with gr.Column(scale=1):
            video_out = gr.Video(label="Depth video (H.264, no audio)", interactive=False, elem_id="video-output")
            raw_out = gr.File(label="Raw depth", elem_id="video-raw")
            info = gr.Markdown(elem_id="video-info")
    with gr.Accordion("Webcam: depth live", open=False):
        gr.Markdown(f"Each frame of the webcam at base size {WEBCAM_BASE}, as fast as the model allows; a stream "
                    f"stops after {WEBCAM_SECONDS} s.")
        with gr.Row():
            cam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam", elem_id="webcam-input")
            cam_depth = gr.Image(label="Depth", interactive=False, elem_id="webcam-depth")
        cam_info = gr.Markdown(elem_id="webcam-info")

    @user_errors
    def do_video(video, model, base_size, max_seconds_v, stride_v, target_fps_v, normalise_v, side_by_side,
                 colormap, raw_v, request: gr.Request, progress=gr.Progress()):
        """video: the uploaded file; model and base size as the Depth tab's; max_seconds; stride (every
        N-th frame) or target_fps (> 0 wins); normalise clip | frame; side_by_side; colormap; raw_v
        none | npz | png zip. Returns the H.264 MP4, the raw-depth file (or None) and a summary."""
        if not video:
            raise user_error("no video yet: upload one first")
        path = video.get("path") if isinstance(video, dict) else None
        if isinstance(video, dict) and isinstance(video.get("video"), dict):       # {"video": FileData, ...}
            path = video["video"].get("path")
        if not isinstance(path, str) or not gr.utils.is_in_or_equal(path, gr.utils.get_upload_folder()):
            raise user_error("the video must be an uploaded file (gradio_client: handle_file(path))")
        report = lab.video_job(sid(request), path, model, out_dir("video"), base_size, max_seconds_v, stride_v,
                               target_fps_v, side_by_side, normalise_v, colormap, raw_v, progress_fn(progress))
        extra = report.npz or report.png_zip
        return str(report.out), (str(extra) if extra else None), report.text()

    def do_cancel(request: gr.Request):
        return "cancelling after the current frames …" if lab.cancel_video(sid(request)) else gr.skip()

    run_btn.click(do_video, [video_in, ctx.model, ctx.base, max_seconds, stride, target_fps, normalise, side, vcmap,
                             raw], [video_out, raw_out, info], api_name="video",
                  preprocess=False, **MODEL_EVENT)
    cancel_btn.click(do_cancel, None, [info], api_visibility="private", queue=False)

    @user_errors
    def webcam_frame(frame, model, colormap, request: gr.Request):
        return lab.webcam_frame(sid(request), frame, model, WEBCAM_BASE, colormap)

    cam.stream(webcam_frame, [cam, ctx.model, vcmap], [cam_depth, cam_info], stream_every=0.1,
               time_limit=WEBCAM_SECONDS, concurrency_limit=2, concurrency_id="webcam", api_visibility="private",
               show_progress="hidden")
    return Tab()
