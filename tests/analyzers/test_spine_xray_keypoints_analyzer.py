"""spine_xray_keypoints end to end on phantom studies with the bundled weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers.base import AnalyzerSettings, NotApplicable, Study, UncertaintyClass
from analyzers.spine_xray_keypoints import evaluation
from analyzers.spine_xray_keypoints.analyzer import HIGH_FLAG, SpineXrayKeypoints
from analyzers.spine_xray_keypoints.mensuration import LEVELS, POINT_KEYS

# seeds of write_phantoms are (seed, i); training used (region, split, i): these studies are fresh
FRESH_SEED = 9301


@pytest.fixture(scope="module")
def analyzer() -> SpineXrayKeypoints:
    a = SpineXrayKeypoints(AnalyzerSettings(device="cpu"))
    a.load()
    return a


def _run(analyzer: SpineXrayKeypoints, folder: Path):
    path = next(folder.glob("*.dcm"))
    study = Study.from_datasets([pydicom.dcmread(path)], [path])
    return analyzer.analyze(analyzer.select(study)), json.loads((folder / "truth.json").read_text())


def _record(result, truth) -> evaluation.StudyRecord:
    spacing = tuple(truth["pixel_spacing"])
    rec = evaluation.StudyRecord(
        region=truth["region"],
        spacing=spacing,
        truth_points={k: np.asarray(v["points"]) for k, v in truth["vertebrae"].items()},
        truth_visible={k: np.asarray(v["visible"], bool) for k, v in truth["vertebrae"].items()},
        truth_measurements={(m["key"], m["group"]): m["value"] for m in truth["measurements"]},
    )
    for r in result.regions:
        if r.kind == "point":
            i = POINT_KEYS.index(r.key)
            rec.pred_points.setdefault(r.group, np.zeros((5, 2)))[i] = r.points[0]
            rec.pred_sigma.setdefault(r.group, np.zeros(5))[i] = r.uncertainty
            rec.pred_class.setdefault(r.group, [""] * 5)[i] = r.uncertainty_class.value
    for m in result.measurements:
        rec.pred_measurements[(m.key, m.group)] = (m.value, HIGH_FLAG in m.flags)
    return rec


def test_result_follows_the_conventions(analyzer: SpineXrayKeypoints, tmp_path: Path) -> None:
    for folder in SpineXrayKeypoints.write_phantoms(tmp_path, 2, FRESH_SEED):
        result, truth = _run(analyzer, folder)
        labels = LEVELS[truth["region"]]
        assert result.not_for_clinical_use and len(result.models) == 4
        assert [s.sop_instance_uid for s in result.sources] == [truth["sop_instance_uid"]]
        groups = {r.group for r in result.regions}
        for item in [*result.measurements, *result.findings]:
            assert item.group in groups, f"group {item.group} has no image region"
        vertebrae = [g for g in groups if g in labels]
        assert len(vertebrae) >= 4
        for v in vertebrae:
            points = [r for r in result.regions if r.group == v and r.kind == "point"]
            assert sorted(r.key for r in points) == sorted(POINT_KEYS)
            assert all(r.uncertainty > 0 and isinstance(r.uncertainty_class, UncertaintyClass) for r in points)
            assert any(r.key == "vertebral_body_outline" and r.kind == "polygon" for r in result.regions if r.group == v)
        units = SpineXrayKeypoints.outputs.measurements
        assert all(m.unit == units[m.key] and np.isfinite(m.value) for m in result.measurements)
        assert all(m.site in SpineXrayKeypoints.outputs.sites for m in result.measurements)
        levels = {m.group for m in result.measurements if m.key == "intervertebral_angle"}
        assert levels and all(any(r.key == "adjacent_endplates" for r in result.regions if r.group == g) for g in levels)
        high = [r for r in result.regions if r.uncertainty_class is UncertaintyClass.HIGH]
        assert result.review_required == bool(high or len(vertebrae) < len(labels))
        for m in result.measurements:
            assert (HIGH_FLAG in m.flags) <= bool(high)
        json.dumps(result.summary())


def _evaluate(analyzer: SpineXrayKeypoints, out: Path, n: int, seed: int) -> dict:
    records = []
    for folder in SpineXrayKeypoints.write_phantoms(out, n, seed):
        result, truth = _run(analyzer, folder)
        records.append(_record(result, truth))
    return evaluation.score(records)


def test_a_blank_lateral_image_is_declined_after_looking(analyzer: SpineXrayKeypoints) -> None:
    from analyzers import phantoms

    patient = phantoms.PhantomPatient.make(np.random.default_rng(0), "sxrblank", 1)
    noise = np.random.default_rng(1).integers(1000, 1100, (400, 400)).astype(np.uint16)
    ds = phantoms.image_dataset(noise, patient=patient, modality="CR", pixel_spacing=(0.3, 0.3), attributes={"BodyPartExamined": "CSPINE", "ViewPosition": "LL"})
    study = Study.from_datasets([ds])
    with pytest.raises(NotApplicable, match="no C3-C7 vertebra"):
        analyzer.analyze(analyzer.select(study))
