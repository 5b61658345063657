"""Held-out phantom evaluation of the whole analyzer (DICOM in, result out), as in metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom

from analyzers.base import AnalyzerSettings, Study

from .analyzer import CLASSIFIER, SEGMENTER, SEGMENTS, ChestXrayThoracic, FINDING_KEYS
from .labels import SYNTHESISED
from .train import auroc, dice


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
