"""The array pipeline from network inputs to masks, cardiothoracic ratio, plausibility and findings.

Torch-free: the networks are passed in as callables that take named numpy
arrays and return a dict of arrays (``dicomnode.runtime.OnnxModel`` does). The
analyzer, the evaluation and the benchmarks all go through these functions.

The U-Net's "heart" is the cardiomediastinal silhouette, as the reference
masks draw it (heart plus the upper mediastinum, overlapping the lungs' medial
edges). The cardiac silhouette for the cardiothoracic ratio is its lower half
(the rows below the midpoint of its vertical extent): the upper mediastinum is
left out, and the heart width is the silhouette's horizontal extent there, from
its right-most to its left-most pixel. The thoracic width is the widest
row-wise distance between the lungs' outer edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from dicomnode.imaging import resize

from .constants import SEGMENTS

Model = Callable[..., dict[str, np.ndarray]]

MIN_LUNG_AREA = 0.04
"""Both lungs together below this fraction of the image: not a frontal chest radiograph."""
MIN_ONE_LUNG_AREA = 0.015
CTR_RANGE = (0.25, 0.85)
"""A cardiothoracic ratio outside this range is a failed segmentation, not a heart."""
MIN_SOLIDITY = 0.6
"""Lung area over its convex hull's: a lung field is compact; scattered blobs are not a lung."""
MAX_UNCERTAIN = 0.5
MIN_LUNG_CONTRAST = 0.05
"""The cardiac silhouette's median grey minus the lungs' (display scale, dense bright): air-filled lungs are darker."""
"""Pixels with a structure probability between 0.2 and 0.8, over the masks' area: above this the segmentation is not trusted."""

# Moore neighbourhood, clockwise from west, as (row, column) offsets.
_NEIGHBOURS = [(0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1)]


# ---------------------------------------------------------------------------
# Masks and outlines
# ---------------------------------------------------------------------------


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D mask (empty stays empty)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def clean_masks(masks: np.ndarray) -> np.ndarray:
    """Keep the largest component of each structure and fill its holes; (3, rows, cols) bool."""
    return np.stack([ndimage.binary_fill_holes(largest_component(m)) for m in masks])


def outline(mask: np.ndarray, max_points: int = 120) -> np.ndarray | None:
    """Outer boundary of the largest component as (column, row) pixel-centre points.

    Traced by Moore-neighbour following, then thinned to at most ``max_points``;
    None when the mask has fewer than 3 boundary points.
    """
    m = largest_component(np.asarray(mask, bool))
    if m.sum() < 3:
        return None
    m = ndimage.binary_fill_holes(m)
    padded = np.pad(m, 1)
    rows, cols = np.nonzero(padded)
    start = (int(rows[0]), int(cols[0]))  # top-most, then left-most pixel
    boundary = [start]
    current, back = start, 0  # came from the west
    for _ in range(4 * padded.size):
        found = False
        for k in range(8):
            d = (back + k) % 8
            r, c = current[0] + _NEIGHBOURS[d][0], current[1] + _NEIGHBOURS[d][1]
            if padded[r, c]:
                # next search starts from the neighbour just before this one
                back = (d + 5) % 8
                current = (r, c)
                found = True
                break
        if not found or current == start:
            break
        boundary.append(current)
    if len(boundary) < 3:
        return None
    pts = np.asarray(boundary, dtype=np.float64)[:, ::-1] - 1.0 + 0.5  # (col, row) centres, unpadded
    step = max(1, int(np.ceil(len(pts) / max_points)))
    pts = pts[::step]
    return pts if len(pts) >= 3 else None


# ---------------------------------------------------------------------------
# Cardiothoracic ratio
# ---------------------------------------------------------------------------


def cardiac_silhouette(heart: np.ndarray) -> np.ndarray:
    """The lower half of the cardiomediastinal mask (rows at or below the midpoint of its vertical extent)."""
    rows = np.flatnonzero(heart.any(axis=1))
    if rows.size == 0:
        return heart.astype(bool)
    mid = (rows[0] + rows[-1]) / 2.0
    out = heart.astype(bool).copy()
    out[: int(np.ceil(mid))] = False
    return out


