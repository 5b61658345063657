"""Secondary Capture evidence heatmaps: the source image with a colour overlay and a burned-in caption."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from sr_templates.loader import Template

from .. import imaging
from ..analysis import AnalysisResult, Heatmap, Study
from .common import (
    EncoderContext,
    EncodingError,
    check_frame,
    contributing_equipment,
    finish,
    is_multiframe,
    new_uid,
    series_description,
    series_number,
    source_dataset,
)

CAPTION = "AI evidence \u2014 not a diagnosis"
MIN_WIDTH = 320

# A perceptually ordered blue-cyan-yellow-red scale; stops are (position, R, G, B).
_STOPS = np.array(
    [
        [0.00, 0, 0, 143],
        [0.15, 0, 60, 255],
        [0.35, 0, 220, 255],
        [0.55, 120, 255, 120],
        [0.75, 255, 220, 0],
        [1.00, 200, 0, 0],
    ],
    dtype=np.float32,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB floats in [0, 1] (shape ``values.shape + (3,)``)."""
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, _STOPS[:, 0], _STOPS[:, i]) for i in (1, 2, 3)], axis=-1) / 255.0


def overlay(grey: np.ndarray, heat: np.ndarray, strength: float = 0.6, floor: float = 0.1) -> np.ndarray:
    """Blend a heatmap over a greyscale image; both in [0, 1]. Returns uint8 RGB.

    Weak evidence (below ``floor``) leaves the image untouched so the anatomy stays readable.
    """
    alpha = strength * np.clip((heat - floor) / (1.0 - floor), 0.0, 1.0)[..., None]
    rgb = (1.0 - alpha) * grey[..., None] + alpha * colormap(heat)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def encode_heatmaps(result: AnalysisResult, study: Study, ctx: EncoderContext, template: Template) -> dict[str, Dataset]:
    """One Secondary Capture per heatmap, all in one new series; returns them by heatmap key.

    Raises
    ------
    EncodingError
        When a heatmap's shape differs from its source frame or its values are not finite.
    """
    if not result.heatmaps:
        return {}
    series_uid = new_uid()
    probabilities = {f.heatmap: f.probability for f in result.findings if f.heatmap}
    out: dict[str, Dataset] = {}
    for number, heatmap in enumerate(result.heatmaps, start=1):
        out[heatmap.key] = _encode_one(result, study, ctx, template, heatmap, series_uid, number, probabilities.get(heatmap.key))
    return out


