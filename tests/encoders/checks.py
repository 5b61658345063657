"""Read encoded objects back (highdicom, pydicom) and check every result item survived."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes

from dicomnode import imaging
from dicomnode.analysis import AnalysisResult, Region, Study
from dicomnode.encoders.sr import QUALITATIVE_EVALUATIONS
from sr_templates.loader import GENERIC_CODES, Template
from tests.dicomtools import dciodvfy, dcmpschk, dsrdump

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


def save_all(objects: list[pydicom.Dataset], folder: Path) -> dict[str, list[Path]]:
    """Write the objects, grouped by SOP class UID."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[Path]] = {}
    for i, ds in enumerate(objects):
        path = folder / f"{i:02d}_{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.setdefault(str(ds.SOPClassUID), []).append(path)
    return paths


def assert_valid(path: Path) -> None:
    report = dciodvfy(path)
    assert not report.errors, f"dciodvfy errors in {path.name}:\n" + "\n".join(report.errors)


def assert_dsrdump_clean(path: Path) -> str:
    report = dsrdump(path)
    assert not report.errors and not report.warnings, f"dsrdump on {path.name}:\n" + "\n".join(report.errors + report.warnings)
    return report.output


def _same(a, b) -> bool:
    return a.value == b.value and a.scheme_designator == b.scheme_designator


def _study_attributes_match(ds: pydicom.Dataset, study: Study) -> None:
    source = study.series[0].instances[0].dataset
    for kw in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate"):
        assert str(ds.get(kw, "")) == str(source.get(kw, "")), f"{kw} differs from the source"
    assert ds.SeriesInstanceUID not in {s.series_instance_uid for s in study.series}
    assert ds.SeriesDescription.startswith("AI ")
    assert ds.InstanceCreationDate and ds.InstanceCreationTime


def _equipment_match(ds: pydicom.Dataset, result: AnalysisResult) -> None:
    # highdicom adds the source's acquisition equipment and itself; ours name the algorithm.
    items = [x for x in ds.ContributingEquipmentSequence if str(x.get("ContributionDescription", "")).startswith("Processing Algorithm")]
    assert len(items) == max(1, len(result.models))
    for item, model in zip(items, result.models):
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.ProcessingEquipment.value
        assert model.version in list(item.SoftwareVersions)
        assert result.analyzer in item.ManufacturerModelName
        assert item.DeviceUID


