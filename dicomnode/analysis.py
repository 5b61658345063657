"""The analyzer contract, owned by the core: inputs, results, the ``Analyzer`` base class, model registry entries.

An analyzer looks at the series of one study that it can use and returns an
:class:`AnalysisResult`. It never touches the network, the job queue or DICOM
encoding: the node turns results into SR / SEG / SC / GSPS objects using the
analyzer's template in ``sr_templates/<name>.yaml`` (:func:`run_analysis` is
that one path, select → analyze → encode). Result items validate their values
when they are made, so a malformed item never exists.

Every output item carries a *key* that names it in the analyzer's declared
:class:`Outputs` and in its SR template, where the coded concept, value set and
unit live. Image coordinates are (column, row) in pixels of the referenced
source frame, with (0, 0) at the top-left corner of the top-left pixel, as in
DICOM SCOORD.

Analyzers import this module; the core never imports an analyzer. They are
found through the ``dicomnode.analyzers`` entry-point group (see
:mod:`dicomnode.registry`), so a third party can ship one as its own package.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Literal, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pydicom

    from sr_templates.loader import Template

    from .encoders.common import EncoderContext


class NotApplicable(Exception):
    """The input is not something this analyzer can judge.

    The message is one sentence a user can act on, e.g. ``"lateral view; this
    analyzer needs a frontal chest radiograph"``.
    """


class AnalyzerError(Exception):
    """The analyzer could not produce a result for input it accepted."""


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


@dataclass
class Instance:
    """One stored instance. The dataset is read lazily and cached."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None = None
    _dataset: "pydicom.Dataset | None" = field(default=None, repr=False, compare=False)

    @property
    def dataset(self) -> "pydicom.Dataset":
        if self._dataset is None:
            import pydicom

            self._dataset = pydicom.dcmread(self.path, force=True)
        return self._dataset

    def header(self) -> "pydicom.Dataset":
        """The dataset without pixel data (cheap; for routing and selection)."""
        if self._dataset is not None:
            return self._dataset
        import pydicom

        return pydicom.dcmread(self.path, stop_before_pixels=True, force=True)

    @classmethod
    def from_dataset(cls, ds: "pydicom.Dataset", path: Path | None = None) -> "Instance":
        number = ds.get("InstanceNumber")
        return cls(
            path=Path(path) if path is not None else Path(f"{ds.SOPInstanceUID}.dcm"),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            instance_number=int(number) if number not in (None, "") else None,
            _dataset=ds,
        )


@dataclass
class Series:
    """The instances of one series, ordered by InstanceNumber where present."""

    series_instance_uid: str
    modality: str
    instances: list[Instance]
    description: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    """Series-level tags the router saw (keyword -> value), e.g. BodyPartExamined."""

    def first(self) -> "pydicom.Dataset":
        return self.instances[0].header()

    def instance(self, sop_instance_uid: str) -> Instance:
        for inst in self.instances:
            if inst.sop_instance_uid == sop_instance_uid:
                return inst
        raise KeyError(sop_instance_uid)


@dataclass
class Study:
    study_instance_uid: str
    series: list[Series]

    def instance(self, sop_instance_uid: str) -> Instance:
        for s in self.series:
            for inst in s.instances:
                if inst.sop_instance_uid == sop_instance_uid:
                    return inst
        raise KeyError(sop_instance_uid)

    @classmethod
    def from_datasets(cls, datasets: Iterable["pydicom.Dataset"], paths: Iterable[Path | None] | None = None) -> "Study":
        """Group datasets (all of one study) into series; for files and tests."""
        items = list(datasets)
        path_list = list(paths) if paths is not None else [None] * len(items)
        by_series: dict[str, Series] = {}
        study_uid = None
        for ds, path in zip(items, path_list):
            study_uid = study_uid or str(ds.StudyInstanceUID)
            uid = str(ds.SeriesInstanceUID)
            if uid not in by_series:
                by_series[uid] = Series(
                    series_instance_uid=uid,
                    modality=str(ds.get("Modality", "")),
                    description=str(ds.get("SeriesDescription", "")),
                    instances=[],
                    attributes={k: ds.get(k) for k in ("BodyPartExamined", "ViewPosition", "ImageType") if k in ds},
                )
            by_series[uid].instances.append(Instance.from_dataset(ds, path))
        for s in by_series.values():
            s.instances.sort(key=lambda i: (i.instance_number is None, i.instance_number or 0))
        return cls(study_instance_uid=study_uid or "", series=list(by_series.values()))


