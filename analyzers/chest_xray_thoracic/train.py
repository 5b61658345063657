"""Train the lung/heart U-Net and the thoracic classifier; export ONNX weights and registry entries.

Phantom training (the bundled weights), in stages so they can run side by side::

    python -m analyzers.chest_xray_thoracic.train data  --cache /tmp/cxr   # render phantoms once
    python -m analyzers.chest_xray_thoracic.train seg   --cache /tmp/cxr   # U-Net, dice loss
    python -m analyzers.chest_xray_thoracic.train cls   --cache /tmp/cxr   # classifier, BCE
    python -m analyzers.chest_xray_thoracic.train export --cache /tmp/cxr  # ONNX, operating points, metrics

Continuing from the bundled ONNX weights (the torch state is not bundled)::

    python -m analyzers.chest_xray_thoracic.train from-onnx --cache /tmp/cxr    # unet.pt + cls.pt from weights/
    python -m analyzers.chest_xray_thoracic.train cls --cache /tmp/cxr --resume --lr 3e-4
    python -m analyzers.chest_xray_thoracic.train export --cache /tmp/cxr --keep-segmenter

``from-onnx`` copies the ONNX initializers back into the torch modules
(``analyzers.onnx_import``); BatchNorms folded into convolutions by the
exporter become identities there, so a classifier started from ONNX trains
with every BatchNorm in eval mode (running statistics frozen).

Seeds: training phantoms use seed 1000, validation 2000 (operating points), the
held-out evaluation 3000; tests use seeds from 5000 on, never used here.

Real data: ``cls --cxr14-csv Data_Entry_2017.csv --cxr14-images DIR [--cxr14-split
train_val_list.txt]`` trains the classifier on ChestX-ray14 with the U-Net's
masks, all 14 labels evaluated; ``import-densenet CKPT`` turns a torchvision-
layout DenseNet-121 checkpoint into ONNX weights and a registry entry.
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

from . import phantom, preprocess
from .evaluate import auroc, dice, youden_threshold
from .model import (
    DENSENET121,
    INPUT_SIZE,
    LABELS,
    SEG_CLASSES,
    SYNTHESISED,
    ClassifierExport,
    DenseNetConfig,
    SegmenterExport,
    ThoracicClassifier,
    UNet,
    dice_loss,
    import_torchvision_densenet,
)

log = structlog.get_logger("dicomnode.analyzers.chest_xray_thoracic.train")

WEIGHTS = Path(__file__).resolve().parent / "weights"
SEEDS = {"train": 1000, "val": 2000, "test": 3000}
SMALL = DenseNetConfig(growth_rate=12, block_config=(2, 4, 6, 4), num_init_features=16, bn_size=2)
UNET_BASE = 8
UNET_DOWNSAMPLE = 2
SEG_VERSION = "1.0.0"
CLS_VERSION = "1.1.0"
LESION_WEIGHT = {"Nodule": 6.0, "Mass": 3.0}
"""Small lesions are learnt last: their loss terms count more."""
MIN_VAL_AUROC = 0.95
"""A synthesised label is reported by the bundled weights only when validation AUROC reaches this."""


# ---------------------------------------------------------------------------
# Phantom data
# ---------------------------------------------------------------------------


def _example(seed: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(list(seed))
    ph = phantom.render(rng)
    patient = phantoms.PhantomPatient.make(rng, "cxr", seed[1])
    prep = preprocess.prepare(phantom.to_dataset(ph, rng, patient))
    seg = seg_target(ph.masks)
    labels = np.asarray([float(ph.labels.get(k, False)) for k in LABELS], np.float32)
    return prep.net_input[0].astype(np.float16), seg, labels, ph.ctr


def seg_target(masks: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """(3, rows, cols) bool masks to a (size, size) class-index map (SEG_CLASSES order)."""
    from dicomnode.imaging import resize

    out = np.zeros((size, size), np.uint8)
    for i, m in enumerate(masks):
        out[resize(m.astype(np.float32), (size, size), order=1) > 0.5] = i + 1
    return out


def render_split(split: str, n: int, workers: int = 2) -> dict[str, np.ndarray]:
    seeds = [(SEEDS[split], i) for i in range(n)]
    t0 = time.time()
    with Pool(workers) as pool:
        rows = []
        for k, row in enumerate(pool.imap(_example, seeds, chunksize=8)):
            rows.append(row)
            if (k + 1) % 100 == 0:
                log.info("rendered", split=split, done=k + 1, of=n, seconds=round(time.time() - t0, 1))
    return {
        "image": np.stack([r[0] for r in rows]),
        "seg": np.stack([r[1] for r in rows]),
        "labels": np.stack([r[2] for r in rows]),
        "ctr": np.asarray([r[3] for r in rows], np.float32),
    }


def load_split(cache: Path, split: str) -> dict[str, np.ndarray]:
    with np.load(cache / f"{split}.npz") as z:
        return {k: z[k] for k in z.files}


def to_input(img16: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Cached first channels to 3-channel inputs, exactly as ``preprocess.to_net_input`` makes them.

    With ``rng``, a random gamma (0.5-2) imitates the different tone curves of
    real detectors and processing, which a linear window cannot undo.
    """
    from .model import IMAGENET_MEAN, IMAGENET_STD

    raw = np.clip(img16.astype(np.float32) * IMAGENET_STD[0] + IMAGENET_MEAN[0], 0, 1)
    out = []
    for img in raw:
        img = preprocess.stretch_contrast(img)
        if rng is not None:
            img = preprocess.stretch_contrast(img ** float(np.exp(rng.uniform(-0.7, 0.7))))
        out.append(img)
    return torch.from_numpy(preprocess.normalise(np.stack(out)))


