"""The bundled dxa_scoliosis weights on FRESH held-out phantoms (seeds never used in training).

Targets of the issue: spine IoU >= 0.85, head IoU >= 0.90, scoliosis accuracy
>= 95 %, number-of-curves accuracy >= 90 %, Spearman(soft score, Cobb) >= 0.8,
Cobb estimate mean absolute error <= 5 degrees. Training used seeds 1 (train),
1001 (calibration) and 5001 (evaluation); these tests use 90 000 and up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.analysis import RegistryEntry
from analyzers.dxa_scoliosis import train
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
    assert m["iou"]["spine"] >= 0.85, m
    assert m["iou"]["head"] >= 0.90, m
    assert m["scoliosis_accuracy"] >= 0.95, m
    assert m["curves_accuracy"] >= 0.90, m
    assert m["spearman_score_cobb"] >= 0.8, m
    assert m["cobb_mae_deg"] <= 5.0, m


def test_targets_on_fresh_phantoms():
    _check(_evaluate(40, 90_400))


@pytest.mark.slow
def test_targets_on_a_larger_fresh_set():
    _check(_evaluate(400, 91_000))
