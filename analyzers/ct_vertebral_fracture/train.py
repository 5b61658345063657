"""Train the vertebra detector and the fracture classifier, dissect it, export ONNX, calibrate, evaluate.

One command trains the bundled weights from scratch on phantoms (seeded, progress on stderr)::

    python -m analyzers.ct_vertebral_fracture.train --out analyzers/ct_vertebral_fracture/weights

Real data in the VerSe layout (``--verse DIR``: ``*_ct.nii.gz`` beside ``*_seg-vert_msk.nii.gz`` and
``*_seg-subreg_ctd.json``, plus ``--verse-grades CSV`` with ``subject,label,grade`` rows from the
VerSe fracture-grading sheet) are read by the same script: centroids from the JSON, levels from the
VerSe label numbers, fracture labels from the grades; those vertebrae join the phantom patches.

Splits: phantom seeds 1 (training), 2 (tuning: dissection reference, thresholds), 3 (frozen test,
used only by ``evaluate.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from analyzers.volume import Volume

from . import preprocess
from .constants import CONTEXT_LEVELS, LEVELS, PATCH_SIZE, REFORMAT_SPACING, genant_grade
from .phantom import phantom_rng, render

TRAIN_SEED, TUNE_SEED, TEST_SEED = 1, 2, 3
CROP_3MM = 4
"""Voxels cut from each side of the pooled 32^3 patch inside the classifier (24^3 remain)."""
POOL = 3
"""The classifier's input pooling: the cache keeps patches already pooled to 32^3."""
VERSE_LABELS = {**{i: f"C{i}" for i in range(1, 8)}, **{7 + i: f"T{i}" for i in range(1, 13)}, **{19 + i: f"L{i}" for i in range(1, 7)}, 25: "L6", 26: "S1", 28: "T13"}
"""VerSe label numbers (1-7 cervical, 8-19 thoracic, 20-25 lumbar incl. L6, 26 sacrum, 28 T13)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Data: phantoms and the VerSe format
# ---------------------------------------------------------------------------


def pooled(hu_patch: np.ndarray, pool: int = POOL) -> np.ndarray:
    u = preprocess.unit_hu(hu_patch)
    n = u.shape[0] // pool
    return u[: n * pool, : n * pool, : n * pool].reshape(n, pool, n, pool, n, pool).mean(axis=(1, 3, 5))


def detector_targets(shape: tuple[int, int], grid: preprocess.Grid, centroids: dict[str, list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Centroid pixel positions (row, column) in the reformat and their level indices."""
    zmax = grid.origin[2] + (grid.shape[0] - 1) * grid.spacing
    pts, lev = [], []
    for label, c in centroids.items():
        if label not in CONTEXT_LEVELS:
            continue
        r = (zmax - c[2]) / grid.spacing
        col = (c[1] - grid.origin[1]) / grid.spacing
        if 0 <= r < shape[0] and 0 <= col < shape[1]:
            pts.append((r, col))
            lev.append(CONTEXT_LEVELS.index(label))
    return np.asarray(pts, dtype=np.float32).reshape(-1, 2), np.asarray(lev, dtype=np.float32)


