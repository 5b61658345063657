"""End to end: a real Orthanc as the PACS, DCMTK storescu as the sender, the node as a process.

The analyzer is the test plugin ``intensity_probe`` (tests/plugins), loaded the way a third-party
analyzer is, so these tests exercise the node's pipeline at the speed of a cheap analyzer; the
bundled analyzers have their own end-to-end tests.
"""

from __future__ import annotations

import json
import os
import sys
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers.phantoms import PhantomPatient, image_dataset, save

from dicomnode.registry import available_analyzers
from dicomnode.uids import CR_IMAGE, CT_IMAGE
from tests.dicomtools import dciodvfy
from tests.peers import PEER_ENV, REPO, NodeProcess, Orthanc, have_peers, storescu

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not have_peers(), reason="Orthanc/DCMTK/dicom3tools not installed")]

PROBE_RULES = [{"name": "probe", "when": {"Modality": {"in": ["CR", "CT"]}}, "analyzers": ["intensity_probe"], "stable_after": 1}]
# every installed analyzer, disabled where a test wants the probe alone
BUNDLED = tuple(available_analyzers())
PROBE_CONFIG = {
    "analyzers": {"device": "cpu", "plugins": ["tests.plugins.probe:IntensityProbe"], "max_attempts": 2,
                  "retry_delay": 0.5,
                  "settings": {name: {"enabled": False} for name in BUNDLED}},
}