@dataclass(frozen=True)
class SourceRef:
    """A frame of a source image that a result item refers to (frame is 1-based)."""

    sop_instance_uid: str
    frame: int = 1


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


class UncertaintyClass(str, enum.Enum):
    CERTAIN = "certain"
    MODERATE = "moderately_uncertain"
    HIGH = "highly_uncertain"


@dataclass
class Finding:
    """A qualitative result: present/absent (bool), a category key, or not evaluated (None).

    ``key`` names the finding in the template; for a categorical finding ``value``
    is a key of the template's value set for it. ``group`` puts the finding into
    a measurement group (one per disc, vertebra, image...); ``None`` makes it a
    study-level finding in the report's root.
    """

    key: str
    value: bool | str | None
    probability: float | None = None
    uncertainty: float | None = None
    site: str | None = None
    group: str | None = None
    source: SourceRef | None = None
    heatmap: str | None = None
    """Key of the :class:`Heatmap` that shows the evidence for this finding."""

    def __post_init__(self) -> None:
        _check_key("finding", self.key)
        if isinstance(self.value, np.bool_):
            self.value = bool(self.value)
        elif not isinstance(self.value, (bool, str, type(None))):
            raise TypeError(f"finding {self.key!r}: value must be a bool, a category key (str) or None, got {type(self.value).__name__}")
        if self.probability is not None:
            self.probability = _unit_interval(f"finding {self.key!r}: probability", self.probability)
        if self.uncertainty is not None:
            self.uncertainty = _non_negative(f"finding {self.key!r}: uncertainty", self.uncertainty)


@dataclass
class Measurement:
    """A numeric result in the unit its template declares (UCUM)."""

    key: str
    value: float
    unit: str
    site: str | None = None
    group: str | None = None
    source: SourceRef | None = None
    uncertainty: float | None = None
    """One standard deviation, same unit as value."""
    flags: tuple[str, ...] = ()
    """Qualifiers such as ``"depends_on_highly_uncertain_point"``."""

    def __post_init__(self) -> None:
        _check_key("measurement", self.key)
        if not isinstance(self.unit, str) or not self.unit.strip():
            raise ValueError(f"measurement {self.key!r}: unit must be a UCUM unit such as 'mm', 'deg' or '1', got {self.unit!r}")
        self.value = _finite(f"measurement {self.key!r}: value", self.value)
        if self.uncertainty is not None:
            self.uncertainty = _non_negative(f"measurement {self.key!r}: uncertainty", self.uncertainty)


@dataclass
class Region:
    """A point, polyline or polygon on one source frame, in (column, row) pixels."""

    key: str
    kind: Literal["point", "polyline", "polygon"]
    points: np.ndarray
    source: SourceRef
    group: str | None = None
    label: str = ""
    uncertainty: float | None = None
    """For keypoints: sigma_p in mm."""
    uncertainty_class: UncertaintyClass | None = None

    def __post_init__(self) -> None:
        _check_key("region", self.key)
        if self.kind not in ("point", "polyline", "polygon"):
            raise ValueError(f"region {self.key!r}: kind must be 'point', 'polyline' or 'polygon', got {self.kind!r}")
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
        need = {"point": (1, 1), "polyline": (2, None), "polygon": (3, None)}[self.kind]
        n = len(self.points)
        if n < need[0] or (need[1] is not None and n > need[1]):
            raise ValueError(f"region {self.key!r}: a {self.kind} needs {need[0]}{'' if need[1] else '+'} points, got {n}")
        if not np.all(np.isfinite(self.points)):
            raise ValueError(f"region {self.key!r}: points must be finite")
        if self.uncertainty is not None:
            self.uncertainty = _non_negative(f"region {self.key!r}: uncertainty", self.uncertainty)


