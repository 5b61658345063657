"""Phantom lumbar MR studies: multi-slice sagittal T2 (and T1) series with per-disc grades and geometry.

Anatomy, top to bottom: T10 (or T11) to the sacrum (S1 body, fused S2-S4). Every
vertebral body is an elliptic cylinder (cortex, textured marrow), every disc an
annulus with a nucleus; the canal behind the bodies holds bright CSF with nerve
roots, the posterior elements sit behind it. Lordosis, body sizes, disc heights,
the sacral slope and the lateral position of every level (scoliosis puts discs
off the midline) vary from study to study, as do the field of view, slice count
and spacing, pixel spacing, coil shading, noise and the vendor's orientation
convention.

Grades are drawn per patient from the real SPIDER gradings (van der Graaf et
al., 1,520 discs; ``../shared/traindata/mri``), so their frequencies and
co-occurrences are real; each grade is then turned into a continuous quantity
drawn across its threshold (constants.py), and the label written to the truth
follows from that quantity. SPIDER grades central canal stenosis nowhere and
disc narrowing only as present/absent: stenosis is drawn from a prior that
rises with degeneration and slip, narrowing's severity from the height loss.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from analyzers import phantoms

from .constants import (
    ENDPLATE_DEFECT_MM,
    GRADING_KEYS,
    LEVELS,
    MARROW_CHANGE_MM,
    NARROWING_CUTS,
    PFIRRMANN_CUTS,
    SLIP_FRACTION,
    STENOSIS_FRACTION,
    VERTEBRAE,
)

SPIDER_CSV = Path(__file__).resolve().parents[2] / ".." / "shared" / "traindata" / "mri" / "spider_radiological_gradings.csv"
CHAIN = ("T10", "T11", *VERTEBRAE)
"""Vertebrae drawn above the sacrum's fused segments; T10 and T11 may fall outside the field of view."""
# Fallback per-disc frequencies (SPIDER marginals) for a clone without ../shared.
_FALLBACK = {"pfirrmann": (286, 341, 418, 291, 184), "narrowing": 544 / 1520, "up": 614 / 1520, "low": 623 / 1520,
             "modic": (1006, 4, 503, 7), "slip": 42 / 1520}


@dataclass
class Body:
    """One vertebral body in the mid-plane: upper endplate centre, axis angle, size; mm in the image plane."""

    name: str
    top: np.ndarray
    angle: float
    height: float
    depth: float
    lateral: float
    half_width: float

    @property
    def axis(self) -> np.ndarray:
        """Unit vector from the upper to the lower endplate, in (column, row) mm."""
        return np.array([np.sin(self.angle), np.cos(self.angle)])

    @property
    def normal(self) -> np.ndarray:
        """Unit vector towards posterior."""
        return np.array([np.cos(self.angle), -np.sin(self.angle)])

    @property
    def centre(self) -> np.ndarray:
        return self.top + self.axis * self.height / 2

    def depth_at(self, x: float) -> float:
        """AP depth of the body's section at lateral position x (mm); 0 outside it."""
        q = (x - self.lateral) / self.half_width
        return float(self.depth * np.sqrt(max(0.0, 1.0 - q * q)))

    def corners(self, depth: float | None = None) -> np.ndarray:
        """Anterior-superior, posterior-superior, posterior-inferior, anterior-inferior corners (mm)."""
        d = self.depth if depth is None else depth
        bottom = self.top + self.axis * self.height
        n = self.normal * d / 2
        return np.array([self.top - n, self.top + n, bottom + n, bottom - n])


@dataclass
class Disc:
    level: str
    grades: dict[str, int]
    values: dict[str, float]
    """The continuous quantities behind the grades (degeneration, height loss, notch depths...)."""
    height: float = 0.0


@dataclass
class Phantom:
    """A rendered study: T2 (and T1) volumes in canonical orientation with their truth.

    Canonical orientation: rows run superior to inferior, columns anterior to
    posterior, slices by increasing lateral position ``slice_x`` (mm).
    """

    t2: np.ndarray
    t1: np.ndarray | None
    pixel_mm: float
    slice_x: np.ndarray
    bodies: list[Body]
    discs: list[Disc]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def slice_mm(self) -> float:
        return float(self.slice_x[1] - self.slice_x[0])

    def body(self, name: str) -> Body:
        return next(b for b in self.bodies if b.name == name)

    def mid_slice(self, name: str) -> float:
        """The (fractional) slice index of a body's lateral centre."""
        b = self.body(name)
        return float((b.lateral - self.slice_x[0]) / self.slice_mm)


