"""The --match mini-language, durations and one-line condition descriptions of the admin CLI."""

import pytest

from dicomnode.admin import AdminError
from dicomnode.admin.durations import parse_duration
from dicomnode.admin.match import condition_of, describe, parse_match
from dicomnode.router import SeriesView, evaluate


@pytest.mark.parametrize("expr, cond", [
    ("Modality=CR", {"Modality": {"equals": "CR"}}),
    (" Modality = CR ", {"Modality": {"equals": "CR"}}),
    ("Modality!=CT", {"not": {"Modality": {"equals": "CT"}}}),
    ("BodyPartExamined in CHEST,THORAX", {"BodyPartExamined": {"in": ["CHEST", "THORAX"]}}),
    ("BodyPartExamined in CHEST, THORAX,", {"BodyPartExamined": {"in": ["CHEST", "THORAX"]}}),
    ("SeriesDescription ~ (?i)lat", {"SeriesDescription": {"regex": "(?i)lat"}}),
    ("SeriesDescription~a=b", {"SeriesDescription": {"regex": "a=b"}}),
    ("SliceThickness <= 1.5", {"SliceThickness": {"le": 1.5}}),
    ("Rows>512", {"Rows": {"gt": 512}}),
    ("Rows >= -1", {"Rows": {"ge": -1}}),
    ("Rows<2", {"Rows": {"lt": 2}}),
    ("ViewPosition?", {"ViewPosition": {"exists": True}}),
    ("!BodyPartExamined?", {"BodyPartExamined": {"exists": False}}),
    ("CallingAETitle=PACS", {"CallingAETitle": {"equals": "PACS"}}),
    ("StationName='CT 1'", {"StationName": {"equals": "CT 1"}}),
    ("SeriesNumber=3", {"SeriesNumber": {"equals": 3}}),
])
def test_match_forms_become_rule_conditions(expr, cond):
    assert parse_match(expr) == cond


@pytest.mark.parametrize("expr, words", [
    ("Modalty=CR", "did you mean Modality"),
    ("NotAKeywordAtAll=1", "unknown attribute 'NotAKeywordAtAll'"),
    ("Modality", "write Key=Value"),
    ("Modality=", "give a value"),
    ("Rows > many", "needs a number"),
    ("SeriesDescription ~ (unclosed", "invalid regular expression"),
    ("Modality in ,", "list the values"),
    ("__import__('os')=1", "write Key=Value"),
])
def test_bad_match_is_refused_with_the_expression_named(expr, words):
    with pytest.raises(AdminError) as e:
        parse_match(expr)
    assert words in str(e.value) and repr(expr) in str(e.value)


def test_several_matches_are_anded_and_evaluate_as_written():
    cond = condition_of(["Modality=CR", "BodyPartExamined in CHEST,THORAX", "SeriesDescription ~ (?i)lat", "!ViewPosition?"])
    assert list(cond) == ["all"] and len(cond["all"]) == 4
    yes = SeriesView("1", {"Modality": "CR", "BodyPartExamined": "THORAX", "SeriesDescription": "Chest LAT"})
    no = SeriesView("1", {"Modality": "CR", "BodyPartExamined": "THORAX", "SeriesDescription": "Chest PA"})
    assert evaluate(cond, yes).matched
    e = evaluate(cond, no)
    assert not e.matched and "does not match /(?i)lat/" in e.reason
    assert condition_of(["Modality=CR"]) == {"Modality": {"equals": "CR"}}
    with pytest.raises(AdminError):
        condition_of([])


def test_numbers_compare_numerically_and_not_equal_negates():
    assert evaluate(parse_match("SliceThickness<=1.5"), SeriesView("1", {"SliceThickness": "1.25"})).matched
    assert not evaluate(parse_match("SliceThickness<=1.5"), SeriesView("1", {"SliceThickness": 3})).matched
    assert evaluate(parse_match("Modality!=CT"), SeriesView("1", {"Modality": "MR"})).matched
    assert not evaluate(parse_match("Modality!=CT"), SeriesView("1", {"Modality": "ct"})).matched


def test_describe_reads_like_the_rule():
    cond = {"all": [{"Modality": {"in": ["CR", "DX"]}},
                    {"any": [{"BodyPartExamined": {"equals": "CHEST"}}, {"ViewPosition": {"exists": False}}]},
                    {"not": {"SeriesDescription": {"regex": "lat"}}}]}
    assert describe(cond) == "Modality in [CR, DX] and (BodyPartExamined=CHEST or ViewPosition absent) and not (SeriesDescription ~ /lat/)"
    assert describe({"Modality": "CT"}) == "Modality=CT"
    assert describe({"Rows": {"ge": 512}}) == "Rows>=512"


@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 1209600),
                                           ("7", 7 * 86400), ("1.5h", 5400), (" 10 D ", 864000)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "30 days", "-1d", "1y"])
def test_bad_durations(text):
    with pytest.raises(AdminError, match="30d, 12h, 90m"):
        parse_duration(text)
