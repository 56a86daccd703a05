"""Geometry on a depth map: a robust plane of best fit (the floor, usually), its removal,
masks by a depth range and histogram equalisation. numpy only; every function works on
a depth already computed (the app's cached one), never re-encodes.

    a, b, c = fit_plane(depth, mask=None)     # depth ~ a*x + b*y + c, x, y in pixels (column, row)
    flat = remove_plane(depth, strength=1.0, plane=None)
    keep = depth_mask(depth, low, high, invert=False, normalised=True)
    shown = equalise(depth)                   # 0..1 by rank: histogram equalisation

Relative models predict inverse depth (large = near), so on the normalised scale
(d - min) / (max - min) 1 is the nearest point; metric models give metres (small = near).
"""

from __future__ import annotations

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
        fitted = planes[:, :1] * x + planes[:, 1:2] * y + planes[:, 2:3]
        support = (np.abs(z - fitted) <= tol).sum(axis=1)
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


def normalise(depth) -> np.ndarray:
    """(d - min) / (max - min) over the finite values (0 where the depth is flat)."""
    d = _depth(depth)
    finite = np.isfinite(d)
    if not finite.any():
        raise SceneError("the depth has no finite values")
    lo, hi = float(d[finite].min()), float(d[finite].max())
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
    finite = np.isfinite(d)
    if not finite.any():
        raise SceneError("the depth has no finite values")
    vals = d[finite]
    lo, hi = float(vals.min()), float(vals.max())
    if hi == lo:
        return np.zeros(d.shape, dtype=np.float32)
    counts, edges = np.histogram(vals, bins=int(bins), range=(lo, hi))
    cdf = np.concatenate([[0.0], np.cumsum(counts) / vals.size])
    out = np.interp(d, edges, cdf)
    out[~finite] = np.nan
    return out.astype(np.float32)
