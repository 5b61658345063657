"""What every result object shares: equipment, identity, series numbering, copied study attributes."""

from __future__ import annotations

import datetime as _dt
import math
import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

import dicomnode
from sr_templates.loader import PRIVATE_SCHEME

from ..analysis import SERIES_LABELS, AnalysisResult, SourceRef, Study
from ..uids import COMPREHENSIVE_3D_SR, GSPS, SECONDARY_CAPTURE, SEGMENTATION, new_uid, stable_uid  # noqa: F401 (used by the encoders)


@dataclass
class EncoderContext:
    """Who makes the result objects: the node as a device, and where its series are numbered."""

    manufacturer: str = "dicomnode project"
    model_name: str = "dicomnode"
    software_version: str = dicomnode.__version__
    device_serial: str = "0"
    device_uid: str = ""
    """Stable UID of this node; empty means derived from manufacturer, model and serial."""
    institution: str = ""
    series_number_base: int = 9000
    """Result SeriesNumber = base + 10 × the analyzer's series block + object-type offset."""
    station_name: str = ""

    def __post_init__(self) -> None:
        if not self.device_uid:
            self.device_uid = stable_uid("device", self.manufacturer, self.model_name, self.device_serial)


class EncodingError(ValueError):
    """The result cannot become a valid DICOM object; the message says which item and why."""


OBJECT_OFFSETS = {"SR": 0, "SEG": 1, "SC": 2, "GSPS": 3}


def series_number(ctx: EncoderContext, analyzer: str, kind: str, block: int | None = None) -> int:
    """The result series number of one object type; an analyzer without a fixed ``block`` hashes into blocks 6 to 9."""
    if block is None:
        block = 6 + zlib.crc32(analyzer.encode()) % 4
    return ctx.series_number_base + 10 * block + OBJECT_OFFSETS[kind]


def series_description(analyzer: str, kind: str, prefix: str | None = None, labels: Mapping[str, str] | None = None) -> str:
    label = (labels or {}).get(kind) or SERIES_LABELS[kind]
    return f"{prefix or 'AI ' + analyzer} {label}"[:64]


def algorithm_version(result: AnalysisResult) -> str:
    """Analyzer version plus the model versions, e.g. ``1.0 (cxr-densenet 0.3)``."""
    models = ", ".join(f"{m.name} {m.version}" for m in result.models)
    return f"{result.analyzer_version} ({models})" if models else result.analyzer_version


def contributing_equipment(result: AnalysisResult, ctx: EncoderContext) -> list[hd.ContributingEquipment]:
    """One item per algorithm (model) that produced the result, as the IHE AI Results profile asks.

    DICOM's tables have no "Processing Algorithm" purpose code; the closest in
    CID 7005 (and the one highdicom accepts) is DCM 109102 Processing Equipment,
    and the contribution description names the algorithm.
    """
    now = _dt.datetime.now()
    items: list[hd.ContributingEquipment] = []
    models = result.models or [None]
    for model in models:
        model_name = f"{result.analyzer}/{model.name}" if model else result.analyzer
        versions = [result.analyzer_version] + ([model.version] if model else [])
        item = hd.ContributingEquipment(
            manufacturer=ctx.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=model_name[:64],
            software_versions=versions,
            device_serial_number=(model.sha256[:16] if model and model.sha256 else ctx.device_serial),
            institution_name=ctx.institution or None,
            station_name=ctx.station_name or None,
            contribution_datetime=now,
            contribution_description=_contribution(result, model)[:1024],
        )
        item.DeviceUID = stable_uid("algorithm", ctx.manufacturer, result.analyzer, model.name if model else "", model.version if model else "")
        items.append(item)
    return items


def _contribution(result: AnalysisResult, model) -> str:
    text = f"Processing Algorithm: {result.analyzer} {result.analyzer_version}"
    if model is not None:
        text += f", model {model.name} {model.version} (sha256 {model.sha256[:12]})"
        if model.not_for_clinical_use:
            text += f"; weights {model.restriction}, not for clinical use"
    return text


# Patient and study attributes copied from the source so results file into the same study.
_COPIED = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "IssuerOfAccessionNumberSequence",
    "OtherPatientIDsSequence",
)


# Header attributes that pass from the source into result objects (the copied ones, what highdicom reads, those finish() copies).
_SANITISED = _COPIED + ("BodyPartExamined", "Laterality", "PatientOrientation", "SeriesDate", "SeriesTime", "ContentDate",
                        "ContentTime", "AcquisitionDateTime")
