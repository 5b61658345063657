"""The administrator's CLI against a running node: a real Orthanc as the PACS, DCMTK storescu as the
sender, ``dicomnode`` commands as subprocesses. Rules and callers change while the node runs, and the
node follows them without a restart; a broken rules file is refused and the working rules stay.

The analyzer is the cheap test plugin ``intensity_probe`` (tests/plugins), as in test_pipeline.py.
"""

from __future__ import annotations

import json
import time

import pydicom
import pytest
import yaml

from tests.e2e.test_pipeline import PROBE_CONFIG, make_study
from tests.peers import NodeProcess, Orthanc, have_peers, storescu

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not have_peers(), reason="Orthanc/DCMTK/dicom3tools not installed")]

# a rule that must never fire in these tests: the file is never empty, and there is a rule to be unreachable after
BASE_RULES = [{"name": "mr-only", "when": {"Modality": {"equals": "MR"}}, "analyzers": ["intensity_probe"]}]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    o = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield o
    o.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory, pacs):
    n = NodeProcess(tmp_path_factory.mktemp("node"), pacs=pacs, rules=BASE_RULES, config=PROBE_CONFIG).start()
    yield n
    n.stop()


def cli_json(node: NodeProcess, *args: str):
    r = node.cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def jobs_of(node: NodeProcess, study_uid: str) -> list[dict]:
    return [j for j in cli_json(node, "jobs") if j["study_uid"] == study_uid]


def wait_complete(node: NodeProcess, study_uid: str, timeout: float = 60) -> None:
    """Until the assembler has routed the study (with or without jobs)."""
    node.wait_for(lambda: any(s["study_uid"] == study_uid and s["state"] == "complete" for s in cli_json(node, "studies")),
                  timeout, f"study {study_uid} complete")


def wait_ran(node: NodeProcess, study_uid: str, timeout: float = 60) -> list[dict]:
    """Until the worker has run the analyzer on the study; returns its jobs."""
    node.wait_for(lambda: any(j["started_at"] and j["state"] not in ("queued", "running") for j in jobs_of(node, study_uid)),
                  timeout, f"a finished job for {study_uid}")
    return jobs_of(node, study_uid)


def push(node: NodeProcess, folder, seed: int, description: str, aet: str = "STORESCU") -> tuple[list, str]:
    files = make_study(folder, 1, description=description, seed=seed)
    r = storescu(node.port, files, aet=aet)
    assert r.returncode == 0, r.stderr
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_rules_change_while_the_node_runs(node, pacs, tmp_path):
    r = node.cli("status")
    assert r.returncode == 0 and r.stdout.startswith("up:"), r.stdout + r.stderr

    # add a rule while the node runs; a matching study is analyzed
    r = node.cli("rules", "add", "lateral-cr", "--match", "Modality=CR", "--match", "SeriesDescription ~ (?i)lat",
                 "--analyzer", "intensity_probe", "--stable-after", "1", "--priority", "1")
    assert r.returncode == 0, r.stderr
    assert "running node picks this up" in r.stdout
    lat_files, lat = push(node, tmp_path / "a", 21, "Chest LAT")
    jobs = wait_ran(node, lat)
    assert [(j["analyzer"], j["rule"], j["destinations"], j["state"]) for j in jobs] == [
        ("intensity_probe", "lateral-cr", ["pacs"], "done")]

    # the dry run explains the match, and a non-match, and queues nothing
    pa_files = make_study(tmp_path / "pa", 1, description="Chest PA", seed=22)
    r = node.cli("rules", "test", str(lat_files[0]), str(pa_files[0]), "--calling-ae", "STORESCU")
    assert r.returncode == 0, r.stderr
    assert "MATCH     lateral-cr: Modality='CR' equals 'CR' and SeriesDescription='Chest LAT' matches /(?i)lat/" in r.stdout
    assert "no match  lateral-cr: SeriesDescription='Chest PA' does not match /(?i)lat/" in r.stdout
    assert "-> intensity_probe -> pacs (rule lateral-cr)" in r.stdout
    r = node.cli("rules", "test", "--study", lat)
    assert r.returncode == 0 and "would queue intensity_probe on 1 series -> pacs" in r.stdout
    assert len(jobs_of(node, lat)) == 1

    # a broken file written by hand is refused, naming the key; the node keeps the working rules
    good = node.rules_path.read_text()
    node.rules_path.write_text(good.replace("equals: CR", "equal: CR"))
    r = node.cli("rules", "validate")
    assert r.returncode == 2 and "when.all[0].Modality" in r.stderr and "unknown operator 'equal'" in r.stderr
    node.wait_for(lambda: "rules_rejected" in {e.get("event") for e in node.log_events()}, 15, "rules_rejected logged")
    rejected = [e for e in node.log_events() if e.get("event") == "rules_rejected"][0]
    assert "equal" in rejected["error"] and rejected["kept"] == 2
    _, kept = push(node, tmp_path / "c", 23, "lat view")
    assert [j["rule"] for j in wait_ran(node, kept)] == ["lateral-cr"]
    r = node.cli("rules", "disable", "lateral-cr")
    assert r.returncode == 2 and "unknown operator 'equal'" in r.stderr  # no edit on top of a broken file
    node.rules_path.write_text(good)

    # disable it: a matching study now runs nothing
    r = node.cli("rules", "disable", "lateral-cr")
    assert r.returncode == 0, r.stderr
    _, off = push(node, tmp_path / "b", 24, "Chest LAT")
    wait_complete(node, off)
    time.sleep(1.0)
    assert jobs_of(node, off) == []
    rules = cli_json(node, "rules", "list")
    assert [(r["name"], r["enabled"]) for r in rules] == [("mr-only", True), ("lateral-cr", False)]

    # re-process a stored study on demand: the running node runs the new job
    r = node.cli("studies", "reprocess", off, "--analyzer", "intensity_probe")
    assert r.returncode == 0, r.stderr
    assert [(j["rule"], j["state"]) for j in wait_ran(node, off)] == [("reprocess", "done")]

    # and the results of the first study reached the PACS
    node.wait_for(lambda: {o["state"] for o in cli_json(node, "outbox") if o["study_uid"] == lat} == {"sent"}, 30, "results sent")
    assert any(t.get("StudyInstanceUID") == lat and t.get("Modality") == "SR" for t in (pacs.tags(i) for i in pacs.instances()))


