"""The SR template loader: codes, schema errors that name the entry, checks against Outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom.sr.codedict import codes

from dicomnode.analysis import Outputs
from sr_templates.loader import TemplateError, check_private_codes, load_template, load_template_file, validate_template
from tests.encoders.results import FIXTURE_DIR

FIXTURE_OUTPUTS = Outputs(
    findings={"cardiomegaly": "boolean", "curves": ("0", "1", ">1"), "fracture": "boolean", "pneumothorax": "boolean"},
    measurements={"height": "mm", "cobb": "deg"},
    regions=("outline", "corner", "curve_line"),
    segments=("left_lung", "spine"),
    sites=("L3", "left_lung"),
)


def _copy(tmp_path: Path, edit=None) -> Path:
    path = tmp_path / "fixture_spine.yaml"
    text = (FIXTURE_DIR / "fixture_spine.yaml").read_text()
    path.write_text(edit(text) if edit else text)
    return path


def test_fixture_template_loads_and_matches_outputs():
    t = load_template("fixture_spine", FIXTURE_DIR)
    validate_template(t, FIXTURE_OUTPUTS)
    assert t.findings["cardiomegaly"].concept.value == codes.SCT.Cardiomegaly.value
    assert t.measurements["cobb"].unit_code.scheme_designator == "UCUM"
    assert t.sites["left_lung"].laterality.meaning == "Left"
    assert not t.findings["pneumothorax"].evaluated


@pytest.mark.parametrize(
    "outputs, message",
    [
        (Outputs(**{**FIXTURE_OUTPUTS.__dict__, "measurements": {"height": "mm", "cobb": "deg", "width": "mm"}}), r"measurements\.width in .*missing"),
        (Outputs(**{**FIXTURE_OUTPUTS.__dict__, "regions": ("outline", "corner")}), r"regions\.curve_line in .*not declared"),
        (Outputs(**{**FIXTURE_OUTPUTS.__dict__, "measurements": {"height": "cm", "cobb": "deg"}}), r"measurements\.height .*unit 'mm' differs"),
        (Outputs(**{**FIXTURE_OUTPUTS.__dict__, "findings": {**FIXTURE_OUTPUTS.findings, "curves": ("0", "1")}}), r"findings\.curves .*value set"),
        (Outputs(**{**FIXTURE_OUTPUTS.__dict__, "findings": {**FIXTURE_OUTPUTS.findings, "curves": "boolean"}}), r"findings\.curves .*boolean"),
    ],
)
def test_mismatch_names_key_and_file(outputs, message):
    t = load_template("fixture_spine", FIXTURE_DIR)
    with pytest.raises(TemplateError, match=message) as info:
        validate_template(t, outputs)
    assert "fixture_spine.yaml" in str(info.value)


def test_bad_codes_are_named(tmp_path):
    path = _copy(tmp_path, lambda s: s.replace("SCT.Cardiomegaly", "SCT.NoSuchThing"))
    with pytest.raises(TemplateError, match=r"findings\.cardiomegaly\.concept in .*NoSuchThing"):
        load_template_file(path)
    path = _copy(tmp_path, lambda s: s.replace("{scheme: 99DICOMNODE, value: DN-TST-0002", "{scheme: SCT, value: DN-TST-0002"))
    with pytest.raises(TemplateError, match=r"findings\.fracture\.concept .*private scheme"):
        load_template_file(path)
    path = _copy(tmp_path, lambda s: s.replace("    unit: deg\n", ""))
    with pytest.raises(TemplateError, match=r"measurements\.cobb in .*'unit' is missing"):
        load_template_file(path)


def test_property_of_must_name_another_plain_measurement(tmp_path):
    path = _copy(tmp_path, lambda s: s.replace("    unit: deg\n", "    unit: deg\n    property_of: height\n"))
    assert load_template_file(path).measurements["cobb"].property_of == "height"
    path = _copy(tmp_path, lambda s: s.replace("    unit: deg\n", "    unit: deg\n    property_of: width\n"))
    with pytest.raises(TemplateError, match=r"measurements\.cobb\.property_of in .*'width' must be another measurement"):
        load_template_file(path)


def test_key_findings_must_name_findings_or_measurements(tmp_path):
    path = _copy(tmp_path, lambda s: s.replace("\nfindings:", "\nkey_findings: [cobb, curves]\nfindings:", 1))
    assert load_template_file(path).key_findings == ["cobb", "curves"]
    path = _copy(tmp_path, lambda s: s.replace("\nfindings:", "\nkey_findings: [scoliosis]\nfindings:", 1))
    with pytest.raises(TemplateError, match=r"key_findings in .*'scoliosis' is neither a finding nor a measurement"):
        load_template_file(path)


def test_missing_template_and_wrong_analyzer_name(tmp_path):
    with pytest.raises(TemplateError, match="has no SR template"):
        load_template("nothing_here", tmp_path)
    _copy(tmp_path)
    shutil.move(tmp_path / "fixture_spine.yaml", tmp_path / "other.yaml")
    with pytest.raises(TemplateError, match="must equal the file name 'other'"):
        load_template("other", tmp_path)


def test_private_code_with_two_meanings_is_refused(tmp_path):
    a = load_template("fixture_spine", FIXTURE_DIR)
    path = _copy(tmp_path, lambda s: s.replace('meaning: "Vertebral fracture"', 'meaning: "Compression fracture"'))
    b = load_template_file(path)
    check_private_codes([a, a])
    with pytest.raises(TemplateError, match="DN-TST-0002 means 'Compression fracture' here but 'Vertebral fracture'"):
        check_private_codes([a, b])
    clash = _copy(tmp_path, lambda s: s.replace("value: DN-TST-0002", "value: DN-GEN-0001"))
    with pytest.raises(TemplateError, match="DN-GEN-0001"):
        check_private_codes([load_template_file(clash)])


def test_check_all_refuses_a_missing_template_and_a_clash_across_files(tmp_path):
    from dicomnode.registry import available_analyzers
    from sr_templates.loader import check_all

    with pytest.raises(TemplateError, match="analyzer 'no_such_analyzer' cannot be loaded"):
        check_all(tmp_path, analyzers=["no_such_analyzer"])
    names = available_analyzers()
    if not names:
        pytest.skip("no analyzer installed")
    with pytest.raises(TemplateError, match="has no SR template"):
        check_all(tmp_path, analyzers=names[:1])
    _copy(tmp_path)
    (tmp_path / "other.yaml").write_text(
        (FIXTURE_DIR / "fixture_spine.yaml").read_text().replace("analyzer: fixture_spine", "analyzer: other")
        .replace('meaning: "No curve"', 'meaning: "Straight spine"')
    )
    with pytest.raises(TemplateError, match="DN-TST-0010"):
        check_all(tmp_path, analyzers=[])
