"""The paper's two networks in torch (training and ONNX export only).

* :class:`SegNet` — U-Net-like segmentation CNN with skip connections; its last
  layer (the paper's **Conv11**) gives, per body part and scan line, logits
  over the 128 columns. They are trained with the per-scan-line losses: a
  128-way softmax for the part's mid-point and an L2 loss on its thickness
  through the sigmoid-approximated Heaviside step (k = 10). The raw output is
  the soft mask; hard masks are rebuilt from mid-point and thickness.
* :class:`ClsNet` — VGG-M-like classification CNN (5 convolutional + 3 fully
  connected layers) in the paper's configuration E: one stream for the raw scan,
  one for the soft mask, concatenated after FC6, then FC7/FC8 per task
  (scoliosis, positioning error, number of curves). Evidence hotspots of the
  scoliosis head are computed in the same forward pass (gradient x activation
  of conv5, with the backward pass of the fully connected layers written out),
  so ONNX Runtime serves them without autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .constants import CURVE_CLASSES, HEAVISIDE_K, PARTS  # noqa: F401 (re-exported for training)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SegNet(nn.Module):
    """U-Net-like encoder/decoder, 1 x 416 x 128 in, 6 x 416 x 128 raw Conv11 logits out."""

    def __init__(self, width: int = 8, parts: int = len(PARTS)) -> None:
        super().__init__()
        w = width
        self.enc0 = _block(1, w)
        self.enc1 = _block(w, 2 * w)
        self.enc2 = _block(2 * w, 4 * w)
        self.enc3 = _block(4 * w, 8 * w)
        self.dec2 = _block(8 * w + 4 * w, 4 * w)
        self.dec1 = _block(4 * w + 2 * w, 2 * w)
        self.dec0 = _block(2 * w + w, w)
        self.conv11 = nn.Conv2d(w, parts, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(x)
        e1 = self.enc1(F.max_pool2d(e0, 2))
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        d0 = self.dec0(torch.cat([F.interpolate(d1, scale_factor=2.0, mode="nearest"), e0], 1))
        return self.conv11(d0)


def heaviside(y: torch.Tensor, k: float = HEAVISIDE_K) -> torch.Tensor:
    """The paper's sigmoid approximation of the Heaviside step, H(x) = 1 / (1 + exp(-k (x - 0.5)))."""
    return torch.sigmoid(k * (y - 0.5))


def scanline_losses(y: torch.Tensor, mid_target: torch.Tensor, thickness: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scan-line losses of the paper.

    Parameters
    ----------
    y
        Conv11 output, (B, parts, rows, 128).
    mid_target
        Target distribution over the 128 columns for each row and part
        (B, parts, rows, 128); all zero on rows where the part is absent.
        A continuous mid-point is split over its two nearest columns.
    thickness
        Part thickness in pixels per row and part, (B, parts, rows).

    Returns
    -------
    The mid-point softmax log loss (mean over rows where the part is present)
    and the thickness L2 loss (mean over all rows).
    """
    valid = mid_target.sum(-1)
    logp = F.log_softmax(y, dim=-1)
    mid = -(mid_target * logp).sum(-1)
    l_mid = (mid * valid).sum() / valid.sum().clamp_min(1.0)
    l_thick = ((heaviside(y).sum(-1) - thickness) ** 2).mean()
    return l_mid, l_thick


class _Stream(nn.Module):
    """VGG-M-like convolutional trunk plus FC6 for one input."""

    def __init__(self, cin: int, width: int, fc: int) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Sequential(nn.Conv2d(cin, w, 7, stride=2, padding=3), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(w, 2 * w, 5, stride=2, padding=2), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True))
        self.conv3 = nn.Sequential(nn.Conv2d(2 * w, 3 * w, 3, padding=1), nn.BatchNorm2d(3 * w), nn.ReLU(inplace=True))
        self.conv4 = nn.Sequential(nn.Conv2d(3 * w, 3 * w, 3, padding=1), nn.BatchNorm2d(3 * w), nn.ReLU(inplace=True))
        self.conv5 = nn.Sequential(nn.Conv2d(3 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True))
        self.fc6 = nn.Linear(2 * w * 13 * 4, fc)
        self.c5 = 2 * w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        a5 = self.conv5(self.conv4(self.conv3(x)))  # 26 x 8
        h6 = F.relu(self.fc6(torch.flatten(F.avg_pool2d(a5, 2), 1)))
        return a5, h6


class ClsNet(nn.Module):
    """Configuration E: raw scan stream + soft-mask stream, concatenated after FC6, three task heads.

    ``forward(image, soft_mask)`` returns the softmax probabilities of
    scoliosis (B, 2), positioning error (B, 2), number of curves (B, 3) and the
    scoliosis evidence map (B, 26, 8) in [0, 1].
    """

    def __init__(self, width: int = 16, fc: int = 128, hidden: int = 64, parts: int = len(PARTS), dropout: float = 0.3) -> None:
        super().__init__()
        self.raw = _Stream(1, width, fc)
        self.mask = _Stream(parts, width, fc)
        self.heads = nn.ModuleDict(
            {name: nn.ModuleDict({"fc7": nn.Linear(2 * fc, hidden), "fc8": nn.Linear(hidden, n)}) for name, n in (("scoliosis", 2), ("positioning", 2), ("curves", 3))}
        )
        self.drop = nn.Dropout(dropout)
        self.fc = fc

    def logits(self, image: torch.Tensor, soft_mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        a_raw, h_raw = self.raw(image)
        a_mask, h_mask = self.mask(soft_mask)
        h = self.drop(torch.cat([h_raw, h_mask], 1))
        out, h7s = {}, {}
        for name, head in self.heads.items():
            h7 = F.relu(head["fc7"](h))
            h7s[name] = h7
            out[name] = head["fc8"](self.drop(h7))
        return out, {"a_raw": a_raw, "a_mask": a_mask, "h_raw": h_raw, "h_mask": h_mask, "h7": h7s["scoliosis"]}

    def evidence(self, act: dict[str, torch.Tensor]) -> torch.Tensor:
        """Gradient x activation of conv5 for the scoliosis logit margin, summed over both streams."""
        head = self.heads["scoliosis"]
        w8 = head["fc8"].weight[1] - head["fc8"].weight[0]
        g7 = w8[None, :] * (act["h7"] > 0).to(act["h7"].dtype)
        gh = g7 @ head["fc7"].weight
        cam = None
        for key, stream, g in (("raw", self.raw, gh[:, : self.fc]), ("mask", self.mask, gh[:, self.fc :])):
            g6 = g * (act[f"h_{key}"] > 0).to(g.dtype)
            gp = (g6 @ stream.fc6.weight).reshape(-1, stream.c5, 13, 4)
            ga = gp.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) / 4.0
            part = (ga * act[f"a_{key}"]).sum(1)
            cam = part if cam is None else cam + part
        cam = F.relu(cam)
        return cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-6)

    def forward(self, image: torch.Tensor, soft_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out, act = self.logits(image, soft_mask)
        return (
            F.softmax(out["scoliosis"], 1),
            F.softmax(out["positioning"], 1),
            F.softmax(out["curves"], 1),
            self.evidence(act),
        )