def test_callers_and_destinations_while_the_node_runs(node, pacs, tmp_path):
    files = make_study(tmp_path / "x", 1, description="Chest LAT", seed=31)
    assert storescu(node.port, files, aet="NEWMODALITY").returncode != 0  # not an allowed caller yet

    r = node.cli("callers", "add", "NEWMODALITY", "--host", "127.0.0.1", "--destination", "pacs")
    assert r.returncode == 0, r.stderr
    assert any(c["ae_title"] == "NEWMODALITY" for c in cli_json(node, "callers", "list"))
    deadline = time.monotonic() + 20
    while storescu(node.port, files, aet="NEWMODALITY").returncode != 0:  # the node reloads its configuration
        assert time.monotonic() < deadline, "the running node did not accept the new caller"
        time.sleep(0.5)
    assert yaml.safe_load(node.config_path.read_text())["callers"][-1]["ae_title"] == "NEWMODALITY"

    r = node.cli("destinations", "echo", "pacs")
    assert r.returncode == 0 and "C-ECHO success" in r.stdout
    r = node.cli("destinations", "add", "archive", "--ae-title", "ARCHIVE", "--host", "127.0.0.1", "--port", "1")
    assert r.returncode == 0, r.stderr
    r = node.cli("destinations", "echo", "archive")
    assert r.returncode == 1 and "association failed" in r.stdout
    r = node.cli("destinations", "remove", "pacs")
    assert r.returncode == 2 and "caller STORESCU" in r.stderr
    assert node.cli("destinations", "remove", "archive").returncode == 0
    assert node.cli("callers", "remove", "NEWMODALITY").returncode == 0

    status = cli_json(node, "status")
    assert status["up"] and status["pid"] == node.proc.pid and status["jobs"].get("failed", 0) == 0
    models = cli_json(node, "models", "list")
    assert [(m["analyzer"], m["phantom_trained"]) for m in models] == [("intensity_probe", True)]


def test_status_when_the_node_is_down(node):
    node.stop()
    r = node.cli("status")
    assert r.returncode == 1 and r.stdout.startswith("DOWN:") and "stopped" in r.stdout
    assert node.cli("jobs", "list").returncode == 0  # the database is read whether the node runs or not
