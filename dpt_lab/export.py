"""ONNX export of a DepthModel, checked against PyTorch before the file is offered.

    report = export_onnx(model, "model.onnx")                       # dynamic batch / height / width
    report = export_onnx(model, "model.onnx", fp16=True)            # float16 weights and compute
    report = export_onnx(model, "model.onnx", with_preprocessing=True)
    print(report.as_text())                                         # or report.as_rows() for a table

    python -m dpt_lab export --model M --out model.onnx [--fixed HxW] [--fp16] [--with-preprocessing]
                             [--opset N] [--no-verify]

The graph (input `image`, output `depth`):

* plain: `image` is a B x 3 x H x W float32 batch, normalized with the model's mean/std,
  H and W multiples of `model.info.tile`; `depth` is B x H x W (what `model(x)` returns).
  Axes `batch`, `height`, `width` are symbolic unless the export is fixed-size.
* with_preprocessing: `image` is one H x W x 3 uint8 RGB picture of any size; the graph
  does what `model.predict` does: computes the official input size from H and W (the
  family's sizing rule: Depth-Anything "lower_bound" to 518, BEiT "minimal" to 384,
  SwinV2 "stretch" to 256, rounded to the family's multiple), resizes with OpenCV's
  INTER_CUBIC arithmetic (the tap positions and weights are computed in the graph the way
  `imaging.resize_bicubic` computes them), normalizes, runs the model and resizes the
  depth back to H x W with the family's rule; `depth` is H x W.

Every family is exported with symbolic sizes: the Depth-Anything position embedding is
resized in the graph (`DinoV2Encoder._position_embedding_graph`), the BEiT relative
position bias is resized and indexed for the grid in the graph, and SwinV2's padding,
shifted-window rolls and masks are computed from the grid in the graph.

Exporter. The TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) is the default:
- it is faster on this code: 2x (DA-v2-S, BEiT-B) to 4x (SwinV2-T) at the native sizes in
  bench/onnx.py, and up to 10x at small sizes (DA-v2-S 1.5 s vs 15 s, SwinV2-T 6 s vs 90 s);
- the preprocessing graph (an output size computed with float64 rounding from the image's
  shape, then used as a shape) is ordinary tensor arithmetic for a tracer, while
  torch.export stops on it (GuardOnDataDependentSymNode: a data-dependent size);
- its weak point, Python values silently frozen at the traced size, is what the
  verification at two other sizes catches (and the encoders keep size arithmetic in
  tensors while tracing; see beit.resize_table, swin2.axis_shifts).
It is deprecated upstream (DeprecationWarning since torch 2.9). `exporter="dynamo"` (the
torch.export-based exporter, opset >= 18) exports the plain model of every family
correctly with symbolic sizes too, slower; it is the way forward if the TorchScript
exporter goes away.

Verification (verify=True): onnx.checker, then onnxruntime (CPU) against PyTorch (CPU,
float32) at the export size and at two sizes never seen while exporting (one of them
non-square, with a batch of 2): max abs error and relative error (max abs error
/ max |reference|), which must be <= 1e-4 (float32) or 1e-2 (float16), and the median
latency of both. A failed check raises VerificationError (its `.report` has the numbers)
and nothing is left at the target path.

Files: one .onnx with the weights inside when they fit the 2 GB protobuf limit; otherwise
a .zip holding NAME.onnx and NAME.onnx.data (external data; unzip both into one folder).
Only one export runs at a time in a process: a second one raises ExportBusyError.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cubic, memory
from .errors import ExportBusyError, ExportError, first_line  # noqa: F401 - export's own names, as before

__all__ = [
    "ExportError", "VerificationError", "ExportBusyError", "ExportReport", "export_onnx",
    "add_subcommand", "run_cli", "EXPORTERS", "FP32_TOLERANCE", "FP16_TOLERANCE",
]

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
MIN_OPSET = {"torchscript": 14, "dynamo": 18}     # 14: scaled_dot_product_attention
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2
#: weights above this go to external data (protobuf refuses messages of 2 GiB; keep a margin)
EMBED_LIMIT_BYTES = 2 ** 31 - 2 ** 26
TIMING_RUNS = 2
BUSY_MESSAGE = "an export is already running; try again when it finishes"

_LOCK = threading.Lock()
_LOG = logging.getLogger(__name__)


class VerificationError(ExportError):
    """The exported graph failed a check; `.report` holds the per-size numbers so far."""

    def __init__(self, message: str, report: Optional["ExportReport"] = None):
        super().__init__(message)
        self.report = report


# -- the report ------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What was written and how it compares with PyTorch.

    `checks` has one dict per verified size: size (h, w) (the image size with
    preprocessing, else the model input size), batch, max_abs, max_rel, ort_ms, torch_ms,
    ok. Empty when verify=False."""

    HEADERS = ("size", "batch", "max abs err", "max rel err", "onnxruntime ms", "PyTorch ms", "ok")

    path: Optional[str]
    size_bytes: int
    opset: int
    dynamic: bool
    fp16: bool
    with_preprocessing: bool
    export_size: tuple[int, int]
    checks: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    exporter: str = "torchscript"
    export_seconds: float = 0.0
    tolerance: float = FP32_TOLERANCE

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def as_rows(self) -> list[list]:
        """One row per checked size, in HEADERS order (for a gr.DataFrame)."""
        rows = []
        for c in self.checks:
            h, w = c["size"]
            rows.append([f"{h}x{w}", int(c["batch"]), float(f"{c['max_abs']:.3g}"), float(f"{c['max_rel']:.3g}"),
                         round(float(c["ort_ms"]), 1), round(float(c["torch_ms"]), 1), "yes" if c["ok"] else "NO"])
        return rows

    def as_text(self) -> str:
        mb = self.size_bytes / 1e6
        h, w = self.export_size
        lines = [
            f"wrote {self.path} ({mb:.1f} MB)" if self.path else "nothing written",
            f"  exporter {self.exporter}, opset {self.opset}, exported in {self.export_seconds:.1f} s",
            f"  {'dynamic' if self.dynamic else 'fixed'} size (traced at {h}x{w}), "
            f"{'float16' if self.fp16 else 'float32'}, "
            f"{'with' if self.with_preprocessing else 'without'} preprocessing",
        ]
        if self.checks:
            lines.append(f"  onnxruntime vs PyTorch (relative error limit {self.tolerance:g}):")
            widths = [max(len(str(v)) for v in col) for col in zip(self.HEADERS, *self.as_rows())]
            for row in [list(self.HEADERS)] + self.as_rows():
                lines.append("    " + "  ".join(str(v).rjust(n) for v, n in zip(row, widths)))
        else:
            lines.append("  not verified (--no-verify)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- graph-side preprocessing (sizes are traced tensors while exporting) -----------------
def _constrain(x: Tensor, m: int, min_val: Optional[int] = None, max_val: Optional[int] = None) -> Tensor:
    """imaging._constrain on float64 tensors: round half to even to a multiple of m."""
    y = torch.round(x / m) * m
    if max_val is not None:
        y = torch.where(y > max_val, torch.floor(x / m) * m, y)
    if min_val is not None:
        y = torch.where(y < min_val, torch.ceil(x / m) * m, y)
    return y


def graph_official_size(height: Tensor, width: Tensor, *, target: int, multiple: int, rule: str) -> tuple[Tensor, Tensor]:
    """imaging.official_size with the image size as 0-dim int64 tensors -> (h, w) int64
    tensors; the same float64 operations, so the same sizes. A size that would round to 0
    (only for extreme aspect ratios under "minimal") becomes one `multiple`."""
    hf, wf = height.to(torch.float64), width.to(torch.float64)
    scale_h, scale_w = target / hf, target / wf
    lo = hi = None
    if rule == "lower_bound":
        scale_h = scale_w = torch.maximum(scale_h, scale_w)
        lo = target
    elif rule == "upper_bound":
        scale_h = scale_w = torch.minimum(scale_h, scale_w)
        hi = target
    elif rule == "minimal":
        scale_h = scale_w = torch.where((1 - scale_w).abs() < (1 - scale_h).abs(), scale_w, scale_h)
    elif rule != "stretch":
        raise ExportError(f"unknown sizing rule {rule!r} in the model info")
    h = _constrain(scale_h * hf, multiple, lo, hi).clamp(min=multiple)
    w = _constrain(scale_w * wf, multiple, lo, hi).clamp(min=multiple)
    return h.to(torch.int64), w.to(torch.int64)


def graph_cubic_taps(n_in: Tensor, n_out: Tensor) -> tuple[Tensor, Tensor]:
    """imaging._cubic_taps as tensor ops: (n_out, 4) int64 source indices and (n_out, 4)
    float32 weights of OpenCV's INTER_CUBIC (a = -0.75, half-pixel, float32 positions)."""
    scale = 1.0 / (n_out.to(torch.float64) / n_in.to(torch.float64))
    pos = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).to(torch.float32)
    base = torch.floor(pos)
    t = pos - base
    weights = torch.stack(cubic.weights(t, opencv=True), dim=1)
    idx = base.to(torch.int64)[:, None] + torch.arange(-1, 3, dtype=torch.int64)[None, :]
    idx = torch.minimum(torch.clamp(idx, min=0), (n_in - 1).to(torch.int64))
    return idx, weights


