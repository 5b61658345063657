"""spine_mri_grading networks: ONNX against torch, the class-balanced multi-task loss, the chain model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from analyzers.spine_mri_grading import inference
from analyzers.spine_mri_grading.constants import CORNER_SIZE, DETECTOR_SIZE, DISC_SHAPE, DISC_SLICES, N_CLASSES, VERTEBRAE
from analyzers.spine_mri_grading.model import CornerRegressor, GradingNet, VertebraDetector, balanced_multitask_loss
from analyzers.spine_mri_grading.train import class_weights, export

WEIGHTS = Path(__file__).resolve().parents[2] / "analyzers" / "spine_mri_grading" / "weights"
NETS = {
    "detector": (lambda: VertebraDetector(8), (1, DETECTOR_SIZE, DETECTOR_SIZE), "image", "grid"),
    "corners": (lambda: CornerRegressor(CORNER_SIZE), (1, CORNER_SIZE, CORNER_SIZE), "crops", "corners"),
    "grading": (lambda: GradingNet(4, 64), (DISC_SLICES, *DISC_SHAPE), "discs", "logits"),
}


def _parity(net: torch.nn.Module, path: Path, shape: tuple[int, ...], in_name: str) -> None:
    x = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {in_name: x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(NETS))
def test_exported_graph_matches_torch(name: str, tmp_path: Path) -> None:
    make, shape, in_name, out_name = NETS[name]
    torch.manual_seed(1)
    net = make()
    export(net, tmp_path / f"{name}.onnx", shape, in_name, out_name)
    _parity(net, tmp_path / f"{name}.onnx", shape, in_name)


@pytest.mark.parametrize("name", list(NETS))
def test_bundled_weights_match_their_torch_state(name: str) -> None:
    make, shape, in_name, _ = NETS[name]
    onnx_path, pt = WEIGHTS / f"{name}.onnx", WEIGHTS / f"{name}.pt"
    assert onnx_path.is_file() and pt.is_file(), f"bundled {name} weights are missing; run analyzers/spine_mri_grading/train.py"
    net = make()
    net.load_state_dict(torch.load(pt))
    _parity(net, onnx_path, shape, in_name)


def test_grading_net_has_one_head_per_grading() -> None:
    net = GradingNet(4, 32).eval()
    out = net(torch.zeros(2, DISC_SLICES, *DISC_SHAPE))
    assert out.shape == (2, sum(N_CLASSES)) and len(net.heads) == len(N_CLASSES)


def test_loss_ignores_missing_labels_and_balances_classes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, sum(N_CLASSES), requires_grad=True)
    labels = torch.tensor([[0, 1, 0, 1, 0, 0, 0, 1]] * 4)
    labels[:, 6] = -1  # spondylolisthesis unknown for every disc
    weights = class_weights(np.array([[0, 0, 0, 0, 0, 0, 0, 0]] * 9 + [[1, 1, 1, 1, 1, 1, 1, 1]]))
    loss = balanced_multitask_loss(logits, labels, weights)
    loss.backward()
    start = sum(N_CLASSES[:6])
    assert torch.all(logits.grad[:, start: start + 2] == 0)
    assert torch.any(logits.grad[:, :start] != 0)
    # the rare class weighs nine times the common one (alpha_c = 1 / freq(c))
    assert float(weights[2][1] / weights[2][0]) == pytest.approx(9.0)
    # a task with no valid label adds nothing, also no NaN
    none = balanced_multitask_loss(logits, torch.full((4, 8), -1), weights)
    assert float(none) == 0.0


def _cand(kind: int, x: float, y: float, score: float = 0.9, height: float = 26.0, depth: float = 38.0, angle: float = 0.0):
    return inference.Candidate(kind, score, 5.0, np.array([x, y]), height, depth, angle)


def _prior() -> inference.ChainPrior:
    low = np.tile([-15.0, 25.0, 0.7, -40.0], (6, 1))
    high = np.tile([15.0, 45.0, 1.4, 40.0], (6, 1))
    return inference.ChainPrior(low, high)


def test_chain_is_anchored_on_the_sacrum_and_labels_upwards() -> None:
    # bodies every 35 px (1 mm pixels) from T10 down to L5, the sacrum below, and two false positives
    ys = {name: 40.0 + 35.0 * i for i, name in enumerate(["T10", "T11", *VERTEBRAE[:-1]])}
    cands = [_cand(0, 100.0, y) for y in ys.values()]
    cands += [_cand(0, 30.0, 150.0, score=0.95), _cand(0, 100.0, 20.0 + 35.0 * 9, score=0.3)]
    cands.append(_cand(1, 105.0, ys["L5"] + 37.0))
    picked, cost = inference.label_chain(cands, _prior(), 1.0)
    assert np.isfinite(cost)
    assert {k: float(v.centre[1]) for k, v in picked.items() if k != "S1"} == {k: ys[k] for k in VERTEBRAE[:-1]}


def test_chain_without_sacrum_or_with_too_few_bodies_is_rejected() -> None:
    cands = [_cand(0, 100.0, 40.0 + 35.0 * i) for i in range(8)]
    assert inference.label_chain(cands, _prior(), 1.0) == ({}, float("inf"))
    few = [_cand(0, 100.0, 40.0 + 35.0 * i) for i in range(4)] + [_cand(1, 100.0, 200.0)]
    assert inference.label_chain(few, _prior(), 1.0)[1] == float("inf")


def test_chain_outside_the_trained_bounds_costs_more() -> None:
    ys = [40.0 + 35.0 * i for i in range(6)]
    good = [_cand(0, 100.0, y) for y in ys] + [_cand(1, 100.0, ys[-1] + 35.0)]
    bent = [_cand(0, 100.0 + (40.0 if i == 2 else 0.0), y) for i, y in enumerate(ys)] + [_cand(1, 100.0, ys[-1] + 35.0)]
    assert inference.label_chain(bent, _prior(), 1.0)[1] >= inference.label_chain(good, _prior(), 1.0)[1] + inference.HIGH_COST


def test_annotated_study_folders_give_training_samples(tmp_path: Path) -> None:
    import json

    from analyzers.spine_mri_grading.constants import GRADING_KEYS, LEVELS
    from analyzers.spine_mri_grading.phantom import write_phantoms
    from analyzers.spine_mri_grading.train import annotated_samples

    folder = write_phantoms(tmp_path, 1, seed=9320)[0]
    truth = json.loads((folder / "truth.json").read_text())
    s = annotated_samples(folder, np.random.default_rng(0))
    assert s["discs"].shape == (len(LEVELS), DISC_SLICES, *DISC_SHAPE)
    assert s["labels"].tolist() == [[truth["discs"][lvl]["grades"][k] for k in GRADING_KEYS] for lvl in LEVELS]
    assert s["heat"][:, 1].max() > 0.9, "the sacrum gives no detector target"
    assert np.all(np.abs(s["corners"]) < 1.0), "corners fall outside their crops"
    assert set(s["chain"]) == set(VERTEBRAE)
