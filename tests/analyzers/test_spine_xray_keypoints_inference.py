"""The array pipeline of spine_xray_keypoints with stand-in networks: decoding, MC sigma, classes, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.analysis import UncertaintyClass
from analyzers.spine_xray_keypoints import inference, preprocess
from analyzers.spine_xray_keypoints.constants import CERVICAL

GRID = 16


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _grid(boxes: dict[int, tuple[float, float, float, float]], n_cls: int = 5) -> np.ndarray:
    """A detector output holding ``boxes`` (class -> cx, cy, w, h in detector pixels)."""
    cell = preprocess.DETECTOR_SIZE / GRID
    g = np.zeros((1, 5 + n_cls, GRID, GRID), np.float32)
    g[0, 0] = -8.0
    for k, (cx, cy, w, h) in boxes.items():
        j, i = int(cx // cell), int(cy // cell)
        g[0, 0, i, j] = 8.0
        g[0, 1, i, j] = _logit(cx / cell - j)
        g[0, 2, i, j] = _logit(cy / cell - i)
        g[0, 3, i, j] = math.log(w / cell)
        g[0, 4, i, j] = math.log(h / cell)
        g[0, 5 + k, i, j] = 10.0
    return g


def test_decoding_returns_boxes_in_source_pixels_per_label() -> None:
    g = _grid({0: (100.0, 60.0, 40.0, 20.0), 3: (120.0, 180.0, 44.0, 22.0)})
    found = inference.decode_detections(g, (512, 1024), CERVICAL)
    assert set(found) == {"C3", "C6"}
    box, score = found["C3"]
    assert score > 0.9
    np.testing.assert_allclose(box, [80 * 4, 50 * 2, 120 * 4, 70 * 2], atol=1e-3)


def _cell(g: np.ndarray, cx: float, cy: float, obj: float, probs: list[float], w: float = 40.0, h: float = 20.0) -> None:
    """One proposal in ``g`` with objectness ``obj`` and class probabilities ``probs``."""
    cell = preprocess.DETECTOR_SIZE / GRID
    j, i = int(cx // cell), int(cy // cell)
    g[0, 0, i, j] = _logit(obj)
    g[0, 1, i, j] = _logit(cx / cell - j)
    g[0, 2, i, j] = _logit(cy / cell - i)
    g[0, 3, i, j] = math.log(w / cell)
    g[0, 4, i, j] = math.log(h / cell)
    g[0, 5:10, i, j] = np.log(np.asarray(probs) + 1e-6)


def test_labels_follow_the_spine_from_top_to_bottom() -> None:
    """Five vertebrae one above the other: the classifier's doubts do not swap, merge or drop labels."""
    g = np.zeros((1, 10, GRID, GRID), np.float32)
    g[0, 0] = -8.0
    # C3 sure; C4 unsure, leaning to C5 (argmax per label would give C5 twice and no C4);
    # C5 sure; C6 faint (objectness 0.3); C7 sure
    _cell(g, 130, 42, 0.95, [0.9, 0.05, 0.02, 0.02, 0.01])
    _cell(g, 130, 82, 0.9, [0.05, 0.4, 0.5, 0.04, 0.01])
    _cell(g, 130, 122, 0.95, [0.01, 0.04, 0.9, 0.04, 0.01])
    _cell(g, 130, 162, 0.3, [0.01, 0.04, 0.15, 0.6, 0.2])
    _cell(g, 130, 202, 0.95, [0.01, 0.01, 0.03, 0.05, 0.9])
    found = inference.decode_detections(g, (256, 256), CERVICAL)
    assert list(found) == list(CERVICAL)
    centres = [(found[k][0][1] + found[k][0][3]) / 2 for k in CERVICAL]
    np.testing.assert_allclose(centres, [42, 82, 122, 162, 202], atol=1e-3)


def test_weak_proposals_below_the_floor_are_not_vertebrae() -> None:
    g = np.zeros((1, 10, GRID, GRID), np.float32)
    g[0, 0] = -8.0
    _cell(g, 130, 42, 0.95, [0.9, 0.05, 0.02, 0.02, 0.01])
    _cell(g, 130, 122, 0.12, [0.01, 0.04, 0.9, 0.04, 0.01])  # 0.12 x 0.9 < 0.15
    assert list(inference.decode_detections(g, (256, 256), CERVICAL)) == ["C3"]


def test_overlapping_proposals_count_once() -> None:
    g = np.zeros((1, 10, GRID, GRID), np.float32)
    g[0, 0] = -8.0
    # one vertebra proposed by two neighbouring cells, both reading it as C4
    _cell(g, 120, 70, 0.9, [0.1, 0.8, 0.1, 0.0, 0.0], w=48, h=30)
    _cell(g, 122, 82, 0.6, [0.1, 0.8, 0.1, 0.0, 0.0], w=48, h=30)
    found = inference.decode_detections(g, (256, 256), CERVICAL)
    assert list(found) == ["C4"]
    assert abs((found["C4"][0][1] + found["C4"][0][3]) / 2 - 70) < 1e-3