def _graph_resample(x: Tensor, n_in: Tensor, n_out: Tensor) -> Tensor:
    """Cubic resample along dim 0 of (n_in, A, B) -> (n_out, A, B) float32 (as
    imaging._resample_front: gather the taps, convert, one small matmul per row)."""
    idx, weights = graph_cubic_taps(n_in, n_out)
    g = x.index_select(0, idx.reshape(-1))
    a, b = g.shape[1], g.shape[2]
    g = g.reshape(n_out, 4, a * b).to(torch.float32)
    out = torch.bmm(weights.unsqueeze(1), g)
    return out.reshape(n_out, a, b)


class _Plain(nn.Module):
    """image (B, 3, H, W) -> depth (B, H, W), with optional casts at the edges."""

    def __init__(self, model: nn.Module, compute: torch.dtype, io: torch.dtype):
        super().__init__()
        self.model, self.compute, self.io = model, compute, io

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image.to(self.compute)).to(self.io)


class _Pipeline(nn.Module):
    """image (H, W, 3) uint8 -> depth (H, W): model.predict as one graph."""

    def __init__(self, model: nn.Module, info, base_size: int, compute: torch.dtype, io: torch.dtype):
        super().__init__()
        self.model, self.compute, self.io = model, compute, io
        self.target, self.multiple = int(base_size), int(info.multiple)
        self.rule = info.resize_rule            # the family's default (keep_aspect default)
        self.depth_resize = info.depth_resize
        mean = torch.tensor(info.mean, dtype=torch.float64)
        std = torch.tensor(info.std, dtype=torch.float64)
        # exactly imaging.prepare's gain and bias for uint8 pixels
        self.register_buffer("gain", (1.0 / (255.0 * std)).to(torch.float32).reshape(3, 1, 1), persistent=False)
        self.register_buffer("bias", (-mean / std).to(torch.float32).reshape(3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        height, width = _dim(image, 0), _dim(image, 1)
        h, w = graph_official_size(height, width, target=self.target, multiple=self.multiple, rule=self.rule)
        y = _graph_resample(image, height, h)                         # (h, W, 3)
        y = _graph_resample(y.permute(1, 0, 2), width, w)             # (w, h, 3)
        x = torch.addcmul(self.bias, y.permute(2, 1, 0), self.gain)   # (3, h, w)
        depth = self.model(x.unsqueeze(0).to(self.compute)).to(torch.float32)[:, None]
        if self.depth_resize == "bilinear_align":
            depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=True)
        elif self.depth_resize == "bilinear":
            depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)
        else:
            depth = F.interpolate(depth, size=(height, width), mode="bicubic", align_corners=False)
        return depth[0, 0].to(self.io)


