"""`dicomnode analyze` and `dicomnode echo` as a user runs them: subprocesses, exit codes, files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

from tests.dicomtools import dciodvfy
from tests.e2e.test_pipeline import BUNDLED, make_study
from tests.peers import REPO, Orthanc, have_peers

DICOMNODE = str(Path(sys.executable).parent / "dicomnode")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DICOMNODE, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture()
def probe_config(tmp_path):
    cfg = {"analyzers": {"plugins": ["tests.plugins.probe:IntensityProbe"],
                         "settings": {name: {"enabled": False} for name in BUNDLED}},
           "storage": {"data_dir": "data"}}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "rules.yaml").write_text("[]\n")
    return path


def test_analyze_writes_valid_objects_and_exits_0(tmp_path, probe_config):
    files = make_study(tmp_path / "in", 2, seed=31)
    out = tmp_path / "out"
    r = run("analyze", "--config", str(probe_config), "--analyzer", "intensity_probe", "--out", str(out), str(tmp_path / "in"))
    assert r.returncode == 0, r.stderr
    written = sorted(out.glob("*.dcm"))
    assert {p.name.split("_")[0] for p in written} == {"sr", "sc", "gsps"}
    src = pydicom.dcmread(files[0])
    for p in written:
        ds = pydicom.dcmread(p)
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert dciodvfy(p).errors == [], p.name
        assert str(p) in r.stdout


def test_analyze_declines_with_exit_3_and_one_line(tmp_path, probe_config, realdata):
    r = run("analyze", "--config", str(probe_config), "--analyzer", "intensity_probe", "--out", str(tmp_path / "o"),
            str(realdata / "dcmqi" / "data" / "sr-example" / "sr.dcm"))
    assert r.returncode == 3, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "not applicable: no CR, DX, CT or MR series; this analyzer needs an image series"
    assert not list((tmp_path / "o").glob("*.dcm"))


def test_analyze_usage_errors_exit_2(tmp_path, probe_config):
    r = run("analyze", "--config", str(probe_config), "--analyzer", "nonesuch", "--out", str(tmp_path), str(tmp_path))
    assert r.returncode == 2 and "unknown analyzer 'nonesuch'" in r.stderr
    r = run("analyze", "--config", str(probe_config), "--analyzer", "intensity_probe", "--out", str(tmp_path), str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    r = run("analyze", "--config", str(probe_config), "--analyzer", "intensity_probe", "--out", str(tmp_path / "o"), str(tmp_path / "junk.dcm"))
    assert r.returncode == 2 and "no DICOM instances" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {port: 70000}\n")
    r = run("studies", "--config", str(bad))
    assert r.returncode == 2 and "node.port" in r.stderr


@pytest.mark.skipif(not have_peers(), reason="Orthanc not installed")
def test_echo_a_destination(tmp_path):
    pacs = Orthanc(tmp_path / "pacs").start()
    try:
        cfg = tmp_path / "node.yaml"
        cfg.write_text(yaml.safe_dump({"destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}}}))
        r = run("echo", "pacs", "--config", str(cfg))
        assert r.returncode == 0 and "C-ECHO success" in r.stdout
        assert run("echo", "nowhere", "--config", str(cfg)).returncode == 2
    finally:
        pacs.stop()
    r = run("echo", "pacs", "--config", str(cfg))
    assert r.returncode == 1 and "association failed" in r.stdout