@dataclass
class Segmentation:
    """Masks aligned with source frames.

    ``masks`` has shape (frames, rows, columns, segments): bool for binary,
    float in [0, 1] for fractional. ``sources[i]`` is the source frame of mask
    frame ``i``; ``segments[j]`` is the template key of segment ``j``.
    """

    segments: list[str]
    masks: np.ndarray
    sources: list[SourceRef]
    fractional: bool = False

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks)
        if self.masks.ndim != 4:
            raise ValueError(f"segmentation masks must be 4-D (frames, rows, columns, segments), got shape {self.masks.shape}")
        if self.masks.shape[0] != len(self.sources):
            raise ValueError(f"segmentation has {self.masks.shape[0]} mask frames but {len(self.sources)} sources")
        if self.masks.shape[3] != len(self.segments):
            raise ValueError(f"segmentation has {self.masks.shape[3]} mask channels but {len(self.segments)} segments")
        if len(set(self.segments)) != len(self.segments):
            raise ValueError(f"segmentation names a segment twice: {list(self.segments)}")
        if self.fractional:
            if not np.issubdtype(self.masks.dtype, np.floating):
                raise ValueError(f"fractional segmentation masks must be floating point, got {self.masks.dtype}")
            if not np.all(np.isfinite(self.masks)) or self.masks.min(initial=0.0) < 0 or self.masks.max(initial=0.0) > 1:
                raise ValueError("fractional segmentation masks must hold finite values in [0, 1]")
        elif self.masks.dtype != np.bool_ and not np.all((self.masks == 0) | (self.masks == 1)):
            raise ValueError(f"binary segmentation masks must be bool or 0/1, got other values in a {self.masks.dtype} array; "
                             "pass fractional=True for probabilities")


@dataclass
class Heatmap:
    """Evidence map for one finding, same size as the source frame, values in [0, 1]."""

    key: str
    finding: str
    data: np.ndarray
    source: SourceRef
    label: str = ""

    def __post_init__(self) -> None:
        _check_key("heatmap", self.key)
        self.data = np.asarray(self.data)
        if self.data.ndim != 2:
            raise ValueError(f"heatmap {self.key!r} must be 2-D (rows, columns) like its source frame, got shape {self.data.shape}")
        if not np.all(np.isfinite(self.data)):
            raise ValueError(f"heatmap {self.key!r} has values that are not finite")
        if self.data.size and (self.data.min() < 0 or self.data.max() > 1):
            raise ValueError(f"heatmap {self.key!r} has values in [{self.data.min():.3g}, {self.data.max():.3g}]; "
                             "evidence maps must lie in [0, 1] (clip or normalise them)")


@dataclass
class ModelInfo:
    """What produced a result: the registry entry of the weights in use."""

    name: str
    version: str
    sha256: str
    phantom_trained: bool
    path: str = ""
    clinical_use: bool = False
    """Only weights whose registry entry says ``clinical_use: true`` go without a not-for-clinical-use notice."""
    use_note: str = ""
    """Why else the weights are restricted, e.g. "for research, non-commercial use only" (training data licences)."""

    @property
    def not_for_clinical_use(self) -> bool:
        return self.phantom_trained or not self.clinical_use

    @property
    def restriction(self) -> str:
        """Why these weights are not for clinical use, as a phrase ("" when they are cleared for it)."""
        if self.phantom_trained:
            return "trained on synthetic phantoms"
        if not self.clinical_use:
            return self.use_note or "not cleared for clinical use"
        return ""


SERIES_LABELS = {"SR": "SR", "SEG": "SEG", "SC": "heatmap", "GSPS": "annotations"}
"""Default result series description suffix per object type."""


