"""Held-out figures of the dxa_scoliosis pipeline (torch-free): part IoU, per-class mean accuracies, bands, scored curves.

The networks are passed in as callables, so ``metrics.json`` comes from the same
array pipeline (``inference.py``) the analyzer runs. :func:`failures` turns the
figures into a list of unmet targets; a NaN or missing figure is a failure.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .constants import LEVELS, PARTS
from .inference import ClsFn, MaskCalibration, SegFn, predict, rebuild_masks, reported_curves

TEST_SEED = 20_261_206
"""The frozen test seed of release 0.2: used once for the figures in metrics.json, never for training or tuning."""

COBB_BANDS = ((5.0, 10.0), (10.0, 15.0))
"""Cobb angle bands (degrees) on either side of the 10-degree definition."""
POSE_BANDS = ((0.7, 1.0), (1.0, 1.3))
"""Bands of the pose ratio (largest tilt over its positioning limit) on either side of 1."""

TARGETS: dict[str, tuple[str, float]] = {
    "iou.spine": (">=", 0.85),
    "iou.head": (">=", 0.90),
    "scoliosis_mean_class_accuracy": (">=", 0.90),
    "positioning_mean_class_accuracy": (">=", 0.80),
    "curves_mean_class_accuracy": (">=", 0.80),
    "curve_count_accuracy": (">=", 0.90),
    "curve_cobb_mae_deg": ("<=", 5.0),
    "curve_apex_within_one_level": (">=", 0.90),
    "spearman_score_cobb": (">=", 0.8),
    "cobb_mae_deg": ("<=", 5.0),
}
"""Targets of the issue (#18) on fresh phantoms; the accuracies are the paper's average per-class accuracy."""


def mean_class_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """The paper's measure: accuracy within each true class, averaged over the classes present."""
    classes = np.unique(true)
    return float(np.mean([(pred[true == c] == c).mean() for c in classes])) if len(classes) else math.nan


def _band(correct: np.ndarray, value: np.ndarray, lo: float, hi: float) -> dict[str, Any]:
    sel = (value >= lo) & (value < hi)
    return {"range": [lo, hi], "n": int(sel.sum()), "accuracy": round(float(correct[sel].mean()), 4) if sel.any() else None}


def _curve_scores(found: list[list[tuple[float, int]]], data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Count, Cobb error and apex level of reported curves against the drawn ones (matched top to bottom where the count is right)."""
    count_ok, errs, apex_ok = [], [], []
    for i, pred in enumerate(found):
        n_true = int(data["n_curves"][i])
        count_ok.append(len(pred) == n_true)
        if len(pred) != n_true:
            continue
        for k, (cobb, apex) in enumerate(pred):
            errs.append(abs(cobb - float(data["curve_cobb"][i, k])))
            apex_ok.append(abs(apex - int(data["curve_apex"][i, k])) <= 1)
    return {
        "curve_count_accuracy": round(float(np.mean(count_ok)), 4),
        "curve_cobb_mae_deg": round(float(np.mean(errs)), 3) if errs else None,
        "curve_apex_within_one_level": round(float(np.mean(apex_ok)), 4) if apex_ok else None,
        "curves_scored": len(errs),
    }


def evaluate(data: dict[str, np.ndarray], seg_fn: SegFn, cls_fn: ClsFn, sigma: float, cal: MaskCalibration | None = None) -> dict[str, Any]:
    """Held-out figures: part IoU, per-class mean accuracies, accuracy in bands around each threshold, scored curves."""
    from scipy.stats import spearmanr

    n = len(data["x"])
    p_s, p_p, p_c, cobb_est, ious, found = [], [], [], [], [], []
    for i in range(n):
        x = data["x"][i].astype(np.float32) / 255.0
        pred = predict(x, seg_fn, cls_fn, sigma, cal=cal)
        p_s.append(pred.p_scoliosis)
        p_p.append(pred.p_positioning)
        p_c.append(pred.p_curves)
        cobb_est.append(pred.geometry.cobb if pred.geometry else np.nan)
        found.append([(rc.cobb, LEVELS.index(rc.apex)) for rc in reported_curves(pred.p_scoliosis, pred.p_curves, pred.geometry)])
        true = rebuild_masks(np.nan_to_num(data["mid"][i].astype(np.float32), nan=0.0), data["thick"][i].astype(np.float32))
        inter = (pred.masks & true).sum((1, 2))
        union = (pred.masks | true).sum((1, 2))
        ious.append(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
    p_s, p_p, p_c, cobb_est, ious = np.array(p_s), np.array(p_p), np.array(p_c), np.array(cobb_est), np.array(ious)
    sc, po, cu, cobb = data["scoliosis"], data["positioning"], data["curves"], data["cobb"]
    ok = np.isfinite(cobb_est)
    s_pred, p_pred, c_pred = (p_s >= 0.5).astype(int), (p_p >= 0.5).astype(int), p_c.argmax(1)
    metrics: dict[str, Any] = {
        "n": int(n),
        "iou": {p: round(float(ious[:, k].mean()), 4) for k, p in enumerate(PARTS)},
        "scoliosis_mean_class_accuracy": round(mean_class_accuracy(s_pred, sc), 4),
        "positioning_mean_class_accuracy": round(mean_class_accuracy(p_pred, po), 4),
        "curves_mean_class_accuracy": round(mean_class_accuracy(c_pred, cu), 4),
        "scoliosis_accuracy": round(float((s_pred == sc).mean()), 4),
        "positioning_accuracy": round(float((p_pred == po).mean()), 4),
        "curves_accuracy": round(float((c_pred == cu).mean()), 4),
        "scoliosis_bands": [_band(s_pred == sc, cobb, lo, hi) for lo, hi in COBB_BANDS],
        "positioning_bands": [_band(p_pred == po, data["pose"], lo, hi) for lo, hi in POSE_BANDS],
        "spearman_score_cobb": round(float(spearmanr(p_s, cobb).statistic), 4),
        "cobb_mae_deg": round(float(np.abs(cobb_est[ok] - cobb[ok]).mean()), 3) if ok.any() else None,
        "cobb_missing": int((~ok).sum()),
        "geometric_scoliosis_accuracy": round(float(((np.nan_to_num(cobb_est) >= 10) == (sc == 1)).mean()), 4),
    }
    metrics.update(_curve_scores(found, data))
    return metrics


def _get(metrics: dict[str, Any], key: str) -> Any:
    value: Any = metrics
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def failures(metrics: dict[str, Any], targets: dict[str, tuple[str, float]] = TARGETS) -> list[str]:
    """Unmet targets, plus every figure or band that is missing or NaN (a figure never computed is a failure)."""
    out = []
    for key, (op, bound) in targets.items():
        value = _get(metrics, key)
        if _missing(value):
            out.append(f"{key} is missing or NaN")
        elif (op == ">=" and value < bound) or (op == "<=" and value > bound):
            out.append(f"{key} = {value} (target {op} {bound})")
    for key in ("scoliosis_bands", "positioning_bands"):
        for band in metrics.get(key) or [None]:
            if band is None or _missing(band.get("accuracy")):
                out.append(f"{key} {band['range'] if band else ''} has no cases")
    for part in PARTS:
        if _missing(_get(metrics, f"iou.{part}")):
            out.append(f"iou.{part} is missing or NaN")
    return out
