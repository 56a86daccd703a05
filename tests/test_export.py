"""ONNX export (dpt_lab/export.py): every family exports with symbolic sizes and matches
PyTorch in onnxruntime at sizes never seen while exporting; the preprocessing graph matches
model.predict; fp16; the busy lock; a failed verification leaves no file; the CLI.

The synthesized fixtures have the real layouts (ViT-S, BEiT-B, SwinV2-T) with random
weights; inputs are kept small (a few tokens per side) so the whole file runs in about
a minute on two cores."""

import argparse
import threading
import time
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fixtures import FixtureModels, save_fixture_checkpoint

from dpt_lab import export, imaging
from dpt_lab.errors import DPTLabError
from dpt_lab.export import ExportBusyError, ExportError, ExportReport, VerificationError, export_onnx

# family -> (fixture, export size, an unseen non-square size)
CASES = {
    "depth_anything_v2": ("depth_anything_v2_vits", (42, 56), (28, 70)),
    "midas_beit": ("dpt_beit_base_384", (32, 48), (80, 48)),
    "midas_swin2": ("dpt_swin2_tiny_256", (64, 96), (160, 96)),   # 40x24 stage grid: padding + both shifts
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for PyTorch and onnxruntime (export.py gives onnxruntime
    torch's count): on a small, shared machine two spinning pools per process make the
    reference runs many times slower; the numbers compared do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    """family -> its CASES fixture model, loaded on first use."""
    load = FixtureModels(checkpoint_dir)
    return lambda family: load(CASES[family][0])


@pytest.fixture(scope="module")
def da_checkpoint(tmp_path_factory):
    return save_fixture_checkpoint("depth_anything_v2_vits", tmp_path_factory.mktemp("da"))


def session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def rel_err(got, ref):
    return float(np.abs(np.asarray(got, np.float32) - ref).max() / np.abs(ref).max())


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def torch_depth(model, x):
    with torch.inference_mode():
        return model(x).numpy()


@pytest.mark.parametrize("family", sorted(CASES))
def test_dynamic_export_matches_pytorch_at_unseen_sizes(family, models, tmp_path):
    model = models(family)
    _, size, unseen = CASES[family]
    out = tmp_path / f"{family}.onnx"
    report = export_onnx(model, out, size=size, timing_runs=0)

    assert report.path == str(out) and out.is_file() and report.size_bytes == out.stat().st_size
    assert (report.dynamic, report.fp16, report.with_preprocessing, report.export_size) == (True, False, False, size)
    assert len(report.checks) == 3 and all(c["ok"] and c["max_rel"] <= 1e-4 for c in report.checks)
    assert report.checks[0]["size"] == size
    assert any(c["batch"] == 2 for c in report.checks)
    assert all(c["size"][0] != c["size"][1] for c in report.checks[:2])      # export size and a non-square one

    proto = onnx.load(str(out), load_external_data=False)
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert (inp.name, outp.name) == ("image", "depth")
    assert dims(inp) == ["batch", 3, "height", "width"]
    assert dims(outp) == ["batch", "height", "width"]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["family"] == family and meta["tile"] == str(model.info.tile)

    sess = session(out)
    g = torch.Generator().manual_seed(7)
    for h, w in (size, unseen):
        x = torch.randn(1, 3, h, w, generator=g)
        got = sess.run(None, {"image": x.numpy()})[0]
        ref = torch_depth(model, x)
        assert got.shape == ref.shape == (1, h, w)
        assert rel_err(got, ref) <= 1e-4, (family, (h, w), rel_err(got, ref))


@pytest.mark.parametrize("family, base, image_sizes", [
    ("depth_anything_v2", 42, [(45, 61), (37, 91)]),       # lower_bound, depth bilinear align_corners=True
    ("midas_swin2", 64, [(50, 77), (83, 41)]),             # stretch, depth bicubic
])
def test_preprocessing_graph_matches_predict(family, base, image_sizes, models, tmp_path):
    """The graph resizes a uint8 image with the same cubic taps as imaging.prepare (computed
    from the image size inside the graph), so it agrees with model.predict to float32
    summation order: the fp32 limit (1e-4 relative) holds, no looser tolerance needed."""
    model = models(family)
    out = tmp_path / "pipe.onnx"
    report = export_onnx(model, out, with_preprocessing=True, base_size=base, size=image_sizes[0], timing_runs=0)
    assert report.with_preprocessing and len(report.checks) == 3 and report.ok

    proto = onnx.load(str(out), load_external_data=False)
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert dims(inp) == ["height", "width", 3] and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims(outp) == ["height", "width"]

    sess = session(out)
    rng = np.random.default_rng(3)
    for h, w in image_sizes:
        smooth = np.kron(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
        image = np.clip(smooth + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        got = sess.run(None, {"image": image})[0]
        ref = model.predict(image, base_size=base)
        assert got.shape == ref.shape == (h, w)
        assert rel_err(got, ref) <= 1e-4, ((h, w), rel_err(got, ref))


@pytest.mark.parametrize("rule", imaging.RULES)
def test_graph_sizes_and_taps_equal_imaging(rule):
    """The in-graph sizing rule and cubic taps are the imaging functions, value for value."""
    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 3000, (200, 2))] + [(518, 518), (259, 777), (1, 4000)]
    for target, multiple in ((518, 14), (384, 32), (256, 32)):
        for h, w in sizes:
            want = imaging.official_size(h, w, target=target, multiple=multiple, rule=rule)
            want = tuple(max(multiple, v) for v in want)   # the graph never returns a 0 size
            got = export.graph_official_size(torch.tensor(h), torch.tensor(w), target=target, multiple=multiple, rule=rule)
            assert tuple(int(v) for v in got) == want, (h, w, target, rule)
    for n_in, n_out in ((1, 5), (1000, 518), (37, 518), (518, 518), (3, 2), (4000, 14)):
        idx, weights = export.graph_cubic_taps(torch.tensor(n_in), torch.tensor(n_out))
        ref_idx, ref_w = imaging._cubic_taps(n_in, n_out)
        assert torch.equal(idx.reshape(-1), ref_idx)
        assert torch.equal(weights, ref_w)


def test_fp16_export(models, tmp_path):
    model = models("depth_anything_v2")
    out = tmp_path / "half.onnx"
    report = export_onnx(model, out, fp16=True, size=(42, 56), timing_runs=0)
    assert report.fp16 and report.tolerance == 1e-2 and report.ok
    proto = onnx.load(str(out), load_external_data=False)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT      # float32 I/O
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    by_type = {}
    for t in proto.graph.initializer:
        by_type[t.data_type] = by_type.get(t.data_type, 0) + len(t.raw_data)
    # every weight in half; the one float32 table is the position embedding, resized in
    # float32 as in PyTorch before its cast to half
    assert by_type[onnx.TensorProto.FLOAT16] > 0.95 * sum(by_type.values())
    assert report.size_bytes < 0.6 * 4 * sum(p.numel() for p in model.parameters())        # half-size weights
    x = torch.randn(1, 3, 70, 28, generator=torch.Generator().manual_seed(1))
    got = session(out).run(None, {"image": x.numpy()})[0]
    err = rel_err(got, torch_depth(model, x))
    assert 0 < err <= 1e-2, err                                                          # really computed in half
    assert model.dtype == torch.float32                                                  # caller's model untouched


def test_second_concurrent_export_is_refused(models, tmp_path, monkeypatch):
    model = models("depth_anything_v2")
    entered, release = threading.Event(), threading.Event()
    real = export._run_exporter

    def slow_exporter(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "_run_exporter", slow_exporter)
    result = {}

    def first():
        try:
            result["report"] = export_onnx(model, tmp_path / "first.onnx", size=(28, 28), verify=False)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(30)
        start = time.perf_counter()
        with pytest.raises(ExportBusyError, match="^an export is already running; try again when it finishes$"):
            export_onnx(model, tmp_path / "second.onnx", size=(28, 28), verify=False)
        assert time.perf_counter() - start < 1.0                  # refused at once, not queued
    finally:
        release.set()
        thread.join(60)
    assert "error" not in result, result.get("error")
    assert (tmp_path / "first.onnx").is_file() and not (tmp_path / "second.onnx").exists()
    assert isinstance(ExportBusyError("x"), DPTLabError)
    assert not export._LOCK.locked()


def _corrupt_weights(proto):
    conv = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    arr = onnx.numpy_helper.to_array(conv) * 1.5
    conv.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), conv.name))
    return proto