def check_sr(path: Path, result: AnalysisResult, template: Template, study: Study) -> None:
    sr = hd.sr.srread(path)
    _study_attributes_match(sr, study)
    _equipment_match(sr, result)
    report = sr.content
    groups = report.get_planar_roi_measurement_groups()
    assert groups, "the SR has no measurement group"
    for g in groups:
        assert g.roi is not None, f"group {g.tracking_identifier} has no image region"
        assert g.tracking_uid and g.tracking_identifier
        names = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in g[0].ContentSequence if item.ValueType == "TEXT"}
        assert names.get("Algorithm Name") == result.analyzer
        assert result.analyzer_version in names.get("Algorithm Version", "")

    def group_of(name: str | None):
        found = [g for g in groups if name is not None and g.tracking_identifier.startswith(name)]
        assert found, f"no measurement group for {name!r}"
        return found[0]

    for m in result.measurements:
        spec = template.measurements[m.key]
        candidates = [group_of(m.group)] if m.group is not None else groups
        items = [x[0] for g in candidates for x in g.get_measurements(name=spec.concept)]
        if spec.property_of:
            # Under its owner measurement (HAS PROPERTIES) when the owner is in the same group.
            owner = template.measurements[spec.property_of].concept
            nested = [c for g in candidates for x in g.get_measurements(name=owner) for c in x[0].ContentSequence
                      if c.ValueType == "NUM" and _same(c.ConceptNameCodeSequence[0], spec.concept)]
            owner_here = any(o.group == m.group and o.key == spec.property_of for o in result.measurements)
            assert not (owner_here and items), f"measurement {m.key} should be under {spec.property_of}, not beside it"
            items += nested
        value = lambda item: float(item.MeasuredValueSequence[0].NumericValue)  # noqa: E731
        match = [x for x in items if abs(value(x) - m.value) < 1e-3 * max(1.0, abs(m.value))]
        assert match, f"measurement {m.key}={m.value} not in the SR"
        assert match[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == m.unit
        if m.uncertainty is not None:
            children = match[0].ContentSequence
            sd = [c for c in children if c.ConceptNameCodeSequence[0].CodeValue == codes.SCT.RangeOfMeasurementUncertainty.value]
            assert sd and abs(float(sd[0].MeasuredValueSequence[0].NumericValue) - m.uncertainty) < 1e-3
    root_items = find_content_items(report[0], name=QUALITATIVE_EVALUATIONS)
    assert root_items, "the SR has no root Qualitative Evaluations"
    root = list(root_items[0].ContentSequence)
    summary = root[0]
    assert summary.ValueType == "TEXT" and summary.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Summary.value
    assert summary.TextValue.strip(), "the report's summary is empty"
    for f in result.findings:
        spec = template.findings[f.key]
        if f.group is None:
            items = [hd.sr.CodeContentItem.from_dataset(x) for x in root if x.ValueType == "CODE" and _same(x.ConceptNameCodeSequence[0], spec.concept)]
        else:
            group = group_of(f.group)
            assert group.get_qualitative_evaluations(name=spec.concept), f"finding {f.key} not in group {f.group}"
            # highdicom's QualitativeEvaluation keeps only name and value; the probability is a child item.
            items = [x for x in group[0].ContentSequence if x.ValueType == "CODE" and _same(x.ConceptNameCodeSequence[0], spec.concept)]
            items = [hd.sr.CodeContentItem.from_dataset(x) for x in items]
        assert items, f"finding {f.key} not in the SR"
        value = items[0].value
        if f.value is None or not spec.evaluated:
            assert _same(value, GENERIC_CODES["not_evaluated"])
            continue
        if spec.is_boolean:
            assert _same(value, codes.SCT.Present if f.value else codes.SCT.Absent)
        else:
            assert _same(value, spec.values[str(f.value)])
        if f.probability is not None:
            probs = [c for c in items[0].ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Probability.value]
            assert probs and abs(float(probs[0].MeasuredValueSequence[0].NumericValue) - f.probability) < 1e-4
    for r in result.regions:
        found = [g for g in groups if _region_matches(r, g.roi.value, g.roi.ContentSequence[0].ReferencedSOPSequence[0])]
        assert found, f"region {r.key} ({r.label}) not in the SR"
        if r.uncertainty is not None:
            sigmas = [
                float(x.MeasuredValueSequence[0].NumericValue)
                for g in found for x in _walk(g[0])
                if x.get("ValueType") == "NUM" and x.ConceptNameCodeSequence[0].CodeValue == GENERIC_CODES["position_uncertainty"].value
            ]
            assert any(abs(v - r.uncertainty) < 1e-4 for v in sigmas), f"uncertainty of region {r.label} not in the SR"
        if r.uncertainty_class is not None:
            classes = [x.ConceptCodeSequence[0].CodeMeaning for g in found for x in _walk(g[0]) if x.get("ValueType") == "CODE"]
            assert any(c.lower().replace(" ", "_") == str(r.uncertainty_class.value) for c in classes)
    review = [x for x in root if x.ValueType == "CODE" and x.ConceptNameCodeSequence[0].CodeValue == GENERIC_CODES["review_required"].value]
    assert review and review[0].ConceptCodeSequence[0].CodeValue == (codes.SCT.Yes if result.review_required else codes.SCT.No).value
    notice = [x for x in root if x.ValueType == "TEXT" and x.ConceptNameCodeSequence[0].CodeValue == GENERIC_CODES["not_for_clinical_use"].value]
    assert bool(notice) == result.not_for_clinical_use


def _walk(item: pydicom.Dataset):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def _region_matches(r: Region, points: np.ndarray, ref: pydicom.Dataset) -> bool:
    return ref.ReferencedSOPInstanceUID == r.source.sop_instance_uid and _points_match(r, points)


def _points_match(r: Region, points: np.ndarray) -> bool:
    """Same points; a polygon may come back closed (first point repeated)."""
    want = np.asarray(r.points, dtype=np.float32)
    got = np.asarray(points, dtype=np.float32)
    if r.kind == "polygon" and len(got) == len(want) + 1:
        got = got[:-1]
    return got.shape == want.shape and np.allclose(got, want, atol=1e-3)


def check_seg(paths: list[Path], result: AnalysisResult, template: Template, study: Study) -> None:
    written = [s for s in result.segmentations if np.any(s.masks)]
    assert len(paths) == len(written), "one SEG per segmentation that has any mask pixel"
    for path, seg_in in zip(paths, written):
        seg = hd.seg.segread(path)
        _study_attributes_match(seg, study)
        _equipment_match(seg, result)
        labels = [d.SegmentLabel for d in seg.SegmentSequence]
        assert labels == [template.segments[k].label for k in seg_in.segments]
        for d, key in zip(seg.SegmentSequence, seg_in.segments):
            spec = template.segments[key]
            assert _same(d.SegmentedPropertyTypeCodeSequence[0], spec.type)
            assert _same(d.SegmentedPropertyCategoryCodeSequence[0], spec.category)
            assert d.SegmentAlgorithmType == "AUTOMATIC"
            algo = d.SegmentationAlgorithmIdentificationSequence[0]
            assert algo.AlgorithmName == result.analyzer
            assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        hard_as_bytes = not seg_in.fractional and int(seg.Rows) * int(seg.Columns) % 8 != 0
        assert seg.SegmentationType == ("FRACTIONAL" if seg_in.fractional or hard_as_bytes else "BINARY")
        if seg.SegmentationType == "FRACTIONAL":
            assert seg.SegmentationFractionalType == ("OCCUPANCY" if hard_as_bytes else "PROBABILITY")
        expected_frames = sum(1 for i in range(seg_in.masks.shape[0]) for j in range(seg_in.masks.shape[3]) if np.any(seg_in.masks[i, ..., j]))
        assert int(seg.NumberOfFrames) == expected_frames, "empty frames must be omitted, every non-empty one kept"
        for i, ref in enumerate(seg_in.sources):
            src = study.instance(ref.sop_instance_uid).dataset
            if int(src.get("NumberOfFrames", 1) or 1) > 1:
                pixels = seg.get_pixels_by_source_frame(
                    source_sop_instance_uid=ref.sop_instance_uid, source_frame_numbers=[ref.frame], assert_missing_frames_are_empty=True, ignore_spatial_locations=True
                )[0]
            else:
                pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ref.sop_instance_uid], assert_missing_frames_are_empty=True, ignore_spatial_locations=True)[0]
            want = seg_in.masks[i]
            if seg_in.fractional:
                assert np.allclose(pixels.astype(np.float32), np.clip(want, 0, 1), atol=1.0 / 255 + 1e-6)
            else:
                assert np.array_equal(pixels.astype(bool), want.astype(bool))


