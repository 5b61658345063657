"""Every registered analyzer's results as a radiologist sees them in the OHIF viewer.

For each analyzer: a phantom study and the objects `dicomnode analyze` makes from it are stored in
a test Orthanc with DICOMweb and opened in OHIF 3.13.2 in headless Chromium: the default layout,
then each SEG and each SR. Screenshots and each view's console are in ``conftest.SHOTS``.
"""

from __future__ import annotations

import re

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.viewer.conftest import SHOTS
from tests.viewer.studies import registered_analyzers

pytestmark = pytest.mark.viewer

ANALYZERS = registered_analyzers()
# A concept printed as "363698007: C3 vertebra" (code value before its meaning) is unreadable.
RAW_CODE = re.compile(r"\b\d{5,}:\s")
# More lines than this beside one outline is a wall of numbers, not a label.
MAX_LABEL_LINES = 4


def _views(report: dict, analyzer: str, kind: str) -> list[dict]:
    return [v for v in report["views"] if v["name"].startswith(f"{analyzer}-") and v["kind"] == kind]


def _tracked_objects(path) -> int:
    """Distinct tracking UIDs of the SR's measurement groups: OHIF draws each tracked object once."""
    import highdicom as hd

    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    return len({g.tracking_uid for g in groups})



def _overlap(a: dict, b: dict) -> float:
    """Height in pixels of the overlap of two label boxes (0 when they do not meet)."""
    dx = min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"])
    dy = min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"])
    return max(0.0, dy) if dx > 0 else 0.0


def _viewport_pixels(view: dict) -> np.ndarray:
    box = view["viewportBox"]
    image = Image.open(view["screenshot"]).convert("L")
    x, y, w, h = (int(box[k]) for k in ("x", "y", "width", "height"))
    return np.asarray(image.crop((x, y, x + w, y + h)), dtype=np.float32)


@pytest.mark.parametrize("analyzer", ANALYZERS)
def test_image_shows(viewer_report, analyzer):
    (view,) = _views(viewer_report, analyzer, "image")
    assert view["ready"] and view["canvases"] > 0, f"no image in the viewport; see {view['screenshot']}"
    pixels = _viewport_pixels(view)
    # A black viewport (bar its text overlay, well under 1 %) means the image did not render; a whole-body DXA
    # in the scanner's narrow portrait geometry lights about 4-5 % of a wide viewport.
    assert (pixels > 40).mean() > 0.02, f"the viewport is blank; see {view['screenshot']}"


@pytest.mark.parametrize("analyzer", ANALYZERS)
def test_each_seg_loads_and_lists_its_segments(viewer_report, analyzed, analyzer):
    segs = analyzed[analyzer].of_modality("SEG")
    views = _views(viewer_report, analyzer, "SEG")
    assert len(views) == len(segs)
    for view, path in zip(views, segs):
        labels = [str(s.SegmentLabel) for s in pydicom.dcmread(path, stop_before_pixels=True).SegmentSequence]
        assert view["thumbnailFound"] and view["hydratePrompt"], f"OHIF offered no SEG to load; see {view['screenshot']}"
        assert view["ready"], f"the SEG did not finish loading; see {view['screenshot']}"
        assert view["segmentRows"] == labels, f"see {view['screenshot']}"
        assert "Loading" not in view["viewportText"]


@pytest.mark.parametrize("analyzer", ANALYZERS)
def test_each_sr_draws_its_measurements_with_readable_labels(viewer_report, analyzed, analyzer):
    srs = analyzed[analyzer].of_modality("SR")
    views = _views(viewer_report, analyzer, "SR")
    assert len(srs) == len(views) >= 1
    for view, path in zip(views, srs):
        where = f"see {view['screenshot']}"
        assert view["thumbnailFound"] and view["ready"], f"OHIF drew nothing from the SR; {where}"
        assert view["annotations"] == _tracked_objects(path), f"not every measured object of the SR is drawn; {where}"
        assert view["svgLabels"], f"the SR's outlines carry no labels; {where}"
        for label in view["svgLabels"]:
            assert not RAW_CODE.search(label), f"label shows a raw code value: {label!r}; {where}"
            assert len(label.splitlines()) <= MAX_LABEL_LINES, f"label too long to read: {label!r}; {where}"
        boxes = view["labelBoxes"]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert _overlap(a, b) < 2, f"labels drawn over each other: {a['text']!r} and {b['text']!r}; {where}"


@pytest.mark.parametrize("analyzer", ANALYZERS)
def test_no_console_errors(viewer_report, analyzed, analyzer):
    views = [v for v in viewer_report["views"] if v["name"].startswith(f"{analyzer}-")]
    assert views
    for view in views:
        assert not view["somethingWentWrong"], f"OHIF shows 'Something went wrong'; see {view['screenshot']}"
        assert view["errors"] == [], f"see {SHOTS / (view['name'] + '.console.txt')}"
    study = f"/studies/{analyzed[analyzer].study_uid}/"
    assert [r for r in viewer_report["failed_requests"] if study in r["path"]] == [], "Orthanc refused requests"
