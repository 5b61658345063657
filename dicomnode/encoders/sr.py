"""TID 1500 Imaging Measurement Report (Comprehensive 3D SR) for one analysis result.

Layout, chosen so that OHIF and other TID 1500 readers show it:

* one Planar ROI measurement group (TID 1410) per result group, on the group's
  main image region (first polygon/polyline, else first point), with the group's
  measurements and findings; every further region of the group is a further
  group, a point (a keypoint of the main outline) with the main region's
  tracking UID, for it is the same object, so OHIF draws that object once with
  its own few values; a further line or outline with a tracking UID of its own;
* finding sites sit on each measurement and finding, never on a group;
* findings of a group are its qualitative evaluations; their probability and
  uncertainty are NUM items under the finding (HAS PROPERTIES);
* measurements are TID 300 items with UCUM units; their uncertainty (one
  standard deviation) is a NUM "+/-, range of measurement uncertainty" under
  the value;
* study-level findings (``group=None``), review-required and the
  not-for-clinical-use notice are the report's root Qualitative Evaluations.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from sr_templates.loader import GENERIC_CODES, Template

from ..analysis import AnalysisResult, Finding, Measurement, Region, SourceRef, Study, UncertaintyClass
from .common import (
    EncoderContext,
    EncodingError,
    algorithm_version,
    check_frame,
    contributing_equipment,
    finish,
    is_multiframe,
    new_uid,
    series_description,
    series_number,
    source_dataset,
    stable_uid,
    unique,
)

_UNCERTAINTY_CODES = {
    UncertaintyClass.CERTAIN: GENERIC_CODES["certain"],
    UncertaintyClass.MODERATE: GENERIC_CODES["moderately_uncertain"],
    UncertaintyClass.HIGH: GENERIC_CODES["highly_uncertain"],
}
_REL = hd.sr.RelationshipTypeValues
# TID 1500 row 12's container concept; pydicom's code tables lack it (PS3.16 TID 1500, also used by dcmjs).
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


@dataclass
class _Group:
    name: str
    regions: list[Region] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)


def encode_sr(
    result: AnalysisResult,
    study: Study,
    ctx: EncoderContext,
    template: Template,
    heatmap_images: dict[str, pydicom.Dataset] | None = None,
) -> pydicom.Dataset:
    """Build the TID 1500 Comprehensive 3D SR of ``result``.

    Parameters
    ----------
    heatmap_images
        Secondary Capture heatmaps already built for this result, by heatmap
        key; a finding whose ``heatmap`` names one references it as its best
        illustration.

    Raises
    ------
    EncodingError
        When an item names a key the template lacks, a measurement group has no
        image region, or a region refers to an instance outside the study.
    """
    _check_keys(result, template)
    heatmap_images = heatmap_images or {}
    groups, root_findings, root_measurements = _group(result)
    evidence: dict[str, pydicom.Dataset] = {}

    def ref_dataset(ref: SourceRef, what: str) -> pydicom.Dataset:
        ds = source_dataset(study, ref, what)
        check_frame(ds, ref, what)
        evidence.setdefault(ref.sop_instance_uid, ds)
        return ds

    algorithm = hd.sr.AlgorithmIdentification(
        name=result.analyzer, version=algorithm_version(result), manufacturer=ctx.manufacturer
    )
    if root_measurements or not groups:
        # TID 1500 needs at least one group, and a measurement one with a region: the whole analysed image.
        whole = _whole_image_region(result, root_measurements, ref_dataset)
        groups["Analysed image"] = _Group("Analysed image", regions=[whole], measurements=root_measurements)
    measurement_groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    seen: dict[tuple[str, str, str], int] = {}
    for group in groups.values():
        if not group.regions:
            raise EncodingError(
                f"{result.analyzer}: measurement group {group.name!r} has no image region; every group needs one "
                "(a group without a SCOORD crashes OHIF's SR viewport), so the analyzer must add a Region with group="
                f"{group.name!r}"
            )
        main = _main_region(group.regions)
        tracking_uid = ""
        for region in [main] + [r for r in group.regions if r is not main]:
            is_main = region is main
            if is_main or region.kind != "point":
                # Tracking UIDs: stable across re-runs of the same analysis, distinct within one report.
                # A further point (a keypoint of the main outline) is the same tracked object, so it
                # shares the UID and OHIF draws the object once; a further line or outline is its own.
                key = (group.name, region.key, region.label)
                seen[key] = seen.get(key, 0) + 1
                tracking_uid = stable_uid(study.study_instance_uid, result.analyzer, *key, str(seen[key]))
            label = _region_label(region, template)
            identifier = label if label.startswith(group.name) else f"{group.name} {label}"
            # Sites go on each measurement and finding, not on the group: OHIF prints a group's
            # finding site as "363698007: <meaning>", a code value the reader cannot use.
            measurements = _group_measurements(group, template, ref_dataset) if is_main else []
            measurements += _region_measurements(region)
            evaluations = [_qualitative(f, template, ref_dataset, heatmap_images) for f in group.findings] if is_main else []
            evaluations += _region_evaluations(region)
            measurement_groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier[:64]),
                    referenced_region=_image_region(region, ref_dataset(region.source, f"region {region.key!r}")),
                    algorithm_id=algorithm,
                    measurements=measurements or None,
                    qualitative_evaluations=evaluations or None,
                )
            )
    for ref in result.sources:
        ref_dataset(ref, "the result's source list")

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ctx.device_uid,
            name=f"{ctx.model_name} {ctx.software_version}"[:64],
            manufacturer_name=ctx.manufacturer,
            model_name=ctx.model_name,
            serial_number=ctx.device_serial,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=template.procedure,
        imaging_measurements=measurement_groups,
        title=template.title,
    )
    root_items = _root_evaluations(result, template, root_findings, ref_dataset, heatmap_images)
    if root_items:
        container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=_REL.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence(root_items)
        report[0].ContentSequence.append(container)

    for ds in heatmap_images.values():
        evidence.setdefault(str(ds.SOPInstanceUID), ds)
    first = next(iter(evidence.values()))
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence.values()),
        content=report[0],
        series_instance_uid=new_uid(),
        series_number=series_number(ctx, result.analyzer, "SR", result.series_block),
        sop_instance_uid=new_uid(),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        is_complete=True,
        institution_name=ctx.institution or None,
        contributing_equipment=contributing_equipment(result, ctx),
    )
    return finish(sr, first, ctx, series_description(result.analyzer, "SR", template.series_description, result.series_labels))


# ---------------------------------------------------------------------------
# Grouping and checks
# ---------------------------------------------------------------------------


def _check_keys(result: AnalysisResult, template: Template) -> None:
    where = template.path or f"{result.analyzer}.yaml"
    for kind, items in (("findings", result.findings), ("measurements", result.measurements), ("regions", result.regions)):
        for item in items:
            if item.key not in getattr(template, kind):
                raise EncodingError(f"{result.analyzer}: {kind[:-1]} {item.key!r} is not in {kind} of {where}")
    for f in result.findings:
        if f.site is not None and f.site not in template.sites:
            raise EncodingError(f"{result.analyzer}: site {f.site!r} of finding {f.key!r} is not in sites of {where}")
        spec = template.findings[f.key]
        if f.value is not None and not spec.is_boolean and str(f.value) not in spec.values:
            raise EncodingError(f"{result.analyzer}: finding {f.key!r} has value {f.value!r}, not one of {sorted(spec.values)} in {where}")
        if f.value is not None and spec.is_boolean and not isinstance(f.value, (bool, np.bool_)):
            raise EncodingError(f"{result.analyzer}: finding {f.key!r} is boolean in {where} but has value {f.value!r}")
    for m in result.measurements:
        if m.site is not None and m.site not in template.sites:
            raise EncodingError(f"{result.analyzer}: site {m.site!r} of measurement {m.key!r} is not in sites of {where}")
        if m.unit != template.measurements[m.key].unit:
            raise EncodingError(
                f"{result.analyzer}: measurement {m.key!r} is in {m.unit!r} but {where} declares {template.measurements[m.key].unit!r}"
            )
        if not np.isfinite(m.value):
            raise EncodingError(f"{result.analyzer}: measurement {m.key!r} is not a finite number ({m.value})")


def _group(result: AnalysisResult) -> tuple["OrderedDict[str, _Group]", list[Finding], list[Measurement]]:
    groups: OrderedDict[str, _Group] = OrderedDict()
    root: list[Finding] = []
    root_measurements: list[Measurement] = []

    def get(name: str) -> _Group:
        return groups.setdefault(name, _Group(name))

    for r in result.regions:
        if r.group is None:
            # A region outside any group is its own group, named by its label.
            groups[f"\0{id(r)}"] = _Group(r.label or r.key, regions=[r])
        else:
            get(r.group).regions.append(r)
    for f in result.findings:
        if f.group is None:
            root.append(f)
        else:
            get(f.group).findings.append(f)
    for m in result.measurements:
        if m.group is None:
            root_measurements.append(m)
        else:
            get(m.group).measurements.append(m)
    return groups, root, root_measurements


def _main_region(regions: list[Region]) -> Region:
    for kind in ("polygon", "polyline"):
        for r in regions:
            if r.kind == kind:
                return r
    return regions[0]


def _region_label(region: Region, template: Template) -> str:
    return region.label or template.regions[region.key].label


# ---------------------------------------------------------------------------
# Content items
# ---------------------------------------------------------------------------


def _image_region(region: Region, ds: pydicom.Dataset) -> hd.sr.ImageRegion:
    points = np.asarray(region.points, dtype=np.float32)
    if region.kind == "point":
        graphic_type = hd.sr.GraphicTypeValues.POINT
        points = points[:1]
    else:
        graphic_type = hd.sr.GraphicTypeValues.POLYLINE
        if region.kind == "polygon" and not np.array_equal(points[0], points[-1]):
            points = np.vstack([points, points[:1]])  # a closed 2-D SCOORD polygon repeats its first point
    rows, cols = int(ds.Rows), int(ds.Columns)
    # A keypoint regressed a little past the edge is still a finding; far outside means the wrong image or units.
    mx, my = 0.1 * cols, 0.1 * rows
    if np.any(points[:, 0] < -mx) or np.any(points[:, 0] > cols + mx) or np.any(points[:, 1] < -my) or np.any(points[:, 1] > rows + my):
        raise EncodingError(
            f"region {region.key!r} ({region.label}) lies outside its {cols}x{rows} source image {ds.SOPInstanceUID}"
        )
    # SCOORD pixel coordinates cannot be negative: points just past the edge are moved onto it.
    points = np.column_stack([np.clip(points[:, 0], 0, cols), np.clip(points[:, 1], 0, rows)]).astype(np.float32)
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=ds.SOPClassUID,
        referenced_sop_instance_uid=ds.SOPInstanceUID,
        referenced_frame_numbers=[region.source.frame] if is_multiframe(ds) else None,
    )
    return hd.sr.ImageRegion(graphic_type=graphic_type, graphic_data=points, source_image=source)


def _finding_site(site: str, template: Template) -> hd.sr.FindingSite:
    spec = template.sites[site]
    return hd.sr.FindingSite(anatomic_location=spec.concept, laterality=spec.laterality)


def _finding_value(f: Finding, template: Template) -> CodedConcept:
    spec = template.findings[f.key]
    if f.value is None or not spec.evaluated:
        return GENERIC_CODES["not_evaluated"]
    if spec.is_boolean:
        code = codes.SCT.Present if f.value else codes.SCT.Absent
        return CodedConcept(code.value, code.scheme_designator, code.meaning)
    return spec.values[str(f.value)]


def _finding_children(f: Finding, template: Template, ref_dataset, heatmap_images) -> list[hd.sr.ContentItem]:
    children: list[hd.sr.ContentItem] = []
    evaluated = f.value is not None and template.findings[f.key].evaluated
    if evaluated and f.probability is not None and np.isfinite(f.probability):
        children.append(
            hd.sr.NumContentItem(
                name=codes.DCM.Probability, value=float(f.probability), unit=codes.UCUM.NoUnits, relationship_type=_REL.HAS_PROPERTIES
            )
        )
    if evaluated and f.uncertainty is not None and np.isfinite(f.uncertainty):
        children.append(
            hd.sr.NumContentItem(
                name=GENERIC_CODES["model_uncertainty"], value=float(f.uncertainty), unit=codes.UCUM.NoUnits,
                relationship_type=_REL.HAS_PROPERTIES,
            )
        )
    if f.source is not None:
        ds = ref_dataset(f.source, f"finding {f.key!r}")
        children.append(
            hd.sr.ImageContentItem(
                name=codes.DCM.SourceOfMeasurement,
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=[f.source.frame] if is_multiframe(ds) else None,
                relationship_type=_REL.INFERRED_FROM,
            )
        )
    if f.heatmap is not None and f.heatmap in heatmap_images:
        sc = heatmap_images[f.heatmap]
        children.append(
            hd.sr.ImageContentItem(
                name=codes.DCM.BestIllustrationOfFinding,
                referenced_sop_class_uid=sc.SOPClassUID,
                referenced_sop_instance_uid=sc.SOPInstanceUID,
                relationship_type=_REL.INFERRED_FROM,
            )
        )
    return children


def _qualitative(f: Finding, template: Template, ref_dataset, heatmap_images) -> hd.sr.QualitativeEvaluation:
    evaluation = hd.sr.QualitativeEvaluation(name=template.findings[f.key].concept, value=_finding_value(f, template))
    children = _finding_children(f, template, ref_dataset, heatmap_images)
    if f.site is not None:
        children.insert(0, _finding_site(f.site, template))
    if children:
        evaluation[0].ContentSequence = hd.sr.ContentSequence(children)
    return evaluation


def _measurement(m: Measurement, template: Template, ref_dataset) -> hd.sr.Measurement:
    spec = template.measurements[m.key]
    measurement = hd.sr.Measurement(
        name=spec.concept,
        value=float(m.value),
        unit=spec.unit_code,
        finding_sites=[_finding_site(m.site, template)] if m.site else None,
    )
    children: list[hd.sr.ContentItem] = []
    if m.uncertainty is not None and np.isfinite(m.uncertainty):
        children.append(
            hd.sr.NumContentItem(
                name=codes.SCT.RangeOfMeasurementUncertainty, value=float(m.uncertainty), unit=spec.unit_code,
                relationship_type=_REL.HAS_PROPERTIES,
            )
        )
    for flag in m.flags:
        children.append(hd.sr.TextContentItem(name=GENERIC_CODES["measurement_flag"], value=flag[:1024], relationship_type=_REL.HAS_PROPERTIES))
    if children:
        num = measurement[0]
        if "ContentSequence" not in num:
            num.ContentSequence = hd.sr.ContentSequence()
        num.ContentSequence.extend(children)
    return measurement


def _group_measurements(group: _Group, template: Template, ref_dataset) -> list[hd.sr.Measurement]:
    """The group's TID 300 measurements; one whose template names it ``property_of`` another in the
    group goes under that one (HAS PROPERTIES), so a viewer prints a level's few lines, not one per value."""
    built = {id(m): _measurement(m, template, ref_dataset) for m in group.measurements}
    by_key = {m.key: built[id(m)] for m in group.measurements}
    out = []
    for m in group.measurements:
        owner = by_key.get(template.measurements[m.key].property_of or "")
        if owner is None:
            out.append(built[id(m)])
            continue
        item = built[id(m)][0]
        item.RelationshipType = _REL.HAS_PROPERTIES.value
        num = owner[0]
        if "ContentSequence" not in num:
            num.ContentSequence = hd.sr.ContentSequence()
        num.ContentSequence.append(item)
    return out


