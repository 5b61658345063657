"""The inference pipeline on arrays: detect vertebrae, regress keypoints with MC dropout, classify uncertainty.

The network calls are passed in as functions so the same code serves the
analyzer (ONNX Runtime sessions) and training (calibration and evaluation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from analyzers.base import UncertaintyClass

from . import preprocess
from .mensuration import LEVELS, N_POINTS_PER_VERTEBRA

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


def decode_detections(grid: np.ndarray, image_shape: tuple[int, int], labels: tuple[str, ...], min_score: float = 0.3) -> dict[str, tuple[np.ndarray, float]]:
    """Best cell per vertebra label: label -> (box in source pixels, score)."""
    g = np.asarray(grid, dtype=np.float64)[0]
    n_cls = len(labels)
    size = preprocess.DETECTOR_SIZE
    gh, gw = g.shape[1:]
    cell_r, cell_c = size / gh, size / gw
    obj = 1.0 / (1.0 + np.exp(-g[0]))
    logits = g[5 : 5 + n_cls]
    cls = np.exp(logits - logits.max(0, keepdims=True))
    cls /= cls.sum(0, keepdims=True)
    sr, sc = image_shape[0] / size, image_shape[1] / size
    out: dict[str, tuple[np.ndarray, float]] = {}
    for k, label in enumerate(labels):
        score = obj * cls[k]
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        s = float(score[i, j])
        if s < min_score:
            continue
        cx = (j + 1.0 / (1.0 + math.exp(-g[1, i, j]))) * cell_c
        cy = (i + 1.0 / (1.0 + math.exp(-g[2, i, j]))) * cell_r
        w = math.exp(min(g[3, i, j], 6.0)) * cell_c
        h = math.exp(min(g[4, i, j], 6.0)) * cell_r
        box = np.array([(cx - w / 2) * sc, (cy - h / 2) * sr, (cx + w / 2) * sc, (cy + h / 2) * sr])
        out[label] = (box, s)
    return out


def mc_masks(rng: np.random.Generator, samples: int, n: int, hidden: int, p_drop: float) -> tuple[np.ndarray, np.ndarray]:
    keep = 1.0 - p_drop
    m1 = (rng.random((samples, n, hidden)) < keep).astype(np.float32)
    m2 = (rng.random((samples, n, hidden)) < keep).astype(np.float32)
    return m1, m2


def regress(img: np.ndarray, boxes: list[np.ndarray], spacing: tuple[float, float], keypoint_fn: KeypointFn, masks: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """One batched MC pass over the crops of ``boxes``.

    Returns points (N, 5, 2) in pixels, aleatoric and epistemic sigma_p (N, 5) in mm,
    and the crop boxes used.
    """
    cboxes = [preprocess.crop_box(b) for b in boxes]
    crops = np.stack([preprocess.standardise(preprocess.crop(img, b))[None] for b in cboxes])
    n = len(cboxes)
    mean, logvar = keypoint_fn(crops, masks[0][:, :n], masks[1][:, :n])
    mean = np.asarray(mean, np.float64).reshape(mean.shape[0], n, N_POINTS_PER_VERTEBRA, 2)
    var_a = np.exp(np.clip(np.asarray(logvar, np.float64), -30, 10)).reshape(mean.shape).mean(0)
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
) -> list[VertebraPrediction]:
    """Vertebrae of ``region`` found in ``img`` with keypoints and sigma_p, top to bottom.

    With ``refine`` the crops are re-centred once on the first pass's keypoints
    (the detector box is coarse at the detector's resolution).
    """
    labels = LEVELS[region]
    found = decode_detections(detector_fn(preprocess.detector_input(img)), img.shape, labels)
    if not found:
        return []
    names = [k for k in labels if k in found]
    boxes = [found[k][0] for k in names]
    rng = np.random.default_rng(seed)
    masks = mc_masks(rng, samples, len(names), hidden, p_drop)
    points, sig_a, sig_e, _ = regress(img, boxes, spacing, keypoint_fn, masks)
    if refine:
        boxes2 = [preprocess.tight_box(p) for p in points]
        points, sig_a, sig_e, _ = regress(img, boxes2, spacing, keypoint_fn, masks)
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
