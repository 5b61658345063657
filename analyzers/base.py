"""The analyzer contract.

An analyzer looks at the series of one study that it can use and returns an
:class:`AnalysisResult`. It never touches the network, the job queue or DICOM
encoding: the node turns results into SR / SEG / SC / GSPS objects using the
analyzer's template in ``sr_templates/<name>.yaml``.

Every output item carries a *key* that names it in the analyzer's declared
:class:`Outputs` and in its SR template, where the coded concept, value set and
unit live. Image coordinates are (column, row) in pixels of the referenced
source frame, with (0, 0) at the top-left corner of the top-left pixel, as in
DICOM SCOORD.

Analyzers are discovered through the ``dicomnode.analyzers`` entry-point group,
so a third party can ship one as its own package.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Literal, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pydicom


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
        self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
        need = {"point": (1, 1), "polyline": (2, None), "polygon": (3, None)}[self.kind]
        n = len(self.points)
        if n < need[0] or (need[1] is not None and n > need[1]):
            raise ValueError(f"region {self.key!r}: a {self.kind} needs {need[0]}{'' if need[1] else '+'} points, got {n}")
        if not np.all(np.isfinite(self.points)):
            raise ValueError(f"region {self.key!r}: points must be finite")


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
        if self.masks.ndim != 4:
            raise ValueError(f"segmentation masks must be 4-D (frames, rows, columns, segments), got shape {self.masks.shape}")
        if self.masks.shape[0] != len(self.sources):
            raise ValueError(f"segmentation has {self.masks.shape[0]} mask frames but {len(self.sources)} sources")
        if self.masks.shape[3] != len(self.segments):
            raise ValueError(f"segmentation has {self.masks.shape[3]} mask channels but {len(self.segments)} segments")


@dataclass
class Heatmap:
    """Evidence map for one finding, same size as the source frame, values in [0, 1]."""

    key: str
    finding: str
    data: np.ndarray
    source: SourceRef
    label: str = ""


@dataclass
class ModelInfo:
    """What produced a result: the registry entry of the weights in use."""

    name: str
    version: str
    sha256: str
    phantom_trained: bool
    path: str = ""

    @property
    def not_for_clinical_use(self) -> bool:
        return self.phantom_trained


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

    @property
    def not_for_clinical_use(self) -> bool:
        return any(m.not_for_clinical_use for m in self.models)

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
        return AnalysisResult(analyzer=self.name, analyzer_version=self.version, models=self.models(), **kwargs)


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

    @property
    def path(self) -> Path:
        base = self.registry_path.parent if self.registry_path else Path(".")
        return (base / self.file).resolve()

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.version, self.sha256, self.phantom_trained, str(self.path))

    def verify(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(f"model {self.name!r}: weights file {self.path} does not exist")
        actual = sha256_file(self.path)
        if actual != self.sha256:
            raise ValueError(f"model {self.name!r}: sha256 of {self.path} is {actual}, registry says {self.sha256}")

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
        known = {"name", "version", "file", "sha256", "phantom_trained"}
        return cls(
            name=data["name"],
            version=str(data["version"]),
            file=data["file"],
            sha256=data["sha256"],
            phantom_trained=bool(data["phantom_trained"]),
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
            **self.extra,
        }
        Path(registry_path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@functools.lru_cache(maxsize=None)
def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="dicomnode.analyzers")}


def available_analyzers() -> list[str]:
    """Names of the installed analyzers (entry-point group ``dicomnode.analyzers``)."""
    return sorted(_entry_points())


def analyzer_class(name: str) -> type[Analyzer]:
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise KeyError(f"unknown analyzer {name!r}; installed analyzers: {known}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Analyzer)):
        raise TypeError(f"entry point {name!r} does not name an Analyzer subclass")
    return cls
