"""The ``spine_xray_keypoints`` analyzer: BayeRegX keypoints and mensuration on lateral spine radiographs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import structlog

from dicomnode.analysis import (
    AnalysisResult,
    Analyzer,
    AnalyzerError,
    Measurement,
    ModelInfo,
    NotApplicable,
    Outputs,
    Region,
    RegistryEntry,
    Series,
    SourceRef,
    Study,
    UncertaintyClass,
)
from dicomnode.imaging import pixel_spacing
from dicomnode.runtime import OnnxModel, resolve_entry

from . import inference, preprocess
from .constants import CERVICAL, LEVELS, LUMBAR, POINT_KEYS
from .mensuration import measure

log = structlog.get_logger("dicomnode.analyzers.spine_xray_keypoints")

WEIGHTS = Path(__file__).resolve().parent / "weights"
MODALITIES = ("CR", "DX")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")
FRONTAL_VIEWS = ("AP", "PA", "APL", "PAL", "APR", "PAR")
BODY_PARTS = {
    "CSPINE": "cervical",
    "CERVICAL SPINE": "cervical",
    "NECK": "cervical",
    "LSPINE": "lumbar",
    "LUMBAR SPINE": "lumbar",
    "LSSPINE": "lumbar",
}
_DESCRIPTION_REGION = (
    (re.compile(r"\b(C[-\s]?SPINE|CERVICAL|HWS)\b", re.I), "cervical"),
    (re.compile(r"\b(L[-\s]?SPINE|LUMBAR|LWS|LUMBOSACRAL)\b", re.I), "lumbar"),
)
_LATERAL_WORDS = re.compile(r"\b(LAT|LATERAL|LL|RL)\b", re.I)

MEASUREMENT_UNITS = {
    "anterior_vertebral_height": "mm",
    "posterior_vertebral_height": "mm",
    "anterior_disc_height": "mm",
    "posterior_disc_height": "mm",
    "intervertebral_angle": "deg",
    "sagittal_translation": "mm",
    "sagittal_translation_percent": "%",
    "lordosis": "deg",
}
LEVEL_SITES = tuple(f"{a}-{b}" for labels in (CERVICAL, LUMBAR) for a, b in zip(labels[:-1], labels[1:]))
SPAN_SITES = (f"{CERVICAL[0]}-{CERVICAL[-1]}", f"{LUMBAR[0]}-{LUMBAR[-1]}")
# Measurements of a level that belong to its upper vertebra (the one that slips).
LISTHESIS = ("sagittal_translation", "sagittal_translation_percent")
HIGH_FLAG = "depends_on_highly_uncertain_point"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        return " ".join(str(v) for v in value)
    return str(value)


def series_region(series: Series, header: Any) -> str | None:
    """``"cervical"`` / ``"lumbar"`` from BodyPartExamined, else from the series or study description."""
    part = _text(series.attributes.get("BodyPartExamined") or header.get("BodyPartExamined")).strip().upper()
    if part in BODY_PARTS:
        return BODY_PARTS[part]
    if part and part not in ("SPINE", ""):
        return None
    text = " ".join([series.description, _text(header.get("SeriesDescription")), _text(header.get("StudyDescription")), _text(header.get("ProtocolName"))])
    for pattern, region in _DESCRIPTION_REGION:
        if pattern.search(text):
            return region
    return None


def series_view(series: Series, header: Any) -> str:
    """``"lateral"``, ``"frontal"`` or ``"unknown"`` from ViewPosition, else the descriptions."""
    view = _text(series.attributes.get("ViewPosition") or header.get("ViewPosition")).strip().upper()
    if view in LATERAL_VIEWS:
        return "lateral"
    if view in FRONTAL_VIEWS:
        return "frontal"
    text = " ".join([series.description, _text(header.get("SeriesDescription"))])
    return "lateral" if _LATERAL_WORDS.search(text) else "unknown"


class SpineXrayKeypoints(Analyzer):
    """Vertebra detection, five keypoints per vertebra with uncertainty classes, and mensuration.

    Lateral cervical (C3-C7) or lumbar (L1-L5) radiographs; the region picks the model set.
    """

    name = "spine_xray_keypoints"
    version = "1.2.0"
    series_block = 3
    title = "Lateral spine radiograph keypoints with uncertainty and mensuration (BayeRegX)"
    outputs = Outputs(
        measurements=MEASUREMENT_UNITS,
        regions=(*POINT_KEYS, "vertebral_body_outline", "adjacent_endplates", "end_endplate"),
        sites=(*CERVICAL, *LUMBAR, *LEVEL_SITES, *SPAN_SITES),
    )

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._sessions: dict[str, tuple[OnnxModel, OnnxModel, OnnxModel | None, OnnxModel | None, RegistryEntry]] = {}

    # -- models ---------------------------------------------------------------

    def _entries(self, region: str) -> tuple[RegistryEntry, RegistryEntry, RegistryEntry | None, RegistryEntry | None]:
        det = resolve_entry(self.settings, f"spine_xray_detector_{region}", WEIGHTS / f"spine_xray_detector_{region}.json")
        kp = resolve_entry(self.settings, f"spine_xray_keypoints_{region}", WEIGHTS / f"spine_xray_keypoints_{region}.json")
        # the thresholds were calibrated with the body model the keypoint entry names, so it comes with
        # them: by default from the keypoint entry's own folder
        body_name = kp.extra.get("body_model")
        body = resolve_entry(self.settings, body_name, Path(kp.path).parent / f"{body_name}.json") if body_name else None
        corner_name = kp.extra.get("corner_model") if body is not None else None
        corner = resolve_entry(self.settings, corner_name, Path(kp.path).parent / f"{corner_name}.json") if corner_name else None
        return det, kp, body, corner

    def _models(self, region: str) -> tuple[OnnxModel, OnnxModel, OnnxModel | None, OnnxModel | None, RegistryEntry]:
        if region not in self._sessions:
            det, kp, body, corner = self._entries(region)
            shape = tuple(kp.extra.get("crop_shape", preprocess.CROP_SHAPE))
            size = int(det.extra.get("input_size", preprocess.DETECTOR_SIZE))
            body_shape = tuple(body.extra.get("crop_shape", preprocess.BODY_CROP_SHAPE)) if body is not None else preprocess.BODY_CROP_SHAPE
            corner_shape = tuple(corner.extra.get("crop_shape", preprocess.CORNER_SHAPE)) if corner is not None else preprocess.CORNER_SHAPE
            if corner is not None and (corner_shape != preprocess.CORNER_SHAPE or float(corner.extra.get("corner_half", preprocess.CORNER_HALF)) != preprocess.CORNER_HALF):
                raise AnalyzerError(
                    f"the {region} corner model expects patches {corner_shape} of half-side {corner.extra.get('corner_half')}, this analyzer makes "
                    f"{preprocess.CORNER_SHAPE} of {preprocess.CORNER_HALF}; train it with analyzers/spine_xray_keypoints/train.py --corner"
                )
            if shape != preprocess.CROP_SHAPE or size != preprocess.DETECTOR_SIZE or body_shape != preprocess.BODY_CROP_SHAPE or "tau1_mm" not in kp.extra:
                raise AnalyzerError(
                    f"models for the {region} spine expect crops {shape} (body crops {body_shape}) and detector input {size}, this analyzer makes "
                    f"{preprocess.CROP_SHAPE} ({preprocess.BODY_CROP_SHAPE}) and {preprocess.DETECTOR_SIZE}, and the keypoint registry must hold tau1_mm / tau2_mm; "
                    "train them with analyzers/spine_xray_keypoints/train.py"
                )
            body_model = OnnxModel(body, self.settings.device) if body is not None else None
            corner_model = OnnxModel(corner, self.settings.device) if corner is not None else None
            self._sessions[region] = (OnnxModel(det, self.settings.device), OnnxModel(kp, self.settings.device), body_model, corner_model, kp)
        return self._sessions[region]

    def load(self) -> None:
        for region in LEVELS:
            self._models(region)

    def models(self) -> list[ModelInfo]:
        out = []
        for region in LEVELS:
            try:
                out += [e.info() for e in self._entries(region) if e is not None]
            except ValueError as exc:
                log.warning("model_registry_unreadable", region=region, error=str(exc))
        return out

    def warmup(self) -> None:
        for region in LEVELS:
            img = np.zeros((512, 512), np.float32)
            self._predict(img, (0.3, 0.3), region, seed=0)

    # -- contract ---------------------------------------------------------------

    def select(self, study: Study) -> list[Series]:
        xr = [s for s in study.series if s.modality.upper() in MODALITIES and s.instances]
        if not xr:
            found = sorted({s.modality for s in study.series if s.modality}) or ["none"]
            raise NotApplicable(f"no CR or DX series (modalities: {', '.join(found)}); this analyzer needs a lateral cervical or lumbar spine radiograph")
        reasons = []
        for s in xr:
            header = s.first()
            region = series_region(s, header)
            if region is None:
                part = _text(header.get("BodyPartExamined")) or "not given"
                reasons.append(f"body part {part!r} is not the cervical or lumbar spine")
                continue
            view = series_view(s, header)
            if view != "lateral":
                reasons.append(f"the {region} spine view is {view} ({_text(header.get('ViewPosition')) or 'no ViewPosition'}), not lateral")
                continue
            if pixel_spacing(header) is None:
                reasons.append("the lateral spine image has no pixel spacing, so heights and distances in mm cannot be measured")
                continue
            return [s]
        raise NotApplicable(f"{reasons[0]}; this analyzer needs a lateral cervical or lumbar spine radiograph with pixel spacing")

    def analyze(self, inputs: Sequence[Series]) -> AnalysisResult:
        if not inputs:
            raise NotApplicable("no series given; this analyzer needs a lateral cervical or lumbar spine radiograph")
        series = inputs[0]
        instance = series.instances[0]
        ds = instance.dataset
        region = series_region(series, ds)
        if region is None:
            raise NotApplicable("the series is not a cervical or lumbar spine radiograph")
        img, spacing = preprocess.load_image(ds)
        seed = int(hashlib.sha256(instance.sop_instance_uid.encode()).hexdigest()[:8], 16)
        preds, kp_entry = self._predict(img, spacing, region, seed)
        labels = LEVELS[region]
        if not preds:
            raise NotApplicable(f"no {labels[0]}-{labels[-1]} vertebra was found in the image; it may not be a lateral {region} spine radiograph")
        tau1, tau2 = float(kp_entry.extra["tau1_mm"]), float(kp_entry.extra["tau2_mm"])
        source = SourceRef(instance.sop_instance_uid)
        result = self.result(sources=[source])
        rows, cols = img.shape
        classes: dict[str, list[UncertaintyClass]] = {}
        for p in preds:
            classes[p.label] = [inference.classify(float(s), tau1, tau2) for s in p.sigma_mm]
            pts = np.clip(p.points, [0.0, 0.0], [float(cols), float(rows)])
            for i, key in enumerate(POINT_KEYS):
                result.regions.append(
                    Region(key, "point", pts[i], source, group=p.label, label=f"{p.label} {key.replace('_', ' ')}", uncertainty=float(p.sigma_mm[i]), uncertainty_class=classes[p.label][i])
                )
            result.regions.append(Region("vertebral_body_outline", "polygon", pts[:4], source, group=p.label, label=f"{p.label} vertebral body"))
            for i, c in enumerate(classes[p.label]):
                if c is UncertaintyClass.HIGH:
                    result.review_reasons.append(f"{p.label} {POINT_KEYS[i].replace('_', ' ')} is highly uncertain (sigma {p.sigma_mm[i]:.1f} mm)")
        points = {p.label: p.points for p in preds}
        sigma = {p.label: p.sigma_mm for p in preds}
        for v in measure(points, spacing, region, sigma):
            flags = (HIGH_FLAG,) if any(classes[lab][i] is UncertaintyClass.HIGH for lab, i in v.depends_on) else ()
            # Listhesis is read as the upper vertebra slipping on the lower one, so it sits with that vertebra.
            group = v.group.split("-")[0] if v.key in LISTHESIS else v.group
            result.measurements.append(Measurement(v.key, float(v.value), v.unit, site=v.group, group=group, source=source, uncertainty=v.sigma, flags=flags))
        for up, lo in zip(labels[:-1], labels[1:]):
            if up in points and lo in points:
                u, l = np.clip(points[up], 0, [cols, rows]), np.clip(points[lo], 0, [cols, rows])
                line = np.array([u[2], u[3], l[0], l[1]])
                result.regions.append(Region("adjacent_endplates", "polyline", line, source, group=f"{up}-{lo}", label=f"{up}-{lo} endplates"))
        span = f"{labels[0]}-{labels[-1]}"
        if any(m.group == span for m in result.measurements):
            # Lordosis is the angle between the top vertebra's upper and the bottom one's lower endplate.
            top, bottom = np.clip(points[labels[0]], 0, [cols, rows]), np.clip(points[labels[-1]], 0, [cols, rows])
            result.regions.append(Region("end_endplate", "polyline", top[[0, 1]], source, group=span, label=f"{span} lordosis, {labels[0]} upper endplate"))
            result.regions.append(Region("end_endplate", "polyline", bottom[[3, 2]], source, group=span, label=f"{span} lordosis, {labels[-1]} lower endplate"))
        missing = [k for k in labels if k not in points]
        if missing:
            result.review_reasons.append(f"vertebra{'e' if len(missing) > 1 else ''} {', '.join(missing)} not found")
        result.review_required = bool(result.review_reasons)
        log.info("spine_xray_analyzed", sop_instance_uid=instance.sop_instance_uid, region=region, vertebrae=len(preds), review=result.review_required)
        return result

    def _predict(self, img: np.ndarray, spacing: tuple[float, float], region: str, seed: int) -> tuple[list[inference.VertebraPrediction], RegistryEntry]:
        det, kp, body, corner, kp_entry = self._models(region)
        extra = kp_entry.extra
        samples = int(self.settings.options.get("mc_samples", extra.get("mc_samples", 16)))

        def det_fn(x: np.ndarray) -> np.ndarray:
            return det(image=x)["grid"]

        def session_fn(model: OnnxModel) -> inference.KeypointFn:
            def fn(c: np.ndarray, m1: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                out = model(crops=c, mask1=m1, mask2=m2)
                return out["mean"], out["logvar"]

            return fn

        preds = inference.predict(
            img,
            spacing,
            region,
            det_fn,
            session_fn(kp),
            int(extra["hidden"]),
            float(extra["p_drop"]),
            samples=samples,
            seed=seed,
            body_fn=session_fn(body) if body is not None else None,
            corner_fn=session_fn(corner) if corner is not None else None,
            flip=bool(extra.get("flip_test_time", False)),
        )
        return preds, kp_entry

    @classmethod
    def write_phantoms(cls, out_dir: Path, n: int, seed: int) -> list[Path]:
        from .phantom import write_phantoms

        return write_phantoms(Path(out_dir), n, seed)