def make_study(folder: Path, n: int, modality: str = "CR", description: str = "", size: int = 64, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    pat = PhantomPatient.make(rng, "e2e", seed)
    series_uid = f"1.2.826.0.1.3680043.10.1137.77.{seed}.1"
    files = []
    for i in range(n):
        pixels = (rng.random((size, size)) * 3000 + 500).astype(np.uint16)
        ds = image_dataset(pixels, patient=pat, modality=modality, sop_class_uid=CR_IMAGE if modality == "CR" else CT_IMAGE,
                           series_uid=series_uid, instance_number=i + 1, series_description=description,
                           pixel_spacing=(0.5, 0.5), attributes={"BodyPartExamined": "CHEST"})
        files.append(save(ds, folder))
    return files


@pytest.fixture()
def pacs(tmp_path):
    o = Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


@pytest.fixture()
def node(tmp_path, pacs):
    n = NodeProcess(tmp_path / "node", pacs=pacs, rules=PROBE_RULES, config=PROBE_CONFIG)
    n.start()
    yield n
    n.stop()


def results_in(pacs: Orthanc, study_uid: str, expect: int, timeout: float = 90) -> list[dict]:
    return pacs.wait_instances(
        lambda tags: len([t for t in tags if t.get("StudyInstanceUID") == study_uid and t.get("Modality") in ("SR", "OT", "PR", "SEG")]) >= expect,
        timeout=timeout)


def test_pushed_study_comes_back_with_valid_results_in_the_same_study(node, pacs, tmp_path):
    files = make_study(tmp_path / "in", 3)
    src = pydicom.dcmread(files[0])
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr
    tags = results_in(pacs, src.StudyInstanceUID, 3)
    results = [t for t in tags if t.get("Modality") in ("SR", "OT", "PR")]
    assert sorted(t["Modality"] for t in results) == ["OT", "PR", "SR"]
    assert len({t["SeriesInstanceUID"] for t in results}) == 3
    assert src.SeriesInstanceUID not in {t["SeriesInstanceUID"] for t in results}
    for t in results:
        assert t["PatientID"] == src.PatientID
        data = pacs.instance_file(t["_id"])
        path = tmp_path / f"{t['Modality']}.dcm"
        path.write_bytes(data)
        assert dciodvfy(path).errors == [], t["Modality"]
    sr = pydicom.dcmread(tmp_path / "SR.dcm")
    assert "AI intensity_probe" in sr.SeriesDescription

    # the CLI shows what happened, for people and for machines
    studies = json.loads(node.cli("studies", "--json").stdout)
    assert studies[0]["study_uid"] == src.StudyInstanceUID and studies[0]["n_instances"] == 3
    jobs = json.loads(node.cli("jobs", "--json").stdout)
    assert jobs[0]["state"] == "done" and jobs[0]["analyzer"] == "intensity_probe" and jobs[0]["n_objects"] == 3
    node.wait_for(lambda: all(o["state"] == "sent" for o in json.loads(node.cli("outbox", "--json").stdout)), 30, "outbox sent")
    human = node.cli("jobs").stdout
    assert "intensity_probe" in human and "done" in human

    # structured logs: the events of every stage, and never the patient's identity
    events = {e.get("event") for e in node.log_events()}
    assert {"study_complete", "job_started", "job_finished", "object_sent"} <= events
    assert "association" in events
    log_text = node.log_path.read_text()
    for phi in (str(src.PatientName), src.PatientID, src.PatientBirthDate):
        assert phi not in log_text


def test_debug_log_has_one_event_per_stored_instance_without_phi(tmp_path):
    """At DEBUG the receiver logs each stored instance by its UIDs; at INFO it does not (one event per association)."""
    files = make_study(tmp_path / "in", 3, seed=5)
    sources = [pydicom.dcmread(f) for f in files]
    for level, expected in (("DEBUG", 3), ("INFO", 0)):
        n = NodeProcess(tmp_path / f"node-{level}", rules=[], config={"logging": {"level": level}}).start()
        try:
            r = storescu(n.port, files)
            assert r.returncode == 0, r.stderr
            n.wait_for(lambda: any(e.get("event") == "association" for e in n.log_events()), 20, "the association event")
            stored = [e for e in n.log_events() if e.get("event") == "instance_stored"]
        finally:
            n.stop()
        assert len(stored) == expected, level
        if expected:
            assert {e["sop_uid"] for e in stored} == {str(ds.SOPInstanceUID) for ds in sources}
            assert {e["study_uid"] for e in stored} == {str(sources[0].StudyInstanceUID)}
            for e in stored:
                assert e["bytes"] == (n.data_dir / "spool" / e["study_uid"] / e["series_uid"] / f"{e['sop_uid']}.dcm").stat().st_size
        log_text = n.log_path.read_text()
        for phi in (str(sources[0].PatientName), sources[0].PatientID, sources[0].PatientBirthDate):
            assert phi not in log_text, level


def test_results_wait_in_the_outbox_while_the_pacs_is_down(node, pacs, tmp_path):
    pacs.stop()
    files = make_study(tmp_path / "in", 2, seed=5)
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr  # receiving does not depend on the destination
    node.wait_for(lambda: any(o["attempts"] >= 1 and o["state"] == "pending" for o in json.loads(node.cli("outbox", "--json").stdout)),
                  60, "a failed send attempt")
    pacs.start()
    results_in(pacs, pydicom.dcmread(files[0]).StudyInstanceUID, 3, timeout=60)


def test_sigkill_during_a_push_loses_nothing_acknowledged_and_delivers_once(tmp_path, pacs):
    # quiet time long enough that the PACS's retry after the restart lands before the study completes
    rules = [dict(PROBE_RULES[0], stable_after=8)]
    node = NodeProcess(tmp_path / "node", pacs=pacs, rules=rules, config=PROBE_CONFIG).start()
    files = make_study(tmp_path / "in", 200, modality="CT", size=128, seed=9)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    proc = subprocess.Popen(["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                             *map(str, files)], env=PEER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spool = node.data_dir / "spool"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(spool.rglob("*.dcm"))) < 60:
        time.sleep(0.01)
    node.stop(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    acknowledged = _acknowledged(out)
    assert 0 < len(acknowledged) < 200, "the kill should land in the middle of the push"

    node.start()  # restart: every acknowledged instance is there
    stored = {p.stem for p in spool.rglob("*.dcm")}
    assert acknowledged <= stored
    studies = json.loads(node.cli("studies", "--json").stdout)
    assert studies[0]["n_instances"] >= len(acknowledged)

    r = storescu(node.port, files)  # the PACS retries the whole study
    assert r.returncode == 0, r.stderr
    results_in(pacs, study_uid, 3, timeout=90)
    time.sleep(3)  # a duplicate delivery would show up here
    results = [t for t in (pacs.tags(i) for i in pacs.instances()) if t.get("Modality") in ("SR", "OT", "PR")]
    assert len(results) == 3
    done = [j for j in json.loads(node.cli("jobs", "--json").stdout) if j["state"] == "done"]
    assert len(done) == 1
    node.stop()


def _acknowledged(storescu_output: str) -> set[str]:
    """SOP Instance UIDs that storescu saw a success response for."""
    acked, current = set(), None
    for line in storescu_output.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = Path(m.group(1)).stem
        if "Received Store Response (Success)" in line and current:
            acked.add(current)
    return acked


def test_a_crashing_analyzer_is_contained_and_parked(node, pacs, tmp_path):
    crash = make_study(tmp_path / "crash", 1, description="CRASH please", seed=11)
    assert storescu(node.port, crash).returncode == 0
    node.wait_for(lambda: any(j["state"] == "failed" for j in json.loads(node.cli("jobs", "--json").stdout)), 90, "parked job")
    failed = json.loads(node.cli("jobs", "--state", "failed", "--json").stdout)[0]
    assert failed["attempts"] == 2 and "worker process died" in failed["error"]
    good = make_study(tmp_path / "good", 1, seed=12)  # the node still receives and analyzes
    assert storescu(node.port, good).returncode == 0
    results_in(pacs, pydicom.dcmread(good[0]).StudyInstanceUID, 3)


def test_sigterm_stops_cleanly(node):
    rc = node.stop(signal.SIGTERM)
    assert rc == 0
    assert "node_stopped" in {e.get("event") for e in node.log_events()}


def test_new_callers_are_allowed_without_a_restart(node, tmp_path):
    import yaml

    files = make_study(tmp_path / "in", 1, seed=21)
    assert storescu(node.port, files, aet="MODALITY7").returncode != 0
    cfg = yaml.safe_load(node.config_path.read_text())
    cfg["callers"].append({"ae_title": "MODALITY7", "host": "127.0.0.1", "destination": "pacs"})
    node.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    node.wait_for(lambda: "config_reloaded" in {e.get("event") for e in node.log_events()}, 20, "config reload")
    assert storescu(node.port, files, aet="MODALITY7").returncode == 0
    node.config_path.write_text("node: {port: -5}\n")  # a broken file never replaces the working one
    node.wait_for(lambda: "config_rejected" in {e.get("event") for e in node.log_events()}, 20, "config rejection")
    assert storescu(node.port, files, aet="MODALITY7").returncode == 0


def test_a_second_node_on_the_same_port_or_data_folder_refuses_to_start(node, tmp_path):
    import yaml

    same_data = NodeProcess(tmp_path / "second", rules=PROBE_RULES, config=PROBE_CONFIG)
    cfg = yaml.safe_load(same_data.config_path.read_text())
    cfg["storage"]["data_dir"] = str(node.data_dir)
    same_data.config_path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([str(Path(sys.executable).parent / "dicomnode"), "serve", "--config", str(same_data.config_path)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1 and "another node is running with data folder" in r.stderr

    same_port = NodeProcess(tmp_path / "third", rules=PROBE_RULES, config=PROBE_CONFIG, port=node.port)
    r = subprocess.run([str(Path(sys.executable).parent / "dicomnode"), "serve", "--config", str(same_port.config_path)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1 and "Address already in use" in r.stderr and "Traceback" not in r.stderr


def test_several_receiver_processes_share_the_port(tmp_path, pacs):
    node = NodeProcess(tmp_path / "node", pacs=pacs, rules=PROBE_RULES,
                       config={**PROBE_CONFIG, "node": {"receivers": 2}}).start()
    try:
        node.wait_for(lambda: sum(e.get("event") == "receiver_listening" for e in node.log_events()) == 2, 30, "two receivers")
        files = make_study(tmp_path / "in", 40, seed=41)
        procs = [subprocess.Popen(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                                   *map(str, files[i::4])], env=PEER_ENV, stderr=subprocess.PIPE) for i in range(4)]
        assert all(p.wait(120) == 0 for p in procs)
        studies = json.loads(node.cli("studies", "--json").stdout)
        assert studies[0]["n_instances"] == 40
        results_in(pacs, pydicom.dcmread(files[0]).StudyInstanceUID, 3)
    finally:
        assert node.stop() == 0
