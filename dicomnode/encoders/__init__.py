"""Result encoders: an :class:`~dicomnode.analysis.AnalysisResult` becomes standard DICOM objects.

Every object is built with highdicom and joins the source study in a new series
per analyzer and object type:

* ``sr`` — TID 1500 Imaging Measurement Report (Comprehensive 3D SR);
* ``seg`` — Segmentations, binary or fractional;
* ``sc`` — Secondary Capture evidence heatmaps with a burned-in caption;
* ``gsps`` — Grayscale Softcopy Presentation State with the regions as overlays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pydicom
import structlog

from ..analysis import AnalysisResult, Study
from .common import EncoderContext, EncodingError, series_number
from .gsps import encode_gsps
from .sc import encode_heatmaps
from .seg import encode_segmentations
from .sr import encode_sr

if TYPE_CHECKING:  # pragma: no cover
    from sr_templates.loader import Template

log = structlog.get_logger("dicomnode.encoders")


def encode_result(
    result: AnalysisResult, study: Study, ctx: EncoderContext, template: "Template | None" = None
) -> list[pydicom.Dataset]:
    """All result objects for one analysis: SR, SEG(s), SC heatmap(s), GSPS — built with highdicom.

    Parameters
    ----------
    result
        What the analyzer found.
    study
        The source study; objects copy its patient/study attributes and
        reference its instances and frames.
    ctx
        The node's identity and series numbering.
    template
        The analyzer's SR template; loaded from ``sr_templates/<analyzer>.yaml`` when omitted.

    Returns
    -------
    list[pydicom.Dataset]
        The SR first, then SEGs, heatmap SCs and presentation states.

    Raises
    ------
    EncodingError
        When the result cannot be written as valid objects (the message names the item).
    sr_templates.loader.TemplateError
        When the analyzer's template is missing or malformed.
    """
    if template is None:
        from sr_templates.loader import load_template

        template = load_template(result.analyzer)
    if template.analyzer != result.analyzer:
        raise EncodingError(f"template {template.path} is for {template.analyzer!r}, the result is from {result.analyzer!r}")
    heatmaps = encode_heatmaps(result, study, ctx, template)
    sr = encode_sr(result, study, ctx, template, heatmap_images=heatmaps)
    segs = encode_segmentations(result, study, ctx, template)
    gsps = encode_gsps(result, study, ctx, template)
    objects = [sr, *segs, *heatmaps.values(), *gsps]
    log.info(
        "result_encoded",
        study_uid=study.study_instance_uid,
        analyzer=result.analyzer,
        sr=1,
        seg=len(segs),
        sc=len(heatmaps),
        gsps=len(gsps),
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in objects],
    )
    return objects


__all__ = [
    "EncoderContext",
    "EncodingError",
    "encode_gsps",
    "encode_heatmaps",
    "encode_result",
    "encode_segmentations",
    "encode_sr",
    "series_number",
]