def _position_uncertainty(region: Region, relationship: "hd.sr.RelationshipTypeValues") -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=GENERIC_CODES["position_uncertainty"], value=float(region.uncertainty), unit=codes.UCUM.Millimeter,
        relationship_type=relationship,
    )


def _has_uncertainty(region: Region) -> bool:
    return region.uncertainty is not None and bool(np.isfinite(region.uncertainty))


def _region_measurements(region: Region) -> list[hd.sr.Measurement]:
    """A region's position uncertainty as a group measurement, when no uncertainty class carries it."""
    if not _has_uncertainty(region) or region.uncertainty_class is not None:
        return []
    return [hd.sr.Measurement(name=GENERIC_CODES["position_uncertainty"], value=float(region.uncertainty), unit=codes.UCUM.Millimeter)]


def _region_evaluations(region: Region) -> list[hd.sr.QualitativeEvaluation]:
    """The uncertainty class, with the position uncertainty under it.

    Kept under the class rather than as a group measurement so that viewers,
    which label every drawn point with its group's measurements, show a
    keypoint by its vertebra instead of a stack of numbers.
    """
    if region.uncertainty_class is None:
        return []
    evaluation = hd.sr.QualitativeEvaluation(
        name=GENERIC_CODES["uncertainty_class"], value=_UNCERTAINTY_CODES[UncertaintyClass(region.uncertainty_class)]
    )
    if _has_uncertainty(region):
        evaluation[0].ContentSequence = hd.sr.ContentSequence([_position_uncertainty(region, _REL.HAS_PROPERTIES)])
    return [evaluation]


