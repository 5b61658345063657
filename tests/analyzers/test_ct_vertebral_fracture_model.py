"""ct_vertebral_fracture networks: the ONNX graphs match the torch modules; the registry holds the dissection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analyzers.ct_vertebral_fracture.constants import CLASSIFIER, DETECTOR, PATCH_SIZE
from dicomnode.analysis import RegistryEntry

WEIGHTS = Path(__file__).resolve().parents[2] / "analyzers" / "ct_vertebral_fracture" / "weights"


def test_registry_entries_check_out_and_carry_the_dissection():
    det = RegistryEntry.load(WEIGHTS / f"{DETECTOR}.json")
    cls = RegistryEntry.load(WEIGHTS / f"{CLASSIFIER}.json")
    for e in (det, cls):
        e.verify()
        assert e.phantom_trained
        assert e.path.stat().st_size < 8 * 1024 * 1024
    d = cls.extra["dissection"]
    units = cls.extra["width"] * 2 ** cls.extra["levels"]
    assert len(d["thresholds"]) == len(d["correlation"]) == units
    assert d["quantile"] == 0.005 and len(d["ranking"]) == 10 and set(d["labels"]) == {str(k) for k in d["ranking"]}
    assert 0 < cls.extra["threshold"] < 1 and cls.extra["dropout"] == 0.3


def test_onnx_matches_torch():
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from analyzers.ct_vertebral_fracture.model import FractureClassifier, VertebraDetector

    cls_entry = RegistryEntry.load(WEIGHTS / f"{CLASSIFIER}.json")
    net = FractureClassifier(width=cls_entry.extra["width"], levels=cls_entry.extra["levels"], in_pool=cls_entry.extra["in_pool"], crop=cls_entry.extra["crop"])
    net.load_state_dict(torch.load(WEIGHTS / "classifier.pt"))
    net.eval()
    x = np.random.default_rng(0).random((2, 1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE), dtype=np.float32)
    with torch.inference_mode():
        logit, acts = (t.numpy() for t in net(torch.from_numpy(x)))
    sess = ort.InferenceSession(str(WEIGHTS / "classifier.onnx"), providers=["CPUExecutionProvider"])
    o_logit, o_acts = sess.run(["logit", "activations"], {"patch": x})
    assert np.allclose(o_logit, logit, atol=1e-4) and np.allclose(o_acts, acts, atol=1e-4)

    det_entry = RegistryEntry.load(WEIGHTS / f"{DETECTOR}.json")
    det = VertebraDetector(width=det_entry.extra["width"], levels=det_entry.extra["depth"])
    det.load_state_dict(torch.load(WEIGHTS / "detector.pt"))
    det.eval()
    r = np.random.default_rng(1).random((1, 3, 96, 64), dtype=np.float32)
    with torch.inference_mode():
        maps = det(torch.from_numpy(r)).numpy()
    (o_maps,) = ort.InferenceSession(str(WEIGHTS / "detector.onnx"), providers=["CPUExecutionProvider"]).run(["maps"], {"reformat": r})
    assert np.allclose(o_maps, maps, atol=1e-4)


def test_classifier_shapes_and_dropout():
    torch = pytest.importorskip("torch")
    from analyzers.ct_vertebral_fracture.model import FractureClassifier

    net = FractureClassifier(width=4, levels=2, in_pool=3).eval()
    logit, acts = net(torch.zeros(3, 1, 96, 96, 96))
    assert logit.shape == (3,) and acts.shape == (3, 16, 8, 8, 8)
    assert net.dropout.p == 0.3