# ---------------------------------------------------------------------------
# Training loops
# ---------------------------------------------------------------------------


_STEPS = {"seg": 0, "cls": 0}


def _progress(what: str, epoch: int, total: float, n: int, t0: float) -> None:
    _STEPS[what] += 1
    if _STEPS[what] % 20 == 0:
        log.info(f"{what}_step", step=_STEPS[what], epoch=epoch + 1, seconds=round(time.time() - t0, 1))


def train_seg(data: dict[str, np.ndarray], epochs: int, seed: int = 0, batch: int = 16) -> UNet:
    torch.manual_seed(seed)
    net = UNet(base=UNET_BASE, downsample=UNET_DOWNSAMPLE)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    n = len(data["image"])
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        net.train()
        t0, total = time.time(), 0.0
        for idx in torch.randperm(n, generator=gen).split(batch):
            x = to_input(data["image"][idx.numpy()], rng)
            y = torch.from_numpy(data["seg"][idx.numpy()].astype(np.int64))
            logits = net(x)
            # dice as in the paper; a little cross-entropy steadies the first epochs
            loss = dice_loss(logits, y) + 0.2 * F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            _progress("seg", epoch, total, n, t0)
        log.info("seg_epoch", epoch=epoch + 1, of=epochs, loss=round(total / n, 4), seconds=round(time.time() - t0, 1))
    return net.eval()


