"""Whole-body DXA phantoms of children (9-15 years) with a known spine curve.

The body is drawn from a few anthropometric proportions of the child's height
and build; the spine is a chain of vertebrae (T1-L5, plus the cervical spine)
along a curve whose tangent angle is set by knots, so the Cobb angle, the
number of curves and the apex level are known exactly. Positioning errors tilt
the trunk, the head or the legs. Two header styles are written: clean
densitometry headers (Modality BMD or DX WHOLEBODY, with pixel spacing) and
GE-iDXA-like exports (Modality CR, SeriesDescription "DXA Images", 8-bit, no
BodyPartExamined, no spacing, one instance per view in one series).

Ground truth, per study (``truth.json``): the header style, the SOP instance
UID of the whole-body bone image, the Cobb angle (largest curve, from the
vertebra tilts), number of curves, scoliosis (Cobb >= 10 degrees), positioning
error, apex levels, the lateral deviation in mm and the six part masks
(``truth_masks.npz`` on the bone image's grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analyzers import phantoms as ph

from .constants import LEVEL_HEIGHTS, LEVELS, PARTS
from .geometry import count_curves, curve_class, curves_from_angles, lateral_deviation

BMD_SC = ph.SC_IMAGE


def _entire_body() -> list:
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    item = Dataset()
    code = codes.SCT.EntireBody
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return [item]


DX_ATTRIBUTES = {
    "BodyPartExamined": "WHOLEBODY",
    "PresentationIntentType": "FOR PRESENTATION",
    "ImageLaterality": "U",
    "ViewPosition": "AP",
    "PatientOrientation": ["L", "F"],
    "PresentationLUTShape": "IDENTITY",
    "LossyImageCompression": "00",
    "BurnedInAnnotation": "NO",
    "DetectorType": "",
    "PositionerType": "",
    "AcquisitionContextSequence": [],
    "PixelIntensityRelationship": "LIN",
    "PixelIntensityRelationshipSign": 1,
    "RescaleIntercept": 0,
    "RescaleSlope": 1,
    "RescaleType": "US",
}


@dataclass
class Body:
    """Everything the renderer needs, in millimetres, y downwards from the image top."""

    pixel_mm: float
    rows: int
    cols: int
    height: float
    build: float
    top: float
    cx: float
    knots_s: np.ndarray
    knots_theta: np.ndarray
    trunk_tilt: float = 0.0
    head_tilt: float = 0.0
    leg_angles: tuple[float, float] = (1.5, 1.5)
    """Outward (abduction) angles in degrees of the image-left and image-right leg."""
    truth: dict[str, Any] = field(default_factory=dict)


def _cos_interp(s: np.ndarray, ks: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """Monotone, smooth interpolation between knots (zero slope at each knot)."""
    s = np.clip(s, ks[0], ks[-1])
    i = np.clip(np.searchsorted(ks, s, side="right") - 1, 0, len(ks) - 2)
    t = (s - ks[i]) / np.maximum(ks[i + 1] - ks[i], 1e-9)
    return kv[i] + (kv[i + 1] - kv[i]) * (1 - np.cos(np.pi * t)) / 2


def _cobb_draw(rng: np.random.Generator) -> float:
    """A curve's Cobb angle from a continuous distribution, dense across the 10-degree definition (no gap)."""
    return float(rng.uniform(3, 18) if rng.random() < 0.5 else rng.uniform(18, 45))


def sample_spine(rng: np.random.Generator, kind: str | None = None) -> tuple[str, np.ndarray, np.ndarray]:
    """Knots (s in [0, 1] from T1 top to L5 bottom, tangent angle in degrees) of a spine shape.

    Curvature is continuous across the 10-degree definition: a "straight" spine
    wanders by up to about 9 degrees, a single or double curve is drawn from 3 to
    45 degrees, so the labels (which come from the drawn vertebra tilts) have no
    margin around the threshold (see MODEL_CARD.md).
    """
    kind = kind or str(rng.choice(["straight", "single", "double"], p=[0.3, 0.4, 0.3]))
    sgn = float(rng.choice([-1.0, 1.0]))
    if kind == "straight":
        ks = np.array([0.0, rng.uniform(0.2, 0.45), rng.uniform(0.55, 0.8), 1.0])
        kv = rng.uniform(-1, 1, size=4) * rng.uniform(0.5, 4.4)
        return kind, ks, kv
    if kind == "single":
        cobb = _cobb_draw(rng)
        apex = float(rng.choice([rng.uniform(0.3, 0.5), rng.uniform(0.5, 0.65), rng.uniform(0.65, 0.8)]))
        half = rng.uniform(0.18, 0.3)
        up, lo = max(apex - half, 0.0), min(apex + half, 1.0)
        ks, kv = [up, lo], [sgn * cobb / 2, -sgn * cobb / 2]
        if up > 0.03:
            ks.insert(0, 0.0)
            kv.insert(0, sgn * (cobb / 2 - rng.uniform(0, min(6, cobb / 2))))
        if lo < 0.97:
            ks.append(1.0)
            kv.append(-sgn * (cobb / 2 - rng.uniform(0, min(6, cobb / 2))))
        return kind, np.array(ks), np.array(kv)
    c1, c2 = _cobb_draw(rng), _cobb_draw(rng)
    b = rng.uniform(0.35, 0.65) * min(c1, c2)
    a, c = c1 - b, c2 - b
    e0, e1, e2 = rng.uniform(0.0, 0.12), rng.uniform(0.42, 0.58), rng.uniform(0.88, 1.0)
    ks, kv = [e0, e1, e2], [sgn * a, -sgn * b, sgn * c]
    if e0 > 0.03:
        ks.insert(0, 0.0)
        kv.insert(0, sgn * (a - rng.uniform(0, min(6, a))))
    if e2 < 0.97:
        ks.append(1.0)
        kv.append(sgn * (c - rng.uniform(0, min(6, c))))
    return "double", np.array(ks), np.array(kv)


