import json

import numpy as np
import pytest

from analyzers.phantoms import PhantomPatient, image_dataset
from dicomnode import imaging
from dicomnode.analysis import (
    AnalysisResult,
    NotApplicable,
    Region,
    RegistryEntry,
    Segmentation,
    SourceRef,
    Study,
    sha256_file,
)
from dicomnode.registry import available_analyzers
from dicomnode.uids import CR_IMAGE


def _cr(pixels, **kw):
    rng = np.random.default_rng(0)
    return image_dataset(pixels, patient=PhantomPatient.make(rng, "unit", 1), modality="CR", sop_class_uid=CR_IMAGE, **kw)


def test_region_rejects_wrong_point_counts():
    src = SourceRef("1.2.3")
    Region("p", "point", [[1.0, 2.0]], src)
    with pytest.raises(ValueError, match="polygon needs 3"):
        Region("poly", "polygon", [[0, 0], [1, 1]], src)
    with pytest.raises(ValueError, match="finite"):
        Region("p", "point", [[np.nan, 0]], src)


def test_segmentation_shape_is_checked():
    with pytest.raises(ValueError, match="2 sources"):
        Segmentation(["a"], np.zeros((1, 4, 4, 1), bool), [SourceRef("1"), SourceRef("2")])


def test_display_image_inverts_monochrome1_and_spacing_zero_is_none():
    px = np.tile(np.arange(16, dtype=np.uint16) * 200, (8, 1))
    m2 = imaging.display_image(_cr(px))
    m1 = imaging.display_image(_cr(px, photometric="MONOCHROME1"))
    assert m2[0, -1] > m2[0, 0]
    assert np.allclose(m1, 1.0 - m2)
    ds = _cr(px, pixel_spacing=(0.2, 0.2))
    assert imaging.pixel_spacing(ds) == (0.2, 0.2)
    ds.ImagerPixelSpacing = ["0", "0"]
    ds.PixelSpacing = ["0", "0"]
    assert imaging.pixel_spacing(ds) is None
    with pytest.raises(NotApplicable, match="pixel spacing"):
        imaging.require_spacing(ds, "measurements need mm")


def test_study_groups_series_and_orders_instances():
    rng = np.random.default_rng(1)
    pat = PhantomPatient.make(rng, "unit", 2)
    a = image_dataset(np.zeros((4, 4), np.uint16), patient=pat, modality="CR", series_uid="1.2.3.1", instance_number=2)
    b = image_dataset(np.zeros((4, 4), np.uint16), patient=pat, modality="CR", series_uid="1.2.3.1", instance_number=1)
    study = Study.from_datasets([a, b])
    assert study.study_instance_uid == pat.study_uid
    assert [i.instance_number for i in study.series[0].instances] == [1, 2]


def test_registry_entry_verifies_sha(tmp_path):
    weights = tmp_path / "m.onnx"
    weights.write_bytes(b"not really onnx")
    entry = RegistryEntry("m", "1.0", "m.onnx", sha256_file(weights), True, {"tau": [1, 2]})
    entry.save(tmp_path / "m.json")
    loaded = RegistryEntry.load(tmp_path / "m.json")
    loaded.verify()
    assert loaded.extra == {"tau": [1, 2]} and loaded.info().not_for_clinical_use
    weights.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        loaded.verify()
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="lacks version"):
        RegistryEntry.load(tmp_path / "bad.json")


def test_bundled_analyzers_are_registered():
    assert {"chest_xray_thoracic", "spine_xray_keypoints", "dxa_scoliosis", "ct_vertebral_fracture", "spine_mri_grading"} <= set(available_analyzers())


def test_every_result_not_cleared_for_clinical_use_says_why(tmp_path):
    weights = tmp_path / "m.onnx"
    weights.write_bytes(b"weights")
    entry = RegistryEntry("m", "1.0", "m.onnx", sha256_file(weights), False, use_note="for research use only")
    entry.save(tmp_path / "m.json")
    real = RegistryEntry.load(tmp_path / "m.json").info()
    phantom = RegistryEntry("p", "1.0", "m.onnx", sha256_file(weights), True).info()
    cleared = RegistryEntry("c", "1.0", "m.onnx", sha256_file(weights), False, clinical_use=True).info()
    assert real.not_for_clinical_use and real.restriction == "for research use only"
    assert phantom.not_for_clinical_use and phantom.restriction == "trained on synthetic phantoms"
    assert not cleared.not_for_clinical_use and cleared.restriction == ""
    result = AnalysisResult("a", "1", models=[real, phantom, cleared])
    assert result.use_notice == ("Produced with model weights for research use only; trained on synthetic phantoms: "
                                 "not for clinical use.")
    assert AnalysisResult("a", "1", models=[cleared]).use_notice == ""
