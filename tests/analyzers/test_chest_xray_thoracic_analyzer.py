"""chest_xray_thoracic end to end: phantom studies and real files through the bundled ONNX weights."""

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers.chest_xray_thoracic import inference, phantom, preprocess
from analyzers.chest_xray_thoracic.analyzer import FINDING_KEYS, GROUP, ChestXrayThoracic
from analyzers.chest_xray_thoracic.constants import LABELS, NIH_LABELS
from analyzers.chest_xray_thoracic.evaluate import evaluate_phantoms
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
    assert all(not m.phantom_trained and len(m.sha256) == 64 for m in infos)
    assert analyzer.classified_labels() == NIH_LABELS_IN_ORDER
    assert set(analyzer.evaluated_labels()) == set(NIH_LABELS) | {"Cardiomegaly"}
    assert set(analyzer.operating_points()) == set(NIH_LABELS)
    analyzer.warmup()


NIH_LABELS_IN_ORDER = tuple(label for label in LABELS if label in NIH_LABELS)


def test_phantom_result_is_complete_and_consistent(analyzer, tmp_path):
    folder = phantom.write_phantoms(tmp_path, 1, seed=5101)[0]
    study, truth = _study(folder)
    ds = pydicom.dcmread(folder / truth["file"])
    result = analyzer.analyze(analyzer.select(study))
    # real-image weights under non-commercial licences: still not for clinical use, and the notice says why
    assert result.not_for_clinical_use and "research, non-commercial" in result.use_notice
    assert [s.sop_instance_uid for s in result.sources] == [truth["sop_instance_uid"]]
    keys = [f.key for f in result.findings]
    assert keys == [FINDING_KEYS[label] for label in LABELS]
    withheld = any("withheld" in r for r in result.review_reasons)
    for f in result.findings:
        label = LABELS[keys.index(f.key)]
        assert f.group == GROUP
        if withheld or label not in analyzer.evaluated_labels():
            assert f.value is None and f.probability is None  # not evaluated by this model
        elif label == "Cardiomegaly":
            assert isinstance(f.value, bool) and f.probability is None  # from the measured ratio
        else:
            assert isinstance(f.value, bool) and 0.0 <= f.probability <= 1.0
            assert f.probability == float(f"{f.probability:.3g}")  # three significant digits
        assert (f.heatmap is not None) == bool(f.value and f.probability is not None)
    heatmaps = {h.key: h for h in result.heatmaps}
    assert set(heatmaps) == {f.heatmap for f in result.findings if f.heatmap}
    for h in heatmaps.values():
        assert h.data.shape == (ds.Rows, ds.Columns) and h.data.min() >= 0 and h.data.max() <= 1
    assert not withheld, result.review_reasons
    (ctr,) = result.measurements
    assert ctr.key == "cardiothoracic_ratio" and ctr.unit == "1" and ctr.group == GROUP
    assert abs(ctr.value - truth["ctr"]) < 0.06
    by_key = {r.key: r for r in result.regions}
    assert set(by_key) == {"heart_outline", "left_lung_outline", "right_lung_outline", "thorax_outline", "heart_width", "thoracic_width"}
    # findings and the ratio sit in their own group on the thorax outline, with the two widths as lines;
    # each outline is its own group
    assert {r.key for r in result.regions if r.group == GROUP} == {"thorax_outline", "heart_width", "thoracic_width"}
    assert by_key["thorax_outline"].kind == "polygon"
    assert {by_key[k].group for k in ("right_lung_outline", "left_lung_outline", "heart_outline")} == {"Right lung", "Left lung", "Heart"}
    heart_w, thorax_w = (np.ptp(by_key[k].points[:, 0]) for k in ("heart_width", "thoracic_width"))
    assert by_key["heart_width"].kind == "polyline" and heart_w / thorax_w == pytest.approx(ctr.value, abs=2e-3)
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
    low = ChestXrayThoracic(AnalyzerSettings(device="cpu", options={"operating_points": {"effusion": 0.0, "Pneumonia": 1.0}}))
    result = low.analyze(low.select(study))
    by_key = {f.key: f for f in result.findings}
    assert by_key["effusion"].value is True and by_key["effusion"].heatmap == "effusion_evidence"
    assert by_key["pneumonia"].value is (by_key["pneumonia"].probability >= 1.0)
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


def test_bundled_weights_meet_targets_on_fresh_phantoms(analyzer):
    metrics = evaluate_phantoms(analyzer, 20, seed=6001)
    for name, d in metrics["dice"].items():
        assert d["mean"] >= PHANTOM_DICE, (name, d)
    assert metrics["ctr_abs_error"]["mean"] <= 0.04 and metrics["ctr_abs_error"]["not_measured"] == 0, metrics["ctr_abs_error"]


PHANTOM_DICE = 0.85


def _real(path: str) -> Path:
    p = REAL / path
    if not p.exists():
        pytest.skip(f"shared real data not present ({path})")
    return p


