"""ct_vertebral_fracture: the pieces of the array pipeline on known inputs (heights, labelling, dissection, metrics)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from analyzers.ct_vertebral_fracture import evaluate, inference, preprocess
from analyzers.ct_vertebral_fracture.constants import GENANT_BOUNDS, HEIGHT_LINE, genant_grade

WEIGHTS = Path(__file__).resolve().parents[2] / "analyzers" / "ct_vertebral_fracture" / "weights"
REAL = Path(__file__).resolve().parents[3] / "shared" / "realdata"


def _body_patch(ant: float, post: float, depth: float = 30.0, noise: float = 10.0, seed: int = 0) -> np.ndarray:
    """A 96^3 HU patch with a wedge-shaped body (cortex 700 HU, trabecular 150 HU) in soft tissue."""
    rng = np.random.default_rng(seed)
    n = 96
    a, y, x = np.meshgrid(*(np.arange(n) - (n - 1) / 2,) * 3, indexing="ij")
    t = y / (depth / 2)
    h = post + (ant - post) * (HEIGHT_LINE - t) / (2 * HEIGHT_LINE)  # linear in AP, as the phantom's wedge
    inside = (np.abs(a) <= h / 2) & (np.abs(t) <= 1) & (np.abs(x) <= 18)
    core = (np.abs(a) <= h / 2 - 1.2) & (np.abs(t) <= 1 - 1.2 / (depth / 2)) & (np.abs(x) <= 17)
    hu = np.full((n, n, n), 40.0)
    hu[inside] = 700.0
    hu[core] = 150.0
    from scipy import ndimage

    hu = ndimage.gaussian_filter(hu, 0.8)
    return (hu + rng.normal(0, noise, hu.shape)).astype(np.float32)


def test_heights_of_a_known_wedge():
    # the half-maximum rule reads a thin blurred cortex a little wide (a bias calibrated on phantoms
    # and stored with the model); differences between the heights of one body are exact
    for ant, post in ((24.0, 24.0), (15.0, 25.0), (18.0, 26.0)):
        h = preprocess.heights(_body_patch(ant, post))
        assert h is not None
        mid = (ant + post) / 2
        got = np.array(h.as_list())
        assert np.all(np.abs(got - [ant, mid, post]) < 2.0), (ant, post, h)
        assert np.all(np.abs((got - got[2]) - (np.array([ant, mid, post]) - post)) < 0.6), (ant, post, h)


def test_heights_decline_a_patch_without_a_body():
    assert preprocess.heights(np.full((96, 96, 96), 40.0, np.float32)) is None


def test_genant_grades_at_their_boundaries():
    assert [genant_grade(x) for x in (0.0, 0.1999, 0.20, 0.2499, 0.25, 0.3999, 0.40, 0.9)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert GENANT_BOUNDS == (0.20, 0.25, 0.40)


def test_labels_are_consecutive_and_a_misread_vertebra_is_outvoted():
    levels, disagreement = inference.consecutive_labels(np.array([5.1, 6.2, 6.9, 12.0, 9.1, 9.8]))
    assert levels.tolist() == [5, 6, 7, 8, 9, 10]
    assert disagreement == pytest.approx(1 / 6)
    _, bad = inference.consecutive_labels(np.array([5.0, 9.0, 2.0, 14.0]))
    assert bad > inference.LABEL_DISAGREEMENT


def test_peaks_are_separated_and_strongest_first():
    heat = np.zeros((60, 30))
    heat[10, 15], heat[12, 15], heat[40, 14] = 0.9, 0.8, 0.7
    p = inference.peaks(heat, threshold=0.5, min_distance_px=5)
    assert p.tolist() == [[10, 15], [40, 14]]


def test_dissection_relevance_sums_activations_above_each_threshold():
    d = inference.Dissection(thresholds=np.array([0.5, 2.0], np.float32), correlation=np.array([0.9, 0.1], np.float32), ranking=[0, 1])
    acts = np.zeros((2, 2, 2, 2), np.float32)
    acts[0, 0] = [[0.2, 0.6], [1.0, 0.4]]
    acts[1, 0] = [[1.0, 1.5], [2.5, 3.0]]
    assert d.relevance(acts).tolist() == pytest.approx([1.6, 5.5])
    units = inference.relevant_units(acts, d, top=2)
    assert [u.index for u in units] == [1, 0] and units[0].activation.shape == (96, 96, 96)


def test_training_dissection_thresholds_hold_the_quantile():
    from analyzers.ct_vertebral_fracture.train import dissect

    rng = np.random.default_rng(0)
    acts = rng.random((40, 4, 8, 8, 8)).astype(np.float32)
    y = np.r_[np.ones(20), np.zeros(20)]
    d = dissect(acts, y, np.r_[np.ones(20), np.zeros(20)], 0.5, 0.005)
    share = (acts > np.asarray(d["thresholds"])[None, :, None, None, None]).mean(axis=(0, 2, 3, 4))
    assert np.allclose(share, 0.005, atol=0.001)
    assert len(d["ranking"]) == 4 and all(0 <= c <= 1 for c in d["correlation"])


def test_auroc_and_the_nan_gate():
    assert evaluate.auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert evaluate.auroc(np.array([1, 1]), np.array([0.2, 0.3])) != evaluate.auroc(np.array([1, 1]), np.array([0.2, 0.3]))  # NaN
    assert "fracture_auroc" in evaluate.missing_or_nan({"fracture_auroc": float("nan")})


def test_bundled_metrics_are_complete_and_say_which_targets_are_missed():
    metrics = json.loads((WEIGHTS / "metrics.json").read_text())
    assert evaluate.missing_or_nan(metrics) == []
    assert metrics["seed"] == 3 and metrics["studies"] >= 20
    assert metrics["target_misses"] == evaluate.target_misses(metrics)
    assert all(math.isfinite(metrics[k]) for k in evaluate.TARGETS)


@pytest.mark.skipif(not (REAL / "verse-anjany").is_dir(), reason="../shared/realdata not present")
def test_train_reads_the_verse_centroid_and_mask_format():
    import SimpleITK as sitk

    from analyzers.ct_vertebral_fracture import train

    sample = REAL / "verse-anjany" / "utils" / "sample"
    mask = sitk.ReadImage(str(sample / "sub-verse004_seg-vert_msk.nii.gz"))
    json_c = train.verse_centroids(sample / "sub-verse004_seg-subreg_ctd.json", mask)
    mask_c = train.verse_mask_centroids(sample / "sub-verse004_seg-vert_msk.nii.gz")
    assert list(json_c) == ["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    arr = sitk.GetArrayFromImage(mask)
    numbers = {v: k for k, v in train.VERSE_LABELS.items()}
    for label, c in json_c.items():
        i, j, k = (int(round(v)) for v in mask.TransformPhysicalPointToContinuousIndex(c))
        assert arr[k, j, i] == numbers[label]  # the body centroid lies in its own vertebra
        assert np.linalg.norm(np.subtract(c, mask_c[label])) < 20  # the whole vertebra's centroid is a little behind it
    # ordered head to feet along the spine
    z = [json_c[k][2] for k in json_c]
    assert z == sorted(z, reverse=True)
