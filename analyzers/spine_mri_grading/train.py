"""Train the vertebra detector, the corner regressor and the grading network; export ONNX; evaluate.

Usage::

    nice python -m analyzers.spine_mri_grading.train --studies 300 --workers 2

Seeds: training phantoms (1, i), the held-out phantoms of ``metrics.json``
(3, i) with the frozen test seed (evaluate.TEST_SEED); ``write_phantoms`` (CLI,
tests) uses two-element seeds (seed, i) of its own. Training sets raise the
rare findings (``--enrich``); the held-out set keeps the SPIDER frequencies.

``--data DIR`` reads annotated studies in the phantom's layout (a sagittal T2
DICOM series and a ``truth.json`` with vertebra corners and disc grades; see
:func:`annotated_samples`) instead of rendering phantoms, so real weights train
with the same script. SPIDER ships MHA volumes with masks and the gradings CSV:
a converter writes them in this layout (corners from each mask's minimum-area
rectangle on its mid slice), one folder per study.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dicomnode.analysis import RegistryEntry, sha256_file

from . import evaluate, inference, preprocess
from .constants import (
    CORNER_SIZE,
    DETECTOR_MM,
    DETECTOR_SIZE,
    DETECTOR_STRIDE,
    DISC_SHAPE,
    DISC_SLICES,
    GRADING_KEYS,
    LEVELS,
    N_CLASSES,
    VERTEBRAE,
)
from .model import CornerRegressor, GradingNet, VertebraDetector, balanced_multitask_loss
from .phantom import Phantom, render

VERSION = "0.1.0"
DETECTOR_SLICES = 5
"""Slices per training study for the detector."""
SACRUM_WEIGHT = 4.0
WEIGHTS = Path(__file__).resolve().parent / "weights"
GRID = DETECTOR_SIZE // DETECTOR_STRIDE


def _log(msg: str, **kw: Any) -> None:
    extra = " ".join(f"{k}={v}" for k, v in kw.items())
    print(f"[{time.strftime('%H:%M:%S')}] {msg} {extra}", flush=True)


# ---------------------------------------------------------------------------
# Samples from one study
# ---------------------------------------------------------------------------


def study_samples(ph: Phantom, rng: np.random.Generator) -> dict[str, Any]:
    """Detector canvases and targets, corner crops and targets, disc volumes and labels, chain truth."""
    vol = ph.t2 / max(float(np.percentile(ph.t2, 99.0)), 1e-6)
    px = ph.pixel_mm
    origin = ph.meta["origin_mm"]
    canvases, heat, mask, reg, reg_mask = [], [], [], [], []
    # the slices nearest the spine and two more anywhere: the detector sees mostly bodies, some lateral slices
    spine_x = np.mean([b.lateral for b in ph.bodies])
    near = list(np.argsort(np.abs(ph.slice_x - spine_x))[:DETECTOR_SLICES - 2])
    rest = [k for k in range(len(ph.slice_x)) if k not in near]
    chosen = sorted(near + list(rng.permutation(rest)[:2]))
    for k in chosen:
        x = ph.slice_x[k]
        canvas, cmap = preprocess.detector_canvas(vol[k], px)
        h = np.zeros((2, GRID, GRID), np.float32)
        m = np.ones((2, GRID, GRID), np.float32)
        r = np.zeros((6, GRID, GRID), np.float32)
        rm = np.zeros((GRID, GRID), np.float32)
        for b in ph.bodies:
            kind = 1 if b.name == "S1" else 0
            frac = b.depth_at(float(x)) / b.depth
            centre = cmap.to_canvas((b.centre - origin) / px) / DETECTOR_STRIDE
            gc, gr = int(np.floor(centre[0])), int(np.floor(centre[1]))
            if not (0 <= gc < GRID and 0 <= gr < GRID) or frac < 0.25:
                continue
            if frac < 0.55:
                m[kind, max(0, gr - 2): gr + 3, max(0, gc - 2): gc + 3] = 0.0
                continue
            yy, xx = np.mgrid[0:GRID, 0:GRID]
            g = np.exp(-((xx + 0.5 - centre[0]) ** 2 + (yy + 0.5 - centre[1]) ** 2) / (2 * 1.0 ** 2))
            h[kind] = np.maximum(h[kind], g)
            r[:, gr, gc] = [centre[0] - gc, centre[1] - gr, np.log(b.height / inference.SIZE_MM), np.log(b.depth * frac / inference.SIZE_MM),
                            np.sin(b.angle), np.cos(b.angle)]
            rm[gr, gc] = 1.0
        canvases.append(canvas)
        heat.append(h)
        mask.append(m)
        reg.append(r)
        reg_mask.append(rm)
    crops, corner_targets = [], []
    for b in ph.bodies:
        if b.name not in VERTEBRAE:
            continue
        ks = [k for k, x in enumerate(ph.slice_x) if b.depth_at(float(x)) >= 0.7 * b.depth]
        for k in rng.permutation(ks)[:3]:
            d = b.depth_at(float(ph.slice_x[k]))
            truth = (b.corners(d) - origin) / px
            centre = (b.centre - origin) / px + rng.normal(0, 2.5 / px, 2)
            crop, frame = preprocess.corner_crop(vol[k], centre, b.angle + np.deg2rad(rng.normal(0, 4)),
                                                 b.height / px * rng.uniform(0.85, 1.15), d / px * rng.uniform(0.85, 1.15))
            crops.append(crop)
            corner_targets.append(preprocess.to_crop(frame, truth).reshape(-1))
    discs, labels = [], []
    for disc in ph.discs:
        a, b = disc.level.split("-")
        up, lo = ph.body(a), ph.body(b)
        x_mid = (up.lateral + lo.lateral) / 2
        k_mid = (x_mid - ph.slice_x[0]) / ph.slice_mm
        for _ in range(2):
            cu = (up.corners(up.depth_at(x_mid)) - origin) / px + rng.normal(0, 1.0 / px, (4, 2))
            cl = (lo.corners(lo.depth_at(x_mid)) - origin) / px + rng.normal(0, 1.0 / px, (4, 2))
            geom = preprocess.disc_geometry(cu, cl, k_mid + rng.normal(0, 0.3))
            discs.append(np.round(preprocess.disc_volume(vol, geom) * 255).astype(np.uint8))
            labels.append([disc.grades[k] for k in GRADING_KEYS])
    chain = {}
    for b in ph.bodies:
        if b.name in VERTEBRAE:
            chain[b.name] = inference.Candidate(int(b.name == "S1"), 1.0, 0.0, (b.centre - origin) / px, b.height, b.depth, b.angle)
    return {
        "canvas": np.stack(canvases), "heat": np.stack(heat), "mask": np.stack(mask), "reg": np.stack(reg), "reg_mask": np.stack(reg_mask),
        "crops": np.stack(crops), "corners": np.stack(corner_targets).astype(np.float32),
        "discs": np.stack(discs), "labels": np.array(labels, np.int64), "chain": chain, "pixel_mm": px,
    }


def annotated_samples(folder: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Samples from an annotated study: a sagittal T2 DICOM series and ``truth.json`` in the phantom's layout.

    truth.json: ``vertebrae`` {T12 ... S1: {"slice": mid-sagittal slice, "corners_px": [[col, row] x 4]}} in the
    canonical orientation of preprocess.canonical, ``discs`` {level: {"grades": {grading: class index or -1}}}.
    Bodies count as present on the slices within ``half_width_slices`` (default 2) of their mid slice.
    """
    import pydicom

    from analyzers.volume import assemble
    from dicomnode.analysis import Study

    truth = json.loads((folder / "truth.json").read_text())
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")
    study = Study.from_datasets([pydicom.dcmread(p) for p in paths], paths)
    series = next(s for s in study.series if s.series_instance_uid == truth.get("t2_series_instance_uid", s.series_instance_uid))
    canon = preprocess.canonical(assemble(series))
    vol, px = canon.array, canon.pixel_mm
    half = int(truth.get("half_width_slices", 2))
    verts = {}
    for name, v in truth["vertebrae"].items():
        c = np.asarray(v["corners_px"], dtype=np.float64)
        axis = (c[3] + c[2]) / 2 - (c[0] + c[1]) / 2
        height = float(np.linalg.norm(axis)) * px
        depth = float(np.linalg.norm((c[1] + c[2]) / 2 - (c[0] + c[3]) / 2)) * px
        verts[name] = (c, float(v["slice"]), height, depth, float(np.arctan2(axis[0], axis[1])))
    canvases, heat, mask, reg, reg_mask = [], [], [], [], []
    for k in range(vol.shape[0]):
        canvas, cmap = preprocess.detector_canvas(vol[k], px)
        h, m = np.zeros((2, GRID, GRID), np.float32), np.ones((2, GRID, GRID), np.float32)
        r, rm = np.zeros((6, GRID, GRID), np.float32), np.zeros((GRID, GRID), np.float32)
        for name, (c, sl, height, depth, angle) in verts.items():
            kind = int(name == "S1")
            centre = cmap.to_canvas(c.mean(axis=0)) / DETECTOR_STRIDE
            gc, gr = int(np.floor(centre[0])), int(np.floor(centre[1]))
            if not (0 <= gc < GRID and 0 <= gr < GRID) or abs(k - sl) > half + 1:
                continue
            if abs(k - sl) > half:
                m[kind, max(0, gr - 2): gr + 3, max(0, gc - 2): gc + 3] = 0.0
                continue
            yy, xx = np.mgrid[0:GRID, 0:GRID]
            h[kind] = np.maximum(h[kind], np.exp(-((xx + 0.5 - centre[0]) ** 2 + (yy + 0.5 - centre[1]) ** 2) / 2.0))
            r[:, gr, gc] = [centre[0] - gc, centre[1] - gr, np.log(height / inference.SIZE_MM), np.log(depth / inference.SIZE_MM), np.sin(angle), np.cos(angle)]
            rm[gr, gc] = 1.0
        canvases.append(canvas)
        heat.append(h)
        mask.append(m)
        reg.append(r)
        reg_mask.append(rm)
    crops, corner_targets = [], []
    for name, (c, sl, height, depth, angle) in verts.items():
        k = int(np.clip(round(sl), 0, vol.shape[0] - 1))
        crop, frame = preprocess.corner_crop(vol[k], c.mean(axis=0) + rng.normal(0, 2.5 / px, 2), angle + np.deg2rad(rng.normal(0, 4)),
                                             height / px * rng.uniform(0.85, 1.15), depth / px * rng.uniform(0.85, 1.15))
        crops.append(crop)
        corner_targets.append(preprocess.to_crop(frame, c).reshape(-1))
    discs, labels = [], []
    for level, d in truth["discs"].items():
        a, b = level.split("-")
        if a not in verts or b not in verts:
            continue
        geom = preprocess.disc_geometry(verts[a][0], verts[b][0], (verts[a][1] + verts[b][1]) / 2)
        discs.append(np.round(preprocess.disc_volume(vol, geom) * 255).astype(np.uint8))
        labels.append([int(d["grades"].get(k, -1)) for k in GRADING_KEYS])
    chain = {n: inference.Candidate(int(n == "S1"), 1.0, v[1], v[0].mean(axis=0), v[2], v[3], v[4]) for n, v in verts.items() if n in VERTEBRAE}
    return {
        "canvas": np.stack(canvases), "heat": np.stack(heat), "mask": np.stack(mask), "reg": np.stack(reg), "reg_mask": np.stack(reg_mask),
        "crops": np.stack(crops), "corners": np.stack(corner_targets).astype(np.float32),
        "discs": np.stack(discs), "labels": np.array(labels, np.int64), "chain": chain, "pixel_mm": px,
    }


