"""The networks in torch: the paper's 3D U-Net classifier and the vertebra detector on sagittal reformats.

Classifier (Engstler et al.): a 3D U-Net whose upsampling path is replaced by a classification
head: the contracting path (two 3x3x3 convolutions with batch norm and ReLU per level, max
pooling between levels), global average pooling, dropout 0.3 and one linear unit (the logit).
The output of the final convolutional layer, A (the "units" of network dissection), is a
second output of the same forward pass, so the dissection runs on ONNX Runtime without a
backward pass. Width is configurable; the bundled weights use a small one. The input is the
paper's 96^3 patch at 1 mm; ``in_pool`` average-pools it first (3 gives 32^3 at 3 mm) and ``crop``
keeps the centre (4 gives 24^3, 72 mm: the body and its neighbours' endplates), which is what lets
the bundled model train on two CPU cores.

Detector: a small 2D U-Net on the three-channel sagittal reformat with two outputs per pixel,
a vertebral-body centroid heatmap (logit) and the continuous level index (C3 = 0 ... L5 = 21),
read at the heatmap's peaks and made consecutive by anatomical ordering in ``inference.py``.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _block3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


class FractureClassifier(nn.Module):
    """3D U-Net encoder + classification head; returns (logit, final-layer activations A)."""

    def __init__(self, width: int = 8, levels: int = 3, in_pool: int = 3, dropout: float = 0.3, crop: int = 0) -> None:
        super().__init__()
        self.in_pool = in_pool
        self.crop = crop
        chans = [width * 2 ** i for i in range(levels + 1)]
        self.down = nn.ModuleList([_block3d(1, chans[0])] + [_block3d(chans[i], chans[i + 1]) for i in range(levels)])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(chans[-1], 1)
        self.units = chans[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.in_pool > 1:
            x = F.avg_pool3d(x, self.in_pool)
        if self.crop:
            c = self.crop
            x = x[:, :, c:-c, c:-c, c:-c]
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool3d(x, 2)
            x = block(x)
        pooled = x.mean(dim=(2, 3, 4))
        logit = self.head(self.dropout(pooled))[:, 0]
        return logit, x


def _block2d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class VertebraDetector(nn.Module):
    """2D U-Net: (B, 3, H, W) reformat -> (B, 2, H, W): centroid heatmap logit, level index."""

    def __init__(self, width: int = 12, levels: int = 4) -> None:
        super().__init__()
        chans = [width * 2 ** min(i, 3) for i in range(levels + 1)]
        self.down = nn.ModuleList([_block2d(3, chans[0])] + [_block2d(chans[i], chans[i + 1]) for i in range(levels)])
        # dilated context at the bottom: the level needs to see ribs, lungs or sacrum far away
        self.context = nn.Sequential(
            nn.Conv2d(chans[-1], chans[-1], 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(chans[-1], chans[-1], 3, padding=4, dilation=4), nn.ReLU(inplace=True),
        )
        self.up = nn.ModuleList([_block2d(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(levels))])
        self.out = nn.Conv2d(chans[0], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        x = x + self.context(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.out(x)
