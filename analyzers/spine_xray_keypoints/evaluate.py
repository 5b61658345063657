"""Torch-free metrics: predicted keypoints, uncertainty classes and measurements scored against phantom truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ANGLE_KEYS = ("intervertebral_angle", "lordosis")
HEIGHT_KEYS = ("anterior_vertebral_height", "posterior_vertebral_height", "anterior_disc_height", "posterior_disc_height")


@dataclass
class StudyRecord:
    """One study's truth and prediction, in source pixels."""

    region: str
    spacing: tuple[float, float]
    truth_points: dict[str, np.ndarray]
    truth_visible: dict[str, np.ndarray]
    truth_measurements: dict[tuple[str, str], float]
    pred_points: dict[str, np.ndarray] = field(default_factory=dict)
    pred_sigma: dict[str, np.ndarray] = field(default_factory=dict)
    pred_class: dict[str, list[str]] = field(default_factory=dict)
    pred_measurements: dict[tuple[str, str], tuple[float, bool]] = field(default_factory=dict)
    """(key, group) -> (value, depends on a highly uncertain point)."""
    image_shape: tuple[int, int] = (0, 0)


def _in_image(points: np.ndarray, shape: tuple[int, int]) -> bool:
    c = points[:4].mean(0)
    return 0 <= c[0] < shape[1] and 0 <= c[1] < shape[0]


def score(records: list[StudyRecord]) -> dict[str, Any]:
    """Held-out figures: keypoint errors, study success, uncertainty calibration, measurement errors."""
    corner_vis, corner_all, sp_vis, sig_all, err_all, cls_all, vis_all = [], [], [], [], [], [], []
    study_ok, n_truth, n_found = [], 0, 0
    angle_err, height_err, trans_err, angle_err_all, height_err_all = [], [], [], [], []
    for r in records:
        mm = np.array([r.spacing[1], r.spacing[0]])
        study_errs = []
        complete = True
        for label, tp in r.truth_points.items():
            if r.image_shape != (0, 0) and not _in_image(tp, r.image_shape):
                continue
            n_truth += 1
            if label not in r.pred_points:
                complete = False
                continue
            n_found += 1
            err = np.sqrt((((r.pred_points[label] - tp) * mm) ** 2).sum(-1))
            vis = np.asarray(r.truth_visible[label], bool)
            for i in range(5):
                sig_all.append(float(r.pred_sigma[label][i]))
                err_all.append(float(err[i]))
                cls_all.append(r.pred_class[label][i])
                vis_all.append(bool(vis[i]))
                if i < 4:
                    corner_all.append(float(err[i]))
                    if vis[i]:
                        corner_vis.append(float(err[i]))
                elif vis[i]:
                    sp_vis.append(float(err[i]))
                if vis[i]:
                    study_errs.append(float(err[i]))
        study_ok.append(complete and bool(study_errs) and float(np.mean(study_errs)) < 2.0)
        for (key, group), truth in r.truth_measurements.items():
            if (key, group) not in r.pred_measurements:
                continue
            value, flagged = r.pred_measurements[(key, group)]
            d = abs(value - truth)
            if key in ANGLE_KEYS:
                angle_err_all.append(d)
                if not flagged:
                    angle_err.append(d)
            elif key in HEIGHT_KEYS:
                height_err_all.append(d)
                if not flagged:
                    height_err.append(d)
            elif key == "sagittal_translation" and not flagged:
                trans_err.append(d)
    sig, err, cls, vis = np.array(sig_all), np.array(err_all), np.array(cls_all), np.array(vis_all, bool)
    certain = err[cls == "certain"]
    moderate = err[cls == "moderately_uncertain"]
    invisible = cls[~vis]
    out: dict[str, Any] = {
        "studies": len(records),
        "vertebrae_truth": n_truth,
        "vertebrae_found_fraction": n_found / max(n_truth, 1),
        "corner_mean_error_mm": _mean(corner_vis),
        "corner_mean_error_all_points_mm": _mean(corner_all),
        "spinous_mean_error_mm": _mean(sp_vis),
        "studies_mean_error_below_2mm_fraction": float(np.mean(study_ok)) if study_ok else float("nan"),
        "certain_fraction": float(np.mean(cls == "certain")) if len(cls) else float("nan"),
        "certain_p95_error_mm": float(np.quantile(certain, 0.95)) if len(certain) else float("nan"),
        "moderate_p95_error_mm": float(np.quantile(moderate, 0.95)) if len(moderate) else float("nan"),
        "invisible_points": int(len(invisible)),
        "invisible_highly_uncertain_fraction": float(np.mean(invisible == "highly_uncertain")) if len(invisible) else float("nan"),
        "spearman_sigma_error": _spearman(sig, err),
        "angle_mean_abs_error_deg": _mean(angle_err),
        "height_mean_abs_error_mm": _mean(height_err),
        "translation_mean_abs_error_mm": _mean(trans_err),
        "angle_mean_abs_error_all_deg": _mean(angle_err_all),
        "height_mean_abs_error_all_mm": _mean(height_err_all),
    }
    return out


TARGETS = {
    "corner_mean_error_mm": ("<=", 1.0),
    "studies_mean_error_below_2mm_fraction": (">=", 0.95),
    "certain_p95_error_mm": ("<=", 1.5),
    "invisible_highly_uncertain_fraction": (">=", 0.90),
    "spearman_sigma_error": (">=", 0.3),
    "angle_mean_abs_error_deg": ("<=", 2.0),
    "height_mean_abs_error_mm": ("<=", 1.0),
}


def failures(metrics: dict[str, Any]) -> list[str]:
    """The issue's targets that ``metrics`` misses, as sentences."""
    out = []
    for key, (op, bound) in TARGETS.items():
        v = metrics.get(key)
        if v is None or not np.isfinite(v):
            continue
        ok = v <= bound if op == "<=" else v >= bound
        if not ok:
            out.append(f"{key} = {v:.3f}, target {op} {bound}")
    return out


def _mean(x: list[float]) -> float:
    return float(np.mean(x)) if x else float("nan")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)
