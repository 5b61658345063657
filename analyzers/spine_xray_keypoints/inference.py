"""The inference pipeline on arrays: detect vertebrae, regress keypoints with MC dropout, classify uncertainty.

The network calls are passed in as functions so the same code serves the
analyzer (ONNX Runtime sessions) and training (calibration and evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dicomnode.analysis import UncertaintyClass

from . import preprocess
from .constants import LEVELS

DetectorFn = Callable[[np.ndarray], np.ndarray]
"""(1, 1, S, S) image -> (1, 5 + classes, G, G) grid."""
KeypointFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""crops (N, 1, H, W), mask1, mask2 (T, N, hidden) -> mean, logvar (T, N, 10)."""


@dataclass
class VertebraPrediction:
    label: str
    score: float
    box: np.ndarray
    """Detector box (c0, r0, c1, r1) in source pixels."""
    points: np.ndarray
    """(5, 2) keypoints in source pixels (column, row)."""
    sigma_mm: np.ndarray
    """(5,) sigma_p per point in mm (aleatoric and epistemic together)."""
    sigma_aleatoric_mm: np.ndarray
    sigma_epistemic_mm: np.ndarray


def decode_detections(
    grid: np.ndarray, image_shape: tuple[int, int], labels: tuple[str, ...], min_score: float = 0.15, candidate_obj: float = 0.1, nms_iou: float = 0.4
) -> dict[str, tuple[np.ndarray, float]]:
    """Vertebrae in the detector's grid: label -> (box in source pixels, score).

    Every cell whose objectness reaches ``candidate_obj`` proposes a box; overlapping
    proposals are suppressed (``nms_iou``). The labels are then given to the remaining
    boxes in their top-to-bottom order, as the spine orders them: the assignment that
    maximises the summed score (objectness x class probability) above ``min_score``,
    with labels increasing downwards and each label and box used at most once. A box
    the classifier is unsure of thus still gets the label its neighbours leave for it,
    and two labels never share one vertebra.
    """
    g = np.asarray(grid, dtype=np.float64)[0]
    n_cls = len(labels)
    size = preprocess.DETECTOR_SIZE
    gh, gw = g.shape[1:]
    cell_r, cell_c = size / gh, size / gw
    obj = 1.0 / (1.0 + np.exp(-g[0]))
    logits = g[5 : 5 + n_cls]
    cls = np.exp(logits - logits.max(0, keepdims=True))
    cls /= cls.sum(0, keepdims=True)
    rows, cols = np.nonzero(obj >= candidate_obj)
    if not len(rows):
        return {}
    cx = (cols + 1.0 / (1.0 + np.exp(-g[1, rows, cols]))) * cell_c
    cy = (rows + 1.0 / (1.0 + np.exp(-g[2, rows, cols]))) * cell_r
    w = np.exp(np.minimum(g[3, rows, cols], 6.0)) * cell_c
    h = np.exp(np.minimum(g[4, rows, cols], 6.0)) * cell_r
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    keep: list[int] = []
    for i in np.argsort(-obj[rows, cols], kind="stable"):
        if all(_iou(boxes[i], boxes[j]) <= nms_iou for j in keep):
            keep.append(int(i))
    keep.sort(key=lambda i: cy[i])
    score = np.array([obj[rows[i], cols[i]] * cls[:, rows[i], cols[i]] for i in keep])  # (boxes, labels)
    gain = score - min_score
    # best monotone matching of boxes (top to bottom) to labels (in order)
    nb = len(keep)
    best = np.zeros((nb + 1, n_cls + 1))
    for i in range(1, nb + 1):
        for k in range(1, n_cls + 1):
            best[i, k] = max(best[i - 1, k], best[i, k - 1], best[i - 1, k - 1] + gain[i - 1, k - 1])
    out: dict[str, tuple[np.ndarray, float]] = {}
    sr, sc = image_shape[0] / size, image_shape[1] / size
    i, k = nb, n_cls
    while i > 0 and k > 0:
        if best[i, k] == best[i - 1, k]:
            i -= 1
        elif best[i, k] == best[i, k - 1]:
            k -= 1
        else:
            b = boxes[keep[i - 1]]
            out[labels[k - 1]] = (np.array([b[0] * sc, b[1] * sr, b[2] * sc, b[3] * sr]), float(score[i - 1, k - 1]))
            i, k = i - 1, k - 1
    return {label: out[label] for label in labels if label in out}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def mc_masks(rng: np.random.Generator, samples: int, n: int, hidden: int, p_drop: float) -> tuple[np.ndarray, np.ndarray]:
    keep = 1.0 - p_drop
    m1 = (rng.random((samples, n, hidden)) < keep).astype(np.float32)
    m2 = (rng.random((samples, n, hidden)) < keep).astype(np.float32)
    return m1, m2


