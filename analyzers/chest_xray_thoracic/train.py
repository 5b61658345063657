"""Train the lung/heart U-Net and the thoracic classifier from scratch; export ONNX weights, registry entries and metrics.

One seeded command gives the bundled weights::

    python -m analyzers.chest_xray_thoracic.train \\
        --masks ../shared/traindata/chest/lung_heart_masks \\
        --cxr14-csv ../shared/traindata/chest/nih_cxr/labels.csv --cxr14-images ../shared/traindata/chest/nih_cxr/images

``--masks`` is a folder of radiographs with right lung, left lung and heart masks: either
``images/<stem>.png`` with ``masks/<stem>_{right_lung,left_lung,heart}.png``, or the JSRT/SCR
layout (``<case>.png`` or ``.IMG`` images beside ``right lung/``, ``left lung/``, ``heart/``
mask folders). ``--cxr14-csv`` is a ChestX-ray14 ``Data_Entry_2017`` table (or the bundled
set's ``labels.csv``) and ``--cxr14-images`` the folder holding its PNGs.

Stages (``--stage``; default all three): ``seg``, the U-Net on the real masks' training split plus
phantoms with strong augmentation (affine, crop, gamma and contrast, blur and noise, burned-in
text and markers, lines and tubes, collimation, inverted grey scale), dice + BCE loss, the epoch
with the best validation Dice checkpointed; ``cls``, the classifier on the ChestX-ray14 training
split (by patient) with the mask set's atlas mask (see :func:`atlas_mask`), BCE on the labels with
enough positives, the epoch with the best validation AUROC checkpointed (``seg`` and ``cls`` are
independent and may run side by side); ``export``, operating points on the ChestX-ray14
validation split with the U-Net's masks (Youden), ONNX files and registry entries, then
``evaluate`` writes ``metrics.json`` on the test splits, which no stage reads otherwise.
Preprocessed arrays and checkpoints are cached under ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import structlog
import torch
import torch.nn.functional as F

from analyzers import phantoms
from dicomnode.analysis import RegistryEntry, sha256_file
from dicomnode.imaging import resize

from . import data, phantom, preprocess
from .constants import INPUT_SIZE, LABELS, NIH_LABELS, SEGMENTS
from .evaluate import auroc, dice, youden_threshold
from .model import ClassifierExport, DenseNetConfig, SegmenterExport, ThoracicClassifier, UNet, dice_loss

log = structlog.get_logger("dicomnode.analyzers.chest_xray_thoracic.train")

WEIGHTS = Path(__file__).resolve().parent / "weights"
CACHE_SIZE = 256
"""Cached radiographs and masks are this square size; augmentation samples the 224-pixel input from them."""
PHANTOM_SEED = 1000
SMALL = DenseNetConfig(growth_rate=12, block_config=(2, 4, 6, 4), num_init_features=16, bn_size=2)
UNET_BASE = 12
UNET_DOWNSAMPLE = 2
"""The U-Net runs on a 112-pixel average-pooled copy and upsamples its logits: lungs and heart are smooth shapes."""
SEG_VERSION = "2.0.0"
CLS_VERSION = "2.0.0"


# ---------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------


def _square(img: np.ndarray, size: int = CACHE_SIZE) -> np.ndarray:
    """A [0, 1] radiograph to ``size`` x ``size``, smoothed first as ``preprocess.to_net_input`` does."""
    from scipy import ndimage

    factor = min(img.shape) / size
    img = ndimage.gaussian_filter(img, sigma=0.4 * factor) if factor > 1.5 else img
    return np.clip(resize(img.astype(np.float32), (size, size), order=1), 0, 1)


def _square_masks(masks: np.ndarray, size: int = CACHE_SIZE) -> np.ndarray:
    return np.stack([resize(m.astype(np.float32), (size, size), order=1) > 0.5 for m in masks])


def cache_masks(root: Path, cache: Path) -> dict[str, np.ndarray]:
    """Real radiographs with masks, square-resized (uint8 images, bool masks, stems)."""
    path = cache / "masks.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    cases = data.read_mask_folder(root)
    if not cases:
        raise SystemExit(f"no radiographs with right lung, left lung and heart masks under {root}")
    images, masks = [], []
    for case in cases:
        img, m = case.load()
        images.append(np.round(_square(img) * 255).astype(np.uint8))
        masks.append(_square_masks(m))
    out = {"image": np.stack(images), "masks": np.stack(masks), "stem": np.asarray([c.stem for c in cases])}
    np.savez(path, **out)
    log.info("masks_cached", n=len(cases))
    return out


def _phantom_example(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([PHANTOM_SEED, i])
    ph = phantom.render(rng)
    patient = phantoms.PhantomPatient.make(rng, "cxr", i)
    display = preprocess.prepare(phantom.to_dataset(ph, rng, patient)).display
    return np.round(_square(display) * 255).astype(np.uint8), _square_masks(ph.masks)


def cache_phantoms(n: int, cache: Path, workers: int = 2) -> dict[str, np.ndarray]:
    path = cache / f"phantoms_{n}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    with Pool(workers) as pool:
        rows = pool.map(_phantom_example, range(n), chunksize=8)
    out = {"image": np.stack([r[0] for r in rows]), "masks": np.stack([r[1] for r in rows])}
    np.savez(path, **out)
    log.info("phantoms_cached", n=n)
    return out


def _nih_example(path: Path) -> np.ndarray:
    return np.round(_square(data.load_png(path), INPUT_SIZE) * 255).astype(np.uint8)


def cache_cxr14(csv_path: Path, images: Path, cache: Path, workers: int = 2) -> dict[str, np.ndarray]:
    """ChestX-ray14 images at the classifier's input size (before the contrast stretch), labels, patients."""
    path = cache / "cxr14.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    records = data.read_chestxray14(csv_path, images)
    if not records:
        raise SystemExit(f"no ChestX-ray14 images found under {images} for the rows of {csv_path}")
    with Pool(workers) as pool:
        imgs = pool.map(_nih_example, [r.path for r in records], chunksize=16)
    out = {"image": np.stack(imgs), "labels": np.stack([r.labels for r in records]),
           "patient": np.asarray([r.patient_id for r in records]), "name": np.asarray([r.image for r in records])}
    np.savez(path, **out)
    log.info("cxr14_cached", n=len(records))
    return out


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


