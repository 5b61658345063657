"""BayeRegX networks in torch: a single-stage vertebra detector and the Baseline + BayeCBAM keypoint regressor.

The keypoint regressor follows the paper: an AlexNet-like baseline (five
convolutions, fully connected layers with dropout) with a Convolutional Block
Attention Module (channel then spatial attention) and a regression head split
in two, one predicting the (x, y) of the five keypoints and one their
log-variance (aleatoric uncertainty). Monte Carlo dropout at inference gives
the epistemic part: the exported graph takes the dropout masks as inputs, so
one session call evaluates T samples of every crop while the convolutions run
once per crop.

The detector is a small YOLO-style single-stage network: a strided convolutional
backbone to a 16 x 16 grid whose cells predict objectness, a box and the
vertebra label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .constants import N_POINTS_PER_VERTEBRA


def aleatoric_loss(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 16 of the paper: squared error scaled by the predicted variance plus its log."""
    logvar = logvar.clamp(-14.0, 4.0)
    return (0.5 * torch.exp(-logvar) * (target - mean) ** 2 + 0.5 * logvar).mean()


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, kernel: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel attention, then spatial attention on the refined map (eqs. 3-6)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels)
        self.spatial = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)


def _conv(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BayeCBAMKeypointNet(nn.Module):
    """Baseline + BayeCBAM: five convolutions with CBAM, FC layers with dropout, mean and log-variance heads.

    Parameters
    ----------
    width
        Channels of the first convolution; later ones are multiples of it.
    hidden
        Units of the fully connected layers.
    p_drop
        Dropout probability of both FC layers (also the MC-dropout rate).
    pool
        Grid of the last average pooling (rows, columns), matched to the crop's aspect.
    n_points
        Keypoints per crop: five for a vertebra (four body corners, spinous process), one for
        a corner patch.
    """

    def __init__(self, width: int = 12, hidden: int = 128, p_drop: float = 0.25, pool: tuple[int, int] = (4, 8), n_points: int = N_POINTS_PER_VERTEBRA) -> None:
        super().__init__()
        w = width
        # five 3x3 convolutions after an early stride-2 + pool stem, as AlexNet's large stride does
        self.features = nn.Sequential(
            _conv(1, w, 3, stride=2),
            nn.MaxPool2d(2),
            _conv(w, 2 * w, 3),
            _conv(2 * w, 4 * w, 3),
            CBAM(4 * w),
            nn.MaxPool2d(2),
            _conv(4 * w, 4 * w, 3),
            _conv(4 * w, 4 * w, 3),
            CBAM(4 * w),
            nn.AdaptiveAvgPool2d(pool),
        )
        self.p_drop = p_drop
        self.hidden = hidden
        self.fc1 = nn.Linear(4 * w * pool[0] * pool[1], hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.n_points = n_points
        self.mean_head = nn.Linear(hidden, 2 * n_points)
        self.logvar_head = nn.Linear(hidden, 2 * n_points)

    def forward(self, x: torch.Tensor, mask1: torch.Tensor | None = None, mask2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) in crop fractions, ordered x1, y1, ... x5, y5.

        Without masks: shapes (N, 10), dropout as in ``self.training``. With masks
        of shape (T, N, hidden) holding 0/1: shapes (T, N, 10), one MC sample per t.
        """
        f = self.features(x).flatten(1)
        h = F.relu(self.fc1(f))
        if mask1 is None:
            h = F.dropout(h, self.p_drop, self.training)
            h = F.dropout(F.relu(self.fc2(h)), self.p_drop, self.training)
        else:
            keep = 1.0 - self.p_drop
            h = h.unsqueeze(0) * mask1 / keep
            h = F.relu(self.fc2(h)) * mask2 / keep
        return self.mean_head(h) + 0.5, self.logvar_head(h)


class MCDropoutKeypoints(nn.Module):
    """Export wrapper: crops and explicit dropout masks in, T samples of mean and log-variance out."""

    def __init__(self, net: BayeCBAMKeypointNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor, mask1: torch.Tensor, mask2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(crops, mask1, mask2)


class VertebraDetector(nn.Module):
    """YOLO-style single-stage detector on a square image; output (N, 5 + classes, G, G).

    Channels per grid cell: objectness logit, centre offset x, y (logits of the
    position inside the cell), log width and height (in cells), class logits.
    """

    def __init__(self, n_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        w = width
        self.n_classes = n_classes
        self.backbone = nn.Sequential(
            _conv(1, w, 3, stride=2),
            _conv(w, 2 * w, 3, stride=2),
            _conv(2 * w, 2 * w, 3),
            _conv(2 * w, 4 * w, 3, stride=2),
            _conv(4 * w, 4 * w, 3),
            _conv(4 * w, 6 * w, 3, stride=2),
            _conv(6 * w, 6 * w, 3, dilation=1),
            _conv(6 * w, 6 * w, 3, dilation=2),
            _conv(6 * w, 6 * w, 3, dilation=4),
            _conv(6 * w, 6 * w, 3, dilation=8),
        )
        self.head = nn.Conv2d(6 * w, 5 + n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
