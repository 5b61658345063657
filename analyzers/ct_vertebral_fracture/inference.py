"""The array pipeline: volume in, labelled vertebrae with fracture probability, units and heights out.

The networks are passed in as callables (ONNX Runtime sessions in the node, torch modules in
training), so the figures in ``metrics.json`` come from the code path the node runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from dicomnode.analysis import NotApplicable
from analyzers.volume import Volume

from . import preprocess
from .constants import CONTEXT_LEVELS, LEVELS, MIN_VERTEBRAE, NOMINAL_HEIGHT, PATCH_SIZE, REFORMAT_SPACING, TOP_UNITS, genant_grade

DetectorFn = Callable[[np.ndarray], np.ndarray]
"""(1, 3, H, W) float32 reformat -> (1, 2, H, W): centroid heatmap logit, level index."""
ClassifierFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(B, 1, 96, 96, 96) float32 in [0, 1] -> (logits (B,), activations A (B, K, d, d, d))."""

PEAK_THRESHOLD = 0.45
OFF_SPINE_MM = 12.0
"""A peak further than this (anteroposterior) from the curve through its neighbours is not on the spine."""
PEAK_MIN_DISTANCE_MM = 10.0
LABEL_DISAGREEMENT = 0.34
"""Largest share of vertebrae whose own level estimate may be more than a level off the consecutive labelling."""
CRUSH_MARGIN = 1.10
"""The neighbours set the expected height only when it exceeds the vertebra's own tallest height by this factor."""


@dataclass
class Dissection:
    """Network dissection stored with the classifier: per-unit thresholds, correlation, ranking, labels."""

    thresholds: np.ndarray
    correlation: np.ndarray
    ranking: list[int]
    labels: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "Dissection":
        d = extra["dissection"]
        return cls(np.asarray(d["thresholds"], np.float32), np.asarray(d["correlation"], np.float32), [int(k) for k in d["ranking"]],
                   {int(k): v for k, v in d.get("labels", {}).items()})

    def relevance(self, activations: np.ndarray) -> np.ndarray:
        """r_k = sum(M_k * A_k) with M_k = A_k > T_k, for activations (K, ...)."""
        a = activations.reshape(activations.shape[0], -1)
        return np.where(a > self.thresholds[:, None], a, 0.0).sum(axis=1)


@dataclass
class Unit:
    index: int
    relevance: float
    correlation_rank: int
    label: str
    activation: np.ndarray
    """The unit's activation upsampled to the patch (96^3), in [0, 1]."""


@dataclass
class Vertebra:
    label: str
    centroid: np.ndarray
    axis: np.ndarray
    peak: float
    level_estimate: float
    probability: float = float("nan")
    heights: preprocess.Heights | None = None
    expected_height: float | None = None
    height_loss: float | None = None
    grade: int | None = None
    units: list[Unit] = field(default_factory=list)

    @property
    def fractured_by_grade(self) -> bool | None:
        return None if self.grade is None else self.grade >= 1


@dataclass
class Localisation:
    vertebrae: list[Vertebra]
    found: int
    """Vertebral bodies found (before labelling; includes those outside T1-L5)."""
    disagreement: float
    z_extent_mm: float


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def peaks(heat: np.ndarray, threshold: float = PEAK_THRESHOLD, min_distance_px: float = PEAK_MIN_DISTANCE_MM / REFORMAT_SPACING) -> np.ndarray:
    """(row, column) of local maxima of a heatmap in [0, 1], strongest first, at least ``min_distance_px`` apart."""
    size = int(2 * np.floor(min_distance_px / 2) + 1)
    mx = ndimage.maximum_filter(heat, size=size, mode="constant")
    cand = np.argwhere((heat >= mx) & (heat >= threshold))
    cand = cand[np.argsort(-heat[cand[:, 0], cand[:, 1]])]
    kept: list[np.ndarray] = []
    for p in cand:
        if all(np.hypot(*(p - q)) >= min_distance_px for q in kept):
            kept.append(p)
    return np.asarray(kept, dtype=np.float64).reshape(-1, 2)


