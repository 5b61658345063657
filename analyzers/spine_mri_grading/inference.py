"""The array pipeline: detect vertebrae slice by slice, label them T12-S1 by a chain model, regress corners, grade discs.

Networks come in as callables (ONNX sessions in the node, torch modules in
training), so the figures in ``metrics.json`` come from the code path the node
runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from . import preprocess
from .constants import DETECTOR_STRIDE, GRADINGS, LEVELS, N_CLASSES, VERTEBRAE

DetectorFn = Callable[[np.ndarray], np.ndarray]
"""(N, 1, S, S) canvases -> (N, 8, S/4, S/4) raw detector outputs."""
CornerFn = Callable[[np.ndarray], np.ndarray]
"""(N, 1, C, C) crops -> (N, 8) corners in crop units."""
GradingFn = Callable[[np.ndarray], np.ndarray]
"""(N, 9, H, W) disc volumes -> (N, sum of classes) logits."""

PEAK_THRESHOLD = 0.15
SACRUM_FLOOR = 0.02
TRACK_MM = 9.0
"""Peaks on neighbouring slices closer than this in-plane belong to the same vertebra."""
HIGH_COST = 25.0
"""Cost of a pair outside the trained geometric box (thesis eq. 3.3: one high constant)."""
SIZE_MM = 30.0
"""Detector sizes are log(size / SIZE_MM)."""


@dataclass
class Candidate:
    """A vertebral body seen on one or more slices: position (column, row) in canonical pixels of its best slice."""

    kind: int
    """0: vertebral body above the sacrum, 1: sacrum (S1)."""
    score: float
    slice: float
    centre: np.ndarray
    height_mm: float
    depth_mm: float
    angle: float
    """Axis angle (radians); the endplates run along (cos, -sin)."""
    slices: list[int] = field(default_factory=list)


@dataclass
class ChainPrior:
    """Trained bounds of the pairwise geometry (thesis eq. 3.3), per adjacent pair from S1 upwards."""

    low: np.ndarray
    high: np.ndarray
    """(6, 4): per pair (S1-L5, L5-L4, ... L1-T12) the box of (dx mm, dy mm, area ratio, dangle deg)."""

    def to_json(self) -> dict:
        return {"low": self.low.round(3).tolist(), "high": self.high.round(3).tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "ChainPrior":
        return cls(np.asarray(data["low"], dtype=np.float64), np.asarray(data["high"], dtype=np.float64))


def pair_features(lower: Candidate, upper: Candidate, pixel_mm: float) -> np.ndarray:
    """(dx, dy, area ratio, dangle) from a body to the one above: dx anterior-posterior, dy upwards, mm and degrees."""
    d = (lower.centre - upper.centre) * pixel_mm
    area = (upper.height_mm * upper.depth_mm) / max(lower.height_mm * lower.depth_mm, 1e-6)
    return np.array([-d[0], d[1], area, np.degrees(lower.angle - upper.angle)])


@dataclass
class Vertebra:
    label: str
    candidate: Candidate
    corners: np.ndarray
    """(4, 2) AS, PS, PI, AI corners (column, row) in canonical pixels on slice ``slice``."""

    @property
    def slice(self) -> int:
        return int(round(self.candidate.slice))


@dataclass
class DiscResult:
    level: str
    geometry: preprocess.DiscGeometry
    probabilities: list[np.ndarray]
    """One probability vector per grading, in GRADINGS order."""
    gated: str | None = None
    """Why this disc's grades are withheld, if they are."""

    @property
    def grades(self) -> list[int]:
        return [int(np.argmax(p)) for p in self.probabilities]


