"""dxa_scoliosis training script: a tiny end-to-end run writes loadable weights, registry files and metrics."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from dicomnode.analysis import RegistryEntry  # noqa: E402
from analyzers.dxa_scoliosis import train  # noqa: E402


def test_tiny_training_run_writes_a_usable_registry(tmp_path):
    out = tmp_path / "weights"
    train.main(["--out", str(out), "--n-train", "6", "--seg-steps", "2", "--seg-width", "4", "--cls-width", "8", "--cls-epochs", "1", "--n-cal", "3", "--n-test", "3", "--seed", "77"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["seed_test"] == train.TEST_SEED and isinstance(metrics["failures"], list) and set(metrics["iou"]) == set(train.PARTS)
    for name in ("dxa_scoliosis_seg", "dxa_scoliosis_cls"):
        entry = RegistryEntry.load(out / f"{name}.json")
        entry.verify()
        assert entry.phantom_trained and entry.name == name
    seg = RegistryEntry.load(out / "dxa_scoliosis_seg.json")
    assert len(seg.extra["mask_calibration"]["min_thickness"]) == 6 and seg.extra["midline_sigma_rows"] > 0