def study_sample(volume: Volume, centroids: dict[str, list[float]], vertebrae: list[dict[str, Any]], rng: np.random.Generator, jitter: int = 2) -> dict[str, np.ndarray]:
    """Detector input and targets plus classifier patches (true centre and jittered copies) of one study."""
    iso, grid = preprocess.resampled(volume, REFORMAT_SPACING)
    mid = preprocess.midline(iso)
    ref = preprocess.reformat(iso, mid)
    del iso
    pts, lev = detector_targets(ref.shape[1:], grid, centroids)
    patches, labels, grades, losses, levels, heights_err = [], [], [], [], [], []
    for v in vertebrae:
        c, ax = np.asarray(v["centroid"]), np.asarray(v["axis"])
        for j in range(1 + jitter):
            cj = c + (rng.normal(0, 1.5, 3) if j else 0)
            axj = ax + (rng.normal(0, 0.06, 3) if j else 0)
            hu = preprocess.patch(volume, cj, axj)
            if j == 0 and v.get("heights") is not None:
                h = preprocess.heights(hu)
                heights_err.append(np.subtract(h.as_list(), v["heights"]) if h is not None else [np.nan] * 3)
            patches.append(pooled(hu).astype(np.float16))
            labels.append(float(v["fractured"]))
            grades.append(v.get("grade", -1))
            losses.append(v.get("height_loss", np.nan))
            levels.append(LEVELS.index(v["label"]))
    return {
        "reformat": ref.astype(np.float16), "points": pts, "point_levels": lev,
        "patches": np.asarray(patches, dtype=np.float16).reshape(-1, *(PATCH_SIZE // POOL,) * 3),
        "labels": np.asarray(labels, np.float32), "grades": np.asarray(grades, np.int16), "losses": np.asarray(losses, np.float32),
        "levels": np.asarray(levels, np.int16), "heights_err": np.asarray(heights_err, np.float32).reshape(-1, 3),
    }


def phantom_sample(seed: int, index: int, jitter: int) -> dict[str, np.ndarray]:
    rng = phantom_rng(seed, index)
    ph = render(rng)
    truth = ph.truth()
    covered = [v for v in truth["vertebrae"] if v["covered"]]
    return study_sample(ph.to_volume(), truth["all_centroids"], covered, np.random.default_rng(seed * 100003 + index), jitter)


def read_verse(ct_path: Path, ctd_path: Path) -> tuple[Volume, dict[str, list[float]]]:
    """A VerSe subject: the CT (NIfTI, RAS) as a volume in LPS and its centroids by level name.

    The centroid JSON's first item gives the axis directions of the voxel coordinates
    (e.g. ``{"direction": ["P", "I", "R"]}``); each further item is ``{"label", "X", "Y", "Z"}``
    in voxel units of the mask, which shares the CT's grid.
    """
    import SimpleITK as sitk

    img = sitk.ReadImage(str(ct_path))
    return volume_from_sitk(img), verse_centroids(ctd_path, img)


def volume_from_sitk(img) -> Volume:
    import SimpleITK as sitk

    from dicomnode.analysis import SourceRef

    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    sx, sy, sz = img.GetSpacing()
    return Volume(array=arr, spacing=(sz, sy, sx), origin=np.asarray(img.GetOrigin(), dtype=np.float64), direction=d.T.copy(),
                  sources=[SourceRef(f"nifti-slice-{k}") for k in range(arr.shape[0])], series_instance_uid="nifti", modality="CT")


def verse_centroids(ctd_path: Path, img) -> dict[str, list[float]]:
    """Centroids (LPS, mm) by level name from a VerSe ``*_ctd.json`` on the grid of ``img`` (SimpleITK, same grid as the mask)."""
    items = json.loads(Path(ctd_path).read_text())
    out: dict[str, list[float]] = {}
    for item in items:
        if "label" not in item:
            continue
        label = VERSE_LABELS.get(int(item["label"]))
        if label is None:
            continue
        # X, Y, Z are voxel coordinates along the image's own axes (i, j, k as SimpleITK indexes them)
        out[label] = [float(v) for v in img.TransformContinuousIndexToPhysicalPoint((float(item["X"]), float(item["Y"]), float(item["Z"])))]
    return out


def verse_mask_centroids(mask_path: Path) -> dict[str, list[float]]:
    """Centroids (LPS, mm) of each labelled vertebra in a VerSe ``*_seg-vert_msk.nii.gz``, from the mask itself."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(mask_path))
    arr = sitk.GetArrayFromImage(img)
    out = {}
    for value in np.unique(arr):
        label = VERSE_LABELS.get(int(value))
        if label is None:
            continue
        k, j, i = np.nonzero(arr == value)
        out[label] = [float(v) for v in img.TransformContinuousIndexToPhysicalPoint((float(i.mean()), float(j.mean()), float(k.mean())))]
    return out


def verse_samples(root: Path, grades_csv: Path | None, jitter: int) -> list[dict[str, np.ndarray]]:
    """Training samples from VerSe subjects under ``root`` (levels outside T1-L5 are context only)."""
    grades: dict[tuple[str, str], int] = {}
    if grades_csv is not None:
        for line in Path(grades_csv).read_text().splitlines()[1:]:
            subject, label, grade = [x.strip() for x in line.split(",")[:3]]
            grades[(subject, VERSE_LABELS.get(int(label), label) if label.isdigit() else label)] = int(grade)
    out = []
    for ct in sorted(Path(root).rglob("*_ct.nii.gz")):
        subject = ct.name.split("_")[0]
        ctd = next(ct.parent.glob(f"{subject}*_ctd.json"), None)
        if ctd is None:
            log(f"{ct}: no centroid JSON beside it; skipped")
            continue
        volume, cents = read_verse(ct, ctd)
        axes = dict(zip([k for k in LEVELS if k in cents], preprocess.spine_axes(np.array([cents[k] for k in LEVELS if k in cents]))))
        vertebrae = [
            {"label": k, "centroid": cents[k], "axis": axes[k], "fractured": grades.get((subject, k), 0) >= 1, "grade": grades.get((subject, k), 0)}
            for k in LEVELS if k in cents and (subject, k) in grades
        ]
        out.append(study_sample(volume, cents, vertebrae, np.random.default_rng(len(out)), jitter))
    return out


def build_cache(cache: Path, seed: int, n: int, jitter: int) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = cache / f"s{seed}_{i:04d}.npz"
        if not path.exists():
            t = time.time()
            sample = phantom_sample(seed, i, jitter)
            np.savez(path, **sample)
            log(f"cache seed {seed} study {i + 1}/{n}: {len(sample['labels'])} patches, {int(sample['labels'].sum())} fractured ({time.time() - t:.1f} s)")
        paths.append(path)
    return paths


def load_cache(paths: list[Path]) -> list[dict[str, np.ndarray]]:
    out = []
    for p in paths:
        with np.load(p) as z:
            out.append({k: z[k] for k in z.files})
    return out


# ---------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------

CROP = (160, 64)
"""Detector training windows (rows, columns) of the reformat: 320 x 128 mm."""


def detector_batch(samples: list[dict[str, np.ndarray]], rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random windows of the reformats with the heatmap target, level target and level mask."""
    x = np.zeros((batch, 3, *CROP), np.float32)
    heat = np.zeros((batch, *CROP), np.float32)
    level = np.zeros((batch, *CROP), np.float32)
    mask = np.zeros((batch, *CROP), np.float32)
    rr, cc = np.mgrid[0: CROP[0], 0: CROP[1]]
    for b in range(batch):
        s = samples[int(rng.integers(len(samples)))]
        ref = s["reformat"].astype(np.float32)
        h, w = ref.shape[1:]
        pts = s["points"]
        centre_col = float(np.median(pts[:, 1])) if len(pts) else w / 2
        r0 = int(rng.integers(-CROP[0] // 4, max(1, h - CROP[0] * 3 // 4)))
        c0 = int(round(centre_col - CROP[1] / 2 + rng.uniform(-20, 20)))
        win = np.zeros((3, *CROP), np.float32)
        rs, re_ = max(0, r0), min(h, r0 + CROP[0])
        cs, ce = max(0, c0), min(w, c0 + CROP[1])
        if re_ > rs and ce > cs:
            win[:, rs - r0: re_ - r0, cs - c0: ce - c0] = ref[:, rs:re_, cs:ce]
        gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-0.03, 0.03)
        x[b] = np.clip(win * gain + offset, 0, 1)
        best = np.full(CROP, np.inf, np.float32)
        for (pr, pc), lv in zip(pts, s["point_levels"]):
            d2 = (rr - (pr - r0)) ** 2 + (cc - (pc - c0)) ** 2
            heat[b] = np.maximum(heat[b], np.exp(-d2 / (2 * 1.5 ** 2)))
            closer = d2 < best
            level[b][closer] = lv
            best = np.minimum(best, d2)
        mask[b] = best <= 6.0 ** 2
    return x, heat, level, mask


def train_detector(samples: list[dict[str, np.ndarray]], steps: int, seed: int, width: int = 8, levels: int = 3, batch: int = 4):
    import torch
    import torch.nn.functional as F

    from .model import VertebraDetector

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = VertebraDetector(width=width, levels=levels)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    net.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        x, heat, level, mask = (torch.from_numpy(a) for a in detector_batch(samples, rng, batch))
        out = net(x)
        w = 1.0 + 30.0 * heat
        l_heat = (F.binary_cross_entropy_with_logits(out[:, 0], heat, reduction="none") * w).mean()
        l_level = (F.smooth_l1_loss(out[:, 1], level, reduction="none") * mask).sum() / mask.sum().clamp(min=1)
        loss = l_heat + 0.3 * l_level
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"detector step {step}/{steps}: heat {l_heat.item():.4f} level {l_level.item():.3f} ({time.time() - t0:.0f} s)")
    return net.eval()


# ---------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------


def train_classifier(x: np.ndarray, y: np.ndarray, steps: int, seed: int, width: int = 8, levels: int = 2, batch: int = 16):
    """The 3D classifier on pooled patches with class-balanced sampling (every batch half fractured)."""
    import torch
    import torch.nn.functional as F

    from .model import FractureClassifier

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = FractureClassifier(width=width, levels=levels, in_pool=1, dropout=0.3, crop=CROP_3MM)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    pos, neg = np.flatnonzero(y >= 0.5), np.flatnonzero(y < 0.5)
    net.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = np.concatenate([rng.choice(pos, batch // 2), rng.choice(neg, batch - batch // 2)])
        xb = x[idx].astype(np.float32)
        for i in range(len(xb)):  # flips left-right, shifts, contrast and noise
            if rng.random() < 0.5:
                xb[i] = xb[i][:, :, ::-1]
            xb[i] = np.roll(xb[i], tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2))
            xb[i] = np.clip((xb[i] - 0.5) * rng.uniform(0.9, 1.1) + 0.5 + rng.normal(0, 0.01, xb[i].shape), 0, 1)
        logit, _ = net(torch.from_numpy(xb[:, None].copy()))
        loss = F.binary_cross_entropy_with_logits(logit, torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps:
            log(f"classifier step {step}/{steps}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return net.eval()


def classifier_outputs(net, x: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    import torch

    logits, acts = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            lo, a = net(torch.from_numpy(x[i: i + batch].astype(np.float32)[:, None]))
            logits.append(lo.numpy())
            acts.append(a.numpy())
    return np.concatenate(logits), np.concatenate(acts)


def dissect(acts: np.ndarray, y: np.ndarray, prob: np.ndarray, threshold: float, quantile: float, top: int = 10) -> dict[str, Any]:
    """Network dissection on a reference set: T_k, c_k over true positives, ranking, location labels."""
    k = acts.shape[1]
    flat = np.moveaxis(acts, 1, 0).reshape(k, -1)
    t = np.quantile(flat, 1 - quantile, axis=1).astype(np.float32)
    tp = (y >= 0.5) & (prob >= threshold)
    enabled = (acts > t[None, :, None, None, None]).reshape(len(acts), k, -1).any(axis=2)
    c = enabled[tp].mean(axis=0) if tp.any() else np.zeros(k)
    ranking = [int(i) for i in np.argsort(-c, kind="stable")[:top]]
    labels = {str(u): location_label(acts[tp, u] if tp.any() else acts[:, u], t[u]) for u in ranking}
    return {"thresholds": t.tolist(), "correlation": c.tolist(), "ranking": ranking, "labels": labels, "quantile": quantile,
            "true_positives": int(tp.sum())}


def location_label(a: np.ndarray, t: float) -> str:
    """Where in the patch a unit fires above T_k, averaged over samples: a plain description of its region."""
    m = np.where(a > t, a, 0.0).sum(axis=0)
    if m.sum() <= 0:
        return "no activation above threshold on the reference fractures"
    n = m.shape[0]
    coords = (np.indices(m.shape) - (n - 1) / 2) / (n / 2)
    cz, cy, cx = [(coords[i] * m).sum() / m.sum() for i in range(3)]
    vert = "upper endplate region" if cz < -0.25 else "lower endplate region" if cz > 0.25 else "mid-body"
    ap = "anterior " if cy < -0.25 else "posterior " if cy > 0.25 else ""
    return f"{ap}{vert} (location on phantom fractures)"


# ---------------------------------------------------------------------------
# Export and registry
# ---------------------------------------------------------------------------


def export_detector(net, path: Path) -> None:
    import torch

    x = torch.zeros(1, 3, 160, 96)
    torch.onnx.export(net.cpu().eval(), (x,), str(path), input_names=["reformat"], output_names=["maps"],
                      dynamic_axes={"reformat": {2: "h", 3: "w"}, "maps": {2: "h", 3: "w"}}, opset_version=17, dynamo=False)


def export_classifier(net, path: Path) -> None:
    """The classifier with its input pooling restored: the ONNX graph takes the paper's 96^3 1 mm patch."""
    import torch

    net = net.cpu().eval()
    net.in_pool = POOL
    x = torch.zeros(2, 1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)
    torch.onnx.export(net, (x,), str(path), input_names=["patch"], output_names=["logit", "activations"],
                      dynamic_axes={"patch": {0: "n"}, "logit": {0: "n"}, "activations": {0: "n"}}, opset_version=17, dynamo=False)
    net.in_pool = 1


def write_registry(out: Path, name: str, file: str, version: str, extra: dict[str, Any]) -> None:
    from dicomnode.analysis import RegistryEntry, sha256_file

    RegistryEntry(name=name, version=version, file=file, sha256=sha256_file(out / file), phantom_trained=True, extra=extra).save(out / f"{name}.json")


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    best, best_t = -1.0, 0.5
    for t in np.unique(p):
        j = np.mean(p[y >= 0.5] >= t) + np.mean(p[y < 0.5] < t) - 1
        if j > best:
            best, best_t = j, float(t)
    return best_t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ctvfx_cache")
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-tune", type=int, default=12)
    ap.add_argument("--detector-steps", type=int, default=300)
    ap.add_argument("--classifier-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verse", type=Path, help="a folder of VerSe subjects (CT, centroid JSON) to add to the training set")
    ap.add_argument("--verse-grades", type=Path, help="CSV subject,label,grade for the VerSe subjects")
    ap.add_argument("--cache-only", action="store_true", help="render the phantom cache and stop")
    ap.add_argument("--only", choices=["detector", "classifier"], help="train one network and keep the other's files")
    ap.add_argument("--version", default="0.1.0")
    args = ap.parse_args(argv)

    import torch

    from .constants import CLASSIFIER, DETECTOR, DISSECTION_QUANTILE

    torch.set_num_threads(args.threads)
    train_paths = build_cache(args.cache, TRAIN_SEED, args.n_train, jitter=1)
    tune_paths = build_cache(args.cache, TUNE_SEED, args.n_tune, jitter=0)
    if args.cache_only:
        return 0
    train_s, tune_s = load_cache(train_paths), load_cache(tune_paths)
    if args.verse:
        real = verse_samples(args.verse, args.verse_grades, jitter=2)
        log(f"VerSe: {len(real)} subjects, {sum(len(s['labels']) for s in real)} graded vertebra patches")
        train_s += real
    args.out.mkdir(parents=True, exist_ok=True)

    if args.only in (None, "detector"):
        det = train_detector(train_s, args.detector_steps, seed=11)
        torch.save(det.state_dict(), args.out / "detector.pt")
        export_detector(det, args.out / "detector.onnx")
        write_registry(args.out, DETECTOR, "detector.onnx", args.version, {
            "input": "reformat (1, 3, H, W): slab mean, slab maximum, full-width mean of HU scaled to [0, 1]; rows from the head down",
            "reformat_spacing_mm": REFORMAT_SPACING, "levels": list(CONTEXT_LEVELS), "width": 8, "depth": 3,
            "seeds": {"train": TRAIN_SEED, "tune": TUNE_SEED, "n_train": args.n_train, "steps": args.detector_steps},
        })
    if args.only in (None, "classifier"):
        x = np.concatenate([s["patches"] for s in train_s])
        y = np.concatenate([s["labels"] for s in train_s])
        log(f"classifier: {len(y)} patches, {int(y.sum())} fractured")
        net = train_classifier(x, y, args.classifier_steps, seed=12)
        xt = np.concatenate([s["patches"] for s in tune_s])
        yt = np.concatenate([s["labels"] for s in tune_s])
        logits, acts = classifier_outputs(net, xt)
        prob = 1 / (1 + np.exp(-logits))
        from .evaluate import auroc

        threshold = youden_threshold(yt, prob)
        dissection = dissect(acts, yt, prob, threshold, DISSECTION_QUANTILE)
        err = np.concatenate([s["heights_err"] for s in train_s])
        bias = float(np.nanmedian(err))
        log(f"tuning split: AUROC {auroc(yt, prob):.3f}, threshold {threshold:.3f}, {dissection['true_positives']} true positives, height bias {bias:.2f} mm")
        torch.save(net.state_dict(), args.out / "classifier.pt")
        export_classifier(net, args.out / "classifier.onnx")
        write_registry(args.out, CLASSIFIER, "classifier.onnx", args.version, {
            "input": "patch (N, 1, 96, 96, 96): 1 mm, spine-aligned, HU clipped to [-1000, 1000] scaled to [0, 1]; average-pooled by 3 and the central 24^3 kept inside the graph",
            "width": 8, "levels": 2, "in_pool": POOL, "crop": CROP_3MM, "dropout": 0.3,
            "threshold": threshold, "height_bias_mm": bias, "dissection": dissection,
            "seeds": {"train": TRAIN_SEED, "tune": TUNE_SEED, "n_train": args.n_train, "n_tune": args.n_tune, "steps": args.classifier_steps},
            "tuning": {"auroc": auroc(yt, prob), "vertebrae": int(len(yt)), "fractured": int(yt.sum())},
        })
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