def jitter_mask(seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Union lung/heart mask with a random dilation or erosion, as an imperfect U-Net would give."""
    from scipy import ndimage

    m = seg > 0
    k = int(rng.integers(-2, 3))
    if k > 0:
        m = ndimage.binary_dilation(m, iterations=k)
    elif k < 0:
        m = ndimage.binary_erosion(m, iterations=-k)
    return m.astype(np.float32)


def set_train(net: torch.nn.Module, frozen_bn: bool = False) -> None:
    """``net.train()``; with ``frozen_bn`` every BatchNorm stays in eval mode (running statistics used and kept).

    Needed for networks loaded from ONNX, whose folded BatchNorms are identities:
    batch statistics would change what they compute.
    """
    net.train()
    if frozen_bn:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def train_cls(images: np.ndarray, masks: np.ndarray, labels: np.ndarray, label_weight: np.ndarray, cfg: DenseNetConfig,
              epochs: int, seed: int = 0, batch: int = 16, net: ThoracicClassifier | None = None,
              jitter: bool = True, loader=None, max_lr: float = 2e-3, frozen_bn: bool = False,
              on_epoch=None) -> ThoracicClassifier:
    """BCE over the labels with weight 1 in ``label_weight`` (others are not judged by these data).

    ``frozen_bn`` keeps every BatchNorm in eval mode (see :func:`set_train`);
    ``on_epoch(epoch, net)`` is called after each epoch (validation, checkpoints).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = net or ThoracicClassifier(cfg, dropout=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=max_lr / 2, weight_decay=1e-4)
    n = len(labels)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    w = torch.from_numpy(label_weight.astype(np.float32))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        set_train(net, frozen_bn)
        t0, total = time.time(), 0.0
        for idx in torch.randperm(n, generator=gen).split(batch):
            ids = idx.numpy()
            if loader is not None:
                x, m = loader(ids)
            else:
                x = to_input(images[ids], rng)
                m = np.stack([jitter_mask(masks[i], rng) if jitter else (masks[i] > 0).astype(np.float32) for i in ids])
                m = torch.from_numpy(m)[:, None]
            y = torch.from_numpy(labels[ids])
            logits, _ = net(x, m)
            loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum(1).mean() / w.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(ids)
            _progress("cls", epoch, total, n, t0)
        log.info("cls_epoch", epoch=epoch + 1, of=epochs, loss=round(total / n, 4), seconds=round(time.time() - t0, 1))
        if on_epoch is not None:
            net.eval()
            on_epoch(epoch, net)
    return net.eval()


@torch.no_grad()
def predict_masks(unet: UNet, images: np.ndarray, batch: int = 32) -> np.ndarray:
    out = []
    for s in range(0, len(images), batch):
        out.append(unet(to_input(images[s : s + batch])).argmax(1).numpy().astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def predict_probs(net: ThoracicClassifier, images: np.ndarray, seg: np.ndarray, batch: int = 32) -> np.ndarray:
    out = []
    for s in range(0, len(images), batch):
        m = torch.from_numpy((seg[s : s + batch] > 0).astype(np.float32))[:, None]
        logits, _ = net(to_input(images[s : s + batch]), m)
        out.append(torch.sigmoid(logits).numpy())
    return np.concatenate(out)


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


def write_entry(onnx_path: Path, name: str, version: str, phantom_trained: bool, extra: dict) -> Path:
    entry = RegistryEntry(name=name, version=version, file=onnx_path.name, sha256=sha256_file(onnx_path),
                          phantom_trained=phantom_trained, extra=extra)
    json_path = onnx_path.with_suffix(".json")
    entry.save(json_path)
    return json_path


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


def stage_data(args: argparse.Namespace) -> None:
    args.cache.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.n_train), ("val", args.n_val)):
        data = render_split(split, n, args.workers)
        np.savez(args.cache / f"{split}.npz", **data)
        log.info("split_written", split=split, n=n, prevalence={k: float(data["labels"][:, LABELS.index(k)].mean()) for k in SYNTHESISED})


def stage_seg(args: argparse.Namespace) -> None:
    data = {k: v[: args.n_seg] for k, v in load_split(args.cache, "train").items()}
    unet = train_seg(data, args.epochs or 10, seed=args.seed)
    torch.save(unet.state_dict(), args.cache / "unet.pt")
    val = load_split(args.cache, "val")
    pred = predict_masks(unet, val["image"])
    scores = {c: float(np.mean([dice(p == i, t == i) for p, t in zip(pred, val["seg"])])) for i, c in enumerate(SEG_CLASSES) if i}
    log.info("seg_val_dice", **{k: round(v, 4) for k, v in scores.items()})


def load_classifier(path: Path) -> ThoracicClassifier:
    return load_classifier_state(path)[0]


def load_classifier_state(path: Path) -> tuple[ThoracicClassifier, bool]:
    """The cached classifier and whether its BatchNorms must stay frozen (it came from ONNX)."""
    saved = torch.load(path)
    cfg = DenseNetConfig(**{**saved["cfg"], "block_config": tuple(saved["cfg"]["block_config"])})
    net = ThoracicClassifier(cfg, dropout=0.1)
    net.load_state_dict(saved["state"])
    return net.eval(), bool(saved.get("frozen_bn", False))


def save_classifier(net: ThoracicClassifier, path: Path, frozen_bn: bool = False) -> None:
    torch.save({"state": net.state_dict(), "cfg": net.cfg.as_dict(), "frozen_bn": frozen_bn}, path)


