"""End to end: hostile input over real sockets (DCMTK storescu, Orthanc as the PACS).

A source's malformed header values must never stop its results nor reach a log, the jobs table or
the CLI; an instance re-sent under another study moves there for good, restarts included; a
tampered model file is refused by name while the other analyzers keep working.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers.dxa_scoliosis.analyzer import WEIGHTS as DXA_WEIGHTS
from analyzers.phantoms import PhantomPatient, image_dataset, save
from dicomnode.uids import CR_IMAGE
from tests.dicomtools import dciodvfy
from tests.e2e.test_pipeline import BUNDLED, PROBE_CONFIG, PROBE_RULES, results_in
from tests.peers import NodeProcess, Orthanc, have_peers, storescu

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not have_peers(), reason="Orthanc/DCMTK/dicom3tools not installed")]

BIRTH_DATE = "1901020399"
NAMES = ("Zyxwvq^Qwertz", "Plokij^Mnbvcx")
PHYSICIAN = "Lkjhgf^Poiuyt^" + "X" * 60  # longer than a PN component group may be


def _study(folder: Path, seed: int, study_uid: str | None = None, sop_uid: str | None = None, **attributes) -> Path:
    rng = np.random.default_rng(seed)
    ds = image_dataset((rng.random((64, 64)) * 3000 + 500).astype(np.uint16), patient=PhantomPatient.make(rng, "hh", seed),
                       modality="CR", sop_class_uid=CR_IMAGE, series_uid=f"1.2.826.0.1.3680043.10.1137.78.{seed}.1",
                       pixel_spacing=(0.5, 0.5), attributes={"BodyPartExamined": "CHEST", **attributes})
    if study_uid:
        ds.StudyInstanceUID = study_uid
    if sop_uid:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return save(ds, folder)


def test_malformed_header_values_still_get_valid_results_and_never_reach_a_log(tmp_path):
    pacs = Orthanc(tmp_path / "orthanc").start()
    node = NodeProcess(tmp_path / "node", pacs=pacs, rules=PROBE_RULES, config=PROBE_CONFIG).start()
    try:
        path = _study(tmp_path / "in", 11, PatientBirthDate=BIRTH_DATE, PatientName="\\".join(NAMES),
                      StudyTime="256199", PatientSex="Q", ReferringPhysicianName=PHYSICIAN)
        src = pydicom.dcmread(path)
        r = storescu(node.port, [path])
        assert r.returncode == 0, r.stderr
        tags = results_in(pacs, src.StudyInstanceUID, 3)
        results = [t for t in tags if t.get("Modality") in ("SR", "OT", "PR")]
        assert sorted(t["Modality"] for t in results) == ["OT", "PR", "SR"]
        for t in results:
            out = tmp_path / f"{t['Modality']}.dcm"
            out.write_bytes(pacs.instance_file(t["_id"]))
            assert dciodvfy(out).errors == [], t["Modality"]
            ds = pydicom.dcmread(out)
            assert str(ds.PatientName) == NAMES[0] and not ds.PatientBirthDate and not ds.StudyTime
        jobs = json.loads(node.cli("jobs", "--json").stdout)
        assert [j["state"] for j in jobs] == ["done"]
        node.wait_for(lambda: all(o["state"] == "sent" for o in json.loads(node.cli("outbox", "--json").stdout)), 30,
                      "outbox sent")
        shown = "".join(node.cli(*args).stdout for args in (("jobs",), ("jobs", "--json"), ("studies",),
                                                             ("studies", "--json"), ("outbox", "--json")))
    finally:
        node.stop()
        pacs.stop()
    with sqlite3.connect(node.data_dir / "index.sqlite") as db:
        stored = json.dumps([list(r) for r in db.execute("SELECT * FROM jobs")])
    for where, text in (("log", node.log_path.read_text()), ("jobs table", stored), ("CLI", shown)):
        for value in (BIRTH_DATE, *NAMES, PHYSICIAN[:12]):
            assert value not in text, f"{value} in the {where}"


def test_a_value_pydicom_cannot_convert_is_refused_or_settled_without_being_quoted(tmp_path):
    """A frame count that is not a number: whether the receiver refuses it or a job fails on it, no log quotes it."""
    node = NodeProcess(tmp_path / "node", rules=PROBE_RULES,
                       config={**PROBE_CONFIG, "analyzers": {**PROBE_CONFIG["analyzers"], "max_attempts": 1}}).start()
    try:
        path = _study(tmp_path / "in", 12, PatientBirthDate=BIRTH_DATE)
        ds = pydicom.dcmread(path)
        ds[0x00280008] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x00280008), "IS", 10, BIRTH_DATE.encode(),
                                                         0, True, True)
        ds.save_as(path)
        if storescu(node.port, [path]).returncode == 0:
            node.wait_for(lambda: [j["state"] for j in json.loads(node.cli("jobs", "--json").stdout)]
                          in (["failed"], ["done"], ["not_applicable"]), 60, "the job to settle")
        else:
            node.wait_for(lambda: any(e.get("event") == "association" for e in node.log_events()), 20, "the association")
        shown = node.cli("jobs").stdout + node.cli("jobs", "--json").stdout + node.cli("studies", "--json").stdout
    finally:
        node.stop()
    with sqlite3.connect(node.data_dir / "index.sqlite") as db:
        stored = json.dumps([list(r) for r in db.execute("SELECT * FROM jobs")])
    for where, text in (("log", node.log_path.read_text()), ("jobs table", stored), ("CLI", shown)):
        assert BIRTH_DATE not in text, where


def test_an_instance_resent_under_another_study_moves_for_good_and_the_spool_is_owner_only(tmp_path):
    node = NodeProcess(tmp_path / "node", rules=[]).start()
    sop = "1.2.826.0.1.3680043.10.1137.79.1.1.1"
    try:
        first = _study(tmp_path / "a", 13, study_uid="1.2.826.0.1.3680043.10.1137.79.1", sop_uid=sop)
        second = _study(tmp_path / "b", 14, study_uid="1.2.826.0.1.3680043.10.1137.79.2", sop_uid=sop)
        assert storescu(node.port, [first]).returncode == 0
        assert storescu(node.port, [second]).returncode == 0
        node.wait_for(lambda: any(e.get("event") == "instance_moved" for e in node.log_events()), 20, "the move")
    finally:
        node.stop()
    for restart in range(2):  # each start reconciles the spool; the instance must stay in the second study
        node.start()
        try:
            studies = {s["study_uid"]: s["n_instances"] for s in json.loads(node.cli("studies", "--json").stdout)}
        finally:
            node.stop()
        assert studies == {"1.2.826.0.1.3680043.10.1137.79.2": 1}, restart
        assert [p.parent.parent.name for p in (node.data_dir / "spool").rglob("*.dcm")] == ["1.2.826.0.1.3680043.10.1137.79.2"]
    moved = [e for e in node.log_events() if e.get("event") == "instance_moved"]
    assert moved and set(moved[0]) <= {"event", "level", "timestamp", "process", "sop_uid", "study_uid", "series_uid",
                                       "old_study_uid", "old_series_uid"}
    data = node.data_dir
    owned = [data, *data.glob("index.sqlite*"), *(p for d in ("spool", "tmp", "results") for p in [data / d, *(data / d).rglob("*")])]
    assert len(owned) >= 8
    assert {p.relative_to(data).as_posix(): oct(p.stat().st_mode & 0o777) for p in owned if p.stat().st_mode & 0o077} == {}


def test_a_model_whose_sha256_does_not_match_is_refused_and_the_other_analyzers_keep_working(tmp_path):
    entry = json.loads((DXA_WEIGHTS / "dxa_scoliosis_seg.json").read_text())
    entry["file"] = str(DXA_WEIGHTS / entry["file"])
    entry["sha256"] = "0" * 64  # the weights are not the file the registry names
    registry = tmp_path / "tampered.json"
    registry.write_text(json.dumps(entry))
    settings = {name: {"enabled": False} for name in BUNDLED}
    settings["dxa_scoliosis"] = {"models": {"dxa_scoliosis_seg": str(registry)}}
    config = {**PROBE_CONFIG, "analyzers": {**PROBE_CONFIG["analyzers"], "max_attempts": 1, "settings": settings}}
    rules = [{**PROBE_RULES[0], "analyzers": ["intensity_probe", "dxa_scoliosis"]}]
    pacs = Orthanc(tmp_path / "orthanc").start()
    node = NodeProcess(tmp_path / "node", pacs=pacs, rules=rules, config=config).start()
    try:
        path = _study(tmp_path / "in", 15)
        assert storescu(node.port, [path]).returncode == 0
        results_in(pacs, pydicom.dcmread(path).StudyInstanceUID, 3)
        node.wait_for(lambda: len([j for j in json.loads(node.cli("jobs", "--json").stdout)
                                   if j["state"] in ("done", "failed")]) == 2, 90, "both jobs to settle")
        jobs = {j["analyzer"]: j for j in json.loads(node.cli("jobs", "--json").stdout)}
        shown = node.cli("jobs").stdout
    finally:
        node.stop()
        pacs.stop()
    assert jobs["intensity_probe"]["state"] == "done"
    assert jobs["dxa_scoliosis"]["state"] == "failed"
    failures = [e for e in node.log_events() if e.get("event") in ("analyzer_load_failed", "job_failed")
                and e.get("analyzer") == "dxa_scoliosis"]
    assert failures
    for text in [e["error"] for e in failures] + [shown]:
        assert "dxa_scoliosis_seg" in text and "sha256" in text, text
    assert "restore it or fix the registry entry" in failures[0]["error"]
