"""Train the lung/heart U-Net and the thoracic classifier; export ONNX weights and registry entries.

Phantom training (the bundled weights), in stages so they can run side by side::

    python -m analyzers.chest_xray_thoracic.train data  --cache /tmp/cxr   # render phantoms once
    python -m analyzers.chest_xray_thoracic.train seg   --cache /tmp/cxr   # U-Net, dice loss
    python -m analyzers.chest_xray_thoracic.train cls   --cache /tmp/cxr   # classifier, BCE
    python -m analyzers.chest_xray_thoracic.train export --cache /tmp/cxr  # ONNX, operating points, metrics

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
from analyzers.base import RegistryEntry, sha256_file

from . import phantom, preprocess
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
CLS_VERSION = "1.0.0"
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
    from analyzers.imaging import resize

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


def train_cls(images: np.ndarray, masks: np.ndarray, labels: np.ndarray, label_weight: np.ndarray, cfg: DenseNetConfig,
              epochs: int, seed: int = 0, batch: int = 16, net: ThoracicClassifier | None = None,
              jitter: bool = True, loader=None) -> ThoracicClassifier:
    """BCE over the labels with weight 1 in ``label_weight`` (others are not judged by these data)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = net or ThoracicClassifier(cfg, dropout=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    n = len(labels)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    w = torch.from_numpy(label_weight.astype(np.float32))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
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
# Metrics and operating points
# ---------------------------------------------------------------------------


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN without both classes."""
    y = np.asarray(y).astype(bool)
    pos, neg = np.asarray(p)[y], np.asarray(p)[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability cut that maximises sensitivity + specificity - 1 (midpoint between scores)."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return 0.5
    s = np.unique(p)
    cuts = np.concatenate([[0.0], (s[:-1] + s[1:]) / 2, [1.0]])
    best, best_j = 0.5, -1.0
    for c in cuts:
        pred = p >= c
        j = pred[y].mean() + (~pred[~y]).mean() - 1
        if j > best_j:
            best, best_j = float(c), j
    return best


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


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
    saved = torch.load(path)
    cfg = DenseNetConfig(**{**saved["cfg"], "block_config": tuple(saved["cfg"]["block_config"])})
    net = ThoracicClassifier(cfg, dropout=0.1)
    net.load_state_dict(saved["state"])
    return net.eval()


def stage_cls(args: argparse.Namespace) -> None:
    weight = np.asarray([LESION_WEIGHT.get(k, 1.0) if k in SYNTHESISED else 0.0 for k in LABELS], np.float32)
    if args.cxr14_csv:
        net = train_cxr14(args)
    else:
        data = {k: v[: args.n_cls] for k, v in load_split(args.cache, "train").items()}
        start = load_classifier(args.cache / "cls.pt") if args.resume else None
        net = train_cls(data["image"], data["seg"], data["labels"], weight, SMALL, args.epochs or 12, seed=args.seed, net=start)
    torch.save({"state": net.state_dict(), "cfg": net.cfg.as_dict()}, args.cache / "cls.pt")
    if not args.cxr14_csv:
        val = load_split(args.cache, "val")
        probs = predict_probs(net, val["image"], val["seg"])
        log.info("cls_val_auroc", **{k: round(auroc(val["labels"][:, LABELS.index(k)], probs[:, LABELS.index(k)]), 4) for k in SYNTHESISED})


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
    unet = UNet(base=UNET_BASE, downsample=UNET_DOWNSAMPLE)
    unet.load_state_dict(torch.load(args.cache / "unet.pt"))
    unet.eval()
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

    seg_path = out / "lung_heart_unet.onnx"
    cls_path = out / "thoracic_classifier.onnx"
    export_segmenter(unet, seg_path)
    export_classifier(net, cls_path)
    write_entry(seg_path, "lung_heart_unet", SEG_VERSION, True, {
        "input_size": INPUT_SIZE, "classes": list(SEG_CLASSES), "unet_base": UNET_BASE, "unet_downsample": UNET_DOWNSAMPLE,
        "training": f"{args.n_train} phantoms, seed {SEEDS['train']}",
    })
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
    p.add_argument("stage", choices=["data", "seg", "cls", "export", "import-densenet"])
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
    {"data": stage_data, "seg": stage_seg, "cls": stage_cls, "export": stage_export, "import-densenet": stage_import}[args.stage](args)


if __name__ == "__main__":
    main(sys.argv[1:])
