"""Rules and configuration edits through the CLI: validated, atomic, and the rest of the file kept as written."""

import json

import pytest
import structlog
import yaml

from dicomnode.admin.rules_file import RulesFile
from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.router import RuleSet

CONFIG = """\
# site configuration (reviewed in git)
node:
  ae_title: DICOMNODE
  port: 11112
storage:
  data_dir: data   # spool + index
callers:                     # who may send
  - {ae_title: PACS, host: 127.0.0.1, destination: pacs}   # the hospital PACS
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 4242}
  # the research archive, block style
  archive:
    ae_title: ARCHIVE
    host: 10.0.0.9
    port: 104
rules_file: rules.yaml
analyzers:
  plugins: ["tests.plugins.probe:IntensityProbe"]
  settings:
    chest_xray_thoracic: {enabled: false}
    spine_xray_keypoints: {enabled: false}
    dxa_scoliosis: {enabled: false}
"""

RULES = """\
# Routing rules, reviewed like code.
- name: ct-probe
  description: every CT
  when: {Modality: {equals: CT}}
  analyzers: [intensity_probe]

# radiographs of the chest
- name: chest
  when:
    all:
      - {Modality: {in: [CR, DX]}}   # both kinds of radiograph
      - {BodyPartExamined: {equals: CHEST}}
  analyzers: [intensity_probe]
  destinations: [archive]
"""


@pytest.fixture()
def site(tmp_path, monkeypatch):
    (tmp_path / "node.yaml").write_text(CONFIG)
    (tmp_path / "rules.yaml").write_text(RULES)
    monkeypatch.setenv("DICOMNODE_CONFIG", str(tmp_path / "node.yaml"))
    return tmp_path


@pytest.fixture(autouse=True)
def _default_logging():
    yield
    structlog.reset_defaults()  # the CLI configured logging for its process; other tests expect the defaults


def run(capsys, *argv):
    capsys.readouterr()  # only this command's output
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def rule_names(site):
    return [r.name for r in RuleSet.load(site / "rules.yaml")]


def test_rules_add_writes_a_valid_rule_and_keeps_comments(site, capsys):
    code, out, err = run(capsys, "rules", "add", "chest-lat", "--match", "Modality=CR", "--match",
                         "BodyPartExamined in CHEST,THORAX", "--match", "SeriesDescription ~ (?i)lat",
                         "--analyzer", "intensity_probe", "--destination", "pacs", "--priority", "1", "--stable-after", "5",
                         "--before", "chest")
    assert code == 0, err
    assert "position 2" in out
    text = (site / "rules.yaml").read_text()
    assert text.startswith(RULES.split("\n- name: chest\n")[0].split("# radiographs")[0])
    assert "# radiographs of the chest" in text and "# both kinds of radiograph" in text
    assert rule_names(site) == ["ct-probe", "chest-lat", "chest"]
    rule = RuleSet.load(site / "rules.yaml").get("chest-lat")
    assert rule.when == {"all": [{"Modality": {"equals": "CR"}}, {"BodyPartExamined": {"in": ["CHEST", "THORAX"]}},
                                 {"SeriesDescription": {"regex": "(?i)lat"}}]}
    assert rule.destinations == ["pacs"] and rule.priority == 1 and rule.stable_after == 5 and rule.enabled
    assert "- {Modality: {equals: CR}}" in text  # written the way people write rules

    code, out, _ = run(capsys, "rules", "show", "chest-lat", "--json")
    assert code == 0 and json.loads(out)["position"] == 2
    code, out, _ = run(capsys, "rules", "show", "chest")
    assert "# both kinds of radiograph" in out


