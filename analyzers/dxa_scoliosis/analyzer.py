"""Scoliosis in whole-body DXA (Jamaludin et al.): six-part segmentation, scoliosis, positioning, curves.

``select`` finds the whole-body bone image by headers and content: DXA exports
rarely say "BMD" (a GE Lunar iDXA writes Modality CR, SeriesDescription
"DXA Images", one instance per view), so every greyscale image of a
densitometry-like series is checked for a tall body from head to feet with two
legs and for bone contrast (the soft-tissue image of the same scan has little).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import structlog

from dicomnode import imaging
from dicomnode.analysis import (
    AnalysisResult,
    Analyzer,
    Finding,
    Heatmap,
    Instance,
    Measurement,
    ModelInfo,
    NotApplicable,
    Outputs,
    Region,
    RegistryEntry,
    Segmentation,
    Series,
    SourceRef,
    Study,
)
from dicomnode.runtime import OnnxModel, resolve_entry

from . import preprocess as pp
from .constants import CURVE_CLASSES, LEVELS, PARTS, SCOLIOSIS_COBB_DEG
from .inference import MaskCalibration, Prediction, deviation_mm, implausible_parts, predict, reported_curves, scored_curves

log = structlog.get_logger("dicomnode.analyzers.dxa_scoliosis")

WEIGHTS = Path(__file__).resolve().parent / "weights"
GROUP = "Spine"

DXA_MODALITIES = {"BMD", "DX", "CR", "OT"}
WHOLE_BODY_PARTS = {"WHOLEBODY", "WHOLE BODY", "TOTALBODY", "TOTAL BODY", "BODY"}
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # multi-frame greyscale byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # multi-frame greyscale word SC
}


class DxaScoliosis(Analyzer):
    """Whole-body DXA: body-part segmentation, scoliosis with a soft score, positioning, curves, Cobb estimate."""

    name = "dxa_scoliosis"
    version = "0.1.0"
    series_block = 1
    title = "Scoliosis in whole-body DXA"
    outputs = Outputs(
        findings={"scoliosis": "boolean", "positioning_error": "boolean", "curves": CURVE_CLASSES, "apex_vertebra": LEVELS, "upper_end_vertebra": LEVELS, "lower_end_vertebra": LEVELS},
        measurements={"scoliosis_score": "1", "cobb_angle": "deg", "lateral_deviation": "mm"},
        regions=("spine_midline", "apex"),
        segments=PARTS,
        sites=("spine",) + LEVELS,
    )

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self._lock = threading.Lock()
        self._seg: OnnxModel | None = None
        self._cls: OnnxModel | None = None
        self._entries: tuple[RegistryEntry, RegistryEntry] | None = None

    # -- models -------------------------------------------------------------

    def entries(self) -> tuple[RegistryEntry, RegistryEntry]:
        if self._entries is None:
            self._entries = (
                resolve_entry(self.settings, "dxa_scoliosis_seg", WEIGHTS / "dxa_scoliosis_seg.json"),
                resolve_entry(self.settings, "dxa_scoliosis_cls", WEIGHTS / "dxa_scoliosis_cls.json"),
            )
        return self._entries

    def load(self) -> None:
        with self._lock:
            if self._seg is None:
                seg, cls = self.entries()
                self._seg = OnnxModel(seg, self.settings.device)
                self._cls = OnnxModel(cls, self.settings.device)

    def models(self) -> list[ModelInfo]:
        return [e.info() for e in self.entries()]

    def warmup(self) -> None:
        self.load()
        x = np.zeros((1, 1, pp.ROWS, pp.COLS), np.float32)
        self._cls_fn(x, self._seg_fn(x))

    def _seg_fn(self, batch: np.ndarray) -> np.ndarray:
        assert self._seg is not None
        return self._seg(image=batch)["conv11"]

    def _cls_fn(self, batch: np.ndarray, soft: np.ndarray) -> dict[str, np.ndarray]:
        assert self._cls is not None
        return self._cls(image=batch, soft_mask=soft)

    # -- selection ------------------------------------------------------------

    def select(self, study: Study) -> list[Series]:
        series, inst, _, _ = self._pick(study.series)
        log.info("selected", study=study.study_instance_uid, series=series.series_instance_uid, sop=inst.sop_instance_uid)
        return [Series(series.series_instance_uid, series.modality, [inst], series.description, dict(series.attributes))]

    def _pick(self, series_list: Sequence[Series]) -> tuple[Series, Instance, np.ndarray, tuple[float, float] | None]:
        """The whole-body bone image among the series' instances, with its display pixels and spacing."""
        modalities = sorted({s.modality for s in series_list})
        candidates: list[tuple[Series, Instance]] = []
        for s in series_list:
            if s.modality.upper() not in DXA_MODALITIES:
                continue
            for inst in s.instances:
                hdr = inst.header()
                if str(hdr.get("SOPClassUID", "")) not in IMAGE_SOP_CLASSES:
                    continue
                part = str(hdr.get("BodyPartExamined", "") or "").upper().strip()
                if part and part not in WHOLE_BODY_PARTS:
                    continue
                rows, cols = int(hdr.get("Rows", 0) or 0), int(hdr.get("Columns", 0) or 0)
                spacing = imaging.pixel_spacing(hdr)
                ratio = spacing[0] / spacing[1] if spacing else 1.0
                if cols <= 0 or rows / cols * ratio < pp.MIN_ASPECT:
                    continue
                candidates.append((s, inst))
        if not candidates:
            if not any(s.modality.upper() in DXA_MODALITIES for s in series_list):
                raise NotApplicable(f"the study has no DXA or radiograph series (modalities: {', '.join(modalities) or 'none'}); this analyzer needs a whole-body DXA bone image")
            raise NotApplicable("no image of the study is a tall whole-body scan (spine, hip, knee or other views only); this analyzer needs the whole-body DXA bone image")
        best = None
        reasons = []
        for s, inst in candidates:
            ds = inst.dataset
            try:
                img = pp.display(ds)
            except NotApplicable as exc:
                reasons.append(str(exc))
                continue
            spacing = imaging.pixel_spacing(ds)
            check = pp.check_view(img, spacing)
            if not (check.whole_body and check.bone):
                reasons.append(check.reason())
                continue
            if best is None or check.bone_contrast > best[4].bone_contrast:
                best = (s, inst, img, spacing, check)
        if best is None:
            soft_only = any("soft-tissue" in r for r in reasons)
            if soft_only:
                raise NotApplicable("the study's whole-body DXA images look like soft-tissue images (little bone contrast); this analyzer needs the whole-body bone image")
            raise NotApplicable(f"no image of the study shows a whole body from head to feet ({reasons[0] if reasons else 'the pixel data cannot be read'}), and this analyzer needs the whole-body DXA bone image")
        return best[0], best[1], best[2], best[3]

    # -- analysis -------------------------------------------------------------

    def analyze(self, inputs: Sequence[Series]) -> AnalysisResult:
        series, inst, img, spacing = self._pick(inputs)
        try:
            x, norm = pp.normalise(img, spacing)
        except ValueError as exc:
            raise NotApplicable(f"the whole-body image cannot be height-normalised ({exc})") from exc
        self.load()
        seg_entry, cls_entry = self.entries()
        sigma = float(seg_entry.extra.get("midline_sigma_rows", 4.0))
        min_swing = float(seg_entry.extra.get("min_swing_deg", 4.0))
        cal = MaskCalibration.from_json(seg_entry.extra.get("mask_calibration"))
        pred = predict(x, self._seg_fn, self._cls_fn, sigma, min_swing, cal)
        odd = implausible_parts(pred.masks)
        if odd:
            raise NotApplicable(f"the image does not segment like a whole-body DXA scan ({odd}); this analyzer needs the whole-body DXA bone image")
        result = self._result(pred, norm, inst, spacing, cls_entry)
        log.info("analyzed", series=series.series_instance_uid, sop=inst.sop_instance_uid, scoliosis=bool(pred.p_scoliosis >= 0.5), review=result.review_required)
        return result

    def _result(self, pred: Prediction, norm: pp.Normalisation, inst: Instance, spacing: tuple[float, float] | None, cls_entry: RegistryEntry) -> AnalysisResult:
        src = SourceRef(inst.sop_instance_uid)
        thr_s = float(cls_entry.extra.get("scoliosis_threshold", 0.5))
        thr_p = float(cls_entry.extra.get("positioning_threshold", 0.5))
        band = cls_entry.extra.get("review_band", [0.25, 0.75])
        disagree = float(cls_entry.extra.get("cobb_disagreement_deg", 3.0))
        geo = pred.geometry
        group = GROUP if geo is not None else None
        scoliosis = pred.p_scoliosis >= thr_s
        curves_idx = int(np.argmax(pred.p_curves))
        findings = [
            Finding("scoliosis", bool(scoliosis), probability=pred.p_scoliosis, site="spine", group=group, source=src, heatmap="scoliosis_evidence"),
            Finding("positioning_error", bool(pred.p_positioning >= thr_p), probability=pred.p_positioning, group=group, source=src),
            Finding("curves", CURVE_CLASSES[curves_idx], probability=float(pred.p_curves[curves_idx]), site="spine", group=group, source=src),
        ]
        measurements = [Measurement("scoliosis_score", float(pred.p_scoliosis), "1", site="spine", group=group, source=src)]
        regions: list[Region] = []
        reasons: list[str] = []
        if band[0] <= pred.p_scoliosis <= band[1]:
            reasons.append(f"the scoliosis score {pred.p_scoliosis:.2f} is close to the decision threshold")
        if pred.p_positioning >= thr_p:
            reasons.append("positioning error: a tilted trunk, head or legs can mask or mimic a spinal curve")
        if geo is None:
            reasons.append("the spine midline could not be traced; no Cobb angle estimate")
        else:
            mm_per_px = norm.sy * spacing[0] if spacing else None
            step = max(1, len(geo.rows) // 60)
            cols, rows = norm.to_source(geo.cols[::step], geo.rows[::step])
            regions.append(Region("spine_midline", "polyline", np.stack([cols, rows], 1), src, group=GROUP, label="Spine midline"))
            # a curve is reported only where the classifier calls scoliosis and the midline shows it; each curve is its own group
            curves = reported_curves(pred.p_scoliosis, pred.p_curves, geo, thr_s)
            for k, rc in enumerate(curves, start=1):
                name = f"Curve {k}"
                measurements.append(Measurement("cobb_angle", round(rc.cobb, 1), "deg", site=rc.apex, group=name, source=src))
                findings += [
                    Finding("apex_vertebra", rc.apex, site=rc.apex, group=name, source=src),
                    Finding("upper_end_vertebra", rc.upper, site=rc.upper, group=name, source=src),
                    Finding("lower_end_vertebra", rc.lower, site=rc.lower, group=name, source=src),
                ]
                i, dev = deviation_mm(geo, rc.curve, mm_per_px or 1.0)
                ac, ar = norm.to_source(geo.cols[i : i + 1], geo.rows[i : i + 1])
                regions.append(Region("apex", "point", [[float(ac[0]), float(ar[0])]], src, group=name, label=f"Apex of curve {k} ({rc.apex}, {rc.upper}-{rc.lower}, {rc.cobb:.0f} deg)"))
                if mm_per_px is not None:
                    measurements.append(Measurement("lateral_deviation", round(dev, 1), "mm", site=rc.apex, group=name, source=src))
            n_mid = len(scored_curves(geo))
            if scoliosis and not curves:
                reasons.append("the classifier calls scoliosis but the spine midline shows no curve of 10 degrees or more; no curve is reported")
            elif scoliosis and (CURVE_CLASSES[curves_idx] == ">1") != (n_mid > 1):
                reasons.append(f"the classifier's number of curves ({CURVE_CLASSES[curves_idx]}) and the midline's ({n_mid}) disagree")
            largest = max((c.cobb for c in scored_curves(geo)), default=0.0)
            if not scoliosis and largest >= SCOLIOSIS_COBB_DEG + disagree:
                reasons.append(f"the spine midline shows a curve of {largest:.0f} degrees but the classifier calls no scoliosis; no curve is reported")
        masks = norm.back(pred.masks.astype(np.float32), order=1) > 0.5
        seg = Segmentation(list(PARTS), np.moveaxis(masks, 0, -1)[None], [src])
        # hotspots weighted by the soft score, so a scan judged normal shows faint evidence, not its own noise at full scale
        heat = np.clip(norm.back(pred.evidence[None], order=1)[0] * pred.p_scoliosis, 0.0, 1.0).astype(np.float32)
        return self.result(
            findings=findings,
            measurements=measurements,
            regions=regions,
            segmentations=[seg],
            heatmaps=[Heatmap("scoliosis_evidence", "scoliosis", heat, src, label="Scoliosis evidence")],
            review_required=bool(reasons),
            review_reasons=reasons,
            sources=[src],
        )

    @classmethod
    def write_phantoms(cls, out_dir: Path, n: int, seed: int) -> list[Path]:
        from .phantom import write_phantoms

        return write_phantoms(Path(out_dir), n, seed)
