"""Operating the node: Prometheus metrics, /healthz and /readyz, the audit trail, no polling between stages.

A real Orthanc is the PACS, DCMTK storescu the modality, the node runs as its own process with its
metrics listener on; the analyzer is the test plugin ``intensity_probe``.
"""

from __future__ import annotations

import copy
import json
import signal
import socket
import sqlite3
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE

from analyzers.phantoms import CR_IMAGE, PhantomPatient, image_dataset, save
from dicomnode.registry import available_analyzers
from tests.peers import NodeProcess, Orthanc, free_port, have_peers, storescu

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not have_peers(), reason="Orthanc/DCMTK/dicom3tools not installed")]

RULES = [{"name": "probe", "when": {"Modality": {"in": ["CR"]}}, "analyzers": ["intensity_probe"], "stable_after": 1}]
# every installed analyzer, disabled where a test wants the probe alone
BUNDLED = tuple(available_analyzers())
# identity that must never reach a log or the audit trail
PHI = {"PatientName": "Auditfamily^Secretgiven", "PatientID": "PID-7731-XQ", "PatientBirthDate": "19430517",
       "AccessionNumber": "ACC-55821-Z"}


def node_config(metrics_port: int, **extra) -> dict:
    cfg = {
        "analyzers": {"device": "cpu", "plugins": ["tests.plugins.probe:IntensityProbe"],
                      "settings": {name: {"enabled": False} for name in BUNDLED}},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
    }
    cfg.update(extra)
    return cfg