POSITIONING_LIMITS = {"trunk": 4.0, "head": 8.0, "legs": 6.0}
"""Degrees beyond which a tilted trunk, tilted head or swung/abducted leg is a positioning error."""
POSITIONING_RANGE = {"trunk": 12.0, "head": 25.0, "legs": 16.0}
"""Largest tilt drawn per kind; a loose patient's tilts are uniform from 0 to here, across the limit."""


def positioning_error(trunk_tilt: float, head_tilt: float, leg_angles: tuple[float, float]) -> list[str]:
    """The kinds of positioning error (``trunk``, ``head``, ``legs``) a pose has, by ``POSITIONING_LIMITS``."""
    kinds = []
    if abs(trunk_tilt) >= POSITIONING_LIMITS["trunk"]:
        kinds.append("trunk")
    if abs(head_tilt) >= POSITIONING_LIMITS["head"]:
        kinds.append("head")
    if max(abs(leg_angles[0]), abs(leg_angles[1])) >= POSITIONING_LIMITS["legs"]:
        kinds.append("legs")
    return kinds


def sample_body(rng: np.random.Generator, kind: str | None = None, positioning: bool | None = None) -> Body:
    """A body with a spine shape and a pose drawn from continuous distributions across the positioning limits.

    ``positioning`` forces the pose to be (True) or not to be (False) a positioning error.
    """
    pixel = rng.uniform(3.5, 4.5)
    rows = int(round(rng.uniform(1900, 2000) / pixel))
    cols = int(round(rng.uniform(580, 660) / pixel))
    height = rng.uniform(1280, 1780)
    build = rng.uniform(0.85, 1.25)
    top = rng.uniform(30, max(35.0, rows * pixel - height - 40))
    cx = cols * pixel / 2 + rng.normal(0, 20)
    shape, ks, kv = sample_spine(rng, kind)
    body = Body(pixel, rows, cols, height, build, top, cx, ks, kv)
    for _ in range(100):
        tilt = {"trunk": rng.uniform(-1.5, 1.5), "head": rng.uniform(-4, 4)}
        legs = [rng.uniform(-0.5, 2.5), rng.uniform(-0.5, 2.5)]
        loose = rng.random() < (0.5 if positioning is None else 0.85 if positioning else 0.3)
        if loose:  # one or two parts placed carelessly, by any amount up to the range
            for part in rng.choice(["trunk", "head", "legs"], size=int(rng.integers(1, 3)), replace=False):
                a = float(rng.uniform(0, POSITIONING_RANGE[part]))
                if part == "legs":
                    side = int(rng.integers(0, 2))
                    if rng.random() < 0.5:  # both legs swung to one side
                        legs = [-a, a] if side else [a, -a]
                    else:  # one leg abducted
                        legs[side] = max(a, legs[side])
                else:
                    tilt[part] = float(rng.choice([-1, 1])) * a
        kinds = positioning_error(tilt["trunk"], tilt["head"], (legs[0], legs[1]))
        if positioning is None or bool(kinds) == positioning:
            break
    body.trunk_tilt, body.head_tilt, body.leg_angles = tilt["trunk"], tilt["head"], (legs[0], legs[1])
    body.truth = {"spine_shape": shape, "positioning_error": bool(kinds), "positioning_kinds": kinds}
    return body