def _whole_image_region(result: AnalysisResult, measurements: list[Measurement], ref_dataset) -> Region:
    refs = unique([*(m.source for m in measurements if m.source), *result.sources, *(f.source for f in result.findings if f.source)])
    if not refs:
        raise EncodingError(f"{result.analyzer}: the result names no source image, so the SR cannot reference one")
    ds = ref_dataset(refs[0], "the analysed image")
    cols, rows = float(ds.Columns), float(ds.Rows)
    return Region("analysed_image", "polygon", [[0, 0], [cols, 0], [cols, rows], [0, rows]], refs[0], label="Analysed image")


def key_findings(result: AnalysisResult, template: Template) -> str:
    """The report's one-line summary: the template's key findings and measurements, every other
    finding judged present, and whether a person must review, e.g.
    ``Cobb angle T8: 14.3 deg; Scoliosis: present (p 0.97); Review required: C3 spinous process ...``."""
    parts: list[str] = []

    def finding_text(f: Finding) -> str | None:
        spec = template.findings[f.key]
        if f.value is None or not spec.evaluated:
            return None
        text = f"{spec.concept.meaning}: {_finding_value(f, template).meaning.lower()}"
        return text + (f" (p {f.probability:.2f})" if f.probability is not None and np.isfinite(f.probability) else "")

    for key in template.key_findings:
        for f in (f for f in result.findings if f.key == key):
            if (text := finding_text(f)) is not None:
                parts.append(text)
        for m in (m for m in result.measurements if m.key == key):
            unit = "" if m.unit == "1" else f" {m.unit}"
            parts.append(f"{template.measurements[key].concept.meaning}{' ' + m.site if m.site else ''}: {m.value:.{2 if m.unit == '1' else 1}f}{unit}")
    present = [f for f in result.findings if f.key not in template.key_findings and template.findings[f.key].is_boolean
               and template.findings[f.key].evaluated and f.value is not None and bool(f.value)]
    for f in sorted(present, key=lambda f: -(f.probability or 0.0)):
        parts.append(finding_text(f) or "")
    if result.review_required:
        reasons = result.review_reasons
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        parts.append(f"Review required: {reasons[0]}{more}" if reasons else "Review required")
    return "; ".join(p for p in parts if p) or "Nothing found by this model"


