"""SpineNet networks in torch: the vertebra detector, the corner regressor and the multi-task grading CNN.

- :class:`VertebraDetector` stands in for the thesis's HOG/DPM parts detector
  (section 3.2.1): a small fully convolutional net on one sagittal slice that
  gives, on a stride-4 grid, a heatmap for vertebral bodies (T10-L5) and one for
  the sacrum (S1), a sub-cell offset, the box height and depth and the body's
  axis angle. Its candidates feed the chain model (inference.label_chain).
- :class:`CornerRegressor` is the thesis's corner CNN (section 3.3.2, figure
  3.18): three convolutions and two fully connected layers on the detected box
  enlarged by 50%, eight outputs (four corners).
- :class:`GradingNet` is the VGG-M-based multi-task network of chapter 4
  (figure 4.3): the disc volume's slices as input channels, Conv1 7x7 stride 2,
  Conv2 5x5 stride 1 (no LRN), Conv3-5 3x3, 2x2 max pooling, and a branch after
  Conv5 into one FC6-FC7-FC8 head per grading. ``width`` scales the channels
  (VGG-M: 96-256-512-512-512, FC 4096/1024); the bundled weights are small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .constants import DISC_SHAPE, DISC_SLICES, N_CLASSES


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VertebraDetector(nn.Module):
    """Heatmaps (vertebral body, sacrum), offset (2), log size (2), axis (sin, cos) on a stride-4 grid."""

    OUTPUTS = 8

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(1, w), _conv(w, w, stride=2))
        self.s4 = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))
        self.s8 = nn.Sequential(_conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w), _conv(4 * w, 4 * w, dilation=2), _conv(4 * w, 4 * w, dilation=4))
        self.fuse = nn.Sequential(_conv(6 * w, 4 * w), _conv(4 * w, 4 * w, dilation=2))
        self.head = nn.Conv2d(4 * w, self.OUTPUTS, 1)
        nn.init.constant_(self.head.bias[:2], -3.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x4 = self.s4(self.stem(image))
        x8 = self.s8(x4)
        up = F.interpolate(x8, size=x4.shape[-2:], mode="nearest")
        return self.head(self.fuse(torch.cat([x4, up], dim=1)))


class CornerRegressor(nn.Module):
    """Three convolutions and two fully connected layers; eight outputs, the corners in crop units [-1, 1]."""

    def __init__(self, size: int = 48, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        n = 4 * w * (size // 8) ** 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 8))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(crops))


class GradingNet(nn.Module):
    """VGG-M trunk to Conv5, then one FC6-FC7-FC8 head per grading; returns the heads' logits concatenated."""

    def __init__(self, width: int = 16, hidden: int = 64, n_classes: tuple[int, ...] = N_CLASSES, p_drop: float = 0.3) -> None:
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            nn.Conv2d(DISC_SLICES, 2 * w, 7, stride=2, padding=3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 5, stride=1, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 8 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(8 * w, 8 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(8 * w, 8 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        h, wd = DISC_SHAPE[0] // 16, DISC_SHAPE[1] // 16
        n = 8 * w * h * wd
        self.n_classes = tuple(n_classes)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(inplace=True), nn.Dropout(p_drop),
                          nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(p_drop), nn.Linear(hidden, c))
            for c in self.n_classes
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)  # Glorot, as in section 4.2.3.1
                nn.init.zeros_(m.bias)

    def forward(self, discs: torch.Tensor) -> torch.Tensor:
        f = self.trunk(discs - 0.3)
        return torch.cat([head(f) for head in self.heads], dim=1)


def split_logits(logits: torch.Tensor, n_classes: tuple[int, ...] = N_CLASSES) -> list[torch.Tensor]:
    return list(torch.split(logits, list(n_classes), dim=1))


def balanced_multitask_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: list[torch.Tensor]) -> torch.Tensor:
    """Sum over tasks of the class-balanced cross-entropy (eqs. 4.2-4.4); labels < 0 are missing and ignored."""
    total = logits.new_zeros(())
    for t, (lg, w) in enumerate(zip(split_logits(logits), class_weights)):
        y = labels[:, t]
        valid = y >= 0
        if valid.any():
            total = total + F.cross_entropy(lg[valid], y[valid], weight=w, reduction="sum") / w[y[valid]].sum().clamp_min(1e-6)
    return total
