"""The array pipeline shared by the analyzer and the held-out evaluation (``evaluate.py``).

The networks are passed in as callables (ONNX Runtime sessions in the
analyzer, the same sessions in the evaluation), so the figures in
``metrics.json`` come from exactly the code path the node runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from .constants import CURVE_CLASSES, HEAVISIDE_K, SCOLIOSIS_COBB_DEG
from .geometry import Curve, curves_from_angles, lateral_deviation, level_at, midline_angles
from .preprocess import COLS, ROWS

SegFn = Callable[[np.ndarray], np.ndarray]
"""(B, 1, 416, 128) float32 -> Conv11 logits (B, 6, 416, 128)."""
ClsFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
"""(image, soft mask) -> {"p_scoliosis", "p_positioning", "p_curves", "evidence"}."""

LEFT_LEG, RIGHT_LEG = 4, 5


def heaviside(y: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(np.clip(-HEAVISIDE_K * (y - 0.5), -60.0, 60.0)))


def mirror(soft: np.ndarray) -> np.ndarray:
    """A (..., 6, rows, cols) part map of a flipped scan, seen in the unflipped scan (left and right legs swap)."""
    out = soft[..., ::-1].copy()
    out[..., [LEFT_LEG, RIGHT_LEG], :, :] = out[..., [RIGHT_LEG, LEFT_LEG], :, :]
    return out


def midpoints(y: np.ndarray, window: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per part and row: sub-pixel mid-point (softmax expectation around the arg-max) and thickness.

    ``y`` is (parts, rows, 128) Conv11 output; thickness is the sum of the
    Heaviside-activated row, as in the paper.
    """
    thick = heaviside(y).sum(-1)
    arg = np.argmax(y, axis=-1)
    cols = np.arange(y.shape[-1])
    near = np.abs(cols[None, None, :] - arg[..., None]) <= window
    z = np.where(near, y, -np.inf)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    mid = (p * cols).sum(-1) / p.sum(-1)
    return mid, thick


def run_centres(y: np.ndarray) -> np.ndarray:
    """Per part and row: centre of the run of columns with H(y) >= 0.5 around the arg-max, edges interpolated.

    Wide parts (the head) have a flat plateau of logits, whose arg-max wanders;
    the middle of the plateau's two edges is steadier there.
    """
    cols = y.shape[-1]
    idx = np.arange(cols)
    arg = np.argmax(y, axis=-1)[..., None]
    below = y <= 0.5
    lo = np.where(below & (idx < arg), idx, -1).max(-1) + 1
    hi = np.where(below & (idx > arg), idx, cols).min(-1) - 1
    lo, hi = np.minimum(lo, arg[..., 0]), np.maximum(hi, arg[..., 0])

    def at(i: np.ndarray) -> np.ndarray:
        return np.take_along_axis(y, np.clip(i, 0, cols - 1)[..., None], -1)[..., 0]

    y_lo, y_lo_out = at(lo), at(lo - 1)
    y_hi, y_hi_out = at(hi), at(hi + 1)
    left = np.where(lo > 0, lo - np.clip((y_lo - 0.5) / np.maximum(y_lo - y_lo_out, 1e-6), 0, 1), lo - 0.5)
    right = np.where(hi < cols - 1, hi + np.clip((y_hi - 0.5) / np.maximum(y_hi - y_hi_out, 1e-6), 0, 1), hi + 0.5)
    return (left + right) / 2.0


@dataclass(frozen=True)
class MaskCalibration:
    """How mid-point and thickness become masks, fitted on calibration phantoms (stored in the seg model.json).

    run_centre: per part, take the plateau centre instead of the softmax expectation.
    min_thickness: per part, a part is present on a row when its Heaviside thickness
    reaches this and some column's H(y) exceeds 0.5.
    offset: per part, pixels added to the thickness of present rows (the sigmoid's bias).
    """

    run_centre: tuple[bool, ...] = (False,) * 6
    min_thickness: tuple[float, ...] = (1.0,) * 6
    offset: tuple[float, ...] = (0.0,) * 6

    @classmethod
    def from_json(cls, data: dict | None) -> "MaskCalibration":
        if not data:
            return cls()
        return cls(tuple(bool(v) for v in data["run_centre"]), tuple(float(v) for v in data["min_thickness"]), tuple(float(v) for v in data["offset"]))

    def to_json(self) -> dict:
        return {"run_centre": list(self.run_centre), "min_thickness": list(self.min_thickness), "offset": list(self.offset)}