def make_study(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    pat = PhantomPatient.make(rng, "ops", seed)
    series_uid = f"1.2.826.0.1.3680043.10.1137.78.{seed}.1"
    files = []
    for i in range(n):
        pixels = (rng.random((64, 64)) * 3000 + 500).astype(np.uint16)
        ds = image_dataset(pixels, patient=pat, modality="CR", sop_class_uid=CR_IMAGE, series_uid=series_uid,
                           instance_number=i + 1, pixel_spacing=(0.5, 0.5), attributes={"BodyPartExamined": "CHEST", **PHI})
        files.append(save(ds, folder))
    return files


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value from the text exposition."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def wait(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def results_in(pacs: Orthanc, study_uid: str, expect: int) -> list[dict]:
    return pacs.wait_instances(
        lambda tags: len([t for t in tags if t.get("StudyInstanceUID") == study_uid and t.get("Modality") in ("SR", "OT", "PR")]) >= expect,
        timeout=90)


@pytest.fixture()
def pacs(tmp_path):
    o = Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


class SyslogCollector:
    """A UDP syslog collector on a free loopback port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []

    def drain(self) -> list[bytes]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536))
            except TimeoutError:
                return self.messages


@pytest.fixture()
def syslog():
    s = SyslogCollector()
    yield s
    s.sock.close()


@pytest.fixture()
def node(tmp_path, pacs, syslog):
    # the sender would poll only every 5 s: results arriving sooner prove the worker woke it
    port = free_port()
    n = NodeProcess(tmp_path / "node", pacs=pacs, rules=RULES,
                    config=node_config(port, sender={"poll_interval": 5},
                                       audit={"syslog": {"host": "127.0.0.1", "port": syslog.port}}))
    n.metrics_port = port
    n.start()
    wait(lambda: get(port, "/readyz")[0] == 200, 60, "/readyz")
    yield n
    n.stop()


def test_metrics_change_as_a_study_goes_through(node, pacs, tmp_path):
    port = node.metrics_port
    assert get(port, "/healthz") == (200, "ok\n")
    before = scrape(port)
    files = make_study(tmp_path / "in", 3)
    src = pydicom.dcmread(files[0])
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr
    assert storescu(node.port, files[:1], aet="INTRUDER").returncode != 0
    bad = copy.deepcopy(src)
    del bad.StudyInstanceUID
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CR_IMAGE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.send_c_store(bad).Status == 0xC000
    assoc.release()
    results_in(pacs, src.StudyInstanceUID, 3)
    after = wait(lambda: (m := scrape(port)).get('dicomnode_study_to_delivery_seconds_count{destination="pacs"}') and m,
                 30, "the end-to-end observation")

    assert delta(after, before, "dicomnode_instances_received_total") == 3
    payload = sum(f.stat().st_size for f in files)
    assert 0.8 * payload < delta(after, before, "dicomnode_received_bytes_total") <= payload
    assert delta(after, before, 'dicomnode_associations_total{outcome="accepted",reason=""}') == 2
    assert delta(after, before, 'dicomnode_associations_total{outcome="rejected",reason="calling AE title not recognised"}') == 1
    assert delta(after, before, 'dicomnode_cstore_failures_total{status="0xC000"}') == 1
    assert delta(after, before, 'dicomnode_studies_completed_total{reason="quiet"}') == 1
    assert delta(after, before, 'dicomnode_jobs_finished_total{analyzer="intensity_probe",outcome="done"}') == 1
    for hist in ("dicomnode_job_queue_wait_seconds", "dicomnode_analysis_seconds", "dicomnode_encode_seconds"):
        assert delta(after, before, f'{hist}_count{{analyzer="intensity_probe"}}') == 1, hist
        assert after[f'{hist}_sum{{analyzer="intensity_probe"}}'] > 0, hist
    assert delta(after, before, 'dicomnode_objects_sent_total{destination="pacs"}') == 3
    assert after['dicomnode_jobs{analyzer="intensity_probe",state="done"}'] == 1
    assert after['dicomnode_jobs{analyzer="intensity_probe",state="queued"}'] == 0
    assert after['dicomnode_outbox_pending{destination="pacs"}'] == 0
    assert after['dicomnode_outbox_oldest_pending_age_seconds{destination="pacs"}'] == 0
    assert after.get("dicomnode_worker_restarts_total", 0) == 0

    # `dicomnode status` reads the same numbers
    r = node.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["metrics"]
    assert m["instances_received"] == after["dicomnode_instances_received_total"]
    assert m["bytes_received"] == after["dicomnode_received_bytes_total"]
    assert m["objects_sent"] == 3 and m["studies_completed"] == 1 and m["jobs_finished"] == {"done": 1}
    assert m["associations"] == {"accepted": 2, "rejected": 1} and m["cstore_failures"] == {"0xC000": 1}
    assert m["study_to_delivery_seconds"]["count"] == 1
    assert m["study_to_delivery_seconds"]["mean"] == round(after['dicomnode_study_to_delivery_seconds_sum{destination="pacs"}'], 3)
    text = node.cli("status").stdout
    assert "since start: 3 instances" in text and "study complete -> last result acknowledged: median" in text

    # no polling between stages: from study complete to the last result acknowledged by Orthanc,
    # with a sender that would otherwise wait up to 5 s, the node adds little to analysis and encoding
    e2e = after['dicomnode_study_to_delivery_seconds_sum{destination="pacs"}']
    assert after['dicomnode_study_to_delivery_seconds_count{destination="pacs"}'] == 1
    own = e2e - after['dicomnode_analysis_seconds_sum{analyzer="intensity_probe"}'] \
        - after['dicomnode_encode_seconds_sum{analyzer="intensity_probe"}']
    assert 0 < e2e < 3.0 and own < 0.5, (e2e, own)


def test_readyz_fails_while_the_index_cannot_be_written_and_when_the_worker_is_down(node):
    port = node.metrics_port
    status, body = get(port, "/readyz")
    assert status == 200 and all(c["ok"] for c in json.loads(body)["checks"].values()), body

    holder = sqlite3.connect(node.data_dir / "index.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock: nothing can be written
    try:
        status, body = get(port, "/readyz")
        checks = json.loads(body)["checks"]
        assert status == 503 and not checks["database"]["ok"] and "cannot be written" in checks["database"]["detail"]
        assert checks["disk"]["ok"] and checks["receiver"]["ok"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert get(port, "/readyz")[0] == 200

    worker_pid = json.loads(sqlite3.connect(node.data_dir / "index.sqlite").execute(
        "SELECT value FROM node_status WHERE key LIKE 'worker:%' ORDER BY updated_at DESC LIMIT 1").fetchone()[0])["pid"]
    import os

    os.kill(worker_pid, signal.SIGKILL)
    status, body = wait(lambda: (r := get(port, "/readyz"))[0] == 503 and r, 10, "/readyz to fail")
    assert not json.loads(body)["checks"]["worker0"]["ok"]
    assert get(port, "/healthz")[0] == 200  # the process is up, just not ready
    wait(lambda: get(port, "/readyz")[0] == 200, 60, "/readyz after the worker restart")
    assert scrape(port)["dicomnode_worker_restarts_total"] == 1


def test_readyz_fails_when_the_spool_disk_is_below_its_floor(tmp_path):
    import shutil

    free_mb = shutil.disk_usage(tmp_path).free / (1 << 20)
    port = free_port()
    n = NodeProcess(tmp_path / "node", rules=RULES, config=node_config(port, metrics={
        "host": "127.0.0.1", "port": port, "min_free_mb": free_mb + 100_000}))
    n.start()
    try:
        status, body = wait(lambda: (r := get(port, "/readyz"))[1] and r, 30, "/readyz")
        checks = json.loads(body)["checks"]
        assert status == 503 and not checks["disk"]["ok"] and "metrics.min_free_mb" in checks["disk"]["detail"]
        assert checks["database"]["ok"]
    finally:
        n.stop()


def test_audit_trail_has_the_events_of_one_study_and_no_patient_identity(node, pacs, tmp_path, syslog):
    files = make_study(tmp_path / "in", 3, seed=4)
    src = pydicom.dcmread(files[0])
    assert storescu(node.port, files).returncode == 0
    results = results_in(pacs, src.StudyInstanceUID, 3)
    result_uids = {t["SOPInstanceUID"] for t in results if t.get("Modality") in ("SR", "OT", "PR")}
    node.wait_for(lambda: len([e for e in audit_events(node) if e["event"] == "object_delivered"]) >= 3, 30, "audit")
    node.stop()  # the stop event too

    events = [e for e in audit_events(node) if e.get("study_uid") in (None, src.StudyInstanceUID)]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "node_started" and kinds[-1] == "node_stopped"
    received = [e for e in events if e["event"] == "study_received"]
    assert len(received) == 1
    assert received[0]["calling_ae"] == "STORESCU" and received[0]["host"] == "127.0.0.1"
    assert received[0]["instances"] == 3 and received[0]["sop_classes"] == {CR_IMAGE: 3}
    analysis = [e for e in events if e["event"] == "analysis"]
    assert len(analysis) == 1
    a = analysis[0]
    assert (a["rule"], a["analyzer"], a["analyzer_version"], a["result"], a["objects"]) == ("probe", "intensity_probe", "1.0", "done", 3)
    assert a["models"] == [{"name": "intensity-probe", "version": "1.0", "sha256": "0" * 64}]
    delivered = [e for e in events if e["event"] == "object_delivered"]
    assert {e["sop_uid"] for e in delivered} == result_uids
    assert all(e["destination"] == "pacs" and e["status"] == "acknowledged" and e["outcome"] == "success" for e in delivered)

    text = Path(node.data_dir / "audit.log").read_text() + node.log_path.read_text()
    for value in PHI.values():
        assert value not in text and value.replace("^", " ") not in text

    # the same events as RFC 5424 syslog carrying DICOM PS3.15 audit messages
    messages = syslog.drain()
    assert len(messages) >= len(events)
    codes = []
    for raw in messages:
        assert raw.startswith(b"<8") and b" dicomnode " in raw and b" DICOM+RFC3881 - \xef\xbb\xbf" in raw
        for value in PHI.values():
            assert value.encode() not in raw
        root = ET.fromstring(raw.split(b"\xef\xbb\xbf", 1)[1])
        code = root.find("EventIdentification/EventID").get("csd-code")
        codes.append(code)
        if code in ("110103", "110104"):
            assert root.find("ParticipantObjectIdentification").get("ParticipantObjectID") == src.StudyInstanceUID
    assert codes.count("110104") >= 4 and codes.count("110103") == 1 and codes.count("110100") == 2


def audit_events(node: NodeProcess) -> list[dict]:
    path = node.data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_an_ended_association_completes_a_study_whose_required_series_are_in(tmp_path, pacs):
    """The sweep would come only once a minute; the end of the association (in either receiver process) wakes it."""
    rules = [{**RULES[0], "stable_after": 300, "required_series": [{"Modality": {"equals": "CR"}}]}]
    port = free_port()
    n = NodeProcess(tmp_path / "node", pacs=pacs, rules=rules,
                    config=node_config(port, node={"receivers": 2}, assembly={"stable_after": 300, "sweep_interval": 60}))
    n.start()
    try:  # both receiver processes listen before the pushes, so the kernel spreads them over both
        n.wait_for(lambda: any(e.get("event") == "receiver_listening" and e.get("process", "").startswith("receiver-")
                               for e in n.log_events()), 60, "the second receiver process")
        for seed in (11, 12, 13, 14):
            files = make_study(tmp_path / f"in{seed}", 1, seed=seed)
            study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
            assert storescu(n.port, files).returncode == 0
            pushed = time.time()
            n.wait_for(lambda: any(e.get("event") == "study_complete" and e.get("study_uid") == study_uid
                                   for e in n.log_events()), 30, "study_complete")
            event = next(e for e in n.log_events() if e.get("event") == "study_complete" and e.get("study_uid") == study_uid)
            import datetime as dt

            at = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            assert event["reason"] == "required_series" and at - pushed < 2.0, (event, at - pushed)
    finally:
        n.stop()


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 MB tmpfs, so the disk can really be filled (needs root; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_makes_the_node_unready_and_refuses_instances_without_crashing(small_disk, tmp_path):
    import os
    import shutil

    port = free_port()
    n = NodeProcess(tmp_path / "node", rules=RULES, config=node_config(
        port, storage={"data_dir": str(small_disk / "data")}, metrics={"host": "127.0.0.1", "port": port, "min_free_mb": 16}))
    n.start()
    filler = small_disk / "filler"
    try:
        wait(lambda: get(port, "/readyz")[0] == 200, 60, "/readyz")
        before = scrape(port)
        with open(filler, "wb") as f:  # leave 8 MB: below the 16 MB floor, still room for an instance
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small_disk).free - (8 << 20))
        status, body = get(port, "/readyz")
        checks = json.loads(body)["checks"]
        assert status == 503 and not checks["disk"]["ok"] and "metrics.min_free_mb=16" in checks["disk"]["detail"]
        assert storescu(n.port, make_study(tmp_path / "a", 1, seed=21)).returncode == 0

        with open(filler, "ab") as f:  # now nothing is left
            os.posix_fallocate(f.fileno(), 0, filler.stat().st_size + shutil.disk_usage(small_disk).free)
        r = storescu(n.port, make_study(tmp_path / "b", 1, seed=22))
        assert r.returncode != 0  # storescu's exit status for a failure status from the peer
        assert any(e.get("event") == "store_failed" and e.get("reason") == "cannot write" for e in n.log_events())
        after = scrape(port)
        assert delta(after, before, 'dicomnode_cstore_failures_total{status="0xA700"}') == 1
        assert delta(after, before, "dicomnode_instances_received_total") == 1
        assert get(port, "/healthz")[0] == 200 and get(port, "/readyz")[0] == 503

        filler.unlink()
        wait(lambda: get(port, "/readyz")[0] == 200, 10, "/readyz once space is back")
    finally:
        n.stop()
        filler.unlink(missing_ok=True)


def test_the_compose_stacks_orthanc_script_routes_studies_to_the_node_and_keeps_the_results(tmp_path):
    """deploy/orthanc/autoroute.lua in a real Orthanc: what a modality sends goes on to the node; the
    node's results come back into Orthanc and are not forwarded again."""
    script = Path(__file__).resolve().parents[2] / "deploy" / "orthanc" / "autoroute.lua"
    orthanc = Orthanc(tmp_path / "orthanc", lua_scripts=[script])
    port = free_port()
    n = NodeProcess(tmp_path / "node", pacs=orthanc, rules=RULES, config=node_config(port))
    orthanc.modalities = {"dicomnode": ["DICOMNODE", "127.0.0.1", n.port]}
    orthanc.start()
    n.start()
    try:
        files = make_study(tmp_path / "in", 2, seed=31)
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert storescu(orthanc.dicom_port, files, aet="MODALITY", aec="PACS").returncode == 0
        results_in(orthanc, study_uid, 3)
        time.sleep(2)  # a result forwarded back to the node would arrive within this
        m = scrape(port)
        assert m["dicomnode_instances_received_total"] == 2
        assert m['dicomnode_study_to_delivery_seconds_count{destination="pacs"}'] == 1
    finally:
        n.stop()
        orthanc.stop()


def test_admin_changes_are_audited_with_the_user(tmp_path, monkeypatch):
    n = NodeProcess(tmp_path / "node", rules=RULES, config=node_config(free_port()))
    n.data_dir.mkdir(parents=True)
    monkeypatch.setenv("SUDO_USER", "alice")
    assert n.cli("rules", "list").returncode == 0
    r = n.cli("rules", "add", "cr-extra", "--match", "Modality=DX", "--analyzer", "intensity_probe")
    assert r.returncode == 0, r.stderr
    assert n.cli("rules", "disable", "cr-extra").returncode == 0
    assert n.cli("rules", "remove", "nope").returncode != 0  # refused: nothing changed, nothing recorded
    events = audit_events(n)
    assert [(e["event"], e["action"], e["target"], e["user"]) for e in events] == [
        ("admin_change", "rules add", "cr-extra", "alice"), ("admin_change", "rules disable", "cr-extra", "alice")]
