"""One viewer session for the whole suite: every registered analyzer's phantom study and results in
one Orthanc with DICOMweb, opened view by view in OHIF; the tests then read the browser's report."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.peers import REPO, Orthanc
from tests.viewer import ohif
from tests.viewer.studies import AnalyzedStudy, analyze_phantom, registered_analyzers, views

# Where the screenshots go; every failing assertion names it.
SHOTS = Path(os.environ.get("DICOMNODE_VIEWER_SHOTS", REPO / ".viewer" / "screenshots"))


@pytest.fixture(scope="session")
def analyzed(tmp_path_factory) -> dict[str, AnalyzedStudy]:
    reason = ohif.missing()
    if reason:
        # CI installs the viewer (scripts/test.sh --viewer) and must not pass by skipping.
        if os.environ.get("DICOMNODE_VIEWER_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("viewer")
    return {name: analyze_phantom(name, work) for name in registered_analyzers()}


@pytest.fixture(scope="session")
def viewer_report(analyzed, tmp_path_factory) -> dict:
    shutil.rmtree(SHOTS, ignore_errors=True)
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True).start()
    try:
        for study in analyzed.values():
            orthanc.upload(study.sources + study.results)
        with ohif.ViewerSite(orthanc.http_port) as site:
            # A full-HD screen: the smallest a radiologist reads on.
            job = {"base": site.url, "width": 1920, "height": 1080,
                   "views": [v for study in analyzed.values() for v in views(study)]}
            report = ohif.run_browser(job, SHOTS, timeout=600)
            report["failed_requests"] = list(site.failed_requests)
    finally:
        orthanc.stop()
    report["by_name"] = {v["name"]: v for v in report["views"]}
    return report
