"""A representative result of the encoder tests' fixture analyzer, on a synthetic CR image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicomnode.analysis import (
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
from analyzers.phantoms import PhantomPatient, image_dataset
from dicomnode.uids import CR_IMAGE

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "encoders"
ROWS, COLS = 256, 200


def cr_study(seed: int = 0, shape: tuple[int, int] = (ROWS, COLS)) -> Study:
    """One CR image: a bright vertical band (a 'spine') on a darker background."""
    rng = np.random.default_rng(seed)
    patient = PhantomPatient.make(rng, "enc", seed, study_description="Encoder test")
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    pixels = 600 + 300 * np.exp(-(((xx - cols / 2) / 18.0) ** 2)) + rng.normal(0, 20, (rows, cols))
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
    rows, cols = int(study.series[0].instances[0].dataset.Rows), int(study.series[0].instances[0].dataset.Columns)
    outline = [[80, 100], [120, 98], [122, 140], [78, 142]]
    heat = np.zeros((rows, cols), np.float32)
    yy, xx = np.mgrid[0:rows, 0:cols]
    heat += np.exp(-(((xx - 100) / 20.0) ** 2 + ((yy - 120) / 25.0) ** 2))
    masks = np.zeros((1, rows, cols, 2), bool)
    masks[0, 20:120, 20:70, 0] = True
    masks[0, :, 85:115, 1] = True
    return AnalysisResult(
        analyzer="fixture_spine",
        analyzer_version="1.2",
        models=[ModelInfo("fixture-net", "0.3", "ab" * 32, phantom_trained=True)],
        findings=[
            Finding("cardiomegaly", True, probability=0.83, source=src, heatmap="hm_cardio"),
            Finding("curves", ">1", probability=0.61, uncertainty=0.12, source=src, site="left_lung"),
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


def ct_study(slices: int = 6, size: int = 64, seed: int = 1) -> Study:
    """A small axial CT series with full patient geometry (one instance per slice)."""
    from dicomnode.uids import CT_IMAGE, new_uid

    rng = np.random.default_rng(seed)
    patient = PhantomPatient.make(rng, "enc", 100 + seed, study_description="Encoder test CT")
    series_uid, frame_of_reference = new_uid(), new_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (size * 0.4) ** 2
    datasets = []
    for k in range(slices):
        pixels = np.where(body, 1024 + 40, 0) + rng.integers(0, 20, (size, size))
        datasets.append(
            image_dataset(
                pixels.astype(np.uint16),
                patient=patient,
                modality="CT",
                sop_class_uid=CT_IMAGE,
                series_uid=series_uid,
                instance_number=k + 1,
                series_description="Axial",
                pixel_spacing=(0.8, 0.8),
                attributes={
                    "FrameOfReferenceUID": frame_of_reference,
                    "ImagePositionPatient": [-25.6, -25.6, 2.5 * k],
                    "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                    "SliceThickness": 2.5,
                    "RescaleSlope": 1,
                    "RescaleIntercept": -1024,
                    "PositionReferenceIndicator": "",
                    "KVP": 120,
                    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
                },
            )
        )
    return Study.from_datasets(datasets)


def ct_result(study: Study) -> AnalysisResult:
    """Per-vertebra findings on one slice, a SEG over every slice (most of them empty), a heatmap."""
    instances = study.series[0].instances
    mid = SourceRef(instances[len(instances) // 2].sop_instance_uid)
    size = int(instances[0].dataset.Rows)
    masks = np.zeros((len(instances), size, size, 1), bool)
    for k in (2, 3):
        masks[k, 20:40, 25:38, 0] = True
    heat = np.zeros((size, size), np.float32)
    heat[24:36, 26:36] = 1.0
    square = [[25, 20], [38, 20], [38, 40], [25, 40]]
    return AnalysisResult(
        analyzer="fixture_spine",
        analyzer_version="1.2",
        models=[ModelInfo("fixture-ct", "0.1", "cd" * 32, phantom_trained=True)],
        findings=[Finding("fracture", True, probability=0.91, site="L3", group="L3", source=mid, heatmap="hm_l3")],
        measurements=[Measurement("height", 18.0, "mm", site="L3", group="L3", source=mid)],
        regions=[Region("outline", "polygon", square, mid, group="L3", label="L3 outline")],
        segmentations=[Segmentation(["spine"], masks, [SourceRef(i.sop_instance_uid) for i in instances])],
        heatmaps=[Heatmap("hm_l3", "fracture", heat, mid, label="L3 fracture evidence")],
        sources=[SourceRef(i.sop_instance_uid) for i in instances],
    )