def _dim(t: Tensor, i: int) -> Tensor:
    """Size i of t as a 0-dim int64 tensor (a traced value while exporting)."""
    n = t.shape[i]
    return n if isinstance(n, Tensor) else torch.tensor(n, dtype=torch.int64)


# -- helpers ---------------------------------------------------------------------------
def _parse_size(text) -> tuple[int, int]:
    if isinstance(text, (tuple, list)):
        vals = tuple(text)
    else:
        parts = str(text).lower().replace("×", "x").split("x")
        try:
            vals = tuple(int(p) for p in parts)
        except ValueError:
            raise ExportError(f"size {text!r} is not HxW (e.g. 518x518)") from None
    if len(vals) != 2 or any(int(v) <= 0 for v in vals):
        raise ExportError(f"size {text!r} is not HxW with two positive numbers (e.g. 518x518)")
    return int(vals[0]), int(vals[1])


def _round_to(n: float, m: int) -> int:
    return max(m, int(round(n / m)) * m)


def _test_image(h: int, w: int, seed: int) -> np.ndarray:
    """A deterministic H x W x 3 uint8 picture with structure at every scale (smooth
    blobs, edges and some noise), so resizes are exercised the way photos exercise them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 24), max(2, w // 24), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    stripes = (((yy // 7 + xx // 11) % 2).float() * 0.25)[None]
    img = 0.7 * smooth + stripes + 0.08 * torch.rand(3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _family_notes(info) -> list[str]:
    from .families import FAMILY_SPECS

    spec = FAMILY_SPECS.get(info.family)
    return list(spec.export_notes) if spec else []


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' warnings and log lines (tracer warnings about Python
    values, deprecation notices, missing torchvision ops) during one export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _cpu_float_model(model, dtype: torch.dtype):
    """The model on the CPU in `dtype`: itself when it already is, else a copy (the
    caller's model is never changed)."""
    if model.device.type == "cpu" and model.dtype == dtype:
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()


# -- export ----------------------------------------------------------------------------
def _run_exporter(module: nn.Module, example: Tensor, file: Path, *, exporter: str, opset: int,
                  dynamic: bool, input_axes: dict, output_axes: dict) -> None:
    with _quiet(), torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(
                module, (example,), str(file), dynamo=False, opset_version=opset,
                input_names=["image"], output_names=["depth"], do_constant_folding=True,
                dynamic_axes={"image": input_axes, "depth": output_axes} if dynamic else None,
            )
        else:
            torch.onnx.export(
                module, (example,), str(file), dynamo=True, opset_version=opset,
                input_names=["image"], output_names=["depth"], optimize=True, verbose=False,
                dynamic_shapes=({k: v for k, v in input_axes.items()},) if dynamic else None,
                external_data=True,
            )


def _finish_graph(file: Path, *, input_dims: list, output_dims: list, metadata: dict):
    """Load the exporter's file, write the input / output shapes (axis names where dynamic,
    numbers where fixed: the exporters leave generated names such as 14*((height//14)) or
    none at all on the outputs), add metadata."""
    import onnx

    proto = onnx.load(str(file))
    for values, want in ((proto.graph.input, input_dims), (proto.graph.output, output_dims)):
        shape = values[0].type.tensor_type.shape
        del shape.dim[:]
        for d in want:
            dim = shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = int(d)
    del proto.metadata_props[:]
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    proto.producer_name = "dpt_lab"
    return proto


def _weights_bytes(proto) -> int:
    total = 0
    for t in proto.graph.initializer:
        total += len(t.raw_data) or t.ByteSize()
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                total += len(attr.t.raw_data) or attr.t.ByteSize()
    return total


def _save(proto, folder: Path, stem: str) -> tuple[Path, bool]:
    """Write NAME.onnx into folder, with external data when the weights are too big.
    Returns (model file, external)."""
    import onnx

    model_file = folder / f"{stem}.onnx"
    external = _weights_bytes(proto) >= EMBED_LIMIT_BYTES
    if external:
        onnx.save_model(proto, str(model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{stem}.onnx.data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(model_file))
    return model_file, external


# -- verification ----------------------------------------------------------------------
def _session(model_file: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    # no busy-waiting threads left behind after a run: they would steal the cores from the
    # PyTorch run timed next to it (and from the rest of the process)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # no arena: onnxruntime's would keep the largest checked size's buffers until the
    # session goes (a server's peak memory); plain allocations go back with memory.release
    opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"])


def _check_sizes(export_size, tile: int, dynamic: bool, with_preprocessing: bool) -> list[tuple[tuple[int, int], int]]:
    """(size, batch) pairs to verify: the export size, a non-square one, and another
    one; neither of the last two is the export size. Batch 2 at the non-square size."""
    h, w = export_size
    if not dynamic:
        return [((h, w), 1)]
    if with_preprocessing:
        other = (h, w + max(8, w // 4) + 3) if h == w else (w, h)
        third = (max(8, (3 * h) // 4 + 5), w + 7)
        return [((h, w), 1), (other, 1), (third, 1)]
    other = (h, w + 2 * tile) if h == w else (w, h)
    third = (h + 2 * tile, w + tile)
    return [((h, w), 1), (other, 2), (third, 1)]


def _verify(model_file: Path, reference, info, *, export_size, dynamic: bool, with_preprocessing: bool,
            base_size: int, tolerance: float, io_dtype: torch.dtype, runs: int, report: ExportReport) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(model_file))
    except Exception as exc:  # noqa: BLE001 - any checker complaint fails the export
        raise VerificationError(f"onnx.checker rejected the exported graph: {first_line(exc)}", report) from None
    try:
        session = _session(model_file)
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"onnxruntime cannot load the exported graph: {first_line(exc)}", report) from None

    np_io = np.float16 if io_dtype == torch.float16 else np.float32
    for k, ((h, w), batch) in enumerate(_check_sizes(export_size, info.tile, dynamic, with_preprocessing)):
        if with_preprocessing:
            image = _test_image(h, w, seed=k + 1)
            feed = {"image": image}

            def torch_run(image=image):
                return reference.predict(image, base_size=base_size)
        else:
            g = torch.Generator().manual_seed(k + 1)
            x = torch.randn(batch, 3, h, w, generator=g)
            feed = {"image": x.numpy().astype(np_io)}

            def torch_run(x=x):
                with torch.inference_mode():
                    return reference(x).numpy()

        label = f"{h}x{w}" + (f" (batch {batch})" if batch > 1 else "")
        memory.release()           # the last size's buffers, before this one's
        t0 = time.perf_counter()
        try:
            got = session.run(None, feed)[0]
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"onnxruntime failed at {label}: {first_line(exc)}", report) from None
        ort_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = np.asarray(torch_run(), dtype=np.float32)
        torch_first = time.perf_counter() - t0
        if got.shape != ref.shape:
            raise VerificationError(f"at {label} the graph returned shape {tuple(got.shape)}, PyTorch "
                                    f"{tuple(ref.shape)}", report)
        got = got.astype(np.float32)
        max_abs = float(np.max(np.abs(got - ref))) if got.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        if not np.all(np.isfinite(got)):
            max_rel = max_abs = math.inf
        ort_t, torch_t = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, feed)
            ort_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch_run()
            torch_t.append(time.perf_counter() - t0)
        ok = max_rel <= tolerance
        report.checks.append({"size": (h, w), "batch": batch, "max_abs": max_abs, "max_rel": max_rel,
                              "ort_ms": 1000 * statistics.median(ort_t or [ort_first]),
                              "torch_ms": 1000 * statistics.median(torch_t or [torch_first]),
                              "ok": ok})
        if not ok:
            raise VerificationError(f"onnxruntime differs from PyTorch at {label}: max abs error {max_abs:.3g}, "
                                    f"relative {max_rel:.3g} > {tolerance:g}", report)


# -- the entry point -------------------------------------------------------------------
def export_onnx(model, path, *, dynamic: bool = True, fp16: bool = False, with_preprocessing: bool = False,
                opset: Optional[int] = None, verify: bool = True, size=None, base_size: Optional[int] = None,
                fp16_io: bool = False, exporter: str = "torchscript", timing_runs: int = TIMING_RUNS) -> ExportReport:
    """Export `model` (a DepthModel) to ONNX at `path`; see the module docstring.

    size: the size traced (and the fixed size when dynamic=False): the model input (H, W),
      multiples of model.info.tile; with preprocessing the image size. Default: the
      official input size for a square base_size image (518x518, 384x384, 256x256), or a
      base_size x base_size image with preprocessing.
    base_size: the processing size (default the model's): with preprocessing, the size the
      graph resizes images to (as model.predict(image, base_size)); it also sets the
      default `size` (base x base, rounded to the tile without preprocessing).
    fp16: float16 weights and compute; `image` / `depth` stay float32 unless fp16_io.
    exporter: "torchscript" (default) or "dynamo" (plain model only).
    timing_runs: timed runs per checked size after the checking run (their median is
      reported); 0 reports the checking run's own time.
    Returns an ExportReport; raises ExportBusyError, ExportError, VerificationError.
    """
    from .model import DepthModel

    if not isinstance(model, DepthModel):
        raise ExportError(f"expected a DepthModel (dpt_lab.load_model), got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ExportError("exporter='dynamo' needs the onnxscript package (pip install onnxscript); "
                          "the default exporter does not")
    if with_preprocessing and exporter != "torchscript":
        raise ExportError("with_preprocessing needs exporter='torchscript' (the sizes it computes from the image "
                          "are data-dependent for torch.export)")
    opset = DEFAULT_OPSET[exporter] if opset is None else int(opset)
    top = torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET if exporter == "torchscript" \
        else torch.onnx._constants.ONNX_MAX_OPSET
    if not MIN_OPSET[exporter] <= opset <= top:
        raise ExportError(f"opset {opset} is not supported by the {exporter} exporter; use {MIN_OPSET[exporter]} to {top}")
    info = model.info
    tile = int(info.tile)
    base = int(base_size or info.base_size)
    if base < tile:
        raise ExportError(f"base size {base} is smaller than the model's tile {tile}")
    if size is None:
        size = (base, base) if with_preprocessing else (_round_to(base, tile), _round_to(base, tile))
    export_size = _parse_size(size)
    if not with_preprocessing and (export_size[0] % tile or export_size[1] % tile):
        raise ExportError(f"export size {export_size[0]}x{export_size[1]}: height and width must be multiples of "
                          f"{tile} for this model")
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {target}: folder {target.parent} does not exist")
    if target.is_dir():
        raise ExportError(f"cannot write {target}: it is a folder")

    if not _LOCK.acquire(blocking=False):
        raise ExportBusyError(BUSY_MESSAGE)
    work = None
    try:
        compute = torch.float16 if fp16 else torch.float32
        io = torch.float16 if (fp16 and fp16_io) else torch.float32
        reference = _cpu_float_model(model, torch.float32)
        exported = _cpu_float_model(model, compute)
        if with_preprocessing:
            module = _Pipeline(exported, info, base, compute, io).eval()
            example = torch.from_numpy(_test_image(*export_size, seed=0))
            input_axes, output_axes = {0: "height", 1: "width"}, {0: "height", 1: "width"}
        else:
            module = _Plain(exported, compute, io).eval()
            example = torch.randn(1, 3, *export_size, generator=torch.Generator().manual_seed(0)).to(io)
            input_axes, output_axes = {0: "batch", 2: "height", 3: "width"}, {0: "batch", 1: "height", 2: "width"}

        work = Path(tempfile.mkdtemp(prefix=".dpt_lab_export_", dir=target.parent))
        raw = work / "raw" / "model.onnx"
        raw.parent.mkdir()
        t0 = time.perf_counter()
        try:
            _run_exporter(module, example, raw, exporter=exporter, opset=opset, dynamic=dynamic,
                          input_axes=input_axes, output_axes=output_axes)
        except Exception as exc:  # noqa: BLE001 - any exporter failure is reported in one line
            raise ExportError(f"the {exporter} exporter failed on {info.family} {info.size}: {first_line(exc)}") from None
        export_seconds = time.perf_counter() - t0

        from . import __version__

        metadata = {
            "dpt_lab_version": __version__, "family": info.family, "model_size": info.size, "name": info.name,
            "depth_kind": info.depth_kind, "tile": tile, "mean": list(info.mean), "std": list(info.std),
            "base_size": base, "resize_rule": info.resize_rule, "depth_resize": info.depth_resize,
            "with_preprocessing": with_preprocessing, "fp16": fp16, "exporter": exporter,
        }
        h, w = export_size
        if with_preprocessing:
            input_dims, output_dims = (["height", "width", 3], ["height", "width"]) if dynamic else ([h, w, 3], [h, w])
        else:
            input_dims, output_dims = ((["batch", 3, "height", "width"], ["batch", "height", "width"]) if dynamic
                                       else ([1, 3, h, w], [1, h, w]))
        proto = _finish_graph(raw, input_dims=input_dims, output_dims=output_dims, metadata=metadata)
        shutil.rmtree(raw.parent)
        final_dir = work / "final"
        final_dir.mkdir()
        model_file, external = _save(proto, final_dir, target.stem or "model")
        del proto
        memory.release()           # the exporter's graph copies, before onnxruntime loads the file

        report = ExportReport(
            path=None, size_bytes=0, opset=opset, dynamic=dynamic, fp16=fp16, with_preprocessing=with_preprocessing,
            export_size=export_size, exporter=exporter, export_seconds=export_seconds,
            tolerance=FP16_TOLERANCE if fp16 else FP32_TOLERANCE,
        )
        report.notes += _describe_io(info, dynamic, with_preprocessing, fp16, fp16_io, base, export_size)
        if dynamic:
            report.notes += _family_notes(info)
        if verify:
            if timing_runs <= 0:
                report.notes.append("latencies are single first runs (timing_runs=0), warm-up included")
            _verify(model_file, reference, info, export_size=export_size, dynamic=dynamic,
                    with_preprocessing=with_preprocessing, base_size=base, tolerance=report.tolerance,
                    io_dtype=io, runs=timing_runs, report=report)
        if not dynamic:
            report.notes.append(f"fixed size: the graph only accepts {export_size[0]}x{export_size[1]}"
                                + (" images" if with_preprocessing else " inputs"))

        if external:
            final = target.with_suffix(".zip")
            packed = work / final.name
            with zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for f in sorted(final_dir.iterdir()):
                    zf.write(f, arcname=f.name)
            os.replace(packed, final)
            report.notes.append(f"weights over 2 GB: {final.name} holds {model_file.name} and its external data "
                                f"{model_file.name}.data; unzip both into one folder")
        else:
            final = target
            os.replace(model_file, final)
        report.path = str(final)
        report.size_bytes = final.stat().st_size
        return report
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        _LOCK.release()


def _describe_io(info, dynamic, with_preprocessing, fp16, fp16_io, base, export_size) -> list[str]:
    io_name = "float16" if (fp16 and fp16_io) else "float32"
    h, w = ("height", "width") if dynamic else export_size
    notes = []
    if with_preprocessing:
        resize = {"bilinear_align": "bilinear (align_corners=True)", "bilinear": "bilinear",
                  "bicubic": "bicubic"}[info.depth_resize]
        notes.append(f"input image: uint8 [{h}, {w}, 3] RGB; resized to the {info.resize_rule} size for {base} "
                     f"(multiples of {info.multiple}, OpenCV cubic), normalized with mean {tuple(info.mean)} std "
                     f"{tuple(info.std)}")
        notes.append(f"output depth: {io_name} [{h}, {w}], {info.depth_kind}, resized back with {resize}")
    else:
        b = "batch" if dynamic else 1
        notes.append(f"input image: {io_name} [{b}, 3, {h}, {w}], normalized with mean {tuple(info.mean)} std "
                     f"{tuple(info.std)}; height and width multiples of {info.tile}")
        notes.append(f"output depth: {io_name} [{b}, {h}, {w}], {info.depth_kind}")
    if fp16 and with_preprocessing:
        notes.append("model weights and compute in float16; the image resize, normalization and depth resize in float32")
    elif fp16:
        notes.append("weights and compute in float16" + ("" if fp16_io else "; casts to/from float32 at the edges"))
    return notes


# -- command line ----------------------------------------------------------------------
def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `export` on an argparse subparsers object; sets func=run_cli."""
    p = subparsers.add_parser(
        "export", help="export a model to ONNX and check it against PyTorch",
        description="Export a DPT model to ONNX (input `image`, output `depth`), then check it with onnx.checker "
                    "and onnxruntime against PyTorch at three sizes. Dynamic batch/height/width unless --fixed.")
    p.add_argument("--model", required=True, help="checkpoint file, -hf folder, local name or known model name")
    p.add_argument("--out", required=True, help="the .onnx file to write (a .zip when the weights exceed 2 GB)")
    p.add_argument("--fixed", default=None, metavar="HxW", help="fixed-size graph for this input (image) size")
    p.add_argument("--size", default=None, metavar="HxW", help="size to trace a dynamic graph at (default: the model's)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and compute (input/output stay float32)")
    p.add_argument("--fp16-io", action="store_true", help="with --fp16: float16 input and output too")
    p.add_argument("--with-preprocessing", action="store_true",
                   help="the graph takes an H x W x 3 uint8 RGB image and returns H x W depth")
    p.add_argument("--base-size", type=int, default=None,
                   help="processing size (default the model's): with --with-preprocessing the size images are "
                        "resized to; also the default traced size")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 18 with --exporter dynamo)")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript", help="which torch.onnx exporter")
    p.add_argument("--no-verify", action="store_true", help="skip the onnx.checker / onnxruntime comparison")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    from .checkpoints import load_model

    if args.fixed and args.size:
        raise ExportError("give --fixed or --size, not both")
    if args.fp16_io and not args.fp16:
        raise ExportError("--fp16-io needs --fp16")
    model = load_model(args.model)
    report = export_onnx(
        model, args.out, dynamic=not args.fixed, fp16=args.fp16, with_preprocessing=args.with_preprocessing,
        opset=args.opset, verify=not args.no_verify, size=args.fixed or args.size, base_size=args.base_size,
        fp16_io=args.fp16_io, exporter=args.exporter,
    )
    print(report.as_text())
    return 0