def test_predict_combines_aleatoric_and_epistemic_sigma_in_mm() -> None:
    img = np.random.default_rng(0).random((512, 512)).astype(np.float32)
    spacing = (0.2, 0.4)
    g = _grid({k: (61.0 + 30 * k, 43.0 + 40 * k, 40.0, 20.0) for k in range(5)})
    logvar = math.log(1e-4)
    seen = {}

    def kp_fn(crops: np.ndarray, m1: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen["crops"], seen["masks"] = crops.shape, m1.shape
        t, n = m1.shape[:2]
        mean = np.full((t, n, 10), 0.5, np.float32)
        mean[:, :, 0] += np.linspace(-0.01, 0.01, t)[:, None]  # spread over samples: epistemic part of point 1
        return mean, np.full((t, n, 10), logvar, np.float32)

    preds = inference.predict(img, spacing, "cervical", lambda x: g, kp_fn, hidden=8, p_drop=0.25, samples=6, refine=False)
    assert [p.label for p in preds] == list(CERVICAL)
    assert seen["crops"] == (5, 1, *preprocess.CROP_SHAPE) and seen["masks"] == (6, 5, 8)
    for p in preds:
        cbox = preprocess.crop_box(p.box)
        centre = [(cbox[0] + cbox[2]) / 2, (cbox[1] + cbox[3]) / 2]
        np.testing.assert_allclose(p.points[1:], np.tile(centre, (4, 1)), atol=1e-6)
        w_mm, h_mm = (cbox[2] - cbox[0]) * spacing[1], (cbox[3] - cbox[1]) * spacing[0]
        np.testing.assert_allclose(p.sigma_aleatoric_mm, math.sqrt(1e-4 * (w_mm**2 + h_mm**2)), rtol=1e-5)
        assert p.sigma_epistemic_mm[0] > 0 and np.all(p.sigma_epistemic_mm[1:] == 0)
        assert p.sigma_mm[0] > p.sigma_mm[1]


def test_classes_follow_the_thresholds() -> None:
    assert inference.classify(0.2, 0.5, 1.0) is UncertaintyClass.CERTAIN
    assert inference.classify(0.5, 0.5, 1.0) is UncertaintyClass.MODERATE
    assert inference.classify(1.0, 0.5, 1.0) is UncertaintyClass.HIGH


def test_calibration_meets_its_error_bounds_on_validation_points() -> None:
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.1, 3.0, 5000)
    error = np.abs(rng.normal(0, np.select([sigma < 1, sigma < 2], [0.3, 0.95], 3.0)))
    tau1, tau2 = inference.calibrate(sigma, error)
    assert 0.1 < tau1 < tau2 < 3.0
    assert np.quantile(error[sigma < tau1], 0.95) <= 1.5
    assert np.quantile(error[(sigma >= tau1) & (sigma < tau2)], 0.95) <= 2.0
    # the thresholds are the largest that keep the bounds: a bit higher breaks them
    assert np.quantile(error[sigma < tau1 * 1.3], 0.95) > 1.45


def test_clahe_keeps_range_and_raises_local_contrast() -> None:
    x = (0.5 + 0.03 * np.random.default_rng(2).standard_normal((64, 128))).astype(np.float32)
    y = preprocess.clahe(x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert y.std() > 2 * x.std()
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.9


def test_calibration_lowers_tau2_until_hidden_points_are_highly_uncertain() -> None:
    rng = np.random.default_rng(3)
    sigma = rng.uniform(0.1, 3.0, 4000)
    error = np.abs(rng.normal(0, np.select([sigma < 1, sigma < 2], [0.3, 0.95], 3.0)))
    hidden = rng.uniform(1.2, 3.0, 200)
    plain = inference.calibrate(sigma, error)
    tau1, tau2 = inference.calibrate(sigma, error, invisible_sigma=hidden)
    assert tau2 < plain[1] and tau1 <= tau2
    assert np.mean(hidden >= tau2) >= 0.9


@pytest.mark.parametrize("face", [1.0, -1.0])
def test_corner_patches_put_the_body_to_the_lower_right(face: float) -> None:
    """Whichever way the spine faces, each corner's patch shows its body below and right of the corner."""
    # anterior-superior, posterior-superior, posterior-inferior, anterior-inferior, spinous process
    pts = np.array([[0.0, 0.0], [40.0, 2.0], [40.0, 30.0], [0.0, 28.0], [70.0, 15.0]])
    pts[:, 0] = 200 + face * pts[:, 0]
    pts[:, 1] += 100
    centre = pts[:4].mean(0)
    boxes = preprocess.corner_boxes(pts)
    assert len(boxes) == 4
    for k, box in enumerate(boxes):
        corner = preprocess.to_crop(pts[k], box)
        np.testing.assert_allclose(corner, [0.5, 0.5], atol=1e-9)
        body = preprocess.to_crop(centre, box)
        assert body[0] > 0.5 and body[1] > 0.5
        np.testing.assert_allclose(abs(box[2] - box[0]), 2 * preprocess.CORNER_HALF * 40.0, rtol=0.01)
        np.testing.assert_allclose(preprocess.from_crop(corner, box), pts[k])
    # cropping follows the box's direction: the patch of a mirrored image is the same patch
    img = np.random.default_rng(0).random((300, 400))
    a = preprocess.crop(img, boxes[0], preprocess.CORNER_SHAPE)
    b = preprocess.crop(img[:, ::-1].copy(), np.array([400 - boxes[0][0], boxes[0][1], 400 - boxes[0][2], boxes[0][3]]), preprocess.CORNER_SHAPE)
    np.testing.assert_allclose(a, b, atol=1e-6)
