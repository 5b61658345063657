"""The ``chest_xray_thoracic`` analyzer: lungs and heart, cardiothoracic ratio, thoracic findings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import structlog

from dicomnode.analysis import (
    AnalysisResult,
    Analyzer,
    AnalyzerError,
    Finding,
    Heatmap,
    Instance,
    Measurement,
    ModelInfo,
    NotApplicable,
    Outputs,
    Region,
    Segmentation,
    Series,
    SourceRef,
    Study,
)
from dicomnode.imaging import resize
from dicomnode.runtime import OnnxModel, resolve_entry

from . import inference, preprocess
from .constants import CLASSIFIER, CTR_CARDIOMEGALY, INPUT_SIZE, LABELS, SEGMENTER, SEGMENTS

log = structlog.get_logger("dicomnode.analyzers.chest_xray_thoracic")

WEIGHTS = Path(__file__).resolve().parent / "weights"
FINDING_KEYS = {label: label.lower() for label in LABELS}
"""ChestX-ray14 label -> template key (``Pleural_Thickening`` -> ``pleural_thickening``)."""
GROUP = "Chest"
"""The measurement group of the image-level findings and the cardiothoracic ratio (region: the thorax outline)."""
SEGMENT_GROUPS = {"right_lung": "Right lung", "left_lung": "Left lung", "heart": "Heart"}
REVIEW_MARGIN = 0.02
"""A probability this close to its operating point asks for a person's look."""


