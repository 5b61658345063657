"""Torch-free metrics (AUROC, Youden cut, Dice) and the held-out evaluation of the whole analyzer (DICOM in, result out), as in metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom

from dicomnode.analysis import AnalyzerSettings, Study

from .analyzer import ChestXrayThoracic, FINDING_KEYS
from .constants import CLASSIFIER, SEGMENTER, SEGMENTS, SYNTHESISED


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN without both classes."""
    y = np.asarray(y).astype(bool)
    pos, neg = np.asarray(p)[y], np.asarray(p)[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability cut that maximises sensitivity + specificity - 1 (midpoint between scores)."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return 0.5
    s = np.unique(p)
    cuts = np.concatenate([[0.0], (s[:-1] + s[1:]) / 2, [1.0]])
    best, best_j = 0.5, -1.0
    for c in cuts:
        pred = p >= c
        j = pred[y].mean() + (~pred[~y]).mean() - 1
        if j > best_j:
            best, best_j = float(c), j
    return best


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def evaluate_folders(folders: Sequence[Path], weights_dir: Path | None = None, analyzer: ChestXrayThoracic | None = None) -> dict[str, Any]:
    """Run the analyzer on phantom study folders and compare with their truth.

    Returns Dice per structure (mean and minimum), the cardiothoracic ratio's
    absolute error (mean, 95th percentile, maximum), AUROC per synthesised label
    and sensitivity / specificity at the operating points; a synthesised label the
    weights withhold is listed under ``not_evaluated`` with AUROC None.
    """
    if analyzer is None:
        settings = AnalyzerSettings(device="cpu")
        if weights_dir is not None:
            settings.model_paths = {SEGMENTER: Path(weights_dir) / f"{SEGMENTER}.json", CLASSIFIER: Path(weights_dir) / f"{CLASSIFIER}.json"}
        analyzer = ChestXrayThoracic(settings)
    dices: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    ctr_err, y, p, called = [], {k: [] for k in SYNTHESISED}, {k: [] for k in SYNTHESISED}, {k: [] for k in SYNTHESISED}
    for folder in folders:
        truth = json.loads((Path(folder) / "truth.json").read_text())
        with np.load(Path(folder) / truth["masks_file"]) as z:
            true_masks = z["masks"]
        path = Path(folder) / truth["file"]
        study = Study.from_datasets([pydicom.dcmread(path)], [path])
        result = analyzer.analyze(analyzer.select(study))
        pred = result.segmentations[0].masks[0]
        for j, s in enumerate(SEGMENTS):
            dices[s].append(dice(pred[..., j], true_masks[j]))
        ctr = {m.key: m.value for m in result.measurements}.get("cardiothoracic_ratio", float("nan"))
        ctr_err.append(abs(ctr - truth["ctr"]))
        by_key = {f.key: f for f in result.findings}
        for label in SYNTHESISED:
            f = by_key[FINDING_KEYS[label]]
            y[label].append(bool(truth["labels"][label]))
            p[label].append(f.probability)
            called[label].append(bool(f.value))
    err = np.asarray(ctr_err, float)
    out: dict[str, Any] = {
        "n": len(folders),
        "dice": {s: {"mean": round(float(np.mean(v)), 4), "min": round(float(np.min(v)), 4)} for s, v in dices.items()},
        "ctr_abs_error": {
            "mean": round(float(np.nanmean(err)), 4),
            "p95": round(float(np.nanpercentile(err, 95)), 4),
            "max": round(float(np.nanmax(err)), 4),
            "not_measured": int(np.isnan(err).sum()),
        },
        "auroc": {},
        "at_operating_point": {},
    }
    evaluated = set(analyzer.evaluated_labels())
    out["not_evaluated"] = [k for k in SYNTHESISED if k not in evaluated]
    for label in SYNTHESISED:
        if label not in evaluated:  # withheld by the weights: reported as not evaluated, nothing to score
            out["auroc"][label] = None
            continue
        yy, pp, cc = np.asarray(y[label]), np.asarray(p[label], float), np.asarray(called[label])
        out["auroc"][label] = round(auroc(yy, pp), 4)
        out["at_operating_point"][label] = {
            "positives": int(yy.sum()),
            "sensitivity": round(float(cc[yy].mean()), 4) if yy.any() else None,
            "specificity": round(float((~cc[~yy]).mean()), 4) if (~yy).any() else None,
        }
    return out
