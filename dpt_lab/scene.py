"""Geometry on a depth map: a robust plane of best fit (the floor, usually), its removal,
masks by a depth range, histogram equalisation, and the depth in 3D (points, a mesh, GLB and
PLY files). Every function works on a depth already computed (the app's cached one), never
re-encodes.

    a, b, c = fit_plane(depth, mask=None)     # depth ~ a*x + b*y + c, x, y in pixels (column, row)
    flat = remove_plane(depth, strength=1.0, plane=None)
    keep = depth_mask(depth, low, high, invert=False, normalised=True)
    shown = equalise(depth)                   # 0..1 by rank: histogram equalisation
    pts = unproject(depth, fov_deg=60.0)      # H x W x 3 in the camera frame
    mesh = build_mesh(rgb, depth, ...); write_glb(mesh, "scene.glb"); write_ply(mesh, "scene.ply")

The camera is a pinhole with the principal point at the image centre. Pixel (column i, row
j) covers [i, i+1) x [j, j+1) and its centre is (i + 0.5, j + 0.5), so the image's left and
right edges (x = 0 and x = W) are at -/+ z tan(fov / 2). Frame: x right, y down, z forward.

Relative models predict inverse depth (large = near), so on the normalised scale
(d - min) / (max - min) 1 is the nearest point; metric models give metres (small = near).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import DPTLabError, finite_number

PLANE_SAMPLES = 20_000       # pixels the robust fit looks at (a random, seeded subset)
PLANE_TRIALS = 256           # three-point planes tried
PLANE_TOLERANCE = 0.01       # an inlier's distance from the plane, as a share of the depth's range
EQUALISE_BINS = 4096


class SceneError(DPTLabError, ValueError):
    """A depth-geometry request that cannot be met, and why (one line)."""


def _depth(depth) -> np.ndarray:
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise SceneError(f"depth must be a non-empty H x W array, got shape {d.shape}")
    return d


def number(value, what: str) -> float:
    """A finite float, or a SceneError naming `what`."""
    return finite_number(value, what, SceneError)


def _solve_planes(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Planes through point triples (arrays of shape (T, 3)): (T, 3) coefficients (a, b, c) and
    a mask of the triples that define one (not collinear)."""
    ux, uy, uz = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0], z[:, 1] - z[:, 0]
    vx, vy, vz = x[:, 2] - x[:, 0], y[:, 2] - y[:, 0], z[:, 2] - z[:, 0]
    nx, ny, nz = uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx   # the normal (u x v)
    ok = np.abs(nz) > 1e-9 * (np.abs(ux) + np.abs(uy) + 1) * (np.abs(vx) + np.abs(vy) + 1)
    nz = np.where(ok, nz, 1.0)
    a, b = -nx / nz, -ny / nz
    c = z[:, 0] - a * x[:, 0] - b * y[:, 0]
    return np.stack([a, b, c], axis=1), ok


def _least_squares(x, y, z) -> np.ndarray:
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, z, rcond=None)
    return coef