@dataclass
class Prediction:
    vertebrae: dict[str, Vertebra]
    discs: list[DiscResult]
    chain_cost: float
    problems: list[str]
    candidates: int


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def detect(vol: np.ndarray, pixel_mm: float, det_fn: DetectorFn) -> list[Candidate]:
    """Peaks of the detector's heatmaps on every slice, grouped across slices into candidates."""
    canvases, maps = zip(*(preprocess.detector_canvas(s, pixel_mm) for s in vol))
    out = det_fn(np.stack(canvases)[:, None].astype(np.float32))
    peaks: list[tuple[int, int, float, np.ndarray, float, float, float]] = []
    for k, (o, cmap) in enumerate(zip(out, maps)):
        heat = _sigmoid(o[:2])
        for kind in (0, 1):
            h = heat[kind]
            local = (h == ndimage.maximum_filter(h, size=3)) & (h > PEAK_THRESHOLD)
            if kind == 1:
                # the sacrum is the chain's anchor: its best peak on each slice stays a candidate, weak or not
                local |= (h == h.max()) & (h > SACRUM_FLOOR)
            for r, c in zip(*np.nonzero(local)):
                off = _sigmoid(o[2:4, r, c])
                canvas_pt = (np.array([c, r]) + off) * DETECTOR_STRIDE
                centre = cmap.to_image(canvas_pt)
                size = np.exp(o[4:6, r, c]) * SIZE_MM
                angle = float(np.arctan2(o[6, r, c], o[7, r, c]))
                peaks.append((kind, k, float(h[r, c]), centre, float(size[0]), float(size[1]), angle))
    return _tracks(peaks, pixel_mm)


def _tracks(peaks: list, pixel_mm: float) -> list[Candidate]:
    peaks = sorted(peaks, key=lambda p: -p[2])
    tracks: list[list] = []
    for p in peaks:
        for t in tracks:
            if t[0][0] != p[0] or any(q[1] == p[1] for q in t):
                continue
            if np.linalg.norm(t[0][3] - p[3]) * pixel_mm < TRACK_MM and min(abs(q[1] - p[1]) for q in t) == 1:
                t.append(p)
                break
        else:
            tracks.append([p])
    out = []
    for t in tracks:
        best = t[0]
        strong = [q for q in t if q[2] >= 0.5 * best[2]]
        w = np.array([q[2] for q in strong])
        sl = float(np.sum(w * np.array([q[1] for q in strong])) / w.sum())
        k_mid = min(strong, key=lambda q: abs(q[1] - sl))
        out.append(Candidate(best[0], best[2], sl, k_mid[3], k_mid[4], k_mid[5], k_mid[6], sorted(q[1] for q in t)))
    return out


# ---------------------------------------------------------------------------
# Chain model
# ---------------------------------------------------------------------------


def label_chain(cands: list[Candidate], prior: ChainPrior, pixel_mm: float) -> tuple[dict[str, Candidate], float]:
    """Viterbi over the chain S1 (from the sacrum pool), L5, ..., T12 (from the body pool); thesis eqs. 3.2-3.4.

    Match cost -log(score); pair cost HIGH_COST per geometric property outside its trained box.
    Returns the labelled candidates and the total cost (inf when there is no sacrum or too few bodies).
    """
    sacra = [c for c in cands if c.kind == 1]
    bodies = [c for c in cands if c.kind == 0]
    if not sacra or len(bodies) < len(VERTEBRAE) - 1:
        return {}, float("inf")
    match = lambda c: -np.log(max(c.score, 1e-6))  # noqa: E731
    cost = np.array([match(c) for c in sacra])
    back: list[np.ndarray] = []
    prev = sacra
    for node in range(1, len(VERTEBRAE)):
        pair = np.zeros((len(prev), len(bodies)))
        for i, p in enumerate(prev):
            for j, b in enumerate(bodies):
                f = pair_features(p, b, pixel_mm)
                if p is b or f[1] <= 0:
                    # eq. 3.4: one candidate, one node; each node above the last keeps a body from coming back
                    pair[i, j] = np.inf
                    continue
                outside = (f < prior.low[node - 1]) | (f > prior.high[node - 1])
                pair[i, j] = HIGH_COST * int(outside.sum())
        total = cost[:, None] + pair
        idx = np.argmin(total, axis=0)
        cost = total[idx, np.arange(len(bodies))] + np.array([match(b) for b in bodies])
        back.append(idx)
        prev = bodies
    j = int(np.argmin(cost))
    best = float(cost[j])
    chosen = [j]
    for idx in reversed(back[1:]):
        chosen.append(int(idx[chosen[-1]]))
    s1 = int(back[0][chosen[-1]])
    labels = list(reversed(VERTEBRAE))  # S1, L5, ..., T12
    picked = {labels[0]: sacra[s1]}
    for node, cj in zip(range(len(VERTEBRAE) - 1, 0, -1), chosen):
        picked[labels[node]] = bodies[cj]
    # the same body in two nodes through a non-adjacent path is still not allowed
    if len({id(c) for c in picked.values()}) < len(picked):
        return picked, float("inf")
    return picked, best


