"""Held-out evaluation (torch-free): level labelling, fracture AUROC, Genant grade, heights.

    python -m analyzers.ct_vertebral_fracture.evaluate [--weights DIR] [--n 30] [--write]

runs the bundled ONNX models through the array pipeline the node runs (``inference.analyse``)
on the frozen test phantoms (seed 3, never used by training or tuning) and prints the figures;
``--write`` stores them in ``weights/metrics.json``. A NaN or missing figure fails the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.analysis import NotApplicable

TARGETS = {"labelling_study_accuracy": 0.95, "fracture_auroc": 0.95, "genant_exact": 0.85}
MATCH_MM = 10.0
"""A predicted vertebra matches a true one of the same level within this distance of the centroids."""


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN when a class is missing."""
    y = np.asarray(y) >= 0.5
    p = np.asarray(p, dtype=np.float64)
    pos, neg = p[y], p[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allp = np.concatenate([pos, neg])[order]
    ranks_sorted = np.arange(1, len(allp) + 1, dtype=np.float64)
    # average ranks of ties
    i = 0
    while i < len(allp):
        j = i
        while j + 1 < len(allp) and allp[j + 1] == allp[i]:
            j += 1
        ranks_sorted[i: j + 1] = (i + j + 2) / 2
        i = j + 1
    ranks[order] = ranks_sorted
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclass
class StudyRecord:
    declined: str | None = None
    labels_correct: bool = False
    truth: int = 0
    matched: int = 0
    y: list[float] = field(default_factory=list)
    p: list[float] = field(default_factory=list)
    grade_true: list[int] = field(default_factory=list)
    grade_pred: list[int] = field(default_factory=list)
    height_err: list[float] = field(default_factory=list)
    loss_err: list[float] = field(default_factory=list)


def record(truth: dict[str, Any], predicted: list[Any] | None, declined: str | None = None) -> StudyRecord:
    """Compare predicted vertebrae (objects with label, centroid, probability, heights, grade, height_loss) with the truth."""
    covered = [v for v in truth["vertebrae"] if v["covered"]]
    rec = StudyRecord(declined=declined, truth=len(covered))
    if predicted is None:
        return rec
    by_label = {v.label: v for v in predicted}
    ok = True
    for t in covered:
        v = by_label.get(t["label"])
        if v is None or np.linalg.norm(np.asarray(v.centroid) - t["centroid"]) > MATCH_MM:
            ok = False
            continue
        rec.matched += 1
        rec.y.append(float(t["fractured"]))
        rec.p.append(float(v.probability))
        rec.grade_true.append(int(t["grade"]))
        rec.grade_pred.append(-1 if v.grade is None else int(v.grade))
        if v.heights is not None:
            rec.height_err.extend(np.abs(np.subtract(v.heights.as_list(), t["heights"])).tolist())
        if v.height_loss is not None:
            rec.loss_err.append(abs(v.height_loss - t["height_loss"]))
    truth_cents = {t["label"]: np.asarray(t["centroid"]) for t in truth["vertebrae"]}
    for v in predicted:  # a predicted level must sit on that level
        if v.label in truth_cents and np.linalg.norm(np.asarray(v.centroid) - truth_cents[v.label]) > MATCH_MM:
            ok = False
    rec.labels_correct = ok and rec.matched == len(covered)
    return rec


def score(records: list[StudyRecord], threshold: float) -> dict[str, Any]:
    y = np.concatenate([r.y for r in records]) if records else np.zeros(0)
    p = np.concatenate([r.p for r in records]) if records else np.zeros(0)
    gt = np.concatenate([r.grade_true for r in records]).astype(int) if records else np.zeros(0, int)
    gp = np.concatenate([r.grade_pred for r in records]).astype(int) if records else np.zeros(0, int)
    truth_total = sum(r.truth for r in records)
    called = p >= threshold
    pos, neg = y >= 0.5, y < 0.5
    confusion = np.zeros((4, 5), int)  # truth grade x predicted grade (last column: unreadable)
    for a, b in zip(gt, gp):
        confusion[a, b if b >= 0 else 4] += 1
    heights = np.concatenate([r.height_err for r in records]) if records else np.zeros(0)
    losses = np.concatenate([r.loss_err for r in records]) if records else np.zeros(0)
    return {
        "studies": len(records),
        "studies_declined": sum(r.declined is not None for r in records),
        "labelling_study_accuracy": float(np.mean([r.labels_correct for r in records])) if records else float("nan"),
        "vertebrae_truth": truth_total,
        "vertebrae_matched_fraction": sum(r.matched for r in records) / truth_total if truth_total else float("nan"),
        "vertebrae_fractured": int(pos.sum()),
        "fracture_auroc": auroc(y, p),
        "sensitivity": float(called[pos].mean()) if pos.any() else float("nan"),
        "specificity": float((~called[neg]).mean()) if neg.any() else float("nan"),
        "threshold": float(threshold),
        "genant_exact": float(np.mean(gt == gp)) if len(gt) else float("nan"),
        "genant_within_one": float(np.mean((gp >= 0) & (np.abs(gt - gp) <= 1))) if len(gt) else float("nan"),
        "genant_confusion_truth_by_predicted": confusion.tolist(),
        "height_mean_abs_error_mm": float(np.mean(heights)) if len(heights) else float("nan"),
        "height_loss_mean_abs_error": float(np.mean(losses)) if len(losses) else float("nan"),
    }


def missing_or_nan(metrics: dict[str, Any]) -> list[str]:
    need = ["labelling_study_accuracy", "vertebrae_matched_fraction", "fracture_auroc", "sensitivity", "specificity", "genant_exact", "height_mean_abs_error_mm"]
    return [k for k in need if k not in metrics or not isinstance(metrics[k], (int, float)) or not math.isfinite(metrics[k])]


def target_misses(metrics: dict[str, Any]) -> list[str]:
    return [f"{k} {metrics.get(k)} < {v}" for k, v in TARGETS.items() if not (metrics.get(k, float("nan")) >= v)]


def evaluate_phantoms(seed: int, n: int, detector, classifier, dissection, height_bias_mm: float, progress: bool = True) -> list[StudyRecord]:
    from . import inference
    from .phantom import phantom_rng, render

    records = []
    for i in range(n):
        t0 = time.time()
        ph = render(phantom_rng(seed, i))
        truth = ph.truth()
        try:
            loc = inference.analyse(ph.to_volume(), detector, classifier, dissection, height_bias_mm)
            rec = record(truth, loc.vertebrae)
        except NotApplicable as exc:
            rec = record(truth, None, str(exc))
        records.append(rec)
        if progress:
            print(f"study {i + 1}/{n}: {rec.matched}/{rec.truth} matched, labels {'ok' if rec.labels_correct else 'WRONG'}"
                  f"{' declined: ' + rec.declined if rec.declined else ''} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
    return records


def onnx_functions(weights: Path):
    """The bundled networks as the callables the pipeline takes, on ONNX Runtime (CPU)."""
    from dicomnode.analysis import RegistryEntry
    from dicomnode.runtime import OnnxModel

    from .constants import CLASSIFIER, DETECTOR
    from .inference import Dissection

    det_entry = RegistryEntry.load(weights / f"{DETECTOR}.json")
    cls_entry = RegistryEntry.load(weights / f"{CLASSIFIER}.json")
    det, cls = OnnxModel(det_entry, "cpu"), OnnxModel(cls_entry, "cpu")

    def detector(x: np.ndarray) -> np.ndarray:
        return det(reformat=x)["maps"]

    def classifier(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = cls(patch=x)
        return out["logit"], out["activations"]

    return detector, classifier, Dissection.from_extra(cls_entry.extra), cls_entry


def main(argv: list[str] | None = None) -> int:
    from .train import TEST_SEED

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=TEST_SEED)
    ap.add_argument("--write", action="store_true", help="store the figures in <weights>/metrics.json")
    args = ap.parse_args(argv)
    detector, classifier, dissection, entry = onnx_functions(args.weights)
    records = evaluate_phantoms(args.seed, args.n, detector, classifier, dissection, float(entry.extra.get("height_bias_mm", 0.0)))
    metrics = score(records, float(entry.extra["threshold"]))
    metrics["seed"] = args.seed
    metrics["model_version"] = entry.version
    metrics["target_misses"] = target_misses(metrics)
    print(json.dumps(metrics, indent=2))
    if args.write:
        (args.weights / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    bad = missing_or_nan(metrics)
    if bad:
        print(f"missing or NaN figures: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
