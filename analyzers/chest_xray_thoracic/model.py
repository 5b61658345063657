"""The paper's networks in torch: lung/heart U-Net and the feature-weighting classifier.

Fang et al., "Weighing Features of Lung and Heart Regions for Thoracic Disease
Classification" (BMC Med Imaging 2021):

- a U-Net segments left lung, right lung and heart (trained with dice loss);
  the masks are binarised and merged into one lung-and-heart mask;
- the feature extractor is a multi-scale spatial attention module (the image,
  a 5x5 stride-2 and a 9x9 stride-2 convolution; per scale the channel max and
  mean; a convolution of the six maps, sigmoid, multiplied into the image)
  followed by DenseNet-121, whose last convolutional feature map is the global
  attention map F_g;
- the mask is pooled to F_g's size by average pooling (each feature cell gets
  the fraction of its pixels inside the lungs and heart) and multiplied into
  F_g to give the local attention map F_l; average pooling and a fully
  connected layer on F_l alone give 14 sigmoid outputs.

The DenseNet keeps torchvision's module names (``features.denseblock1.denselayer1
.conv1`` ...), so a checkpoint trained on ChestX-ray14 with torchvision's layout
loads with :func:`import_torchvision_densenet`. Widths are configurable: the
bundled phantom-trained weights use a small DenseNet to stay a few megabytes.

The logits come from the weighted features only (``logit = W avg(F_l) + b``),
as in the paper: a feature cell outside the lungs and heart contributes
nothing. The head is linear in F_l, so the class activation map ``W F_l`` is
exact evidence for the logit; it is computed inside the exported graph.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .constants import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, LABELS, SEGMENTS, SYNTHESISED  # noqa: F401 (re-exported)


# ---------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Ronneberger's U-Net with ``depth`` poolings; outputs one per-pixel logit per structure of SEGMENTS.

    ``downsample`` > 1 runs the U-Net on an average-pooled copy of the input and
    upsamples the logits bilinearly (lungs and heart are smooth shapes; this
    keeps CPU training and inference cheap). 1 is the paper's full-resolution net.
    """

    def __init__(self, in_channels: int = 3, classes: int = len(SEGMENTS), base: int = 8, depth: int = 4, downsample: int = 1) -> None:
        super().__init__()
        self.downsample = downsample
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])])
        self.down.extend(_double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.up_conv = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, conv in zip(self.up, self.up_conv):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
        x = self.head(x)
        if self.downsample > 1:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


class SegmenterExport(nn.Module):
    """The U-Net as exported: image in, one probability per structure out (they may overlap)."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(image))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice per structure (``target``: (N, S, H, W) 0/1); ``weight`` (N, S) leaves out unknown structures."""
    prob = torch.sigmoid(logits)
    w = torch.ones(target.shape[:2], device=target.device) if weight is None else weight
    inter = (prob * target).sum(dim=(2, 3))
    denom = prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3))
    per = 1.0 - (2 * inter + eps) / (denom + eps)
    return (per * w).sum() / w.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------
# DenseNet (torchvision layout)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseNetConfig:
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4

    @property
    def num_features(self) -> int:
        n = self.num_init_features
        for i, layers in enumerate(self.block_config):
            n += layers * self.growth_rate
            if i != len(self.block_config) - 1:
                n //= 2
        return n

    @property
    def stride(self) -> int:
        """Input pixels per feature-map cell: conv0 and pool0 halve twice, each transition once."""
        return 4 * 2 ** (len(self.block_config) - 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["block_config"] = list(self.block_config)
        return d


DENSENET121 = DenseNetConfig()


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, cin: int, bn_size: int, growth: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(cin))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(cin, cout, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, stride=2))


