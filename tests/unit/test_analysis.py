"""The contract's result items validate at construction, and a result is checked against its study's images."""

import numpy as np
import pytest

from analyzers.phantoms import PhantomPatient, image_dataset
from dicomnode.analysis import (
    AnalysisResult,
    Finding,
    Heatmap,
    Measurement,
    Region,
    Segmentation,
    SourceRef,
    Study,
)
from dicomnode.uids import CR_IMAGE

SRC = SourceRef("1.2.3")


@pytest.mark.parametrize("p", [-0.01, 1.01, float("nan"), float("inf")])
def test_finding_probability_must_lie_in_the_unit_interval(p):
    with pytest.raises(ValueError, match=r"finding 'effusion': probability must be (in \[0, 1\]|a finite number)"):
        Finding("effusion", True, probability=p)


def test_finding_accepts_edges_numpy_values_and_rejects_numbers_as_values():
    f = Finding("effusion", np.bool_(True), probability=np.float32(1.0), uncertainty=0.0)
    assert f.value is True and f.probability == 1.0 and isinstance(f.probability, float)
    with pytest.raises(TypeError, match="finding 'grade': value must be a bool, a category key"):
        Finding("grade", 3)
    with pytest.raises(ValueError, match="finding 'effusion': uncertainty must not be negative"):
        Finding("effusion", False, uncertainty=-0.1)
    with pytest.raises(ValueError, match="a finding needs a key"):
        Finding("", True)


def test_measurement_needs_a_unit_and_a_finite_value():
    with pytest.raises(ValueError, match="measurement 'cobb_angle': unit must be a UCUM unit"):
        Measurement("cobb_angle", 12.0, "")
    with pytest.raises(ValueError, match="measurement 'cobb_angle': unit must be a UCUM unit"):
        Measurement("cobb_angle", 12.0, None)
    with pytest.raises(ValueError, match="measurement 'cobb_angle': value must be a finite number, got nan"):
        Measurement("cobb_angle", float("nan"), "deg")
    with pytest.raises(TypeError, match="measurement 'cobb_angle': value must be a number, got str"):
        Measurement("cobb_angle", "twelve", "deg")
    with pytest.raises(ValueError, match="measurement 'cobb_angle': uncertainty must not be negative"):
        Measurement("cobb_angle", 12.0, "deg", uncertainty=-1.0)
    assert Measurement("cobb_angle", np.float64(12.5), "deg").value == 12.5


def test_region_kind_is_checked():
    with pytest.raises(ValueError, match="region 'box': kind must be 'point', 'polyline' or 'polygon', got 'circle'"):
        Region("box", "circle", [[0, 0]], SRC)


def test_heatmap_must_be_a_finite_2d_map_in_the_unit_interval():
    with pytest.raises(ValueError, match=r"heatmap 'h' must be 2-D \(rows, columns\)"):
        Heatmap("h", "f", np.zeros((1, 4, 4)), SRC)
    with pytest.raises(ValueError, match="heatmap 'h' has values that are not finite"):
        Heatmap("h", "f", np.full((4, 4), np.nan), SRC)
    with pytest.raises(ValueError, match=r"heatmap 'h' has values in \[0, 2\]; evidence maps must lie in \[0, 1\]"):
        Heatmap("h", "f", np.linspace(0, 2, 16).reshape(4, 4), SRC)


def test_segmentation_values_are_checked():
    with pytest.raises(ValueError, match="binary segmentation masks must be bool or 0/1"):
        Segmentation(["lung"], np.full((1, 4, 4, 1), 0.5), [SRC])
    with pytest.raises(ValueError, match="fractional segmentation masks must be floating point"):
        Segmentation(["lung"], np.ones((1, 4, 4, 1), np.uint8), [SRC], fractional=True)
    with pytest.raises(ValueError, match=r"fractional segmentation masks must hold finite values in \[0, 1\]"):
        Segmentation(["lung"], np.full((1, 4, 4, 1), 1.5), [SRC], fractional=True)
    with pytest.raises(ValueError, match="segmentation names a segment twice"):
        Segmentation(["lung", "lung"], np.zeros((1, 4, 4, 2), bool), [SRC])
    Segmentation(["lung"], np.ones((1, 4, 4, 1), np.uint8), [SRC])
    Segmentation(["lung"], np.full((1, 4, 4, 1), 0.5, np.float32), [SRC], fractional=True)


def _study() -> tuple[Study, SourceRef]:
    ds = image_dataset(np.zeros((32, 48), np.uint16), patient=PhantomPatient.make(np.random.default_rng(0), "unit", 1),
                       modality="CR", sop_class_uid=CR_IMAGE)
    return Study.from_datasets([ds]), SourceRef(str(ds.SOPInstanceUID))


def test_masks_and_heatmaps_are_checked_against_their_source_image():
    study, src = _study()
    ok = AnalysisResult("a", "1", heatmaps=[Heatmap("h", "f", np.zeros((32, 48)), src)],
                        segmentations=[Segmentation(["s"], np.zeros((1, 32, 48, 1), bool), [src])])
    ok.check_against(study)
    wrong_heatmap = AnalysisResult("a", "1", heatmaps=[Heatmap("h", "f", np.zeros((48, 32)), src)])
    with pytest.raises(ValueError, match=r"heatmap 'h' is 32x48 \(columns x rows\) but its source .* is 48x32"):
        wrong_heatmap.check_against(study)
    wrong_mask = AnalysisResult("a", "1", segmentations=[Segmentation(["s"], np.zeros((1, 16, 48, 1), bool), [src])])
    with pytest.raises(ValueError, match=r"segmentation masks are 48x16 \(columns x rows\) but source .* is 48x32"):
        wrong_mask.check_against(study)
    elsewhere = AnalysisResult("a", "1", heatmaps=[Heatmap("h", "f", np.zeros((32, 48)), SRC)])
    with pytest.raises(ValueError, match="heatmap 'h' refers to instance 1.2.3, which is not in study"):
        elsewhere.check_against(study)


def test_series_block_and_labels_come_from_the_analyzer_class():
    from dicomnode.analysis import Analyzer
    from dicomnode.encoders import EncoderContext
    from dicomnode.encoders.common import series_description, series_number

    class Probe(Analyzer):
        name = "probe_x"
        version = "1"
        series_block = 2
        series_labels = {"SR": "report", "SEG": "SEG", "SC": "evidence", "GSPS": "marks"}

    result = Probe().result()
    assert (result.series_block, result.series_labels["SC"]) == (2, "evidence")
    ctx = EncoderContext(series_number_base=7000)
    assert series_number(ctx, result.analyzer, "SEG", result.series_block) == 7021
    assert series_description(result.analyzer, "SR", None, result.series_labels) == "AI probe_x report"
    default = AnalysisResult("probe_x", "1")
    assert 7060 <= series_number(ctx, default.analyzer, "SR", default.series_block) < 7100
    assert series_description(default.analyzer, "SC", None, default.series_labels) == "AI probe_x heatmap"