def test_rules_add_refuses_bad_input_and_leaves_the_file_alone(site, capsys):
    before = (site / "rules.yaml").read_text()
    cases = [
        (["x", "--match", "Modalty=CR", "--analyzer", "intensity_probe"], "Modalty"),
        (["x", "--match", "Modality=CR", "--analyzer", "no_such_analyzer"], "unknown analyzer 'no_such_analyzer'"),
        (["x", "--match", "Modality=CR", "--analyzer", "intensity_probe", "--destination", "nowhere"], "unknown destination 'nowhere'"),
        (["ct-probe", "--match", "Modality=CR", "--analyzer", "intensity_probe"], "already exists"),
        (["bad name", "--match", "Modality=CR", "--analyzer", "intensity_probe"], "name"),
        (["x", "--match", "Modality=CR", "--analyzer", "intensity_probe", "--priority", "12"], "priority"),
        (["x", "--match", "Modality=CT", "--analyzer", "intensity_probe"], "unreachable"),
        (["x", "--match", "Modality=CR", "--analyzer", "intensity_probe", "--before", "nope"], "no rule named 'nope'"),
    ]
    for argv, words in cases:
        code, out, err = run(capsys, "rules", "add", *argv)
        assert code == 2, argv
        assert words in err and err.count("\n") == 1, err  # one line, naming the problem
    assert (site / "rules.yaml").read_text() == before
    code, _, err = run(capsys, "rules", "add", "x", "--match", "Modality=CT", "--analyzer", "intensity_probe", "--force")
    assert code == 0 and "unreachable" in err and rule_names(site)[-1] == "x"


def test_enable_disable_move_remove_keep_the_rest_of_the_file(site, capsys):
    assert run(capsys, "rules", "disable", "ct-probe")[0] == 0
    text = (site / "rules.yaml").read_text()
    assert "  enabled: false\n" in text and not RuleSet.load(site / "rules.yaml").get("ct-probe").enabled
    code, out, _ = run(capsys, "rules", "disable", "ct-probe")
    assert code == 0 and "already disabled" in out
    assert run(capsys, "rules", "enable", "ct-probe")[0] == 0
    assert (site / "rules.yaml").read_text() == RULES  # disable + enable is no change at all

    assert run(capsys, "rules", "move", "chest", "--before", "ct-probe")[0] == 0
    assert rule_names(site) == ["chest", "ct-probe"]
    text = (site / "rules.yaml").read_text()
    assert text.index("# radiographs of the chest") < text.index("- name: chest") < text.index("- name: ct-probe")
    assert text.startswith("# Routing rules, reviewed like code.\n")
    assert run(capsys, "rules", "move", "chest", "--after", "ct-probe")[0] == 0
    assert rule_names(site) == ["ct-probe", "chest"]

    assert run(capsys, "rules", "remove", "chest")[0] == 0
    assert rule_names(site) == ["ct-probe"] and "radiographs" not in (site / "rules.yaml").read_text()
    code, _, err = run(capsys, "rules", "remove", "chest")
    assert code == 2 and "no rule named 'chest'" in err


def test_an_edit_that_makes_a_rule_unreachable_needs_force(site, capsys):
    assert run(capsys, "rules", "add", "thin-ct", "--match", "Modality=CT", "--match", "SliceThickness<=1",
               "--analyzer", "intensity_probe", "--before", "ct-probe")[0] == 0
    before = (site / "rules.yaml").read_text()
    code, _, err = run(capsys, "rules", "move", "ct-probe", "--before", "thin-ct")
    assert code == 2 and "'thin-ct' is unreachable: rule 'ct-probe' before it" in err
    assert (site / "rules.yaml").read_text() == before
    code, _, err = run(capsys, "rules", "move", "ct-probe", "--before", "thin-ct", "--force")
    assert code == 0 and "warning" in err and rule_names(site) == ["ct-probe", "thin-ct", "chest"]
    assert run(capsys, "rules", "disable", "ct-probe")[0] == 0  # removes the problem: no --force needed
    code, _, err = run(capsys, "rules", "enable", "ct-probe")
    assert code == 2 and "unreachable" in err