def _encode_one(result, study, ctx, template, heatmap: Heatmap, series_uid: str, number: int, probability) -> Dataset:
    what = f"heatmap {heatmap.key!r}"
    src = source_dataset(study, heatmap.source, what)
    check_frame(src, heatmap.source, what)
    grey = imaging.display_image(src, heatmap.source.frame - 1)
    data = np.asarray(heatmap.data, dtype=np.float32)
    if data.shape != grey.shape:
        raise EncodingError(f"{what} has shape {data.shape}, its source frame {grey.shape}; heatmaps must match the source frame")
    if not np.all(np.isfinite(data)):
        raise EncodingError(f"{what} has values that are not finite")

    name = _finding_name(heatmap, template)
    lines = [f"{name}: {CAPTION}"]
    detail = f"{result.analyzer} {result.analyzer_version}"
    if heatmap.label and heatmap.label != name:
        detail = f"{heatmap.label} \u00b7 {detail}"
    if probability is not None and np.isfinite(probability):
        detail += f" \u00b7 probability {probability:.2f}"
    if result.not_for_clinical_use:
        detail += " \u00b7 not for clinical use"
    lines.append(detail)
    # Small images (e.g. 64x64 CT slices) are enlarged by a whole factor so the caption stays legible.
    factor = max(1, -(-MIN_WIDTH // grey.shape[1]))
    rgb = overlay(grey, np.clip(data, 0.0, 1.0))
    if factor > 1:
        rgb = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
    pixels = _with_legend(rgb, lines)

    spacing = imaging.pixel_spacing(src)
    if spacing is not None:
        spacing = (spacing[0] / factor, spacing[1] / factor)
    orientation = src.get("PatientOrientation")
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=src.StudyInstanceUID,
        series_instance_uid=series_uid,
        series_number=series_number(ctx, result.analyzer, "SC", result.series_block),
        sop_instance_uid=new_uid(),
        instance_number=number,
        manufacturer=ctx.manufacturer,
        patient_id=src.get("PatientID"),
        patient_name=src.get("PatientName"),
        patient_birth_date=src.get("PatientBirthDate"),
        patient_sex=src.get("PatientSex") or None,
        accession_number=src.get("AccessionNumber"),
        study_id=src.get("StudyID"),
        study_date=src.get("StudyDate"),
        study_time=src.get("StudyTime"),
        referring_physician_name=src.get("ReferringPhysicianName"),
        pixel_spacing=spacing,
        # highdicom insists on an orientation for PATIENT images; the source's own value (possibly empty) replaces it below.
        patient_orientation=("L", "F"),
        contributing_equipment=contributing_equipment(result, ctx),
    )
    sc.PatientOrientation = orientation if orientation else ""
    if src.get("Laterality"):
        sc.Laterality = src.Laterality
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ImageComments = f"{name}: {CAPTION}"[:10240]
    sc.DerivationDescription = f"Evidence heatmap for '{name}' from {result.analyzer} {result.analyzer_version} over the source image"[:1024]
    sc.SourceImageSequence = [_source_item(src, heatmap.source.frame)]
    sc.ContentDate = sc.get("ContentDate") or src.get("StudyDate", "")
    description = series_description(result.analyzer, "SC", template.series_description, result.series_labels)
    return finish(sc, src, ctx, description)


def _finding_name(heatmap: Heatmap, template: Template) -> str:
    """The finding as the template names it; the heatmap's own label goes on the second line."""
    spec = template.findings.get(heatmap.finding)
    return spec.concept.meaning if spec else (heatmap.label or heatmap.finding)


def _source_item(src: pydicom.Dataset, frame: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    if is_multiframe(src):
        item.ReferencedFrameNumber = frame
    return item


def _font(size: int) -> tuple[ImageFont.ImageFont, bool]:
    """A font for the caption and whether it has the em dash (Pillow's built-in one lacks it)."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size), False
    except TypeError:  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default(), False


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


def _with_legend(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """Append a black band under the image with the caption and a low-to-high colour bar."""
    rows, cols = rgb.shape[:2]
    size = max(10, min(28, cols // 40))
    font, full = _font(size)
    if not full:
        lines = [line.replace("\u2014", "-").replace("\u00b7", "-") for line in lines]
    margin = max(4, size // 2)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [w for line in lines for w in _wrap(scratch, line, font, cols - 2 * margin)]
    bar_h = max(6, size // 2)
    band_h = margin * 3 + bar_h + len(wrapped) * (size + 3) + size
    band = Image.new("RGB", (cols, band_h), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    y = margin
    for line in wrapped:
        draw.text((margin, y), line, fill=(255, 255, 255), font=font)
        y += size + 3
    y += margin
    bar_w = max(16, cols // 3)
    ramp = (colormap(np.linspace(0.0, 1.0, bar_w))[None] * 255).astype(np.uint8).repeat(bar_h, axis=0)
    band.paste(Image.fromarray(ramp, "RGB"), (margin, y))
    draw.text((margin, y + bar_h + 2), "low", fill=(255, 255, 255), font=font)
    high_w = draw.textlength("high", font=font)
    draw.text((margin + bar_w - high_w, y + bar_h + 2), "high", fill=(255, 255, 255), font=font)
    return np.concatenate([rgb, np.asarray(band, dtype=np.uint8)], axis=0)
