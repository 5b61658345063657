"""The checker helpers report what they should, so tests built on them can fail."""

from __future__ import annotations

from tests.dicomtools import dciodvfy, dcmpschk, dsrdump
from tests.encoders.results import cr_study


def test_dciodvfy_reports_a_missing_type1_attribute(tmp_path):
    ds = cr_study().series[0].instances[0].dataset
    assert not dciodvfy(ds).errors
    del ds.StudyInstanceUID
    report = dciodvfy(ds)
    assert any("StudyInstanceUID" in line for line in report.errors), report.output


def test_dsrdump_and_dcmpschk_refuse_an_image(tmp_path):
    ds = cr_study().series[0].instances[0].dataset
    assert dsrdump(ds).errors
    assert dcmpschk(ds).errors