PRIOR_FLOOR = np.array([8.0, 8.0, 0.25, 15.0])
"""Least widening of each bound (mm, mm, ratio, degrees): the detector's sizes and angles are noisier than the truth's."""


def fit_prior(chains: list[dict[str, Candidate]], pixel_mm: list[float], margin: float = 0.15) -> ChainPrior:
    """Bounds of the pairwise features over truth chains, widened by ``margin`` of their range and at least PRIOR_FLOOR."""
    feats = []
    for chain, px in zip(chains, pixel_mm):
        order = list(reversed(VERTEBRAE))
        feats.append([pair_features(chain[a], chain[b], px) for a, b in zip(order[:-1], order[1:])])
    f = np.array(feats)
    lo, hi = f.min(axis=0), f.max(axis=0)
    widen = np.maximum(margin * (hi - lo), PRIOR_FLOOR)
    return ChainPrior(lo - widen, hi + widen)


# ---------------------------------------------------------------------------
# Corners, discs, grades
# ---------------------------------------------------------------------------


def refine_corners(vol: np.ndarray, picked: dict[str, Candidate], pixel_mm: float, corner_fn: CornerFn) -> dict[str, Vertebra]:
    crops, frames = [], []
    names = [n for n in VERTEBRAE if n in picked]
    for name in names:
        c = picked[name]
        k = int(np.clip(round(c.slice), 0, vol.shape[0] - 1))
        crop, frame = preprocess.corner_crop(vol[k], c.centre, c.angle, c.height_mm / pixel_mm, c.depth_mm / pixel_mm)
        crops.append(crop)
        frames.append(frame)
    uv = corner_fn(np.stack(crops)[:, None].astype(np.float32)).reshape(len(names), 4, 2)
    return {n: Vertebra(n, picked[n], preprocess.from_crop(f, p)) for n, f, p in zip(names, frames, uv)}


def tta_batches(vol: np.ndarray, geom: preprocess.DiscGeometry) -> np.ndarray:
    """Test-time augmentation (thesis 4.2.3.2, reduced): slice window -1/0/+1, each with its slice-wise reflection."""
    out = []
    for shift in (-1, 0, 1):
        v = preprocess.disc_volume(vol, geom, shift)
        out += [v, v[::-1]]
    return np.stack(out)


def softmax_heads(logits: np.ndarray) -> list[np.ndarray]:
    out, i = [], 0
    for n in N_CLASSES:
        z = logits[..., i: i + n]
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        out.append(z / z.sum(axis=-1, keepdims=True))
        i += n
    return out


DISC_GAP_MM = (1.0, 25.0)
ENDPLATE_CROSSING_MM = 1.0
ENDPLATE_TILT_DEG = 60.0
BODY_HEIGHT_MM = (12.0, 45.0)
BODY_DEPTH_MM = (18.0, 65.0)


def _crossing_mm(upper: np.ndarray, lower: np.ndarray, pixel_mm: float) -> float:
    """How far (mm) the lower body's upper corners reach above the upper body's lower ones, along the disc's axis."""
    axis = (lower[0] + lower[1]) / 2 - (upper[3] + upper[2]) / 2
    axis = axis / max(float(np.linalg.norm(axis)), 1e-9)
    return float(-min((lower[0] - upper[3]) @ axis, (lower[1] - upper[2]) @ axis) * pixel_mm)


