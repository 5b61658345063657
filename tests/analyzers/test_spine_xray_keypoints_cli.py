"""A phantom lateral spine study through `dicomnode analyze`: SR, GSPS objects that pass dciodvfy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom

from analyzers.spine_xray_keypoints.analyzer import SpineXrayKeypoints
from tests.dicomtools import dciodvfy

REPO = Path(__file__).resolve().parents[2]
DICOMNODE = str(Path(sys.executable).parent / "dicomnode")


def test_dicomnode_analyze_writes_valid_result_objects(tmp_path: Path) -> None:
    folder = SpineXrayKeypoints.write_phantoms(tmp_path / "in", 1, seed=9401)[0]
    out = tmp_path / "out"
    proc = subprocess.run(
        [DICOMNODE, "analyze", "--analyzer", "spine_xray_keypoints", "--out", str(out), "--json", str(folder)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report[0]["outcome"] == "ok"
    written = sorted(out.glob("*.dcm"))
    kinds = {p.name.split("_")[0] for p in written}
    assert {"sr", "gsps"} <= kinds
    truth = json.loads((folder / "truth.json").read_text())
    for p in written:
        ds = pydicom.dcmread(p)
        assert ds.StudyInstanceUID == truth["study_instance_uid"]
        assert dciodvfy(p).errors == [], p.name
