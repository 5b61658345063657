"""Writing phantom images as real DICOM files (shared by every analyzer's ``phantom.py``)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.uids import CR_IMAGE, CT_IMAGE, DX_IMAGE_PRESENTATION, MR_IMAGE, SC_IMAGE, UID_PREFIX, new_uid  # noqa: F401 (the analyzers' phantoms use them from here)


@dataclass
class PhantomPatient:
    """Synthetic patient and study identity (obviously fake, never real PHI)."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str = field(default_factory=new_uid)
    study_date: str = "20260101"
    study_time: str = "090000"
    accession: str = ""
    study_description: str = ""

    @classmethod
    def make(cls, rng: np.random.Generator, prefix: str, index: int, age_years: float | None = None, study_description: str = "") -> "PhantomPatient":
        age = float(age_years if age_years is not None else rng.uniform(20, 85))
        study_day = _dt.date(2026, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 300)))
        birth = study_day - _dt.timedelta(days=int(age * 365.25))
        # the study UID follows from the generator's state (without drawing from it), so a seed
        # gives the same phantom, UIDs included, every time
        state = hashlib.sha256(repr(rng.bit_generator.state).encode()).hexdigest()
        return cls(
            study_uid=new_uid("study", prefix, index, state),
            patient_id=f"PH-{prefix}-{index:05d}",
            patient_name=f"PHANTOM^{prefix.upper()}{index:05d}",
            birth_date=birth.strftime("%Y%m%d"),
            sex=str(rng.choice(["F", "M"])),
            study_date=study_day.strftime("%Y%m%d"),
            study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
            accession=f"A{prefix[:3].upper()}{index:06d}",
            study_description=study_description,
        )


def image_dataset(
    pixels: np.ndarray,
    *,
    patient: PhantomPatient,
    modality: str,
    sop_class_uid: str = CR_IMAGE,
    series_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    series_description: str = "",
    pixel_spacing: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    attributes: dict[str, Any] | None = None,
) -> Dataset:
    """A single-frame greyscale image of ``sop_class_uid`` with patient/study/series modules filled.

    ``pixels`` are stored values (uint8 or uint16). ``attributes`` are set last
    (keyword -> value), for modality-specific tags such as BodyPartExamined,
    ViewPosition, ImagePositionPatient, RescaleSlope or EchoTime.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"phantom pixels must be 2-D, got shape {pixels.shape}")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"phantom pixels must be uint8 or uint16, got {pixels.dtype}")
    bits_allocated = pixels.dtype.itemsize * 8
    bits_stored = min(bits_stored, bits_allocated)
    if int(pixels.max(initial=0)) >= 1 << bits_stored:
        raise ValueError(f"pixel values exceed BitsStored={bits_stored}")

    ds = Dataset()
    meta = FileMetaDataset()
    ds.SOPClassUID = sop_class_uid
    series_uid = series_uid or new_uid("series", patient.study_uid, modality, series_number, series_description)
    extra = repr(sorted((attributes or {}).items(), key=lambda kv: kv[0]))
    ds.SOPInstanceUID = new_uid("instance", series_uid, sop_class_uid, instance_number, extra,
                                hashlib.sha1(pixels.tobytes()).hexdigest())
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_PREFIX + "1"
    meta.ImplementationVersionName = "DICOMNODE_PH"
    ds.file_meta = meta

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = patient.study_date
    ds.InstanceCreationTime = patient.study_time
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = patient.study_uid
    ds.StudyDate = patient.study_date
    ds.StudyTime = patient.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = patient.accession
    if patient.study_description:
        ds.StudyDescription = patient.study_description
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = patient.study_date
    ds.SeriesTime = patient.study_time
    if series_description:
        ds.SeriesDescription = series_description
    ds.Manufacturer = "dicomnode phantom"
    ds.InstanceNumber = instance_number
    ds.ContentDate = patient.study_date
    ds.ContentTime = patient.study_time
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    if pixel_spacing is not None:
        spacing = [f"{pixel_spacing[0]:.6g}", f"{pixel_spacing[1]:.6g}"]
        if sop_class_uid in (CT_IMAGE, MR_IMAGE):
            ds.PixelSpacing = spacing
        elif sop_class_uid == SC_IMAGE:
            ds.NominalScannedPixelSpacing = spacing
        else:
            ds.ImagerPixelSpacing = spacing
            ds.PixelSpacing = spacing
    if sop_class_uid == SC_IMAGE:
        ds.ConversionType = "WSD"
    for key, value in (attributes or {}).items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def write_truth(folder: Path, truth: dict[str, Any]) -> Path:
    """Ground truth beside the study's files, as ``truth.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "truth.json"
    path.write_text(json.dumps(truth, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
