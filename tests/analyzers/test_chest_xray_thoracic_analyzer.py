"""chest_xray_thoracic end to end: phantom studies and real files through the bundled ONNX weights."""

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers.chest_xray_thoracic import phantom
from analyzers.chest_xray_thoracic.analyzer import FINDING_KEYS, ChestXrayThoracic
from analyzers.chest_xray_thoracic.evaluate import evaluate_folders
from analyzers.chest_xray_thoracic.model import LABELS, SYNTHESISED
from analyzers.phantoms import PhantomPatient, image_dataset
from dicomnode.analysis import AnalyzerSettings, NotApplicable, Study
from dicomnode.registry import available_analyzers

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
REAL = SHARED / "realdata"


@pytest.fixture(scope="module")
def analyzer():
    a = ChestXrayThoracic(AnalyzerSettings(device="cpu"))
    a.load()
    return a


def _study(folder: Path):
    truth = json.loads((folder / "truth.json").read_text())
    path = folder / truth["file"]
    return Study.from_datasets([pydicom.dcmread(path)], [path]), truth


def test_registered_and_bundled_models(analyzer):
    assert "chest_xray_thoracic" in available_analyzers()
    infos = analyzer.models()
    assert [m.name for m in infos] == ["lung_heart_unet", "thoracic_classifier"]
    assert all(m.phantom_trained and len(m.sha256) == 64 for m in infos)
    assert set(analyzer.evaluated_labels()) <= set(SYNTHESISED)
    withheld = analyzer._cls.entry.extra.get("withheld_labels", {})
    assert set(analyzer.evaluated_labels()) | set(withheld) == set(SYNTHESISED)
    analyzer.warmup()


def test_phantom_result_is_complete_and_consistent(analyzer, tmp_path):
    folder = phantom.write_phantoms(tmp_path, 1, seed=5101)[0]
    study, truth = _study(folder)
    ds = pydicom.dcmread(folder / truth["file"])
    result = analyzer.analyze(analyzer.select(study))
    assert result.not_for_clinical_use
    assert [s.sop_instance_uid for s in result.sources] == [truth["sop_instance_uid"]]
    keys = [f.key for f in result.findings]
    assert keys == [FINDING_KEYS[label] for label in LABELS]
    for f in result.findings:
        label = LABELS[keys.index(f.key)]
        assert f.group == "Image"
        if label in analyzer.evaluated_labels():
            assert isinstance(f.value, bool) and 0.0 <= f.probability <= 1.0
        else:
            assert f.value is None and f.probability is None  # not evaluated by this model
        assert (f.heatmap is not None) == bool(f.value)
    heatmaps = {h.key: h for h in result.heatmaps}
    assert set(heatmaps) == {f.heatmap for f in result.findings if f.heatmap}
    for h in heatmaps.values():
        assert h.data.shape == (ds.Rows, ds.Columns) and h.data.min() >= 0 and h.data.max() <= 1
    (ctr,) = result.measurements
    assert ctr.key == "cardiothoracic_ratio" and ctr.unit == "1" and ctr.group == "Image"
    assert abs(ctr.value - truth["ctr"]) < 0.06
    assert sorted(r.key for r in result.regions) == ["heart_outline", "left_lung_outline", "right_lung_outline"]
    assert all(r.group == "Image" and r.kind == "polygon" for r in result.regions)
    seg = result.segmentations[0]
    assert seg.segments == ["right_lung", "left_lung", "heart"]
    assert seg.masks.shape == (1, ds.Rows, ds.Columns, 3) and seg.masks.dtype == bool
    # patient's right lung lies on the image's left in a frontal view
    cols = np.nonzero(seg.masks[0])[1]
    chan = np.nonzero(seg.masks[0])[2]
    assert cols[chan == 0].mean() < cols[chan == 1].mean()
    # every measurement group has an image region
    groups = {x.group for x in result.findings + result.measurements if x.group}
    assert groups <= {r.group for r in result.regions}
    json.dumps(result.summary())


