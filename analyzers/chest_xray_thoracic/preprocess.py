"""From a chest radiograph dataset to the networks' input.

Pixels go through the shared helpers (modality LUT, VOI window, MONOCHROME1
inversion) to a [0, 1] image with dense bright, are smoothed against aliasing,
resized to 224 x 224, stretched to the 1-99 percentile range (real files
carry windows from tight to very wide) and normalised with the ImageNet mean
and standard deviation on three identical channels, as a DenseNet trained on ChestX-ray14
expects. The paper resizes to 256 and centre-crops 224; here the whole image is
resized, so the lung bases and costophrenic angles stay in view for the
segmentation and the cardiothoracic ratio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from dicomnode import imaging
from dicomnode.analysis import NotApplicable

from .constants import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE

if TYPE_CHECKING:  # pragma: no cover
    import pydicom

MODALITIES = ("CR", "DX")
FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "RLD", "LLD")
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "HEART", "")
_LATERAL_TEXT = re.compile(r"\b(LAT|LATERAL|LATERALE|SEITLICH)\b|\bLL\b|\bRL\b", re.IGNORECASE)
_TEXT_KEYWORDS = (
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "AcquisitionDeviceProcessingDescription",
    "PerformedProcedureStepDescription",
    "ImageComments",
)


@dataclass
class Prepared:
    """A radiograph ready for the networks."""

    display: np.ndarray
    """float32 (rows, columns) in [0, 1], dense bright, at the source size."""
    net_input: np.ndarray
    """float32 (3, 224, 224), ImageNet-normalised."""


def _texts(ds: "pydicom.Dataset") -> list[str]:
    out = [str(ds.get(k, "") or "") for k in _TEXT_KEYWORDS]
    for seq_kw in ("ViewCodeSequence", "PerformedProtocolCodeSequence", "ProcedureCodeSequence"):
        for item in ds.get(seq_kw, []) or []:
            out.append(str(item.get("CodeMeaning", "") or ""))
    return out


def lateral_reason(ds: "pydicom.Dataset") -> str | None:
    """Why the header says this is a lateral view, or None."""
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        return f"ViewPosition is {view}"
    for text in _texts(ds):
        if _LATERAL_TEXT.search(text):
            return "the image's descriptions say it is a lateral view"
    return None


def check_header(ds: "pydicom.Dataset") -> None:
    """Raise NotApplicable unless the header describes a greyscale frontal chest CR/DX image."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in MODALITIES:
        raise NotApplicable(f"modality {modality or 'unknown'} is not a radiograph; this analyzer needs a frontal chest CR or DX image")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise NotApplicable(f"colour image ({photometric}); this analyzer needs a greyscale chest radiograph")
    reason = lateral_reason(ds)
    if reason:
        raise NotApplicable(f"lateral view ({reason}); this analyzer needs a frontal chest radiograph")
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if part not in CHEST_PARTS and view not in FRONTAL_VIEWS:
        raise NotApplicable(f"body part {part} is not the chest; this analyzer needs a frontal chest radiograph")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise NotApplicable("multi-frame radiograph; this analyzer needs a single frontal chest image")


def stretch_contrast(img: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the ``low``-``high`` percentile range to [0, 1]: a wide or missing VOI window then looks like a tight one."""
    lo, hi = np.percentile(img, [low, high])
    return np.clip((img - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def normalise(small: np.ndarray) -> np.ndarray:
    """A (..., 224, 224) [0, 1] image to three ImageNet-normalised channels (..., 3, 224, 224)."""
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return ((small[..., None, :, :] - mean) / std).astype(np.float32)


def to_net_input(display: np.ndarray) -> np.ndarray:
    """(rows, columns) [0, 1] image to the (3, 224, 224) normalised network input."""
    factor = min(display.shape) / INPUT_SIZE
    img = ndimage.gaussian_filter(display, sigma=0.4 * factor) if factor > 1.5 else display
    small = imaging.resize(img.astype(np.float32), (INPUT_SIZE, INPUT_SIZE), order=1)
    return normalise(stretch_contrast(np.clip(small, 0, 1)))


def ensure_transfer_syntax(ds: "pydicom.Dataset") -> None:
    """Give a dataset read without file meta (old ACR-NEMA style files) the syntax it was read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def prepare(ds: "pydicom.Dataset") -> Prepared:
    """Decode, window and resize one chest radiograph.

    Raises
    ------
    NotApplicable
        For a non-chest, lateral, colour or undecodable image, or one without contrast.
    """
    check_header(ds)
    ensure_transfer_syntax(ds)
    display = imaging.display_image(ds, 0)
    if min(display.shape) < 64:
        raise NotApplicable(f"image of {display.shape[1]}x{display.shape[0]} pixels is too small for a chest radiograph")
    if float(display.std()) < 1e-3:
        raise NotApplicable("the image has no contrast (all pixels alike); it cannot be analysed")
    return Prepared(display=display, net_input=to_net_input(display))