class ChestXrayThoracic(Analyzer):
    """Frontal chest radiograph: U-Net lungs and heart, attention DenseNet on lung/heart-weighted features.

    Options (``AnalyzerSettings.options``): ``operating_points`` maps a label
    (``"Effusion"`` or ``"effusion"``) to a probability cut that replaces the
    one stored with the weights (chosen on validation data).
    """

    name: ClassVar[str] = "chest_xray_thoracic"
    version: ClassVar[str] = "2.0.0"
    series_block: ClassVar[int] = 4
    batchable: ClassVar[bool] = True
    title: ClassVar[str] = "Chest radiograph: lungs, heart, cardiothoracic ratio and thoracic findings"
    outputs: ClassVar[Outputs] = Outputs(
        findings={key: "boolean" for key in FINDING_KEYS.values()},
        measurements={"cardiothoracic_ratio": "1"},
        regions=tuple(f"{s}_outline" for s in SEGMENTS) + ("thorax_outline", "heart_width", "thoracic_width"),
        segments=SEGMENTS,
    )

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._seg: OnnxModel | None = None
        self._cls: OnnxModel | None = None

    # -- models -------------------------------------------------------------

    def _entries(self):
        return (
            resolve_entry(self.settings, SEGMENTER, WEIGHTS / f"{SEGMENTER}.json"),
            resolve_entry(self.settings, CLASSIFIER, WEIGHTS / f"{CLASSIFIER}.json"),
        )

    def load(self) -> None:
        if self._seg is not None and self._cls is not None:
            return
        seg_entry, cls_entry = self._entries()
        for entry in (seg_entry, cls_entry):
            size = int(entry.extra.get("input_size", INPUT_SIZE))
            if size != INPUT_SIZE:
                raise AnalyzerError(f"model {entry.name!r} expects {size}-pixel input; this analyzer feeds {INPUT_SIZE}")
        segments = tuple(seg_entry.extra.get("segments", ()))
        if segments != SEGMENTS:
            raise AnalyzerError(f"model {seg_entry.name!r} does not output one probability per structure {SEGMENTS}; "
                                "retrain it with python -m analyzers.chest_xray_thoracic.train")
        labels = tuple(cls_entry.extra.get("labels", LABELS))
        if labels != LABELS:
            raise AnalyzerError(f"model {cls_entry.name!r} outputs labels {labels}; the analyzer needs the 14 ChestX-ray14 labels in order {LABELS}")
        self._seg = OnnxModel(seg_entry, self.settings.device)
        self._cls = OnnxModel(cls_entry, self.settings.device)

    def models(self) -> list[ModelInfo]:
        if self._seg is not None and self._cls is not None:
            return [self._seg.entry.info(), self._cls.entry.info()]
        return [e.info() for e in self._entries()]

    def warmup(self) -> None:
        self.load()
        x = np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), np.float32)
        self._seg(image=x)
        self._cls(image=x, mask=np.ones((1, 1, INPUT_SIZE, INPUT_SIZE), np.float32))

    def operating_points(self) -> dict[str, float]:
        """Probability cut per label the classifier judges: configured, else stored with the weights, else 0.5."""
        self.load()
        extra = self._cls.entry.extra
        ops = {k: float(v) for k, v in (extra.get("operating_points") or {}).items()}
        by_key = {v: k for k, v in FINDING_KEYS.items()}
        for k, v in (self.settings.options.get("operating_points") or {}).items():
            label = k if k in FINDING_KEYS else by_key.get(str(k))
            if label is None:
                raise AnalyzerError(f"operating_points names {k!r}, which is not one of the 14 labels ({', '.join(LABELS)})")
            ops[label] = float(v)
        return {label: ops.get(label, 0.5) for label in self.classified_labels()}

    def classified_labels(self) -> tuple[str, ...]:
        """Labels whose finding comes from the classifier's probability."""
        self.load()
        return tuple(l for l in LABELS if l in set(self._cls.entry.extra.get("evaluated_labels", ())) and l != "Cardiomegaly")

    def evaluated_labels(self) -> tuple[str, ...]:
        """Every label this analyzer reports: the classifier's and Cardiomegaly, from the cardiothoracic ratio."""
        return tuple(l for l in LABELS if l in set(self.classified_labels()) | {"Cardiomegaly"})

    # -- contract -----------------------------------------------------------

    def select(self, study: Study) -> list[Series]:
        usable, reasons = [], []
        for series in study.series:
            try:
                self._frontal_instance(series)
                usable.append(series)
            except NotApplicable as exc:
                reasons.append(str(exc))
        if not usable:
            if len(set(reasons)) == 1:
                raise NotApplicable(reasons[0])
            raise NotApplicable("no frontal chest CR/DX image in the study; " + "; ".join(sorted(set(reasons))))

        def rank(series: Series) -> tuple[int, int]:
            view = str(self._frontal_instance(series).header().get("ViewPosition", "") or "").upper()
            return ({"PA": 0, "AP": 1}.get(view, 2), -len(series.instances))

        return sorted(usable, key=rank)[:1]

    @staticmethod
    def _frontal_instance(series: Series) -> Instance:
        if not series.instances:
            raise NotApplicable(f"series {series.series_instance_uid} has no instances")
        first_reason = None
        for inst in series.instances:
            try:
                preprocess.check_header(inst.header())
                return inst
            except NotApplicable as exc:
                first_reason = first_reason or str(exc)
        raise NotApplicable(first_reason or "no usable image")

    def analyze(self, inputs: Sequence[Series]) -> AnalysisResult:
        (out,) = self.analyze_batch([inputs])
        if isinstance(out, Exception):
            raise out
        return out

    def analyze_batch(self, batch: Sequence[Sequence[Series]]) -> list[AnalysisResult | Exception]:
        """Several studies through the U-Net together, then through the classifier together.

        Each study's own steps (reading, masks, gates, result) run per study, so a study that
        cannot be analysed gives its exception in its place and the others go on.
        """
        out: list[AnalysisResult | Exception | None] = [None] * len(batch)
        prepared = []
        for k, inputs in enumerate(batch):
            try:
                if not inputs:
                    raise NotApplicable("no series given; this analyzer needs a frontal chest radiograph")
                inst = self._frontal_instance(inputs[0])
                prepared.append((k, inst, preprocess.prepare(inst.dataset)))
            except Exception as exc:
                out[k] = exc
        if prepared:
            self.load()
            stage = []
            seg_probs = inference.segment(self._seg, np.stack([prep.net_input for _, _, prep in prepared]))
            for (k, inst, prep), prob in zip(prepared, seg_probs):
                try:
                    stage.append((k, inst, prep, *self._masks(prep, prob), inference.classifier_mask(prob)))
                except Exception as exc:
                    out[k] = exc
            if stage:
                probs, evidence = inference.classify(self._cls, np.stack([s[2].net_input for s in stage]), np.concatenate([s[-1] for s in stage]))
                for j, (k, inst, prep, masks, geometry, verdict, _) in enumerate(stage):
                    try:
                        out[k] = self._result(inst, prep, masks, geometry, verdict, probs[j], evidence[j])
                    except Exception as exc:
                        out[k] = exc
        return [r if r is not None else AnalyzerError("no result") for r in out]

    @staticmethod
    def _masks(prep: Any, prob: np.ndarray) -> tuple[np.ndarray, inference.CtrGeometry | None, inference.Verdict]:
        """Cleaned full-size masks, the CTR geometry and the gates' verdict; NotApplicable when no lungs are found."""
        _, masks = inference.full_masks(prob, prep.display.shape)
        geometry = inference.ctr_geometry(masks)
        verdict = inference.plausibility(prob, masks, geometry, prep.display)
        if verdict.decline:
            raise NotApplicable(verdict.decline)
        return masks, geometry, verdict

    def _result(self, inst: Instance, prep: Any, masks: np.ndarray, geometry: inference.CtrGeometry | None,
                verdict: inference.Verdict, probs: np.ndarray, evidence: np.ndarray) -> AnalysisResult:
        src = SourceRef(inst.sop_instance_uid, 1)
        rows, cols = prep.display.shape
        review = list(verdict.withhold)
        withheld = bool(verdict.withhold)
        if withheld:
            review.append("findings and the cardiothoracic ratio are withheld until a person has looked at the segmentation")

        findings, heatmaps = [], []
        ops = self.operating_points()
        for i, label in enumerate(LABELS):
            key = FINDING_KEYS[label]
            if withheld or (label not in ops and label != "Cardiomegaly"):
                findings.append(Finding(key=key, value=None, group=GROUP, source=src))
                continue
            if label == "Cardiomegaly" and label not in ops:
                # from the measured cardiothoracic ratio, not from the classifier
                findings.append(Finding(key=key, value=bool(geometry.ctr > CTR_CARDIOMEGALY), group=GROUP, source=src))
                continue
            p = float(probs[i])
            present = p >= ops[label]
            hm_key = None
            if present:
                hm_key = f"{key}_evidence"
                data = np.clip(resize(evidence[i], (rows, cols), order=1), 0.0, 1.0).astype(np.float32)
                heatmaps.append(Heatmap(key=hm_key, finding=key, data=data, source=src, label=f"{label.replace('_', ' ')} evidence"))
            if abs(p - ops[label]) < REVIEW_MARGIN:
                review.append(f"{label.replace('_', ' ')} probability {p:.2f} is close to its operating point {ops[label]:.2f}")
            findings.append(Finding(key=key, value=bool(present), probability=inference.round_sig(p), group=GROUP, source=src, heatmap=hm_key))

        measurements, regions = [], []
        thorax = inference.outline(_convex_fill(masks.any(0)))
        if thorax is None:
            raise AnalyzerError("no thorax outline could be traced although lung fields were found")
        regions.append(Region(key="thorax_outline", kind="polygon", points=thorax, source=src, group=GROUP, label="Thorax outline"))
        if geometry is not None and not withheld:
            measurements.append(Measurement(key="cardiothoracic_ratio", value=inference.round_sig(geometry.ctr), unit="1", group=GROUP, source=src))
            regions.append(Region(key="heart_width", kind="polyline", points=geometry.heart_line, source=src, group=GROUP, label="Heart width"))
            regions.append(Region(key="thoracic_width", kind="polyline", points=geometry.thorax_line, source=src, group=GROUP, label="Thoracic width"))
        for name, m in zip(SEGMENTS, masks):
            pts = inference.outline(m)
            if pts is not None:
                regions.append(Region(key=f"{name}_outline", kind="polygon", points=pts, source=src, group=SEGMENT_GROUPS[name],
                                      label=f"{SEGMENT_GROUPS[name]} outline"))
        if len(regions) < 1 + len(SEGMENTS) + (2 if measurements else 0):
            review.append("not every lung/heart outline could be traced")

        seg = Segmentation(segments=list(SEGMENTS), masks=masks.transpose(1, 2, 0)[None].copy(), sources=[src])
        log.info("analyzed", sop_instance_uid=inst.sop_instance_uid, present=[f.key for f in findings if f.value],
                 ctr=round(geometry.ctr, 3) if geometry else None, withheld=withheld, review=len(review))
        return self.result(
            findings=findings,
            measurements=measurements,
            regions=regions,
            segmentations=[seg],
            heatmaps=heatmaps,
            review_required=bool(review),
            review_reasons=review,
            sources=[src],
        )

    @classmethod
    def write_phantoms(cls, out_dir: Path, n: int, seed: int) -> list[Path]:
        from .phantom import write_phantoms

        return write_phantoms(Path(out_dir), n, seed)


def _convex_fill(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a 2-D mask, filled (the thorax outline around both lungs and the heart)."""
    from PIL import Image, ImageDraw
    from scipy.spatial import ConvexHull, QhullError

    pts = np.argwhere(mask)
    if len(pts) < 3:
        return mask
    try:
        hull = pts[ConvexHull(pts).vertices]
    except QhullError:
        return mask
    img = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(img).polygon([(float(c), float(r)) for r, c in hull], fill=1)
    return np.asarray(img, bool) | mask


def analyze_files(paths: Sequence[Path], analyzer: ChestXrayThoracic | None = None) -> AnalysisResult:
    """Convenience for scripts: analyze DICOM files of one study."""
    import pydicom

    paths = [Path(p) for p in paths]
    study = Study.from_datasets([pydicom.dcmread(p, force=True) for p in paths], paths)
    a = analyzer or ChestXrayThoracic()
    return a.analyze(a.select(study))
