"""chest_xray_thoracic networks: shapes, feature weighting, ONNX parity, DenseNet-121 import."""

from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from analyzers.chest_xray_thoracic.model import (  # noqa: E402
    LABELS,
    ClassifierExport,
    DenseNetConfig,
    SegmenterExport,
    ThoracicClassifier,
    UNet,
    import_torchvision_densenet,
    infer_config,
    normalise_torchvision_keys,
)
from analyzers.chest_xray_thoracic.train import export_classifier, export_segmenter  # noqa: E402

TINY = DenseNetConfig(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2)


def _torchvision_state(growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4, classes=14, seed=0):
    """A randomly initialised state dict with torchvision's DenseNet key layout, built key by key."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()

    def bn(prefix, c):
        state[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        state[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)
        state[f"{prefix}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[f"{prefix}.running_var"] = 1 + 0.1 * torch.rand(c, generator=g)
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(100)

    def conv(name, cout, cin, k):
        state[name] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    conv("features.conv0.weight", init, 3, 7)
    bn("features.norm0", init)
    n = init
    for b, layers in enumerate(blocks, start=1):
        for i in range(1, layers + 1):
            p = f"features.denseblock{b}.denselayer{i}"
            cin = n + (i - 1) * growth
            bn(f"{p}.norm1", cin)
            conv(f"{p}.conv1.weight", bn_size * growth, cin, 1)
            bn(f"{p}.norm2", bn_size * growth)
            conv(f"{p}.conv2.weight", growth, bn_size * growth, 3)
        n += layers * growth
        if b != len(blocks):
            bn(f"features.transition{b}.norm", n)
            conv(f"features.transition{b}.conv.weight", n // 2, n, 1)
            n //= 2
    bn("features.norm5", n)
    state["classifier.weight"] = torch.randn(classes, n, generator=g) * 0.05
    state["classifier.bias"] = torch.randn(classes, generator=g) * 0.1
    return state


def _reference_densenet(state, x, blocks):
    """torchvision's DenseNet forward written out with functional ops over the raw state dict."""

    def bn(p, t):
        return F.batch_norm(t, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"], state[f"{p}.bias"], False, 0.0, 1e-5)

    t = F.conv2d(x, state["features.conv0.weight"], stride=2, padding=3)
    t = F.max_pool2d(F.relu(bn("features.norm0", t)), 3, 2, 1)
    for b, layers in enumerate(blocks, start=1):
        feats = [t]
        for i in range(1, layers + 1):
            p = f"features.denseblock{b}.denselayer{i}"
            h = torch.cat(feats, 1)
            h = F.conv2d(F.relu(bn(f"{p}.norm1", h)), state[f"{p}.conv1.weight"])
            h = F.conv2d(F.relu(bn(f"{p}.norm2", h)), state[f"{p}.conv2.weight"], padding=1)
            feats.append(h)
        t = torch.cat(feats, 1)
        if b != len(blocks):
            t = F.conv2d(F.relu(bn(f"features.transition{b}.norm", t)), state[f"features.transition{b}.conv.weight"])
            t = F.avg_pool2d(t, 2, 2)
    t = F.relu(bn("features.norm5", t))
    return F.linear(t.mean(dim=(2, 3)), state["classifier.weight"], state["classifier.bias"])


def test_densenet121_import_reproduces_the_checkpoint():
    torch.manual_seed(0)
    state = _torchvision_state()
    net = import_torchvision_densenet(state)
    assert net.cfg == DenseNetConfig()  # full DenseNet-121 width inferred from the keys
    assert net.cfg.num_features == 1024
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits, cam = net(x, torch.ones(1, 1, 224, 224))
        ref = _reference_densenet(state, x, (6, 12, 24, 16))
    assert logits.shape == (1, 14) and cam.shape == (1, 14, 7, 7)
    # the pass-through attention multiplies by sigmoid(12) ~ 1 - 6e-6
    np.testing.assert_allclose(logits.numpy(), ref.numpy(), atol=2e-3, rtol=1e-3)


def test_import_accepts_common_checkpoint_variants_and_rejects_wrong_heads():
    state = _torchvision_state(growth=8, blocks=(2, 3, 4, 2), init=16, bn_size=2)
    old = OrderedDict()
    for k, v in state.items():
        k2 = k.replace("norm1.", "norm.1.").replace("conv1.", "conv.1.").replace("norm2.", "norm.2.").replace("conv2.", "conv.2.")
        k2 = k2.replace("classifier.", "classifier.0.")
        old["module.densenet121." + k2] = v
    assert set(normalise_torchvision_keys(old)) == set(state)
    cfg = infer_config(normalise_torchvision_keys(old))
    assert cfg == DenseNetConfig(growth_rate=8, block_config=(2, 3, 4, 2), num_init_features=16, bn_size=2)
    net = import_torchvision_densenet(old)
    assert torch.equal(net.classifier.weight, state["classifier.weight"])
    assert not hasattr(net, "global_classifier")  # logits come from the mask-weighted features only
    bad = dict(state)
    bad["classifier.weight"] = torch.zeros(15, cfg.num_features)
    with pytest.raises(ValueError, match="expected \\(14,"):
        import_torchvision_densenet(bad)
    with pytest.raises(ValueError, match="not a torchvision DenseNet"):
        import_torchvision_densenet({"foo": torch.zeros(1)})


def test_feature_weighting_ignores_features_outside_the_mask():
    torch.manual_seed(1)
    net = ThoracicClassifier(TINY).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        mask = torch.zeros(2, 1, 224, 224)
        mask[:, :, 40:200, 40:200] = 1
        base, cam = net(x, mask)
        fg, fl, mg = net.feature_maps(x, mask)
        # the paper's adaptive average pooling: cells on the mask's edge keep their fraction inside
        assert torch.any((mg > 0) & (mg < 1)) and torch.all(mg[:, :, 0, 0] == 0) and torch.all(mg[:, :, 3, 3] == 1)
        torch.testing.assert_close(fl, fg * mg)
        assert torch.all(fl[mg.expand_as(fl) == 0] == 0)
        assert torch.all(cam[:, :, mg[0, 0] == 0] == 0)
        # the logit is the spatial mean of the class activation map plus the bias (exact CAM)
        np.testing.assert_allclose(base.numpy(), (cam.mean(dim=(2, 3)) + net.classifier.bias).numpy(), atol=1e-5)
        # no unweighted path: a blank mask leaves only the bias, whatever the image
        blank, _ = net(x, torch.zeros_like(mask))
        np.testing.assert_allclose(blank.numpy(), net.classifier.bias.expand(2, -1).numpy(), atol=1e-6)
        assert not torch.allclose(blank, base, atol=1e-3)


def test_onnx_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(2)
    unet = UNet(base=4, downsample=2).eval()
    net = ThoracicClassifier(TINY).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in list(unet.modules()) + list(net.modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    export_segmenter(unet, tmp_path / "seg.onnx")
    export_classifier(net, tmp_path / "cls.onnx")
    x = torch.randn(2, 3, 224, 224)
    mask = (torch.rand(2, 1, 224, 224) > 0.3).float()
    with torch.no_grad():
        seg_ref = SegmenterExport(unet)(x).numpy()
        prob_ref, ev_ref = (t.numpy() for t in ClassifierExport(net)(x, mask))
    seg = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    prob, ev = ort.InferenceSession(str(tmp_path / "cls.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy(), "mask": mask.numpy()})
    np.testing.assert_allclose(seg, seg_ref, atol=1e-4)
    np.testing.assert_allclose(prob, prob_ref, atol=1e-4)
    np.testing.assert_allclose(ev, ev_ref, atol=1e-3)
    assert prob.shape == (2, len(LABELS)) and ev.shape == (2, len(LABELS), 224, 224)
    assert ev.min() >= 0 and ev.max() <= 1 + 1e-5
    assert np.all(ev[np.broadcast_to(mask.numpy() == 0, ev.shape)] == 0)  # evidence only on lungs and heart


def test_onnx_weights_load_back_into_torch_and_train_with_frozen_batchnorm(tmp_path):
    """The ONNX initializers load back into the torch modules and reproduce the exported networks."""
    ort = pytest.importorskip("onnxruntime")
    from analyzers.onnx_import import load_from_onnx

    torch.manual_seed(3)
    unet = UNet(base=4, downsample=2).eval()
    net = ThoracicClassifier(TINY, dropout=0.1).eval()
    with torch.no_grad():
        for m in list(unet.modules()) + list(net.modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
    export_segmenter(unet, tmp_path / "seg.onnx")
    export_classifier(net, tmp_path / "cls.onnx")
    x = torch.randn(2, 3, 224, 224)
    mask = (torch.rand(2, 1, 224, 224) > 0.3).float()
    seg2 = SegmenterExport(UNet(base=4, downsample=2)).eval()
    cls2 = ClassifierExport(ThoracicClassifier(TINY, dropout=0.1)).eval()
    assert "BatchNorm folds undone" in load_from_onnx(seg2, tmp_path / "seg.onnx", (x[:1],))
    assert "BatchNorm folds undone" in load_from_onnx(cls2, tmp_path / "cls.onnx", (x[:1], mask[:1]))
    seg = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    prob, ev = ort.InferenceSession(str(tmp_path / "cls.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(seg2(x).numpy(), seg, atol=1e-4)
        prob2, ev2 = cls2(x, mask)
    np.testing.assert_allclose(prob2.numpy(), prob, atol=1e-4)
    np.testing.assert_allclose(ev2.numpy(), ev, atol=1e-3)

