"""The ``spine_mri_grading`` analyzer: SpineNet vertebra labelling and per-disc radiological gradings on sagittal lumbar T2 MR."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import structlog

from analyzers.volume import assemble, series_plane
from dicomnode.analysis import (
    AnalysisResult,
    Analyzer,
    AnalyzerError,
    Finding,
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

from . import inference, preprocess
from .constants import CORNER_SIZE, DETECTOR_SIZE, DISC_SHAPE, DISC_SLICES, GRADINGS, LEVELS, VERTEBRAE

log = structlog.get_logger("dicomnode.analyzers.spine_mri_grading")

WEIGHTS = Path(__file__).resolve().parent / "weights"
MODEL_NAMES = ("spine_mri_detector", "spine_mri_corners", "spine_mri_grading")
_LUMBAR = re.compile(r"\b(L[-\s]?SPINE|LUMBAR|LWS|LUMBOSACRAL|LS[-\s]?SPINE)\b", re.I)
_T2 = re.compile(r"T2(?!\*)|\bFSE\b|\bTSE\b", re.I)
_NOT_T2 = re.compile(r"\bT1\b|T1[_\s-]|STIR|\bPD\b|FLAIR|T2\*|DIXON|\bFAT\b|\bWATER\b", re.I)
LUMBAR_PARTS = ("LSPINE", "LUMBAR SPINE", "LSSPINE", "LUMBOSACRAL SPINE")
T2_MIN_TE_MS = 60.0
"""Spin-echo echo times from here on count as T2-weighted when the description says nothing."""


def probability_key(grading: str, cls: str) -> str:
    return f"p_{grading}_{cls}"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        return " ".join(str(v) for v in value)
    return str(value)


def series_is_lumbar(series: Series, header: Any) -> bool:
    part = _text(series.attributes.get("BodyPartExamined") or header.get("BodyPartExamined")).strip().upper()
    if part in LUMBAR_PARTS:
        return True
    if part and part not in ("SPINE",):
        return False
    text = " ".join([series.description, _text(header.get("SeriesDescription")), _text(header.get("StudyDescription")), _text(header.get("ProtocolName"))])
    return bool(_LUMBAR.search(text))


def series_weighting(series: Series, header: Any) -> str:
    """'T2', 'other' or 'unknown' from the description, else the echo time of a spin-echo sequence."""
    text = " ".join([series.description, _text(header.get("SeriesDescription")), _text(header.get("ProtocolName"))])
    if _NOT_T2.search(text):
        return "other"
    if re.search(r"T2", text, re.I):
        return "T2"
    te = header.get("EchoTime")
    try:
        te = float(te) if te not in (None, "") else None
    except (TypeError, ValueError):
        te = None
    if te is not None:
        return "T2" if te >= T2_MIN_TE_MS else "other"
    return "T2" if _T2.search(text) else "unknown"


class SpineMriGrading(Analyzer):
    """Vertebrae T12-S1 labelled on sagittal T2 lumbar MR and eight radiological gradings per disc (SpineNet)."""

    name = "spine_mri_grading"
    version = "0.1.0"
    title = "Lumbar spine MRI: vertebra labelling and per-disc radiological gradings (SpineNet)"
    series_block = 5
    outputs = Outputs(
        findings={g.key: ("boolean" if g.binary else g.classes) for g in GRADINGS},
        measurements={probability_key(g.key, c): "1" for g in GRADINGS for c in g.classes},
        regions=("vertebral_body_outline", "disc_outline"),
        sites=(*VERTEBRAE, *LEVELS),
    )

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._nets: tuple[OnnxModel, OnnxModel, OnnxModel, inference.ChainPrior] | None = None

    # -- models ---------------------------------------------------------------

    def _entries(self) -> list[RegistryEntry]:
        return [resolve_entry(self.settings, n, WEIGHTS / f"{n}.json") for n in MODEL_NAMES]

    def networks(self) -> tuple[inference.DetectorFn, inference.CornerFn, inference.GradingFn, inference.ChainPrior]:
        if self._nets is None:
            det, corner, grade = self._entries()
            if int(det.extra.get("input_size", 0)) != DETECTOR_SIZE or int(corner.extra.get("crop_size", 0)) != CORNER_SIZE or \
                    tuple(grade.extra.get("disc_shape", ())) != DISC_SHAPE or int(grade.extra.get("disc_slices", 0)) != DISC_SLICES:
                raise AnalyzerError(
                    f"the spine MRI models expect other input sizes than this analyzer makes (detector {DETECTOR_SIZE}, corner crops {CORNER_SIZE}, "
                    f"discs {DISC_SLICES}x{DISC_SHAPE}); train matching ones with analyzers/spine_mri_grading/train.py"
                )
            if "chain_prior" not in det.extra:
                raise AnalyzerError(f"the detector registry {det.registry_path} lacks chain_prior; train it with analyzers/spine_mri_grading/train.py")
            dev = self.settings.device
            self._nets = (OnnxModel(det, dev), OnnxModel(corner, dev), OnnxModel(grade, dev), inference.ChainPrior.from_json(det.extra["chain_prior"]))
        det_m, corner_m, grade_m, prior = self._nets
        return (lambda x: det_m(image=x)["grid"], lambda x: corner_m(crops=x)["corners"], lambda x: grade_m(discs=x)["logits"], prior)

    def load(self) -> None:
        self.networks()

    def models(self) -> list[ModelInfo]:
        try:
            return [e.info() for e in self._entries()]
        except ValueError as exc:
            log.warning("model_registry_unreadable", error=str(exc))
            return []

    def warmup(self) -> None:
        det, corner, grade, _ = self.networks()
        det(np.zeros((1, 1, DETECTOR_SIZE, DETECTOR_SIZE), np.float32))
        corner(np.zeros((1, 1, CORNER_SIZE, CORNER_SIZE), np.float32))
        grade(np.zeros((1, DISC_SLICES, *DISC_SHAPE), np.float32))

    # -- contract ---------------------------------------------------------------

    def select(self, study: Study) -> list[Series]:
        mr = [s for s in study.series if s.modality.upper() == "MR" and s.instances]
        if not mr:
            found = sorted({s.modality for s in study.series if s.modality}) or ["none"]
            raise NotApplicable(f"no MR series (modalities: {', '.join(found)}); this analyzer needs a sagittal T2-weighted lumbar spine MR series")
        reasons, candidates = [], []
        for s in mr:
            header = s.first()
            plane = series_plane(s)
            if plane != "sagittal":
                reasons.append(f"series {header.get('SeriesNumber', '?')} is {plane or 'without orientation'}, not sagittal")
                continue
            if not series_is_lumbar(s, header):
                reasons.append(f"series {header.get('SeriesNumber', '?')} is not labelled lumbar (BodyPartExamined {_text(header.get('BodyPartExamined')) or 'not given'})")
                continue
            weighting = series_weighting(s, header)
            if weighting == "other":
                reasons.append(f"series {header.get('SeriesNumber', '?')} is not T2-weighted")
                continue
            candidates.append((weighting != "T2", -len(s.instances), s))
        if not candidates:
            raise NotApplicable(f"{reasons[0]}; this analyzer needs a sagittal T2-weighted lumbar spine MR series")
        candidates.sort(key=lambda c: c[:2])
        return [candidates[0][2]]

    def predict_series(self, series: Series) -> tuple[preprocess.Canonical, inference.Prediction]:
        """The pipeline on one series: canonical volume and prediction (for the analyzer and the evaluation)."""
        vol = preprocess.canonical(assemble(series))
        det, corner, grade, prior = self.networks()
        return vol, inference.predict(vol.array, vol.pixel_mm, det, corner, grade, prior)

    def analyze(self, inputs: Sequence[Series]) -> AnalysisResult:
        if not inputs:
            raise NotApplicable("no series given; this analyzer needs a sagittal T2-weighted lumbar spine MR series")
        series = inputs[0]
        vol, pred = self.predict_series(series)
        if not pred.vertebrae:
            raise NotApplicable(f"{pred.problems[0]}; the series may not show the lumbar spine from T12 to the sacrum, "
                                "or the bundled phantom-trained models do not recognise its vertebrae")
        result = self.result(sources=list(vol.volume.sources))
        for v in pred.vertebrae.values():
            src, pts = self._to_source(vol, v.slice, v.corners)
            result.regions.append(Region("vertebral_body_outline", "polygon", pts, src, group=v.label, label=f"{v.label} vertebral body"))
        for d in pred.discs:
            up, lo = pred.vertebrae[d.level.split("-")[0]], pred.vertebrae[d.level.split("-")[1]]
            outline = np.array([up.corners[3], up.corners[2], lo.corners[1], lo.corners[0]])
            src, pts = self._to_source(vol, d.geometry.slice, outline)
            result.regions.append(Region("disc_outline", "polygon", pts, src, group=d.level, label=f"{d.level} disc"))
            withheld = d.gated is not None
            for g, p in zip(GRADINGS, d.probabilities):
                k = int(np.argmax(p))
                if withheld:
                    value: bool | str | None = None
                elif g.binary:
                    value = bool(k == 1)
                else:
                    value = g.classes[k]
                prob = float(p[1]) if g.binary else float(p[k])
                result.findings.append(Finding(g.key, value, probability=None if withheld else prob, site=d.level, group=d.level, source=src))
                if not withheld:
                    for c, pc in zip(g.classes, p):
                        result.measurements.append(Measurement(probability_key(g.key, c), float(pc), "1", site=d.level, group=d.level, source=src))
        result.review_reasons.extend(pred.problems)
        result.review_required = bool(result.review_reasons)
        log.info("spine_mri_analyzed", series_instance_uid=series.series_instance_uid, vertebrae=len(pred.vertebrae),
                 discs=len(pred.discs), review=result.review_required)
        return result

    @staticmethod
    def _to_source(vol: preprocess.Canonical, k: int, points: np.ndarray):
        src = None
        out = []
        for c, r in np.asarray(points, dtype=np.float64):
            src, sc, sr = vol.source_point(k, c, r)
            out.append((sc, sr))
        rows, cols = vol.volume.array.shape[1:]
        return src, np.clip(np.array(out), 0.0, [float(cols), float(rows)])

    @classmethod
    def write_phantoms(cls, out_dir: Path, n: int, seed: int) -> list[Path]:
        from .phantom import write_phantoms

        return write_phantoms(Path(out_dir), n, seed)