def _png_as_cr(path: Path, seed: int) -> pydicom.Dataset:
    """A real ChestX-ray14 PNG wrapped as a CR image, as a PACS would send it."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"), np.uint16) * 16
    rng = np.random.default_rng(seed)
    return image_dataset(pixels, patient=PhantomPatient.make(rng, "cxr", seed), modality="CR", pixel_spacing=(0.143, 0.143),
                         bits_stored=12, attributes={"BodyPartExamined": "CHEST", "ViewPosition": "PA"})


REAL_FRONTAL = [
    "pydicom-data/data_store/data/RG1_J2KI.dcm",  # MONOCHROME1, JPEG 2000
    "fo-dicom/Tests/FO-DICOM.Tests/Test Data/CR-MONO1-10-chest",  # no file meta
    "nih-chestxray14/00000001_000.png",  # labelled Cardiomegaly
    "nih-chestxray14/00027426_000.png",  # No Finding
]


@pytest.mark.parametrize("name", REAL_FRONTAL)
def test_real_frontal_radiographs_are_analysed_with_a_plausible_ratio(analyzer, name):
    path = _real(name)
    ds = _png_as_cr(path, 7) if path.suffix == ".png" else pydicom.dcmread(path, force=True)
    result = analyzer.analyze(analyzer.select(Study.from_datasets([ds], [path])))
    assert not any("withheld" in r for r in result.review_reasons), result.review_reasons
    (ctr,) = result.measurements
    assert 0.30 <= ctr.value <= 0.75, ctr.value
    assert len(result.findings) == 14 and result.segmentations[0].masks.shape[1:3] == (ds.Rows, ds.Columns)
    assert {r.key for r in result.regions} >= {"right_lung_outline", "left_lung_outline", "heart_outline", "heart_width"}


def test_cardiomegaly_case_has_a_larger_ratio_than_the_normal_one(analyzer):
    ratios = []
    for name in REAL_FRONTAL[2:]:
        path = _real(name)
        result = analyzer.analyze(analyzer.select(Study.from_datasets([_png_as_cr(path, 8)], [path])))
        ratios.append(result.measurements[0].value)
    assert ratios[0] > ratios[1] and ratios[0] > 0.5, ratios


def test_the_mask_weighs_the_findings(analyzer):
    """The paper's feature weighting with the bundled classifier: a blank mask moves every probability."""
    path = _real(REAL_FRONTAL[3])
    x = preprocess.to_net_input(preprocess.imaging.display_image(_png_as_cr(path, 9), 0))[None]
    prob = inference.segment(analyzer._seg, x)[0]
    mask = inference.classifier_mask(prob)
    with_mask, _ = inference.classify(analyzer._cls, x, mask)
    blank, _ = inference.classify(analyzer._cls, x, np.zeros_like(mask))
    cols = [LABELS.index(k) for k in NIH_LABELS]
    assert np.abs(with_mask[0, cols] - blank[0, cols]).max() > 0.05, (with_mask[0, cols], blank[0, cols])


def test_real_lateral_dog_thorax_is_declined(analyzer):
    path = _real("highdicom/data/test_files/dx_image.dcm")
    with pytest.raises(NotApplicable, match="lateral view"):
        analyzer.select(Study.from_datasets([pydicom.dcmread(path)], [path]))


@pytest.mark.parametrize("change", ["upside_down", "noise"])
def test_implausible_segmentation_withholds_findings(analyzer, change):
    """A chest radiograph stored upside down, and pure noise labelled as one: the gates withhold everything."""
    path = _real(REAL_FRONTAL[3])
    ds = _png_as_cr(path, 10)
    px = ds.pixel_array[::-1] if change == "upside_down" else np.random.default_rng(11).integers(0, 4000, ds.pixel_array.shape)
    ds.PixelData = np.ascontiguousarray(px, np.uint16).tobytes()
    result = analyzer.analyze(analyzer.select(Study.from_datasets([ds], [path])))
    assert result.review_required and any("withheld" in r for r in result.review_reasons)
    assert all(f.value is None for f in result.findings) and not result.measurements
    assert {r.key for r in result.regions} >= {"thorax_outline", "right_lung_outline"}  # the failed outlines are still shown


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_no_training_radiograph_is_declined_and_every_ratio_is_plausible(analyzer):
    """Every real frontal radiograph of ../shared/traindata through the networks and the gates."""
    from analyzers.chest_xray_thoracic import data

    root = SHARED / "traindata" / "chest"
    if not root.is_dir():
        pytest.skip("shared training data not present")
    images = [c.image for c in data.read_mask_folder(root / "lung_heart_masks")] + sorted((root / "nih_cxr" / "images").glob("*.png"))
    bad = []
    for path in images:
        display = data.load_png(path)
        x = preprocess.to_net_input(display)[None]
        prob = inference.segment(analyzer._seg, x)[0]
        _, masks = inference.full_masks(prob, display.shape)
        g = inference.ctr_geometry(masks)
        verdict = inference.plausibility(prob, masks, g, display)
        if verdict.decline or g is None or not 0.30 <= g.ctr <= 0.75:
            bad.append((path.name, verdict.decline, None if g is None else round(g.ctr, 3)))
    assert not bad, (len(bad), bad[:10])


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
