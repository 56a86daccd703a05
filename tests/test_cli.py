"""`python -m dpt_lab`: help, the depth subcommand's files, dispatch to the other tools,
and bad input ending in one `error:` line on stderr with a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures import save_fixture_checkpoint
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "chelsea.jpg"          # 451 x 300


def run(*args, cwd=None, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dpt_lab", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_fixture_checkpoint("depth_anything_v2_vits", tmp_path_factory.mktemp("cli_weights"))


def test_help_lists_every_subcommand():
    r = run("--help")
    assert r.returncode == 0 and r.stderr == ""
    for name in ("depth", "attention", "norms", "fusion"):
        assert name in r.stdout
    r = run("depth", "--help")
    assert r.returncode == 0 and "--png16" in r.stdout and "--npy" in r.stdout and "--base-size" in r.stdout


def test_no_subcommand_is_a_usage_error():
    from dpt_lab import cli

    assert cli.main([]) == 2


def test_depth_writes_colour_16bit_and_npy(checkpoint, tmp_path, capsys):
    from dpt_lab import cli, imaging, load_model

    out = tmp_path / "cat.png"
    rc = cli.main(["depth", str(ASSET), "--model", str(checkpoint), "--out", str(out), "--png16", "--npy",
                   "--base-size", "140", "--cmap", "viridis"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "inverse depth (relative)" in printed and "cat_16bit.png" in printed
    assert Image.open(out).size == (451, 300)
    depth = np.load(tmp_path / "cat.npy")
    want = load_model(checkpoint).predict(str(ASSET), base_size=140)
    assert depth.dtype == np.float32 and depth.shape == (300, 451)
    np.testing.assert_allclose(depth, want, rtol=0, atol=1e-5)
    arr, lo, hi = imaging.read_png16(tmp_path / "cat_16bit.png")
    np.testing.assert_allclose(imaging.png16_to_depth(arr, lo, hi), depth, rtol=0, atol=(hi - lo) / 65535 + 1e-6)
    # explicit paths and the colour bar
    rc = cli.main(["depth", str(ASSET), "--model", str(checkpoint), "--out", str(tmp_path / "bar.png"),
                   "--npy", str(tmp_path / "d.npy"), "--colorbar", "--base-size", "140", "--stretch"])
    assert rc == 0 and (tmp_path / "d.npy").is_file()
    assert Image.open(tmp_path / "bar.png").size[1] > 300


def test_other_subcommands_run_through_the_cli(checkpoint, tmp_path, capsys):
    from dpt_lab import cli

    assert cli.main(["fusion", str(ASSET), "--model", str(checkpoint), "--scales", "1,0.5,0,1",
                     "--base-size", "140", "--out", str(tmp_path / "f.png")]) == 0      # run_cli returns None
    assert Image.open(tmp_path / "f.png").size == (451, 300)
    assert cli.main(["attention", str(ASSET), "--model", str(checkpoint), "--layer", "3", "--patch", "2,3",
                     "--base-size", "140", "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()
    assert cli.main(["norms", str(ASSET), "--model", str(checkpoint), "--base-size", "140",
                     "--out", str(tmp_path / "n.html"), "--csv", str(tmp_path / "n.csv")]) == 0
    assert (tmp_path / "n.csv").read_text().startswith("block,row,col,norm")
    capsys.readouterr()


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_bad_input_gives_one_stderr_line_and_exit_2(checkpoint, tmp_path):
    r = run("depth", tmp_path / "missing.jpg", "--model", checkpoint, "--out", tmp_path / "o.png")
    assert r.returncode == 2
    assert "does not exist" in one_error_line(r.stderr)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("case", ["not_an_image", "unknown_model", "bad_checkpoint", "bad_colormap", "bad_scales",
                                  "layer_out_of_range", "unwritable_out"])
def test_each_bad_input_is_one_line(case, checkpoint, tmp_path, capsys, monkeypatch):
    from dpt_lab import cli

    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 truncated")
    args = {
        "not_an_image": ["depth", text, "--model", checkpoint],
        "unknown_model": ["depth", ASSET, "--model", "no-such-model"],
        "bad_checkpoint": ["depth", ASSET, "--model", broken],
        "bad_colormap": ["depth", ASSET, "--model", checkpoint, "--cmap", "rainbow"],
        "bad_scales": ["fusion", ASSET, "--model", checkpoint, "--scales", "1,2,3"],
        "layer_out_of_range": ["attention", ASSET, "--model", checkpoint, "--layer", "40", "--base-size", "140"],
        "unwritable_out": ["depth", ASSET, "--model", checkpoint, "--base-size", "140",
                           "--out", tmp_path / "no" / "such" / "dir" / "d.png"],
    }[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli.main([str(a) for a in args] + (["--out", str(tmp_path / "o.png")] if "--out" not in args else []))
    err = capsys.readouterr().err
    assert rc == 2
    one_error_line(err)
