"""Encoders on the fixture analyzer's result over a synthetic CR image."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from dicomnode.analysis import Finding, Region, Segmentation, SourceRef, Study
from dicomnode.encoders import EncoderContext, EncodingError, encode_result, series_number
from dicomnode.encoders.sc import CAPTION
from sr_templates.loader import load_template
from tests.encoders.checks import SC_CLASS, SEG_CLASS, SR_CLASS, check_all
from tests.encoders.results import FIXTURE_DIR, cr_study, fixture_result


@pytest.fixture(scope="module")
def template():
    return load_template("fixture_spine", FIXTURE_DIR)


@pytest.fixture()
def study() -> Study:
    return cr_study()


def test_every_object_is_valid_and_reads_back(study, template, tmp_path):
    result = fixture_result(study)
    objects = encode_result(result, study, EncoderContext(), template)
    paths = check_all(objects, result, template, study, tmp_path)
    assert sorted(len(v) for v in paths.values()) == [1, 1, 1, 1]


def test_sr_text_names_device_and_notice(study, template, tmp_path):
    from tests.encoders.checks import assert_dsrdump_clean

    result = fixture_result(study)
    ctx = EncoderContext(manufacturer="Example Hospital IT", model_name="node-a", device_serial="SN42", institution="Example Hospital")
    sr = encode_result(result, study, ctx, template)[0]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    text = assert_dsrdump_clean(path)
    for expected in (
        'Device Observer Manufacturer")="Example Hospital IT"',
        'Device Observer Model Name")="node-a"',
        'Device Observer Serial Number")="SN42"',
        "Not evaluated by this model",
        'Procedure reported")=(DN-TST-PROC',
        "Best illustration of finding",
        "Tracking Unique Identifier",
    ):
        assert expected in text, expected
    assert sr.SeriesNumber == series_number(ctx, "fixture_spine", "SR")
    assert sr.InstitutionName == "Example Hospital"
    assert sr.SeriesDescription == "AI fixture_spine SR"


def test_series_numbers_differ_per_object_type_and_follow_the_base(study, template):
    result = fixture_result(study)
    objects = encode_result(result, study, EncoderContext(series_number_base=7000), template)
    numbers = {str(ds.SOPClassUID): int(ds.SeriesNumber) for ds in objects}
    assert len(set(numbers.values())) == len(objects) == 4
    assert all(7000 <= n < 8000 for n in numbers.values())
    assert numbers[SR_CLASS] != numbers[SEG_CLASS] != numbers[SC_CLASS]
    assert len({ds.SeriesInstanceUID for ds in objects}) == 4


def test_performed_procedure_step_is_referenced_when_known(template):
    study = cr_study(seed=3)
    src = study.series[0].instances[0].dataset
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    src.ReferencedPerformedProcedureStepSequence = [item]
    for ds in encode_result(fixture_result(study), study, EncoderContext(), template):
        assert ds.ReferencedPerformedProcedureStepSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5"


def test_group_without_region_is_refused(study, template):
    result = fixture_result(study)
    result.findings.append(Finding("fracture", True, probability=0.9, group="L4"))
    with pytest.raises(EncodingError, match="group 'L4' has no image region"):
        encode_result(result, study, EncoderContext(), template)


def test_unknown_key_and_wrong_unit_are_refused(study, template):
    result = fixture_result(study)
    result.findings.append(Finding("effusion", True))
    with pytest.raises(EncodingError, match="'effusion' is not in findings"):
        encode_result(result, study, EncoderContext(), template)
    result = fixture_result(study)
    result.measurements[0] = dataclasses.replace(result.measurements[0], unit="cm")
    with pytest.raises(EncodingError, match="declares 'mm'"):
        encode_result(result, study, EncoderContext(), template)


def test_region_outside_image_or_study_is_refused(study, template):
    result = fixture_result(study)
    src = result.sources[0]
    result.regions.append(Region("corner", "point", [[5000, 10]], src, group="L3"))
    with pytest.raises(EncodingError, match="outside"):
        encode_result(result, study, EncoderContext(), template)
    result = fixture_result(study)
    result.regions.append(Region("corner", "point", [[-3, 10]], src, group="L3", label="L3 just past the edge"))
    encode_result(result, study, EncoderContext(), template)
    result = fixture_result(study)
    result.regions.append(Region("corner", "point", [[5, 10]], SourceRef("1.2.3.999"), group="L3"))
    with pytest.raises(EncodingError, match="not in study"):
        encode_result(result, study, EncoderContext(), template)


def test_result_with_only_study_level_findings_gets_an_image_group(study, template, tmp_path):
    result = fixture_result(study)
    result.regions, result.measurements, result.segmentations = [], [], []
    result.findings = [f for f in result.findings if f.group is None]
    objects = encode_result(result, study, EncoderContext(), template)
    assert [str(ds.SOPClassUID) for ds in objects] == [SR_CLASS, SC_CLASS]
    paths = check_all(objects, result, template, study, tmp_path)
    import highdicom as hd

    groups = hd.sr.srread(paths[SR_CLASS][0]).content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Analysed image"]


def test_clinical_weights_drop_the_notice_and_fractional_seg_reads_back(study, template, tmp_path):
    result = fixture_result(study)
    result.models = [dataclasses.replace(m, phantom_trained=False) for m in result.models]
    masks = np.zeros((1, study.series[0].instances[0].dataset.Rows, study.series[0].instances[0].dataset.Columns, 1), np.float32)
    masks[0, 50:90, 40:80, 0] = np.linspace(0.2, 1.0, 40)[None, :]
    result.segmentations = [Segmentation(["spine"], masks, result.sources[:1], fractional=True)]
    result.review_required, result.review_reasons = False, []
    objects = encode_result(result, study, EncoderContext(), template)
    check_all(objects, result, template, study, tmp_path)
    sc = next(ds for ds in objects if str(ds.SOPClassUID) == SC_CLASS)
    assert "not for clinical use" not in sc.ImageComments and CAPTION in sc.ImageComments


def test_hard_masks_whose_frames_would_start_mid_byte_are_written_one_byte_per_pixel(template, tmp_path):
    # 251 x 203 pixels: 1-bit frames would not start on a byte, which DICOMweb servers and OHIF misread.
    study = cr_study(shape=(251, 203))
    result = fixture_result(study)
    objects = encode_result(result, study, EncoderContext(), template)
    check_all(objects, result, template, study, tmp_path)
    seg = next(ds for ds in objects if str(ds.SOPClassUID) == SEG_CLASS)
    assert (seg.SegmentationType, seg.SegmentationFractionalType, seg.BitsAllocated) == ("FRACTIONAL", "OCCUPANCY", 8)
    assert set(np.unique(seg.pixel_array)) == {0, int(seg.MaximumFractionalValue)}
    aligned = next(ds for ds in encode_result(fixture_result(cr_study()), cr_study(), EncoderContext(), template)
                   if str(ds.SOPClassUID) == SEG_CLASS)
    assert (aligned.SegmentationType, aligned.BitsAllocated) == ("BINARY", 1)


def test_heatmap_shape_mismatch_is_refused(study, template):
    result = fixture_result(study)
    result.heatmaps[0].data = result.heatmaps[0].data[:10]
    with pytest.raises(EncodingError, match="must match the source frame"):
        encode_result(result, study, EncoderContext(), template)


def test_device_uid_is_stable_and_depends_on_identity():
    a, b = EncoderContext(), EncoderContext()
    assert a.device_uid == b.device_uid and a.device_uid.startswith("1.2.826.0.1.3680043.10.1137.")
    assert EncoderContext(device_serial="2").device_uid != a.device_uid
    assert EncoderContext(device_uid="1.2.3").device_uid == "1.2.3"


def test_ct_series_seg_omits_empty_frames_and_references_each_slice(template, tmp_path):
    from tests.encoders.results import ct_result, ct_study

    study = ct_study()
    result = ct_result(study)
    objects = encode_result(result, study, EncoderContext(), template)
    paths = check_all(objects, result, template, study, tmp_path)
    seg = pydicom.dcmread(paths[SEG_CLASS][0])
    assert int(seg.NumberOfFrames) == 2
    referenced = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced == {result.segmentations[0].sources[k].sop_instance_uid for k in (2, 3)}
    assert seg.FrameOfReferenceUID == study.series[0].instances[0].dataset.FrameOfReferenceUID


def test_gsps_layers_carry_class_colours_and_keep_the_image_readable(template):
    study = cr_study(seed=5)
    src = study.series[0].instances[0].dataset
    src.PhotometricInterpretation = "MONOCHROME1"
    objects = encode_result(fixture_result(study), study, EncoderContext(), template)
    pr = next(ds for ds in objects if ds.Modality == "PR")
    colours = {layer.GraphicLayer: tuple(layer.GraphicLayerRecommendedDisplayCIELabValue) for layer in pr.GraphicLayerSequence}
    assert {"AI_CERTAIN", "AI_HIGH", "AI_REGIONS"} <= set(colours)
    assert len(set(colours.values())) == len(colours)
    assert pr.PresentationLUTShape == "INVERSE"
    voi = pr.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowWidth) > 1 and voi.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_one_tracking_uid_per_tracked_object_stable_across_runs(study, template):
    import highdicom as hd

    result = fixture_result(study)
    result.regions.append(dataclasses.replace(result.regions[1]))  # the same keypoint twice
    runs = []
    for _ in range(2):
        sr = encode_result(result, study, EncoderContext(), template)[0]
        groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()
        runs.append([(g.tracking_identifier, g.tracking_uid) for g in groups])
    assert len(runs[0]) == 5 and runs[0] == runs[1]
    # The L3 outline and its keypoints are one tracked vertebra; the curve is another object.
    by_object = {ident.split()[0]: {uid for i, uid in runs[0] if i.split()[0] == ident.split()[0]} for ident, _ in runs[0]}
    assert sorted(by_object) == ["L3", "curve"] and all(len(u) == 1 for u in by_object.values())
    assert by_object["L3"] != by_object["curve"]
    # A second outline in a group is an object of its own.
    result.regions.append(dataclasses.replace(result.regions[0], label="L3 second outline"))
    sr = encode_result(result, study, EncoderContext(), template)[0]
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()
    assert len({g.tracking_uid for g in groups}) == 3


def test_summary_names_key_findings_then_findings_present_then_review(study, template):
    from dicomnode.encoders.sr import key_findings

    result = fixture_result(study)
    assert key_findings(result, template) == (
        "Cardiomegaly: present (p 0.83); Review required: L3 posterior-inferior corner is highly uncertain"
    )
    keyed = dataclasses.replace(template, key_findings=["cobb", "curves"])
    result.review_required, result.review_reasons = False, []
    assert key_findings(result, keyed) == (
        "Cobb angle: 12.5 deg; Number of scoliotic curves: more than one curve (p 0.61); Cardiomegaly: present (p 0.83)"
    )
    result.findings = [f for f in result.findings if f.key != "cardiomegaly"]
    result.measurements = []
    assert key_findings(result, template) == "Nothing found by this model"


def test_no_group_carries_a_finding_site_and_each_measurement_keeps_its_own(study, template):
    import highdicom as hd

    result = fixture_result(study)
    sr = hd.sr.Comprehensive3DSR.from_dataset(encode_result(result, study, EncoderContext(), template)[0])
    groups = sr.content.get_planar_roi_measurement_groups()
    for g in groups:
        top = [x.ConceptNameCodeSequence[0].CodeValue for x in g[0].ContentSequence]
        assert codes.SCT.FindingSite.value not in top, g.tracking_identifier
    (height,) = [m for g in groups for m in g.get_measurements() if m.name.meaning == template.measurements["height"].concept.meaning]
    assert [s.value.meaning for s in height.finding_sites] == [template.sites["L3"].concept.meaning]


def test_empty_segmentation_writes_no_seg_and_bad_geometry_is_a_clear_error(study, template):
    result = fixture_result(study)
    result.segmentations[0].masks[:] = False
    objects = encode_result(result, study, EncoderContext(), template)
    assert SEG_CLASS not in {str(ds.SOPClassUID) for ds in objects}
    result = fixture_result(study)
    result.segmentations[0].masks = result.segmentations[0].masks[:, :10]
    with pytest.raises(EncodingError, match="masks are 200x10 but source"):
        encode_result(result, study, EncoderContext(), template)


MALFORMED = {"PatientBirthDate": "1901020399", "PatientName": ["Zyxwv^Qwerty", "Plokij^Mnbvc"], "StudyDate": "2024",
             "StudyTime": "256199", "PatientSex": "Q", "PatientAge": "12 years",
             "ReferringPhysicianName": "A" * 70}


def test_malformed_source_header_values_are_made_valid_in_every_result(template, tmp_path):
    """A source's bad header values never stop its results: each object copies a valid value or none."""
    study = cr_study()
    for series in study.series:
        for inst in series.instances:
            for kw, value in MALFORMED.items():
                setattr(inst.dataset, kw, value)
            # a value pydicom cannot even convert, as it arrives from a file
            inst.dataset[0x00101030] = RawDataElement(Tag(0x00101030), "DS", 5, b"heavy", 0, True, True)
    result = fixture_result(study)
    objects = encode_result(result, study, EncoderContext(), template)
    check_all(objects, result, template, study, tmp_path)
    for ds in objects:
        assert str(ds.PatientName) == "Zyxwv^Qwerty"  # one name where one is expected: the first
        for kw in ("PatientBirthDate", "StudyDate", "StudyTime", "PatientSex", "ReferringPhysicianName"):
            assert kw in ds and not ds[kw].value, kw  # Type 2: present, empty
        assert "PatientAge" not in ds and "PatientWeight" not in ds
