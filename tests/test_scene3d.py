"""The depth in 3D (dpt_lab.scene): unprojection against planes of known geometry, the inverse
mapping, the edge cut, the vertex cap, GLB / PLY files read back with trimesh, bad input,
the Lab on the cached encode and the `scene` command line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fixtures import save_fixture_checkpoint

from dpt_lab import scene
from dpt_lab.scene import SceneError

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "chelsea.jpg"          # 451 x 300


def colours(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fov", [30.0, 60.0, 100.0])
def test_a_fronto_parallel_plane_comes_back_flat_and_as_wide_as_the_field_of_view(fov):
    d, h, w = 4.0, 30, 41
    pts = scene.unproject(np.full((h, w), d), fov_deg=fov)
    assert pts.shape == (h, w, 3) and pts.dtype == np.float32
    np.testing.assert_allclose(pts[..., 2], d, rtol=1e-6)
    # pixel centres at i + 0.5: the outermost centres are half a pixel inside the image's edges,
    # which lie at -/+ d tan(fov / 2)
    f = (w / 2) / math.tan(math.radians(fov) / 2)
    edge = d * math.tan(math.radians(fov) / 2)
    half_pixel = 0.5 * d / f
    assert abs(pts[0, 0, 0] + edge) <= half_pixel + 1e-5 and abs(pts[0, -1, 0] - edge) <= half_pixel + 1e-5
    np.testing.assert_allclose(pts[0, :, 0], -pts[0, ::-1, 0], atol=1e-5)         # centred
    np.testing.assert_allclose(pts[:, 0, 1], -pts[::-1, 0, 1], atol=1e-5)
    assert pts[0, 0, 1] < 0 < pts[-1, 0, 1]                                         # y down


def test_a_focal_length_in_pixels_replaces_the_field_of_view():
    pts = scene.unproject(np.full((20, 40), 2.0), focal_px=20.0)
    assert pts[0, -1, 0] == pytest.approx((40 - 0.5 - 20) / 20 * 2.0, rel=1e-6)


def test_a_tilted_plane_keeps_its_angle():
    h, w, fov, z0, angle = 60, 80, 70.0, 5.0, 25.0
    k = math.tan(math.radians(angle))               # the plane z = z0 + k y, tilted about the x axis
    f = (w / 2) / math.tan(math.radians(fov) / 2)
    ry = (np.arange(h) + 0.5 - h / 2) / f
    depth = np.repeat((z0 / (1 - k * ry))[:, None], w, axis=1)
    pts = scene.unproject(depth, fov_deg=fov).reshape(-1, 3).astype(np.float64)
    design = np.stack([pts[:, 0], pts[:, 1], np.ones(len(pts))], axis=1)
    (ax, ay, c), *_ = np.linalg.lstsq(design, pts[:, 2], rcond=None)
    assert abs(ax) < 1e-5 and c == pytest.approx(z0, rel=1e-5)
    assert math.degrees(math.atan(ay)) == pytest.approx(angle, abs=1e-3)


def test_relative_depth_maps_one_to_near_and_zero_to_far():
    v = np.linspace(0, 1, 11)[None, :].repeat(3, axis=0) * 7.0 + 2.0    # any scale and shift
    z = scene.distance(v, inverse=True, near=2.0, far=8.0)
    np.testing.assert_allclose(z[:, -1], 2.0)
    np.testing.assert_allclose(z[:, 0], 8.0)
    mid = 1 / (0.5 * (1 / 2.0 - 1 / 8.0) + 1 / 8.0)
    np.testing.assert_allclose(z[:, 5], mid)
    pts = scene.unproject(v, inverse=True, near=2.0, far=8.0)
    np.testing.assert_allclose(pts[..., 2], z, rtol=1e-6)


def _faces_across(mesh, split_z):
    z = mesh.vertices[:, 2][mesh.faces]
    return int(((z.min(axis=1) < split_z) & (z.max(axis=1) > split_z)).sum())


def test_the_edge_cut_drops_the_triangles_across_a_step_and_only_those():
    depth = np.ones((20, 30))
    depth[:, 15:] = 3.0                              # a step from 1 m to 3 m
    rgb = colours(20, 30)
    cut = scene.build_mesh(rgb, depth, edge=0.05)
    sheet = scene.build_mesh(rgb, depth, edge=0)
    assert _faces_across(cut, 2.0) == 0
    assert _faces_across(sheet, 2.0) == 2 * 19      # one column of squares, two triangles each
    assert len(sheet.faces) == 2 * 19 * 29 and len(cut.faces) == len(sheet.faces) - 2 * 19
    # the triangles face the camera: their normals point back along -z
    v = cut.vertices[cut.faces]
    normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    assert (normals[:, 2] < 0).all()


@pytest.mark.parametrize("shape, cap", [((300, 451), 10_000), ((300, 451), 3), ((7, 9), 500_000),
                                        ((1001, 999), 250_000)])
def test_the_vertex_count_respects_the_cap(shape, cap):
    mesh = scene.build_mesh(colours(*shape), np.full(shape, 2.0), max_vertices=cap)
    assert len(mesh.vertices) <= cap
    assert len(mesh.vertices) == mesh.grid[0] * mesh.grid[1]
    if cap >= shape[0] * shape[1]:
        assert mesh.step == 1 and len(mesh.vertices) == shape[0] * shape[1]


def test_invalid_pixels_and_the_far_limit_have_no_vertices():
    depth = np.full((10, 10), 2.0)
    depth[0, 0] = np.nan
    depth[5:, :] = 50.0                                  # "sky"
    mesh = scene.build_mesh(colours(10, 10), depth, drop_beyond=10.0)
    assert len(mesh.vertices) == 49 and np.isfinite(mesh.vertices).all()
    assert (mesh.faces < len(mesh.vertices)).all()


@pytest.mark.parametrize("points", [False, True])
def test_glb_and_ply_load_back_with_the_same_vertices_and_colours(tmp_path, points):
    import trimesh

    depth = 1.0 + np.random.default_rng(1).random((24, 32)) * 0.01
    rgb = colours(24, 32, seed=2)
    mesh = scene.build_mesh(rgb, depth)
    glb = scene.write_glb(mesh, tmp_path / "s.glb", points=points)
    ply = scene.write_ply(mesh, tmp_path / "s.ply")
    assert glb.read_bytes()[:4] == b"glTF"
    (geometry,) = trimesh.load(glb).geometry.values()
    assert len(geometry.vertices) == len(mesh.vertices)
    got = np.asarray(geometry.colors if points else geometry.visual.vertex_colors)[:, :3]
    np.testing.assert_array_equal(got, mesh.colors)
    np.testing.assert_allclose(geometry.vertices, mesh.vertices * [1, -1, -1], atol=1e-6)   # glTF: y up, -z ahead
    if not points:
        assert len(geometry.faces) == len(mesh.faces)
    cloud = trimesh.load(ply)
    assert ply.read_bytes().startswith(b"ply\nformat binary_little_endian")
    np.testing.assert_allclose(cloud.vertices, mesh.vertices, atol=1e-6)                  # the camera frame
    np.testing.assert_array_equal(np.asarray(cloud.colors)[:, :3], mesh.colors)


@pytest.mark.parametrize("kwargs, message", [
    (dict(inverse=True, near=5, far=2), "must be less than far"),
    (dict(inverse=True, near=0, far=2), "must be positive"),
    (dict(inverse=True, near=-1, far=2), "must be positive"),
    (dict(inverse=True), "needs the near and far"),
    (dict(fov_deg=0.5), "between 1 and 179"),
    (dict(fov_deg=180), "between 1 and 179"),
    (dict(fov_deg="wide"), "field of view must be a number"),
    (dict(focal_px=-3), "focal length must be positive"),
    (dict(max_vertices=0), "max vertices"),
    (dict(max_vertices=3_000_000), "max vertices"),
    (dict(max_vertices=2.5), "max vertices"),
    (dict(edge=-0.1), "edge threshold"),
])
def test_bad_scene_input_says_why(kwargs, message):
    with pytest.raises(SceneError, match=message):
        scene.build_mesh(colours(8, 8), np.full((8, 8), 2.0), **kwargs)


def test_a_depth_with_no_valid_pixels_says_so():
    with pytest.raises(SceneError, match="no valid pixels"):
        scene.build_mesh(colours(8, 8), np.full((8, 8), np.nan))
    with pytest.raises(SceneError, match="no valid pixels"):
        scene.unproject(np.full((8, 8), np.nan))
    with pytest.raises(SceneError, match="differ in size"):
        scene.build_mesh(colours(8, 9), np.ones((8, 8)))


def test_lab_scene_view_uses_the_cached_depth(tmp_path, monkeypatch):
    import trimesh

    from dpt_lab import session as S

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "w").mkdir()
    save_fixture_checkpoint("depth_anything_v2_vits", tmp_path / "w")
    lab = S.Lab(S.ModelManager(weights_dir=tmp_path / "w"))
    st, _ = lab.depth_view("s", None, str(ASSET), lab.manager.startup, 140)
    encodes = lab.store.encodes
    r = lab.scene_view("s", st, tmp_path / "out", fov=60, near=1, far=10, max_vertices=20_000)
    assert lab.store.encodes == encodes
    assert "depends on these two numbers" in r.text and len(r.mesh.vertices) <= 20_000
    (geometry,) = trimesh.load(r.glb).geometry.values()
    assert len(geometry.vertices) == len(r.mesh.vertices)
    assert len(trimesh.load(r.ply).vertices) == len(r.mesh.vertices)
    z = r.mesh.vertices[:, 2]
    assert 1.0 - 1e-4 <= z.min() and z.max() <= 10.0 + 1e-3
    with pytest.raises(SceneError, match="less than far"):
        lab.scene_view("s", st, tmp_path / "out", near=10, far=1)


def test_scene_command_line(tmp_path, capsys, monkeypatch):
    import trimesh

    from dpt_lab import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = save_fixture_checkpoint("depth_anything_v2_vits", tmp_path)
    out, ply = tmp_path / "s.glb", tmp_path / "s.ply"
    rc = cli.main(["scene", str(ASSET), "--model", str(ckpt), "--out", str(out), "--ply", str(ply),
                   "--max-vertices", "5000", "--base-size", "140", "--near", "2", "--far", "6", "--drop-beyond", "5"])
    assert rc in (0, None) and "vertices" in capsys.readouterr().out
    cloud = trimesh.load(ply)
    assert len(cloud.vertices) <= 5000 and out.read_bytes()[:4] == b"glTF"
    assert cloud.vertices[:, 2].max() <= 5.0 + 1e-5                   # --drop-beyond
    for bad, message in ((["--near", "6", "--far", "2"], "less than far"), (["--fov", "200"], "between 1 and 179"),
                         (["--max-vertices", "9000000"], "max vertices")):
        rc = cli.main(["scene", str(ASSET), "--model", str(ckpt), "--out", str(tmp_path / "x.glb"), *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], err
