"""Grayscale Softcopy Presentation State showing the result's regions over the source images.

Keypoints and outlines appear as overlays in any viewer that supports
presentation states. Each uncertainty class has its own graphic layer and
colour, so a reader can hide or pick out the uncertain points.
"""

from __future__ import annotations

from collections import OrderedDict

import highdicom as hd
import numpy as np
import pydicom

from sr_templates.loader import Template

from .. import imaging
from ..analysis import AnalysisResult, Region, Study, UncertaintyClass
from .common import (
    EncoderContext,
    check_frame,
    contributing_equipment,
    finish,
    is_multiframe,
    new_uid,
    series_description,
    series_number,
    source_dataset,
)

# layer name -> (description, RGB); the order is the drawing order.
LAYERS: "OrderedDict[str, tuple[str, tuple[int, int, int]]]" = OrderedDict(
    [
        ("AI_REGIONS", ("AI regions without an uncertainty class", (0, 200, 255))),
        ("AI_CERTAIN", ("AI regions: certain", (0, 220, 0))),
        ("AI_MODERATE", ("AI regions: moderately uncertain", (255, 190, 0))),
        ("AI_HIGH", ("AI regions: highly uncertain", (255, 0, 0))),
    ]
)
_LAYER_OF = {
    None: "AI_REGIONS",
    UncertaintyClass.CERTAIN: "AI_CERTAIN",
    UncertaintyClass.MODERATE: "AI_MODERATE",
    UncertaintyClass.HIGH: "AI_HIGH",
}


def layer_for(region: Region) -> str:
    cls = UncertaintyClass(region.uncertainty_class) if region.uncertainty_class is not None else None
    return _LAYER_OF[cls]


def encode_gsps(result: AnalysisResult, study: Study, ctx: EncoderContext, template: Template) -> list[pydicom.Dataset]:
    """One GSPS per source series that carries regions (a GSPS presents images of one series here)."""
    if not result.regions:
        return []
    by_series: "OrderedDict[str, list[Region]]" = OrderedDict()
    datasets: dict[str, pydicom.Dataset] = {}
    for region in result.regions:
        ds = source_dataset(study, region.source, f"region {region.key!r}")
        check_frame(ds, region.source, f"region {region.key!r}")
        datasets[region.source.sop_instance_uid] = ds
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(region)
    series_uid = new_uid()
    out = []
    for number, regions in enumerate(by_series.values(), start=1):
        out.append(_encode_one(result, ctx, template, regions, datasets, series_uid, number))
    return out


def _encode_one(result, ctx, template: Template, regions: list[Region], datasets, series_uid: str, number: int) -> pydicom.Dataset:
    layers = {
        name: hd.pr.GraphicLayer(layer_name=name, order=i, description=desc, display_color=hd.color.CIELabColor.from_rgb(*rgb))
        for i, (name, (desc, rgb)) in enumerate(LAYERS.items(), start=1)
    }
    # One annotation per (image, frame, layer): GSPS graphics reference the images they lie on.
    annotations: "OrderedDict[tuple[str, int, str], list[Region]]" = OrderedDict()
    for r in regions:
        annotations.setdefault((r.source.sop_instance_uid, r.source.frame, layer_for(r)), []).append(r)
    used_layers = []
    graphic_annotations = []
    for (uid, frame, layer), items in annotations.items():
        ds = datasets[uid]
        graphics, texts = [], []
        for r in items:
            graphics.append(_graphic(r, ds))
            texts.append(_text(r, template, ds))
        graphic_annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[ds],
                graphic_layer=layers[layer],
                referenced_frame_number=frame if is_multiframe(ds) else None,
                graphic_objects=graphics,
                text_objects=texts,
            )
        )
        if layer not in used_layers:
            used_layers.append(layer)
    referenced = list(OrderedDict((r.source.sop_instance_uid, datasets[r.source.sop_instance_uid]) for r in regions).values())
    # a Content Label is a CS of at most 16 characters that may not end in an underscore
    label = ("AI_" + "".join(c for c in result.analyzer.upper() if c.isalnum() or c == "_"))[:16].rstrip("_")
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=referenced,
        series_instance_uid=series_uid,
        series_number=series_number(ctx, result.analyzer, "GSPS", result.series_block),
        sop_instance_uid=new_uid(),
        instance_number=number,
        manufacturer=ctx.manufacturer,
        manufacturer_model_name=ctx.model_name,
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_serial,
        content_label=label[:16],
        content_description=f"{result.analyzer} {result.analyzer_version} regions"[:64],
        graphic_annotations=graphic_annotations,
        graphic_layers=[layers[name] for name in LAYERS if name in used_layers],
        voi_lut_transformations=_voi(referenced),
        presentation_lut_transformation=_presentation_lut(referenced),
        institution_name=ctx.institution or None,
        contributing_equipment=contributing_equipment(result, ctx),
    )
    description = series_description(result.analyzer, "GSPS", template.series_description, result.series_labels)
    return finish(gsps, referenced[0], ctx, description)


