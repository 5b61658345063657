"""Curve geometry of the spine midline: tangent angles, Cobb angles, curves and apices.

Pure functions shared by the phantom generator (ground truth from the vertebra
tilts it drew) and the analyzer (estimates from the segmented spine midline),
so both sides count curves the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .constants import LEVEL_HEIGHTS, LEVELS, SCOLIOSIS_COBB_DEG


@dataclass(frozen=True)
class Curve:
    """One curve between two end points of extreme tilt along the spine.

    Indices refer to the sampled midline (top to bottom); ``cobb`` is the
    difference of the tangent angles at the two ends in degrees.
    """

    upper: int
    lower: int
    apex: int
    cobb: float


def level_edges() -> np.ndarray:
    """Fractional positions (0 = top of T1, 1 = bottom of L5) of the level boundaries."""
    return np.concatenate([[0.0], np.cumsum(LEVEL_HEIGHTS) / LEVEL_HEIGHTS.sum()])


def level_at(fraction: float) -> str:
    """The vertebral level at a fractional position along the T1-L5 midline."""
    edges = level_edges()
    i = int(np.clip(np.searchsorted(edges, fraction, side="right") - 1, 0, len(LEVELS) - 1))
    return LEVELS[i]


def curves_from_angles(theta: np.ndarray, min_swing: float = 4.0) -> list[Curve]:
    """Split a sequence of tangent angles (degrees, top to bottom) into curves.

    A curve runs between consecutive turning points of the angle sequence (the
    most tilted levels, the end vertebrae of Cobb's method); the two ends of the
    sequence count as turning points. Turning points whose swing is below
    ``min_swing`` degrees are treated as noise (hysteresis), so a jittery
    straight spine has no curves.
    """
    theta = np.asarray(theta, dtype=np.float64)
    n = len(theta)
    if n < 2:
        return []
    lo = hi = 0
    ext: list[int] = []
    direction, cand = 0, 0
    for i in range(1, n):
        if direction == 0:
            lo = i if theta[i] < theta[lo] else lo
            hi = i if theta[i] > theta[hi] else hi
            if theta[i] - theta[lo] >= min_swing:
                ext, direction, cand = [lo], 1, i
            elif theta[hi] - theta[i] >= min_swing:
                ext, direction, cand = [hi], -1, i
        elif direction > 0:
            if theta[i] > theta[cand]:
                cand = i
            elif theta[cand] - theta[i] >= min_swing:
                ext.append(cand)
                direction, cand = -1, i
        else:
            if theta[i] < theta[cand]:
                cand = i
            elif theta[i] - theta[cand] >= min_swing:
                ext.append(cand)
                direction, cand = 1, i
    if direction == 0:
        # no swing reaches min_swing: one (sub-threshold) curve between the extreme tilts
        ext = sorted({lo, hi})
        if len(ext) < 2:
            return []
    else:
        ext.append(cand)
    curves = []
    for a, b in zip(ext[:-1], ext[1:]):
        if b <= a:
            continue
        seg = theta[a : b + 1]
        mid = (theta[a] + theta[b]) / 2.0
        # the apex is where the tangent passes the mean tilt of the two ends (the most deviated point)
        apex = a + int(np.argmin(np.abs(seg - mid)))
        curves.append(Curve(upper=a, lower=b, apex=apex, cobb=float(abs(theta[b] - theta[a]))))
    return curves


def count_curves(curves: list[Curve], threshold: float = SCOLIOSIS_COBB_DEG) -> int:
    return sum(1 for c in curves if c.cobb >= threshold)


def curve_class(n_curves: int) -> str:
    """The paper's number-of-curves classes: ``"0"``, ``"1"`` or ``">1"``."""
    return "0" if n_curves <= 0 else "1" if n_curves == 1 else ">1"


def midline_angles(rows: np.ndarray, cols: np.ndarray, sigma: float) -> np.ndarray:
    """Tangent angles (degrees, clockwise from vertical) of a midline given per row.

    ``cols`` are smoothed with a Gaussian of ``sigma`` rows before the central
    difference, so single-row jitter of the segmentation does not become tilt.
    Pixels must be square.
    """
    from scipy.ndimage import gaussian_filter1d

    rows = np.asarray(rows, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.float64)
    smooth = gaussian_filter1d(cols, sigma, mode="nearest") if sigma > 0 else cols
    d = np.gradient(smooth, rows)
    return np.degrees(np.arctan(d))


def lateral_deviation(rows: np.ndarray, cols: np.ndarray, curve: Curve) -> tuple[int, float]:
    """Index and distance (pixels) of the midline point farthest from the chord between the curve's ends."""
    p0 = np.array([cols[curve.upper], rows[curve.upper]])
    p1 = np.array([cols[curve.lower], rows[curve.lower]])
    seg = np.stack([cols[curve.upper : curve.lower + 1], rows[curve.upper : curve.lower + 1]], axis=1)
    d = p1 - p0
    norm = float(np.hypot(*d)) or 1.0
    dist = np.abs(d[0] * (seg[:, 1] - p0[1]) - d[1] * (seg[:, 0] - p0[0])) / norm
    i = int(np.argmax(dist))
    return curve.upper + i, float(dist[i])