def test_rules_list_json_and_table(site, capsys):
    code, out, _ = run(capsys, "rules", "list", "--json")
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["ct-probe", "chest"] and rows[1]["destinations"] == ["archive"]
    assert rows[1]["condition"] == "Modality in [CR, DX] and BodyPartExamined=CHEST"
    code, out, _ = run(capsys, "rules", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["#", "NAME", "ON"] and "ct-probe" in out


def test_a_broken_rules_file_is_refused_with_the_key_named(site, capsys):
    (site / "rules.yaml").write_text("- name: a\n  when: {Modality: {equal: CR}}\n  analyzers: [intensity_probe]\n")
    code, _, err = run(capsys, "rules", "validate")
    assert code == 2 and "when.Modality" in err and "unknown operator 'equal'" in err
    code, _, err = run(capsys, "rules", "add", "b", "--match", "Modality=CT", "--analyzer", "intensity_probe")
    assert code == 2 and "unknown operator 'equal'" in err  # no edit on top of a broken file
    (site / "rules.yaml").write_text("- name: a\n  when: {BodyPartExamind: CHEST}\n  analyzers: [intensity_probe]\n")
    code, _, err = run(capsys, "rules", "validate")
    assert code == 2 and "BodyPartExamind" in err
    other = site / "candidate.yaml"
    other.write_text("- name: a\n  when: {Modality: CT}\n  analyzers: [intensity_probe, nope]\n  destinations: [nowhere]\n"
                     "- name: b\n  when: {all: [{Modality: CT}, {Rows: {gt: 5}}]}\n  analyzers: [intensity_probe]\n")
    code, out, _ = run(capsys, "rules", "validate", str(other), "--json")
    report = json.loads(out)
    assert code == 2 and not report["valid"]
    assert any("unknown analyzer 'nope'" in p for p in report["problems"])
    assert any("unknown destination 'nowhere'" in p for p in report["problems"])
    assert any("'b' is unreachable" in p for p in report["problems"])
    other.write_text("- name: a\n  when: {Modality: CT}\n  analyzers: [intensity_probe]\n")
    assert run(capsys, "rules", "validate", str(other))[0] == 0


def test_rules_file_with_an_unusual_layout_is_rewritten_but_stays_correct(site, capsys):
    (site / "rules.yaml").write_text('[{name: a, when: {Modality: CT}, analyzers: [intensity_probe]}]\n')
    code, _, err = run(capsys, "rules", "add", "b", "--match", "Modality=MR", "--analyzer", "intensity_probe")
    assert code == 0 and "rewritten" in err
    assert rule_names(site) == ["a", "b"]
    (site / "rules.yaml").unlink()
    assert run(capsys, "rules", "add", "c", "--match", "Modality=MR", "--analyzer", "intensity_probe")[0] == 0
    assert rule_names(site) == ["c"] and (site / "rules.yaml").read_text().startswith("# Routing rules")


def test_concurrent_edit_is_detected(site):
    rf = RulesFile.open(site / "rules.yaml")
    rules, text = rf.remove("chest")
    (site / "rules.yaml").write_text(RULES + "\n")  # someone else saved meanwhile
    with pytest.raises(Exception, match="changed while"):
        rf.save(rules, text)


def test_destinations_and_callers_edit_only_their_lines(site, capsys):
    code, out, err = run(capsys, "destinations", "add", "research", "--ae-title", "RESEARCH", "--host", "10.0.0.7", "--port", "11112")
    assert code == 0, err
    code, _, err = run(capsys, "callers", "add", "CT01", "--host", "10.1.1.1", "--destination", "research")
    assert code == 0, err
    assert run(capsys, "callers", "add", "MR01")[0] == 0
    text = (site / "node.yaml").read_text()
    for comment in ("# site configuration", "# spool + index", "# who may send", "# the hospital PACS", "# the research archive"):
        assert comment in text
    cfg = load_config(site / "node.yaml")
    assert cfg.destinations["research"].port == 11112 and cfg.destinations["archive"].host == "10.0.0.9"
    assert [(c.ae_title, c.host, c.destination) for c in cfg.callers] == [
        ("PACS", "127.0.0.1", "pacs"), ("CT01", "10.1.1.1", "research"), ("MR01", None, None)]

    code, out, _ = run(capsys, "callers", "list", "--json")
    assert [c["ae_title"] for c in json.loads(out)] == ["PACS", "CT01", "MR01"]
    code, out, _ = run(capsys, "destinations", "list", "--json")
    assert [d["name"] for d in json.loads(out)] == ["archive", "pacs", "research"]

    refusals = [
        (["destinations", "add", "pacs", "--ae-title", "X", "--host", "h", "--port", "1"], "already exists"),
        (["destinations", "add", "x", "--ae-title", "A" * 17, "--host", "h", "--port", "1"], "ae_title"),
        (["destinations", "add", "x", "--ae-title", "X", "--host", "h", "--port", "70000"], "port"),
        (["destinations", "remove", "research"], "caller CT01"),
        (["destinations", "remove", "archive"], "rule 'chest'"),
        (["destinations", "remove", "nope"], "no destination 'nope'"),
        (["callers", "add", "CT02", "--destination", "nowhere"], "'nowhere' is not a configured destination"),
        (["callers", "add", "CT01", "--host", "10.1.1.1"], "already allowed"),
        (["callers", "add", "A\\B"], "backslash"),
        (["callers", "remove", "NOBODY"], "no caller 'NOBODY'"),
    ]
    before = (site / "node.yaml").read_text()
    for argv, words in refusals:
        code, _, err = run(capsys, *argv)
        assert code == 2 and words in err and err.count("\n") == 1, (argv, err)
    assert (site / "node.yaml").read_text() == before

    assert run(capsys, "callers", "remove", "CT01")[0] == 0
    assert run(capsys, "callers", "remove", "MR01")[0] == 0
    assert run(capsys, "destinations", "remove", "research")[0] == 0
    assert (site / "node.yaml").read_text() == CONFIG  # add then remove leaves the file as it was
    assert run(capsys, "destinations", "remove", "archive", "--config", str(site / "node.yaml"))[0] == 2


def test_removing_a_block_style_entry_takes_its_comment_and_nothing_else(site, capsys):
    assert run(capsys, "rules", "remove", "chest")[0] == 0
    assert run(capsys, "destinations", "remove", "archive")[0] == 0
    assert (site / "node.yaml").read_text() == CONFIG.replace(
        "  # the research archive, block style\n  archive:\n    ae_title: ARCHIVE\n    host: 10.0.0.9\n    port: 104\n", "")


def test_config_sections_missing_or_in_flow_style(site, capsys):
    (site / "node.yaml").write_text("storage: {data_dir: data}\ndestinations: {}\nanalyzers: {device: cpu}\n")
    assert run(capsys, "destinations", "add", "pacs", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", "4242")[0] == 0
    assert run(capsys, "callers", "add", "PACS", "--destination", "pacs")[0] == 0
    cfg = load_config(site / "node.yaml")
    assert list(cfg.destinations) == ["pacs"] and cfg.callers[0].destination == "pacs"
    assert yaml.safe_load((site / "node.yaml").read_text())["analyzers"] == {"device": "cpu"}
    assert run(capsys, "callers", "remove", "PACS")[0] == 0
    assert load_config(site / "node.yaml").callers == []


def test_top_level_config_option_reaches_every_verb(site, capsys, monkeypatch):
    monkeypatch.delenv("DICOMNODE_CONFIG")
    monkeypatch.chdir(site)  # no config/node.yaml here
    code, out, err = run(capsys, "--config", str(site / "node.yaml"), "callers", "list", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["ae_title"] == "PACS"
    code, out, _ = run(capsys, "rules", "--config", str(site / "node.yaml"), "list", "--json")
    assert code == 0 and len(json.loads(out)) == 2
    code, _, err = run(capsys, "rules", "list")
    assert code == 2 and "does not exist" in err


def test_removing_the_last_rule_leaves_an_empty_valid_rules_file(site, capsys):
    assert run(capsys, "rules", "remove", "chest")[0] == 0
    code, out, err = run(capsys, "rules", "remove", "ct-probe")
    assert code == 0, err
    assert "(0 rules in" in out
    text = (site / "rules.yaml").read_text()
    assert text.startswith("# Routing rules, reviewed like code.") and "- name:" not in text
    assert rule_names(site) == []
    code, out, _ = run(capsys, "rules", "validate")
    assert code == 0 and "0 rules, valid" in out
    assert run(capsys, "rules", "list")[1].startswith("(no rules in")
    assert run(capsys, "rules", "add", "ct-again", "--match", "Modality=CT", "--analyzer", "intensity_probe")[0] == 0
    assert rule_names(site) == ["ct-again"] and (site / "rules.yaml").read_text().startswith("# Routing rules, reviewed like code.")
