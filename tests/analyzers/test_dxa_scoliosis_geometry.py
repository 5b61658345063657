"""dxa_scoliosis curve geometry and phantom ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from analyzers.dxa_scoliosis.geometry import LEVELS, count_curves, curve_class, curves_from_angles, lateral_deviation, level_at, midline_angles
from analyzers.dxa_scoliosis.phantom import POSITIONING_LIMITS, _cos_interp, make_case, sample_body, sample_spine


def test_curves_between_turning_points():
    # tilt goes +15 -> -15 -> +10: two curves of 30 and 25 degrees; the ends' small swings are curves too
    theta = np.array([12, 15, 10, 0, -10, -15, -8, 0, 10, 8])
    curves = curves_from_angles(theta, min_swing=1.0)
    cobbs = [round(c.cobb) for c in curves]
    assert cobbs == [3, 30, 25, 2]
    assert count_curves(curves) == 2 and curve_class(2) == ">1"
    apex = curves[1]
    assert apex.upper == 1 and apex.lower == 5 and theta[apex.apex] == 0


def test_jitter_below_the_swing_is_no_curve():
    rng = np.random.default_rng(0)
    theta = rng.uniform(-1.5, 1.5, 50)
    curves = curves_from_angles(theta, min_swing=4.0)
    assert count_curves(curves) == 0 and max(c.cobb for c in curves) <= 3.0


def test_midline_tangents_recover_a_known_arc():
    rows = np.arange(200.0)
    cols = 60 + 10 * np.sin(np.pi * rows / 199)  # one smooth bow
    th = midline_angles(rows, cols, sigma=2.0)
    cobb = max(c.cobb for c in curves_from_angles(th))
    expected = 2 * np.degrees(np.arctan(10 * np.pi / 199))
    assert cobb == pytest.approx(expected, abs=0.5)
    curve = max(curves_from_angles(th), key=lambda c: c.cobb)
    i, dev = lateral_deviation(rows, cols, curve)
    assert abs(i - 100) <= 2 and 8.5 <= dev <= 10.1  # ends of the curve sit a little inside the bow after smoothing


def test_levels_span_t1_to_l5():
    assert level_at(0.0) == "T1" and level_at(0.999) == "L5" and len(LEVELS) == 17
    assert level_at(0.5) in ("T9", "T10", "T11")


@pytest.mark.parametrize("kind", ["straight", "single", "double"])
def test_phantom_truth_follows_the_drawn_spine(kind):
    rng = np.random.default_rng(90_500)
    for _ in range(3):
        case = make_case(rng, kind=kind)
        t = case["truth"]
        assert t["scoliosis"] == (t["cobb_deg"] >= 10) == (t["curves_class"] != "0")
        assert t["n_curves"] == len(t["apex_levels"]) == len(t["curves"])
        assert t["curves_class"] == ("0" if t["n_curves"] == 0 else "1" if t["n_curves"] == 1 else ">1")
        for c in t["curves"]:
            assert c["cobb_deg"] >= 10 and LEVELS.index(c["upper"]) < LEVELS.index(c["apex"]) <= LEVELS.index(c["lower"])
        if kind == "straight":
            assert t["curves_class"] == "0"
        assert case["masks"].shape[0] == 6 and all(case["masks"][k].any() for k in range(6))


def test_labels_have_no_margin_around_the_thresholds():
    """Curvature and pose are drawn continuously: cases lie on both sides close to each threshold."""
    rng = np.random.default_rng(90_510)
    cobbs = []
    for _ in range(150):
        _, ks, kv = sample_spine(rng)
        s = np.linspace(0, 1, 17)
        curves = curves_from_angles(_cos_interp(s, ks, kv), min_swing=1.0)
        cobbs.append(max((c.cobb for c in curves), default=0.0))
    cobbs = np.array(cobbs)
    assert ((cobbs >= 8) & (cobbs < 10)).sum() >= 3 and ((cobbs >= 10) & (cobbs < 12)).sum() >= 3
    trunk = np.array([abs(sample_body(rng).trunk_tilt) for _ in range(300)])
    limit = POSITIONING_LIMITS["trunk"]
    assert ((trunk >= limit - 1) & (trunk < limit)).sum() >= 3 and ((trunk >= limit) & (trunk < limit + 1)).sum() >= 3


def test_spine_shapes_vary():
    rng = np.random.default_rng(1)
    apices = {round(float(np.mean(sample_spine(rng, "single")[1][-3:-1])), 3) for _ in range(20)}
    assert len(apices) > 10