def _affine(n: int, rng: np.random.Generator, rot: float, zoom: tuple[float, float], shift: float) -> torch.Tensor:
    a = np.deg2rad(rng.uniform(-rot, rot, n))
    s = rng.uniform(*zoom, n)
    aspect = rng.uniform(0.92, 1.08, n)
    t = rng.uniform(-shift, shift, (n, 2))
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0] = np.cos(a) / s * aspect
    theta[:, 0, 1] = -np.sin(a) / s
    theta[:, 1, 0] = np.sin(a) / s
    theta[:, 1, 1] = np.cos(a) / s / aspect
    theta[:, :, 2] = t
    return torch.from_numpy(theta)


def warp(images: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator | None,
         rot: float = 10.0, zoom: tuple[float, float] = (0.85, 1.2), shift: float = 0.08) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 (N, S, S) images and (N, C, S, S) masks to float (N, 224, 224) and bool (N, C, 224, 224).

    With ``rng``: a random rotation, zoom (in: the image is cropped; out: a black border
    as from collimation), aspect change and shift, the same for an image and its masks.
    """
    n = len(images)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    if rng is None:
        theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).repeat(n, 1, 1)
    else:
        theta = _affine(n, rng, rot, zoom, shift)
    grid = F.affine_grid(theta, (n, 1, INPUT_SIZE, INPUT_SIZE), align_corners=False)
    img = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0].numpy()
    out_masks = None
    if masks is not None:
        m = torch.from_numpy(masks.astype(np.float32))
        out_masks = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False).numpy() > 0.5
    return img, out_masks


def _curve(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    p = rng.uniform(0, size, (3, 2))
    t = np.linspace(0, 1, 4 * size)[:, None]
    pts = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]
    return pts[:, 0], pts[:, 1]


def photometric(img: np.ndarray, rng: np.random.Generator, invert: float = 0.0) -> np.ndarray:
    """One (224, 224) [0, 1] image with a random tone curve, blur or noise, burned-in text, markers, tubes and bands."""
    from scipy import ndimage

    size = img.shape[0]
    img = np.clip(img, 0, 1) ** float(np.exp(rng.uniform(-0.6, 0.6)))
    img = img * rng.uniform(0.7, 1.2) + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.3:
        img = ndimage.gaussian_filter(img, rng.uniform(0.4, 1.2))
    if rng.random() < 0.4:
        # tubes, lines and wires: bright curves a few pixels wide
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = _curve(rng, size)
            w = int(rng.integers(1, 4))
            line = np.zeros_like(img)
            ok = (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)
            line[cy[ok].astype(int), cx[ok].astype(int)] = 1.0
            line = ndimage.maximum_filter(line, size=w)
            img = np.maximum(img, line * rng.uniform(0.6, 1.0))
    if rng.random() < 0.5:
        # burned-in annotation text and side markers near the edges
        for _ in range(int(rng.integers(1, 5))):
            h, w = int(rng.integers(4, 12)), int(rng.integers(8, 50))
            r = int(rng.choice([rng.integers(0, 20), rng.integers(size - 20, size)]))
            c = int(rng.integers(0, size - w))
            block = rng.random((h, w)) < 0.45
            img[r : r + h, c : c + w][block[: img[r : r + h, c : c + w].shape[0], : img[r : r + h, c : c + w].shape[1]]] = rng.uniform(0.8, 1.0)
    if rng.random() < 0.2:
        edge, side = int(rng.integers(3, 25)), int(rng.integers(4))
        sl = [np.s_[:edge, :], np.s_[-edge:, :], np.s_[:, :edge], np.s_[:, -edge:]][side]
        img[sl] = rng.choice([0.0, 1.0])
    if rng.random() < 0.5:
        img = img + rng.normal(0, rng.uniform(0.005, 0.04), img.shape)
    img = np.clip(img, 0, 1)
    if rng.random() < invert:
        img = 1.0 - img
    return img.astype(np.float32)


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    """(N, 224, 224) [0, 1] images to network inputs, exactly as ``preprocess.to_net_input`` finishes them."""
    return torch.from_numpy(preprocess.normalise(np.stack([preprocess.stretch_contrast(i) for i in imgs])))


# ---------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------


def _progress(what: str, epoch: int, epochs: int, step: int, steps: int, loss: float, t0: float) -> None:
    if step % 10 == 0 or step == steps:
        log.info(f"{what}_progress", epoch=f"{epoch + 1}/{epochs}", step=f"{step}/{steps}", loss=round(loss, 4), seconds=round(time.time() - t0, 1))


@torch.no_grad()
def predict_seg(unet: UNet, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """(N, 224, 224) [0, 1] images to (N, 3, 224, 224) probabilities."""
    unet.eval()
    return np.concatenate([torch.sigmoid(unet(to_tensor(images[s : s + batch]))).numpy() for s in range(0, len(images), batch)])


def seg_scores(unet: UNet, images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    img, m = warp(images, masks, None)
    pred = predict_seg(unet, img) > 0.5
    return {s: float(np.mean([dice(p[j], t[j]) for p, t in zip(pred, m)])) for j, s in enumerate(SEGMENTS)}


def train_seg(real: dict[str, np.ndarray], ph: dict[str, np.ndarray], val: dict[str, np.ndarray], epochs: int, seed: int,
              batch: int = 8, real_repeat: int = 2, on_best=None) -> tuple[UNet, dict[str, float]]:
    """Dice + BCE on real masks (each repeated ``real_repeat`` times an epoch) and half as many phantoms; best validation epoch kept.

    ``on_best(net, scores)`` is called whenever the validation Dice improves (a checkpoint).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    unet = UNet(base=UNET_BASE, downsample=UNET_DOWNSAMPLE)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-4)
    n_real = len(real["image"]) * real_repeat
    n_ph = min(len(ph["image"]), n_real // 3)
    per_epoch = math.ceil((n_real + n_ph) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * per_epoch, pct_start=0.15)
    best, best_state, t0 = -1.0, None, time.time()
    for epoch in range(epochs):
        unet.train()
        idx = [("r", i % len(real["image"])) for i in range(n_real)] + [("p", int(i)) for i in rng.choice(len(ph["image"]), n_ph, replace=False)]
        order = rng.permutation(len(idx))
        total = 0.0
        for step, s in enumerate(range(0, len(order), batch), start=1):
            chosen = [idx[k] for k in order[s : s + batch]]
            imgs = np.stack([(real if src == "r" else ph)["image"][i] for src, i in chosen])
            msks = np.stack([(real if src == "r" else ph)["masks"][i] for src, i in chosen])
            img, m = warp(imgs, msks, rng)
            x = to_tensor(np.stack([photometric(i, rng, invert=0.1) for i in img]))
            y = torch.from_numpy(m.astype(np.float32))
            logits = unet(x)
            loss = dice_loss(logits, y) + F.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            _progress("seg", epoch, epochs, step, per_epoch, total / step, t0)
        scores = seg_scores(unet, val["image"], val["masks"])
        mean = float(np.mean(list(scores.values())))
        log.info("seg_validation", epoch=epoch + 1, **{k: round(v, 4) for k, v in scores.items()})
        if mean > best:
            best, best_state, best_scores = mean, {k: v.clone() for k, v in unet.state_dict().items()}, dict(scores, epoch=epoch + 1)
            if on_best is not None:
                on_best(unet, best_scores)
    unet.load_state_dict(best_state)
    return unet.eval(), best_scores


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------


def nih_masks(unet: UNet, images: np.ndarray) -> np.ndarray:
    """The U-Net's lungs-and-heart union on uint8 (N, 224, 224) ChestX-ray14 images, as at inference."""
    from .inference import classifier_mask

    probs = predict_seg(unet, images.astype(np.float32) / 255.0)
    return np.concatenate([classifier_mask(p)[0] for p in probs]).astype(np.uint8)


@torch.no_grad()
def predict_cls(net: ThoracicClassifier, images: np.ndarray, masks: np.ndarray, batch: int = 32) -> np.ndarray:
    net.eval()
    out = []
    for s in range(0, len(images), batch):
        x = to_tensor(images[s : s + batch].astype(np.float32) / 255.0)
        m = torch.from_numpy(masks[s : s + batch].astype(np.float32))[:, None]
        out.append(torch.sigmoid(net(x, m)[0]).numpy())
    return np.concatenate(out)


def train_cls(train: dict[str, np.ndarray], val: dict[str, np.ndarray], epochs: int, seed: int, batch: int = 16,
              cfg: DenseNetConfig = SMALL, on_best=None) -> tuple[ThoracicClassifier, dict[str, float]]:
    """BCE on NIH_LABELS with the given masks; mild augmentation; the epoch with the best mean validation AUROC kept.

    ``on_best(net, scores)`` is called whenever the validation AUROC improves (a checkpoint).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ThoracicClassifier(cfg, dropout=0.2)
    cols = [LABELS.index(k) for k in NIH_LABELS]
    y_all = train["labels"][:, cols]
    pos = y_all.mean(0)
    pos_weight = torch.from_numpy(np.clip((1 - pos) / np.maximum(pos, 1e-3), 1.0, 6.0).astype(np.float32))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    n = len(y_all)
    per_epoch = math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * per_epoch, pct_start=0.2)
    best, best_state, best_scores, t0 = -1.0, None, {}, time.time()
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(n)
        total = 0.0
        for step, s in enumerate(range(0, n, batch), start=1):
            ids = order[s : s + batch]
            img, m = warp(train["image"][ids], train["mask"][ids][:, None], rng, rot=7.0, zoom=(0.9, 1.12), shift=0.05)
            x = to_tensor(np.stack([photometric(i, rng) for i in img]))
            logits, _ = net(x, torch.from_numpy(m.astype(np.float32)))
            loss = F.binary_cross_entropy_with_logits(logits[:, cols], torch.from_numpy(y_all[ids]), pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            _progress("cls", epoch, epochs, step, per_epoch, total / step, t0)
        probs = predict_cls(net, val["image"], val["mask"])
        scores = {k: auroc(val["labels"][:, LABELS.index(k)], probs[:, LABELS.index(k)]) for k in NIH_LABELS}
        mean = float(np.nanmean(list(scores.values())))
        log.info("cls_validation", epoch=epoch + 1, mean=round(mean, 4), **{k: round(v, 4) for k, v in scores.items()})
        if mean > best:
            best, best_state, best_scores = mean, {k: v.clone() for k, v in net.state_dict().items()}, dict(scores, epoch=epoch + 1)
            if on_best is not None:
                on_best(net, best_scores)
    net.load_state_dict(best_state)
    return net.eval(), best_scores


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def export_onnx(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str], path: Path) -> None:
    module.eval()
    dynamic = {name: {0: "batch"} for name in input_names + output_names}
    torch.onnx.export(module, inputs, str(path), input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic, opset_version=17, dynamo=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def export_segmenter(unet: UNet, path: Path) -> None:
    x = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    export_onnx(SegmenterExport(unet), (x,), ["image"], ["seg_prob"], path)


def export_classifier(net: ThoracicClassifier, path: Path) -> None:
    x = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    m = torch.ones(1, 1, INPUT_SIZE, INPUT_SIZE)
    export_onnx(ClassifierExport(net), (x, m), ["image", "mask"], ["probability", "evidence"], path)


# Most training radiographs are licensed CC BY-NC-SA or without a stated licence (see MODEL_CARD.md).
USE_NOTE = "for research, non-commercial use only (training images under CC BY-NC-SA or unstated licences)"


def write_entry(onnx_path: Path, name: str, version: str, extra: dict) -> Path:
    entry = RegistryEntry(name=name, version=version, file=onnx_path.name, sha256=sha256_file(onnx_path),
                          phantom_trained=False, use_note=USE_NOTE, extra=extra)
    json_path = onnx_path.with_suffix(".json")
    entry.save(json_path)
    return json_path


# ---------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------


def atlas_mask(masks: dict[str, np.ndarray], split: np.ndarray) -> np.ndarray:
    """The lungs-and-heart union where at least half of the mask set's training images have it, (224, 224) uint8.

    The classifier trains with this mask (warped with each image) instead of the U-Net's, so the
    two networks train independently; at inference the U-Net's own mask weighs the features, and
    the operating points are calibrated with it.
    """
    _, m = warp(masks["image"][split == "train"], masks["masks"][split == "train"], None)
    return (m.any(1).mean(0) >= 0.5).astype(np.uint8)


def _cxr14(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], np.ndarray]:
    nih = cache_cxr14(args.cxr14_csv, args.cxr14_images, args.cache, args.workers)
    return nih, data.split_by_group(nih["patient"], args.split_seed, val=data.CXR14_VAL, test=data.CXR14_TEST)


def stage_seg(args: argparse.Namespace, masks: dict[str, np.ndarray], split: np.ndarray) -> None:
    ph = cache_phantoms(args.phantoms, args.cache, args.workers)
    pick = lambda part: {k: v[split == part] for k, v in masks.items()}  # noqa: E731
    log.info("seg_data", train=int((split == "train").sum()), val=int((split == "val").sum()), phantoms=len(ph["image"]))
    training = (f"{int((split == 'train').sum())} real radiographs with masks (split seed {args.split_seed}) "
                f"and {args.phantoms} phantoms (seed {PHANTOM_SEED}), {args.seg_epochs} epochs, seed {args.seed}")

    def on_best(net: UNet, scores: dict[str, float]) -> None:
        torch.save({"state": net.state_dict(), "validation_dice": scores, "training": training}, args.cache / "unet.pt")

    train_seg(pick("train"), ph, pick("val"), args.seg_epochs, args.seed, on_best=on_best)


def stage_cls(args: argparse.Namespace, masks: dict[str, np.ndarray], split: np.ndarray) -> None:
    nih, nsplit = _cxr14(args)
    nih["mask"] = np.broadcast_to(atlas_mask(masks, split), nih["image"].shape)
    pick = lambda part: {k: v[nsplit == part] for k, v in nih.items()}  # noqa: E731
    train, val = pick("train"), pick("val")
    log.info("cls_data", train=len(train["labels"]), val=len(val["labels"]))
    training = (f"{len(train['labels'])} ChestX-ray14 images (split by patient, seed {args.split_seed}), "
                f"{args.cls_epochs} epochs, seed {args.seed}, mask-set atlas mask")

    def on_best(net: ThoracicClassifier, scores: dict[str, float]) -> None:
        torch.save({"state": net.state_dict(), "cfg": net.cfg.as_dict(), "validation_auroc_atlas_mask": scores, "training": training},
                   args.cache / "cls.pt")

    train_cls(train, val, args.cls_epochs, args.seed, on_best=on_best)


def stage_export(args: argparse.Namespace) -> None:
    """Both networks to ONNX; operating points on the ChestX-ray14 validation split with the U-Net's masks."""
    out = args.weights
    out.mkdir(parents=True, exist_ok=True)
    seg_saved, cls_saved = torch.load(args.cache / "unet.pt"), torch.load(args.cache / "cls.pt")
    unet = UNet(base=UNET_BASE, downsample=UNET_DOWNSAMPLE)
    unet.load_state_dict(seg_saved["state"])
    cfg = DenseNetConfig(**{**cls_saved["cfg"], "block_config": tuple(cls_saved["cfg"]["block_config"])})
    net = ThoracicClassifier(cfg)
    net.load_state_dict(cls_saved["state"])
    nih, nsplit = _cxr14(args)
    val = {k: v[nsplit == "val"] for k, v in nih.items()}
    val["mask"] = nih_masks(unet.eval(), val["image"])
    probs = predict_cls(net.eval(), val["image"], val["mask"])
    cols = {k: LABELS.index(k) for k in NIH_LABELS}
    ops = {k: round(youden_threshold(val["labels"][:, j], probs[:, j]), 4) for k, j in cols.items()}
    val_auroc = {k: round(auroc(val["labels"][:, j], probs[:, j]), 4) for k, j in cols.items()}
    log.info("calibrated", operating_points=ops, validation_auroc=val_auroc)
    seg_path, cls_path = out / "lung_heart_unet.onnx", out / "thoracic_classifier.onnx"
    export_segmenter(unet, seg_path)
    write_entry(seg_path, "lung_heart_unet", SEG_VERSION, {
        "input_size": INPUT_SIZE, "segments": list(SEGMENTS), "unet_base": UNET_BASE, "unet_downsample": UNET_DOWNSAMPLE,
        "training": seg_saved["training"], "validation_dice": {k: round(float(v), 4) for k, v in seg_saved["validation_dice"].items()},
    })
    export_classifier(net, cls_path)
    write_entry(cls_path, "thoracic_classifier", CLS_VERSION, {
        "input_size": INPUT_SIZE, "labels": list(LABELS), "evaluated_labels": list(NIH_LABELS),
        "operating_points": ops,
        "operating_points_from": f"{len(val['labels'])} ChestX-ray14 validation images (split by patient, seed {args.split_seed}), "
                                 "U-Net masks, Youden index",
        "validation_auroc": val_auroc, "densenet": cfg.as_dict(), "training": cls_saved["training"],
    })
    log.info("exported", weights=str(out), seg_bytes=seg_path.stat().st_size, cls_bytes=cls_path.stat().st_size)
    from .evaluate import main as evaluate_main

    evaluate_main(["--masks", str(args.masks), "--cxr14-csv", str(args.cxr14_csv), "--cxr14-images", str(args.cxr14_images),
                   "--weights", str(out), "--write"])


def run(args: argparse.Namespace) -> None:
    args.cache.mkdir(parents=True, exist_ok=True)
    masks = cache_masks(args.masks, args.cache)
    split = data.split_by_group(masks["stem"], args.split_seed, val=data.MASK_VAL, test=data.MASK_TEST)
    if args.stage in ("all", "seg"):
        stage_seg(args, masks, split)
    if args.stage in ("all", "cls"):
        stage_cls(args, masks, split)
    if args.stage in ("all", "export"):
        stage_export(args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m analyzers.chest_xray_thoracic.train", description=__doc__.split("\n")[0])
    p.add_argument("--masks", type=Path, required=True, help="folder of radiographs with lung and heart masks")
    p.add_argument("--cxr14-csv", type=Path, required=True, help="ChestX-ray14 Data_Entry table")
    p.add_argument("--cxr14-images", type=Path, required=True, help="folder with the table's PNG images")
    p.add_argument("--stage", choices=["all", "seg", "cls", "export"], default="all",
                   help="all (default: seg, cls, export); seg and cls train one network each into the cache "
                        "(independent, so they can run side by side); export calibrates, writes the weights and metrics.json")
    p.add_argument("--cache", type=Path, default=Path(".cache/chest_xray_thoracic"))
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--phantoms", type=int, default=300)
    p.add_argument("--seg-epochs", type=int, default=14)
    p.add_argument("--cls-epochs", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=data.SPLIT_SEED)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads; more than 1 is slower on a shared, busy CPU")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
