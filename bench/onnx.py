"""ONNX export benchmark: export time, file size, onnxruntime vs PyTorch latency.

    python bench/onnx.py [--layouts vits] [--size 518] [--runs 5] [--exports 3] [--no-fp16]
                         [--no-preprocessing] [--dynamo] [--threads N] [--out bench/results/onnx.md]

For each layout (tests/fixtures.py: the official layout with deterministic random
weights; speed does not depend on the values), in one process:

  export      export_onnx(model, ..., verify=False), dynamic sizes, TorchScript exporter:
              the exporter's own time and the whole call (graph naming, saving), median
              of --exports; the file size
  fp32        the graph on a real photo preprocessed at --size (assets/astronaut.jpg,
              512 x 512: 518 x 518 for Depth-Anything; BEiT and SwinV2 use their own
              base size) against model(x), interleaved round by round, median of --runs
  fp16        the same with fp16=True (float16 weights and compute, float32 I/O)
  pipeline    with_preprocessing=True on the photo's uint8 pixels against model.predict
  dynamo      (with --dynamo) one export with the torch.export-based exporter, for the
              exporter choice documented in dpt_lab/export.py

Errors are onnxruntime vs PyTorch float32 (max abs error / max |reference|). onnxruntime
gets the same number of intra-op threads as PyTorch and does not spin between runs.
Writes a Markdown section to --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import interleaved, machine, median_ms  # noqa: E402  (sets sys.path)

# this file is bench/onnx.py: with bench/ first on sys.path, `import onnx` (in the exporter)
# would find this script instead of the onnx package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from fixtures import save_fixture_checkpoint  # noqa: E402

import dpt_lab  # noqa: E402
from dpt_lab import export, imaging  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "astronaut.jpg"
STEMS = {
    "vits": ("depth_anything_v2_vits", "DA-v2 ViT-S"),
    "vitb": ("depth_anything_v2_vitb", "DA-v2 ViT-B"),
    "vitl": ("depth_anything_v2_vitl", "DA-v2 ViT-L"),
    "beit": ("dpt_beit_base_384", "MiDaS BEiT-B 384"),
    "swin2": ("dpt_swin2_tiny_256", "MiDaS SwinV2-T 256"),
}


def rel_err(got, ref) -> float:
    ref = np.asarray(ref, np.float32)
    return float(np.abs(np.asarray(got, np.float32) - ref).max() / np.abs(ref).max())


def bench_layout(key: str, args, folder: Path) -> dict:
    stem, title = STEMS[key]
    model = dpt_lab.load_model(save_fixture_checkpoint(stem, folder))
    base = args.size if model.info.family.startswith("depth_anything") else model.info.base_size
    rgb = imaging.load_image(PHOTO)
    x, meta = model.preprocess(rgb, base_size=base)
    h, w = meta.input_size
    out = {"key": key, "title": title, "input": (h, w), "photo": meta.image_size, "rows": []}

    # export time (the exporter alone, and the whole call), median of --exports
    calls, exporter_s = [], []
    path = folder / f"{key}.onnx"
    for _ in range(args.exports):
        t0 = time.perf_counter()
        report = export.export_onnx(model, path, size=(h, w), verify=False)
        calls.append(time.perf_counter() - t0)
        exporter_s.append(report.export_seconds)
    out["export_s"] = statistics.median(exporter_s)
    out["export_call_s"] = statistics.median(calls)
    out["mb"] = report.size_bytes / 1e6
    out["opset"] = report.opset

    def compare(name: str, onnx_path: Path, feed: dict, torch_fn, size_mb: float):
        sess = export._session(onnx_path)
        got = sess.run(None, feed)[0]
        err = rel_err(got, torch_fn())
        times = interleaved({"onnxruntime": lambda s=sess: s.run(None, feed), "PyTorch": torch_fn}, runs=args.runs)
        ort_ms, torch_ms = median_ms(times["onnxruntime"]), median_ms(times["PyTorch"])
        out["rows"].append({"name": name, "mb": size_mb, "err": err, "ort_ms": ort_ms, "torch_ms": torch_ms})
        print(f"{title} {name}: onnxruntime {ort_ms:.1f} ms, PyTorch {torch_ms:.1f} ms, rel err {err:.2g}", flush=True)
        del sess

    def torch_forward():
        with torch.inference_mode():
            return model(x).numpy()

    compare("fp32", path, {"image": x.numpy()}, torch_forward, out["mb"])
    if args.fp16:
        half = folder / f"{key}-fp16.onnx"
        r = export.export_onnx(model, half, size=(h, w), fp16=True, verify=False)
        compare("fp16 (float32 I/O)", half, {"image": x.numpy()}, torch_forward, r.size_bytes / 1e6)
    if args.preprocessing:
        pipe = folder / f"{key}-pre.onnx"
        r = export.export_onnx(model, pipe, size=meta.image_size, with_preprocessing=True, base_size=base, verify=False)
        compare("with preprocessing (uint8 photo -> depth at photo size)", pipe, {"image": rgb},
                lambda: model.predict(rgb, base_size=base), r.size_bytes / 1e6)
    if args.dynamo:
        t0 = time.perf_counter()
        r = export.export_onnx(model, folder / f"{key}-dynamo.onnx", size=(h, w), verify=False, exporter="dynamo")
        out["dynamo_s"] = r.export_seconds
        out["dynamo_call_s"] = time.perf_counter() - t0
    return out


def render(results: list[dict], args) -> str:
    cmd = "python bench/onnx.py " + " ".join(sys.argv[1:])
    lines = [
        "## ONNX export",
        "",
        f"Machine: {machine()}. onnxruntime: CPUExecutionProvider, same thread count, no spinning. "
        f"Load average (1 min) at start / end: {args.load[0]:.1f} / {os.getloadavg()[0]:.1f} "
        f"(a shared machine: compare numbers within one run).",
        f"Command: `{cmd.strip()}`. Median of {args.runs} interleaved runs (latency) and of {args.exports} "
        f"exports (export time). Layouts from tests/fixtures.py (random weights, real shapes); input "
        f"`assets/{PHOTO.name}` preprocessed.",
        "",
        "| layout | input | exporter s (call s) | file MB | graph | onnxruntime ms | PyTorch ms | PyTorch / onnxruntime | rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        h, w = r["input"]
        export_cell = f"{r['export_s']:.1f} ({r['export_call_s']:.1f})"
        for i, row in enumerate(r["rows"]):
            lead = [r["title"], f"{h}x{w}", export_cell] if i == 0 else ["", "", ""]
            cells = lead + [f"{row['mb']:.1f}", row["name"], f"{row['ort_ms']:.0f}", f"{row['torch_ms']:.0f}",
                            f"{row['torch_ms'] / row['ort_ms']:.2f}x", f"{row['err']:.1e}"]
            lines.append("| " + " | ".join(cells) + " |")
    dyn = [r for r in results if "dynamo_s" in r]
    if dyn:
        lines += ["", "Exporter choice (one export each, same layout and size): " + "; ".join(
            f"{r['title']}: TorchScript {r['export_s']:.1f} s vs torch.export-based (dynamo=True) "
            f"{r['dynamo_s']:.1f} s ({r['dynamo_s'] / r['export_s']:.1f}x)" for r in dyn) + "."]
    lines += ["", "The exported graphs have symbolic batch / height / width; the rows with preprocessing take the "
              "photo's uint8 pixels and return depth at the photo's size (model.predict in PyTorch).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="vits", help=f"comma-separated: {', '.join(STEMS)}")
    ap.add_argument("--size", type=int, default=518, help="Depth-Anything base size (others use their own)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--exports", type=int, default=3)
    ap.add_argument("--no-fp16", dest="fp16", action="store_false")
    ap.add_argument("--no-preprocessing", dest="preprocessing", action="store_false")
    ap.add_argument("--dynamo", action="store_true", help="also time one dynamo=True export")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx.md"))
    args = ap.parse_args()
    if args.runs < 3:
        ap.error("--runs must be at least 3")
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.layouts.split(",") if k.strip()]
    unknown = [k for k in keys if k not in STEMS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; expected {', '.join(STEMS)}")
    args.load = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            results.append(bench_layout(key, args, Path(tmp)))
    text = render(results, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