# ---------------------------------------------------------------------------
# Grades
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def spider_patients() -> tuple[dict[str, tuple[int, ...]], ...]:
    """SPIDER patients with all six discs T12-L1..L5-S1: per level (Modic, up, low, slip, narrowing, Pfirrmann)."""
    path = SPIDER_CSV.resolve()
    if not path.is_file():
        return ()
    by_patient: dict[str, dict[str, tuple[int, ...]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            label = int(row["IVD label"])
            if not 1 <= label <= 6:
                continue
            # SPIDER numbers discs from the bottom: 1 is L5-S1, 6 is T12-L1
            level = LEVELS[6 - label]
            by_patient.setdefault(row["Patient"], {})[level] = tuple(
                int(row[k]) for k in ("Modic", "UP endplate", "LOW endplate", "Spondylolisthesis", "Disc narrowing", "Pfirrman grade")
            )
    return tuple(p for p in by_patient.values() if len(p) == 6)


def _spider_rows(rng: np.random.Generator) -> dict[str, tuple[int, ...]]:
    patients = spider_patients()
    if patients:
        return patients[int(rng.integers(len(patients)))]
    f = _FALLBACK
    rows = {}
    for lvl in LEVELS:
        pf = int(rng.choice(5, p=np.array(f["pfirrmann"]) / sum(f["pfirrmann"]))) + 1
        rows[lvl] = (int(rng.choice(4, p=np.array(f["modic"]) / sum(f["modic"]))), int(rng.random() < f["up"]), int(rng.random() < f["low"]),
                     int(rng.random() < f["slip"]), int(rng.random() < f["narrowing"]), pf)
    return rows


def _bin(value: float, cuts: tuple[float, ...]) -> int:
    return int(np.searchsorted(np.asarray(cuts), value, side="right"))


def draw_grades(rng: np.random.Generator, enrich: float = 0.0) -> list[Disc]:
    """Grades of the six discs of one patient, with the continuous quantities behind them.

    ``enrich`` in [0, 1] raises the rare findings (slip, stenosis) for training sets only.
    """
    rows = _spider_rows(rng)
    discs = []
    for i, level in enumerate(LEVELS):
        modic, up, low, slip, narrow, pf = rows[level]
        if enrich and rng.random() < 0.12 * enrich:
            slip = 1
        # a continuous score around each SPIDER grade, spread over the neighbouring bins' edges
        degeneration = float(np.clip(pf + rng.uniform(-0.62, 0.62), 0.55, 5.45))
        if narrow:
            loss = 0.14 + 0.66 * rng.beta(1.3, 2.2)
        else:
            loss = rng.uniform(0.0, 0.24)
        loss = float(np.clip(loss + 0.08 * max(0.0, degeneration - 4.5), 0.0, 0.8))
        up_depth = float(ENDPLATE_DEFECT_MM * (rng.uniform(0.85, 3.2) if up else rng.uniform(0.0, 1.15)))
        low_depth = float(ENDPLATE_DEFECT_MM * (rng.uniform(0.85, 3.2) if low else rng.uniform(0.0, 1.15)))
        upper_band = lower_band = 0.0
        band_kind = 0
        if modic:
            band_kind = 2 if modic == 3 else 1
            upper_on = rng.random() < 0.8
            lower_on = (not upper_on) or rng.random() < 0.8
            upper_band = MARROW_CHANGE_MM * (rng.uniform(0.85, 3.5) if upper_on else rng.uniform(0.0, 1.1))
            lower_band = MARROW_CHANGE_MM * (rng.uniform(0.85, 3.5) if lower_on else rng.uniform(0.0, 1.1))
        else:
            upper_band = MARROW_CHANGE_MM * rng.uniform(0.0, 1.1) * (rng.random() < 0.4)
            lower_band = MARROW_CHANGE_MM * rng.uniform(0.0, 1.1) * (rng.random() < 0.4)
            band_kind = 1
        slip_fraction = float(SLIP_FRACTION * (rng.uniform(0.85, 3.0) if slip else rng.uniform(0.0, 1.1) * (rng.random() < 0.5)))
        p_stenosis = 0.02 + 0.05 * (i >= 3) + 0.06 * (degeneration > 3.5) + 0.08 * (loss > 0.4) + 0.3 * (slip_fraction > SLIP_FRACTION) + 0.2 * enrich
        stenotic = rng.random() < p_stenosis
        canal_loss = float(STENOSIS_FRACTION * (rng.uniform(0.88, 1.6) if stenotic else rng.uniform(0.0, 1.12) * (rng.random() < 0.6)))
        values = {
            "degeneration": degeneration,
            "height_loss": loss,
            "upper_endplate_depth_mm": up_depth,
            "lower_endplate_depth_mm": low_depth,
            "upper_marrow_band_mm": float(upper_band),
            "lower_marrow_band_mm": float(lower_band),
            "marrow_band_kind": float(band_kind),
            "slip_fraction": slip_fraction,
            "canal_loss": canal_loss,
        }
        grades = {
            "pfirrmann_grade": _bin(degeneration, PFIRRMANN_CUTS),
            "disc_narrowing": _bin(loss, NARROWING_CUTS),
            "upper_endplate_defect": int(up_depth > ENDPLATE_DEFECT_MM),
            "lower_endplate_defect": int(low_depth > ENDPLATE_DEFECT_MM),
            "upper_marrow_change": int(upper_band > MARROW_CHANGE_MM),
            "lower_marrow_change": int(lower_band > MARROW_CHANGE_MM),
            "spondylolisthesis": int(slip_fraction > SLIP_FRACTION),
            "central_canal_stenosis": int(canal_loss > STENOSIS_FRACTION),
        }
        assert tuple(grades) == GRADING_KEYS
        discs.append(Disc(level, grades, values))
    return discs


# ---------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------

_ANGLES = {"T10": 6.0, "T11": 4.0, "T12": 1.0, "L1": -3.0, "L2": -7.0, "L3": -8.0, "L4": -3.0, "L5": 8.0}


def build_anatomy(rng: np.random.Generator, discs: list[Disc]) -> tuple[list[Body], list[Body]]:
    """The chain T10..S1 and the fused sacral segments below, in mm of the mid-sagittal plane (origin T10 top)."""
    scale = rng.uniform(0.88, 1.12)
    lordosis = rng.uniform(0.4, 1.6)
    scol_amp, scol_phase = rng.uniform(0.0, 9.0) * (rng.random() < 0.5), rng.uniform(0, 2 * np.pi)
    by_level = {d.level: d for d in discs}
    sacral_slope = np.deg2rad(rng.uniform(30.0, 48.0))
    bodies: list[Body] = []
    top = np.array([0.0, 0.0])
    for i, name in enumerate(CHAIN):
        lumbar = name[0] != "T"
        if name == "S1":
            angle = sacral_slope
            height, depth = rng.uniform(24.0, 30.0) * scale, rng.uniform(42.0, 50.0) * scale
        elif name == "L5":
            # the L5-S1 disc is a wedge of 8-18 degrees under the sacral slope
            angle = sacral_slope - np.deg2rad(rng.uniform(8.0, 18.0))
            height = rng.uniform(24.0, 29.0) * scale
            depth = rng.uniform(34.0, 42.0) * scale
        else:
            angle = np.deg2rad(_ANGLES[name] * lordosis + rng.normal(0.0, 2.0))
            height = rng.uniform(24.0, 29.0 if lumbar else 25.0) * scale
            depth = rng.uniform(34.0, 42.0) * scale if lumbar else rng.uniform(29.0, 34.0) * scale
        lateral = scol_amp * np.sin(scol_phase + 0.5 * i)
        body = Body(name, top.copy(), float(angle), float(height), float(depth), float(lateral), float(depth * rng.uniform(0.62, 0.72)))
        if bodies:
            prev = bodies[-1]
            level = f"{prev.name}-{name}"
            disc = by_level.get(level)
            base = (rng.uniform(0.26, 0.32) if lumbar else rng.uniform(0.17, 0.22)) * (prev.depth + depth) / 2
            loss = disc.values["height_loss"] if disc else 0.0
            height_d = base * (1.0 - loss)
            slip = disc.values["slip_fraction"] if disc else 0.0
            t = prev.axis + body.axis
            t /= np.linalg.norm(t)
            n = np.array([t[1], -t[0]])
            bottom = prev.top + prev.axis * prev.height
            # posterior endplate edges line up; the slip moves the lower body back against the upper
            body.top = bottom + t * height_d + n * (slip * prev.depth + (depth - prev.depth) / 2 * 0.5)
            # a wedge-shaped disc keeps a third of its height at its thin edge: no endplate crosses the other
            gap = min(float((body.corners()[k] - prev.corners()[j]) @ t) for k, j in ((0, 3), (1, 2)))
            if gap < height_d / 3:
                body.top = body.top + t * (height_d / 3 - gap)
            if disc:
                disc.height = float(height_d)
        bodies.append(body)
        top = body.top + body.axis * body.height
    sacrum = bodies[-1]
    fused = []
    top = sacrum.top + sacrum.axis * sacrum.height
    angle, depth = sacrum.angle, sacrum.depth
    for k, h in enumerate((20.0, 17.0, 14.0)):
        angle += np.deg2rad(rng.uniform(6.0, 14.0))
        depth *= 0.78
        b = Body(f"S{k + 2}", top + np.array([np.sin(angle), np.cos(angle)]) * 2.0, float(angle), h * scale, float(depth), sacrum.lateral, sacrum.half_width * 0.9)
        fused.append(b)
        top = b.top + b.axis * b.height
    return bodies, fused


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

_T2 = {"csf": 1.0, "root": 0.35, "annulus": 0.2, "cortex": 0.08, "muscle": 0.22, "fat": 0.68, "belly": 0.34, "posterior": 0.36, "ligament": 0.14}
_T1 = {"csf": 0.12, "root": 0.3, "annulus": 0.3, "cortex": 0.08, "muscle": 0.3, "fat": 0.95, "belly": 0.4, "posterior": 0.55, "ligament": 0.14}


class _Canvas:
    def __init__(self, shape: tuple[int, int], pixel_mm: float, origin: np.ndarray) -> None:
        self.img = np.zeros(shape, np.float32)
        self.pixel_mm = pixel_mm
        self.origin = origin  # mm of pixel (0, 0) in anatomy coordinates

    def window(self, centre: np.ndarray, radius: float) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
        c = (centre - self.origin) / self.pixel_mm
        r = radius / self.pixel_mm + 2
        c0, c1 = int(max(0, np.floor(c[0] - r))), int(min(self.img.shape[1], np.ceil(c[0] + r)))
        r0, r1 = int(max(0, np.floor(c[1] - r))), int(min(self.img.shape[0], np.ceil(c[1] + r)))
        if c0 >= c1 or r0 >= r1:
            return None
        cols = self.origin[0] + (np.arange(c0, c1) + 0.5) * self.pixel_mm
        rows = self.origin[1] + (np.arange(r0, r1) + 0.5) * self.pixel_mm
        return slice(r0, r1), slice(c0, c1), cols[None, :] - centre[0], rows[:, None] - centre[1]

    def box(self, centre: np.ndarray, normal: np.ndarray, depth: float, height: float, value, round_mm: float = 2.0, soft: float = 0.6,
            u_range: tuple[float, float] | None = None) -> None:
        """Paint an oriented rounded box (depth along ``normal``, height across it); value: scalar or full-size array."""
        if depth <= 0 or height <= 0:
            return
        w = self.window(centre, np.hypot(depth, height) / 2 + 1)
        if w is None:
            return
        rs, cs, dx, dy = w
        u = dx * normal[0] + dy * normal[1]
        v = dx * normal[1] - dy * normal[0]
        r = min(round_mm, depth / 2, height / 2)
        qx, qy = np.abs(u) - depth / 2 + r, np.abs(v) - height / 2 + r
        sd = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r
        alpha = np.clip(0.5 - sd / max(soft, 1e-3), 0.0, 1.0)
        if u_range is not None:
            alpha *= (u >= u_range[0]) & (u <= u_range[1])
        self.blend(rs, cs, alpha, value)

    def ellipse(self, centre: np.ndarray, normal: np.ndarray, a: float, b: float, value, soft: float = 0.6) -> None:
        w = self.window(centre, max(a, b) + 1)
        if w is None or a <= 0 or b <= 0:
            return
        rs, cs, dx, dy = w
        u = dx * normal[0] + dy * normal[1]
        v = dx * normal[1] - dy * normal[0]
        rad = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        alpha = np.clip((1.0 - rad) * min(a, b) / max(soft, 1e-3) + 0.5, 0.0, 1.0)
        self.blend(rs, cs, alpha, value)

    def blend(self, rs: slice, cs: slice, alpha: np.ndarray, value) -> None:
        target = self.img[rs, cs]
        val = value[rs, cs] if isinstance(value, np.ndarray) else value
        target += alpha * (val - target)


def _texture(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    t = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return t / max(float(t.std()), 1e-6)


def render_slice(x: float, bodies: list[Body], fused: list[Body], discs: list[Disc], style: dict[str, Any], contrast: dict[str, float],
                 shape: tuple[int, int], pixel_mm: float, origin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cv = _Canvas(shape, pixel_mm, origin)
    tex = _texture(rng, shape, 1.6 / pixel_mm)
    coarse = _texture(rng, shape, 6.0 / pixel_mm)
    t1 = contrast is _T1
    marrow = style["marrow"] * (1.35 if t1 else 1.0)
    chain = bodies[:-1]
    sacrum = bodies[-1]
    mean_dir = np.mean([b.axis for b in bodies], axis=0)
    mean_dir /= np.linalg.norm(mean_dir)
    mean_n = np.array([mean_dir[1], -mean_dir[0]])
    spine_mid = np.mean([b.centre for b in bodies], axis=0)
    # torso: belly in front, muscle behind, a fat layer under the skin at both ends
    length = 900.0
    cv.box(spine_mid + mean_n * (style["post_skin"] - style["ant_skin"]) / 2, mean_n, style["post_skin"] + style["ant_skin"], length, contrast["fat"], round_mm=20)
    cv.box(spine_mid - mean_n * (style["ant_skin"] - style["fat_mm"]) / 2, mean_n, style["ant_skin"] - style["fat_mm"], length, contrast["belly"] * (1 + 0.25 * coarse), round_mm=20)
    cv.box(spine_mid + mean_n * (style["post_skin"] - style["fat_mm"]) / 2, mean_n, style["post_skin"] - style["fat_mm"], length, contrast["muscle"] * (1 + 0.08 * coarse), round_mm=10)

    canal_x = np.mean([b.lateral for b in bodies])
    canal_half = style["canal_half_width"]
    in_canal = abs(x - canal_x) < canal_half
    # posterior elements and canal, level by level
    for b in chain + [sacrum]:
        cd = style["canal_depth"] * (0.7 if b is sacrum else 1.0)
        centre = b.centre + b.normal * (b.depth / 2 + 1.0)
        if in_canal:
            q = (x - canal_x) / canal_half
            depth = cd * np.sqrt(max(0.0, 1 - q * q))
            cv.box(centre + b.normal * (depth / 2), b.normal, depth, b.height + 14.0, contrast["csf"], round_mm=1.0)
            for k in range(2):
                off = (0.35 + 0.3 * k) * depth
                cv.box(centre + b.normal * off, b.normal, 1.2, b.height + 14.0, contrast["root"], round_mm=0.5)
            back = centre + b.normal * (cd + 16.0)
            cv.box(back, b.normal, 30.0, b.height * 0.7, contrast["posterior"] * (1 + 0.1 * tex), round_mm=4)
        elif abs(x - canal_x) < canal_half + 12:
            cv.box(centre + b.normal * (cd / 2 + 2), b.normal, cd + 6, b.height * 0.45, contrast["posterior"] * (1 + 0.1 * tex), round_mm=3)
    # discs
    for upper, lower, disc in zip(bodies[:-1], bodies[1:], [None, None] + discs):
        d_up, d_lo = upper.depth_at(x), lower.depth_at(x)
        if d_up <= 0 or d_lo <= 0:
            continue
        bottom = upper.top + upper.axis * upper.height
        t = (upper.axis + lower.axis)
        t /= np.linalg.norm(t)
        n = np.array([t[1], -t[0]])
        centre = (bottom + lower.top) / 2
        height = float(np.linalg.norm(lower.top - bottom)) + 2.0
        depth = (d_up + d_lo) / 2 * 1.02
        values = disc.values if disc else {"degeneration": 1.2, "canal_loss": 0.0}
        deg = values["degeneration"]
        cv.box(centre, n, depth, height, contrast["annulus"] * (1 + 0.1 * tex), round_mm=3.0)
        frac = (d_up + d_lo) / (upper.depth + lower.depth)
        if t1:
            nucleus = marrow * (0.55 - 0.05 * (deg - 1))
        else:
            nucleus = marrow * (2.05 - 0.36 * (deg - 1))
        hetero = 0.04 + 0.07 * max(0.0, deg - 1.5)
        soft = 0.8 + 0.9 * max(0.0, deg - 2.0)
        cv.ellipse(centre - n * depth * 0.04, n, depth * (0.36 - 0.025 * deg) * frac ** 0.3, max(height * 0.3, 1.0),
                   nucleus * (1 + hetero * tex), soft=soft)
        if deg > 2.2 and not t1:
            cv.box(centre, n, depth * 0.5, 0.9, contrast["annulus"], round_mm=0.4, soft=0.5 + 1.0 / (deg - 1.5))
        # canal narrowing at the disc: bulge from the front, ligament from behind
        loss = values.get("canal_loss", 0.0)
        if in_canal and loss > 0:
            cd = style["canal_depth"]
            wall = centre + n * (depth / 2)
            front, back = 0.6 * loss * cd, 0.4 * loss * cd
            cv.ellipse(wall, n, front + 1.0, height / 2 + 4.0, contrast["annulus"] * 1.2)
            cv.ellipse(wall + n * (cd + 1.0), n, back + 1.0, height / 2 + 5.0, contrast["ligament"])
    # vertebral bodies with endplate notches and marrow bands
    by_level = {d.level: d for d in discs}
    for b in chain + [sacrum] + fused:
        d = b.depth_at(x)
        if d <= 0:
            continue
        cv.box(b.centre, b.normal, d, b.height, contrast["cortex"], round_mm=2.5)
        m = marrow * style["marrow_by"].get(b.name, 1.0)
        cv.box(b.centre, b.normal, d - 2.4, b.height - 2.4, m * (1 + 0.07 * tex), round_mm=2.0)
        for side, level in (("upper", _level_above(b.name)), ("lower", _level_below(b.name))):
            disc = by_level.get(level) if level else None
            if disc is None:
                continue
            # this body's endplate facing the disc: the disc's lower endplate is this body's upper one
            endplate = "lower" if side == "upper" else "upper"
            v = disc.values
            band = v[f"{endplate}_marrow_band_mm"]
            edge = b.top if side == "upper" else b.top + b.axis * b.height
            inward = b.axis if side == "upper" else -b.axis
            if band > 0.3:
                bright = m * (1.55 if v["marrow_band_kind"] < 1.5 else 0.45)
                if t1 and v["marrow_band_kind"] < 1.5:
                    bright = m * 0.6
                cv.box(edge + inward * (1.2 + band / 2), b.normal, d - 3.0, band, bright, round_mm=min(1.5, band / 2), soft=0.8)
            notch = v[f"{endplate}_endplate_depth_mm"]
            if notch > 0.2:
                pos = style["notch_pos"][level][endplate] * d * 0.3
                cv.ellipse(edge + b.normal * pos, b.normal, style["notch_width"] * min(1.0, d / b.depth + 0.2), notch + 0.6,
                           nucleus_value(v["degeneration"], marrow, t1), soft=0.5)
    img = cv.img
    return img


def nucleus_value(deg: float, marrow: float, t1: bool) -> float:
    return marrow * ((0.55 - 0.05 * (deg - 1)) if t1 else (1.6 - 0.25 * (deg - 1)))


def _level_above(name: str) -> str | None:
    if name not in VERTEBRAE or name == VERTEBRAE[0]:
        return None
    i = VERTEBRAE.index(name)
    return f"{VERTEBRAE[i - 1]}-{name}"


def _level_below(name: str) -> str | None:
    if name not in VERTEBRAE or name == VERTEBRAE[-1]:
        return None
    i = VERTEBRAE.index(name)
    return f"{name}-{VERTEBRAE[i + 1]}"


def render(rng: np.random.Generator, with_t1: bool = False, enrich: float = 0.0) -> Phantom:
    """One study: grades, anatomy, a sagittal T2 volume (and a T1 one) in canonical orientation."""
    discs = draw_grades(rng, enrich)
    bodies, fused = build_anatomy(rng, discs)
    pixel_mm = float(rng.uniform(1.05, 1.35))
    t12 = next(b for b in bodies if b.name == "T12")
    s1 = bodies[-1]
    # field of view from T10/T11 to S2-S4: the top edge between mid-T10 and the T11-T12 disc
    top_edge = rng.uniform(bodies[0].centre[1], t12.top[1] - 4.0)
    fov = max(float(rng.uniform(290.0, 340.0)), s1.centre[1] + 45.0 - top_edge)
    n_pix = int(round(fov / pixel_mm / 2)) * 2
    spine_a = np.mean([b.centre[0] for b in bodies])
    left_edge = spine_a - fov * rng.uniform(0.58, 0.7)
    origin = np.array([left_edge, top_edge])
    spacing = float(rng.uniform(3.3, 4.5))
    n_slices = int(rng.integers(11, 16))
    offset = float(rng.uniform(-5.0, 5.0))
    slice_x = offset + (np.arange(n_slices) - (n_slices - 1) / 2) * spacing
    style = {
        "marrow": float(rng.uniform(0.38, 0.5)),
        "marrow_by": {b.name: float(rng.uniform(0.94, 1.06)) for b in bodies + fused},
        "canal_depth": float(rng.uniform(14.0, 19.0)),
        "canal_half_width": float(rng.uniform(9.0, 12.0)),
        "ant_skin": float(rng.uniform(130.0, 230.0)),
        "post_skin": float(rng.uniform(70.0, 110.0)),
        "fat_mm": float(rng.uniform(8.0, 30.0)),
        "notch_width": float(rng.uniform(5.0, 9.0)),
        "notch_pos": {lvl: {"upper": float(rng.uniform(-1, 1)), "lower": float(rng.uniform(-1, 1))} for lvl in LEVELS},
    }
    shading = (float(rng.uniform(0.0, 0.6)), float(rng.uniform(-0.2, 0.2)))
    noise = float(rng.uniform(0.012, 0.04))
    volumes = []
    for contrast in ([_T2, _T1] if with_t1 else [_T2]):
        slices = []
        for x in slice_x:
            img = render_slice(float(x), bodies, fused, discs, style, contrast, (n_pix, n_pix), pixel_mm, origin, rng)
            slices.append(img)
        vol = np.stack(slices)
        cols = (np.arange(n_pix) + 0.5) / n_pix
        rows = (np.arange(n_pix) + 0.5) / n_pix
        # receive coil behind the spine: brighter posteriorly, a gentle top-bottom slope
        gain = 1.0 + shading[0] * (cols[None, :] - 0.6) + shading[1] * (rows[:, None] - 0.5)
        vol = vol * np.clip(gain, 0.4, 2.0)[None]
        vol = np.sqrt((vol + rng.normal(0, noise, vol.shape)) ** 2 + rng.normal(0, noise, vol.shape) ** 2)
        volumes.append(vol.astype(np.float32))
    to_px = lambda p: (p - origin) / pixel_mm  # noqa: E731 (mm -> pixel, used for the truth only)
    meta = {"origin_mm": origin, "to_px": to_px}
    return Phantom(volumes[0], volumes[1] if with_t1 else None, pixel_mm, slice_x, bodies, discs, meta)


def corners_px(ph: Phantom, name: str, x: float | None = None) -> np.ndarray:
    """A body's four corners (column, row) in pixels of the canonical slices, at lateral x (default its centre)."""
    b = ph.body(name)
    d = b.depth if x is None else b.depth_at(x)
    return (b.corners(d) - ph.meta["origin_mm"]) / ph.pixel_mm


def truth_of(ph: Phantom) -> dict[str, Any]:
    """Per-study truth: vertebrae (mid-slice index, corners in canonical pixels), discs (grades, quantities)."""
    return {
        "pixel_mm": ph.pixel_mm,
        "slice_mm": ph.slice_mm,
        "vertebrae": {
            b.name: {"slice": ph.mid_slice(b.name), "corners_px": corners_px(ph, b.name).round(3).tolist()}
            for b in ph.bodies if b.name in VERTEBRAE
        },
        "discs": {d.level: {"grades": d.grades, "values": {k: round(v, 4) for k, v in d.values.items()}} for d in ph.discs},
    }


# ---------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------


def series_datasets(vol: np.ndarray, ph: Phantom, patient: phantoms.PhantomPatient, rng: np.random.Generator, *, t1: bool,
                    series_number: int, convention: dict[str, Any]) -> list:
    """The slices of one volume as MR Image Storage instances in the vendor convention drawn for the study."""
    scale = 4000.0 / max(float(np.percentile(vol, 99.9)), 1e-6) * convention["gain"]
    stored = np.clip(np.rint(vol * scale), 0, 4095).astype(np.uint16)
    # canonical columns run anterior -> posterior (+y), rows superior -> inferior (-z)
    row_dir = np.array([0.0, 1.0, 0.0]) * (-1 if convention["flip_columns"] else 1)
    col_dir = np.array([0.0, 0.0, -1.0])
    tilt = np.deg2rad(convention["tilt_deg"])
    rot = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    row_dir, col_dir = rot @ row_dir, rot @ col_dir
    n_pix = vol.shape[2]
    frame_uid = phantoms.new_uid("frame", patient.study_uid)
    desc = "T1 TSE SAG" if t1 else convention["t2_description"]
    series_uid = phantoms.new_uid("series", patient.study_uid, desc, series_number)
    order = list(range(vol.shape[0]))
    if convention["right_to_left"]:
        order = order[::-1]
    out = []
    for number, k in enumerate(order, start=1):
        img = stored[k][:, ::-1] if convention["flip_columns"] else stored[k]
        # patient x of the slice: canonical slice order runs towards the patient's left (+x)
        x = float(ph.slice_x[k])
        first_col = (n_pix - 1) if convention["flip_columns"] else 0
        corner_mm = ph.meta["origin_mm"] + ph.pixel_mm * 0.5
        centre_offset = np.array([x, 0.0, 0.0])
        # pixel (0, 0) centre in patient space: anatomy mm (a, s) -> y = a, z = -s
        a0 = corner_mm[0] + first_col * ph.pixel_mm
        pos = centre_offset + rot @ np.array([0.0, a0, -corner_mm[1]])
        attrs = {
            "ImageOrientationPatient": [f"{v:.6f}" for v in (*row_dir, *col_dir)],
            "ImagePositionPatient": [f"{v:.4f}" for v in pos],
            "SliceThickness": f"{ph.slice_mm * 0.9:.3f}",
            "SpacingBetweenSlices": f"{ph.slice_mm:.3f}",
            "SliceLocation": f"{x:.3f}",
            "FrameOfReferenceUID": frame_uid,
            "PositionReferenceIndicator": "",
            "ScanningSequence": "SE",
            "SequenceVariant": "SK",
            "ScanOptions": "",
            "MRAcquisitionType": "2D",
            "EchoTime": f"{(11.0 if t1 else convention['te']):.1f}",
            "RepetitionTime": f"{(550.0 if t1 else convention['tr']):.1f}",
            "EchoTrainLength": 3 if t1 else 17,
            "MagneticFieldStrength": convention["field"],
            "PatientPosition": "HFS",
            "Laterality": "",  # the spine is unpaired; dciodvfy asks for the (empty) attribute when BodyPartExamined is missing
            "ImagesInAcquisition": vol.shape[0],
        }
        if convention["body_part"]:
            attrs["BodyPartExamined"] = "LSPINE"
        ds = phantoms.image_dataset(
            img, patient=patient, modality="MR", sop_class_uid=phantoms.MR_IMAGE, series_uid=series_uid,
            series_number=series_number, instance_number=number, series_description=desc,
            pixel_spacing=(ph.pixel_mm, ph.pixel_mm), bits_stored=12, attributes=attrs,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        out.append(ds)
    return out


def draw_convention(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "flip_columns": bool(rng.random() < 0.2),
        "right_to_left": bool(rng.random() < 0.5),
        "tilt_deg": float(rng.uniform(-8.0, 8.0)),
        "gain": float(rng.uniform(0.5, 1.0)),
        "te": float(rng.uniform(85.0, 120.0)),
        "tr": float(rng.uniform(2800.0, 5000.0)),
        "field": float(rng.choice([1.5, 3.0])),
        "body_part": bool(rng.random() < 0.8),
        "t2_description": str(rng.choice(["T2 TSE SAG", "t2_tse_sag", "SAG T2 FSE", "L-SPINE T2 SAG"])),
    }


def write_phantoms(out_dir: Path, n: int, seed: int) -> list[Path]:
    """Write ``n`` studies (sagittal T2 and T1 series) with ``truth.json`` beside each."""
    out_dir = Path(out_dir)
    folders = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        ph = render(rng, with_t1=True)
        patient = phantoms.PhantomPatient.make(rng, "smr", seed * 100000 + i, study_description="MR LUMBAR SPINE")
        convention = draw_convention(rng)
        folder = out_dir / f"study_{i:04d}"
        t2 = series_datasets(ph.t2, ph, patient, rng, t1=False, series_number=3, convention=convention)
        t1 = series_datasets(ph.t1, ph, patient, rng, t1=True, series_number=2, convention=convention)
        for ds in t1 + t2:
            phantoms.save(ds, folder)
        truth = truth_of(ph)
        truth.update({"study_instance_uid": patient.study_uid, "t2_series_instance_uid": str(t2[0].SeriesInstanceUID), "seed": [seed, i],
                      "convention": convention})
        phantoms.write_truth(folder, truth)
        folders.append(folder)
    return folders
