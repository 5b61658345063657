"""The audit trail's file (appends from several processes, rotation) and its PS3.15 syslog form."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import xml.etree.ElementTree as ET

import pytest

from dicomnode.audit import AuditTrail, atna_xml, syslog_message
from dicomnode.config import SyslogTarget


def _write(path, n, tag):
    trail = AuditTrail(path, max_bytes=4096, backups=50)
    for i in range(n):
        trail.record("object_delivered", study_uid="1.2.3", sop_uid=f"1.2.3.{tag}.{i}", destination="pacs", status="acknowledged")


def test_several_processes_append_whole_lines_and_rotation_loses_none(tmp_path):
    path = tmp_path / "audit.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write, args=(path, 150, tag)) for tag in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    files = [path, *sorted(tmp_path.glob("audit.log.*"))]
    assert len(files) > 3  # it rotated
    assert all(f.stat().st_size <= 4096 for f in files)
    uids = [json.loads(line)["sop_uid"] for f in files for line in f.read_text().splitlines()]
    assert sorted(uids) == sorted(f"1.2.3.{t}.{i}" for t in (1, 2, 3) for i in range(150))


def test_rotation_keeps_the_configured_number_of_files(tmp_path):
    trail = AuditTrail(tmp_path / "audit.log", max_bytes=4096, backups=2)
    for i in range(200):
        trail.record("study_received", study_uid=f"1.2.{i}", calling_ae="PACS", instances=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audit.log.1", "audit.log.2"]


def test_patient_identity_is_refused(tmp_path):
    trail = AuditTrail(tmp_path / "audit.log", max_bytes=1 << 20, backups=1)
    with pytest.raises(ValueError, match="no patient identity"):
        trail.record("study_received", study_uid="1.2.3", PatientName="DOE^JANE")
    assert not (tmp_path / "audit.log").exists() or "DOE" not in (tmp_path / "audit.log").read_text()


@pytest.mark.parametrize("event, fields, code, action", [
    ("study_received", {"study_uid": "1.2.3", "calling_ae": "PACS", "host": "10.0.0.1", "sop_classes": {"1.2.840.10008.5.1.4.1.1.1": 2}},
     "110104", "C"),
    ("analysis", {"study_uid": "1.2.3", "rule": "chest", "analyzer": "chest_xray_thoracic", "analyzer_version": "1.0",
                  "models": [{"name": "m", "version": "2", "sha256": "ab" * 32}], "objects": 3}, "110103", "C"),
    ("object_delivered", {"study_uid": "1.2.3", "sop_uid": "1.2.3.4", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34",
                          "destination": "pacs", "destination_ae": "PACS", "destination_host": "10.0.0.1"}, "110104", "R"),
    ("admin_change", {"user": "alice", "action": "rules add", "target": "chest-lat"}, "110113", "E"),
    ("node_started", {}, "110100", "E"),
])
def test_each_event_has_its_ps315_audit_message(tmp_path, event, fields, code, action):
    entry = AuditTrail(tmp_path / "a.log", 1 << 20, 1).record(event, **fields)
    root = ET.fromstring(atna_xml(entry))
    ident = root.find("EventIdentification")
    assert ident.find("EventID").get("csd-code") == code and ident.get("EventActionCode") == action
    assert ident.get("EventOutcomeIndicator") == "0"
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "DICOMNODE"
    assert root.findall("ActiveParticipant")
    if "study_uid" in fields:
        assert root.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "1.2.3"
    if event == "admin_change":
        assert ident.find("EventTypeCode").get("csd-code") == "110131"
        assert root.find("ActiveParticipant").get("UserID") == "alice"


def test_syslog_over_udp_is_rfc5424(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        trail = AuditTrail(tmp_path / "a.log", 1 << 20, 1, SyslogTarget(host="127.0.0.1", port=s.getsockname()[1]))
        trail.record("analysis", "failure", study_uid="1.2.3", analyzer="x", result="failed")
        msg = s.recv(65536)
    header, _, body = msg.partition(b"\xef\xbb\xbf")
    pri_version, timestamp, host, app, procid, msgid, sd, rest = header.decode().split(" ")
    assert (pri_version, app, msgid, sd, rest) == ("<83>1", "dicomnode", "DICOM+RFC3881", "-", "")  # authpriv.err
    assert timestamp.endswith("+00:00") and host and procid.isdigit()
    assert ET.fromstring(body).find("EventIdentification").get("EventOutcomeIndicator") == "8"
    assert syslog_message({"time": timestamp, "event": "node_stopped", "outcome": "success"}).startswith(b"<85>1 ")