def part_maps(y0: np.ndarray, y1: np.ndarray, cal: MaskCalibration) -> tuple[np.ndarray, np.ndarray]:
    """Mid-point and thickness per part and row from the Conv11 output of a scan (``y0``) and of its mirror seen unmirrored (``y1``)."""
    m0, t0 = midpoints(y0)
    m1, t1 = midpoints(y1)
    use_run = np.asarray(cal.run_centre, bool)[:, None]
    mid = (m0 + m1) / 2
    if use_run.any():
        mid = np.where(use_run, (run_centres(y0) + run_centres(y1)) / 2, mid)
    t = (t0 + t1) / 2
    present = (np.maximum(y0.max(-1), y1.max(-1)) > 0.5) & (t >= np.asarray(cal.min_thickness)[:, None])
    return mid, np.where(present, np.maximum(t + np.asarray(cal.offset)[:, None], 1.0), 0.0)


def rebuild_masks(mid: np.ndarray, thick: np.ndarray) -> np.ndarray:
    """Hard masks (parts, rows, 128) from mid-point and thickness per scan line."""
    cols = np.arange(COLS)[None, None, :]
    t = np.round(thick)[..., None]
    return (t >= 1) & (np.abs(cols - mid[..., None]) < t / 2 + 1e-6)


@dataclass
class SpineGeometry:
    rows: np.ndarray
    cols: np.ndarray
    angles: np.ndarray
    curves: list[Curve]
    cobb: float
    main: Curve | None
    apex_levels: list[str] = field(default_factory=list)


def spine_geometry(mid: np.ndarray, thick: np.ndarray, sigma: float, min_swing: float = 4.0, min_rows: int = 40) -> SpineGeometry | None:
    """The spine midline (longest run of rows with spine thickness) and its curves; None when too short."""
    rows = thick > 0
    lab, n = ndimage.label(rows)
    if n == 0:
        return None
    sizes = ndimage.sum(rows, lab, index=np.arange(1, n + 1))
    k = int(np.argmax(sizes)) + 1
    idx = np.flatnonzero(lab == k)
    if len(idx) < min_rows:
        return None
    r = idx.astype(np.float64)
    c = mid[idx].astype(np.float64)
    angles = midline_angles(r, c, sigma)
    curves = curves_from_angles(angles, min_swing=min_swing)
    main = max(curves, key=lambda cv: cv.cobb) if curves else None
    span = max(len(idx) - 1, 1)
    levels = [level_at(cv.apex / span) for cv in curves if cv.cobb >= SCOLIOSIS_COBB_DEG]
    return SpineGeometry(r, c, angles, curves, float(main.cobb) if main else 0.0, main, levels)


def implausible_parts(masks: np.ndarray) -> str | None:
    """Why a (6, 416, 128) part segmentation is not a whole body lying in the scanner, or None when it is.

    A whole-body DXA scan segments into the head at the top, the spine below
    it, the pelvis with its cavity, then two legs reaching the feet; a bone
    scan, a radiograph or a CT slice that slipped past the header checks gives
    missing, scattered or misordered parts.
    """
    names = ("head", "spine", "pelvis", "pelvic cavity", "left leg", "right leg")
    rows = [np.flatnonzero(m.any(-1)) for m in masks]
    missing = [names[k] for k, r in enumerate(rows) if len(r) < 4]
    if missing:
        return f"no {', '.join(missing)} found"
    centre = [float(r.mean()) for r in rows]
    if not (centre[0] < centre[1] < centre[2] and centre[1] < centre[3]):
        return "the head, spine and pelvis are not in anatomical order from top to bottom"
    if not min(centre[4], centre[5]) > centre[2]:
        return "the legs do not lie below the pelvis"
    area = masks.reshape(len(masks), -1).mean(-1)
    # fractions of the 416 x 128 grid, two to three times wider than the phantoms' spread (head 0.026-0.030, legs 0.084-0.106)
    lo = np.array([0.01, 0.007, 0.02, 0.003, 0.03, 0.03])
    hi = np.array([0.08, 0.06, 0.12, 0.04, 0.22, 0.22])
    odd = [names[k] for k in range(len(names)) if not lo[k] <= area[k] <= hi[k]]
    if odd:
        return f"the {', '.join(odd)} cover an implausible area"
    extent = [(r[-1] - r[0] + 1) / max(len(r), 1) for r in rows]
    if max(extent) > 1.6:
        return "a body part is scattered over separate strips of the image"
    return None


