"""Mensuration of spine_xray_keypoints on hand-built keypoints with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analyzers.spine_xray_keypoints.constants import CERVICAL
from analyzers.spine_xray_keypoints.mensuration import measure

SPACING = (0.5, 0.25)  # (row, column) mm: anisotropic on purpose


def _px(points_mm: np.ndarray, width: float = 400.0, mirror: bool = False) -> np.ndarray:
    """mm (x anterior, y up) -> pixels (column, row); ``mirror`` makes the patient face left."""
    col = points_mm[:, 0] / SPACING[1] + 200.0
    row = -points_mm[:, 1] / SPACING[0] + 300.0
    if mirror:
        col = width - col
    return np.stack([col, row], axis=1)


def _vertebra(centre: tuple[float, float], angle_deg: float, depth: float = 16.0, ha: float = 14.0, hp: float = 14.0) -> np.ndarray:
    a = math.radians(angle_deg)
    e, n = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    c = np.asarray(centre)
    as_ = c + e * depth / 2 + n * ha / 2
    ps = c - e * depth / 2 + n * hp / 2
    pi = c - e * depth / 2 - n * hp / 2
    ai = c + e * depth / 2 - n * ha / 2
    tip = (ps + pi) / 2 - e * 20
    return np.array([as_, ps, pi, ai, tip])


def _two_level() -> dict[str, np.ndarray]:
    upper = np.array([[16.0, 15.6], [0.0, 14.0], [0.0, 0.0], [16.0, 1.6], [-20.0, 5.0]])
    lower = np.array([[18.0, -5.0], [2.0, -5.0], [2.0, -19.0], [18.0, -19.0], [-18.0, -12.0]])
    return {"C4": upper, "C5": lower}


@pytest.mark.parametrize("mirror", [False, True])
def test_level_measurements_match_hand_computation(mirror: bool) -> None:
    pts = {k: _px(v, mirror=mirror) for k, v in _two_level().items()}
    got = {(m.key, m.group): m.value for m in measure(pts, SPACING, "cervical")}
    assert got[("anterior_vertebral_height", "C4")] == pytest.approx(14.0)
    assert got[("posterior_vertebral_height", "C4")] == pytest.approx(14.0)
    assert got[("posterior_disc_height", "C4-C5")] == pytest.approx(math.hypot(2.0, 5.0))
    assert got[("anterior_disc_height", "C4-C5")] == pytest.approx(math.hypot(2.0, 6.6))
    # the upper endplate rises anteriorly: a lordotic (positive) angle
    assert got[("intervertebral_angle", "C4-C5")] == pytest.approx(math.degrees(math.atan2(1.6, 16.0)))
    # the upper vertebra sits 2 mm posterior: retrolisthesis is negative
    assert got[("sagittal_translation", "C4-C5")] == pytest.approx(-2.0)
    assert got[("sagittal_translation_percent", "C4-C5")] == pytest.approx(-12.5)
    assert ("lordosis", "C3-C7") not in got


def test_lordosis_sign_and_value_over_the_whole_span() -> None:
    angles = [10.0, 5.0, 0.0, -5.0, -10.0]
    pts = {label: _px(_vertebra((0.0, -22.0 * k), angles[k])) for k, label in enumerate(CERVICAL)}
    got = {(m.key, m.group): m.value for m in measure(pts, SPACING, "cervical")}
    assert got[("lordosis", "C3-C7")] == pytest.approx(20.0, abs=1e-6)
    for up, lo in zip(CERVICAL[:-1], CERVICAL[1:]):
        assert got[("intervertebral_angle", f"{up}-{lo}")] == pytest.approx(5.0, abs=1e-6)
    kyphotic = {label: _px(_vertebra((0.0, -22.0 * k), -angles[k])) for k, label in enumerate(CERVICAL)}
    got = {(m.key, m.group): m.value for m in measure(kyphotic, SPACING, "cervical")}
    assert got[("lordosis", "C3-C7")] == pytest.approx(-20.0, abs=1e-6)


def test_uncertainty_propagates_and_records_its_points() -> None:
    pts = {k: _px(v) for k, v in _two_level().items()}
    sig = {"C4": np.full(5, 0.4), "C5": np.array([0.3, 0.3, 0.3, 0.3, 2.0])}
    values = measure(pts, SPACING, "cervical", sig)
    height = next(m for m in values if m.key == "anterior_vertebral_height" and m.group == "C4")
    assert height.sigma == pytest.approx(math.sqrt((0.4**2 + 0.4**2) / 2))
    assert set(height.depends_on) == {("C4", 0), ("C4", 3)}
    angle = next(m for m in values if m.key == "intervertebral_angle")
    assert 0 < angle.sigma < 5
    assert all(m.sigma is None for m in measure(pts, SPACING, "cervical"))