class _Canvas:
    """Pixel grids plus helpers for drawing soft-edged shapes in mm coordinates."""

    def __init__(self, body: Body) -> None:
        self.b = body
        self.p = body.pixel_mm
        self.bone = np.zeros((body.rows, body.cols), np.float32)
        self.soft = np.zeros_like(self.bone)
        self.labels = np.zeros((len(PARTS), body.rows, body.cols), bool)
        self.yy = (np.arange(body.rows, dtype=np.float32) + 0.5) * self.p
        self.xx = (np.arange(body.cols, dtype=np.float32) + 0.5) * self.p

    def row_range(self, y0: float, y1: float) -> slice:
        a = int(np.clip(np.floor(y0 / self.p), 0, self.b.rows))
        z = int(np.clip(np.ceil(y1 / self.p), 0, self.b.rows))
        return slice(a, z)

    def band(self, y0: float, y1: float, centre, half, layer: np.ndarray, value: float, profile: str = "flat", label: int | None = None) -> None:
        """Fill rows y0..y1 between centre(y) +- half(y) (callables in mm); 'round' shades as a cylinder."""
        rs = self.row_range(y0, y1)
        y = self.yy[rs]
        if len(y) == 0:
            return
        c = np.asarray(centre(y), np.float32)[:, None]
        h = np.maximum(np.asarray(half(y), np.float32)[:, None], 1e-3)
        d = (self.xx[None, :] - c) / h
        edge = np.clip((1 - np.abs(d)) * h / self.p + 0.5, 0, 1)
        shade = np.sqrt(np.clip(1 - d**2, 0, 1)) if profile == "round" else 1.0
        if layer is self.soft:  # soft tissue of overlapping limbs and trunk does not add up
            np.maximum(layer[rs], value * edge * shade, out=layer[rs])
        else:
            layer[rs] += value * edge * shade
        if label is not None:
            self.labels[label, rs] |= np.abs(d) <= 1

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, angle: float, layer: np.ndarray, value: float, ring: float = 0.0, label: int | None = None, profile: str = "flat") -> None:
        r = max(rx, ry) + 2 * self.p
        rs = self.row_range(cy - r, cy + r)
        a = int(np.clip(np.floor((cx - r) / self.p), 0, self.b.cols))
        z = int(np.clip(np.ceil((cx + r) / self.p), 0, self.b.cols))
        if rs.stop <= rs.start or z <= a:
            return
        y = self.yy[rs][:, None] - cy
        x = self.xx[a:z][None, :] - cx
        t = np.radians(angle)
        u = x * np.cos(t) + y * np.sin(t)
        v = -x * np.sin(t) + y * np.cos(t)
        q = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
        scale = min(rx, ry) / self.p
        inside = np.clip((1 - q) * scale + 0.5, 0, 1)
        val = inside
        if profile == "round":
            val = inside * np.sqrt(np.clip(1 - q**2, 0, 1))
        if ring > 0:
            inner = np.clip((1 - q - ring / min(rx, ry)) * scale + 0.5, 0, 1)
            val = inside - inner * 0.55
        if layer is self.soft:
            np.maximum(layer[rs, a:z], value * val, out=layer[rs, a:z])
        else:
            layer[rs, a:z] += value * val
        if label is not None:
            self.labels[label, rs, a:z] |= q <= 1

    def box(self, cx: float, cy: float, hw: float, hh: float, angle: float, value: float, rim: float = 0.0) -> None:
        r = np.hypot(hw, hh) + 2 * self.p
        rs = self.row_range(cy - r, cy + r)
        a = int(np.clip(np.floor((cx - r) / self.p), 0, self.b.cols))
        z = int(np.clip(np.ceil((cx + r) / self.p), 0, self.b.cols))
        if rs.stop <= rs.start or z <= a:
            return
        y = self.yy[rs][:, None] - cy
        x = self.xx[a:z][None, :] - cx
        t = np.radians(angle)
        u = x * np.cos(t) - y * np.sin(t)
        v = x * np.sin(t) + y * np.cos(t)
        du = np.clip((hw - np.abs(u)) / self.p + 0.5, 0, 1)
        dv = np.clip((hh - np.abs(v)) / self.p + 0.5, 0, 1)
        inside = du * dv
        val = inside * value
        if rim > 0:
            core = np.clip((hw - 1.2 * self.p - np.abs(u)) / self.p + 0.5, 0, 1) * np.clip((hh - 1.2 * self.p - np.abs(v)) / self.p + 0.5, 0, 1)
            val = val + rim * (inside - core)
        self.bone[rs, a:z] += val

    def polyline(self, pts: np.ndarray, value: float, width: float) -> None:
        """Thin bone (ribs, mandible) splatted along a polyline of (x, y) mm points."""
        seg = np.linspace(0, 1, 6)[:, None, None]
        dense = (pts[:-1][None] * (1 - seg) + pts[1:][None] * seg).reshape(-1, 2)
        c = np.floor(dense[:, 0] / self.p).astype(int)
        r = np.floor(dense[:, 1] / self.p).astype(int)
        ok = (c >= 0) & (c < self.b.cols) & (r >= 0) & (r < self.b.rows)
        layer = np.zeros_like(self.bone)
        np.maximum.at(layer, (r[ok], c[ok]), value)
        from scipy.ndimage import gaussian_filter

        self.bone += gaussian_filter(layer, max(width / self.p / 2, 0.5)) * (width / self.p + 0.5)