def test_monochrome1_and_monochrome2_give_the_same_answer(analyzer, tmp_path):
    rng = np.random.default_rng(5201)
    ph = phantom.render(rng)
    patient = PhantomPatient.make(rng, "cxr", 1)
    results = []
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        lo, hi = np.percentile(ph.attenuation, [0.2, 99.8])
        norm = np.clip((ph.attenuation - lo) / (hi - lo), 0, 1)
        stored = np.round((1 - norm if photometric == "MONOCHROME1" else norm) * 4095).astype(np.uint16)
        ds = image_dataset(stored, patient=patient, modality="CR", photometric=photometric, pixel_spacing=(0.7, 0.7),
                           attributes={"BodyPartExamined": "CHEST", "ViewPosition": "PA"})
        results.append(analyzer.analyze(analyzer.select(Study.from_datasets([ds]))))
    a, b = results
    for fa, fb in zip(a.findings, b.findings):
        assert fa.value == fb.value
        if fa.probability is not None:
            assert fa.probability == pytest.approx(fb.probability, abs=1e-3)
    assert np.array_equal(a.segmentations[0].masks, b.segmentations[0].masks)


def test_operating_points_are_configurable(tmp_path):
    folder = phantom.write_phantoms(tmp_path, 1, seed=5301)[0]
    study, _ = _study(folder)
    low = ChestXrayThoracic(AnalyzerSettings(device="cpu", options={"operating_points": {"effusion": 0.0, "Consolidation": 1.0}}))
    result = low.analyze(low.select(study))
    by_key = {f.key: f for f in result.findings}
    assert by_key["effusion"].value is True and by_key["effusion"].heatmap == "effusion_evidence"
    assert by_key["consolidation"].value is (by_key["consolidation"].probability >= 1.0)
    bad = ChestXrayThoracic(AnalyzerSettings(device="cpu", options={"operating_points": {"fracture": 0.5}}))
    with pytest.raises(Exception, match="not one of the 14 labels"):
        bad.analyze(bad.select(study))


def _phantom_ds(rng, **attrs):
    ph = phantom.render(rng)
    return phantom.to_dataset(ph, rng, PhantomPatient.make(rng, "cxr", 2), **attrs)


def test_declines_lateral_ct_and_colour(analyzer):
    rng = np.random.default_rng(5401)
    lateral = _phantom_ds(rng, ViewPosition="LL")
    with pytest.raises(NotApplicable, match="lateral view"):
        analyzer.select(Study.from_datasets([lateral]))
    ct = _phantom_ds(rng)
    ct.Modality = "CT"
    with pytest.raises(NotApplicable, match="modality CT"):
        analyzer.select(Study.from_datasets([ct]))
    colour = _phantom_ds(rng)
    colour.SamplesPerPixel = 3
    colour.PhotometricInterpretation = "RGB"
    with pytest.raises(NotApplicable, match="colour image"):
        analyzer.select(Study.from_datasets([colour]))


def test_selects_the_frontal_image_of_a_two_view_study(analyzer):
    rng = np.random.default_rng(5501)
    pa = _phantom_ds(rng, ViewPosition="PA")
    lat = _phantom_ds(rng, ViewPosition="LATERAL")
    lat.StudyInstanceUID = pa.StudyInstanceUID
    (series,) = analyzer.select(Study.from_datasets([lat, pa]))
    assert series.series_instance_uid == pa.SeriesInstanceUID


def test_blank_image_is_not_applicable(analyzer):
    rng = np.random.default_rng(5601)
    ds = image_dataset(np.full((256, 256), 1000, np.uint16), patient=PhantomPatient.make(rng, "cxr", 3), modality="CR",
                       attributes={"BodyPartExamined": "CHEST", "ViewPosition": "PA"})
    with pytest.raises(NotApplicable, match="no contrast"):
        analyzer.analyze(analyzer.select(Study.from_datasets([ds])))


def _check_targets(metrics):
    for name, d in metrics["dice"].items():
        assert d["mean"] >= 0.90, (name, d)
    assert metrics["ctr_abs_error"]["mean"] <= 0.03, metrics["ctr_abs_error"]
    evaluated = [k for k in SYNTHESISED if k not in metrics["not_evaluated"]]
    assert len(evaluated) >= 5
    for label in evaluated:
        value = metrics["auroc"][label]
        assert value >= 0.95, (label, value, metrics["at_operating_point"][label])


def test_bundled_weights_meet_targets_on_fresh_phantoms(analyzer, tmp_path):
    folders = phantom.write_phantoms(tmp_path, 40, seed=6001)
    metrics = evaluate_folders(folders, analyzer=analyzer)
    assert all(metrics["at_operating_point"][k]["positives"] >= 3 for k in SYNTHESISED if metrics["auroc"][k] is not None)
    _check_targets(metrics)


@pytest.mark.slow
def test_bundled_weights_meet_targets_on_many_fresh_phantoms(analyzer, tmp_path):
    folders = phantom.write_phantoms(tmp_path, 200, seed=6101)
    metrics = evaluate_folders(folders, analyzer=analyzer)
    _check_targets(metrics)
    assert metrics["ctr_abs_error"]["p95"] <= 0.05