def _voi(images: list[pydicom.Dataset]) -> list[hd.pr.SoftcopyVOILUTTransformation]:
    """The source's own first window, else the percentile window the analyzers display with.

    A presentation state replaces the image's VOI, so without one a raw 12-bit
    radiograph would show almost black.
    """
    out = []
    for ds in images:
        centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if centre is not None and width is not None:
            centre = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
            width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        else:
            values = imaging.modality_values(ds, imaging.frames(ds))
            lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
            centre, width = (lo + hi) / 2.0, max(hi - lo, 1.0)
        out.append(
            hd.pr.SoftcopyVOILUTTransformation(
                # One-element lists: highdicom 0.28 splits a plain-string explanation into characters.
                window_center=[centre],
                window_width=[width],
                window_explanation=["source window" if "WindowCenter" in ds else "AI display window"],
                referenced_images=hd.ReferencedImageSequence(referenced_images=[ds]),
            )
        )
    return out


def _presentation_lut(images: list[pydicom.Dataset]) -> hd.PresentationLUTTransformation:
    """INVERSE for MONOCHROME1 sources, so bone stays white as on the original."""
    mono1 = [str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1" for ds in images]
    shape = hd.PresentationLUTShapeValues.INVERSE if all(mono1) else hd.PresentationLUTShapeValues.IDENTITY
    return hd.PresentationLUTTransformation(presentation_lut_shape=shape)


def _graphic(r: Region, ds: pydicom.Dataset) -> hd.pr.GraphicObject:
    # Presentation-state pixel coordinates cannot be negative: points just past the edge go onto it.
    points = np.asarray(r.points, dtype=np.float64)
    points = np.column_stack([np.clip(points[:, 0], 0, float(ds.Columns)), np.clip(points[:, 1], 0, float(ds.Rows))])
    if r.kind == "point":
        return hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POINT, points[:1], hd.pr.AnnotationUnitsValues.PIXEL)
    if r.kind == "polygon" and not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])  # a closed POLYLINE is how a presentation state draws a polygon
    return hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, points, hd.pr.AnnotationUnitsValues.PIXEL)


def _text(r: Region, template: Template, ds: pydicom.Dataset) -> hd.pr.TextObject:
    label = r.label or template.regions[r.key].label
    if r.uncertainty_class is not None:
        label += f" ({UncertaintyClass(r.uncertainty_class).value.replace('_', ' ')})"
    x, y = np.asarray(r.points, dtype=np.float64).mean(axis=0)
    cols, rows = float(ds.Columns), float(ds.Rows)
    # Anchor the label just right of the region, inside the image.
    anchor = (float(min(max(x + 4.0, 0.0), cols - 1.0)), float(min(max(y, 0.0), rows - 1.0)))
    return hd.pr.TextObject(text_value=label[:64], units=hd.pr.AnnotationUnitsValues.PIXEL, anchor_point=anchor, anchor_point_visible=False)