def classifier_from_onnx(path: Path) -> ThoracicClassifier:
    """The bundled classifier (ONNX + its registry json) as a torch module; its folded BatchNorms are identities."""
    from analyzers.onnx_import import load_from_onnx

    entry = RegistryEntry.load(Path(path).with_suffix(".json"))
    d = entry.extra["densenet"]
    cfg = DenseNetConfig(growth_rate=int(d["growth_rate"]), block_config=tuple(d["block_config"]),
                         num_init_features=int(d["num_init_features"]), bn_size=int(d["bn_size"]))
    net = ThoracicClassifier(cfg, dropout=0.1)
    wrapper = ClassifierExport(net).eval()
    how = load_from_onnx(wrapper, Path(path), (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE), torch.ones(1, 1, INPUT_SIZE, INPUT_SIZE)))
    log.info("classifier_from_onnx", path=str(path), loaded=how)
    return net.eval()


def unet_from_onnx(path: Path) -> UNet:
    """The bundled U-Net (ONNX + its registry json) as a torch module."""
    from analyzers.onnx_import import load_from_onnx

    entry = RegistryEntry.load(Path(path).with_suffix(".json"))
    unet = UNet(base=int(entry.extra["unet_base"]), downsample=int(entry.extra["unet_downsample"]))
    wrapper = SegmenterExport(unet).eval()
    how = load_from_onnx(wrapper, Path(path), (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),))
    log.info("unet_from_onnx", path=str(path), loaded=how)
    return unet.eval()


def onnx_parity(module: torch.nn.Module, path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Max abs difference of all outputs, ``module`` (the export wrapper) against ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)
    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return max(float(np.abs(o.numpy() - r).max()) for o, r in zip(out, ref))


def stage_from_onnx(args: argparse.Namespace) -> None:
    """unet.pt and cls.pt in the cache from the ONNX weights in ``--weights``; parity and validation AUROCs logged."""
    args.cache.mkdir(parents=True, exist_ok=True)
    seg_path, cls_path = args.weights / "lung_heart_unet.onnx", args.weights / "thoracic_classifier.onnx"
    unet = unet_from_onnx(seg_path)
    net = classifier_from_onnx(cls_path)
    torch.save(unet.state_dict(), args.cache / "unet.pt")
    save_classifier(net, args.cache / "cls.pt", frozen_bn=True)
    val = load_split(args.cache, "val")
    x = to_input(val["image"][:8]).numpy()
    masks = predict_masks(unet, val["image"][:8])
    m = (masks > 0).astype(np.float32)[:, None]
    log.info("onnx_parity", segmenter=onnx_parity(SegmenterExport(unet).eval(), seg_path, {"image": x}),
             classifier=onnx_parity(ClassifierExport(net).eval(), cls_path, {"image": x, "mask": m}))
    probs = predict_probs(net, val["image"], predict_masks(unet, val["image"]))
    log.info("val_auroc_unet_masks", **{k: round(auroc(val["labels"][:, LABELS.index(k)], probs[:, LABELS.index(k)]), 4) for k in SYNTHESISED})


def stage_cls(args: argparse.Namespace) -> None:
    lesion = {**LESION_WEIGHT, **dict(_label_weight(s) for s in args.label_weight)}
    weight = np.asarray([lesion.get(k, 1.0) if k in SYNTHESISED else 0.0 for k in LABELS], np.float32)
    frozen_bn = False
    if args.cxr14_csv:
        net = train_cxr14(args)
    else:
        data = {k: v[: args.n_cls] for k, v in load_split(args.cache, "train").items()}
        start = None
        if args.resume_onnx:
            start, frozen_bn = classifier_from_onnx(args.resume_onnx), True
        elif args.resume:
            start, frozen_bn = load_classifier_state(args.cache / "cls.pt")
        val = load_split(args.cache, "val")
        val_masks = predict_masks(_cached_unet(args.cache), val["image"]) if (args.cache / "unet.pt").exists() else val["seg"]
        history: list[dict] = []

        def on_epoch(epoch: int, net: ThoracicClassifier) -> None:
            # validation phantoms (seed 2000) with the U-Net's masks, as export judges them; a checkpoint per epoch
            probs = predict_probs(net, val["image"], val_masks)
            scores = {k: round(auroc(val["labels"][:, LABELS.index(k)], probs[:, LABELS.index(k)]), 4) for k in SYNTHESISED}
            history.append(scores)
            save_classifier(net, args.cache / f"cls_epoch{epoch + 1}.pt", frozen_bn)
            log.info("cls_val_auroc", epoch=epoch + 1, **scores)

        net = train_cls(data["image"], data["seg"], data["labels"], weight, SMALL, args.epochs or 12, seed=args.seed, net=start,
                        max_lr=args.lr, frozen_bn=frozen_bn, on_epoch=on_epoch)
    save_classifier(net, args.cache / "cls.pt", frozen_bn)