def render(body: Body, rng: np.random.Generator) -> dict[str, Any]:
    """Draw the whole-body bone and soft-tissue images and the six part masks.

    Returns images in [0, 1] (bone white), masks (6, rows, cols) and the truth.
    """
    cv = _Canvas(body)
    h, b = body.height, body.build
    top, cx = body.top, body.cx
    tilt = body.trunk_tilt

    # --- spine: tangent angle along T1..L5, integrated upwards from the sacrum ---
    y_t1, y_l5 = top + 0.185 * h, top + 0.455 * h
    length = y_l5 - y_t1
    ys = np.linspace(y_t1, y_l5, 400)
    theta = _cos_interp((ys - y_t1) / length, body.knots_s, body.knots_theta) + tilt
    slope = np.tan(np.radians(theta))
    xs = np.concatenate([[0.0], np.cumsum((slope[1:] + slope[:-1]) / 2 * np.diff(ys))])
    xs = xs - xs[-1] + cx
    spine_x = lambda y: np.interp(y, ys, xs)  # noqa: E731
    spine_theta = lambda y: np.interp(y, ys, theta)  # noqa: E731

    edges = np.concatenate([[0.0], np.cumsum(LEVEL_HEIGHTS) / LEVEL_HEIGHTS.sum()])
    centres = y_t1 + length * (edges[:-1] + edges[1:]) / 2
    slot = length * LEVEL_HEIGHTS / LEVEL_HEIGHTS.sum()
    widths = np.concatenate([np.linspace(0.020, 0.027, 12), np.linspace(0.029, 0.032, 5)]) * h * (0.9 + 0.1 * b)
    tilts = spine_theta(centres)

    # cervical spine: from T1 towards the head, straightening to the head's tilt
    y_c3 = top + 0.125 * h
    yc = np.linspace(y_c3, y_t1, 60)
    wc = (yc - y_c3) / (y_t1 - y_c3)
    th_c = tilts[0] * wc + (body.head_tilt * 0.5) * (1 - wc)
    sc = np.tan(np.radians(th_c))
    xc = np.concatenate([[0.0], np.cumsum((sc[1:] + sc[:-1]) / 2 * np.diff(yc))])
    xc = xc - xc[-1] + xs[0]
    neck_x = lambda y: np.interp(y, yc, xc)  # noqa: E731
    shoulder_shift = xs[0] - cx
    trunk_x = lambda y: cx + 0.6 * (spine_x(y) - cx) + 0.4 * shoulder_shift * np.clip((y_l5 - y) / length, 0, 1)  # noqa: E731

    # --- soft tissue: torso, neck, arms, legs, head ---
    y_sh, y_hip = top + 0.175 * h, top + 0.53 * h
    prof_y = np.array([0.175, 0.2, 0.28, 0.38, 0.46, 0.53]) * h + top
    prof_w = np.array([0.10, 0.125, 0.11, 0.088, 0.105, 0.1]) * h * b
    torso_half = lambda y: np.interp(y, prof_y, prof_w)  # noqa: E731
    cv.band(y_sh, y_hip, trunk_x, torso_half, cv.soft, 0.85, "round")
    cv.band(top + 0.11 * h, y_sh + 0.01 * h, neck_x, lambda y: np.full_like(y, 0.028 * h * (0.9 + 0.1 * b)), cv.soft, 0.6, "round")

    for side in (-1, 1):
        y_arm0, y_arm1 = top + 0.185 * h, top + 0.545 * h
        gap = rng.uniform(0.006, 0.02) * h
        def arm_x(y, side=side, gap=gap):
            t = np.clip((y - y_arm0) / (y_arm1 - y_arm0), 0, 1)
            return trunk_x(y_arm0) + side * (np.interp(y, prof_y, prof_w) + gap + 0.025 * h * b + 0.012 * h * t)
        arm_half = lambda y: np.interp(y, [y_arm0, top + 0.36 * h, y_arm1], [0.026 * h * b, 0.02 * h * b, 0.022 * h])  # noqa: E731
        cv.band(y_arm0, y_arm1, arm_x, arm_half, cv.soft, 0.55, "round")
        cv.band(top + 0.2 * h, top + 0.36 * h, arm_x, lambda y: np.full_like(y, 0.0065 * h), cv.bone, 0.55, "round")
        cv.band(top + 0.37 * h, top + 0.49 * h, lambda y, f=arm_x: f(y) - 0.005 * h, lambda y: np.full_like(y, 0.0045 * h), cv.bone, 0.45, "round")
        cv.band(top + 0.37 * h, top + 0.49 * h, lambda y, f=arm_x: f(y) + 0.005 * h, lambda y: np.full_like(y, 0.0045 * h), cv.bone, 0.45, "round")
        cv.ellipse(float(arm_x(np.array([top + 0.515 * h]))[0]), top + 0.515 * h, 0.016 * h, 0.025 * h, 0, cv.bone, 0.3)

    # legs: one interval per row, rotated about the hip joint
    y_knee, y_ankle, y_foot = top + 0.72 * h, top + 0.955 * h, top + 0.995 * h
    pel_y = top + 0.505 * h
    for li, side in ((4, 1), (5, -1)):
        # image-right (side +1) is the patient's left in a supine AP scan
        ang = body.leg_angles[0 if side < 0 else 1]
        x_hip = cx + side * 0.048 * h * (0.9 + 0.1 * b)
        slope_leg = side * np.tan(np.radians(ang))
        leg_x = lambda y, x0=x_hip, s=slope_leg: x0 + (y - pel_y) * s  # noqa: E731
        cosf = 1 / np.cos(np.radians(ang))
        leg_half = lambda y, c=cosf: c * np.interp(y, [y_hip - 0.02 * h, top + 0.6 * h, y_knee, top + 0.8 * h, y_ankle, y_foot], [0.05 * h * b, 0.042 * h * b, 0.027 * h * (0.9 + 0.1 * b), 0.028 * h * b, 0.016 * h, 0.02 * h])  # noqa: E731
        cv.band(y_hip - 0.02 * h, y_foot, leg_x, leg_half, cv.soft, 0.7, "round", label=li)
        cv.band(pel_y + 0.01 * h, y_knee, leg_x, lambda y: np.full_like(y, 0.0095 * h), cv.bone, 0.75, "round")
        cv.band(y_knee + 0.008 * h, y_ankle, leg_x, lambda y: np.full_like(y, 0.0085 * h), cv.bone, 0.7, "round")
        cv.band(y_knee + 0.02 * h, y_ankle - 0.01 * h, lambda y, f=leg_x: f(y) + side * 0.016 * h, lambda y: np.full_like(y, 0.003 * h), cv.bone, 0.4, "round")
        kx = float(leg_x(np.array([y_knee]))[0])
        cv.ellipse(kx, y_knee, 0.022 * h, 0.012 * h, 0, cv.bone, 0.5)
        cv.ellipse(float(leg_x(np.array([pel_y]))[0]), pel_y, 0.012 * h, 0.012 * h, 0, cv.bone, 0.55, ring=0.003 * h)
        fx = float(leg_x(np.array([y_foot - 0.02 * h]))[0])
        cv.ellipse(fx + side * 0.006 * h, y_foot - 0.02 * h, 0.013 * h, 0.022 * h, 0, cv.bone, 0.45)

    # --- head: skull ring + brain case, tilted about the neck ---
    phi = body.head_tilt
    neck_top = np.array([float(neck_x(np.array([y_c3]))[0]), y_c3])
    hc = neck_top + 0.06 * h * np.array([np.sin(np.radians(phi)), -np.cos(np.radians(phi))])
    rx, ry = 0.046 * h * (0.95 + 0.05 * b), 0.062 * h
    cv.ellipse(hc[0], hc[1], rx, ry, phi, cv.soft, 0.7, label=0, profile="round")
    cv.ellipse(hc[0], hc[1], rx * 0.96, ry * 0.96, phi, cv.bone, 0.95, ring=0.006 * h)
    jaw = np.array([[-0.8, 0.35], [-0.6, 0.8], [0.0, 0.98], [0.6, 0.8], [0.8, 0.35]]) * np.array([rx, ry])
    rot = np.array([[np.cos(np.radians(phi)), -np.sin(np.radians(phi))], [np.sin(np.radians(phi)), np.cos(np.radians(phi))]])
    cv.polyline(jaw @ rot.T + hc, 0.6, 0.006 * h)

    # --- vertebrae (T1..L5 labelled as the spine band), cervical chain, ribs ---
    for i in range(len(LEVELS)):
        hh = slot[i] * 0.4
        cv.box(float(spine_x(centres[i])), float(centres[i]), widths[i] / 2, hh, float(tilts[i]), 0.55, rim=0.3)
        for side in (-1, 1):
            cv.ellipse(float(spine_x(centres[i])) + side * widths[i] * 0.3, float(centres[i]) - hh * 0.2, widths[i] * 0.11, hh * 0.35, float(tilts[i]), cv.bone, 0.25)
    for y in np.linspace(y_c3 + 0.008 * h, y_t1 - 0.008 * h, 5):
        cv.box(float(neck_x(np.array([y]))[0]), float(y), 0.0085 * h, 0.0055 * h, 0.0, 0.5, rim=0.2)
    spine_rows = cv.row_range(y_t1 - slot[0] * 0.4 + slot[0] * 0.5, y_l5)
    y = cv.yy[spine_rows]
    half_w = np.interp(y, centres, widths) / 2 / np.cos(np.radians(spine_theta(y)))
    cv.labels[1, spine_rows] = np.abs(cv.xx[None, :] - spine_x(y)[:, None]) <= half_w[:, None]
    for i in range(12):
        for side in (-1, 1):
            y0 = centres[i]
            x0 = float(spine_x(y0)) + side * widths[i] / 2
            reach = float(torso_half(np.array([y0 + 0.03 * h]))[0]) * 0.88 - widths[i] / 2
            t = np.linspace(0, 1, 14)
            pts = np.stack([x0 + side * reach * np.sin(t * np.pi / 2) ** 0.8, y0 + 0.035 * h * t**1.6 + 0.01 * h * np.sin(np.pi * t) * -1], axis=1)
            cv.polyline(pts, 0.32, 0.004 * h)
    for side in (-1, 1):  # clavicles
        x_in = xs[0] + side * 0.012 * h
        x_out = x_in + side * 0.085 * h * b
        pts = np.stack([np.linspace(x_in, x_out, 12), y_t1 - 0.006 * h + 0.008 * h * np.sin(np.linspace(0, np.pi, 12))], axis=1)
        cv.polyline(pts, 0.5, 0.006 * h)

    # --- pelvis: iliac wings, sacrum, pelvic ring with the cavity inside ---
    crest = top + 0.445 * h
    wing = 0.056 * h * (0.9 + 0.1 * b)
    for side in (-1, 1):
        cv.ellipse(cx + side * wing, crest + 0.035 * h, 0.045 * h * (0.9 + 0.1 * b), 0.038 * h, side * 15, cv.bone, 0.5, ring=0.006 * h)
    cv.ellipse(cx, y_l5 + 0.035 * h, 0.022 * h, 0.034 * h, 0, cv.bone, 0.45)
    cav_y = top + 0.508 * h
    cv.ellipse(cx, cav_y, 0.062 * h * (0.9 + 0.1 * b), 0.036 * h, 0, cv.bone, 0.55, ring=0.011 * h)
    cv.ellipse(cx, cav_y, 0.047 * h * (0.9 + 0.1 * b), 0.024 * h, 0, cv.bone, 0.0, label=3)
    pel = np.zeros((body.rows, body.cols), bool)
    rs = cv.row_range(crest, cav_y + 0.036 * h)
    yy = cv.yy[rs]
    left = np.interp(yy, [crest, crest + 0.035 * h, cav_y, cav_y + 0.036 * h], [cx - 1.5 * wing, cx - 2.0 * wing, cx - 1.6 * wing, cx - 0.5 * wing])
    right = 2 * cx - left
    pel[rs] = (cv.xx[None, :] >= left[:, None]) & (cv.xx[None, :] <= right[:, None])
    cv.labels[2] = pel

    # --- truth ---
    curves = curves_from_angles(tilts, min_swing=1.0)
    big = max(curves, key=lambda c: c.cobb) if curves else None
    cobb = big.cobb if big else 0.0
    n = count_curves(curves)
    dev_mm = 0.0
    if big is not None:
        _, dev_mm = lateral_deviation(centres, spine_x(centres), big)
    truth = dict(body.truth)
    truth.update(
        cobb_deg=round(float(cobb), 3),
        n_curves=int(n),
        curves_class=curve_class(n),
        scoliosis=bool(cobb >= 10.0),
        apex_levels=[LEVELS[c.apex] for c in curves if c.cobb >= 10.0],
        curves=[{"cobb_deg": round(c.cobb, 3), "apex": LEVELS[c.apex], "upper": LEVELS[c.upper], "lower": LEVELS[c.lower]} for c in curves if c.cobb >= 10.0],
        curve_cobbs=[round(c.cobb, 3) for c in curves],
        lateral_deviation_mm=round(float(dev_mm), 3),
        vertebra_tilts_deg=[round(float(t), 3) for t in tilts],
        height_mm=round(float(h), 1),
        build=round(float(b), 3),
        trunk_tilt_deg=round(float(tilt), 2),
        head_tilt_deg=round(float(phi), 2),
        leg_angles_deg=[round(float(a), 2) for a in body.leg_angles],
        pixel_mm=round(float(body.pixel_mm), 4),
        spine_midline_px=np.stack([xs / body.pixel_mm - 0.5, ys / body.pixel_mm - 0.5], axis=1)[::10].round(2).tolist(),
    )
    return {"bone": cv.bone, "soft": cv.soft, "masks": cv.labels, "truth": truth}


