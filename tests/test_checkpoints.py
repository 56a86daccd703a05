"""Bad checkpoints get a typed CheckpointError that says what is wrong; nothing in a
checkpoint is ever executed."""

import os
import pickle

import pytest
import torch
from fixtures import fixture, save_fixture_checkpoint

import dpt_lab
from dpt_lab import CheckpointError

STEM = "depth_anything_v2_vits"


@pytest.fixture(scope="module")
def good_state():
    return fixture(STEM)[0]


def save(state, tmp_path, name="depth_anything_v2_vits.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, I am not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="not"):
        dpt_lab.load_model(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        dpt_lab.load_model(path)


def test_truncated_file(tmp_path, good_state):
    path = save(good_state, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        dpt_lab.load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file|unknown model"):
        dpt_lab.load_model(tmp_path / "nope.pth")


def test_unknown_layout_names_the_signatures(tmp_path):
    path = save({"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, tmp_path, "x.pth")
    with pytest.raises(CheckpointError, match="unknown layout.*Depth-Anything") as err:
        dpt_lab.load_model(path)
    assert "encoder.weight" in str(err.value)


def test_missing_key_is_named(tmp_path, good_state):
    state = dict(good_state)
    del state["depth_head.scratch.refinenet2.out_conv.weight"]
    with pytest.raises(CheckpointError, match="missing keys.*fusion.1.out_conv.weight"):
        dpt_lab.load_model(save(state, tmp_path))


def test_missing_block_is_named(tmp_path, good_state):
    state = {k: v for k, v in good_state.items() if ".blocks.4." not in k}
    with pytest.raises(CheckpointError, match="missing"):
        dpt_lab.load_model(save(state, tmp_path))


def test_unexpected_key_is_named(tmp_path, good_state):
    state = dict(good_state, **{"depth_head.scratch.extra_conv.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="unexpected keys.*extra_conv"):
        dpt_lab.load_model(save(state, tmp_path))


def test_shape_mismatch_is_named(tmp_path, good_state):
    state = dict(good_state)
    state["pretrained.blocks.3.attn.proj.weight"] = torch.zeros(384, 383)
    with pytest.raises(CheckpointError, match="shape mismatch.*blocks.3.attn.proj.weight"):
        dpt_lab.load_model(save(state, tmp_path))


def test_non_tensor_entries_refused(tmp_path, good_state):
    path = save({"pretrained.cls_token": torch.zeros(1, 1, 384), "note": "text"}, tmp_path)
    with pytest.raises(CheckpointError, match="non-tensor"):
        dpt_lab.load_model(path)


class Exploit:
    """Unpickling this would create a marker file: it must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_exploit_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "depth_anything_v2_vits.pth"
    torch.save({"pretrained.cls_token": torch.zeros(1), "payload": Exploit(marker)}, path, pickle_protocol=protocol)
    with pytest.raises(CheckpointError, match="refused"):
        dpt_lab.load_model(path)
    assert not marker.exists()


def test_legacy_pickle_exploit_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "old.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Exploit(marker)}, f)
    with pytest.raises(CheckpointError):
        dpt_lab.load_model(path)
    assert not marker.exists()


def test_wrong_family_argument(tmp_path):
    path = save_fixture_checkpoint(STEM, tmp_path)
    with pytest.raises(CheckpointError, match="Depth-Anything layout"):
        dpt_lab.load_model(path, family="midas_beit")
    with pytest.raises(CheckpointError, match="unknown family"):
        dpt_lab.load_model(path, family="resnet")


def test_wrapped_and_safetensors_checkpoints_load(tmp_path, good_state):
    from safetensors.torch import save_file

    _, x, expected = fixture(STEM)
    wrapped = save({"model": good_state, "optimizer": {}}, tmp_path)
    st = tmp_path / "depth_anything_v2_vits.safetensors"
    save_file({k: v.contiguous() for k, v in good_state.items()}, st)
    for path in (wrapped, st):
        with torch.inference_mode():
            out = dpt_lab.load_model(path)(x)
        assert torch.allclose(out, expected, atol=1e-4 * expected.abs().max())
