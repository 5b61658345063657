"""The ``ct_vertebral_fracture`` analyzer: fracture probability per vertebra T1-L5 with the concepts the network used."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import structlog

from dicomnode.analysis import (
    AnalysisResult,
    Analyzer,
    Finding,
    Heatmap,
    Measurement,
    ModelInfo,
    NotApplicable,
    Outputs,
    Region,
    RegistryEntry,
    Series,
    Study,
)
from dicomnode.runtime import OnnxModel, resolve_entry

from analyzers import volume as volumes

from . import inference
from .constants import CLASSIFIER, DETECTOR, LEVELS, NAME, TOP_UNITS

log = structlog.get_logger("dicomnode.analyzers.ct_vertebral_fracture")

WEIGHTS = Path(__file__).resolve().parent / "weights"
MAX_SLICE_THICKNESS = 3.0
MIN_SLICES = 10
DISAGREEMENT_PROBABILITY = (0.1, 0.9)
"""A vertebra whose probability is above the upper bound with Genant grade 0, or below the lower with grade 2-3, goes to review."""
MEASUREMENT_UNITS = {
    "anterior_vertebral_height": "mm",
    "middle_vertebral_height": "mm",
    "posterior_vertebral_height": "mm",
    "expected_vertebral_height": "mm",
    "height_loss": "%",
    **{f"relevant_unit_{i}": "1" for i in range(1, TOP_UNITS + 1)},
    **{f"relevant_unit_{i}_relevance": "1" for i in range(1, TOP_UNITS + 1)},
}
_LOCALISER = re.compile(r"(?i)\b(scout|topogram|localizer|localiser|surview|scanogram)\b")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        return " ".join(str(v) for v in value)
    return str(value)


class CtVertebralFracture(Analyzer):
    """Vertebra localisation and labelling, a 3D U-Net fracture classifier with network dissection, heights and Genant grade."""

    name: ClassVar[str] = NAME
    version: ClassVar[str] = "0.1.0"
    series_block: ClassVar[int] = 5
    series_labels: ClassVar[dict[str, str]] = {"SR": "SR", "SEG": "SEG", "SC": "fracture units", "GSPS": "annotations"}
    title: ClassVar[str] = "CT vertebral fractures T1-L5 with interpretable detector units (Engstler et al.)"
    outputs: ClassVar[Outputs] = Outputs(
        findings={"vertebral_fracture": "boolean", "genant_grade": ("0", "1", "2", "3")},
        measurements=MEASUREMENT_UNITS,
        regions=("vertebral_body_centroid",),
        sites=LEVELS,
    )

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._models: tuple[OnnxModel, OnnxModel, RegistryEntry, inference.Dissection] | None = None

    # -- models -------------------------------------------------------------------

    def _entries(self) -> tuple[RegistryEntry, RegistryEntry]:
        return (resolve_entry(self.settings, DETECTOR, WEIGHTS / f"{DETECTOR}.json"),
                resolve_entry(self.settings, CLASSIFIER, WEIGHTS / f"{CLASSIFIER}.json"))

    def _load(self) -> tuple[OnnxModel, OnnxModel, RegistryEntry, inference.Dissection]:
        if self._models is None:
            det, cls = self._entries()
            if "dissection" not in cls.extra or "threshold" not in cls.extra:
                raise ValueError(f"classifier registry {cls.registry_path} lacks the dissection or the operating threshold; "
                                 "train it with analyzers/ct_vertebral_fracture/train.py")
            self._models = (OnnxModel(det, self.settings.device), OnnxModel(cls, self.settings.device), cls, inference.Dissection.from_extra(cls.extra))
        return self._models

    def load(self) -> None:
        self._load()

    def models(self) -> list[ModelInfo]:
        try:
            return [e.info() for e in self._entries()]
        except ValueError as exc:
            log.warning("model_registry_unreadable", error=str(exc))
            return []

    def functions(self) -> tuple[inference.DetectorFn, inference.ClassifierFn, inference.Dissection, RegistryEntry]:
        """The networks as the callables the array pipeline takes."""
        det, cls, entry, dissection = self._load()

        def detector(x: np.ndarray) -> np.ndarray:
            return det(reformat=x)["maps"]

        def classifier(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            out = cls(patch=x)
            return out["logit"], out["activations"]

        return detector, classifier, dissection, entry

    def warmup(self) -> None:
        detector, classifier, _, _ = self.functions()
        detector(np.zeros((1, 3, 64, 64), np.float32))
        classifier(np.zeros((1, 1, 96, 96, 96), np.float32))

    # -- contract -------------------------------------------------------------------

    def select(self, study: Study) -> list[Series]:
        ct = [s for s in study.series if s.modality.upper() == "CT" and s.instances]
        if not ct:
            found = sorted({s.modality for s in study.series if s.modality}) or ["none"]
            raise NotApplicable(f"no CT series (modalities: {', '.join(found)}); this analyzer needs an axial CT covering the thoracolumbar spine")
        reasons, usable = [], []
        for s in ct:
            header = s.first()
            if _LOCALISER.search(f"{s.description} {_text(header.get('ImageType'))}") or "LOCALIZER" in _text(header.get("ImageType")).upper():
                reasons.append("the CT series is a localiser")
                continue
            plane = volumes.series_plane(s)
            if plane != "axial":
                reasons.append(f"the CT series is {plane or 'without orientation'}, not axial")
                continue
            thickness = header.get("SliceThickness")
            try:
                too_thick = thickness not in (None, "") and float(thickness) > MAX_SLICE_THICKNESS
            except (TypeError, ValueError):
                too_thick = False
            if too_thick:
                reasons.append(f"the CT slices are {float(thickness):g} mm thick (at most {MAX_SLICE_THICKNESS:g} mm are needed to see endplates)")
                continue
            if len(s.instances) < MIN_SLICES:
                reasons.append(f"the CT series has {len(s.instances)} images (at least {MIN_SLICES} are needed)")
                continue
            usable.append(s)
        if not usable:
            raise NotApplicable(f"{reasons[0]}; this analyzer needs an axial CT (slices of at most 3 mm) covering the thoracolumbar spine")
        return [max(usable, key=lambda s: len(s.instances))]

    def analyze(self, inputs: Sequence[Series]) -> AnalysisResult:
        if not inputs:
            raise NotApplicable("no series given; this analyzer needs an axial CT covering the thoracolumbar spine")
        vol = volumes.assemble(inputs[0])
        if vol.plane != "axial":
            raise NotApplicable(f"the assembled stack is {vol.plane}, not axial; this analyzer needs an axial CT")
        detector, classifier, dissection, entry = self.functions()
        loc = inference.analyse(vol, detector, classifier, dissection, float(entry.extra.get("height_bias_mm", 0.0)))
        if not loc.vertebrae:
            raise NotApplicable(f"{loc.found} vertebrae were found but none is between T1 and L5; this analyzer grades the thoracolumbar spine")
        return self._result(vol, loc, float(entry.extra["threshold"]))

    def _result(self, vol: volumes.Volume, loc: inference.Localisation, threshold: float) -> AnalysisResult:
        result = self.result(sources=list(dict.fromkeys(vol.sources)))
        if vol.irregular_spacing:
            result.review_reasons.append("the slice spacing of the series is irregular")
        for v in loc.vertebrae:
            k, r, c = vol.patient_to_index(v.centroid)
            k = int(np.clip(np.rint(k), 0, vol.array.shape[0] - 1))
            source = vol.sources[k]
            rows, cols = vol.array.shape[1:]
            point = np.clip([c + 0.5, r + 0.5], 0, [cols, rows])
            result.regions.append(Region("vertebral_body_centroid", "point", point, source, group=v.label, label=f"{v.label} vertebral body"))
            fractured = v.probability >= threshold
            heat_key = None
            if fractured:
                for i, unit in enumerate(v.units, start=1):
                    sk, data = inference.slice_heatmap(vol, v, unit)
                    key = f"{v.label}_unit_{unit.index}"
                    heat_key = heat_key or key
                    concept = f" {unit.label}" if unit.label else ""
                    result.heatmaps.append(Heatmap(key, "vertebral_fracture", data, vol.sources[sk],
                                                   label=f"{v.label} unit {unit.index} (correlation rank {unit.correlation_rank}){concept}"[:64]))
                    result.measurements.append(Measurement(f"relevant_unit_{i}", float(unit.index), "1", site=v.label, group=v.label, source=source))
                    result.measurements.append(Measurement(f"relevant_unit_{i}_relevance", unit.relevance, "1", site=v.label, group=v.label, source=source))
            result.findings.append(Finding("vertebral_fracture", bool(fractured), probability=v.probability, site=v.label, group=v.label, source=source, heatmap=heat_key))
            result.findings.append(Finding("genant_grade", None if v.grade is None else str(v.grade), site=v.label, group=v.label, source=source))
            if v.heights is None:
                result.review_reasons.append(f"{v.label}: the vertebral body heights could not be read")
            else:
                for key, value in zip(("anterior_vertebral_height", "middle_vertebral_height", "posterior_vertebral_height"), v.heights.as_list()):
                    result.measurements.append(Measurement(key, value, "mm", site=v.label, group=v.label, source=source))
                result.measurements.append(Measurement("expected_vertebral_height", float(v.expected_height), "mm", site=v.label, group=v.label, source=source))
                result.measurements.append(Measurement("height_loss", 100.0 * float(v.height_loss), "%", site=v.label, group=v.label, source=source))
                lo, hi = DISAGREEMENT_PROBABILITY
                if (v.probability >= hi and v.grade == 0) or (v.probability < lo and (v.grade or 0) >= 2):
                    result.review_reasons.append(f"{v.label}: the classifier (probability {v.probability:.2f}) and the height loss (Genant grade {v.grade}) disagree")
        labels = [v.label for v in loc.vertebrae]
        missing = [lab for lab in LEVELS[LEVELS.index(labels[0]): LEVELS.index(labels[-1]) + 1] if lab not in labels]
        if missing:
            result.review_reasons.append(f"vertebra{'e' if len(missing) > 1 else ''} {', '.join(missing)} not found between {labels[0]} and {labels[-1]}")
        result.review_required = bool(result.review_reasons)
        log.info("ct_vertebral_fracture_analyzed", series_instance_uid=vol.series_instance_uid, vertebrae=len(loc.vertebrae),
                 fractured=sum(f.value is True for f in result.findings if f.key == "vertebral_fracture"), review=result.review_required)
        return result

    @classmethod
    def write_phantoms(cls, out_dir: Path, n: int, seed: int) -> list[Path]:
        from .phantom import write_phantoms

        return write_phantoms(Path(out_dir), n, seed)