def regress(
    img: np.ndarray,
    boxes: list[np.ndarray],
    spacing: tuple[float, float],
    keypoint_fn: KeypointFn,
    masks: tuple[np.ndarray, np.ndarray],
    shape: tuple[int, int] = preprocess.CROP_SHAPE,
    pad: float = preprocess.CROP_PAD,
    flip: bool = False,
    exact: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """One batched MC pass over the crops of ``boxes``.

    ``boxes`` are padded and widened to the crop's aspect, or with ``exact`` cropped as they
    are (corner patches, which may run right to left or bottom to top).

    With ``flip`` every crop is also run mirrored (the keypoint order is anatomical,
    so only x mirrors back) and the mirrored samples join the MC samples: their mean
    enters the points, their spread the epistemic sigma. ``masks`` must then cover
    twice the crops.

    Returns points (N, P, 2) in pixels (P points per crop, as the model gives), aleatoric
    and epistemic sigma_p (N, P) in mm, and the crop boxes used.
    """
    cboxes = list(boxes) if exact else [preprocess.crop_box(b, pad=pad, aspect=shape[0] / shape[1]) for b in boxes]
    crops = np.stack([preprocess.standardise(preprocess.crop(img, b, shape))[None] for b in cboxes])
    n = len(cboxes)
    if flip:
        crops = np.concatenate([crops, crops[..., ::-1]])
    k = len(crops)
    mean, logvar = keypoint_fn(np.ascontiguousarray(crops), masks[0][:, :k], masks[1][:, :k])
    mean = np.asarray(mean, np.float64).reshape(mean.shape[0], k, -1, 2)
    logvar = np.asarray(logvar, np.float64).reshape(mean.shape)
    if flip:
        mean[:, n:, :, 0] = 1.0 - mean[:, n:, :, 0]
        mean = np.concatenate([mean[:, :n], mean[:, n:]])
        logvar = np.concatenate([logvar[:, :n], logvar[:, n:]])
    var_a = np.exp(np.clip(logvar, -30, 10)).mean(0)
    var_e = mean.var(0)
    frac = mean.mean(0)
    size = np.array([[b[2] - b[0], b[3] - b[1]] for b in cboxes])[:, None, :]
    mm = np.array([spacing[1], spacing[0]])[None, None, :]
    scale2 = (size * mm) ** 2
    sig_a = np.sqrt((var_a * scale2).sum(-1))
    sig_e = np.sqrt((var_e * scale2).sum(-1))
    points = np.stack([preprocess.from_crop(frac[i], cboxes[i]) for i in range(n)])
    return points, sig_a, sig_e, cboxes


def predict(
    img: np.ndarray,
    spacing: tuple[float, float],
    region: str,
    detector_fn: DetectorFn,
    keypoint_fn: KeypointFn,
    hidden: int,
    p_drop: float,
    samples: int = 16,
    seed: int = 0,
    refine: bool = True,
    body_fn: KeypointFn | None = None,
    flip: bool = False,
    corner_fn: KeypointFn | None = None,
) -> list[VertebraPrediction]:
    """Vertebrae of ``region`` found in ``img`` with keypoints and sigma_p, top to bottom.

    With ``refine`` the crops are re-centred once on the first pass's keypoints
    (the detector box is coarse at the detector's resolution). With ``body_fn`` (a
    keypoint model trained on vertebral-body crops) the four body corners and their
    sigma come from a last pass on a crop around the corners alone, at a finer
    scale than the crop that also spans the spinous process. With ``corner_fn`` (a
    one-point model trained on corner patches) each corner is then found again on a
    patch around it (:func:`preprocess.corner_boxes`). ``flip`` adds the mirrored
    crop to every pass (test-time augmentation).
    """
    labels = LEVELS[region]
    found = decode_detections(detector_fn(preprocess.detector_input(img)), img.shape, labels)
    if not found:
        return []
    names = [k for k in labels if k in found]
    boxes = [found[k][0] for k in names]
    rng = np.random.default_rng(seed)
    masks = mc_masks(rng, samples, (2 if flip else 1) * len(names), hidden, p_drop)
    points, sig_a, sig_e, _ = regress(img, boxes, spacing, keypoint_fn, masks, flip=flip)
    if refine:
        boxes2 = [preprocess.tight_box(p) for p in points]
        points, sig_a, sig_e, _ = regress(img, boxes2, spacing, keypoint_fn, masks, flip=flip)
    if body_fn is not None:
        boxes3 = [preprocess.body_box(p) for p in points]
        bp, ba, be, _ = regress(img, boxes3, spacing, body_fn, masks, preprocess.BODY_CROP_SHAPE, preprocess.BODY_CROP_PAD, flip=flip)
        points, sig_a, sig_e = points.copy(), sig_a.copy(), sig_e.copy()
        points[:, :4], sig_a[:, :4], sig_e[:, :4] = bp[:, :4], ba[:, :4], be[:, :4]
    if corner_fn is not None:
        # a last, closer look at each body corner: one patch per corner, one point per patch
        boxes4 = [b for p in points for b in preprocess.corner_boxes(p)]
        cmasks = mc_masks(rng, samples, (2 if flip else 1) * len(boxes4), hidden, p_drop)
        cp, ca, ce, _ = regress(img, boxes4, spacing, corner_fn, cmasks, preprocess.CORNER_SHAPE, flip=flip, exact=True)
        # a corner outside the image has no pixels to look at, and a body whose corners collapsed
        # (cut off by the field edge) gives no patch orientation: those keep the body model's answer
        inside = ((points[:, :4, 0] >= 0) & (points[:, :4, 0] < img.shape[1]) & (points[:, :4, 1] >= 0) & (points[:, :4, 1] < img.shape[0]))
        depth, height = np.array([preprocess.body_size(p) for p in points]).T
        inside &= ((depth >= 0.4 * height) & (height >= 0.25 * depth))[:, None]
        points, sig_a, sig_e = points.copy(), sig_a.copy(), sig_e.copy()
        points[:, :4] = np.where(inside[..., None], cp[:, 0].reshape(-1, 4, 2), points[:, :4])
        sig_a[:, :4] = np.where(inside, ca[:, 0].reshape(-1, 4), sig_a[:, :4])
        sig_e[:, :4] = np.where(inside, ce[:, 0].reshape(-1, 4), sig_e[:, :4])
    out = []
    for i, k in enumerate(names):
        total = np.sqrt(sig_a[i] ** 2 + sig_e[i] ** 2)
        out.append(VertebraPrediction(k, found[k][1], boxes[i], points[i], total, sig_a[i], sig_e[i]))
    return out


def classify(sigma_mm: float, tau1: float, tau2: float) -> UncertaintyClass:
    """The paper's scheme: certain below tau1, highly uncertain from tau2, moderately between."""
    if sigma_mm < tau1:
        return UncertaintyClass.CERTAIN
    if sigma_mm >= tau2:
        return UncertaintyClass.HIGH
    return UncertaintyClass.MODERATE


def calibrate(
    sigma: np.ndarray,
    error: np.ndarray,
    certain_mm: float = 1.5,
    moderate_mm: float = 2.0,
    quantile: float = 0.95,
    min_count: int = 20,
    invisible_sigma: np.ndarray | None = None,
    invisible_high: float = 0.9,
) -> tuple[float, float]:
    """(tau1, tau2) on validation points, as the paper prescribes.

    tau1: raising the threshold from the smallest sigma_p, the last value before the
    points below it first err more than ``certain_mm`` (at the ``quantile``); tau2
    likewise for the points in [tau1, tau2) and ``moderate_mm``. Stopping at the first
    crossing keeps the thresholds off the noisy tail of the validation set. With
    ``invisible_sigma`` (points known to be hidden), tau2 (and tau1 with it) is lowered
    where needed so that ``invisible_high`` of them are classed highly uncertain; the
    error bounds still hold, since lower thresholds only move points up a class.
    """
    order = np.argsort(sigma)
    s, e = np.asarray(sigma)[order], np.asarray(error)[order]
    candidates = np.unique(np.quantile(s, np.linspace(0.01, 1.0, 200)))
    tau1 = float(s[0])
    for c in candidates:
        sel = e[s < c]
        if len(sel) < min_count:
            continue
        if np.quantile(sel, quantile) > certain_mm:
            break
        tau1 = float(c)
    tau2 = tau1
    for c in candidates[candidates > tau1]:
        sel = e[(s >= tau1) & (s < c)]
        if len(sel) < min_count:
            continue
        if np.quantile(sel, quantile) > moderate_mm:
            break
        tau2 = float(c)
    if invisible_sigma is not None and len(invisible_sigma) >= min_count:
        tau2 = min(tau2, float(np.quantile(invisible_sigma, 1.0 - invisible_high)))
        tau1 = min(tau1, tau2)
    return tau1, tau2
