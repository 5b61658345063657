"""The exported ONNX graphs compute what the torch models compute, MC-dropout masks included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from analyzers.spine_xray_keypoints import preprocess
from analyzers.spine_xray_keypoints.model import BayeCBAMKeypointNet, VertebraDetector, aleatoric_loss
from analyzers.spine_xray_keypoints.train import export_detector, export_keypoints

WEIGHTS = Path(__file__).resolve().parents[2] / "analyzers" / "spine_xray_keypoints" / "weights"


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _keypoint_parity(net: BayeCBAMKeypointNet, path: Path, shape: tuple[int, int] = preprocess.CROP_SHAPE) -> None:
    rng = np.random.default_rng(0)
    crops = rng.standard_normal((3, 1, *shape)).astype(np.float32)
    m1 = (rng.random((4, 3, net.hidden)) > net.p_drop).astype(np.float32)
    m2 = (rng.random((4, 3, net.hidden)) > net.p_drop).astype(np.float32)
    with torch.no_grad():
        mean, logvar = net.eval()(torch.from_numpy(crops), torch.from_numpy(m1), torch.from_numpy(m2))
    got_mean, got_logvar = _session(path).run(["mean", "logvar"], {"crops": crops, "mask1": m1, "mask2": m2})
    assert got_mean.shape == (4, 3, 2 * net.n_points)
    np.testing.assert_allclose(got_mean, mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_logvar, logvar.numpy(), atol=1e-4)
    # different masks give different samples: MC dropout lives in the graph
    assert np.abs(got_mean[0] - got_mean[1]).max() > 0


def test_exported_keypoint_graph_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = BayeCBAMKeypointNet(width=4, hidden=16)
    export_keypoints(net, tmp_path / "kp.onnx")
    _keypoint_parity(net, tmp_path / "kp.onnx")


def test_exported_detector_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = VertebraDetector(5, width=4).eval()
    export_detector(net, tmp_path / "det.onnx")
    x = np.random.default_rng(1).standard_normal((1, 1, preprocess.DETECTOR_SIZE, preprocess.DETECTOR_SIZE)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = _session(tmp_path / "det.onnx").run(["grid"], {"image": x})[0]
    assert got.shape == (1, 10, 16, 16)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("name", ["keypoints_cervical", "keypoints_lumbar", "keypoints_body_cervical", "keypoints_body_lumbar",
                                  "keypoints_corner_cervical", "keypoints_corner_lumbar"])
def test_bundled_keypoint_weights_match_their_torch_state(name: str) -> None:
    pt = WEIGHTS / f"{name}.pt"
    if not pt.is_file():
        pytest.skip(f"no bundled torch state for {name}")
    state = torch.load(pt)
    width = state["features.0.0.weight"].shape[0]
    cells = state["fc1.weight"].shape[1] // (4 * width)  # the last pooling grid, 4 rows
    net = BayeCBAMKeypointNet(width=width, hidden=state["fc1.weight"].shape[0], pool=(4, cells // 4),
                              n_points=state["mean_head.weight"].shape[0] // 2)
    net.load_state_dict(state)
    shape = {"body": preprocess.BODY_CROP_SHAPE, "corner": preprocess.CORNER_SHAPE}.get(name.split("_")[1], preprocess.CROP_SHAPE)
    _keypoint_parity(net, WEIGHTS / f"{name}.onnx", shape)


def test_aleatoric_loss_prefers_honest_variance() -> None:
    target = torch.zeros(100, 10)
    mean = torch.full((100, 10), 0.1)
    honest = aleatoric_loss(mean, torch.full((100, 10), float(np.log(0.01))), target)
    overconfident = aleatoric_loss(mean, torch.full((100, 10), float(np.log(1e-5))), target)
    underconfident = aleatoric_loss(mean, torch.full((100, 10), 0.0), target)
    assert honest < overconfident and honest < underconfident
