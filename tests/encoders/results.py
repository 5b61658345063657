"""A representative result of the encoder tests' fixture analyzer, on a synthetic CR image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analyzers.base import (
    AnalysisResult,
    Finding,
    Heatmap,
    Measurement,
    ModelInfo,
    Region,
    Segmentation,
    SourceRef,
    Study,
    UncertaintyClass,
)
from analyzers.phantoms import CR_IMAGE, PhantomPatient, image_dataset

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "encoders"
ROWS, COLS = 256, 200


def cr_study(seed: int = 0) -> Study:
    """One CR image: a bright vertical band (a 'spine') on a darker background."""
    rng = np.random.default_rng(seed)
    patient = PhantomPatient.make(rng, "enc", seed, study_description="Encoder test")
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    pixels = 600 + 300 * np.exp(-(((xx - COLS / 2) / 18.0) ** 2)) + rng.normal(0, 20, (ROWS, COLS))
    ds = image_dataset(
        np.clip(pixels, 0, 4095).astype(np.uint16),
        patient=patient,
        modality="CR",
        sop_class_uid=CR_IMAGE,
        pixel_spacing=(0.5, 0.5),
        series_description="Lateral spine",
        attributes={"BodyPartExamined": "SPINE", "ViewPosition": "LL"},
    )
    return Study.from_datasets([ds])


def fixture_result(study: Study) -> AnalysisResult:
    uid = study.series[0].instances[0].sop_instance_uid
    src = SourceRef(uid)
    outline = [[80, 100], [120, 98], [122, 140], [78, 142]]
    heat = np.zeros((ROWS, COLS), np.float32)
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    heat += np.exp(-(((xx - 100) / 20.0) ** 2 + ((yy - 120) / 25.0) ** 2))
    masks = np.zeros((1, ROWS, COLS, 2), bool)
    masks[0, 20:120, 20:70, 0] = True
    masks[0, :, 85:115, 1] = True
    return AnalysisResult(
        analyzer="fixture_spine",
        analyzer_version="1.2",
        models=[ModelInfo("fixture-net", "0.3", "ab" * 32, phantom_trained=True)],
        findings=[
            Finding("cardiomegaly", True, probability=0.83, source=src, heatmap="hm_cardio"),
            Finding("curves", ">1", probability=0.61, uncertainty=0.12, source=src),
            Finding("fracture", False, probability=0.07, site="L3", group="L3"),
            Finding("pneumothorax", None),
        ],
        measurements=[
            Measurement("height", 21.4, "mm", site="L3", group="L3", source=src, uncertainty=0.8,
                        flags=("depends_on_highly_uncertain_point",)),
            Measurement("cobb", 12.5, "deg", group="curve", source=src, uncertainty=2.0),
        ],
        regions=[
            Region("outline", "polygon", outline, src, group="L3", label="L3 outline"),
            Region("corner", "point", [outline[0]], src, group="L3", label="L3 anterior-superior",
                   uncertainty=1.1, uncertainty_class=UncertaintyClass.CERTAIN),
            Region("corner", "point", [outline[2]], src, group="L3", label="L3 posterior-inferior",
                   uncertainty=3.5, uncertainty_class=UncertaintyClass.HIGH),
            Region("curve_line", "polyline", [[100, 20], [104, 120], [98, 230]], src, group="curve", label="Midline"),
        ],
        segmentations=[Segmentation(["left_lung", "spine"], masks, [src])],
        heatmaps=[Heatmap("hm_cardio", "cardiomegaly", heat / heat.max(), src)],
        review_required=True,
        review_reasons=["L3 posterior-inferior corner is highly uncertain"],
        sources=[src],
    )
