"""Each bundled analyzer through the whole node: phantom study → storescu → default rules → Orthanc.

Uses the shipped config/rules.yaml, so the default routing of each analyzer is exercised too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import yaml

from dicomnode.registry import analyzer_class
from tests.dicomtools import dciodvfy
from tests.peers import REPO, NodeProcess, Orthanc, have_peers, storescu_each_syntax

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not have_peers(), reason="Orthanc/DCMTK not installed")]

BUNDLED = ["chest_xray_thoracic", "spine_xray_keypoints", "dxa_scoliosis", "spine_mri_grading", "ct_vertebral_fracture"]


@pytest.mark.parametrize("name", BUNDLED)
def test_phantom_study_through_the_node(name, tmp_path):
    analyzer_class(name)().load()  # the bundled weights are there and check out
    pacs = Orthanc(tmp_path / "pacs").start()
    rules = yaml.safe_load((REPO / "config" / "rules.yaml").read_text())
    for r in rules:
        r["stable_after"] = 1
    node = NodeProcess(tmp_path / "node", pacs=pacs, rules=rules, config={"analyzers": {"device": "cpu"}})
    try:
        node.start()
        folders = analyzer_class(name).write_phantoms(tmp_path / "ph", 1, 424242)
        files = [p for p in Path(folders[0]).rglob("*.dcm")]
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        for r in storescu_each_syntax(node.port, files):
            assert r.returncode == 0, r.stderr

        def settled():
            jobs = json.loads(node.cli("jobs", "--json").stdout)
            return jobs and all(j["state"] in ("done", "not_applicable", "failed") for j in jobs)

        node.wait_for(settled, 240, f"{name} jobs to finish")
        jobs = json.loads(node.cli("jobs", "--json").stdout)
        assert [j["analyzer"] for j in jobs] == [name]
        assert jobs[0]["state"] == "done", jobs[0]["error"]
        expected = jobs[0]["n_objects"]
        assert expected >= 2
        tags = pacs.wait_instances(
            lambda t: len([x for x in t if x.get("StudyInstanceUID") == study_uid and x.get("Modality") in ("SR", "SEG", "OT", "PR")]) >= expected,
            timeout=120)
        results = [t for t in tags if t.get("Modality") in ("SR", "SEG", "OT", "PR")]
        assert "SR" in {t["Modality"] for t in results}
        for t in results:
            path = tmp_path / f"{t['_id']}.dcm"
            path.write_bytes(pacs.instance_file(t["_id"]))
            assert dciodvfy(path).errors == [], (t["Modality"], t.get("SeriesDescription"))
    finally:
        node.stop()
        pacs.stop()
        shutil.rmtree(tmp_path / "pacs", ignore_errors=True)