def on_spine(found: np.ndarray, heat: np.ndarray, spacing: float = REFORMAT_SPACING) -> np.ndarray:
    """Peaks that line up along the spine: each within OFF_SPINE_MM of the median column of its neighbours.

    At one height only the strongest peak stays (a body's centroid, not a rib head beside it).
    """
    if len(found) < 3:
        return found
    found = found[np.argsort(found[:, 0])]
    keep = np.ones(len(found), bool)
    for i, (r, c) in enumerate(found):
        near = np.abs(found[:, 0] - r) <= 40.0 / spacing
        near[i] = False
        if near.sum() >= 2 and abs(c - np.median(found[near, 1])) > OFF_SPINE_MM / spacing:
            keep[i] = False
    found = found[keep]
    out: list[np.ndarray] = []
    for p in found:
        if out and abs(p[0] - out[-1][0]) < 8.0 / spacing:
            if heat[int(p[0]), int(p[1])] > heat[int(out[-1][0]), int(out[-1][1])]:
                out[-1] = p
            continue
        out.append(p)
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def consecutive_labels(level_estimates: np.ndarray) -> tuple[np.ndarray, float]:
    """Integer levels for vertebrae ordered head to feet: consecutive, offset by the median estimate.

    Returns the levels and the share of vertebrae whose own estimate is more than one level away.
    """
    est = np.asarray(level_estimates, dtype=np.float64)
    rank = np.arange(len(est))
    offset = int(np.round(np.median(est - rank)))
    levels = offset + rank
    return levels, float(np.mean(np.abs(est - levels) > 1.0)) if len(est) else 0.0


def localise(volume: Volume, detector: DetectorFn) -> Localisation:
    """Vertebral bodies from the sagittal reformat, labelled by anatomical order; raises NotApplicable when too few."""
    iso, grid = preprocess.resampled(volume, REFORMAT_SPACING)
    if float(np.percentile(iso, 99.9)) < preprocess.BONE_HU:
        raise NotApplicable("no bone was found in the volume; this analyzer needs a CT of the thoracolumbar spine")
    mid = preprocess.midline(iso)
    ref = preprocess.reformat(iso, mid)
    del iso
    padded, (h, w) = preprocess.pad_to(ref)
    out = detector(padded[None].astype(np.float32))[0]
    heat = _sigmoid(out[0, :h, :w])
    level_map = out[1, :h, :w]
    found = on_spine(peaks(heat), heat)
    z_extent = grid.shape[0] * grid.spacing
    zmax = grid.origin[2] + (grid.shape[0] - 1) * grid.spacing
    order = np.argsort(found[:, 0]) if len(found) else np.zeros(0, int)
    found = found[order]
    if len(found) < MIN_VERTEBRAE:
        raise NotApplicable(
            f"too few vertebrae to label their levels: {len(found)} vertebral bod{'y' if len(found) == 1 else 'ies'} found in "
            f"{z_extent:.0f} mm of the spine, at least {MIN_VERTEBRAE} are needed; send a series that covers more of the thoracolumbar spine"
        )
    est = np.array([ndimage.map_coordinates(level_map, [[r], [c]], order=1)[0] for r, c in found])
    levels, disagreement = consecutive_labels(est)
    if disagreement > LABEL_DISAGREEMENT:
        raise NotApplicable(
            f"the vertebral levels could not be labelled consistently ({disagreement:.0%} of {len(found)} vertebrae are more than a level "
            "off their order); the series may not show the spine's landmarks (ribs, lungs, sacrum) clearly"
        )
    cents = []
    for (r, c) in found:
        z = zmax - r * grid.spacing
        k = int(np.clip(round(r), 0, h - 1))
        x_idx = float(mid[::-1][k])
        cents.append([grid.origin[0] + x_idx * grid.spacing, grid.origin[1] + c * grid.spacing, z])
    cents = np.asarray(cents)
    axes = preprocess.spine_axes(cents)
    out_v = []
    for i, lev in enumerate(levels):
        if 0 <= lev < len(CONTEXT_LEVELS) and CONTEXT_LEVELS[lev] in LEVELS:
            out_v.append(Vertebra(CONTEXT_LEVELS[lev], cents[i], axes[i], float(heat[int(found[i, 0]), int(found[i, 1])]), float(est[i])))
    return Localisation(out_v, len(found), disagreement, z_extent)


