"""`dicomnode echo` and `dicomnode send` against real peers, by destination name or DCMTK-style HOST PORT."""

from __future__ import annotations

import json
import subprocess

import pydicom
import pytest
import yaml

from tests.e2e.test_cli_analyze import run
from tests.e2e.test_pipeline import make_study
from tests.peers import PEER_ENV, Orthanc, free_port, have_peers, wait_port

pytestmark = pytest.mark.skipif(not have_peers(), reason="Orthanc or DCMTK not installed")


@pytest.fixture()
def orthanc(tmp_path):
    o = Orthanc(tmp_path / "orthanc", aet="ORTHANC").start()
    yield o
    o.stop()


@pytest.fixture()
def storescp(tmp_path):
    """DCMTK storescp, writing what it receives into a folder; yields (port, folder)."""
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["/usr/bin/storescp", "-od", str(out), str(port)], env=PEER_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 10, proc)
    yield port, out
    proc.terminate()
    proc.wait(10)


def test_echo_and_send_to_orthanc_by_host_and_port_with_the_given_ae_titles(tmp_path, orthanc):
    port = str(orthanc.dicom_port)
    r = run("echo", "-aet", "TESTSCU", "-aec", "ORTHANC", "127.0.0.1", port, cwd=tmp_path)  # no configuration needed
    assert r.returncode == 0 and r.stdout.startswith("ORTHANC@127.0.0.1:" + port + ": C-ECHO success"), r.stdout + r.stderr

    files = make_study(tmp_path / "study", 3, seed=41)
    r = run("send", "-aet", "TESTSCU", "-aec", "ORTHANC", "127.0.0.1", port, str(tmp_path / "study"), cwd=tmp_path)
    assert r.returncode == 0 and "3 of 3 files stored" in r.stdout, r.stdout + r.stderr
    stored = orthanc.wait_instances(lambda tags: len(tags) == 3, timeout=30)
    assert {t["SOPInstanceUID"] for t in stored} == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    # the peer saw the AE titles given on the command line
    assert {orthanc.get(f"/instances/{t['_id']}/metadata/RemoteAET").decode() for t in stored} == {"TESTSCU"}


def test_send_to_a_configured_destination_and_to_storescp(tmp_path, orthanc, storescp):
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"ae_title": "MYNODE"},
                                   "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}}}))
    files = make_study(tmp_path / "study", 2, seed=42)
    r = run("send", "--config", str(cfg), "pacs", *map(str, files), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["peer"].startswith("pacs (ORTHANC@") and sorted(report["stored"]) == sorted(map(str, files))
    stored = orthanc.wait_instances(lambda tags: len(tags) == 2, timeout=30)
    assert {orthanc.get(f"/instances/{t['_id']}/metadata/RemoteAET").decode() for t in stored} == {"MYNODE"}

    port, out = storescp
    r = run("echo", "--config", str(cfg), "127.0.0.1", str(port))  # storescp answers any called AE (ANY-SCP by default)
    assert r.returncode == 0 and "ANY-SCP@127.0.0.1" in r.stdout and "C-ECHO success" in r.stdout
    r = run("send", "--config", str(cfg), "-aec", "STORESCP", "127.0.0.1", str(port), *map(str, files))
    assert r.returncode == 0 and "2 of 2 files stored" in r.stdout, r.stdout + r.stderr
    received = {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir()}
    assert received == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}


def test_peers_that_do_not_answer_or_do_not_exist(tmp_path):
    closed = str(free_port())
    r = run("echo", "-aec", "NOBODY", "127.0.0.1", closed, cwd=tmp_path)
    assert r.returncode == 1 and "association failed" in r.stdout
    files = make_study(tmp_path / "study", 1, seed=43)
    r = run("send", "127.0.0.1", closed, str(files[0]), cwd=tmp_path)
    assert r.returncode == 1 and "association failed" in r.stdout
    r = run("echo", "nowhere", cwd=tmp_path)
    assert r.returncode == 2 and "neither a configured destination" in r.stderr
    r = run("send", "127.0.0.1", closed, cwd=tmp_path)
    assert r.returncode == 2 and "name the files" in r.stderr
    r = run("echo", "-aec", "A" * 17, "127.0.0.1", closed, cwd=tmp_path)
    assert r.returncode == 2 and "-aec must be 1-16 characters" in r.stderr