@dataclass
class AnalysisResult:
    analyzer: str
    analyzer_version: str
    models: list[ModelInfo] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    segmentations: list[Segmentation] = field(default_factory=list)
    heatmaps: list[Heatmap] = field(default_factory=list)
    review_required: bool = False
    review_reasons: list[str] = field(default_factory=list)
    sources: list[SourceRef] = field(default_factory=list)
    """Every source frame the analyzer looked at (the SR's evidence list)."""
    series_block: int | None = None
    """The analyzer's block of result series numbers (:attr:`Analyzer.series_block`)."""
    series_labels: dict[str, str] = field(default_factory=lambda: dict(SERIES_LABELS))
    """Result series description suffix per object type (:attr:`Analyzer.series_labels`)."""

    def check_against(self, study: Study) -> None:
        """Check that every image-aligned item refers to an instance of ``study`` and matches its size.

        Raises
        ------
        ValueError
            When a mask or heatmap refers to an instance not in the study, or differs in
            rows or columns from its source frame; the message names the item.
        """
        def size(ref: SourceRef, what: str) -> tuple[int, int]:
            try:
                ds = study.instance(ref.sop_instance_uid).header()
            except KeyError:
                raise ValueError(f"{what} refers to instance {ref.sop_instance_uid}, which is not in study {study.study_instance_uid}") from None
            return int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)

        for h in self.heatmaps:
            rows, cols = size(h.source, f"heatmap {h.key!r}")
            if h.data.shape != (rows, cols):
                raise ValueError(f"heatmap {h.key!r} is {h.data.shape[1]}x{h.data.shape[0]} (columns x rows) but its source "
                                 f"{h.source.sop_instance_uid} is {cols}x{rows}; a heatmap must match its source frame")
        for seg in self.segmentations:
            for i, ref in enumerate(seg.sources):
                rows, cols = size(ref, f"segmentation frame {i}")
                if seg.masks.shape[1:3] != (rows, cols):
                    raise ValueError(f"segmentation masks are {seg.masks.shape[2]}x{seg.masks.shape[1]} (columns x rows) but source "
                                     f"{ref.sop_instance_uid} is {cols}x{rows}; masks must match their source frames")

    @property
    def not_for_clinical_use(self) -> bool:
        return any(m.not_for_clinical_use for m in self.models)

    @property
    def use_notice(self) -> str:
        """One sentence for every result object: why its weights are not for clinical use ("" when all are cleared)."""
        reasons = list(dict.fromkeys(m.restriction for m in self.models if m.not_for_clinical_use))
        return f"Produced with model weights {'; '.join(reasons)}: not for clinical use." if reasons else ""

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (no pixel data), for logs, CLI output and tests."""
        return {
            "analyzer": self.analyzer,
            "analyzer_version": self.analyzer_version,
            "models": [dataclasses.asdict(m) for m in self.models],
            "findings": [
                {"key": f.key, "value": f.value, "probability": _round(f.probability), "site": f.site, "group": f.group}
                for f in self.findings
            ],
            "measurements": [
                {"key": m.key, "value": _round(m.value), "unit": m.unit, "site": m.site, "group": m.group, "flags": list(m.flags)}
                for m in self.measurements
            ],
            "regions": len(self.regions),
            "segmentations": [s.segments for s in self.segmentations],
            "heatmaps": [h.key for h in self.heatmaps],
            "review_required": self.review_required,
            "review_reasons": self.review_reasons,
        }


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def _check_key(what: str, key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"a {what} needs a key naming it in the analyzer's outputs and SR template, got {key!r}")


def _finite(what: str, x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(x).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


def _unit_interval(what: str, x: Any) -> float:
    value = _finite(what, x)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value}")
    return value


def _non_negative(what: str, x: Any) -> float:
    value = _finite(what, x)
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {value}")
    return value


@dataclass(frozen=True)
class Outputs:
    """What an analyzer can produce, by template key; the SR template is checked against it.

    findings: key -> "boolean" or the tuple of category keys.
    measurements: key -> UCUM unit.
    """

    findings: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    measurements: dict[str, str] = field(default_factory=dict)
    regions: tuple[str, ...] = ()
    segments: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# The analyzer
# ---------------------------------------------------------------------------


@dataclass
class AnalyzerSettings:
    """What the node's configuration passes to an analyzer."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_paths: dict[str, Path] = field(default_factory=dict)
    """Registry files (``model.json``) overriding bundled weights, by model name."""
    options: dict[str, Any] = field(default_factory=dict)
    """Analyzer-specific options, e.g. per-label operating points."""


