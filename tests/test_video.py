"""Video depth (dpt_lab.video) on synthetic clips made with PyAV: frame counts with stride, the
output's codec, each frame against the colourised model.predict of its input frame, one colour
range for the clip, the raw depth files, bad and damaged input, cancelling, the CLI."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
from clips import make_clip, read_frames
from fixtures import save_fixture_checkpoint

import dpt_lab
from dpt_lab import imaging, video

pytest.importorskip("av")
BASE = 140


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return dpt_lab.load_model(save_fixture_checkpoint("depth_anything_v2_vits", tmp_path_factory.mktemp("video")))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """An H.264 MP4 (even size) and a lossless PNG-in-QuickTime clip of odd size, 2 s at 12 fps."""
    root = tmp_path_factory.mktemp("clips")
    mp4 = root / "box.mp4"
    mkv = root / "box_odd.mov"
    return {"mp4": (mp4, make_clip(mp4)),
            "mkv": (mkv, make_clip(mkv, size=(97, 131), codec="png", container="mov", pix_fmt="rgb24"))}


def padded(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def through_h264(pictures, folder, fps=12) -> list[np.ndarray]:
    """The pictures as the video writer's H.264 yuv420p gives them back: the codec's own error.
    (The random model's depth is pixel noise, the codec's worst case: 4:2:0 chroma alone moves
    it by ~10 levels, so a frame is compared with its expected picture after the same codec.)"""
    out = folder / "expected.mp4"
    writer = video._Writer(out, fps, pictures[0].shape[1], pictures[0].shape[0])
    for pic in pictures:
        writer.write(pic)
    writer.close()
    return read_frames(out)[0]


def assert_frames(got, want):
    for k, (g, w) in enumerate(zip(got, want)):
        err = np.abs(g.astype(int) - w.astype(int))
        assert err.mean() < 2.5 and np.percentile(err, 99) < 24, (k, err.mean(), np.percentile(err, 99))


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
@pytest.mark.parametrize("stride", [1, 3])
def test_frame_count_size_and_codec(model, clips, tmp_path, kind, stride):
    src, frames = clips[kind]
    out = tmp_path / "out.mp4"
    report = video.depth_video(model, src, out, base_size=BASE, stride=stride, normalise="frame")
    assert report.frames_in == len(frames) == 24
    assert report.frames_out == math.ceil(24 / stride) and report.stopped_early is None
    got, info = read_frames(out)
    h, w = frames[0].shape[:2]
    assert len(got) == report.frames_out
    assert (info["codec"], info["pix_fmt"], info["audio"]) == ("h264", "yuv420p", 0)
    assert (info["height"], info["width"]) == (h + h % 2, w + w % 2)
    assert info["fps"] == pytest.approx(12 / stride, rel=1e-3)
    assert report.seconds == pytest.approx(report.frames_out / (12 / stride))


def test_each_frame_is_the_colourised_predict_of_its_input_frame(model, clips, tmp_path):
    src, frames = clips["mkv"]                       # lossless input: the frames the model saw are these
    out = tmp_path / "frame.mp4"
    video.depth_video(model, src, out, base_size=BASE, normalise="frame", cmap="turbo")
    got, _ = read_frames(out)
    want = through_h264([imaging.colorize(model.predict(f, base_size=BASE), "turbo") for f in frames], tmp_path)
    assert len(got) == len(want) == 24
    assert_frames(got, want)
    # the comparison can tell frames apart: a frame against its neighbour's picture is far off
    assert np.abs(got[0].astype(int) - want[12].astype(int)).mean() > 5


def test_clip_normalisation_uses_one_range_and_side_by_side_shows_the_input(model, clips, tmp_path):
    src, frames = clips["mkv"]
    out = tmp_path / "clip.mp4"
    report = video.depth_video(model, src, out, base_size=BASE, normalise="clip", side_by_side=True, stride=4)
    depths = [model.predict(frames[i], base_size=BASE) for i in range(0, 24, 4)]
    lo, hi = min(float(d.min()) for d in depths), max(float(d.max()) for d in depths)
    assert report.depth_range == pytest.approx((lo, hi), rel=1e-5, abs=1e-6)
    got, info = read_frames(out)
    assert (info["width"], info["height"]) == (2 * 131, 98) and len(got) == 6
    pictures = [np.concatenate([frames[i], imaging.colorize(depths[k], "turbo", vmin=lo, vmax=hi)], axis=1)
                for k, i in enumerate(range(0, 24, 4))]
    assert_frames(got, through_h264(pictures, tmp_path, fps=3))
    # per-frame colours differ from the clip's: the range is really shared
    own = through_h264([np.concatenate([frames[i], imaging.colorize(d, "turbo")], axis=1)
                        for i, d in zip(range(0, 24, 4), depths)], tmp_path, fps=3)
    assert max(np.abs(o.astype(int) - g.astype(int)).mean() for o, g in zip(own, got)) > 2.5


def test_raw_depth_as_npz_and_png_zip(model, clips, tmp_path):
    src, frames = clips["mp4"]
    report = video.depth_video(model, src, tmp_path / "o.mp4", base_size=BASE, stride=2, npz=tmp_path / "d.npz",
                               png_zip=tmp_path / "d.zip")
    z = np.load(tmp_path / "d.npz")
    assert z["depth"].dtype == np.float16 and z["depth"].shape[0] == report.frames_out == 12
    assert list(z["frame_index"]) == list(range(0, 24, 2)) and tuple(z["image_size"]) == (98, 132)
    assert np.isfinite(z["depth"].astype(np.float32)).all() and z["depth"].max() > 0
    with zipfile.ZipFile(tmp_path / "d.zip") as zf:
        names = sorted(zf.namelist())
        assert len(names) == 12
        zf.extract(names[3], tmp_path)
    arr, lo, hi = imaging.read_png16(tmp_path / names[3])
    np.testing.assert_allclose(imaging.png16_to_depth(arr, lo, hi), z["depth"][3].astype(np.float32),
                               rtol=2e-3, atol=(hi - lo) / 65535 + 2e-3 * abs(hi))


def test_bad_input_is_refused_and_a_damaged_file_keeps_what_was_done(model, clips, tmp_path):
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is not a video")
    with pytest.raises(video.VideoError, match="not a video"):
        video.depth_video(model, not_video, tmp_path / "x.mp4")
    sound = tmp_path / "sound.wav"                   # a media file without a video stream
    import av
    with av.open(str(sound), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(packet)
    with pytest.raises(video.VideoError, match="no video stream"):
        video.depth_video(model, sound, tmp_path / "x.mp4")
    with pytest.raises(video.VideoError):
        video.depth_video(model, tmp_path / "missing.mp4", tmp_path / "x.mp4")
    with pytest.raises(video.VideoError, match="stride"):
        video.depth_video(model, clips["mp4"][0], tmp_path / "x.mp4", stride=0)
    with pytest.raises(video.VideoError, match="max_seconds"):
        video.depth_video(model, clips["mp4"][0], tmp_path / "x.mp4", max_seconds=-1)
    # truncated: an MP4 with its index first (faststart), cut at 60%
    whole = tmp_path / "whole.mp4"
    make_clip(whole, options={"movflags": "faststart"})
    data = whole.read_bytes()
    broken = tmp_path / "truncated.mp4"
    broken.write_bytes(data[: int(len(data) * 0.6)])
    report = video.depth_video(model, broken, tmp_path / "partial.mp4", base_size=BASE, normalise="frame")
    assert 0 < report.frames_out < 24
    assert "damaged or truncated" in report.stopped_early and "of 24" in report.stopped_early, report.stopped_early
    assert len(read_frames(tmp_path / "partial.mp4")[0]) == report.frames_out


def test_a_long_clip_is_cut_and_a_job_can_be_cancelled(model, clips, tmp_path):
    src, _ = clips["mp4"]
    report = video.depth_video(model, src, tmp_path / "cut.mp4", base_size=BASE, max_seconds=1.0)
    assert report.frames_out == 12 and "cut at 1 s" in report.stopped_early
    calls = []
    report = video.depth_video(model, src, tmp_path / "cancel.mp4", base_size=BASE, batch=2,
                               progress=lambda f, t: calls.append((f, t)), cancel=lambda: len(calls) >= 2)
    assert report.frames_out == 4 and report.stopped_early == "cancelled after 4 frames"
    assert calls[0][1].startswith("frame 2 of 24") and "ETA" in calls[0][1]
    assert len(read_frames(tmp_path / "cancel.mp4")[0]) == 4


def test_cli_writes_the_mp4(clips, tmp_path, capsys):
    from dpt_lab import cli

    ckpt = save_fixture_checkpoint("depth_anything_v2_vits", tmp_path)
    out = tmp_path / "cli.mp4"
    assert cli.main(["video", str(clips["mp4"][0]), "--model", str(ckpt), "--out", str(out), "--side-by-side",
                     "--stride", "6", "--max-seconds", "5", "--npz", str(tmp_path / "cli.npz"),
                     "--base-size", str(BASE)]) == 0
    frames, info = read_frames(out)
    assert len(frames) == 4 and info["width"] == 264 and "4 frames at 2 fps" in capsys.readouterr().out
    assert cli.main(["video", str(tmp_path / "nope.mp4"), "--model", str(ckpt)]) == 2
    assert "error:" in capsys.readouterr().err
