"""3D tab: the session's cached depth as a coloured mesh or point cloud in gr.Model3D (GLB),
with a GLB and a binary PLY to download. No re-encode. API: /scene3d (the GLB and PLY files)."""

from __future__ import annotations

import gradio as gr

from .. import scene
from .base import MODEL_EVENT, Context, Tab, has_image, mark_rendered, out_dir, sid, skips, user_errors

ID, TITLE = "scene3d", "3D"
RELATIVE_NOTE = ("Relative models predict inverse depth up to scale and shift: the scene is placed between "
                 "**near** and **far**, and its shape depends on these two numbers.")
METRIC_NOTE = "Metric model: the scene is in metres, as predicted (near and far are not used)."


def build(ctx: Context) -> Tab:
    lab = ctx.lab
    gr.Markdown("The depth in 3D: a pinhole camera at the image centre, one vertex per sampled pixel, "
                "coloured by the image. Triangles across depth edges are cut (no rubber sheet).")
    with gr.Row():
        with gr.Column(scale=1):
            note = gr.Markdown(RELATIVE_NOTE, elem_id="scene-units")
            fov = gr.Slider(10, 150, value=scene.DEFAULT_FOV, step=1, label="horizontal field of view (degrees)")
            focal = gr.Number(0, label="focal length in pixels (0: from the field of view)", minimum=0)
            with gr.Row():
                near = gr.Number(1.0, label="near", elem_id="scene-near")
                far = gr.Number(10.0, label="far", elem_id="scene-far")
            edge = gr.Slider(0, 0.5, value=scene.DEFAULT_EDGE, step=0.01,
                             label="edge cut: relative depth change (0 = off)")
            max_vertices = gr.Slider(10_000, scene.MAX_VERTICES, value=scene.DEFAULT_MAX_VERTICES, step=10_000,
                                     label="vertices at most")
            drop = gr.Number(0, label="drop points beyond this distance (the sky; 0 = keep all)", minimum=0,
                             elem_id="scene-drop")
            points = gr.Checkbox(False, label="point cloud instead of a mesh")
            run = gr.Button("Build the 3D scene", variant="primary", elem_id="scene-run")
        with gr.Column(scale=2):
            # from where the photo was taken: babylon.js (left-handed) looks along +z from alpha -90, beta 90
            view = gr.Model3D(label="Scene (drag to turn, scroll to zoom)", clear_color=(0.1, 0.1, 0.12, 1.0),
                              camera_position=(-90, 90, None),
                              elem_id="scene-model", height=520)
            info = gr.Markdown(elem_id="scene-info")
            with gr.Row():
                glb_file = gr.File(label="GLB", elem_id="scene-glb")
                ply_file = gr.File(label="PLY point cloud (xyz + rgb)", elem_id="scene-ply")
    controls = [fov, focal, near, far, edge, max_vertices, points]
    outputs = [view, info, glb_file, ply_file, ctx.state]

    def make(fov_v, focal_v, near_v, far_v, edge_v, max_v, points_v, st, request, drop_v=None):
        return lab.scene_view(sid(request), st, out_dir("scene"), fov_v, focal_v or None, near_v, far_v, edge_v,
                              max_v, points_v, drop_beyond=drop_v or None)

    @user_errors
    def do_scene(fov_v, focal_v, near_v, far_v, edge_v, max_v, points_v, st, request: gr.Request):
        """The session's depth (run /depth first) in 3D: field of view (degrees) or focal length
        (pixels, 0 = from the field of view), near and far (relative models), edge cut, vertex
        cap, points or mesh. Returns the GLB file and the PLY file."""
        r = make(fov_v, focal_v, near_v, far_v, edge_v, max_v, points_v, st, request)
        return str(r.glb), str(r.ply)

    @user_errors
    def show_scene(fov_v, focal_v, near_v, far_v, edge_v, max_v, points_v, drop_v, st, request: gr.Request):
        if not has_image(st):
            return skips(len(outputs))
        r = make(fov_v, focal_v, near_v, far_v, edge_v, max_v, points_v, st, request, drop_v)
        mark_rendered(st, ID, lab)
        return str(r.glb), r.text, str(r.glb), str(r.ply), st

    api_btn = gr.Button(visible=False)          # /scene3d for scripts: the two files
    api_btn.click(do_scene, [*controls, ctx.state], [glb_file, ply_file], api_name="scene3d", preprocess=False,
                  **MODEL_EVENT)
    page = dict(inputs=[*controls, drop, ctx.state], outputs=outputs, api_visibility="private", preprocess=False,
                **MODEL_EVENT)
    run.click(show_scene, **page)
    gr.on([points.change, edge.release, fov.release], show_scene, trigger_mode="always_last", **page)

    def fit(info_, _note):
        return (gr.update(value=METRIC_NOTE if info_.metric else RELATIVE_NOTE),)

    return Tab(refresh=show_scene, inputs=[*controls, drop], outputs=outputs, fit=fit, fit_outputs=[note])
