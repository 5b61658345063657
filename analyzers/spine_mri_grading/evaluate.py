"""Held-out evaluation of the bundled weights on phantoms of the frozen test seed (torch-free).

Usage::

    python -m analyzers.spine_mri_grading.evaluate --n 100            # prints the figures
    python -m analyzers.spine_mri_grading.evaluate --n 100 --check    # and fails on a missed target

Each phantom goes through DICOM (a sagittal T2 series in a vendor convention
drawn for it) and the analyzer's own path (volume assembly, canonical
orientation, ONNX networks), so the figures are those of the node.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .constants import GRADINGS, LEVELS, VERTEBRAE

TEST_SEED = 3
"""Held-out phantoms are (TEST_SEED, i); training uses (1, i)."""
TARGETS = {
    "labelling_all_correct_fraction": 0.95,
    "pfirrmann_exact": 0.80,
    "pfirrmann_within_one": 0.97,
    **{f"{g.key}_balanced_accuracy": 0.90 for g in GRADINGS if g.binary},
}


@dataclass
class StudyRecord:
    labels_correct: dict[str, bool]
    truth: list[list[int]]
    """Per disc (LEVELS order), per grading: the true class."""
    predicted: list[list[int] | None]
    """Per disc: the predicted classes, None when the disc was not graded."""
    problems: list[str]


def vertebra_correct(pred_corners: np.ndarray, pred_slice: float, truth: dict[str, Any], half_width_slices: float) -> bool:
    """The predicted body lies on the true one: centre within half a body height in-plane, on a slice through it."""
    t = np.asarray(truth["corners_px"])
    height = np.linalg.norm((t[0] + t[1]) / 2 - (t[2] + t[3]) / 2)
    dist = np.linalg.norm(np.mean(pred_corners, axis=0) - np.mean(t, axis=0))
    return bool(dist < 0.5 * height and abs(pred_slice - truth["slice"]) <= half_width_slices)


def balanced_accuracy(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean per-class recall over the classes present in ``truth``; NaN without any."""
    recalls = [float(np.mean(pred[truth == c] == c)) for c in range(n_classes) if np.any(truth == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def summarise(records: list[StudyRecord]) -> dict[str, Any]:
    n = len(records)
    out: dict[str, Any] = {"studies": n}
    out["labelling_all_correct_fraction"] = float(np.mean([all(r.labels_correct.get(v, False) for v in VERTEBRAE) for r in records])) if n else float("nan")
    out["vertebra_correct_fraction"] = float(np.mean([r.labels_correct.get(v, False) for r in records for v in VERTEBRAE])) if n else float("nan")
    pairs = [(t, p) for r in records for t, p in zip(r.truth, r.predicted)]
    graded = [(t, p) for t, p in pairs if p is not None]
    out["discs"] = len(pairs)
    out["discs_graded_fraction"] = len(graded) / len(pairs) if pairs else float("nan")
    out["studies_flagged_fraction"] = float(np.mean([bool(r.problems) for r in records])) if n else float("nan")
    if graded:
        t = np.array([g[0] for g in graded])
        p = np.array([g[1] for g in graded])
        for j, g in enumerate(GRADINGS):
            out[f"{g.key}_balanced_accuracy"] = balanced_accuracy(t[:, j], p[:, j], len(g.classes))
            out[f"{g.key}_accuracy"] = float(np.mean(t[:, j] == p[:, j]))
            out[f"{g.key}_positives" if g.binary else f"{g.key}_counts"] = (
                int(np.sum(t[:, j] == 1)) if g.binary else np.bincount(t[:, j], minlength=len(g.classes)).tolist())
        out["pfirrmann_exact"] = out["pfirrmann_grade_accuracy"]
        out["pfirrmann_within_one"] = float(np.mean(np.abs(t[:, 0] - p[:, 0]) <= 1))
        out["narrowing_within_one"] = float(np.mean(np.abs(t[:, 1] - p[:, 1]) <= 1))
    return out


def target_misses(metrics: dict[str, Any]) -> list[str]:
    """Every target missed; a NaN or missing figure is a miss."""
    misses = []
    for key, target in TARGETS.items():
        value = metrics.get(key)
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            misses.append(f"{key}: missing or NaN")
        elif value < target:
            misses.append(f"{key}: {value:.3f} < {target}")
    return misses


def evaluate_study(analyzer: Any, i: int, seed: int = TEST_SEED) -> StudyRecord:
    from analyzers import phantoms
    from dicomnode.analysis import Study

    from .phantom import draw_convention, render, series_datasets, truth_of

    rng = np.random.default_rng([seed, i])
    ph = render(rng)
    patient = phantoms.PhantomPatient.make(rng, "smr", seed * 100000 + i, study_description="MR LUMBAR SPINE")
    datasets = series_datasets(ph.t2, ph, patient, rng, t1=False, series_number=3, convention=draw_convention(rng))
    truth = truth_of(ph)
    study = Study.from_datasets(datasets)
    _, pred = analyzer.predict_series(study.series[0])
    labels = {}
    for name in VERTEBRAE:
        v = pred.vertebrae.get(name)
        tv = truth["vertebrae"][name]
        labels[name] = v is not None and vertebra_correct(v.corners, v.candidate.slice, tv, ph.body(name).half_width / ph.slice_mm)
    by_level = {d.level: d for d in pred.discs}
    predicted: list[list[int] | None] = []
    for level in LEVELS:
        d = by_level.get(level)
        predicted.append(None if d is None or d.gated else d.grades)
    t = [[truth["discs"][lvl]["grades"][g.key] for g in GRADINGS] for lvl in LEVELS]
    return StudyRecord(labels, t, predicted, pred.problems)


def run(weights: Path, n: int, seed: int = TEST_SEED) -> dict[str, Any]:
    from dicomnode.analysis import AnalyzerSettings

    from .analyzer import MODEL_NAMES, SpineMriGrading

    settings = AnalyzerSettings(device="cpu", model_paths={m: Path(weights) / f"{m}.json" for m in MODEL_NAMES})
    analyzer = SpineMriGrading(settings)
    t0 = time.time()
    records = []
    for i in range(n):
        records.append(evaluate_study(analyzer, i, seed))
        if (i + 1) % 20 == 0:
            print(f"[{time.strftime('%H:%M:%S')}] evaluated {i + 1}/{n} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    metrics = summarise(records)
    metrics["seed"] = f"({seed}, i), i < {n}"
    metrics["seconds_per_study"] = round((time.time() - t0) / max(n, 1), 2)
    metrics["target_misses"] = target_misses(metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    metrics = run(args.weights, args.n)
    print(json.dumps(metrics, indent=2))
    return 1 if args.check and metrics["target_misses"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