class Analyzer:
    """Base class of every analyzer.

    Subclasses set ``name``, ``version``, ``title`` and ``outputs`` and implement
    :meth:`select` and :meth:`analyze`. Models are loaded lazily on first use
    (or by :meth:`load`) and kept warm for the life of the object.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    title: ClassVar[str] = ""
    outputs: ClassVar[Outputs] = Outputs()
    batchable: ClassVar[bool] = False
    """True when :meth:`analyze_batch` shares the network calls of several studies."""
    max_batch: ClassVar[int] = 8
    """The most studies :meth:`analyze_batch` takes at once."""
    template_file: ClassVar[Path | None] = None
    """SR template of an analyzer shipped outside this project; bundled ones live in ``sr_templates/``."""
    series_block: ClassVar[int | None] = None
    """Result SeriesNumber = node base + 10 × block + object offset; a fixed block keeps the numbers
    stable across nodes. None puts the analyzer in one of blocks 6 to 9 by a hash of its name."""
    series_labels: ClassVar[dict[str, str]] = SERIES_LABELS
    """Result SeriesDescription suffix per object type (``SR``, ``SEG``, ``SC``, ``GSPS``)."""

    def __init__(self, settings: AnalyzerSettings | None = None) -> None:
        self.settings = settings or AnalyzerSettings()

    # -- contract -----------------------------------------------------------

    def select(self, study: Study) -> list[Series]:
        """The series this analyzer will use.

        Raises
        ------
        NotApplicable
            When no series of the study can be used; the message says why.
        """
        raise NotImplementedError

    def analyze(self, inputs: Sequence[Series]) -> AnalysisResult:
        """Run on the selected series.

        Raises
        ------
        NotApplicable
            When looking at the pixels shows the input cannot be judged.
        """
        raise NotImplementedError

    def analyze_batch(self, batch: Sequence[Sequence[Series]]) -> list["AnalysisResult | Exception"]:
        """Run on the selected series of several studies; one result or exception per study, in order.

        The default calls :meth:`analyze` on each. A ``batchable`` analyzer overrides it to run the
        studies through its networks together. An exception in the list (NotApplicable or any
        other) concerns that study only; the others' results stand.
        """
        out: list[AnalysisResult | Exception] = []
        for inputs in batch:
            try:
                out.append(self.analyze(inputs))
            except Exception as exc:
                out.append(exc)
        return out

    def load(self) -> None:
        """Load models now (the worker calls this once at start-up)."""

    def models(self) -> list[ModelInfo]:
        """Registry entries of the weights this analyzer uses."""
        return []

    def warmup(self) -> None:
        """One inference on dummy input, to check the models and warm the session."""

    @classmethod
    def write_phantoms(cls, out_dir: Path, n: int, seed: int) -> list[Path]:
        """Write ``n`` phantom studies as DICOM files plus ground-truth JSON; returns study folders."""
        raise NotImplementedError(f"{cls.name} has no phantom generator")

    # -- helpers ------------------------------------------------------------

    def result(self, **kwargs: Any) -> AnalysisResult:
        return AnalysisResult(analyzer=self.name, analyzer_version=self.version, models=self.models(),
                              series_block=self.series_block, series_labels=dict(self.series_labels), **kwargs)


# ---------------------------------------------------------------------------
# Model registry entries
# ---------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RegistryEntry:
    """A ``model.json`` beside an ONNX file: what the weights are and how to check them."""

    name: str
    version: str
    file: str
    sha256: str
    phantom_trained: bool
    extra: dict[str, Any] = field(default_factory=dict)
    """Calibration stored with the model (thresholds, operating points, input size...)."""
    registry_path: Path | None = None
    clinical_use: bool = False
    """Cleared for clinical use (registry key ``clinical_use: true``); no bundled weight is."""
    use_note: str = ""
    """Why else the weights are restricted (registry key ``use_note``), e.g. training-data licences."""

    @property
    def path(self) -> Path:
        base = self.registry_path.parent if self.registry_path else Path(".")
        return (base / self.file).resolve()

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.version, self.sha256, self.phantom_trained, str(self.path),
                         self.clinical_use, self.use_note)

    def verify(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(f"model {self.name!r}: weights file {self.path} does not exist")
        actual = sha256_file(self.path)
        if actual != self.sha256:
            raise ValueError(f"model {self.name!r}: sha256 of {self.path} is {actual}, registry says {self.sha256}; the weights "
                             "file is damaged or not the one the registry names: restore it or fix the registry entry")

    @classmethod
    def load(cls, registry_path: Path) -> "RegistryEntry":
        registry_path = Path(registry_path)
        try:
            data = json.loads(registry_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"model registry {registry_path} cannot be read: {exc}") from exc
        missing = [k for k in ("name", "version", "file", "sha256", "phantom_trained") if k not in data]
        if missing:
            raise ValueError(f"model registry {registry_path} lacks {', '.join(missing)}")
        known = {"name", "version", "file", "sha256", "phantom_trained", "clinical_use", "use_note"}
        return cls(
            name=data["name"],
            version=str(data["version"]),
            file=data["file"],
            sha256=data["sha256"],
            phantom_trained=bool(data["phantom_trained"]),
            clinical_use=bool(data.get("clinical_use", False)),
            use_note=str(data.get("use_note", "")),
            extra={k: v for k, v in data.items() if k not in known},
            registry_path=registry_path,
        )

    def save(self, registry_path: Path) -> None:
        data = {
            "name": self.name,
            "version": self.version,
            "file": self.file,
            "sha256": self.sha256,
            "phantom_trained": self.phantom_trained,
            **({"clinical_use": True} if self.clinical_use else {}),
            **({"use_note": self.use_note} if self.use_note else {}),
            **self.extra,
        }
        Path(registry_path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------
# Running an analysis: select -> analyze -> encode
# ---------------------------------------------------------------------------


@dataclass
class AnalysisContext:
    """What turning a result into DICOM objects needs: the node's identity and the analyzer's SR template."""

    encoder: "EncoderContext"
    template: "Template | None" = None
    """The analyzer's SR template; loaded from ``sr_templates/<analyzer>.yaml`` when None."""