@dataclass
class CtrGeometry:
    ctr: float
    heart_line: np.ndarray
    """(2, 2) (column, row) end points of the heart width, drawn horizontally at the silhouette's mean row."""
    thorax_line: np.ndarray
    """(2, 2) (column, row) end points of the thoracic width, on the row where it is widest."""
    heart_width_px: int
    thorax_width_px: int


def ctr_geometry(masks: np.ndarray) -> CtrGeometry | None:
    """Heart width over thoracic width, with the two width lines; None when a lung or the heart is missing.

    ``masks`` is (3, rows, columns) bool: right lung, left lung, cardiomediastinal silhouette.
    The ratio needs no pixel spacing.
    """
    lungs = masks[0] | masks[1]
    heart = cardiac_silhouette(masks[2])
    if not heart.any() or not masks[0].any() or not masks[1].any():
        return None
    cols_h = np.flatnonzero(heart.any(axis=0))
    heart_w = int(cols_h[-1] - cols_h[0] + 1)
    heart_row = float(np.nonzero(heart)[0].mean()) + 0.5
    any_row = lungs.any(axis=1)
    first = np.where(any_row, lungs.argmax(axis=1), 0)
    last = np.where(any_row, lungs.shape[1] - 1 - lungs[:, ::-1].argmax(axis=1), -1)
    widths = np.where(any_row, last - first + 1, 0)
    r = int(np.argmax(widths))
    thorax_w = int(widths[r])
    return CtrGeometry(
        ctr=float(heart_w / thorax_w),
        heart_line=np.array([[cols_h[0], heart_row], [cols_h[-1] + 1.0, heart_row]], np.float64),
        thorax_line=np.array([[first[r], r + 0.5], [last[r] + 1.0, r + 0.5]], np.float64),
        heart_width_px=heart_w,
        thorax_width_px=thorax_w,
    )


def cardiothoracic_ratio(masks: np.ndarray) -> float:
    """:func:`ctr_geometry`'s ratio, NaN when a structure is missing."""
    g = ctr_geometry(masks)
    return float("nan") if g is None else g.ctr


# ---------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------


def segment(seg_model: Model, net_inputs: np.ndarray) -> np.ndarray:
    """(N, 3, 224, 224) network inputs to (N, 3, 224, 224) structure probabilities."""
    return seg_model(image=np.ascontiguousarray(net_inputs, np.float32))["seg_prob"]


def full_masks(prob: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One study's (3, 224, 224) probabilities to full-size probabilities and cleaned (3, rows, cols) masks."""
    full_prob = np.stack([resize(p, shape, order=1) for p in prob])
    return full_prob, clean_masks(full_prob > 0.5)


def classifier_mask(prob: np.ndarray) -> np.ndarray:
    """The lungs-and-heart union at the classifier's input size, (1, 1, 224, 224) float32."""
    return clean_masks(prob > 0.5).any(0).astype(np.float32)[None, None]


# ---------------------------------------------------------------------------
# Plausibility gates
# ---------------------------------------------------------------------------


@dataclass
class Verdict:
    """What the gates say: decline the study (not a frontal chest image) or withhold its findings."""

    decline: str | None = None
    withhold: list[str] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)


def _solidity(mask: np.ndarray) -> float:
    from scipy.spatial import ConvexHull, QhullError

    pts = np.argwhere(mask)
    if len(pts) < 10:
        return 0.0
    try:
        hull = ConvexHull(pts)
    except QhullError:
        return 0.0
    return float(mask.sum() / max(hull.volume, 1.0))


