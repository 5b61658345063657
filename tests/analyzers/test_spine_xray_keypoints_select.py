"""Which studies spine_xray_keypoints accepts, and the sentences it declines the others with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers import phantoms
from dicomnode.analysis import NotApplicable, Study
from analyzers.spine_xray_keypoints.analyzer import SpineXrayKeypoints

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def _study(modality: str = "DX", spacing: tuple[float, float] | None = (0.3, 0.3), **attributes: str) -> Study:
    rng = np.random.default_rng(0)
    patient = phantoms.PhantomPatient.make(rng, "sxrsel", 1)
    sop = phantoms.CT_IMAGE if modality == "CT" else phantoms.DX_IMAGE_PRESENTATION
    ds = phantoms.image_dataset(np.zeros((32, 32), np.uint16), patient=patient, modality=modality, sop_class_uid=sop, pixel_spacing=spacing, attributes=attributes)
    return Study.from_datasets([ds])


@pytest.mark.parametrize(
    ("attributes", "region"),
    [
        ({"BodyPartExamined": "CSPINE", "ViewPosition": "LL"}, "cervical"),
        ({"BodyPartExamined": "LSPINE", "ViewPosition": "RL"}, "lumbar"),
        ({"ViewPosition": "LAT", "SeriesDescription": "L-SPINE 2 VIEWS"}, "lumbar"),
        ({"SeriesDescription": "C-SPINE LATERAL"}, "cervical"),
    ],
)
def test_lateral_cervical_and_lumbar_views_are_selected(attributes: dict[str, str], region: str) -> None:
    from analyzers.spine_xray_keypoints.analyzer import series_region

    study = _study(**attributes)
    chosen = SpineXrayKeypoints().select(study)
    assert len(chosen) == 1
    assert series_region(chosen[0], chosen[0].first()) == region


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"modality": "CT", "BodyPartExamined": "CSPINE"}, "no CR or DX series"),
        ({"BodyPartExamined": "CSPINE", "ViewPosition": "AP"}, "frontal"),
        ({"BodyPartExamined": "CHEST", "ViewPosition": "LL"}, "not the cervical or lumbar spine"),
        ({"BodyPartExamined": "LSPINE", "ViewPosition": "LL", "spacing": None}, "no pixel spacing"),
        ({"BodyPartExamined": "TSPINE", "ViewPosition": "LL"}, "not the cervical or lumbar spine"),
    ],
)
def test_other_studies_are_declined_with_a_sentence(kwargs: dict, words: str) -> None:
    with pytest.raises(NotApplicable, match=words):
        SpineXrayKeypoints().select(_study(**kwargs))


def _real(path: Path) -> Study:
    if not SHARED.exists() or not path.is_file():
        pytest.skip(f"{path.name} is not available here")
    ds = pydicom.dcmread(path, force=True)
    return Study.from_datasets([ds], [path])


def test_real_head_ct_labelled_cspine_is_declined() -> None:
    study = _real(SHARED / "realdata" / "fo-dicom" / "Tests" / "FO-DICOM.Tests" / "Test Data" / "IM-0001-0001-0001.dcm")
    with pytest.raises(NotApplicable, match="CR or DX"):
        SpineXrayKeypoints().select(study)


def test_real_lateral_dog_thorax_is_declined() -> None:
    study = _real(SHARED / "realdata" / "highdicom" / "data" / "test_files" / "dx_image.dcm")
    with pytest.raises(NotApplicable, match="THORAX"):
        SpineXrayKeypoints().select(study)


def test_real_chest_cr_is_declined() -> None:
    study = _real(SHARED / "realdata" / "fo-dicom" / "Tests" / "FO-DICOM.Tests" / "Test Data" / "CR-MONO1-10-chest")
    with pytest.raises(NotApplicable):
        SpineXrayKeypoints().select(study)