@dataclass
class Analysis:
    """One study analysed: the result, its DICOM objects (SR first), the seconds ``analyze`` and encoding took."""

    result: AnalysisResult
    datasets: list["pydicom.Dataset"]
    analyze_seconds: float
    encode_seconds: float = 0.0


def run_analysis(analyzer: Analyzer, study: Study, context: AnalysisContext) -> Analysis:
    """Select the series, analyze them and encode the result: the one path from a study to result objects.

    Raises
    ------
    NotApplicable
        When the analyzer cannot judge the study (the message says why).
    Exception
        Whatever the analyzer or the encoders raise for input they could not handle.
    """
    (out,) = run_analyses(analyzer, [study], context)
    if isinstance(out, Exception):
        raise out
    return out


def run_analyses(analyzer: Analyzer, studies: Sequence[Study], context: AnalysisContext) -> list["Analysis | Exception"]:
    """:func:`run_analysis` for several studies, through :meth:`Analyzer.analyze_batch` together.

    Returns one :class:`Analysis` or exception per study, in order; one study's exception
    concerns that study only.
    """
    from .encoders import encode_result

    out: list[Analysis | Exception | None] = [None] * len(studies)
    ready: list[tuple[int, list[Series]]] = []
    for k, study in enumerate(studies):
        try:
            ready.append((k, analyzer.select(study)))
        except Exception as exc:
            out[k] = exc
    if ready:
        t0 = time.monotonic()
        try:
            results = analyzer.analyze_batch([inputs for _, inputs in ready])
            if len(results) != len(ready):
                raise RuntimeError(f"{analyzer.name}.analyze_batch returned {len(results)} results for {len(ready)} studies")
        except Exception as exc:
            results = [exc] * len(ready)
        seconds = time.monotonic() - t0
        for (k, _), result in zip(ready, results):
            if isinstance(result, Exception):
                out[k] = result
                continue
            try:
                result.check_against(studies[k])
                t1 = time.monotonic()
                datasets = encode_result(result, studies[k], context.encoder, context.template)
                out[k] = Analysis(result, datasets, seconds, time.monotonic() - t1)
            except Exception as exc:
                out[k] = exc
    return [r if r is not None else RuntimeError("no result") for r in out]
