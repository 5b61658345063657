"""spine_mri_grading phantoms: SPIDER grade frequencies, continuous quantities across thresholds, real DICOM series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers.spine_mri_grading import phantom
from analyzers.spine_mri_grading.constants import (
    ENDPLATE_DEFECT_MM,
    GRADING_KEYS,
    LEVELS,
    MARROW_CHANGE_MM,
    NARROWING_CUTS,
    PFIRRMANN_CUTS,
    SLIP_FRACTION,
    STENOSIS_FRACTION,
    VERTEBRAE,
)
from analyzers.spine_mri_grading.preprocess import canonical
from analyzers.volume import assemble
from dicomnode.analysis import Study
from tests.dicomtools import dciodvfy


@pytest.fixture(scope="module")
def discs() -> list[phantom.Disc]:
    rng = np.random.default_rng(11)
    return [d for _ in range(400) for d in phantom.draw_grades(rng)]


def test_grades_follow_from_their_continuous_quantities(discs):
    for d in discs:
        v, g = d.values, d.grades
        assert tuple(g) == GRADING_KEYS
        assert g["pfirrmann_grade"] == int(np.searchsorted(PFIRRMANN_CUTS, v["degeneration"], side="right"))
        assert g["disc_narrowing"] == int(np.searchsorted(NARROWING_CUTS, v["height_loss"], side="right"))
        assert g["upper_endplate_defect"] == int(v["upper_endplate_depth_mm"] > ENDPLATE_DEFECT_MM)
        assert g["lower_marrow_change"] == int(v["lower_marrow_band_mm"] > MARROW_CHANGE_MM)
        assert g["spondylolisthesis"] == int(v["slip_fraction"] > SLIP_FRACTION)
        assert g["central_canal_stenosis"] == int(v["canal_loss"] > STENOSIS_FRACTION)


@pytest.mark.parametrize("key, cuts", [
    ("degeneration", PFIRRMANN_CUTS), ("height_loss", NARROWING_CUTS), ("upper_endplate_depth_mm", (ENDPLATE_DEFECT_MM,)),
    ("lower_marrow_band_mm", (MARROW_CHANGE_MM,)), ("slip_fraction", (SLIP_FRACTION,)), ("canal_loss", (STENOSIS_FRACTION,)),
])
def test_quantities_are_dense_on_both_sides_of_every_threshold(discs, key, cuts):
    values = np.array([d.values[key] for d in discs])
    for cut in cuts:
        band = 0.1 * cut
        assert np.sum((values > cut - band) & (values <= cut)) >= 3, f"{key}: no values just below {cut}"
        assert np.sum((values > cut) & (values < cut + band)) >= 3, f"{key}: no values just above {cut}"


def test_grade_frequencies_follow_spider(discs):
    if not phantom.spider_patients():
        pytest.skip("../shared/traindata is not present; the phantom falls back to SPIDER's marginals")
    pf = np.bincount([d.grades["pfirrmann_grade"] for d in discs], minlength=5) / len(discs)
    spider = np.array([286, 341, 418, 291, 184]) / 1520
    assert np.abs(pf - spider).max() < 0.08
    by_level = {lvl: np.mean([d.grades["pfirrmann_grade"] for d in discs if d.level == lvl]) for lvl in LEVELS}
    assert by_level["L5-S1"] > by_level["T12-L1"] + 0.5  # degeneration rises caudally, as in SPIDER
    narrow = np.array([d.grades["disc_narrowing"] > 0 for d in discs])
    high = np.array([d.grades["pfirrmann_grade"] >= 3 for d in discs])
    assert narrow[high].mean() > narrow[~high].mean() + 0.3  # the co-occurrence survives the sampling
    slip = np.mean([d.grades["spondylolisthesis"] for d in discs])
    assert 0.005 < slip < 0.08


def test_written_study_is_valid_dicom_and_reassembles_to_the_phantom(tmp_path: Path):
    folder = phantom.write_phantoms(tmp_path, 1, seed=4242)[0]
    truth = json.loads((folder / "truth.json").read_text())
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    study = Study.from_datasets(datasets)
    assert len(study.series) == 2 and {s.description for s in study.series} >= {"T1 TSE SAG"}
    t2 = next(s for s in study.series if s.series_instance_uid == truth["t2_series_instance_uid"])
    report = dciodvfy(t2.instances[0].dataset)
    assert not report.errors, report.output
    vol = canonical(assemble(t2))
    ph = phantom.render(np.random.default_rng([4242, 0]), with_t1=True)
    assert vol.array.shape == ph.t2.shape and vol.pixel_mm == pytest.approx(ph.pixel_mm, abs=1e-4)
    # the canonical volume is the phantom's own array (up to 12-bit storage), whatever the vendor convention
    ref = ph.t2 / np.percentile(ph.t2, 99.0)
    corr = np.corrcoef(vol.array.ravel(), ref.ravel())[0, 1]
    assert corr > 0.99
    assert set(truth["vertebrae"]) == set(VERTEBRAE) and set(truth["discs"]) == set(LEVELS)