def densenet_features(cfg: DenseNetConfig) -> nn.Sequential:
    """torchvision's ``DenseNet.features`` for ``cfg`` (ends with ``norm5``, before the ReLU)."""
    feats = nn.Sequential(
        OrderedDict(
            [
                ("conv0", nn.Conv2d(3, cfg.num_init_features, 7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(cfg.num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
            ]
        )
    )
    n = cfg.num_init_features
    for i, layers in enumerate(cfg.block_config):
        feats.add_module(f"denseblock{i + 1}", _DenseBlock(layers, n, cfg.bn_size, cfg.growth_rate))
        n += layers * cfg.growth_rate
        if i != len(cfg.block_config) - 1:
            feats.add_module(f"transition{i + 1}", _Transition(n, n // 2))
            n //= 2
    feats.add_module("norm5", nn.BatchNorm2d(n))
    return feats


# ---------------------------------------------------------------------------
# Multi-scale attention and the classifier
# ---------------------------------------------------------------------------


class MultiScaleAttention(nn.Module):
    """Spatial attention from three scales of channel max / mean (CBAM's spatial branch, extended)."""

    def __init__(self, channels: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.scale2 = nn.Conv2d(channels, hidden, 5, stride=2, padding=2)
        self.scale3 = nn.Conv2d(hidden, hidden, 9, stride=2, padding=4)
        self.fuse = nn.Conv2d(6, 1, 7, padding=3)

    @staticmethod
    def _pool(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        m = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (x.shape[-2], x.shape[-1])
        s2 = F.relu(self.scale2(x))
        s3 = F.relu(self.scale3(s2))
        att = torch.sigmoid(self.fuse(torch.cat([self._pool(x, size), self._pool(s2, size), self._pool(s3, size)], dim=1)))
        return x * att, att

    def pass_through(self) -> None:
        """Make the attention ~1 everywhere (for weights imported without an attention module)."""
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.bias.fill_(12.0)


class ThoracicClassifier(nn.Module):
    """Multi-scale attention + DenseNet features + lung/heart feature weighting + 14 logits.

    ``forward(image, mask)`` takes the normalised image (N, 3, 224, 224) and the
    binary lung-and-heart mask (N, 1, 224, 224) and returns logits (N, 14) and
    the class activation maps (N, 14, h, w) on the feature grid, zero outside
    the mask.
    """

    def __init__(self, cfg: DenseNetConfig = DENSENET121, classes: int = len(LABELS), dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = MultiScaleAttention()
        self.features = densenet_features(cfg)
        self.classifier = nn.Linear(cfg.num_features, classes)  # on the local attention map F_l only
        self.dropout = nn.Dropout(dropout)

    def feature_maps(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """F_g, F_l = F_g * M_g and M_g, the mask's fraction per feature cell (the paper's adaptive average pooling)."""
        x, _ = self.attention(image)
        fg = F.relu(self.features(x))
        mg = F.avg_pool2d(mask, self.cfg.stride, ceil_mode=True)  # fixed stride: the same cells as adaptive pooling at 224, and exportable
        return fg, fg * mg, mg

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, fl, mg = self.feature_maps(image, mask)
        logits = self.classifier(self.dropout(fl).mean(dim=(2, 3)))
        cam = torch.einsum("kc,nchw->nkhw", self.classifier.weight, fl)
        return logits, cam * (mg > 0).to(cam.dtype)


class ClassifierExport(nn.Module):
    """The classifier as exported: probabilities and per-class evidence maps at input size.

    The evidence map is the positive part of the class activation map, upsampled
    to the input grid, multiplied by the lung-and-heart mask and scaled to [0, 1]
    per class.
    """

    def __init__(self, net: ThoracicClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam = self.net(image, mask)
        cam = F.interpolate(F.relu(cam), size=image.shape[-2:], mode="bilinear", align_corners=False) * mask
        peak = cam.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(logits), cam / (peak + 1e-6)


# ---------------------------------------------------------------------------
# Importing torchvision-layout DenseNet-121 checkpoints
# ---------------------------------------------------------------------------

_OLD_LAYER_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def normalise_torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring common variants of a torchvision DenseNet state dict to torchvision's current names.

    Handles ``module.`` (DataParallel) and ``densenet121.`` prefixes, the old
    ``norm.1`` style layer keys and a ``classifier.0`` head (Linear inside a
    Sequential with a Sigmoid, as CheXNet re-implementations save it).
    """
    out = {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "model.", "densenet121."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        m = _OLD_LAYER_KEY.match(k)
        if m:
            k = m.group(1) + m.group(2)
        k = k.replace("classifier.0.", "classifier.")
        out[k] = value
    return out


def infer_config(state: dict[str, torch.Tensor]) -> DenseNetConfig:
    """The DenseNet width and depth that a torchvision-layout state dict was built with."""
    init = state["features.conv0.weight"].shape[0]
    blocks = []
    i = 1
    while any(k.startswith(f"features.denseblock{i}.") for k in state):
        layers = {int(m.group(1)) for k in state if (m := re.match(rf"features\.denseblock{i}\.denselayer(\d+)\.", k))}
        blocks.append(max(layers))
        i += 1
    growth = state["features.denseblock1.denselayer1.conv2.weight"].shape[0]
    bn_size = state["features.denseblock1.denselayer1.conv1.weight"].shape[0] // growth
    return DenseNetConfig(growth_rate=growth, block_config=tuple(blocks), num_init_features=init, bn_size=bn_size)


def import_torchvision_densenet(state: dict[str, torch.Tensor]) -> ThoracicClassifier:
    """Build a :class:`ThoracicClassifier` from a torchvision-layout DenseNet state dict.

    The ``features.*`` tensors are copied one to one and ``classifier`` (Linear(C,
    14)) becomes the head on the mask-weighted features: with an all-ones mask the
    network reproduces the checkpoint's own predictions. The attention module,
    which a plain DenseNet checkpoint lacks, is set to pass the image through
    unchanged.

    Raises
    ------
    ValueError
        When tensors are missing or their shapes do not match the inferred width.
    """
    state = normalise_torchvision_keys(state)
    if "features.conv0.weight" not in state or "classifier.weight" not in state:
        raise ValueError("the checkpoint is not a torchvision DenseNet state dict: features.conv0.weight or classifier.weight is missing")
    cfg = infer_config(state)
    w, b = state["classifier.weight"], state["classifier.bias"]
    if w.shape != (len(LABELS), cfg.num_features):
        raise ValueError(f"classifier weight has shape {tuple(w.shape)}; expected ({len(LABELS)}, {cfg.num_features}) for the 14 ChestX-ray14 labels")
    net = ThoracicClassifier(cfg)
    feats = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    own = net.features.state_dict()
    missing = [k for k in own if k not in feats and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in feats if k not in own]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match DenseNet{cfg.block_config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in feats.items():
        if own[k].shape != v.shape:
            raise ValueError(f"features.{k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    net.features.load_state_dict({**own, **feats})
    with torch.no_grad():
        net.classifier.weight.copy_(w)
        net.classifier.bias.copy_(b)
    net.attention.pass_through()
    return net.eval()
