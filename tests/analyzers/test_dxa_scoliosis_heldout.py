"""The bundled dxa_scoliosis weights on FRESH held-out phantoms (seeds never used in training or tuning).

The targets are ``evaluate.TARGETS`` (per-class mean accuracies, part IoU,
scored curves: count, Cobb error, apex level); a missing or NaN figure fails.
Training used seeds 1 (train) and 1001 (calibration), metrics.json the frozen
test seed; these tests use 90 000 and up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.analysis import RegistryEntry
from analyzers.dxa_scoliosis import train
from analyzers.dxa_scoliosis.evaluate import failures
from analyzers.dxa_scoliosis.inference import MaskCalibration

WEIGHTS = Path(train.__file__).resolve().parent / "weights"


def _evaluate(n: int, seed: int) -> dict:
    seg = RegistryEntry.load(WEIGHTS / "dxa_scoliosis_seg.json")
    cls = RegistryEntry.load(WEIGHTS / "dxa_scoliosis_cls.json")
    seg.verify()
    cls.verify()
    seg_fn, cls_fn = train.onnx_fns(seg.path, cls.path)
    data = train.generate(n, seed, log_every=0)
    cal = MaskCalibration.from_json(seg.extra["mask_calibration"])
    return train.evaluate(data, seg_fn, cls_fn, float(seg.extra["midline_sigma_rows"]), cal)


def _check(m: dict) -> None:
    assert not failures(m), (failures(m), m)


def test_targets_on_fresh_phantoms():
    _check(_evaluate(60, 90_400))


@pytest.mark.slow
def test_targets_on_a_larger_fresh_set():
    _check(_evaluate(400, 91_000))


def test_failures_catch_missing_and_nan_figures():
    m = {"iou": {"spine": 0.9}, "scoliosis_mean_class_accuracy": float("nan"), "scoliosis_bands": [{"range": [5, 10], "n": 0, "accuracy": None}]}
    out = failures(m)
    assert any("scoliosis_mean_class_accuracy" in f for f in out)
    assert any("iou.head" in f for f in out) and any("scoliosis_bands" in f for f in out) and any("positioning_bands" in f for f in out)
