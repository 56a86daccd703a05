"""Image in, depth out: `model.predict` against the official OpenCV pipeline, stage by stage.

    python bench/predict.py [--runs 5] [--stems depth_anything_v2_vits,dpt_beit_base_384] [--out bench/results/predict.md]

Photos: a 12-megapixel JPEG (4000 x 3000, made from assets/ photos: a mosaic of their
crops, cubic-upscaled, saved at quality 90) and assets/motorcycle_left.jpg (741 x 500).
Models: the synthesized fixtures (official layouts, random weights; speed does not depend
on the values). For each photo and model, one round runs, each timed on its own:

  ours      load   dpt_lab.imaging.load_image (PIL decode, EXIF, RGB uint8)
            pre    model.preprocess on the decoded pixels (cv2-exact cubic from uint8 + normalise)
            post   model.postprocess (depth back to the photo's size, to numpy)
            total  model.predict(path), end to end
  official  load   cv2.imread + cvtColor + / 255.0 (float64, as the scripts do)
            pre    cv2.resize INTER_CUBIC (float64) + normalise + CHW float32
            post   F.interpolate back (the family's mode) + numpy
  forward   model(x), the same for both

Rounds are interleaved (the machine is shared); medians of wall time, and of the process's
CPU time (less sensitive to other processes on the machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import machine, write_results  # noqa: E402  (sets sys.path)
from fixtures import save_fixture_checkpoint  # noqa: E402

import dpt_lab  # noqa: E402
from dpt_lab.imaging import load_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
BACK = {"bilinear_align": ("bilinear", True), "bilinear": ("bilinear", False), "bicubic": ("bicubic", False)}


def make_12mp(path: Path) -> None:
    import cv2
    from PIL import Image

    tiles = []
    for p in sorted(ASSETS.glob("*.jpg")):
        a = np.asarray(Image.open(p).convert("RGB"))
        y, x = (a.shape[0] - 300) // 2, (a.shape[1] - 400) // 2
        tiles.append(a[y:y + 300, x:x + 400])
    tiles.append(tiles[0][:, ::-1])
    canvas = np.concatenate([np.concatenate(tiles[:3], 1), np.concatenate(tiles[3:6], 1)], 0)  # 600 x 1200
    big = cv2.resize(canvas, (4000, 3000), interpolation=cv2.INTER_CUBIC)
    Image.fromarray(big).save(path, quality=90)


def clocked(fn):
    """Run fn; (result, wall seconds, process CPU seconds)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def bench(model, path: Path, runs: int) -> dict:
    import cv2

    info = model.info
    mean, std = np.array(info.mean), np.array(info.std)
    mode, align = BACK[info.depth_resize]

    def official_load():
        return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB) / 255.0

    def official_pre(rgb, size):
        img = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
        img = (img - mean) / std
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32))[None]

    def official_post(depth, size):
        return F.interpolate(depth[:, None], size=size, mode=mode, align_corners=align)[0, 0].numpy()

    stages = ("ours load", "ours pre", "ours post", "ours total", "official load", "official pre", "official post", "forward")
    wall = {s: [] for s in stages}
    cpu = {s: [] for s in stages}

    def rec(name, fn):
        out, w, c = clocked(fn)
        wall[name].append(w)
        cpu[name].append(c)
        return out

    with torch.inference_mode():
        for r in range(runs + 1):  # the first round warms up and is dropped
            rgb8 = rec("ours load", lambda: load_image(path))
            x, meta = rec("ours pre", lambda: model.preprocess(rgb8))
            depth = rec("forward", lambda: model(x))
            ours = rec("ours post", lambda: model.postprocess(depth, meta))
            rgb = rec("official load", official_load)
            xo = rec("official pre", lambda rgb=rgb, meta=meta: official_pre(rgb, meta.input_size))
            ref = rec("official post", lambda depth=depth, rgb=rgb: official_post(depth, rgb.shape[:2]))
            rec("ours total", lambda: model.predict(path))
            if r == 0:
                pre_err = (x - xo).abs().max().item()
                post_err = float(np.abs(ours - ref).max() / np.abs(ref).max())
            del rgb, xo, ref
    med = lambda d: {k: 1000 * statistics.median(v[1:]) for k, v in d.items()}  # noqa: E731
    return dict(image=meta.image_size, input=meta.input_size, wall=med(wall), cpu=med(cpu),
                pre_err=pre_err, post_err=post_err)


def render(results: list[tuple[str, str, dict]], args) -> str:
    cmd = f"python bench/predict.py --runs {args.runs} --stems {args.stems}"
    lines = [
        "## Image in, depth out: predict vs the official OpenCV pipeline",
        "",
        f"Machine: {machine()}. Command: `{cmd}`.",
        f"Medians of {args.runs} interleaved rounds, wall time (process CPU time in brackets); same model, same process.",
        "`load` = decode to RGB, `pre` = resize + normalise, `post` = depth back to the photo's size.",
        "",
        "| model | photo -> input | forward | ours: load / pre / post | official: load / pre / post | "
        "ours pre+post vs forward | predict total | input diff / depth diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stem, photo, r in results:
        w, c = r["wall"], r["cpu"]
        f = lambda k: f"{w[k]:.0f} ({c[k]:.0f})"  # noqa: E731
        share = (w["ours pre"] + w["ours post"]) / w["forward"]
        lines.append(
            f"| {stem} | {photo} {r['image'][1]}x{r['image'][0]} -> {r['input'][1]}x{r['input'][0]} | {f('forward')} ms | "
            f"{f('ours load')} / {f('ours pre')} / {f('ours post')} ms | "
            f"{f('official load')} / {f('official pre')} / {f('official post')} ms | {100 * share:.1f}% | "
            f"{f('ours total')} ms | {r['pre_err']:.1g} / {r['post_err']:.1g} |")
    lines += ["", "input diff: max |ours - official| of the model input; depth diff: max |ours - official| / max, "
              "both pipelines' post on the same forward output.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stems", default="depth_anything_v2_vits,dpt_beit_base_384")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "predict.md"), help="'' to only print")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "photo_4000x3000.jpg"
        make_12mp(big)
        photos = {"12 MP JPEG": big, "motorcycle_left.jpg": ASSETS / "motorcycle_left.jpg"}
        for stem in args.stems.split(","):
            model = dpt_lab.load_model(save_fixture_checkpoint(stem.strip(), Path(tmp))).eval()
            for name, path in photos.items():
                t0 = time.perf_counter()
                results.append((stem.strip(), name, bench(model, path, args.runs)))
                print(f"{stem} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    write_results(render(results, args), args.out)


if __name__ == "__main__":
    main()
