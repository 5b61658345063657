"""Phantom lateral spine radiographs: real DICOM files, truth that matches them, variation across seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom

from dicomnode.imaging import display_image, pixel_spacing
from analyzers.spine_xray_keypoints.analyzer import SpineXrayKeypoints
from analyzers.spine_xray_keypoints.constants import LEVELS
from analyzers.spine_xray_keypoints.phantom import render


def test_written_studies_are_lateral_spine_radiographs_with_truth(tmp_path: Path) -> None:
    folders = SpineXrayKeypoints.write_phantoms(tmp_path, 2, seed=4242)
    assert len(folders) == 2
    regions = []
    for folder in folders:
        files = list(folder.glob("*.dcm"))
        assert len(files) == 1
        ds = pydicom.dcmread(files[0])
        truth = json.loads((folder / "truth.json").read_text())
        regions.append(truth["region"])
        assert ds.Modality in ("CR", "DX")
        assert ds.BodyPartExamined == {"cervical": "CSPINE", "lumbar": "LSPINE"}[truth["region"]]
        assert ds.ViewPosition in ("LL", "RL", "LAT")
        assert pixel_spacing(ds) == tuple(truth["pixel_spacing"])
        assert ds.StudyInstanceUID == truth["study_instance_uid"] and ds.PatientID.startswith("PH-")
        assert set(truth["vertebrae"]) <= set(LEVELS[truth["region"]])
        for v in truth["vertebrae"].values():
            assert np.asarray(v["points"]).shape == (5, 2) and len(v["visible"]) == 5
        keys = {m["key"] for m in truth["measurements"]}
        assert {"anterior_vertebral_height", "intervertebral_angle", "sagittal_translation"} <= keys
        img = display_image(ds)
        assert img.shape == (ds.Rows, ds.Columns) and img.std() > 0.05
    assert sorted(regions) == ["cervical", "lumbar"]


def test_bone_is_brighter_than_the_disc_at_the_truth_points() -> None:
    ph = render(np.random.default_rng([77, 1]), "lumbar")
    img = ph.pixels.astype(float)
    if ph.photometric == "MONOCHROME1":
        img = img.max() - img
    p = ph.points["L3"]
    inside = ((p[0] + p[1] + p[2] + p[3]) / 4).astype(int)
    disc = ((ph.points["L3"][2] + ph.points["L4"][1]) / 2).astype(int)
    assert img[inside[1], inside[0]] > img[disc[1], disc[0]]


def test_phantoms_vary_and_repeat_with_the_seed() -> None:
    a = render(np.random.default_rng([5, 0]), "cervical")
    b = render(np.random.default_rng([5, 0]), "cervical")
    c = render(np.random.default_rng([5, 1]), "cervical")
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.pixels.shape != c.pixels.shape or not np.array_equal(a.pixels, c.pixels)
    heights = []
    for i in range(12):
        ph = render(np.random.default_rng([6, i]), "cervical" if i % 2 else "lumbar")
        p = next(iter(ph.points.values()))
        heights.append(np.linalg.norm(p[0] - p[3]) * ph.spacing[0])
    assert np.ptp(heights) > 5.0