def _root_evaluations(result, template, root_findings, ref_dataset, heatmap_images) -> list[hd.sr.ContentItem]:
    # The summary comes first, so a reader of the report's text sees it before the detail.
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(name=codes.DCM.Summary, value=key_findings(result, template)[:1024], relationship_type=_REL.CONTAINS)
    ]
    reported = set()
    for f in root_findings:
        reported.add(f.key)
        item = hd.sr.CodeContentItem(name=template.findings[f.key].concept, value=_finding_value(f, template), relationship_type=_REL.CONTAINS)
        children = _finding_children(f, template, ref_dataset, heatmap_images)
        if f.site is not None:
            children.insert(0, _finding_site(f.site, template))
        if children:
            item.ContentSequence = hd.sr.ContentSequence(children)
        items.append(item)
    reported |= {f.key for f in result.findings}
    for key, spec in template.findings.items():
        if not spec.evaluated and key not in reported:
            items.append(hd.sr.CodeContentItem(name=spec.concept, value=GENERIC_CODES["not_evaluated"], relationship_type=_REL.CONTAINS))
    review = hd.sr.CodeContentItem(
        name=GENERIC_CODES["review_required"], value=codes.SCT.Yes if result.review_required else codes.SCT.No, relationship_type=_REL.CONTAINS
    )
    if result.review_reasons:
        review.ContentSequence = hd.sr.ContentSequence(
            [hd.sr.TextContentItem(name=GENERIC_CODES["review_reason"], value=r[:1024], relationship_type=_REL.HAS_PROPERTIES) for r in result.review_reasons]
        )
    items.append(review)
    if result.not_for_clinical_use:
        items.append(hd.sr.TextContentItem(name=GENERIC_CODES["not_for_clinical_use"], value=result.use_notice, relationship_type=_REL.CONTAINS))
    return items
