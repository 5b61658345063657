"""The chest array pipeline: U-Net probabilities to cleaned masks, classifier outputs; networks passed in as callables.

``seg_net(image=...)`` returns ``{"seg_prob": (N, 4, S, S)}`` and ``cls_net(image=..., mask=...)``
returns ``{"probability": (N, 14), "evidence": (N, 14, h, w)}``: the ONNX sessions at inference,
the same calls in evaluation.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from dicomnode.analysis import NotApplicable
from dicomnode.imaging import resize

from .constants import SEGMENTS
from .postprocess import clean_masks

Network = Callable[..., dict[str, np.ndarray]]


def segment(seg_net: Network, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, background + segments, S, S) for a batch of network inputs."""
    return seg_net(image=images)["seg_prob"]


def masks(shape: tuple[int, int], seg_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full-size class probabilities, cleaned masks, their areas, and the classifier's lung/heart mask.

    Raises
    ------
    NotApplicable
        When no lung fields were found (the image is not a frontal chest radiograph).
    """
    rows, cols = shape
    small = clean_masks(np.stack([seg_prob.argmax(0) == i + 1 for i in range(len(SEGMENTS))]))
    full_prob = np.stack([resize(p, (rows, cols), order=1) for p in seg_prob])
    full = clean_masks(np.stack([full_prob.argmax(0) == i + 1 for i in range(len(SEGMENTS))]))
    area = full.reshape(3, -1).mean(1)
    if area[0] + area[1] < 0.03:
        raise NotApplicable("no lung fields were found; the image does not look like a frontal chest radiograph")
    union = (small.any(0)).astype(np.float32)[None, None]
    return full_prob, full, area, union


def classify(cls_net: Network, images: np.ndarray, unions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label probabilities (N, 14) and evidence maps (N, 14, h, w) for network inputs and their masks."""
    out = cls_net(image=images, mask=unions)
    return out["probability"], out["evidence"]


def evidence_map(evidence: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One label's evidence map at the source image's size, in [0, 1]."""
    return np.clip(resize(evidence, shape, order=1), 0.0, 1.0).astype(np.float32)