# Type 2 attributes of the patient and study modules stay present (empty) when their value is unusable; others are removed.
_TYPE2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName", "Laterality", "PatientOrientation"}
_MAX_LEN = {"AE": 16, "AS": 4, "CS": 16, "DS": 16, "LO": 64, "SH": 16, "ST": 1024, "LT": 10240, "UI": 64}
_VALID = {
    "DA": re.compile(r"\d{8}"),
    "TM": re.compile(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?"),
    "DT": re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?"),
    "AS": re.compile(r"\d{3}[DWMY]"),
    "CS": re.compile(r"[A-Z0-9_ ]*"),
}
_ENUMS = {"PatientSex": {"M", "F", "O"}, "Laterality": {"R", "L"}}


def sanitise_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Make the header attributes that results copy valid per their VR, in place; returns ``ds``.

    A source's malformed values must never stop its results: an unusable value is emptied
    (Type 2) or removed, a multi-valued one where the result expects one keeps its first value.
    """
    for kw in _SANITISED:
        if kw not in ds or ds[kw].VR == "SQ":
            continue
        elem = ds[kw]
        try:
            values = _text_values(elem.value)
            keep = _valid_values(kw, elem.VR, values)
        except Exception:  # a value that does not even decode is as unusable as a malformed one
            keep = None
        if keep is None:
            if kw in _TYPE2:
                ds[kw].value = ""
            else:
                del ds[kw]
        elif keep != values:
            ds[kw].value = keep[0] if len(keep) == 1 else keep
    return ds


def _text_values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        value = value.decode("ascii")
    return [str(value)]


def _valid_values(kw: str, vr: str, values: list[str]) -> list[str] | None:
    """The values to keep, or None when nothing usable is left."""
    if not values or values == [""]:
        return values
    multiple = kw == "PatientOrientation"
    values = values[:2] if multiple else values[:1]
    if any(len(v) > _MAX_LEN.get(vr, 10**6) for v in values):
        return None
    for v in values:
        if vr in _VALID and not _VALID[vr].fullmatch(v):
            return None
        if vr == "DA" and not _date_ok(v):
            return None
        if vr == "DS" and not _number_ok(v):
            return None
        if vr == "PN" and not _name_ok(v):
            return None
        if kw in _ENUMS and v not in _ENUMS[kw]:
            return None
        if "\\" in v or any(ord(c) < 32 and c not in "\x1b" for c in v):
            return None
    if multiple and len(values) != 2:
        return None
    return values


def _date_ok(v: str) -> bool:
    try:
        _dt.date(int(v[:4]), int(v[4:6]), int(v[6:8]))
    except ValueError:
        return False
    return True


def _number_ok(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def _name_ok(v: str) -> bool:
    groups = v.split("=")
    return len(groups) <= 3 and all(len(g) <= 64 and g.count("^") <= 4 for g in groups)


def finish(ds: pydicom.Dataset, source: pydicom.Dataset, ctx: EncoderContext, description: str) -> pydicom.Dataset:
    """Attributes every result object carries, set after highdicom built it."""
    for kw in _COPIED:
        if kw in source and kw not in ds:
            setattr(ds, kw, source[kw].value)
    ds.SpecificCharacterSet = "ISO_IR 100" if _latin1(ds) else "ISO_IR 192"
    ds.SeriesDescription = description
    now = _dt.datetime.now()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.Manufacturer = ctx.manufacturer
    ds.ManufacturerModelName = ctx.model_name
    ds.SoftwareVersions = ctx.software_version
    ds.DeviceSerialNumber = ctx.device_serial
    if ctx.institution:
        ds.InstitutionName = ctx.institution
    if ctx.station_name:
        ds.StationName = ctx.station_name
    if ds.SOPClassUID != COMPREHENSIVE_3D_SR:
        # a SEG carries laterality per frame (Frame Laterality), so its series must not repeat it
        for kw in ("BodyPartExamined",) if ds.SOPClassUID == SEGMENTATION else ("BodyPartExamined", "Laterality"):
            # empty values say nothing: copying them would assert a (non-)paired body part
            if source.get(kw) and not ds.get(kw):
                setattr(ds, kw, source[kw].value)
            elif kw in ds and not ds.get(kw) and kw == "BodyPartExamined":
                del ds[kw]
    if ds.SOPClassUID in (SECONDARY_CAPTURE, GSPS) and not any(ds.get(k) for k in ("Laterality", "BodyPartExamined", "ImageLaterality")):
        ds.Laterality = ""  # Type 2C: the body part is unknown, so whether it is paired is too
    if "PatientOrientation" not in ds and ds.SOPClassUID in (SEGMENTATION, SECONDARY_CAPTURE):
        ds.PatientOrientation = source.get("PatientOrientation", "")
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "dicomnode project codes"
    scheme.CodingSchemeResponsibleOrganization = ctx.manufacturer
    ds.CodingSchemeIdentificationSequence = [scheme]
    if "ReferencedPerformedProcedureStepSequence" in source:
        ds.ReferencedPerformedProcedureStepSequence = source.ReferencedPerformedProcedureStepSequence
    return ds


def _latin1(ds: pydicom.Dataset) -> bool:
    """Whether every text value fits Latin-1 (DCMTK's checkers do not support UTF-8 fully)."""
    for elem in ds.iterall():
        values = elem.value if isinstance(elem.value, (list, tuple, pydicom.multival.MultiValue)) else [elem.value]
        for v in values:
            if isinstance(v, (str, pydicom.valuerep.PersonName)):
                try:
                    str(v).encode("latin-1")
                except UnicodeEncodeError:
                    return False
    return True


def source_dataset(study: Study, ref: SourceRef, what: str) -> pydicom.Dataset:
    try:
        return sanitise_header(study.instance(ref.sop_instance_uid).dataset)
    except KeyError:
        raise EncodingError(f"{what} refers to instance {ref.sop_instance_uid}, which is not in study {study.study_instance_uid}") from None


def check_frame(ds: pydicom.Dataset, ref: SourceRef, what: str) -> None:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= ref.frame <= n:
        raise EncodingError(f"{what} refers to frame {ref.frame} of instance {ref.sop_instance_uid}, which has {n} frame(s)")


def is_multiframe(ds: pydicom.Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1


def unique(refs: Iterable[SourceRef]) -> list[SourceRef]:
    out: list[SourceRef] = []
    for r in refs:
        if r not in out:
            out.append(r)
    return out


__all__ = [
    "EncoderContext",
    "EncodingError",
    "algorithm_version",
    "contributing_equipment",
    "finish",
    "new_uid",
    "sanitise_header",
    "series_description",
    "series_number",
    "stable_uid",
]