def plausibility(prob: np.ndarray, masks: np.ndarray, geometry: CtrGeometry | None, display: np.ndarray) -> Verdict:
    """Gates on lung area and shape, heart within the thorax, lungs darker than the heart, the CTR's range
    and segmentation confidence.

    ``prob`` is the (3, 224, 224) U-Net output, ``masks`` the cleaned full-size masks and
    ``display`` the [0, 1] dense-bright image they lie on.
    """
    v = Verdict()
    area = masks.reshape(3, -1).mean(1)
    v.checks["lung_area"] = float(area[0] + area[1])
    if area[0] + area[1] < MIN_LUNG_AREA:
        v.decline = "no lung fields were found; the image does not look like a frontal chest radiograph"
        return v
    for name, a in zip(SEGMENTS, area):
        if a < MIN_ONE_LUNG_AREA:
            v.withhold.append(f"the {name.replace('_', ' ')} is missing or very small in the segmentation ({a:.1%} of the image)")
    if area[0] >= MIN_ONE_LUNG_AREA and area[1] >= MIN_ONE_LUNG_AREA:
        cx = [float(np.nonzero(m)[1].mean()) for m in masks[:2]]
        if cx[0] >= cx[1]:
            v.withhold.append("the right lung lies on the image's right of the left lung; a mirrored image cannot be read this way")
        hr, hl = (np.ptp(np.nonzero(m)[0]) + 1 for m in masks[:2])
        v.checks["lung_height_ratio"] = float(hr / hl)
        if not 0.5 <= hr / hl <= 2.0:  # an effusion or a collapse shortens one lung; a failed mask is far off
            v.withhold.append(f"the lung fields differ too much in height (ratio {hr / hl:.2f})")
        small = [ndimage.zoom(m.astype(np.float32), 128 / max(m.shape), order=0) > 0.5 for m in masks[:2]]
        for name, m in zip(SEGMENTS, small):
            s = _solidity(m)
            v.checks[f"{name}_solidity"] = s
            if s < MIN_SOLIDITY:
                v.withhold.append(f"the {name.replace('_', ' ')} outline is not lung-shaped (solidity {s:.2f})")
    lungs = masks[0] | masks[1]
    heart = cardiac_silhouette(masks[2])
    if heart.any() and lungs.any():
        rows, cols = np.nonzero(lungs)
        box = np.zeros_like(lungs)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        inside = float((heart & box).sum() / heart.sum())
        v.checks["heart_inside_thorax"] = inside
        if inside < 0.75:
            v.withhold.append(f"the heart lies outside the thorax in the segmentation ({inside:.0%} inside)")
    if heart.any() and lungs.any():
        lo, hi = np.percentile(display, [1, 99])
        grey = (display - lo) / max(float(hi - lo), 1e-6)
        contrast = float(np.median(grey[heart & ~lungs]) - np.median(grey[lungs & ~masks[2]])) if (heart & ~lungs).any() and (lungs & ~masks[2]).any() else 0.0
        v.checks["lung_contrast"] = contrast
        if contrast < MIN_LUNG_CONTRAST:
            v.withhold.append(f"the segmented lungs are not darker than the heart (contrast {contrast:.2f}); the image may not be a chest radiograph")
    if geometry is None:
        v.withhold.append("the cardiothoracic ratio could not be measured (heart or a lung not found)")
    else:
        v.checks["ctr"] = geometry.ctr
        if not CTR_RANGE[0] <= geometry.ctr <= CTR_RANGE[1]:
            v.withhold.append(f"the cardiothoracic ratio {geometry.ctr:.2f} is outside the physiological range {CTR_RANGE[0]}-{CTR_RANGE[1]}")
    fg = (prob > 0.5).any(0)
    uncertain = ((prob > 0.2) & (prob < 0.8)).any(0)
    frac = float(uncertain.sum() / max(fg.sum(), 1))
    v.checks["uncertain_fraction"] = frac
    if frac > MAX_UNCERTAIN:
        v.withhold.append(f"the lung/heart segmentation is uncertain ({frac:.0%} of its area has probabilities between 0.2 and 0.8)")
    return v


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------


def classify(cls_model: Model, net_inputs: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, 14) and evidence maps (N, 14, 224, 224) for inputs and their (N, 1, 224, 224) masks."""
    out = cls_model(image=np.ascontiguousarray(net_inputs, np.float32), mask=np.ascontiguousarray(masks, np.float32))
    return out["probability"], out["evidence"]


def round_sig(x: float, digits: int = 3) -> float:
    """``x`` rounded to ``digits`` significant digits (0.0123456 -> 0.0123)."""
    return float(f"{x:.{digits}g}")

