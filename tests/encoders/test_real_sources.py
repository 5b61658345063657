"""Encoders on real-world sources from ../shared/realdata (skipped where that folder is absent).

RG1_J2KI: a MONOCHROME1 chest CR in lossy JPEG 2000 with its pixel spacing zeroed;
eCT_Supplemental: an enhanced (multi-frame) CT, so regions, SEG and heatmaps refer to frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.analysis import AnalysisResult, Finding, Heatmap, Measurement, ModelInfo, Region, Segmentation, SourceRef, Study
from dicomnode.encoders import EncoderContext, encode_result
from sr_templates.loader import load_template
from tests.encoders.checks import SEG_CLASS, check_all
from tests.encoders.results import FIXTURE_DIR

# The CR's referring physician is a one-component name; highdicom warns when copying it.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name:UserWarning")

DATA = Path(__file__).resolve().parents[3] / "shared" / "realdata" / "pydicom-data" / "data_store" / "data"


def _study(name: str) -> Study:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not available (shared real data)")
    return Study.from_datasets([pydicom.dcmread(path)], [path])


def _result(study: Study) -> AnalysisResult:
    inst = study.series[0].instances[0]
    ds = inst.dataset
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    mid = (frames + 1) // 2
    src = SourceRef(inst.sop_instance_uid, mid)
    box = [[cols * 0.3, rows * 0.3], [cols * 0.6, rows * 0.3], [cols * 0.6, rows * 0.6], [cols * 0.3, rows * 0.6]]
    masks = np.zeros((frames, rows, cols, 1), bool)
    masks[mid - 1, rows // 3 : rows // 2, cols // 3 : cols // 2, 0] = True
    heat = np.zeros((rows, cols), np.float32)
    heat[rows // 3 : rows // 2, cols // 3 : cols // 2] = 0.9
    return AnalysisResult(
        analyzer="fixture_spine",
        analyzer_version="1.2",
        models=[ModelInfo("fixture-net", "0.3", "ef" * 32, phantom_trained=True)],
        findings=[Finding("fracture", True, probability=0.7, site="L3", group="L3", source=src, heatmap="hm")],
        measurements=[Measurement("height", 20.0, "mm", site="L3", group="L3", source=src)],
        regions=[
            Region("outline", "polygon", box, src, group="L3", label="L3 outline"),
            Region("corner", "point", [box[0]], src, group="L3", label="L3 corner"),
        ],
        segmentations=[Segmentation(["spine"], masks, [SourceRef(inst.sop_instance_uid, f) for f in range(1, frames + 1)])],
        heatmaps=[Heatmap("hm", "fracture", heat, src)],
        sources=[src],
    )


@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "eCT_Supplemental.dcm"])
def test_real_source_objects_are_valid_and_read_back(name, tmp_path):
    study = _study(name)
    result = _result(study)
    template = load_template("fixture_spine", FIXTURE_DIR)
    objects = encode_result(result, study, EncoderContext(), template)
    paths = check_all(objects, result, template, study, tmp_path)
    seg = pydicom.dcmread(paths[SEG_CLASS][0])
    assert int(seg.NumberOfFrames) == 1  # one non-empty frame of one segment