def check_sc(paths: list[Path], result: AnalysisResult, template: Template, study: Study) -> None:
    assert len(paths) == len(result.heatmaps)
    for path, heatmap in zip(paths, result.heatmaps):
        sc = pydicom.dcmread(path)
        _study_attributes_match(sc, study)
        _equipment_match(sc, result)
        src = study.instance(heatmap.source.sop_instance_uid).dataset
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
        assert sc.BurnedInAnnotation == "YES"
        assert "AI evidence \u2014 not a diagnosis" in sc.ImageComments
        factor = int(sc.Columns) // int(src.Columns)
        assert factor >= 1 and sc.Columns == factor * src.Columns and sc.Rows > factor * src.Rows
        spacing = imaging.pixel_spacing(src)
        if spacing is not None:
            assert np.allclose([float(x) * factor for x in sc.PixelSpacing], spacing, rtol=1e-5)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        rgb = sc.pixel_array[: factor * int(src.Rows) : factor, ::factor].astype(np.int16)
        hot = heatmap.data > 0.5
        if hot.any():
            colour = np.abs(rgb[..., 0] - rgb[..., 2])
            assert colour[hot].mean() > colour[heatmap.data < 0.05].mean() + 20, "the heatmap is not visible as colour"


def check_gsps(paths: list[Path], result: AnalysisResult, template: Template, study: Study) -> None:
    assert paths, "no presentation state for the regions"
    drawn = []
    for path in paths:
        report = dcmpschk(path)
        assert not report.errors, f"dcmpschk on {path.name}:\n" + "\n".join(report.errors)
        pr = pydicom.dcmread(path)
        _study_attributes_match(pr, study)
        _equipment_match(pr, result)
        for ann in pr.GraphicAnnotationSequence:
            uid = ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID
            for g in ann.GraphicObjectSequence:
                drawn.append((uid, ann.GraphicLayer, np.asarray(g.GraphicData, dtype=np.float32).reshape(-1, 2)))
            assert len(ann.TextObjectSequence) == len(ann.GraphicObjectSequence)
    from dicomnode.encoders.gsps import layer_for

    for r in result.regions:
        want = np.asarray(r.points, np.float32)
        ok = [
            d for d in drawn
            if d[0] == r.source.sop_instance_uid and d[1] == layer_for(r)
            and _points_match(r, d[2])
        ]
        assert ok, f"region {r.key} ({r.label}) not drawn in layer {layer_for(r)}"


def check_all(objects: list[pydicom.Dataset], result: AnalysisResult, template: Template, study: Study, folder: Path) -> dict[str, list[Path]]:
    """dciodvfy every object, dsrdump the SR, and read every kind back."""
    paths = save_all(objects, folder)
    for group in paths.values():
        for path in group:
            assert_valid(path)
    assert len(paths[SR_CLASS]) == 1
    assert_dsrdump_clean(paths[SR_CLASS][0])
    check_sr(paths[SR_CLASS][0], result, template, study)
    if result.segmentations:
        check_seg(paths.get(SEG_CLASS, []), result, template, study)
    if result.heatmaps:
        check_sc(paths.get(SC_CLASS, []), result, template, study)
    if result.regions:
        check_gsps(paths.get(GSPS_CLASS, []), result, template, study)
    return paths