def _break_graph(proto):
    proto.graph.node[0].op_type = "NoSuchOperator"
    return proto


@pytest.mark.parametrize("damage, message", [(_corrupt_weights, "differs from PyTorch"), (_break_graph, "onnx.checker")])
def test_failed_verification_raises_and_leaves_no_file(damage, message, models, tmp_path, monkeypatch):
    model = models("depth_anything_v2")
    real = export._finish_graph
    monkeypatch.setattr(export, "_finish_graph", lambda *a, **k: damage(real(*a, **k)))
    out = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError, match=message) as info:
        export_onnx(model, out, size=(28, 28), timing_runs=0)
    assert isinstance(info.value, ExportError) and isinstance(info.value, DPTLabError)
    assert "\n" not in str(info.value)
    if message == "differs from PyTorch":
        assert "max abs error" in str(info.value)
        bad = info.value.report.checks[-1]
        assert not bad["ok"] and bad["max_rel"] > 1e-4
    assert list(tmp_path.iterdir()) == []                  # neither the file nor the work folder
    assert not export._LOCK.locked()


def test_over_2gb_goes_to_a_zip_with_external_data(models, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "EMBED_LIMIT_BYTES", 1)     # pretend the weights are too big to embed
    model = models("depth_anything_v2")
    report = export_onnx(model, tmp_path / "big.onnx", dynamic=False, size=(28, 42), timing_runs=0)
    assert report.path == str(tmp_path / "big.zip") and not (tmp_path / "big.onnx").exists()
    assert report.ok and len(report.checks) == 1 and any("external data" in n for n in report.notes)
    with zipfile.ZipFile(report.path) as zf:
        assert sorted(zf.namelist()) == ["big.onnx", "big.onnx.data"]
        zf.extractall(tmp_path / "unz")
    assert (tmp_path / "unz" / "big.onnx").stat().st_size < 1_000_000          # the graph only
    x = torch.randn(1, 3, 28, 42, generator=torch.Generator().manual_seed(2))
    got = session(tmp_path / "unz" / "big.onnx").run(None, {"image": x.numpy()})[0]
    assert rel_err(got, torch_depth(model, x)) <= 1e-4