def fit_plane(depth, mask=None, *, tolerance: float = PLANE_TOLERANCE, seed: int = 0) -> tuple[float, float, float]:
    """The dominant plane depth ~ a*x + b*y + c (x = column, y = row, in pixels), robust to
    whatever stands on it: RANSAC over PLANE_TRIALS three-point planes on a seeded sample of
    the valid pixels (inside `mask` when given), scored by how many lie within `tolerance` x
    the depth's range; then least squares on that plane's inliers, twice. An object covering a
    third of the image does not tilt it, where a plain least-squares fit would."""
    d = _depth(depth)
    valid = np.isfinite(d)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != d.shape:
            raise SceneError(f"mask shape {m.shape} does not match the depth's {d.shape}")
        valid &= m
    rows, cols = np.nonzero(valid)
    if rows.size < 3:
        raise SceneError("fewer than 3 valid depth pixels: no plane to fit")
    rng = np.random.default_rng(seed)
    if rows.size > PLANE_SAMPLES:
        pick = rng.choice(rows.size, PLANE_SAMPLES, replace=False)
        rows, cols = rows[pick], cols[pick]
    x, y = cols.astype(np.float64), rows.astype(np.float64)
    z = d[rows, cols]
    span = float(z.max() - z.min())
    if span == 0.0:
        return 0.0, 0.0, float(z[0])
    tol = number(tolerance, "tolerance") * span
    triples = rng.integers(0, z.size, size=(PLANE_TRIALS, 3))
    planes, ok = _solve_planes(x[triples], y[triples], z[triples])
    planes = planes[ok]
    if len(planes) == 0:                     # every sampled triple collinear: one row or column
        coef = _least_squares(x, y, z)
    else:
        # scored 32 planes at a time: all 256 at once held ~120 MB of temporaries
        support = np.concatenate([
            (np.abs(z - (p[:, :1] * x + p[:, 1:2] * y + p[:, 2:3])) <= tol).sum(axis=1)
            for p in np.array_split(planes, max(1, -(-len(planes) // 32)))])
        coef = planes[int(np.argmax(support))]
        for _ in range(2):
            inliers = np.abs(z - (coef[0] * x + coef[1] * y + coef[2])) <= tol
            if inliers.sum() < 3:
                break
            coef = _least_squares(x[inliers], y[inliers], z[inliers])
    return float(coef[0]), float(coef[1]), float(coef[2])


def plane_values(shape: tuple[int, int], plane: tuple[float, float, float]) -> np.ndarray:
    """a*x + b*y + c on an H x W grid of pixel centres (x = column, y = row)."""
    a, b, c = (number(v, "plane coefficient") for v in plane)
    h, w = int(shape[0]), int(shape[1])
    return (b * np.arange(h, dtype=np.float64))[:, None] + (a * np.arange(w, dtype=np.float64) + c)[None, :]


def remove_plane(depth, strength: float = 1.0, plane: Optional[tuple[float, float, float]] = None) -> np.ndarray:
    """depth - strength x plane (the robust fit_plane unless given): at strength 1 the floor
    becomes 0 and what stands on it keeps its height above it. float32, like the depth."""
    d = _depth(depth)
    s = number(strength, "plane strength")
    if s == 0.0:
        return d.astype(np.float32)
    plane = fit_plane(d) if plane is None else plane
    return (d - s * plane_values(d.shape, plane)).astype(np.float32)


def finite_range(depth) -> tuple[float, float]:
    """(min, max) over the finite values, or a SceneError when there are none."""
    d = np.asarray(depth)
    finite = np.isfinite(d)
    values = d if finite.all() else d[finite]
    if values.size == 0:
        raise SceneError("the depth has no valid pixels")
    return float(values.min()), float(values.max())


def normalise(depth, bounds: Optional[tuple[float, float]] = None) -> np.ndarray:
    """(d - min) / (max - min) over the finite values (0 where the depth is flat). bounds: the
    (min, max) to use instead, when `depth` is a sample of a larger map."""
    d = _depth(depth)
    lo, hi = finite_range(d) if bounds is None else bounds
    return (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)


def depth_mask(depth, low, high, invert: bool = False, normalised: bool = True) -> np.ndarray:
    """Pixels whose depth lies in [low, high] (bool H x W), or outside it with invert.
    normalised: the range is on (d - min) / (max - min), 0..1 (for relative models 1 is the
    nearest); else on the depth's own values (metres for metric models). Non-finite depth is
    never kept."""
    d = _depth(depth)
    lo, hi = number(low, "range low"), number(high, "range high")
    if lo > hi:
        raise SceneError(f"range low {lo:g} is above range high {hi:g}")
    if normalised:
        if lo < 0.0 or hi > 1.0:
            raise SceneError(f"a normalised range lies within 0..1 (1 = nearest), got {lo:g}..{hi:g}")
        values = normalise(d)
    else:
        values = d
    finite = np.isfinite(values)
    keep = (values >= lo) & (values <= hi)
    return (~keep & finite) if invert else (keep & finite)


def equalise(depth, bins: int = EQUALISE_BINS) -> np.ndarray:
    """Histogram equalisation: each value replaced by the share of the finite values at or
    below it (0..1, float32), so every colour of a colour map covers as many pixels."""
    d = _depth(depth)
    lo, hi = finite_range(d)
    finite = np.isfinite(d)
    vals = d[finite]
    if hi == lo:
        return np.zeros(d.shape, dtype=np.float32)
    counts, edges = np.histogram(vals, bins=int(bins), range=(lo, hi))
    cdf = np.concatenate([[0.0], np.cumsum(counts) / vals.size])
    out = np.interp(d, edges, cdf)
    out[~finite] = np.nan
    return out.astype(np.float32)


# -- 3D -----------------------------------------------------------------------------------
DEFAULT_FOV = 60.0
DEFAULT_MAX_VERTICES = 500_000
MAX_VERTICES = 2_000_000
DEFAULT_EDGE = 0.05


def focal_length(width: int, fov_deg=DEFAULT_FOV, focal_px=None) -> float:
    """The focal length in pixels: `focal_px` when given, else from the horizontal field of
    view: (W / 2) / tan(fov / 2)."""
    if focal_px not in (None, "", 0, 0.0):
        f = number(focal_px, "focal length")
        if f <= 0:
            raise SceneError(f"the focal length must be positive (pixels), got {focal_px!r}")
        return f
    fov = number(fov_deg, "field of view")
    if not 1.0 < fov < 179.0:
        raise SceneError(f"the field of view must lie between 1 and 179 degrees, got {fov_deg!r}")
    return (width / 2.0) / math.tan(math.radians(fov) / 2.0)


def distance(depth, *, inverse: bool = False, near=None, far=None, bounds=None) -> np.ndarray:
    """z (float64 H x W) from a model's depth. Metric (inverse=False): the depth itself, in
    metres. Relative (inverse=True: inverse depth up to scale and shift): the normalised
    inverse depth v (0..1, 1 = nearest) becomes 1 / (v (1/near - 1/far) + 1/far), so v = 1 is
    at `near` and v = 0 at `far`; the shape depends on those two numbers. bounds: the (min,
    max) that normalise v, when `depth` is a sample of a larger map."""
    d = _depth(depth)
    if bounds is None:
        finite_range(d)                      # a depth with no valid pixels says so
    if not inverse:
        return d
    if near is None or far is None:
        raise SceneError("relative depth needs the near and far distances to become distances")
    n, f = number(near, "near"), number(far, "far")
    if n <= 0 or f <= 0:
        raise SceneError(f"near and far must be positive, got near {near!r}, far {far!r}")
    if n >= f:
        raise SceneError(f"near ({n:g}) must be less than far ({f:g})")
    return 1.0 / (normalise(d, bounds) * (1.0 / n - 1.0 / f) + 1.0 / f)


def _rays(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], focal: float):
    """x / z and y / z of the pixel centres (rows, cols) of an image of `shape`."""
    h, w = shape
    return (cols + 0.5 - w / 2.0) / focal, (rows + 0.5 - h / 2.0) / focal


def unproject(depth, fov_deg=DEFAULT_FOV, focal_px=None, inverse: bool = False, near=None, far=None) -> np.ndarray:
    """Every pixel's point in the camera frame (H x W x 3 float32: x right, y down, z forward;
    metres, or the units of near / far). Invalid depth gives NaN points."""
    z = distance(depth, inverse=inverse, near=near, far=far)
    h, w = z.shape
    f = focal_length(w, fov_deg, focal_px)
    rx, ry = _rays(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), (h, w), f)
    out = np.empty((h, w, 3), dtype=np.float32)
    out[..., 0] = rx[None, :] * z
    out[..., 1] = ry[:, None] * z
    out[..., 2] = z
    return out


@dataclass
class Mesh:
    vertices: np.ndarray       # V x 3 float32, camera frame
    faces: np.ndarray          # F x 3 int64, indices into vertices (front faces towards the camera)
    colors: np.ndarray         # V x 3 uint8, the image's colour at each vertex
    grid: tuple[int, int]      # rows x cols of the sampled pixel grid
    step: int                  # one vertex every `step` pixels of the image


def _vertex_cap(max_vertices) -> int:
    v = number(max_vertices, "max vertices")
    if v != int(v) or not 3 <= v <= MAX_VERTICES:
        raise SceneError(f"max vertices must be a whole number from 3 to {MAX_VERTICES:,}, got {max_vertices!r}")
    return int(v)


def build_mesh(image_rgb, depth, fov_deg=DEFAULT_FOV, focal_px=None, inverse: bool = False, near=None, far=None,
               edge=DEFAULT_EDGE, max_vertices=DEFAULT_MAX_VERTICES, drop_beyond=None) -> Mesh:
    """A triangle mesh of the depth with the image's colours: one vertex per sampled pixel (every
    `step` pixels, the smallest step that keeps at most max_vertices), two triangles per grid
    square. No rubber sheet: a triangle whose depths differ by more than `edge` (relative: max z
    / min z - 1) is dropped; 0 keeps them all. Pixels with invalid depth, or beyond
    `drop_beyond` (the sky), have no vertex."""
    rgb = np.asarray(image_rgb)
    raw = np.asarray(depth)
    if raw.ndim != 2 or raw.size == 0:
        raise SceneError(f"depth must be a non-empty H x W array, got shape {raw.shape}")
    h, w = raw.shape
    if rgb.shape[:2] != (h, w):
        raise SceneError(f"image {rgb.shape[1]}x{rgb.shape[0]} and depth {w}x{h} differ in size")
    cut = number(edge, "edge threshold")
    if cut < 0:
        raise SceneError(f"the edge threshold is a relative depth change >= 0 (0 = off), got {edge!r}")
    cap = _vertex_cap(max_vertices)
    f = focal_length(w, fov_deg, focal_px)
    step = max(1, math.ceil(math.sqrt(h * w / cap)))
    while math.ceil(h / step) * math.ceil(w / step) > cap:
        step += 1
    rows, cols = np.arange(step // 2, h, step), np.arange(step // 2, w, step)
    bounds = finite_range(raw)                                         # of the whole map, not the sample
    # only the sampled pixels become distances (a 12 MP map is never converted whole)
    z = distance(raw[rows[:, None], cols[None, :]], inverse=inverse, near=near, far=far, bounds=bounds)
    valid = np.isfinite(z) & (z > 0)
    if drop_beyond not in (None, "", 0, 0.0):
        limit = number(drop_beyond, "far limit")
        if limit <= 0:
            raise SceneError(f"the far limit must be positive, got {drop_beyond!r}")
        valid &= z <= limit
    if not valid.any():
        raise SceneError("the depth has no valid pixels to build a scene from")
    gh, gw = z.shape
    rx, ry = _rays(rows.astype(np.float64), cols.astype(np.float64), (h, w), f)
    grid_points = np.stack([rx[None, :] * z, ry[:, None] * z, z], axis=-1)
    index = np.full((gh, gw), -1, dtype=np.int64)
    index[valid] = np.arange(int(valid.sum()))
    a, b = index[:-1, :-1], index[:-1, 1:]          # (r, c), (r, c+1)
    c, d = index[1:, :-1], index[1:, 1:]            # (r+1, c), (r+1, c+1)
    za, zb, zc, zd = z[:-1, :-1], z[:-1, 1:], z[1:, :-1], z[1:, 1:]
    faces = []
    for tri, zs in (((a, c, b), (za, zc, zb)), ((b, c, d), (zb, zc, zd))):
        ok = (tri[0] >= 0) & (tri[1] >= 0) & (tri[2] >= 0)
        if cut > 0:
            with np.errstate(invalid="ignore", divide="ignore"):
                lo = np.minimum(np.minimum(zs[0], zs[1]), zs[2])
                hi = np.maximum(np.maximum(zs[0], zs[1]), zs[2])
                ok &= hi <= lo * (1.0 + cut)
        faces.append(np.stack([t[ok] for t in tri], axis=1))
    colors = rgb[rows[:, None], cols[None, :], :3][valid].astype(np.uint8)
    return Mesh(grid_points[valid].astype(np.float32), np.concatenate(faces).astype(np.int64), colors,
                (gh, gw), step)


# glTF's frame is y up with the camera looking down -z; the camera frame is y down, z forward:
# a half turn about x takes one to the other (and keeps the triangles facing the camera).
_TO_GLTF = np.array([1.0, -1.0, -1.0], dtype=np.float32)


def _rgba(mesh: Mesh) -> np.ndarray:
    return np.concatenate([mesh.colors, np.full((len(mesh.colors), 1), 255, np.uint8)], axis=1)


def write_glb(mesh: Mesh, path, points: bool = False) -> Path:
    """The mesh (or, with points, its vertices as a point cloud) with vertex colours as a binary
    glTF (.glb), in glTF's frame (y up, looking down -z). Written by trimesh: a maintained glTF
    writer (and the reader the tests use), pure Python over numpy, where a hand-written glTF
    would be ours to keep right."""
    import trimesh

    path = Path(path)
    rgba = _rgba(mesh)
    if points:
        geometry = trimesh.PointCloud(mesh.vertices * _TO_GLTF, colors=rgba)
    else:
        geometry = trimesh.Trimesh(mesh.vertices * _TO_GLTF, mesh.faces, vertex_colors=rgba, process=False)
    path.write_bytes(geometry.export(file_type="glb"))
    return path


def write_ply(mesh: Mesh, path) -> Path:
    """The vertices as a binary PLY point cloud (x, y, z float; red, green, blue uint8), in the
    camera frame (x right, y down, z forward), written by trimesh."""
    import trimesh

    path = Path(path)
    path.write_bytes(trimesh.PointCloud(mesh.vertices, colors=_rgba(mesh)).export(file_type="ply", encoding="binary"))
    return path


# -- command line ------------------------------------------------------------------------
def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "scene", help="the depth in 3D: a coloured mesh or point cloud as GLB (and PLY)",
        description="The depth as a 3D scene: a pinhole camera at the image centre (horizontal field of view, "
                    "or a focal length in pixels). Metric models give metres; relative models are placed "
                    "between --near and --far (the shape depends on them).")
    p.add_argument("image", help="image file")
    p.add_argument("--model", required=True, help="checkpoint file, -hf folder, local name or known model name")
    p.add_argument("--out", required=True, help="the scene as .glb")
    p.add_argument("--ply", default=None, help="also write the vertices as a binary .ply point cloud")
    camera = p.add_mutually_exclusive_group()
    camera.add_argument("--fov", default=str(DEFAULT_FOV), help="horizontal field of view, degrees (default 60)")
    camera.add_argument("--focal", default=None, metavar="PX", help="focal length in pixels instead")
    p.add_argument("--near", default="1", help="relative models: distance of the nearest point (default 1)")
    p.add_argument("--far", default="10", help="relative models: distance of the farthest point (default 10)")
    p.add_argument("--edge", default=str(DEFAULT_EDGE), help="cut triangles across this relative depth change (0 = off)")
    p.add_argument("--max-vertices", default=str(DEFAULT_MAX_VERTICES), help=f"at most (up to {MAX_VERTICES:,})")
    p.add_argument("--points", action="store_true", help="a point cloud instead of a mesh")
    p.add_argument("--drop-beyond", default=None, metavar="Z", help="no points beyond this distance (the sky)")
    p.add_argument("--base-size", type=int, default=None, help="processing size (default: the model's)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default cpu)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args) -> int:
    import dpt_lab

    from . import imaging

    # the camera and the cap are checked before the (slow) load and encode
    focal_length(1000, args.fov, args.focal)
    _vertex_cap(args.max_vertices)
    rgb = imaging.load_image(args.image)
    model = dpt_lab.load_model(args.model, device=args.device)
    metric = bool(model.info.metric)
    if not metric:
        distance(np.ones((1, 1)), inverse=True, near=args.near, far=args.far)
    depth = model.predict(rgb, base_size=args.base_size)
    mesh = build_mesh(rgb, depth, fov_deg=args.fov, focal_px=args.focal, inverse=not metric,
                      near=None if metric else args.near, far=None if metric else args.far, edge=args.edge,
                      max_vertices=args.max_vertices, drop_beyond=args.drop_beyond)
    written = [str(write_glb(mesh, args.out, points=args.points))]
    if args.ply:
        written.append(str(write_ply(mesh, args.ply)))
    print(f"{len(mesh.vertices):,} vertices, {'points' if args.points else f'{len(mesh.faces):,} triangles'} "
          f"({'metres' if metric else f'relative, placed between {args.near} and {args.far}'}): "
          f"wrote {', '.join(written)}")
    return 0
