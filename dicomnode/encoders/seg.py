"""DICOM Segmentation objects (binary or fractional) from an analysis result's masks."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import structlog
from pydicom.sr.codedict import codes

from sr_templates.loader import Template

from .. import imaging
from ..analysis import AnalysisResult, Segmentation, Study
from .common import (
    EncoderContext,
    EncodingError,
    algorithm_version,
    contributing_equipment,
    finish,
    is_multiframe,
    new_uid,
    series_description,
    series_number,
    source_dataset,
)

log = structlog.get_logger("dicomnode.encoders.seg")

# Distinct display colours (RGB) for segments, in order.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40),
]


def encode_segmentations(result: AnalysisResult, study: Study, ctx: EncoderContext, template: Template) -> list[pydicom.Dataset]:
    """One SEG instance per :class:`Segmentation` of the result, all in one new series.

    Raises
    ------
    EncodingError
        When a segment key is not in the template, or the masks do not line up
        with their source frames.
    """
    if not result.segmentations:
        return []
    series_uid = new_uid()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.analyzer,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version(result)[:64],
    )
    out = []
    for seg in result.segmentations:
        if not np.any(seg.masks):
            # Nothing was segmented: a SEG needs at least one frame, and an empty one would show nothing.
            log.info("seg_skipped_empty", analyzer=result.analyzer, segments=len(seg.segments))
            continue
        out.append(_encode_one(result, study, ctx, template, seg, algorithm, series_uid, len(out) + 1))
    return out


def _encode_one(result, study, ctx, template, seg: Segmentation, algorithm, series_uid: str, number: int) -> pydicom.Dataset:
    where = template.path or f"{result.analyzer}.yaml"
    for key in seg.segments:
        if key not in template.segments:
            raise EncodingError(f"{result.analyzer}: segment {key!r} is not in segments of {where}")
    sources, masks = _align(result, study, seg)
    descriptions = []
    for index, key in enumerate(seg.segments, start=1):
        spec = template.segments[key]
        description = hd.seg.SegmentDescription(
            segment_number=index,
            segment_label=spec.label[:64],
            segmented_property_category=spec.category,
            segmented_property_type=spec.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=new_uid(),
            tracking_id=f"{result.analyzer} {spec.label}"[:64],
            display_color=hd.color.CIELabColor.from_rgb(*_PALETTE[(index - 1) % len(_PALETTE)]),
        )
        if spec.laterality is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [spec.laterality]
        descriptions.append(description)
    fractional_type = hd.seg.SegmentationFractionalTypeValues.PROBABILITY
    if seg.fractional:
        pixels = np.clip(np.nan_to_num(masks.astype(np.float32)), 0.0, 1.0)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    elif not byte_aligned_frames(sources[0]):
        # 1-bit frames are packed back to back, so here each one starts mid-byte; Orthanc's DICOMweb
        # cannot cut such frames out and OHIF's reader misplaces them. One byte per pixel (occupancy 0 or 1) reads right everywhere.
        pixels = masks.astype(np.float32)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
        fractional_type = hd.seg.SegmentationFractionalTypeValues.OCCUPANCY
    else:
        pixels = masks.astype(bool)
        seg_type = hd.seg.SegmentationTypeValues.BINARY
    description = series_description(result.analyzer, "SEG", template.series_description, result.series_labels)
    try:
        obj = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=seg_type,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=series_number(ctx, result.analyzer, "SEG", result.series_block),
            sop_instance_uid=new_uid(),
            instance_number=number,
            manufacturer=ctx.manufacturer,
            manufacturer_model_name=ctx.model_name,
            software_versions=ctx.software_version,
            device_serial_number=ctx.device_serial,
            fractional_type=fractional_type,
            content_description=f"{result.analyzer} {result.analyzer_version} segmentation"[:64],
            content_label="AI_SEG",
            content_creator_name=None,
            omit_empty_frames=True,
            contributing_equipment=contributing_equipment(result, ctx),
        )
    except ValueError as exc:
        # highdicom refuses what a SEG cannot express (e.g. a multi-frame source without patient geometry).
        raise EncodingError(
            f"{result.analyzer}: segmentation {number} ({', '.join(seg.segments)}) cannot be written as a DICOM SEG "
            f"over source {sources[0].SOPInstanceUID}: highdicom raised {type(exc).__name__}"
        ) from exc
    _complete_pixel_measures(obj, sources[0])
    if "FrameOfReferenceUID" not in sources[0] and "ImageOrientationPatient" not in sources[0]:
        _add_image_plane_orientation(obj)
    return finish(obj, sources[0], ctx, description)


def byte_aligned_frames(source: pydicom.Dataset) -> bool:
    """Whether 1-bit frames of the source's size each start on a byte (Rows x Columns a multiple of 8)."""
    return int(source.Rows) * int(source.Columns) % 8 == 0


