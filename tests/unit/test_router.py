import pytest
import yaml

from dicomnode.registry import available_analyzers
from dicomnode.router import RuleSet, RulesError, SeriesView, evaluate

RULES = yaml.safe_load("""
- name: chest
  when:
    all:
      - {Modality: {in: [CR, DX]}}
      - any:
          - {BodyPartExamined: {equals: CHEST}}
          - {ViewPosition: {in: [PA, AP]}}
  analyzers: [chest_xray_thoracic]
- name: thin-ct
  when:
    all:
      - {Modality: CT}
      - {SliceThickness: {le: 1.5}}
      - {not: {ImageType: {equals: LOCALIZER}}}
  analyzers: [ct_vertebral_fracture]
  continue: true
- name: anything-from-pacs
  when: {CallingAETitle: {regex: "^PACS"}}
  analyzers: [audit]
""")


def view(**attrs):
    calling = attrs.pop("CallingAETitle", "PACS1")
    return SeriesView("1.2.3", attrs, calling)


def test_first_match_wins_and_continue_goes_on():
    rs = RuleSet.parse(RULES)
    assert [r.name for r in rs.match(view(Modality="DX", ViewPosition="PA"))] == ["chest"]
    assert [r.name for r in rs.match(view(Modality="CT", SliceThickness=1.0, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]))] == [
        "thin-ct", "anything-from-pacs"]
    assert [r.name for r in rs.match(view(Modality="CT", SliceThickness=1.0, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))] == [
        "anything-from-pacs"]
    assert rs.match(view(Modality="MR", CallingAETitle="OTHER")) == []


def test_explanations_name_the_deciding_condition():
    rs = RuleSet.parse(RULES)
    decisions = {d.rule.name: d for d in rs.decide(view(Modality="CR", BodyPartExamined="KNEE", ViewPosition="LL"))}
    assert not decisions["chest"].matched
    assert "BodyPartExamined='KNEE' is not 'CHEST'" in decisions["chest"].reason
    assert "ViewPosition='LL' not in ['PA', 'AP']" in decisions["chest"].reason
    d = rs.decide(view(Modality="CR", ViewPosition="PA"))[0]
    assert d.matched and "ViewPosition='PA' in" in d.reason
    assert "skipped" not in repr(rs.decide(view(Modality="CR", ViewPosition="PA"))[1].reason)
    assert rs.decide(view(Modality="CR", ViewPosition="PA"))[1].skipped.startswith("an earlier rule 'chest'")


def test_numeric_comparisons_and_exists():
    assert evaluate({"SliceThickness": {"lt": 2}}, view(SliceThickness="1.25")).matched
    assert not evaluate({"SliceThickness": {"gt": 2}}, view(SliceThickness=1.25)).matched
    e = evaluate({"SliceThickness": {"ge": 2}}, view())
    assert not e.matched and "not a number" in e.reason
    assert evaluate({"BodyPartExamined": {"exists": False}}, view()).matched
    assert not evaluate({"BodyPartExamined": {"exists": True}}, view()).matched


def test_lazy_reader_supplies_attributes_not_in_the_index():
    v = SeriesView("1", {"Modality": "MR"}, None, reader=lambda kw: {"EchoTime": 95.0}.get(kw))
    assert evaluate({"EchoTime": {"gt": 80}}, v).matched


@pytest.mark.parametrize("bad, message", [
    ([{"name": "x", "when": {"Modalty": "CT"}, "analyzers": ["a"]}], "unknown attribute 'Modalty': did you mean Modality?"),
    ([{"name": "x", "when": {"Modality": "CT"}, "analyzerz": ["a"]}], "analyzerz: unknown key"),
    ([{"name": "x", "when": {"Modality": {"like": "CT"}}, "analyzers": ["a"]}], "unknown operator 'like'"),
    ([{"name": "x", "when": {"SeriesDescription": {"regex": "("}}, "analyzers": ["a"]}], "invalid regular expression"),
    ([{"name": "x", "when": {"Modality": "CT"}}], "analyzers: required key is missing"),
    ([{"name": "x", "when": {"Modality": "CT"}, "analyzers": ["a"], "stable": 3}], "unknown key"),
    ([{"name": "x", "when": {"Modality": "CT"}, "analyzers": ["a"]}] * 2, "repeated: x"),
    ({"name": "x"}, "list of rules"),
])
def test_bad_rules_are_refused_with_the_key_named(bad, message):
    with pytest.raises(RulesError, match=message.replace("(", r"\(")):
        RuleSet.parse(bad)


def test_problems_finds_unknown_names_and_unreachable_rules(tmp_path):
    rs = RuleSet.parse([
        {"name": "all-cr", "when": {"Modality": "CR"}, "analyzers": ["chest_xray_thoracic"]},
        {"name": "chest-cr", "when": {"all": [{"Modality": "CR"}, {"BodyPartExamined": "CHEST"}]}, "analyzers": ["nope"],
         "destinations": ["mars"]},
    ])
    problems = rs.problems(["chest_xray_thoracic"], ["pacs"])
    assert any("unknown analyzer 'nope'" in p for p in problems)
    assert any("unknown destination 'mars'" in p for p in problems)
    assert any("'chest-cr' is unreachable" in p for p in problems)
    rs.save(tmp_path / "rules.yaml")
    assert [r.name for r in RuleSet.load(tmp_path / "rules.yaml")] == ["all-cr", "chest-cr"]


def test_shipped_rules_file_is_valid():
    from pathlib import Path

    rs = RuleSet.load(Path(__file__).resolve().parents[2] / "config" / "rules.yaml")
    assert rs.problems(available_analyzers(), ["pacs"]) == []
    assert [r.name for r in rs.match(view(Modality="CR", SeriesDescription="DXA Images"))] == ["dxa-whole-body"]
    assert [r.name for r in rs.match(view(Modality="DX", ViewPosition="AP"))] == ["chest-xray"]