def test_dynamo_exporter_also_works(models, tmp_path):
    """The torch.export-based exporter is the alternative (slower); it must stay correct."""
    model = models("depth_anything_v2")
    out = tmp_path / "dyn.onnx"
    report = export_onnx(model, out, exporter="dynamo", size=(28, 42), verify=False)
    assert report.exporter == "dynamo" and report.opset == 18 and report.checks == []
    proto = onnx.load(str(out))
    assert dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(proto.graph.output[0]) == ["batch", "height", "width"]
    sess = session(out)
    for shape in ((1, 3, 28, 42), (2, 3, 56, 28)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
        assert rel_err(sess.run(None, {"image": x.numpy()})[0], torch_depth(model, x)) <= 1e-4


def test_bad_options_are_one_line_errors(models, tmp_path):
    model = models("depth_anything_v2")
    cases = [
        (dict(size=(30, 42)), "multiples of 14"),
        (dict(opset=9), "opset 9"),
        (dict(exporter="onnx2"), "unknown exporter"),
        (dict(with_preprocessing=True, exporter="dynamo"), "with_preprocessing needs"),
        (dict(size="big"), "not HxW"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ExportError, match=message) as info:
            export_onnx(model, tmp_path / "x.onnx", **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "x.onnx")
    with pytest.raises(ExportError, match="DepthModel"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_dynamo_without_onnxscript_is_one_clear_error(models, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ExportError, match="needs the onnxscript package"):
        export_onnx(models("depth_anything_v2"), tmp_path / "x.onnx", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


def test_report_rows_and_text():
    report = ExportReport(path="m.onnx", size_bytes=2_500_000, opset=17, dynamic=True, fp16=False,
                          with_preprocessing=False, export_size=(518, 518), notes=["hello"])
    report.checks.append({"size": (518, 518), "batch": 1, "max_abs": 1.234e-6, "max_rel": 5.6e-7,
                          "ort_ms": 12.345, "torch_ms": 20.0, "ok": True})
    rows = report.as_rows()
    assert len(ExportReport.HEADERS) == len(rows[0]) == 7
    assert rows == [["518x518", 1, 1.23e-06, 5.6e-07, 12.3, 20.0, "yes"]]
    text = report.as_text()
    assert "m.onnx (2.5 MB)" in text and "opset 17" in text and "note: hello" in text and "518x518" in text


def test_cli_writes_the_file_and_prints_the_report(da_checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="dpt_lab")
    export.add_subcommand(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.onnx"
    args = parser.parse_args(["export", "--model", str(da_checkpoint), "--out", str(out), "--fixed", "28x42"])
    assert args.func is export.run_cli
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "fixed size" in printed and "28x42" in printed and "yes" in printed
    proto = onnx.load(str(out), load_external_data=False)
    assert dims(proto.graph.input[0]) == [1, 3, 28, 42] and dims(proto.graph.output[0]) == [1, 28, 42]

    args = parser.parse_args(["export", "--model", str(da_checkpoint), "--out", str(out), "--fixed", "28x40"])
    with pytest.raises(ExportError, match="multiples of 14"):
        args.func(args)