def _complete_pixel_measures(obj: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Make the shared Pixel Measures complete for projection images.

    highdicom writes Pixel Spacing alone (or nothing, when the source has no
    spacing) for such sources but cannot read that back, and OHIF refuses a SEG
    without the shared Pixel Measures item. A projection has no thickness and an
    uncalibrated image no spacing: both then get the nominal value 1 (pixel
    units); viewers measure on the source image, not on the SEG.
    """
    shared = obj.SharedFunctionalGroupsSequence[0]
    if not shared.get("PixelMeasuresSequence"):
        shared.PixelMeasuresSequence = [pydicom.Dataset()]
    measures = shared.PixelMeasuresSequence[0]
    if "PixelSpacing" not in measures or not all(float(v) > 0 for v in measures.PixelSpacing):
        # Anonymised files carry zero spacing, which highdicom copies and dciodvfy refuses.
        spacing = imaging.pixel_spacing(source)
        measures.PixelSpacing = list(spacing) if spacing else [1.0, 1.0]
    if "SliceThickness" not in measures:
        measures.SliceThickness = source.get("SliceThickness") or 1.0


def _add_image_plane_orientation(obj: pydicom.Dataset) -> None:
    """State that the frames lie in the source's image plane (rows along x, columns along y).

    A projection image has no patient geometry; OHIF's SEG loader compares the
    SEG's orientation with the source's (which it takes as this default) and
    refuses to load a SEG without one.
    """
    shared = obj.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared:
        item = pydicom.Dataset()
        item.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        shared.PlaneOrientationSequence = [item]


def _align(result: AnalysisResult, study: Study, seg: Segmentation) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Source datasets and masks in the frame order highdicom expects."""
    uids = list(dict.fromkeys(s.sop_instance_uid for s in seg.sources))
    datasets = [source_dataset(study, s, f"segmentation of {','.join(seg.segments)}") for s in seg.sources[:1]]
    if len(uids) == 1 and is_multiframe(datasets[0]):
        ds = datasets[0]
        n = int(ds.NumberOfFrames)
        full = np.zeros((n, *seg.masks.shape[1:]), dtype=seg.masks.dtype)
        for i, ref in enumerate(seg.sources):
            if not 1 <= ref.frame <= n:
                raise EncodingError(f"segmentation frame {i} refers to frame {ref.frame} of a {n}-frame source")
            full[ref.frame - 1] = seg.masks[i]
        _check_shape(ds, full)
        return [ds], full
    if len(uids) != len(seg.sources):
        raise EncodingError("segmentation refers to the same single-frame source image twice; give one mask frame per source image")
    datasets = [source_dataset(study, s, "segmentation") for s in seg.sources]
    for ds in datasets:
        _check_shape(ds, seg.masks)
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) > 1:
        raise EncodingError("segmentation masks span several series; a SEG must refer to frames of one series")
    return datasets, seg.masks


def _check_shape(ds: pydicom.Dataset, masks: np.ndarray) -> None:
    if masks.shape[1:3] != (int(ds.Rows), int(ds.Columns)):
        raise EncodingError(
            f"segmentation masks are {masks.shape[2]}x{masks.shape[1]} but source {ds.SOPInstanceUID} is {ds.Columns}x{ds.Rows}"
        )