def classify(volume: Volume, vertebrae: list[Vertebra], classifier: ClassifierFn, dissection: Dissection, batch: int = 4,
             top_units: int = TOP_UNITS, height_bias_mm: float = 0.0) -> None:
    """Fracture probability, relevant units and heights per vertebra (in place); patches go through in small batches."""
    for i0 in range(0, len(vertebrae), batch):
        chunk = vertebrae[i0: i0 + batch]
        hu = [preprocess.patch(volume, v.centroid, v.axis) for v in chunk]
        x = np.stack([preprocess.unit_hu(p) for p in hu])[:, None]
        logits, acts = classifier(x)
        for v, p, logit, a in zip(chunk, hu, logits, acts):
            v.probability = float(_sigmoid(np.float64(logit)))
            v.heights = preprocess.heights(p, bias_mm=height_bias_mm)
            v.units = relevant_units(a, dissection, top_units)


def relevant_units(acts: np.ndarray, dissection: Dissection, top: int) -> list[Unit]:
    """The ``top`` units by relevance r_k among those enabled (M_k non-empty), most relevant first."""
    r = dissection.relevance(acts)
    order = [k for k in np.argsort(-r) if r[k] > 0][:top]
    rank = {k: i + 1 for i, k in enumerate(dissection.ranking)}
    out = []
    for k in order:
        a = np.where(acts[k] > dissection.thresholds[k], acts[k], 0.0)
        up = ndimage.zoom(a, PATCH_SIZE / a.shape[0], order=1)
        up = up / up.max() if up.max() > 0 else up
        out.append(Unit(int(k), float(r[k]), rank.get(int(k), len(rank) + 1), dissection.labels.get(int(k), ""), up.astype(np.float32)))
    return out


def grade(vertebrae: list[Vertebra]) -> None:
    """Height loss against the expected height and the Genant grade, per vertebra (in place).

    The expected height is the vertebra's own tallest height, unless its neighbours (up to two
    levels each way, scaled by the nominal height ratio of the levels, ignoring neighbours that
    look deformed) say it should be more than ``CRUSH_MARGIN`` taller: a crush deformity
    lowers every height of the body.
    """
    own = {v.label: max(v.heights.as_list()) for v in vertebrae if v.heights is not None}
    shape_loss = {v.label: 1 - min(v.heights.as_list()) / max(v.heights.as_list()) for v in vertebrae if v.heights is not None}
    for i, v in enumerate(vertebrae):
        if v.heights is None:
            continue
        hmax = own[v.label]
        ratios = []
        for j in range(max(0, i - 2), min(len(vertebrae), i + 3)):
            n = vertebrae[j]
            if j == i or n.label not in own or shape_loss[n.label] >= 0.2:
                continue
            ratios.append(own[n.label] / NOMINAL_HEIGHT[n.label])
        expected = hmax
        if ratios:
            nb = float(np.median(ratios)) * NOMINAL_HEIGHT[v.label]
            if nb > CRUSH_MARGIN * hmax:
                expected = nb
        v.expected_height = float(expected)
        v.height_loss = float(max(0.0, 1 - min(v.heights.as_list()) / expected))
        v.grade = genant_grade(v.height_loss)


def analyse(volume: Volume, detector: DetectorFn, classifier: ClassifierFn, dissection: Dissection, height_bias_mm: float = 0.0) -> Localisation:
    loc = localise(volume, detector)
    classify(volume, loc.vertebrae, classifier, dissection, height_bias_mm=height_bias_mm)
    grade(loc.vertebrae)
    return loc


def slice_heatmap(volume: Volume, v: Vertebra, unit: Unit) -> tuple[int, np.ndarray]:
    """The unit's activation on the source slice through its strongest point: (slice index, map rows x columns)."""
    peak = np.unravel_index(int(np.argmax(unit.activation)), unit.activation.shape)
    pts = preprocess.patch_points(v.centroid, v.axis)
    k = int(np.clip(np.rint(volume.patient_to_index(pts[peak])[0]), 0, volume.array.shape[0] - 1))
    rows, cols = volume.array.shape[1:]
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    world = volume.index_to_patient(np.stack([np.full(rr.shape, k), rr, cc], axis=-1))
    f = preprocess.frame(v.axis)
    rel = world - v.centroid
    half = (PATCH_SIZE - 1) / 2
    # patch axes: spinal from the head down, AP from anterior, lateral (see preprocess.patch_points)
    idx = np.stack([half - rel @ f[2], half + rel @ f[1], half + rel @ f[0]])
    heat = ndimage.map_coordinates(unit.activation, idx.reshape(3, -1), order=1, mode="constant", cval=0.0).reshape(rows, cols)
    return k, np.clip(heat, 0.0, 1.0).astype(np.float32)