def finish(img: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    """Scanner look: blur, contrast, noise and line-scan artefacts; returns [0, 1]."""
    from scipy.ndimage import gaussian_filter

    out = gaussian_filter(img, rng.uniform(0.4, 1.0))
    if kind == "bone":
        out = out * rng.uniform(0.75, 1.05)
    out = out + rng.normal(0, rng.uniform(0.008, 0.035), out.shape).astype(np.float32)
    gain = 1 + rng.normal(0, rng.uniform(0.003, 0.03), (out.shape[0], 1)).astype(np.float32)
    out = out * gain
    if rng.random() < 0.4:  # scan-line artefact: a few bright or dark detector rows
        for r in rng.integers(0, out.shape[0], size=int(rng.integers(1, 5))):
            out[r : r + int(rng.integers(1, 3))] += rng.uniform(-0.15, 0.2)
    return np.clip(out, 0, 1).astype(np.float32)


def make_case(rng: np.random.Generator, kind: str | None = None, positioning: bool | None = None) -> dict[str, Any]:
    """One phantom body: bone and soft-tissue images in [0, 1], masks, truth."""
    body = sample_body(rng, kind, positioning)
    out = render(body, rng)
    bone = out["bone"] + 0.18 * out["soft"] * rng.uniform(0.5, 1.2)
    soft = out["soft"] * rng.uniform(0.8, 1.0) + 0.04 * out["bone"]
    out["bone"] = finish(bone, rng, "bone")
    out["soft"] = finish(soft, rng, "soft")
    return out


# ---------------------------------------------------------------------------
# Other DXA views (simple renderings: only selection needs them)
# ---------------------------------------------------------------------------


def _view(rng: np.random.Generator, view: str) -> np.ndarray:
    yy, xx = np.mgrid[0:1:1j * 200, 0:1:1j * 200].astype(np.float32)
    img = np.zeros_like(yy)
    if view == "ap_spine":
        img += 0.25
        for i in range(5):
            cy = 0.12 + i * 0.17
            img += 0.55 * ((np.abs(xx - 0.5) < 0.12) & (np.abs(yy - cy) < 0.065))
        img += 0.35 * (((xx - 0.15) / 0.2) ** 2 + ((yy - 1.0) / 0.2) ** 2 < 1) + 0.35 * (((xx - 0.85) / 0.2) ** 2 + ((yy - 1.0) / 0.2) ** 2 < 1)
    elif view == "hip":
        img += 0.3 * (xx > 0.1)
        img += 0.6 * (((xx - 0.45) / 0.13) ** 2 + ((yy - 0.35) / 0.13) ** 2 < 1)
        img += 0.55 * ((np.abs((xx - 0.55) - 0.3 * (yy - 0.4)) < 0.08) & (yy > 0.35))
        img += 0.4 * (((xx - 0.2) / 0.25) ** 2 + ((yy - 0.15) / 0.15) ** 2 < 1)
    elif view == "knee":
        img += 0.3 * (np.abs(xx - 0.5) < 0.3)
        img += 0.6 * ((np.abs(xx - 0.5) < 0.12) & (yy < 0.45)) + 0.6 * ((np.abs(xx - 0.5) < 0.13) & (yy > 0.55))
        img += 0.4 * (((xx - 0.5) / 0.2) ** 2 + ((yy - 0.5) / 0.07) ** 2 < 1)
    elif view == "lateral_spine":
        yy, xx = np.mgrid[0:1:1j * 420, 0:1:1j * 150].astype(np.float32)
        img = 0.35 + 0.1 * xx
        for i in range(13):
            cy = 0.04 + i * 0.075
            img = img + 0.4 * ((np.abs(xx - 0.45 - 0.05 * np.sin(3 * cy)) < 0.18) & (np.abs(yy - cy) < 0.028))
    img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(img * rng.uniform(0.8, 1.0), 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------
# DICOM studies
# ---------------------------------------------------------------------------


def _window(stored: np.ndarray) -> dict[str, Any]:
    """A VOI window over the 0.5-99.5 percentiles, as a DX-for-presentation image carries one."""
    lo, hi = np.percentile(stored, [0.5, 99.5])
    return {"WindowCenter": f"{(lo + hi) / 2:.1f}", "WindowWidth": f"{max(hi - lo, 2):.1f}"}


def _to_stored(img: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    return np.clip(np.round(img * top), 0, top).astype(dtype)


def write_study(folder: Path, case: dict[str, Any], rng: np.random.Generator, index: int, style: str | None = None) -> dict[str, Any]:
    """Write one phantom study (header style ``bmd``, ``dx`` or ``idxa``) and its truth."""
    style = style or str(rng.choice(["bmd", "dx", "idxa"], p=[0.3, 0.2, 0.5]))
    truth = dict(case["truth"])
    age = float(np.interp(truth["height_mm"], [1280, 1780], [9, 15]) + rng.uniform(-0.8, 0.8))
    patient = ph.PhantomPatient.make(rng, "dxa", index, age_years=float(np.clip(age, 9, 15.9)), study_description="DXA Total Body")
    pixel = truth["pixel_mm"]
    written: list[tuple[str, str]] = []
    # export variants: 12- or 16-bit, MONOCHROME1 (bone dark in the stored values) where the IOD allows it
    bits = 16 if rng.random() < 0.3 else 12
    mono1 = style != "dx" and rng.random() < 0.3
    if style in ("bmd", "dx"):
        kw = dict(patient=patient, pixel_spacing=(pixel, pixel), bits_stored=bits, series_description="Total Body")
        if style == "bmd":
            ds = ph.image_dataset(_to_stored(1 - case["bone"] if mono1 else case["bone"], bits), modality="BMD", sop_class_uid=BMD_SC, photometric="MONOCHROME1" if mono1 else "MONOCHROME2", **kw)
        else:
            stored = _to_stored(case["bone"], bits)
            ds = ph.image_dataset(stored, modality="DX", sop_class_uid=ph.DX_IMAGE_PRESENTATION, attributes={**DX_ATTRIBUTES, **_window(stored), "AnatomicRegionSequence": _entire_body()}, **kw)
        ph.save(ds, folder)
        written.append(("wb_bone", ds.SOPInstanceUID))
        bone_uid = ds.SOPInstanceUID
        if rng.random() < 0.5:  # a soft-tissue image in its own series: select must skip it
            soft = ph.image_dataset(_to_stored(case["soft"], bits), modality=ds.Modality, sop_class_uid=ds.SOPClassUID, series_number=2, **{**kw, "series_description": "Total Body Soft Tissue"}, attributes={**DX_ATTRIBUTES, **_window(_to_stored(case["soft"], bits)), "AnatomicRegionSequence": _entire_body()} if style == "dx" else None)
            ph.save(soft, folder)
            written.append(("wb_soft", soft.SOPInstanceUID))
    else:
        series_uid = ph.new_uid()
        views = {
            "wb_bone": case["bone"],
            "wb_soft": case["soft"],
            "ap_spine": _view(rng, "ap_spine"),
            "hip": _view(rng, "hip"),
            "knee": _view(rng, "knee"),
            "lateral_spine": _view(rng, "lateral_spine"),
        }
        order = list(views)
        rng.shuffle(order)
        bone_uid = ""
        for number, view in enumerate(order, start=1):
            # like such exports: no BodyPartExamined, ViewPosition or spacing (not a conformant CR header)
            pixels = 1 - views[view] if mono1 else views[view]
            ds = ph.image_dataset(_to_stored(pixels, 8), patient=patient, modality="CR", series_uid=series_uid, instance_number=number, series_description="DXA Images", bits_stored=8, photometric="MONOCHROME1" if mono1 else "MONOCHROME2")
            ds.Manufacturer = "GE Healthcare"
            ds.ManufacturerModelName = "Lunar iDXA"
            ph.save(ds, folder)
            written.append((view, ds.SOPInstanceUID))
            if view == "wb_bone":
                bone_uid = ds.SOPInstanceUID
    truth.update(style=style, bits_stored=8 if style == "idxa" else bits, photometric="MONOCHROME1" if mono1 else "MONOCHROME2", wb_bone_sop_uid=bone_uid, instances=dict((v, u) for v, u in written), has_spacing=style != "idxa", study_uid=patient.study_uid)
    np.savez_compressed(folder / "truth_masks.npz", masks=case["masks"], parts=np.array(PARTS))
    ph.write_truth(folder, truth)
    return truth


def write_phantoms(out_dir: Path, n: int, seed: int) -> list[Path]:
    """Write ``n`` phantom studies under ``out_dir`` (one folder each); returns the folders."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    folders = []
    for i in range(n):
        case = make_case(rng)
        folder = out_dir / f"dxa_{seed}_{i:04d}"
        write_study(folder, case, rng, i)
        folders.append(folder)
    return folders


def write_grid(path: Path, n: int = 8, seed: int = 7) -> Path:
    """A PNG of ``n`` phantom bone images side by side (the model card's picture), each scaled to one height."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(n):
        img = Image.fromarray((make_case(rng)["bone"] * 255).astype(np.uint8))
        tiles.append(img.resize((max(1, round(img.width * 400 / img.height)), 400), Image.BILINEAR))
    grid = Image.new("L", (sum(t.width for t in tiles) + 4 * (n - 1), 400))
    x = 0
    for t in tiles:
        grid.paste(t, (x, 0))
        x += t.width + 4
    grid.save(path, optimize=True)
    return Path(path)