def _label_weight(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in SYNTHESISED or not value:
        raise SystemExit(f"--label-weight wants LABEL=WEIGHT with a synthesised label, not {text!r}")
    return name, float(value)


def _cached_unet(cache: Path) -> UNet:
    unet = UNet(base=UNET_BASE, downsample=UNET_DOWNSAMPLE)
    unet.load_state_dict(torch.load(cache / "unet.pt"))
    return unet.eval()


def train_cxr14(args: argparse.Namespace) -> ThoracicClassifier:
    """The classifier on ChestX-ray14 PNGs, masks from the bundled (or trained) U-Net, all 14 labels."""
    from . import data as cxr_data

    names = cxr_data.read_split(args.cxr14_split) if args.cxr14_split else None
    records = cxr_data.read_chestxray14(args.cxr14_csv, args.cxr14_images, names=names)
    if not records:
        raise SystemExit(f"no ChestX-ray14 images found under {args.cxr14_images} for {args.cxr14_csv}")
    unet = UNet(base=UNET_BASE, downsample=UNET_DOWNSAMPLE)
    unet.load_state_dict(torch.load(args.cache / "unet.pt"))
    unet.eval()
    labels = np.stack([r.labels for r in records])

    def loader(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.stack([preprocess.to_net_input(cxr_data.load_png(records[i].path)) for i in ids]))
        with torch.no_grad():
            m = (unet(x).argmax(1, keepdim=True) > 0).float()
        return x, m

    log.info("cxr14_records", n=len(records))
    return train_cls(np.zeros(0), np.zeros(0), labels, np.ones(len(LABELS), np.float32), DENSENET121 if args.full_width else SMALL,
                     args.epochs or 50, seed=args.seed, loader=loader)


def stage_export(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_folders

    out = args.weights
    out.mkdir(parents=True, exist_ok=True)
    seg_path = out / "lung_heart_unet.onnx"
    if args.keep_segmenter:
        # the U-Net stays as bundled: its ONNX file and registry entry are not rewritten
        seg_entry = RegistryEntry.load(seg_path.with_suffix(".json"))
        if sha256_file(seg_path) != seg_entry.sha256:
            raise SystemExit(f"--keep-segmenter: {seg_path} does not match the sha256 in its registry entry")
    unet = _cached_unet(args.cache)
    net = load_classifier(args.cache / "cls.pt")
    cfg = net.cfg

    # operating points on validation phantoms, with the U-Net's masks as at inference
    val = load_split(args.cache, "val")
    probs = predict_probs(net, val["image"], predict_masks(unet, val["image"]))
    ops = {k: round(youden_threshold(val["labels"][:, LABELS.index(k)], probs[:, LABELS.index(k)]), 4) for k in SYNTHESISED}
    # a label the weights cannot separate on validation data is withheld ("not evaluated"), not guessed
    val_auroc = {k: round(auroc(val["labels"][:, LABELS.index(k)], probs[:, LABELS.index(k)]), 4) for k in SYNTHESISED}
    evaluated = [k for k in SYNTHESISED if val_auroc[k] >= MIN_VAL_AUROC]
    log.info("validation", auroc=val_auroc, evaluated=evaluated)

    cls_path = out / "thoracic_classifier.onnx"
    if not args.keep_segmenter:
        export_segmenter(unet, seg_path)
        write_entry(seg_path, "lung_heart_unet", SEG_VERSION, True, {
            "input_size": INPUT_SIZE, "classes": list(SEG_CLASSES), "unet_base": UNET_BASE, "unet_downsample": UNET_DOWNSAMPLE,
            "training": f"{args.n_train} phantoms, seed {SEEDS['train']}",
        })
    export_classifier(net, cls_path)
    write_entry(cls_path, "thoracic_classifier", CLS_VERSION, True, {
        "input_size": INPUT_SIZE, "labels": list(LABELS), "evaluated_labels": evaluated,
        "withheld_labels": {k: f"validation AUROC {v} < {MIN_VAL_AUROC}" for k, v in val_auroc.items() if k not in evaluated},
        "validation_auroc": val_auroc,
        "operating_points": {k: v for k, v in ops.items() if k in evaluated}, "operating_points_from": f"{len(val['labels'])} validation phantoms, seed {SEEDS['val']}, Youden index",
        "densenet": cfg.as_dict(), "training": f"{args.n_train} phantoms, seed {SEEDS['train']}",
    })
    log.info("exported", seg=str(seg_path), cls=str(cls_path), seg_bytes=seg_path.stat().st_size, cls_bytes=cls_path.stat().st_size)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folders = phantom.write_phantoms(Path(tmp), args.n_test, SEEDS["test"])
        metrics = evaluate_folders(folders, weights_dir=out)
    metrics["held_out"] = f"{args.n_test} phantom studies, seed {SEEDS['test']} (never used in training or for operating points)"
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("metrics", **{k: v for k, v in metrics.items() if not isinstance(v, dict)})


def stage_import(args: argparse.Namespace) -> None:
    """A torchvision-layout DenseNet checkpoint (state dict, or a dict with ``state_dict``) to ONNX + registry."""
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    net = import_torchvision_densenet(state, head=args.head)
    args.weights.mkdir(parents=True, exist_ok=True)
    path = args.weights / f"{args.name}.onnx"
    export_classifier(net, path)
    extra = {"input_size": INPUT_SIZE, "labels": list(LABELS), "evaluated_labels": list(LABELS),
             "operating_points": {k: 0.5 for k in LABELS}, "operating_points_from": "default 0.5; set per label from your validation data",
             "densenet": net.cfg.as_dict(), "imported_from": Path(args.checkpoint).name, "head": args.head}
    json_path = write_entry(path, args.name, args.version, False, extra)
    print(json_path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m analyzers.chest_xray_thoracic.train", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["data", "seg", "cls", "from-onnx", "export", "import-densenet"])
    p.add_argument("checkpoint", nargs="?", type=Path, help="import-densenet: the .pth state dict")
    p.add_argument("--cache", type=Path, default=Path("/tmp/cxr_thoracic"))
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--n-train", type=int, default=1600)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--n-seg", type=int, default=800, help="training phantoms used for the U-Net")
    p.add_argument("--n-cls", type=int, default=1600, help="training phantoms used for the classifier")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="cls: continue from the cached classifier")
    p.add_argument("--resume-onnx", type=Path, help="cls: continue from an ONNX classifier (with its registry json beside it)")
    p.add_argument("--lr", type=float, default=2e-3, help="cls: peak learning rate of the one-cycle schedule")
    p.add_argument("--label-weight", action="append", default=[], metavar="LABEL=W",
                   help=f"cls: loss weight of a synthesised label (default {LESION_WEIGHT}, others 1)")
    p.add_argument("--keep-segmenter", action="store_true", help="export: keep the U-Net's ONNX file and registry entry as they are")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cxr14-csv", type=Path)
    p.add_argument("--cxr14-images", type=Path)
    p.add_argument("--cxr14-split", type=Path)
    p.add_argument("--full-width", action="store_true", help="train a full DenseNet-121 (real data)")
    p.add_argument("--head", choices=["global", "local"], default="global")
    p.add_argument("--name", default="thoracic_classifier_imported")
    p.add_argument("--version", default="1.0.0")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage == "import-densenet" and args.checkpoint is None:
        p.error("import-densenet needs the checkpoint path")
    {"data": stage_data, "seg": stage_seg, "cls": stage_cls, "from-onnx": stage_from_onnx, "export": stage_export,
     "import-densenet": stage_import}[args.stage](args)


if __name__ == "__main__":
    main(sys.argv[1:])
