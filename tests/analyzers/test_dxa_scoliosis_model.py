"""dxa_scoliosis networks: per-scan-line losses, in-graph evidence maps, ONNX export parity."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from analyzers.dxa_scoliosis import inference  # noqa: E402
from analyzers.dxa_scoliosis.model import ClsNet, SegNet, heaviside, scanline_losses  # noqa: E402
from analyzers.dxa_scoliosis.train import _mid_distribution, export, targets  # noqa: E402


def _nets(seed: int = 0):
    torch.manual_seed(seed)
    seg, cls = SegNet(width=4), ClsNet(width=8, fc=32, hidden=16)
    for m in (seg, cls):  # non-trivial batch-norm statistics, so export of eval-mode BN is exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return seg.eval(), cls.eval()


def test_onnx_matches_torch(tmp_path):
    seg, cls = _nets()
    seg_path, cls_path = export(seg, cls, tmp_path)
    x = torch.rand(2, 1, 416, 128)
    with torch.no_grad():
        y = seg(x)
        ref = [t.numpy() for t in cls(x, y)]
    s = ort.InferenceSession(str(seg_path), providers=["CPUExecutionProvider"])
    c = ort.InferenceSession(str(cls_path), providers=["CPUExecutionProvider"])
    y_onnx = s.run(["conv11"], {"image": x.numpy()})[0]
    np.testing.assert_allclose(y_onnx, y.numpy(), rtol=1e-3, atol=1e-4)
    outs = c.run(["p_scoliosis", "p_positioning", "p_curves", "evidence"], {"image": x.numpy(), "soft_mask": y_onnx})
    for got, want in zip(outs, ref):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert outs[3].shape == (2, 26, 8)


def test_in_graph_evidence_equals_autograd_gradient_times_activation():
    _, cls = _nets(1)
    x = torch.rand(1, 1, 416, 128)
    m = torch.randn(1, 6, 416, 128)
    out, act = cls.logits(x, m)
    a_raw, a_mask = act["a_raw"], act["a_mask"]
    a_raw.retain_grad()
    a_mask.retain_grad()
    (out["scoliosis"][0, 1] - out["scoliosis"][0, 0]).backward()
    cam = torch.relu((a_raw.grad * a_raw).sum(1) + (a_mask.grad * a_mask).sum(1))
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-6)
    with torch.no_grad():
        _, act2 = cls.logits(x, m)
        mine = cls.evidence(act2)
    np.testing.assert_allclose(mine.numpy(), cam.detach().numpy(), rtol=1e-3, atol=1e-5)


def test_scanline_losses_prefer_the_true_midpoint_and_thickness():
    masks = np.zeros((1, 6, 416, 128), bool)
    masks[0, 1, 100:300, 60:70] = True
    mid, thick = targets(masks[0])
    assert np.isnan(mid[1, 50]) and mid[1, 150] == pytest.approx(64.5) and thick[1, 150] == 10
    dist = torch.from_numpy(_mid_distribution(mid[None]))
    th = torch.from_numpy(thick[None])
    good = torch.full((1, 6, 416, 128), -2.0)
    good[0, 1, 100:300, 60:70] = 2.0
    good[0, 1, 100:300, 64:66] = 3.0
    bad = torch.roll(good, 20, dims=-1)
    thin = good.clone()
    thin[0, 1, 100:300, 60:63] = -2.0
    lm_good, lt_good = scanline_losses(good, dist, th)
    lm_bad, _ = scanline_losses(bad, dist, th)
    _, lt_thin = scanline_losses(thin, dist, th)
    assert lm_good < lm_bad
    assert lt_good < lt_thin
    # the rebuilt mask of the ideal output is the labelled part
    y = good[0].numpy()
    mid_hat, thick_hat = inference.midpoints(y)
    rebuilt = inference.rebuild_masks(mid_hat, thick_hat)
    iou = (rebuilt[1] & masks[0, 1]).sum() / (rebuilt[1] | masks[0, 1]).sum()
    assert iou > 0.95
    assert float(heaviside(torch.tensor(0.5))) == pytest.approx(0.5)


def test_mirror_swaps_legs():
    soft = np.zeros((1, 6, 4, 8), np.float32)
    soft[0, 4, :, 1] = 1.0
    out = inference.mirror(soft)
    assert out[0, 5, 0, 6] == 1.0 and out[0, 4].sum() == 0
