"""Laterality and body part on result objects follow the source's (possibly empty) values validly."""

import numpy as np
import pytest

from dicomnode.analysis import Study
from analyzers.phantoms import PhantomPatient, image_dataset
from dicomnode.uids import CR_IMAGE
from dicomnode.encoders import EncoderContext, encode_result
from sr_templates.loader import load_template_file
from tests.dicomtools import dciodvfy
from tests.encoders import results as R


@pytest.mark.parametrize("attrs", [
    {"Laterality": "", "BodyPartExamined": "WHOLEBODY"},  # real DXA exports: empty laterality
    {"BodyPartExamined": ""},                             # present but empty
    {},
    {"BodyPartExamined": "HAND", "Laterality": "L"},      # a paired part
], ids=["empty-laterality", "empty-body-part", "neither", "paired"])
def test_every_object_validates_whatever_the_source_says(attrs):
    rng = np.random.default_rng(0)
    ds = image_dataset((rng.random((R.ROWS, R.COLS)) * 4000).astype(np.uint16), patient=PhantomPatient.make(rng, "lat", 1),
                       modality="DX", sop_class_uid=CR_IMAGE, pixel_spacing=(0.5, 0.5), attributes=attrs)
    study = Study.from_datasets([ds])
    template = load_template_file(R.FIXTURE_DIR / "fixture_spine.yaml")
    for obj in encode_result(R.fixture_result(study), study, EncoderContext(), template):
        assert dciodvfy(obj).errors == [], obj.Modality
        if attrs.get("Laterality") and obj.Modality in ("OT", "PR"):
            assert obj.Laterality == attrs["Laterality"]
