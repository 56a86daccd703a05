"""Fusion scaling tab: four factors on the decoder's fusion inputs; only the decoder runs,
on the session's cached features. API: /fusion, /fusion_files."""

from __future__ import annotations

import gradio as gr

from .. import gpu
from .. import session as S
from . import quick
from .base import MODEL_EVENT, Context, Tab, mark_rendered, out_dir, page_image, shows_current, sid, user_errors

ID, TITLE = "fusion", "Fusion scaling"
UNSCALED = "fusion-unscaled"      # SessionState.rendered key: the unscaled depth on screen (encode, colormap)
SLIDERS = [f"fusion-scale-{i}" for i in range(1, 5)]     # element ids; their drags ask the quick path


def build(ctx: Context) -> Tab:
    lab = ctx.lab
    gr.Markdown("Each factor multiplies the map entering one fusion block of the DPT decoder "
                "(finest first). 0 removes that scale, 1 is the trained model; only the decoder runs.")
    with gr.Row():
        with gr.Column(scale=1):
            scales = [gr.Slider(*S.FUSION_RANGE, value=1.0, step=0.01, label=lbl, elem_id=elem)
                      for elem, lbl in zip(SLIDERS, S.FUSION_LABELS)]
            with gr.Row():
                preset = gr.Dropdown(list(S.FUSION_PRESETS), value=None, label="Preset")
                glitch = gr.Button("Random glitch")
                reset = gr.Button("Reset", elem_id="fusion-reset")
            fcmap = gr.Dropdown(list(S.COLORMAPS), value="turbo", label="Colormap")
            ffiles_btn = gr.Button("Downloads of the scaled depth")
            ffiles = gr.File(label="16-bit PNG, float32 .npy, coloured PNG", file_count="multiple")
        with gr.Column(scale=2):
            fscaled = gr.Image(label="Scaled", format="png", interactive=False, elem_id="fusion-scaled")
            with gr.Row():
                funscaled = gr.Image(label="Unscaled (1, 1, 1, 1)", format="png", interactive=False,
                                     elem_id="fusion-unscaled")
                fdiff = gr.Image(label="Difference (scaled − unscaled)", format="png", interactive=False,
                                 elem_id="fusion-difference")
            fusion_md = gr.Markdown(label="Fusion info", elem_id="fusion-info")
    outputs = [fscaled, funscaled, fdiff, fusion_md, ctx.state]

    @user_errors
    def do_fusion(scale_1, scale_2, scale_3, scale_4, colormap, st, request: gr.Request):
        """Four fusion factors (finest first, -5..5) on the session's cached encode."""
        r = lab.fusion_view(sid(request), st, (scale_1, scale_2, scale_3, scale_4), colormap)
        mark_rendered(st, ID, lab)
        return r.scaled.colored, r.unscaled.colored, r.difference, r.text, st

    @user_errors
    def show_fusion(scale_1, scale_2, scale_3, scale_4, colormap, st, request: gr.Request):
        """The page's path: JPEGs, and the unscaled depth only when it is not on screen yet
        (it is the same for every slider position)."""
        r = lab.fusion_view(sid(request), st, (scale_1, scale_2, scale_3, scale_4), colormap)
        mark_rendered(st, ID, lab)
        quick.remember(st, ID, scales=r.scales, cmap=colormap)
        unscaled_key = (lab.entry_key(st), r.unscaled.cmap)
        unchanged = st["rendered"].get(UNSCALED) == unscaled_key
        st["rendered"][UNSCALED] = unscaled_key
        return (page_image(r.scaled.colored), gr.skip() if unchanged else page_image(r.unscaled.colored),
                page_image(r.difference), r.text, st)

    @user_errors
    def do_files(scale_1, scale_2, scale_3, scale_4, colormap, st, request: gr.Request):
        files = lab.fusion_files(sid(request), st, out_dir("fusion"), (scale_1, scale_2, scale_3, scale_4),
                                 colormap)
        return [str(p) for p in files.values()]

    api_btn = gr.Button(visible=False)          # /fusion for scripts: every image, lossless PNGs
    api_btn.click(do_fusion, [*scales, fcmap, ctx.state], outputs, api_name="fusion", preprocess=False, **MODEL_EVENT)
    # The page's quick path shows each position as a slider moves (quick_view); this event runs when
    # the slider is let go (the page's script lets go for keys and typed values once the quick path
    # has answered) and sets every output from the decode the quick path has just made
    # (Lab.fusion_view keeps the latest factors' depth; one decode serves both when they ask at once).
    page = dict(api_visibility="private", preprocess=False, trigger_mode="always_last", show_progress="hidden",
                **MODEL_EVENT)
    gr.on([s.release for s in scales] + [fcmap.change], show_fusion, [*scales, fcmap, ctx.state], outputs, **page)
    ffiles_btn.click(do_files, [*scales, fcmap, ctx.state], [ffiles], api_name="fusion_files", preprocess=False,
                     **MODEL_EVENT)
    for set_factors in (preset.input(user_errors(lab.fusion_preset), [preset], scales, api_visibility="private",
                                     queue=False),
                        glitch.click(lambda: lab.fusion_glitch(), None, scales, api_visibility="private", queue=False),
                        reset.click(lambda: lab.fusion_preset("reset"), None, scales, api_visibility="private",
                                    queue=False)):
        set_factors.then(show_fusion, [*scales, fcmap, ctx.state], outputs, **page)

    def quick_view(session, st, query):
        """The scaled depth and the difference for the sliders' values in the query (a drag), or
        at the tab's opening for the last factors when the tab has not shown this encode yet."""
        c = quick.controls(st, ID)
        if c is None or gpu.on_zero_gpu():     # ZeroGPU lends its GPU to Gradio's events only
            return None
        dragged = all(k in query for k in SLIDERS)
        if dragged:
            factors = tuple(float(query[k]) for k in SLIDERS)
        elif shows_current(st, ID, lab):
            return None
        else:
            factors = c["scales"]
        r = lab.fusion_view(session, st, factors, c["cmap"])
        shown = {"fusion-scaled": r.scaled.colored, "fusion-difference": r.difference}
        return shown if dragged else dict(shown, **{"fusion-unscaled": r.unscaled.colored})   # a new encode's

    return Tab(refresh=show_fusion, inputs=[*scales, fcmap], outputs=outputs, quick=quick_view)