def predict(vol: np.ndarray, pixel_mm: float, det_fn: DetectorFn, corner_fn: CornerFn, grade_fn: GradingFn, prior: ChainPrior) -> Prediction:
    """The whole pipeline on a canonical volume; problems name every failed plausibility check."""
    cands = detect(vol, pixel_mm, det_fn)
    picked, cost = label_chain(cands, prior, pixel_mm)
    problems: list[str] = []
    if not np.isfinite(cost) or len(picked) < len(VERTEBRAE):
        n_s, n_b = sum(c.kind == 1 for c in cands), sum(c.kind == 0 for c in cands)
        if n_s == 0:
            why = "no sacrum was found"
        elif n_b < len(VERTEBRAE) - 1:
            why = f"only {n_b} vertebral body candidates were found"
        else:
            why = f"no chain of six bodies above a sacrum was found among {n_b} candidates"
        return Prediction({}, [], float("inf"), [f"the vertebrae could not be labelled T12-S1: {why}"], len(cands))
    n_outside = int(round((cost - sum(-np.log(max(c.score, 1e-6)) for c in picked.values())) / HIGH_COST))
    if n_outside:
        # a chain that only closes by breaking the spine's trained geometry labels the wrong bodies: nothing downstream is trusted
        why = f"the best chain T12-S1 breaks {n_outside} trained geometric bound{'s' if n_outside > 1 else ''} between neighbouring vertebrae"
        return Prediction({}, [], cost, [f"the vertebrae could not be labelled T12-S1 consistently: {why}"], len(cands))
    verts = refine_corners(vol, picked, pixel_mm, corner_fn)
    for v in verts.values():
        h = float(np.linalg.norm((v.corners[0] + v.corners[1]) / 2 - (v.corners[2] + v.corners[3]) / 2)) * pixel_mm
        d = float(np.linalg.norm((v.corners[0] + v.corners[3]) / 2 - (v.corners[1] + v.corners[2]) / 2)) * pixel_mm
        if v.label != "S1" and not (BODY_HEIGHT_MM[0] <= h <= BODY_HEIGHT_MM[1] and BODY_DEPTH_MM[0] <= d <= BODY_DEPTH_MM[1]):
            problems.append(f"{v.label} measures {h:.0f} x {d:.0f} mm, outside a plausible vertebral body")
    discs: list[DiscResult] = []
    batches, geoms = [], []
    for level, (a, b) in zip(LEVELS, zip(VERTEBRAE[:-1], VERTEBRAE[1:])):
        up, lo = verts[a], verts[b]
        geom = preprocess.disc_geometry(up.corners, lo.corners, (up.candidate.slice + lo.candidate.slice) / 2)
        gap = geom.height_gap_px * pixel_mm
        gated = None
        if not DISC_GAP_MM[0] <= gap <= DISC_GAP_MM[1]:
            gated = f"{level}: the endplates are {gap:.1f} mm apart, outside {DISC_GAP_MM[0]:.0f}-{DISC_GAP_MM[1]:.0f} mm"
        elif geom.tilt_deg > ENDPLATE_TILT_DEG:
            gated = f"{level}: the endplates meet at {geom.tilt_deg:.0f} degrees"
        elif _crossing_mm(up.corners, lo.corners, pixel_mm) > ENDPLATE_CROSSING_MM:
            gated = f"{level}: the endplates of the vertebrae above and below cross"
        geoms.append((level, geom, gated))
        batches.append(tta_batches(vol, geom))
    logits = grade_fn(np.concatenate(batches).astype(np.float32))
    n_tta = batches[0].shape[0]
    probs = softmax_heads(logits.reshape(len(geoms), n_tta, -1).mean(axis=1))
    for i, (level, geom, gated) in enumerate(geoms):
        discs.append(DiscResult(level, geom, [p[i] for p in probs], gated))
        if gated:
            problems.append(gated)
    return Prediction(verts, discs, cost, problems, len(cands))


def grading_table(pred: Prediction) -> list[dict[str, object]]:
    """One row per disc in the layout of the SpineNet demo: level, then every grading's class (None when withheld)."""
    rows = []
    for d in pred.discs:
        row: dict[str, object] = {"level": d.level}
        for g, k in zip(GRADINGS, d.grades):
            row[g.column] = None if d.gated else (k + 1 if g.key == "pfirrmann_grade" else k)
        rows.append(row)
    return rows
