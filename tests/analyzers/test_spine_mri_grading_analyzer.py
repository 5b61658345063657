"""spine_mri_grading end to end: series selection, phantom studies with the bundled weights, SR, real lumbar MR, metrics.json."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers import phantoms
from analyzers.spine_mri_grading import evaluate
from analyzers.spine_mri_grading.analyzer import SpineMriGrading
from analyzers.spine_mri_grading.constants import GRADINGS, LEVELS, VERTEBRAE
from analyzers.spine_mri_grading.phantom import write_phantoms
from dicomnode.analysis import AnalyzerSettings, NotApplicable, Study
from dicomnode.encoders import EncoderContext, encode_result
from tests.dicomtools import dciodvfy

# write_phantoms seeds are (seed, i); training used (1, i) and metrics.json (3, i): these studies are fresh
FRESH_SEED = 9316
WEIGHTS = Path(__file__).resolve().parents[2] / "analyzers" / "spine_mri_grading" / "weights"


@pytest.fixture(scope="module")
def analyzer() -> SpineMriGrading:
    a = SpineMriGrading(AnalyzerSettings(device="cpu"))
    a.load()
    return a


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory) -> tuple[Study, dict]:
    folder = write_phantoms(tmp_path_factory.mktemp("smr"), 1, FRESH_SEED)[0]
    paths = sorted(folder.glob("*.dcm"))
    return Study.from_datasets([pydicom.dcmread(p) for p in paths], paths), json.loads((folder / "truth.json").read_text())


def test_select_takes_the_sagittal_t2_and_ignores_the_t1(analyzer, phantom_study):
    study, truth = phantom_study
    chosen = analyzer.select(study)
    assert [s.series_instance_uid for s in chosen] == [truth["t2_series_instance_uid"]]


def test_select_declines_studies_without_a_sagittal_lumbar_t2(analyzer, phantom_study):
    study, truth = phantom_study
    t1 = [s for s in study.series if s.series_instance_uid != truth["t2_series_instance_uid"]]
    with pytest.raises(NotApplicable, match="not T2-weighted"):
        analyzer.select(Study(study.study_instance_uid, t1))
    datasets = [i.dataset for s in study.series for i in s.instances]
    cervical = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.BodyPartExamined, ds.SeriesDescription, ds.StudyDescription = "CSPINE", "T2 TSE SAG", "MR C-SPINE"
        cervical.append(ds)
    with pytest.raises(NotApplicable, match="not labelled lumbar"):
        analyzer.select(Study.from_datasets(cervical))
    axial = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        axial.append(ds)
    with pytest.raises(NotApplicable, match="axial, not sagittal"):
        analyzer.select(Study.from_datasets(axial))
    ct = phantoms.image_dataset(np.zeros((8, 8), np.uint16), patient=phantoms.PhantomPatient("P", "P^P", "19700101", "F"), modality="CT",
                                sop_class_uid=phantoms.CT_IMAGE)
    with pytest.raises(NotApplicable, match="no MR series"):
        analyzer.select(Study.from_datasets([ct]))


def test_phantom_study_is_labelled_graded_and_encoded(analyzer, phantom_study, tmp_path):
    study, truth = phantom_study
    result = analyzer.analyze(analyzer.select(study))
    outlines = {r.group: r for r in result.regions if r.key == "vertebral_body_outline"}
    assert set(outlines) == set(VERTEBRAE)
    rows = [float(np.mean(outlines[v].points[:, 1])) for v in VERTEBRAE]
    assert rows == sorted(rows), "levels are not in anatomical order (rows grow towards the sacrum)"
    graded = [f for f in result.findings if f.value is not None]
    if not result.review_required:
        assert len(graded) == len(LEVELS) * len(GRADINGS)
    for f in graded:
        assert f.group in LEVELS and f.site == f.group and 0.0 <= f.probability <= 1.0
    probs = [m for m in result.measurements if m.group == "L4-L5" and m.key.startswith("p_pfirrmann_grade_")]
    if probs:
        assert sum(m.value for m in probs) == pytest.approx(1.0, abs=1e-4)
    objects = encode_result(result, study, EncoderContext())
    sr = objects[0]
    report = dciodvfy(sr)
    assert not report.errors, report.output
    assert str(sr.SeriesNumber).startswith("905")


def test_every_bundled_metric_is_present_and_finite():
    metrics = json.loads((WEIGHTS / "metrics.json").read_text())
    for key in evaluate.TARGETS:
        assert isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key]), f"{key} is missing or NaN in metrics.json"
    assert metrics["target_misses"] == evaluate.target_misses(metrics)
    assert metrics["studies"] >= 100


# -- real lumbar MR ----------------------------------------------------------


def _real_series(mat: Path, step: int = 4) -> tuple[Study, np.ndarray]:
    """A real 1 mm volume (rows superior-inferior, columns anterior-posterior) as a 4 mm sagittal T2 series."""
    from scipy.io import loadmat

    data = loadmat(mat)
    image, labels = data["I"], data["GT"]
    patient = phantoms.PhantomPatient("REAL-MR", "REAL^MR", "19700101", "F", study_uid=phantoms.new_uid("real", mat.parent.parent.parent.name))
    series_uid = phantoms.new_uid("real-series", mat.parent.parent.parent.name)
    datasets = []
    for n, k in enumerate(range(0, image.shape[2], step), start=1):
        ds = phantoms.image_dataset(
            np.ascontiguousarray(image[:, :, k]).astype(np.uint16), patient=patient, modality="MR", sop_class_uid=phantoms.MR_IMAGE,
            series_uid=series_uid, instance_number=n, series_description="T2 SAG", pixel_spacing=(1.0, 1.0), bits_stored=8,
            attributes={"ImageOrientationPatient": [0, 1, 0, 0, 0, -1], "ImagePositionPatient": [float(k), 0.0, 0.0],
                        "BodyPartExamined": "LSPINE", "EchoTime": 100.0, "SliceThickness": float(step)},
        )
        datasets.append(ds)
    return Study.from_datasets(datasets), labels[:, :, ::step][:, :, : len(datasets)]


@pytest.mark.parametrize("name", ["VB2", "VB1"])
def test_real_lumbar_mr_is_labelled_in_anatomical_order_or_flagged(analyzer, realdata: Path, name: str):
    mat = realdata / "fastcleverseg" / "ImageDatasets" / "VBs" / name / "Isotropic" / "Matlab" / "02.mat"
    if not mat.is_file():
        pytest.skip(f"fastcleverseg {name} is not present")
    study, labels = _real_series(mat)
    try:
        result = analyzer.analyze(analyzer.select(study))
    except NotApplicable as exc:
        assert "vertebrae" in str(exc) or "sacrum" in str(exc)
        return
    if result.review_required:
        assert result.review_reasons and all(isinstance(r, str) and r for r in result.review_reasons)
        return
    # a confident result must put every labelled body on a real body, in order
    outlines = {r.group: r for r in result.regions if r.key == "vertebral_body_outline"}
    rows = [float(np.mean(outlines[v].points[:, 1])) for v in VERTEBRAE]
    assert rows == sorted(rows)
    k_of = {s.sop_instance_uid: k for k, s in enumerate(study.series[0].instances)}
    for v in VERTEBRAE[:-1]:
        r = outlines[v]
        c, rr = np.mean(r.points, axis=0).round().astype(int)
        assert labels[rr, c, k_of[r.source.sop_instance_uid]] > 0, f"{v} is not on a vertebral body of the reference mask"


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_dicomnode_analyze_writes_the_grading_table(tmp_path: Path, fmt: str):
    import csv
    import os
    import subprocess
    import sys

    folder = write_phantoms(tmp_path / "in", 1, FRESH_SEED + 1)[0]
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dicomnode"), "analyze", "--analyzer", "spine_mri_grading", "--out", str(out), "--format", fmt, str(folder)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode == 0, proc.stderr
    truth = json.loads((folder / "truth.json").read_text())
    table = out / f"{truth['study_instance_uid']}_findings.{fmt}"
    if fmt == "csv":
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["group", *(g.key for g in GRADINGS)]
    else:
        rows = json.loads(table.read_text())["rows"]
    assert [r["group"] for r in rows] == list(LEVELS)
    for r in rows:
        assert r["pfirrmann_grade"] in ("1", "2", "3", "4", "5", "", None)
