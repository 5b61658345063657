"""Held-out figures of the dxa_scoliosis pipeline (torch-free): part IoU, accuracies, Spearman(score, Cobb), Cobb MAE.

The networks are passed in as callables, so ``metrics.json`` comes from the same
array pipeline (``inference.py``) the analyzer runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .constants import PARTS
from .inference import ClsFn, MaskCalibration, SegFn, predict, rebuild_masks


def evaluate(data: dict[str, np.ndarray], seg_fn: SegFn, cls_fn: ClsFn, sigma: float, cal: MaskCalibration | None = None) -> dict[str, Any]:
    """Held-out figures: part IoU, accuracies, Spearman(score, Cobb), Cobb MAE."""
    from scipy.stats import spearmanr

    n = len(data["x"])
    p_s, p_p, p_c, cobb_est, ious = [], [], [], [], []
    for i in range(n):
        x = data["x"][i].astype(np.float32) / 255.0
        pred = predict(x, seg_fn, cls_fn, sigma, cal=cal)
        p_s.append(pred.p_scoliosis)
        p_p.append(pred.p_positioning)
        p_c.append(pred.p_curves)
        cobb_est.append(pred.geometry.cobb if pred.geometry else np.nan)
        true = rebuild_masks(np.nan_to_num(data["mid"][i].astype(np.float32), nan=0.0), data["thick"][i].astype(np.float32))
        inter = (pred.masks & true).sum((1, 2))
        union = (pred.masks | true).sum((1, 2))
        ious.append(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
    p_s, p_p, p_c, cobb_est, ious = np.array(p_s), np.array(p_p), np.array(p_c), np.array(cobb_est), np.array(ious)
    sc, po, cu, cobb = data["scoliosis"], data["positioning"], data["curves"], data["cobb"]
    ok = np.isfinite(cobb_est)
    return {
        "n": int(n),
        "iou": {p: round(float(ious[:, k].mean()), 4) for k, p in enumerate(PARTS)},
        "scoliosis_accuracy": round(float(((p_s >= 0.5) == (sc == 1)).mean()), 4),
        "positioning_accuracy": round(float(((p_p >= 0.5) == (po == 1)).mean()), 4),
        "curves_accuracy": round(float((p_c.argmax(1) == cu).mean()), 4),
        "spearman_score_cobb": round(float(spearmanr(p_s, cobb).statistic), 4),
        "cobb_mae_deg": round(float(np.abs(cobb_est[ok] - cobb[ok]).mean()), 3) if ok.any() else None,
        "cobb_missing": int((~ok).sum()),
        "geometric_scoliosis_accuracy": round(float(((np.nan_to_num(cobb_est) >= 10) == (sc == 1)).mean()), 4),
    }