def _phantom_samples(args: tuple[int, int, float]) -> dict[str, Any]:
    split, i, enrich = args
    torch.set_num_threads(1)
    rng = np.random.default_rng([split, i])
    ph = render(rng, enrich=enrich)
    return study_samples(ph, np.random.default_rng([split, i, 7]))


def generate(n: int, split: int, enrich: float, workers: int, data_dir: Path | None = None) -> dict[str, Any]:
    """Training samples from ``n`` phantoms, or from every annotated study folder under ``data_dir``."""
    out: list[dict[str, Any]] = []
    t0 = time.time()
    if data_dir is not None:
        folders = sorted(p.parent for p in Path(data_dir).rglob("truth.json"))
        if not folders:
            raise SystemExit(f"no study folder with a truth.json under {data_dir}; see the module docstring for the layout")
        for j, folder in enumerate(folders):
            out.append(annotated_samples(folder, np.random.default_rng([split, j])))
    else:
        jobs = [(split, i, enrich) for i in range(n)]
        with mp.get_context("fork").Pool(workers) as pool:
            for j, s in enumerate(pool.imap(_phantom_samples, jobs, chunksize=4)):
                out.append(s)
                if (j + 1) % 50 == 0:
                    _log("phantoms", done=j + 1, of=n, seconds=round(time.time() - t0))
    merged: dict[str, Any] = {k: np.concatenate([s[k] for s in out]) for k in ("canvas", "heat", "mask", "reg", "reg_mask", "crops", "corners", "discs", "labels")}
    merged["chains"] = [s["chain"] for s in out]
    merged["pixel_mm"] = [s["pixel_mm"] for s in out]
    return merged


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _focal(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.ge(0.99).float()
    loss = -(pos * (1 - p) ** 2 * torch.log(p) + (1 - pos) * (1 - target) ** 4 * p ** 2 * torch.log(1 - p)) * mask
    # one sacrum per slice against several bodies: its channel weighs more so that the anchor is found
    weight = torch.tensor([1.0, SACRUM_WEIGHT], device=logits.device)[None, :, None, None]
    return (loss * weight).sum() / pos.sum().clamp_min(1.0)


def _resumed(net: torch.nn.Module, path: Path | None) -> torch.nn.Module:
    if path is not None:
        net.load_state_dict(torch.load(path))
        _log("resume", weights=path.name)
    return net


def train_detector(data: dict[str, Any], epochs: int, width: int, seed: int, init: Path | None = None) -> VertebraDetector:
    torch.manual_seed(seed)
    net = _resumed(VertebraDetector(width), init)
    x = torch.from_numpy(data["canvas"])[:, None]
    heat, mask = torch.from_numpy(data["heat"]), torch.from_numpy(data["mask"])
    reg, reg_mask = torch.from_numpy(data["reg"]), torch.from_numpy(data["reg_mask"])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    n, bs = len(x), 32
    steps = epochs * (n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        net.train()
        for i in range(n // bs):
            idx = perm[i * bs: (i + 1) * bs]
            xb = x[idx] * (1 + 0.2 * (torch.rand(len(idx), 1, 1, 1, generator=g) - 0.5))
            out = net(xb)
            lh = _focal(out[:, :2], heat[idx], mask[idx])
            rm = reg_mask[idx][:, None]
            lr_ = (F.smooth_l1_loss(out[:, 2:4].sigmoid(), reg[idx][:, :2], reduction="none") * rm).sum() + \
                  (F.smooth_l1_loss(out[:, 4:], reg[idx][:, 2:], reduction="none") * rm).sum()
            loss = lh + lr_ / rm.sum().clamp_min(1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += loss.item()
        _log("detector", epoch=ep + 1, loss=round(total / max(1, n // bs), 4))
    return net.eval()


def train_corners(data: dict[str, Any], epochs: int, seed: int, init: Path | None = None) -> CornerRegressor:
    torch.manual_seed(seed)
    net = _resumed(CornerRegressor(CORNER_SIZE), init)
    x = torch.from_numpy(data["crops"])[:, None]
    y = torch.from_numpy(data["corners"])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    n, bs = len(x), 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * (n // bs))
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(n // bs):
            idx = perm[i * bs: (i + 1) * bs]
            loss = F.mse_loss(net(x[idx]), y[idx], reduction="sum") / len(idx)  # eq. 3.9
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        _log("corners", epoch=ep + 1, loss=round(total / max(1, n // bs), 5))
    return net.eval()


def class_weights(labels: np.ndarray) -> list[torch.Tensor]:
    """alpha_c = freq(c)^-1 per task (eq. 4.3), normalised to mean 1; missing labels (< 0) not counted."""
    out = []
    for t, n in enumerate(N_CLASSES):
        y = labels[:, t]
        counts = np.bincount(y[y >= 0], minlength=n).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n, 0.0)
        out.append(torch.tensor(w / max(w[w > 0].mean(), 1e-9), dtype=torch.float32))
    return out


def _augment(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Thesis 4.2.3.2 (smaller): shifts in x/y, one slice either way, slice-wise flips, intensity."""
    out = torch.empty_like(xb)
    for i in range(len(xb)):
        v = xb[i]
        dy, dx, dz = (int(torch.randint(-a, a + 1, (1,), generator=g)) for a in (3, 5, 1))
        v = torch.roll(v, shifts=(dz, dy, dx), dims=(0, 1, 2))
        if torch.rand(1, generator=g) < 0.5:
            v = v.flip(0)
        out[i] = v
    scale = 1 + 0.2 * (torch.rand(len(xb), 1, 1, 1, generator=g) - 0.5)
    shift = 0.1 * (torch.rand(len(xb), 1, 1, 1, generator=g) - 0.5)
    return (out * scale + shift).clamp(0, 1)


def train_grading(data: dict[str, Any], epochs: int, width: int, hidden: int, seed: int, init: Path | None = None,
                  peak_lr: float = 0.03) -> GradingNet:
    torch.manual_seed(seed)
    net = _resumed(GradingNet(width, hidden), init)
    x = torch.from_numpy(data["discs"])
    y = torch.from_numpy(data["labels"])
    weights = class_weights(data["labels"])
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    n, bs = len(x), 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, peak_lr, total_steps=epochs * (n // bs))
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(n // bs):
            idx = perm[i * bs: (i + 1) * bs]
            xb = _augment(x[idx].float() / 255.0, g)
            loss = balanced_multitask_loss(net(xb), y[idx], weights)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item()
        _log("grading", epoch=ep + 1, loss=round(total / max(1, n // bs), 4))
    return net.eval()


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def export(net: torch.nn.Module, path: Path, shape: tuple[int, ...], in_name: str, out_name: str) -> None:
    net = net.cpu().eval()
    torch.onnx.export(net, (torch.zeros(2, *shape),), str(path), input_names=[in_name], output_names=[out_name],
                      dynamic_axes={in_name: {0: "n"}, out_name: {0: "n"}}, opset_version=17, dynamo=False)


def save_entry(name: str, file: Path, out: Path, extra: dict[str, Any], version: str = VERSION) -> RegistryEntry:
    entry = RegistryEntry(name=name, version=version, file=file.name, sha256=sha256_file(file), phantom_trained=True, extra=extra)
    entry.save(out / f"{name}.json")
    return entry


def torch_functions(det: VertebraDetector, corner: CornerRegressor, grader: GradingNet):
    def wrap(net):
        def fn(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return net(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        return fn
    return wrap(det), wrap(corner), wrap(grader)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--studies", type=int, default=300, help="training phantoms")
    ap.add_argument("--enrich", type=float, default=0.5, help="extra slips and stenoses in the training phantoms (0: SPIDER frequencies)")
    ap.add_argument("--det-epochs", type=int, default=6)
    ap.add_argument("--corner-epochs", type=int, default=15)
    ap.add_argument("--grade-epochs", type=int, default=20)
    ap.add_argument("--det-width", type=int, default=8)
    ap.add_argument("--width", type=int, default=4, help="grading network width: channels 2w-4w-8w-8w-8w (VGG-M: 96-256-512-512-512)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test", type=int, default=100, help="held-out phantoms for metrics.json (0: skip)")
    ap.add_argument("--cache", type=Path, default=None, help="npz file keeping the generated training data between runs")
    ap.add_argument("--train", nargs="+", default=["detector", "corners", "grading"], choices=["detector", "corners", "grading"],
                    help="networks to train; the others stay as they are in --out")
    ap.add_argument("--data-only", action="store_true", help="only generate the training data into --cache")
    ap.add_argument("--data", type=Path, default=None, help="annotated study folders (DICOM + truth.json) instead of phantoms")
    ap.add_argument("--resume", action="store_true", help="continue the listed networks from their .pt in --out (grading at 0.3 x the peak rate)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cache is not None and args.cache.is_file():
        with open(args.cache.with_suffix(".chains.json")) as f:
            side = json.load(f)
        data = dict(np.load(args.cache))
        data["chains"] = [{k: inference.Candidate(int(k == "S1"), 1.0, 0.0, np.array(v[0]), v[1], v[2], v[3]) for k, v in c.items()} for c in side["chains"]]
        data["pixel_mm"] = side["pixel_mm"]
        _log("cache", studies=len(data["chains"]))
    else:
        data = generate(args.studies, 1, args.enrich, args.workers, args.data)
        if args.cache is not None:
            np.savez(args.cache, **{k: v for k, v in data.items() if isinstance(v, np.ndarray)})
            side = {"chains": [{k: [c.centre.tolist(), c.height_mm, c.depth_mm, c.angle] for k, c in ch.items()} for ch in data["chains"]],
                    "pixel_mm": data["pixel_mm"]}
            args.cache.with_suffix(".chains.json").write_text(json.dumps(side))
    _log("data", canvases=len(data["canvas"]), crops=len(data["crops"]), discs=len(data["discs"]))
    if args.data_only:
        return 0
    common = {"trained_on": f"{len(data['chains'])} phantom studies, seeds (1, i), enrich {args.enrich}"}

    def resume(name: str) -> Path | None:
        return args.out / f"{name}.pt" if args.resume else None

    if "detector" in args.train:
        prior = inference.fit_prior(data["chains"], data["pixel_mm"])
        det = train_detector(data, args.det_epochs, args.det_width, args.seed, resume("detector"))
        torch.save(det.state_dict(), args.out / "detector.pt")
        export(det, args.out / "detector.onnx", (1, DETECTOR_SIZE, DETECTOR_SIZE), "image", "grid")
        save_entry("spine_mri_detector", args.out / "detector.onnx", args.out,
                   {**common, "input_size": DETECTOR_SIZE, "input_mm": DETECTOR_MM, "width": args.det_width, "chain_prior": prior.to_json()})
    if "corners" in args.train:
        corner = train_corners(data, args.corner_epochs, args.seed, resume("corners"))
        torch.save(corner.state_dict(), args.out / "corners.pt")
        export(corner, args.out / "corners.onnx", (1, CORNER_SIZE, CORNER_SIZE), "crops", "corners")
        save_entry("spine_mri_corners", args.out / "corners.onnx", args.out, {**common, "crop_size": CORNER_SIZE})
    if "grading" in args.train:
        grader = train_grading(data, args.grade_epochs, args.width, args.hidden, args.seed, resume("grading"),
                               peak_lr=0.03 * (0.3 if args.resume else 1.0))
        torch.save(grader.state_dict(), args.out / "grading.pt")
        export(grader, args.out / "grading.onnx", (DISC_SLICES, *DISC_SHAPE), "discs", "logits")
        save_entry("spine_mri_grading", args.out / "grading.onnx", args.out,
                   {**common, "disc_shape": list(DISC_SHAPE), "disc_slices": DISC_SLICES, "width": args.width, "hidden": args.hidden,
                    "gradings": list(GRADING_KEYS), "levels": list(LEVELS)})
    if args.test:
        metrics = evaluate.run(args.out, args.test)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _log("metrics", **{k: v for k, v in metrics.items() if not isinstance(v, dict)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
