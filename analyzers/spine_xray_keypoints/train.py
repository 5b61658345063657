"""Train the vertebra detectors and BayeCBAM keypoint regressors, export ONNX, calibrate, evaluate.

Usage::

    python -m analyzers.spine_xray_keypoints.train --out analyzers/spine_xray_keypoints/weights \
        --images 3000 --workers 2 --device cpu

Everything is seeded. Training phantoms use seeds (region, 1, i), the validation
phantoms that calibrate tau1 / tau2 use (region, 2, i) and the held-out phantoms
of metrics.json use (region, 3, i); ``write_phantoms`` (tests, CLI) draws from
(seed, i) with two-element seeds, so none of them overlap.

The cervical models train first; the lumbar models start from their weights, as
in the paper. ``--data DIR`` trains on annotated studies instead of phantoms:
folders holding one lateral radiograph (DICOM) and a ``truth.json`` in the
phantom's format (region, vertebrae -> points [[column, row] x 5], visible).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from analyzers import phantoms
from dicomnode.analysis import RegistryEntry, sha256_file

from . import evaluate, inference, preprocess
from .constants import LEVELS
from .mensuration import measure
from .model import BayeCBAMKeypointNet, MCDropoutKeypoints, VertebraDetector, aleatoric_loss
from .phantom import phantom_dataset, render

REGION_CODE = {"cervical": 1, "lumbar": 2}
VERSION = "1.0.0"
CROPS_PER_VERTEBRA = 2
MC_SAMPLES = 16
CORNER_POOL = (4, 4)


def _log(msg: str, **kw: Any) -> None:
    extra = " ".join(f"{k}={v}" for k, v in kw.items())
    print(f"[{time.strftime('%H:%M:%S')}] {msg} {extra}", flush=True)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _phantom_image(region: str, seed: tuple[int, ...]) -> tuple[np.ndarray, tuple[float, float], dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(list(seed))
    ph = render(rng, region)
    patient = phantoms.PhantomPatient("PH-TRAIN", "PHANTOM^TRAIN", "19700101", "O", study_uid="1.2.3")
    ds = phantom_dataset(ph, patient, rng)
    img, spacing = preprocess.load_image(ds)
    return img, spacing, ph.points, ph.visible


def _sample(args: tuple[str, tuple[int, ...], int]) -> dict[str, Any]:
    region, seed, k_crops = args
    img, spacing, points, visible = _phantom_image(region, seed)
    return _samples_from(img, points, visible, region, np.random.default_rng([*seed, 99]), k_crops)


def _samples_from(img: np.ndarray, points: dict[str, np.ndarray], visible: dict[str, np.ndarray], region: str, rng: np.random.Generator, k_crops: int) -> dict[str, Any]:
    size = preprocess.DETECTOR_SIZE
    det = preprocess.detector_input(img)[0, 0].astype(np.float16)
    sr, sc = size / img.shape[0], size / img.shape[1]
    boxes, crops, targets, vis, body_crops, body_targets = [], [], [], [], [], []
    for k, label in enumerate(LEVELS[region]):
        if label not in points:
            continue
        p = np.asarray(points[label], np.float64)
        tb = preprocess.tight_box(p)
        cx, cy = (tb[0] + tb[2]) / 2, (tb[1] + tb[3]) / 2
        if not (0 <= cx < img.shape[1] and 0 <= cy < img.shape[0]):
            continue
        boxes.append([cx * sc, cy * sr, (tb[2] - tb[0]) * sc, (tb[3] - tb[1]) * sr, k])
        w, h = tb[2] - tb[0], tb[3] - tb[1]
        for _ in range(k_crops):
            # detector-like error on the box: shift and scale, then the paper's random padding
            jit = np.array([rng.normal(0, 0.05) * w, rng.normal(0, 0.07) * h])
            sw, sh = rng.uniform(0.9, 1.12), rng.uniform(0.88, 1.15)
            ccx, ccy = cx + jit[0], cy + jit[1]
            box = np.array([ccx - sw * w / 2, ccy - sh * h / 2, ccx + sw * w / 2, ccy + sh * h / 2])
            cb = preprocess.crop_box(box, pad=rng.uniform(0.04, 0.22))
            c = preprocess.crop(img, cb)
            if rng.random() < 0.3:
                c = preprocess.clahe(c, clip=rng.uniform(1.5, 4.0))
            crops.append(preprocess.standardise(c).astype(np.float16))
            targets.append(preprocess.to_crop(p, cb).astype(np.float32).reshape(-1))
            vis.append(np.asarray(visible[label], bool))
        bb = preprocess.body_box(p)
        bw, bh = bb[2] - bb[0], bb[3] - bb[1]
        bcx, bcy = (bb[0] + bb[2]) / 2, (bb[1] + bb[3]) / 2
        for _ in range(k_crops):
            # the body box comes from the wide crop's corners: smaller error than the detector's, then random padding
            ccx, ccy = bcx + rng.normal(0, 0.05) * bw, bcy + rng.normal(0, 0.06) * bh
            sw, sh = rng.uniform(0.92, 1.1), rng.uniform(0.9, 1.12)
            box = np.array([ccx - sw * bw / 2, ccy - sh * bh / 2, ccx + sw * bw / 2, ccy + sh * bh / 2])
            cb = preprocess.crop_box(box, pad=rng.uniform(0.08, 0.24), aspect=preprocess.BODY_CROP_SHAPE[0] / preprocess.BODY_CROP_SHAPE[1])
            c = preprocess.crop(img, cb, preprocess.BODY_CROP_SHAPE)
            if rng.random() < 0.3:
                c = preprocess.clahe(c, clip=rng.uniform(1.5, 4.0))
            body_crops.append(preprocess.standardise(c).astype(np.float16))
            body_targets.append(preprocess.to_crop(p, cb).astype(np.float32).reshape(-1))
    return {
        "det": det,
        "boxes": np.array(boxes, np.float32).reshape(-1, 5),
        "crops": np.array(crops, np.float16).reshape(-1, *preprocess.CROP_SHAPE),
        "targets": np.array(targets, np.float32).reshape(-1, 10),
        "visible": np.array(vis, bool).reshape(-1, 5),
        "body_crops": np.array(body_crops, np.float16).reshape(-1, *preprocess.BODY_CROP_SHAPE),
        "body_targets": np.array(body_targets, np.float32).reshape(-1, 10),
    }


def _load_annotated(folder: Path) -> tuple[str, np.ndarray, tuple[float, float], dict[str, np.ndarray], dict[str, np.ndarray]]:
    import pydicom

    truth = json.loads((folder / "truth.json").read_text())
    dcm = next(p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".dcm")
    img, spacing = preprocess.load_image(pydicom.dcmread(dcm))
    pts = {k: np.asarray(v["points"], np.float64) for k, v in truth["vertebrae"].items()}
    vis = {k: np.asarray(v.get("visible", [True] * 5), bool) for k, v in truth["vertebrae"].items()}
    return truth["region"], img, spacing, pts, vis


def _collect(region: str, n: int, split: int, workers: int, data_dir: Path | None, from_image: Callable[..., dict[str, Any]],
             from_phantom: Callable[[tuple[str, tuple[int, ...], int]], dict[str, Any]], salt: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Per-image samples: ``from_image`` on the annotated studies of ``data_dir`` (seeded (split, i, *salt)),
    else ``from_phantom`` on ``n`` phantoms of the split, over ``workers`` processes."""
    if data_dir is not None:
        items = []
        for i, folder in enumerate(sorted(p for p in Path(data_dir).iterdir() if (p / "truth.json").is_file())):
            reg, img, _, pts, vis = _load_annotated(folder)
            if reg == region:
                items.append(from_image(img, pts, vis, region, np.random.default_rng([split, i, *salt]), CROPS_PER_VERTEBRA))
        return items
    jobs = [(region, (REGION_CODE[region], split, i), CROPS_PER_VERTEBRA) for i in range(n)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            return pool.map(from_phantom, jobs, chunksize=8)
    return [from_phantom(j) for j in jobs]


def generate(region: str, n: int, split: int, workers: int, data_dir: Path | None = None, cache: Path | None = None) -> dict[str, Any]:
    """Training samples for ``region``: detector images with boxes, and augmented vertebra crops."""
    t0 = time.time()
    cached = cache / f"{region}_{split}_{n}_body.npz" if cache is not None and data_dir is None else None
    keys = ("det", "crops", "targets", "visible", "body_crops", "body_targets")
    if cached is not None and cached.is_file():
        z = np.load(cached, allow_pickle=True)
        _log("data from cache", path=str(cached))
        return {"boxes": list(z["boxes"]), **{k: z[k] for k in keys}}
    items = _collect(region, n, split, workers, data_dir, _samples_from, _sample)
    out = {
        "det": np.stack([it["det"] for it in items]),
        "boxes": [it["boxes"] for it in items],
        "crops": np.concatenate([it["crops"] for it in items]),
        "targets": np.concatenate([it["targets"] for it in items]),
        "visible": np.concatenate([it["visible"] for it in items]),
        "body_crops": np.concatenate([it["body_crops"] for it in items]),
        "body_targets": np.concatenate([it["body_targets"] for it in items]),
    }
    _log("data", region=region, images=len(items), crops=len(out["crops"]), seconds=round(time.time() - t0, 1))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        boxes = np.empty(len(out["boxes"]), dtype=object)
        boxes[:] = out["boxes"]
        np.savez(cached, boxes=boxes, **{k: out[k] for k in keys})
    return out


def _corner_sample(args: tuple[str, tuple[int, ...], int]) -> dict[str, np.ndarray]:
    region, seed, k_crops = args
    img, _, points, visible = _phantom_image(region, seed)
    return _corner_samples_from(img, points, visible, region, np.random.default_rng([*seed, 98]), k_crops)


def _corner_samples_from(img: np.ndarray, points: dict[str, np.ndarray], visible: dict[str, np.ndarray], region: str,
                         rng: np.random.Generator, k_crops: int) -> dict[str, np.ndarray]:  # noqa: ARG001 (visible: the signature _collect calls)
    """Corner patches of the body corners, centred off the corner as the body model errs, with their targets.

    Hidden corners (under metal or collimation, outside the image) are kept: their place is
    known from the anatomy, not from the patch, so the aleatoric loss teaches the model a large
    variance for them, as the whole-vertebra crops do.
    """
    crops, targets = [], []
    for label in LEVELS[region]:
        if label not in points:
            continue
        p = np.asarray(points[label], np.float64)
        depth = max(preprocess.body_size(p))
        for _ in range(k_crops):
            centres = p[:4] + np.clip(rng.normal(0, 0.05 * depth, (4, 2)), -0.12 * depth, 0.12 * depth)
            half = preprocess.CORNER_HALF * rng.uniform(0.85, 1.2)
            for k, box in enumerate(preprocess.corner_boxes(p, half, centres)):
                c = preprocess.crop(img, box, preprocess.CORNER_SHAPE)
                if rng.random() < 0.2:
                    c = _occlude(c, rng)
                if rng.random() < 0.3:
                    c = preprocess.clahe(c, tiles=(2, 2), clip=rng.uniform(1.5, 4.0))
                crops.append(preprocess.standardise(c).astype(np.float16))
                targets.append(preprocess.to_crop(p[k], box).astype(np.float32).reshape(-1))
    return {"crops": np.array(crops, np.float16).reshape(-1, *preprocess.CORNER_SHAPE),
            "targets": np.array(targets, np.float32).reshape(-1, 2)}


def _occlude(c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cover the patch centre (where the corner is) with a flat block: metal, collimation or a cut-off field.

    The target stays where the anatomy puts it, so the aleatoric loss learns a large variance
    for a corner the patch does not show.
    """
    rows, cols = c.shape
    h, w = int(rows * rng.uniform(0.4, 1.0)), int(cols * rng.uniform(0.4, 1.0))
    r0 = int(rng.integers(max(0, rows // 2 - h + 4), min(rows - h, rows // 2 - 4) + 1))
    c0 = int(rng.integers(max(0, cols // 2 - w + 4), min(cols - w, cols // 2 - 4) + 1))
    out = c.copy()
    lo, hi = float(c.min()), float(c.max())
    out[r0 : r0 + h, c0 : c0 + w] = rng.choice([hi + 0.5 * (hi - lo), hi, lo]) + rng.normal(0, 0.01 * (hi - lo + 1e-6), (h, w))
    return out


def generate_corners(region: str, n: int, split: int, workers: int, data_dir: Path | None = None, cache: Path | None = None) -> dict[str, np.ndarray]:
    """Corner-patch training samples for ``region`` (the corner model's data)."""
    t0 = time.time()
    cached = cache / f"{region}_{split}_{n}_corners.npz" if cache is not None and data_dir is None else None
    if cached is not None and cached.is_file():
        z = np.load(cached)
        _log("data from cache", path=str(cached))
        return {"crops": z["crops"], "targets": z["targets"]}
    items = _collect(region, n, split, workers, data_dir, _corner_samples_from, _corner_sample, salt=(98,))
    out = {"crops": np.concatenate([it["crops"] for it in items]), "targets": np.concatenate([it["targets"] for it in items])}
    _log("corner data", region=region, images=len(items), patches=len(out["crops"]), seconds=round(time.time() - t0, 1))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, **out)
    return out


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _grid_targets(boxes: list[np.ndarray], grid: int, n_cls: int, flip: np.ndarray) -> tuple[np.ndarray, ...]:
    cell = preprocess.DETECTOR_SIZE / grid
    n = len(boxes)
    obj = np.zeros((n, grid, grid), np.float32)
    txy = np.zeros((n, 2, grid, grid), np.float32)
    twh = np.zeros((n, 2, grid, grid), np.float32)
    cls = np.full((n, grid, grid), -100, np.int64)
    for b, bx in enumerate(boxes):
        for cx, cy, w, h, k in bx:
            if flip[b]:
                cx = preprocess.DETECTOR_SIZE - cx
            j, i = min(int(cx // cell), grid - 1), min(int(cy // cell), grid - 1)
            obj[b, i, j] = 1.0
            txy[b, :, i, j] = [cx / cell - j, cy / cell - i]
            twh[b, :, i, j] = [math.log(max(w, 1.0) / cell), math.log(max(h, 1.0) / cell)]
            cls[b, i, j] = int(k)
    return obj, txy, twh, cls


def train_detector(data: dict[str, Any], n_cls: int, epochs: int, device: str, init: VertebraDetector | None = None, seed: int = 0, lr: float = 2e-3) -> VertebraDetector:
    torch.manual_seed(seed)
    net = VertebraDetector(n_cls).to(device)
    if init is not None:
        net.load_state_dict(init.state_dict())
    imgs = torch.from_numpy(data["det"]).to(device)
    n = len(imgs)
    batch = 16
    steps = epochs * math.ceil(n / batch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    grid = None
    for ep in range(epochs):
        net.train()
        perm = rng.permutation(n)
        total = 0.0
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            flip = rng.random(len(idx)) < 0.5
            x = imgs[idx].float().unsqueeze(1)
            fl = torch.from_numpy(flip).to(device)
            x = torch.where(fl[:, None, None, None], x.flip(-1), x)
            out = net(x)
            grid = out.shape[-1]
            obj, txy, twh, cls = (torch.from_numpy(a).to(device) for a in _grid_targets([data["boxes"][i] for i in idx], grid, n_cls, flip))
            pos = obj > 0.5
            l_obj = F.binary_cross_entropy_with_logits(out[:, 0], obj, pos_weight=torch.tensor(4.0, device=device))
            posm = pos.unsqueeze(1)
            l_xy = (F.binary_cross_entropy_with_logits(out[:, 1:3], txy, reduction="none") * posm).sum() / posm.sum().clamp(min=1)
            l_wh = (F.smooth_l1_loss(out[:, 3:5], twh, reduction="none", beta=0.1) * posm).sum() / posm.sum().clamp(min=1)
            l_cls = F.cross_entropy(out[:, 5:], cls, ignore_index=-100)
            loss = l_obj + 2.0 * l_xy + 2.0 * l_wh + l_cls
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        _log("detector", epoch=ep + 1, loss=round(total / n, 4))
    return net.eval()


def train_keypoints(
    data: dict[str, Any],
    epochs: int,
    device: str,
    width: int,
    hidden: int,
    init: BayeCBAMKeypointNet | None = None,
    seed: int = 0,
    lr: float = 1.5e-3,
    warm: int | None = None,
    n_points: int = 5,
    pool: tuple[int, int] = (4, 8),
) -> BayeCBAMKeypointNet:
    torch.manual_seed(seed)
    net = BayeCBAMKeypointNet(width=width, hidden=hidden, pool=pool, n_points=n_points).to(device)
    if init is not None:
        # everything whose shape matches (a corner model starts from the body model's features)
        own = net.state_dict()
        net.load_state_dict({**own, **{k: v for k, v in init.state_dict().items() if k in own and own[k].shape == v.shape}})
    crops = torch.from_numpy(data["crops"]).to(device)
    targets = torch.from_numpy(data["targets"]).to(device)
    n = len(crops)
    batch = 64
    steps = epochs * math.ceil(n / batch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    # the mean head learns with MSE first; the aleatoric loss then adds the variance head
    if warm is None:
        warm = max(1, epochs // 5) if init is None else 0
    xsign = torch.tensor([-1.0, 1.0] * n_points, device=device)
    xoff = torch.tensor([1.0, 0.0] * n_points, device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=g).to(device)
        total = 0.0
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            x = crops[idx].float().unsqueeze(1)
            y = targets[idx]
            flip = torch.rand(len(idx), device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None], xoff + xsign * y, y)
            mean, logvar = net(x)
            if ep < warm:
                loss = F.mse_loss(mean, y) * 100.0
            else:
                loss = aleatoric_loss(mean, logvar, y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        _log("keypoints", epoch=ep + 1, loss=round(total / n, 5))
    return net.eval()


# ---------------------------------------------------------------------------
# Export, calibration, evaluation
# ---------------------------------------------------------------------------


def export_detector(net: VertebraDetector, path: Path) -> None:
    net = net.cpu().eval()
    x = torch.zeros(1, 1, preprocess.DETECTOR_SIZE, preprocess.DETECTOR_SIZE)
    torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["grid"], opset_version=17, dynamo=False)


def export_keypoints(net: BayeCBAMKeypointNet, path: Path, shape: tuple[int, int] = preprocess.CROP_SHAPE) -> None:
    net = net.cpu().eval()
    wrapper = MCDropoutKeypoints(net).eval()
    x = torch.zeros(2, 1, *shape)
    m = torch.ones(3, 2, net.hidden)
    torch.onnx.export(
        wrapper,
        (x, m, m),
        str(path),
        input_names=["crops", "mask1", "mask2"],
        output_names=["mean", "logvar"],
        dynamic_axes={"crops": {0: "n"}, "mask1": {0: "t", 1: "n"}, "mask2": {0: "t", 1: "n"}, "mean": {0: "t", 1: "n"}, "logvar": {0: "t", 1: "n"}},
        opset_version=17,
        dynamo=False,
    )


def _kp_session(path: Path) -> inference.KeypointFn:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    kp = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def kp_fn(c: np.ndarray, m1: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, logvar = kp.run(["mean", "logvar"], {"crops": c, "mask1": m1, "mask2": m2})
        return mean, logvar

    return kp_fn


def onnx_functions(det_path: Path, kp_path: Path) -> tuple[inference.DetectorFn, inference.KeypointFn]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    det = ort.InferenceSession(str(det_path), opts, providers=["CPUExecutionProvider"])

    def det_fn(x: np.ndarray) -> np.ndarray:
        return det.run(["grid"], {"image": x})[0]

    return det_fn, _kp_session(kp_path)


def _predict_one(args: tuple[str, tuple[int, ...], str, str, str | None, int, float, float, float, bool, str | None]) -> tuple[evaluate.StudyRecord, list[tuple[float, float, bool]]]:
    region, seed, det_path, kp_path, body_path, hidden, p_drop, tau1, tau2, flip, corner_path = args
    det_fn, kp_fn = onnx_functions(Path(det_path), Path(kp_path))
    body_fn = _kp_session(Path(body_path)) if body_path else None
    corner_fn = _kp_session(Path(corner_path)) if corner_path else None
    img, spacing, points, visible = _phantom_image(region, seed)
    preds = inference.predict(img, spacing, region, det_fn, kp_fn, hidden, p_drop, samples=MC_SAMPLES, seed=0, body_fn=body_fn, flip=flip, corner_fn=corner_fn)
    rec = evaluate.StudyRecord(
        region=region,
        spacing=spacing,
        truth_points=points,
        truth_visible=visible,
        truth_measurements={(m.key, m.group): m.value for m in measure(points, spacing, region)},
        image_shape=img.shape,
    )
    pairs = []
    mm = np.array([spacing[1], spacing[0]])
    for p in preds:
        rec.pred_points[p.label] = p.points
        rec.pred_sigma[p.label] = p.sigma_mm
        rec.pred_class[p.label] = [inference.classify(float(s), tau1, tau2).value for s in p.sigma_mm]
        if p.label in points:
            err = np.sqrt((((p.points - points[p.label]) * mm) ** 2).sum(-1))
            pairs += list(zip(p.sigma_mm.tolist(), err.tolist(), visible[p.label].tolist()))
    sig = {p.label: p.sigma_mm for p in preds}
    high = {p.label: [c == "highly_uncertain" for c in rec.pred_class[p.label]] for p in preds}
    for m in measure({p.label: p.points for p in preds}, spacing, region, sig):
        rec.pred_measurements[(m.key, m.group)] = (m.value, any(high[v][i] for v, i in m.depends_on))
    return rec, pairs


def run_eval(
    region: str,
    split: int,
    n: int,
    det_path: Path,
    kp_path: Path,
    hidden: int,
    p_drop: float,
    tau: tuple[float, float],
    workers: int,
    body_path: Path | None = None,
    flip: bool = False,
    corner_path: Path | None = None,
) -> tuple[list[evaluate.StudyRecord], list[tuple[float, float, bool]]]:
    body = str(body_path) if body_path is not None else None
    corner = str(corner_path) if corner_path is not None else None
    jobs = [(region, (REGION_CODE[region], split, i), str(det_path), str(kp_path), body, hidden, p_drop, tau[0], tau[1], flip, corner) for i in range(n)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            res = pool.map(_predict_one, jobs, chunksize=4)
    else:
        res = [_predict_one(j) for j in jobs]
    records = [r for r, _ in res]
    pairs = [p for _, ps in res for p in ps]
    return records, pairs


def _load_nets(folder: Path, region: str, width: int, hidden: int) -> tuple[VertebraDetector, BayeCBAMKeypointNet]:
    det, kp = VertebraDetector(len(LEVELS[region])), BayeCBAMKeypointNet(width=width, hidden=hidden)
    det.load_state_dict(torch.load(folder / f"detector_{region}.pt"))
    kp.load_state_dict(torch.load(folder / f"keypoints_{region}.pt"))
    return det.eval(), kp.eval()


def _entry(name: str, file: Path, out: Path, extra: dict[str, Any], version: str = VERSION) -> None:
    entry = RegistryEntry(name=name, version=version, file=file.name, sha256=sha256_file(file), phantom_trained=True, extra=extra)
    entry.save(out / f"{name}.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    ap.add_argument("--images", type=int, default=3000, help="training phantoms per region")
    ap.add_argument("--val", type=int, default=200, help="validation phantoms per region (tau calibration)")
    ap.add_argument("--test", type=int, default=200, help="held-out phantoms per region (metrics.json)")
    ap.add_argument("--det-epochs", type=int, default=40)
    ap.add_argument("--kp-epochs", type=int, default=40)
    ap.add_argument("--lumbar-fraction", type=float, default=0.6, help="lumbar epochs as a fraction (initialised from cervical)")
    ap.add_argument("--width", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=None, help="annotated studies (truth.json format) instead of phantoms")
    ap.add_argument("--skip-train", action="store_true", help="re-export, calibrate and evaluate the .pt weights in --out")
    ap.add_argument("--regions", nargs="+", default=["cervical", "lumbar"], choices=["cervical", "lumbar"])
    ap.add_argument("--init", type=Path, default=None, help="continue from the .pt weights of an earlier run in this folder")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="scales both peak learning rates (e.g. 0.5 when continuing)")
    ap.add_argument("--train-split", type=int, default=1, help="seed split of the training phantoms (region, split, i); not 2 or 3")
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep generated training data between runs")
    ap.add_argument("--body", action="store_true", help="train only the vertebral-body keypoint models (from the wide keypoint models or earlier body ones); detector and wide models stay")
    ap.add_argument("--corner", action="store_true", help="train only the corner models (one point per corner patch, from the body models)")
    ap.add_argument("--detector", action="store_true", help="train only the detectors (from --init or --out); the keypoint models stay")
    ap.add_argument("--no-flip", action="store_true", help="no mirrored crops at test time (by default each crop also runs mirrored)")
    ap.add_argument("--version", default=VERSION, help="version written to the registry files")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"mc_samples": MC_SAMPLES, "seeds": {"train": "(region, 1, i)", "validation": "(region, 2, i)", "test": "(region, 3, i)"}}
    if args.train_split in (2, 3):
        raise SystemExit("--train-split 2 and 3 are the validation and test phantoms")
    prev_det, prev_kp = None, None
    if args.regions == ["lumbar"] and args.init is None:
        # the lumbar models start from the cervical ones of this output folder, as in the paper
        prev_det, prev_kp = VertebraDetector(len(LEVELS["cervical"])), BayeCBAMKeypointNet(width=args.width, hidden=args.hidden)
        prev_det.load_state_dict(torch.load(args.out / "detector_cervical.pt"))
        prev_kp.load_state_dict(torch.load(args.out / "keypoints_cervical.pt"))
    for region in args.regions:
        frac = 1.0 if region == "cervical" else args.lumbar_fraction
        kp_epochs = max(1, round(args.kp_epochs * frac))
        det_path, kp_path = args.out / f"detector_{region}.onnx", args.out / f"keypoints_{region}.onnx"
        body_path = args.out / f"keypoints_body_{region}.onnx"
        body: BayeCBAMKeypointNet | None = None
        corner_path = args.out / f"keypoints_corner_{region}.onnx"
        corner: BayeCBAMKeypointNet | None = None
        if args.body or args.detector or args.corner:
            # only the named parts train (body or corner keypoint model, detector); the rest stays as it is
            src = args.init if args.init is not None else args.out
            det, kp = _load_nets(src, region, args.width, args.hidden)
            body_init = src / f"keypoints_body_{region}.pt"
            if args.body or body_init.is_file():
                body = BayeCBAMKeypointNet(width=args.width, hidden=args.hidden)
                body.load_state_dict(torch.load(body_init if body_init.is_file() else src / f"keypoints_{region}.pt"))
            corner_init = src / f"keypoints_corner_{region}.pt"
            if args.corner or corner_init.is_file():
                corner = BayeCBAMKeypointNet(width=args.width, hidden=args.hidden, pool=CORNER_POOL, n_points=1)
                if corner_init.is_file():
                    corner.load_state_dict(torch.load(corner_init))
            if src.resolve() != args.out.resolve():
                for name in (f"detector_{region}", f"keypoints_{region}"):
                    for ext in ("onnx", "pt"):
                        shutil.copy2(src / f"{name}.{ext}", args.out / f"{name}.{ext}")
            if not args.skip_train and args.corner:
                assert corner is not None and body is not None
                cdata = generate_corners(region, args.images, args.train_split, args.workers, args.data, args.cache)
                start = corner if corner_init.is_file() else body  # a new corner model starts from the body model's features
                corner = train_keypoints(cdata, kp_epochs, args.device, args.width, args.hidden, init=start, seed=REGION_CODE[region],
                                         lr=1.5e-3 * args.lr_scale, warm=0 if corner_init.is_file() else max(1, kp_epochs // 6),
                                         n_points=1, pool=CORNER_POOL)
                del cdata
            if not args.skip_train and (args.body or args.detector):
                data = generate(region, args.images, args.train_split, args.workers, args.data, args.cache)
                if args.detector:
                    det = train_detector(data, len(LEVELS[region]), max(1, round(args.det_epochs * frac)), args.device, init=det, seed=REGION_CODE[region], lr=2e-3 * args.lr_scale)
                    export_detector(det, det_path)
                    torch.save(det.state_dict(), args.out / f"detector_{region}.pt")
                if args.body:
                    assert body is not None
                    body_data = {"crops": data["body_crops"], "targets": data["body_targets"]}
                    body = train_keypoints(body_data, kp_epochs, args.device, args.width, args.hidden, init=body, seed=REGION_CODE[region], lr=1.5e-3 * args.lr_scale, warm=0 if body_init.is_file() else max(1, kp_epochs // 6))
                    del body_data
                del data
        else:
            if args.init is not None:
                prev_det, prev_kp = _load_nets(args.init, region, args.width, args.hidden)
            if args.skip_train:
                det, kp = _load_nets(args.out, region, args.width, args.hidden)
            else:
                data = generate(region, args.images, args.train_split, args.workers, args.data, args.cache)
                det_epochs = round(args.det_epochs * frac)
                det = train_detector(data, len(LEVELS[region]), det_epochs, args.device, init=prev_det, seed=REGION_CODE[region], lr=2e-3 * args.lr_scale) if det_epochs else prev_det.eval()
                kp = train_keypoints(data, kp_epochs, args.device, args.width, args.hidden, init=prev_kp, seed=REGION_CODE[region], lr=1.5e-3 * args.lr_scale)
                del data
            export_detector(det, det_path)
            export_keypoints(kp, kp_path)
            torch.save(det.state_dict(), args.out / f"detector_{region}.pt")
            torch.save(kp.state_dict(), args.out / f"keypoints_{region}.pt")
            prev_det, prev_kp = det.to(args.device), kp.to(args.device)
        if body is not None:
            export_keypoints(body, body_path, preprocess.BODY_CROP_SHAPE)
            torch.save(body.state_dict(), args.out / f"keypoints_body_{region}.pt")
        if corner is not None:
            export_keypoints(corner, corner_path, preprocess.CORNER_SHAPE)
            torch.save(corner.state_dict(), args.out / f"keypoints_corner_{region}.pt")
        use_body = body_path if body_path.is_file() else None
        use_corner = corner_path if corner_path.is_file() and use_body is not None else None
        _, pairs = run_eval(region, 2, args.val, det_path, kp_path, args.hidden, kp.p_drop, (0.0, 0.0), args.workers, use_body, not args.no_flip, use_corner)
        if not pairs:
            raise SystemExit(f"no {region} vertebra was found in the validation phantoms; train longer or on more images")
        s, e, vis = np.array(pairs, dtype=np.float64).T
        tau1, tau2 = inference.calibrate(s, e, invisible_sigma=s[vis < 0.5])
        _log("calibrated", region=region, tau1=round(tau1, 4), tau2=round(tau2, 4))
        records, _ = run_eval(region, 3, args.test, det_path, kp_path, args.hidden, kp.p_drop, (tau1, tau2), args.workers, use_body, not args.no_flip, use_corner)
        m = evaluate.score(records)
        m["version"] = args.version
        m["tau1_mm"], m["tau2_mm"] = tau1, tau2
        m["target_misses"] = evaluate.failures(m)
        metrics[region] = m
        _log("held-out", region=region, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()})
        _entry(f"spine_xray_detector_{region}", det_path, args.out, {"input_size": preprocess.DETECTOR_SIZE, "labels": list(LEVELS[region]), "region": region}, args.version)
        _entry(
            f"spine_xray_keypoints_{region}",
            kp_path,
            args.out,
            {
                "region": region,
                "crop_shape": list(preprocess.CROP_SHAPE),
                "crop_pad": preprocess.CROP_PAD,
                "hidden": args.hidden,
                "p_drop": kp.p_drop,
                "mc_samples": MC_SAMPLES,
                "flip_test_time": not args.no_flip,
                "tau1_mm": tau1,
                "tau2_mm": tau2,
                "calibration": "tau1: sigma_p below which the 95th-percentile error first exceeds 1.5 mm; tau2: likewise 2 mm for [tau1, tau2); tau2 lowered so 90% of invisible validation points are highly uncertain; validation phantoms (region, 2, i)",
                "init": "cervical keypoint model" if region == "lumbar" else "random",
                **({"body_model": f"spine_xray_keypoints_body_{region}"} if use_body is not None else {}),
                **({"corner_model": f"spine_xray_keypoints_corner_{region}"} if use_corner is not None else {}),
            },
            args.version,
        )
        if use_body is not None:
            _entry(
                f"spine_xray_keypoints_body_{region}",
                body_path,
                args.out,
                {
                    "region": region,
                    "crop_shape": list(preprocess.BODY_CROP_SHAPE),
                    "crop_pad": preprocess.BODY_CROP_PAD,
                    "hidden": args.hidden,
                    "p_drop": kp.p_drop,
                    "points": "the four body corners replace the wide crop's; its spinous-process output is not used",
                    "init": f"{region} keypoint model",
                },
                args.version,
            )
        if use_corner is not None:
            _entry(
                f"spine_xray_keypoints_corner_{region}",
                corner_path,
                args.out,
                {
                    "region": region,
                    "crop_shape": list(preprocess.CORNER_SHAPE),
                    "corner_half": preprocess.CORNER_HALF,
                    "hidden": args.hidden,
                    "p_drop": kp.p_drop,
                    "n_points": 1,
                    "pool": list(CORNER_POOL),
                    "points": "each body corner again, on a patch around it oriented so the body lies to its lower right",
                    "init": f"{region} body keypoint model",
                },
                args.version,
            )
    path = args.out / "metrics.json"
    if path.is_file():
        metrics = {**json.loads(path.read_text()), **metrics}
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    _log("done", out=str(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
