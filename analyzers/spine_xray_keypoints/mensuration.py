"""Mensuration from vertebral keypoints: heights, disc heights, angles, translation, lordosis.

Pure functions on keypoints in source-image pixels (column, row). Each vertebra has
five points in this order: anterior-superior corner, posterior-superior corner,
posterior-inferior corner, anterior-inferior corner, spinous process tip.
Distances come out in mm (using the pixel spacing) and angles in degrees.

Angles are measured in a frame where the patient faces +x and +y points up, so a
positive intervertebral angle or lordosis means the disc / segment opens
anteriorly (lordotic), a negative one kyphotic. Sagittal translation is positive
when the upper vertebra lies anterior to the lower one (anterolisthesis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .constants import LEVELS

AS, PS, PI, AI, SP = range(5)


@dataclass
class Value:
    """One measurement and the keypoints it was computed from."""

    key: str
    group: str
    value: float
    unit: str
    sigma: float | None
    depends_on: tuple[tuple[str, int], ...]
    """(vertebra label, point index) pairs the value was computed from."""


def to_mm(points: np.ndarray, spacing: tuple[float, float], facing: float) -> np.ndarray:
    """Pixel (column, row) -> mm in a frame with the patient facing +x and +y up."""
    p = np.asarray(points, dtype=np.float64)
    out = np.empty_like(p)
    out[..., 0] = p[..., 0] * spacing[1] * facing
    out[..., 1] = -p[..., 1] * spacing[0]
    return out


def facing(points: dict[str, np.ndarray]) -> float:
    """+1 when the anterior vertebral wall is to the image right (larger column), else -1."""
    d = sum(float(np.mean(p[[AS, AI], 0]) - np.mean(p[[PS, PI], 0])) for p in points.values())
    return 1.0 if d >= 0 else -1.0


def _angle(a: np.ndarray, p: np.ndarray) -> float:
    """Angle (rad) of the line from posterior point p to anterior point a."""
    return math.atan2(a[1] - p[1], a[0] - p[0])


def _wrap_deg(rad: float) -> float:
    return math.degrees((rad + math.pi) % (2 * math.pi) - math.pi)


def _dist_sigma(*sig: float | None) -> float | None:
    if any(s is None for s in sig):
        return None
    # sigma_p covers both axes; one axis carries sigma_p^2 / 2 of the variance
    return math.sqrt(sum(s * s for s in sig) / 2.0)


def measure(points_px: dict[str, np.ndarray], spacing: tuple[float, float], region: str, sigma_mm: dict[str, np.ndarray] | None = None) -> list[Value]:
    """All measurements that the found vertebrae allow.

    Parameters
    ----------
    points_px
        Vertebra label (e.g. ``"C4"``) -> (5, 2) keypoints in pixels (column, row).
    spacing
        (row, column) pixel spacing in mm.
    region
        ``"cervical"`` or ``"lumbar"``; decides the vertebra order and the lordosis span.
    sigma_mm
        Optional label -> (5,) sigma_p per point in mm, propagated to first order.

    Returns
    -------
    list of Value
        Per vertebra heights, per adjacent pair disc heights / angle / translation,
        and lordosis between the top and bottom vertebra of the region when both exist.
    """
    order = [v for v in LEVELS[region] if v in points_px]
    if not order:
        return []
    face = facing({v: points_px[v] for v in order})
    mm = {v: to_mm(points_px[v], spacing, face) for v in order}
    sig = {v: (np.asarray(sigma_mm[v], dtype=np.float64) if sigma_mm is not None else None) for v in order}

    def s(v: str, i: int) -> float | None:
        return None if sig[v] is None else float(sig[v][i])

    def dist(v1: str, i1: int, v2: str, i2: int) -> float:
        return float(np.linalg.norm(mm[v1][i1] - mm[v2][i2]))

    def angle_sigma(pairs: list[tuple[str, int, int]]) -> float | None:
        total = 0.0
        for v, a, p in pairs:
            sa, sp = s(v, a), s(v, p)
            if sa is None or sp is None:
                return None
            length = max(dist(v, a, v, p), 1e-6)
            total += (sa * sa + sp * sp) / 2.0 / length**2
        return math.degrees(math.sqrt(total))

    out: list[Value] = []
    for v in order:
        out.append(Value("anterior_vertebral_height", v, dist(v, AS, v, AI), "mm", _dist_sigma(s(v, AS), s(v, AI)), ((v, AS), (v, AI))))
        out.append(Value("posterior_vertebral_height", v, dist(v, PS, v, PI), "mm", _dist_sigma(s(v, PS), s(v, PI)), ((v, PS), (v, PI))))
    labels = LEVELS[region]
    for up, lo in zip(labels[:-1], labels[1:]):
        if up not in mm or lo not in mm:
            continue
        level = f"{up}-{lo}"
        u, l = mm[up], mm[lo]
        out.append(Value("anterior_disc_height", level, dist(up, AI, lo, AS), "mm", _dist_sigma(s(up, AI), s(lo, AS)), ((up, AI), (lo, AS))))
        out.append(Value("posterior_disc_height", level, dist(up, PI, lo, PS), "mm", _dist_sigma(s(up, PI), s(lo, PS)), ((up, PI), (lo, PS))))
        ang = _wrap_deg(_angle(u[AI], u[PI]) - _angle(l[AS], l[PS]))
        four = ((up, AI), (up, PI), (lo, AS), (lo, PS))
        out.append(Value("intervertebral_angle", level, ang, "deg", angle_sigma([(up, AI, PI), (lo, AS, PS)]), four))
        e = l[AS] - l[PS]
        depth = float(np.linalg.norm(e))
        t = float(np.dot(u[PI] - l[PS], e / max(depth, 1e-6)))
        st = _dist_sigma(s(up, PI), s(lo, PS))
        dep = ((up, PI), (lo, PS), (lo, AS))
        out.append(Value("sagittal_translation", level, t, "mm", st, dep))
        out.append(Value("sagittal_translation_percent", level, 100.0 * t / max(depth, 1e-6), "%", None if st is None else 100.0 * st / max(depth, 1e-6), dep))
    top, bottom = labels[0], labels[-1]
    if top in mm and bottom in mm:
        ang = _wrap_deg(_angle(mm[top][AS], mm[top][PS]) - _angle(mm[bottom][AI], mm[bottom][PI]))
        group = f"{top}-{bottom}"
        out.append(Value("lordosis", group, ang, "deg", angle_sigma([(top, AS, PS), (bottom, AI, PI)]), ((top, AS), (top, PS), (bottom, AI), (bottom, PI))))
    return out