@dataclass(frozen=True)
class ReportedCurve:
    """A scoliotic curve of the midline: Cobb angle, apex and end vertebrae (level names), indices along the midline."""

    curve: Curve
    cobb: float
    apex: str
    upper: str
    lower: str


MIN_CURVE_EXTENT = 0.2
"""Shortest curve, as a fraction of the T1-L5 midline (about 3.5 levels); shorter swings are segmentation jitter."""
END_MARGIN = 0.06
"""A curve whose apex lies in the first or last 6 % of the midline is an artefact of its ends (the spurious "T1" curve)."""


def scored_curves(geo: SpineGeometry, threshold: float = SCOLIOSIS_COBB_DEG, min_extent: float = MIN_CURVE_EXTENT, end_margin: float = END_MARGIN) -> list[ReportedCurve]:
    """The midline's curves of ``threshold`` degrees or more that span enough of the spine, top to bottom."""
    span = max(len(geo.rows) - 1, 1)
    out = []
    for c in geo.curves:
        apex = c.apex / span
        if c.cobb < threshold or (c.lower - c.upper) / span < min_extent or not end_margin <= apex <= 1 - end_margin:
            continue
        out.append(ReportedCurve(c, float(c.cobb), level_at(apex), level_at(c.upper / span), level_at(min(c.lower / span, 0.999))))
    return out


def reported_curves(p_scoliosis: float, p_curves: np.ndarray, geo: SpineGeometry | None, threshold: float = 0.5) -> list[ReportedCurve]:
    """Curves reported only where the classifier and the midline agree.

    The classifier must call scoliosis and the midline must show a curve of
    10 degrees or more; the classifier's number-of-curves class caps how many
    (largest first, at most three), listed top to bottom.
    """
    if geo is None or p_scoliosis < threshold:
        return []
    curves = scored_curves(geo)
    cap = 3 if CURVE_CLASSES[int(np.argmax(p_curves))] == ">1" else 1
    keep = sorted(curves, key=lambda rc: -rc.cobb)[:cap]
    return sorted(keep, key=lambda rc: rc.curve.upper)


@dataclass
class Prediction:
    p_scoliosis: float
    p_positioning: float
    p_curves: np.ndarray
    logits: np.ndarray
    """Conv11 output of the unflipped pass, (6, 416, 128)."""
    mid: np.ndarray
    thick: np.ndarray
    masks: np.ndarray
    evidence: np.ndarray
    """Scoliosis evidence on the 416 x 128 grid, [0, 1]."""
    geometry: SpineGeometry | None


def predict(x: np.ndarray, seg: SegFn, cls: ClsFn, sigma: float, min_swing: float = 4.0, cal: MaskCalibration | None = None) -> Prediction:
    """Both networks on a normalised scan and its mirror image; averages as in the paper's test-time flip."""
    batch = np.stack([x, x[:, ::-1]])[:, None].astype(np.float32)
    y = seg(batch)
    out = cls(batch, y.astype(np.float32))
    p_s = float(out["p_scoliosis"][:, 1].mean())
    p_p = float(out["p_positioning"][:, 1].mean())
    p_c = out["p_curves"].mean(0)
    ev_small = (out["evidence"][0] + out["evidence"][1][:, ::-1]) / 2
    ev = ndimage.zoom(ev_small, (ROWS / ev_small.shape[0], COLS / ev_small.shape[1]), order=1, grid_mode=True, mode="nearest")
    ev = np.clip(ev / max(float(ev.max()), 1e-6), 0, 1)
    mid, thick = part_maps(y[0], mirror(y[1][None])[0], cal or MaskCalibration())
    masks = rebuild_masks(mid, thick)
    geo = spine_geometry(mid[1], thick[1], sigma, min_swing)
    return Prediction(p_s, p_p, p_c, y[0], mid, thick, masks, ev.astype(np.float32), geo)


def deviation_mm(geo: SpineGeometry, curve: Curve, mm_per_px: float) -> tuple[int, float]:
    """Index along the midline and lateral deviation in mm of a curve's most deviated point."""
    i, d = lateral_deviation(geo.rows, geo.cols, curve)
    return i, d * mm_per_px