def _real(path: str) -> Path:
    p = REAL / path
    if not p.exists():
        pytest.skip(f"shared real data not present ({path})")
    return p


def test_real_monochrome1_jpeg2000_chest_is_analysed(analyzer):
    path = _real("pydicom-data/data_store/data/RG1_J2KI.dcm")
    ds = pydicom.dcmread(path)
    result = analyzer.analyze(analyzer.select(Study.from_datasets([ds], [path])))
    assert len(result.findings) == 14 and result.segmentations
    assert result.segmentations[0].masks.shape[1:3] == (ds.Rows, ds.Columns)
    assert {r.key for r in result.regions} >= {"right_lung_outline", "left_lung_outline"}


def test_real_lateral_dog_thorax_is_declined(analyzer):
    path = _real("highdicom/data/test_files/dx_image.dcm")
    with pytest.raises(NotApplicable, match="lateral view"):
        analyzer.select(Study.from_datasets([pydicom.dcmread(path)], [path]))


def test_real_chest_without_file_meta_is_decoded_and_judged(analyzer):
    from analyzers.chest_xray_thoracic import preprocess

    path = _real("fo-dicom/Tests/FO-DICOM.Tests/Test Data/CR-MONO1-10-chest")
    ds = pydicom.dcmread(path, force=True)
    prep = preprocess.prepare(ds)  # no file meta: the transfer syntax is taken from how the file was read
    assert prep.display.shape == (ds.Rows, ds.Columns) and prep.display.std() > 0.05
    # the phantom-trained U-Net may miss this real image's lungs; then it must say so, not guess
    try:
        result = analyzer.analyze(analyzer.select(Study.from_datasets([ds], [path])))
    except NotApplicable as exc:
        assert "no lung fields" in str(exc)
    else:
        assert len(result.findings) == 14 and result.segmentations


def test_cli_analyze_writes_valid_objects(tmp_path):
    import subprocess
    import sys

    from tests.dicomtools import dciodvfy

    repo = Path(__file__).resolve().parents[2]
    folder = phantom.write_phantoms(tmp_path / "in", 1, seed=5701)[0]
    out = tmp_path / "out"
    exe = Path(sys.executable).parent / "dicomnode"
    proc = subprocess.run([str(exe), "analyze", "--analyzer", "chest_xray_thoracic", "--out", str(out), "--json", str(folder)],
                          capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report[0]["outcome"] == "ok"
    files = sorted(out.glob("*.dcm"))
    modalities = [pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files]
    assert "SR" in modalities and "SEG" in modalities
    for f in files:
        rep = dciodvfy(f)
        assert not rep.errors, f"{f.name}: {rep.errors[:5]}"


def test_a_batch_gives_each_study_its_own_result(analyzer, tmp_path):
    """Studies analysed together come out as they do alone; one that cannot be analysed keeps its place."""
    studies = [_study(f)[0] for f in phantom.write_phantoms(tmp_path, 3, seed=5701)]
    rng = np.random.default_rng(5702)
    blank = image_dataset(np.full((256, 256), 1000, np.uint16), patient=PhantomPatient.make(rng, "cxr", 4), modality="CR",
                          attributes={"BodyPartExamined": "CHEST", "ViewPosition": "PA"})
    inputs = [analyzer.select(s) for s in studies]
    inputs.insert(1, analyzer.select(Study.from_datasets([blank])))
    batch = analyzer.analyze_batch(inputs)
    assert len(batch) == 4
    assert isinstance(batch[1], NotApplicable)
    for alone, together in zip([analyzer.analyze(i) for i in inputs[:1] + inputs[2:]], batch[:1] + batch[2:]):
        assert not isinstance(together, Exception)
        np.testing.assert_allclose([f.probability or 0 for f in together.findings], [f.probability or 0 for f in alone.findings], atol=1e-5)
        assert [f.value for f in together.findings] == [f.value for f in alone.findings]
        assert [m.value for m in together.measurements] == [m.value for m in alone.measurements]
        np.testing.assert_array_equal(together.segmentations[0].masks, alone.segmentations[0].masks)
        assert [h.key for h in together.heatmaps] == [h.key for h in alone.heatmaps]
        for a, b in zip(alone.heatmaps, together.heatmaps):
            np.testing.assert_allclose(b.data, a.data, atol=1e-4)
    assert ChestXrayThoracic.batchable
