"""Train, export and evaluate the two networks on phantoms (or on studies in the phantom layout).

Usage::

    python -m analyzers.dxa_scoliosis.train --out analyzers/dxa_scoliosis/weights
    python -m analyzers.dxa_scoliosis.train --studies DIR ...   # real data in the phantom layout

``--studies`` reads folders laid out like ``dicomnode phantom dxa_scoliosis``
writes them: DICOM files, ``truth.json`` (``wb_bone_sop_uid``, ``scoliosis``,
``positioning_error``, ``curves_class``, ``cobb_deg``) and ``truth_masks.npz``
(``masks``: 6 x rows x columns on the bone image's grid, parts in the order of
``constants.PARTS``). The paper's ALSPAC data are not public and have no published
file format, so real labels have to be brought into this layout.

Seeds: training phantoms use ``--seed`` (default 1), the calibration (tuning)
set ``seed + 1000``; the held-out evaluation uses the frozen test seed
``evaluate.TEST_SEED``, drawn once per release and never trained or tuned on.
The tests use seeds from 90000 up, which training never touches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.analysis import RegistryEntry, sha256_file

from . import preprocess as pp
from .constants import HEAVISIDE_K, PARTS
from .evaluate import TEST_SEED, evaluate, failures
from .inference import MaskCalibration, midpoints, mirror, part_maps, rebuild_masks, run_centres
from .phantom import make_case

VERSION = "0.1.0"
CURVE_INDEX = {"0": 0, "1": 1, ">1": 2}


def as_displayed(img: np.ndarray, bits: int) -> np.ndarray:
    """What the analyzer sees after storing ``img`` with ``bits`` and windowing it (0.5-99.5 percentile)."""
    top = (1 << bits) - 1
    stored = np.round(np.clip(img, 0, 1) * top)
    lo, hi = np.percentile(stored, [0.5, 99.5])
    return np.clip((stored - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def targets(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per part and row of a (6, 416, 128) mask: mid-point (nan where absent) and thickness."""
    present = masks.any(-1)
    first = np.argmax(masks, -1)
    last = masks.shape[-1] - 1 - np.argmax(masks[..., ::-1], -1)
    mid = np.where(present, (first + last) / 2.0, np.nan)
    return mid.astype(np.float32), masks.sum(-1).astype(np.float32)


def case_arrays(img: np.ndarray, masks: np.ndarray, spacing: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    x, norm = pp.normalise(img, spacing)
    m = norm.sample(masks.astype(np.float32), order=1) > 0.5
    mid, thick = targets(m)
    return {"x": x, "mid": mid, "thick": thick, "masks": m}


MAX_TRUE_CURVES = 4


def _labels(truth: dict[str, Any]) -> dict[str, Any]:
    """Per-case labels from a ``truth.json``-like dict: classes, Cobb angles, curves, pose."""
    from .constants import LEVELS
    from .phantom import POSITIONING_LIMITS

    curves = truth.get("curves", [])[:MAX_TRUE_CURVES]
    cobbs = np.full(MAX_TRUE_CURVES, np.nan, np.float32)
    apex = np.full(MAX_TRUE_CURVES, -1, np.int64)
    for k, c in enumerate(curves):
        cobbs[k], apex[k] = c["cobb_deg"], LEVELS.index(c["apex"])
    pose = np.nan
    if "trunk_tilt_deg" in truth:
        legs = max(abs(a) for a in truth["leg_angles_deg"])
        pose = max(abs(truth["trunk_tilt_deg"]) / POSITIONING_LIMITS["trunk"], abs(truth["head_tilt_deg"]) / POSITIONING_LIMITS["head"], legs / POSITIONING_LIMITS["legs"])
    return {
        "scoliosis": int(truth["scoliosis"]), "positioning": int(truth["positioning_error"]), "curves": CURVE_INDEX[truth["curves_class"]],
        "cobb": float(truth.get("cobb_deg", np.nan)), "deviation_mm": float(truth.get("lateral_deviation_mm", np.nan)),
        "n_curves": len(truth.get("curves", [])), "curve_cobb": cobbs, "curve_apex": apex, "pose": float(pose),
    }


def _stack(xs: list, mids: list, thicks: list, labels: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {"x": np.stack(xs), "mid": np.stack(mids), "thick": np.stack(thicks)}
    for key in labels[0]:
        out[key] = np.array([lab[key] for lab in labels])
    return out


def generate(n: int, seed: int, log_every: int = 100) -> dict[str, np.ndarray]:
    """``n`` phantoms as normalised arrays plus labels."""
    rng = np.random.default_rng(seed)
    xs, mids, thicks, lab = [], [], [], []
    t0 = time.time()
    for i in range(n):
        case = make_case(rng)
        bits = 8 if rng.random() < 0.5 else 12
        a = case_arrays(as_displayed(case["bone"], bits), case["masks"])
        xs.append(np.round(a["x"] * 255).astype(np.uint8))
        mids.append(a["mid"].astype(np.float16))
        thicks.append(a["thick"].astype(np.uint8))
        lab.append(_labels(case["truth"]))
        if log_every and (i + 1) % log_every == 0:
            print(f"  phantoms {i + 1}/{n} ({time.time() - t0:.0f} s)", flush=True)
    return _stack(xs, mids, thicks, lab)


def load_studies(folder: Path) -> dict[str, np.ndarray]:
    """Studies in the phantom layout (see module docstring) as training arrays."""
    import pydicom

    from dicomnode import imaging

    xs, mids, thicks, lab = [], [], [], []
    for truth_path in sorted(Path(folder).glob("*/truth.json")):
        truth = json.loads(truth_path.read_text())
        masks = np.load(truth_path.parent / "truth_masks.npz")["masks"].astype(bool)
        ds = next(d for d in (pydicom.dcmread(p) for p in truth_path.parent.glob("*.dcm")) if d.SOPInstanceUID == truth["wb_bone_sop_uid"])
        a = case_arrays(pp.display(ds), masks, imaging.pixel_spacing(ds))
        xs.append(np.round(a["x"] * 255).astype(np.uint8))
        mids.append(a["mid"].astype(np.float16))
        thicks.append(a["thick"].astype(np.uint8))
        lab.append(_labels(truth))
    if not xs:
        raise SystemExit(f"no studies with truth.json under {folder}")
    return _stack(xs, mids, thicks, lab)


def _mid_distribution(mid: np.ndarray) -> np.ndarray:
    """Continuous mid-points (..., rows) -> target distribution over 128 columns (two nearest columns)."""
    shape = mid.shape
    out = np.zeros(shape + (pp.COLS,), np.float32)
    ok = np.isfinite(mid) & (mid >= 0) & (mid <= pp.COLS - 1)
    m = np.where(ok, mid, 0.0)
    lo = np.floor(m).astype(int)
    hi = np.minimum(lo + 1, pp.COLS - 1)
    w = (m - lo).astype(np.float32)
    idx = np.nonzero(ok)
    out[idx + (lo[idx],)] += 1 - w[idx]
    out[idx + (hi[idx],)] += w[idx]
    return out


def _augment(x: np.ndarray, mid: np.ndarray, thick: np.ndarray, rng: np.random.Generator, shift: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random flip (legs swap) and translation, as in the paper (there +-24 px)."""
    x, mid, thick = x.copy(), mid.astype(np.float32).copy(), thick.astype(np.float32).copy()
    for i in range(len(x)):
        if rng.random() < 0.5:
            x[i] = x[i, :, ::-1]
            mid[i] = pp.COLS - 1 - mid[i]
            mid[i, [4, 5]] = mid[i, [5, 4]]
            thick[i, [4, 5]] = thick[i, [5, 4]]
        dx, dy = int(rng.integers(-shift, shift + 1)), int(rng.integers(-shift, shift + 1))
        x[i] = np.roll(x[i], (dy, dx), axis=(0, 1))
        mid[i] = np.roll(mid[i] + dx, dy, axis=1)
        thick[i] = np.roll(thick[i], dy, axis=1)
        if dy > 0:
            x[i, :dy], mid[i, :, :dy], thick[i, :, :dy] = 0, np.nan, 0
        elif dy < 0:
            x[i, dy:], mid[i, :, dy:], thick[i, :, dy:] = 0, np.nan, 0
        if dx > 0:
            x[i, :, :dx] = 0
        elif dx < 0:
            x[i, :, dx:] = 0
        g = rng.uniform(0.8, 1.25)
        x[i] = x[i] ** g
    return x, mid, thick


def train_seg(data: dict[str, np.ndarray], width: int, steps: int, seed: int, batch: int = 8, crop: int = 208, lam: float = 0.05):
    import torch

    from .model import SegNet, scanline_losses

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SegNet(width)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=5e-4 * 0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    n = len(data["x"])
    t0 = time.time()
    net.train()
    for step in range(steps):
        idx = rng.integers(0, n, batch)
        x = data["x"][idx].astype(np.float32) / 255.0
        x, mid, thick = _augment(x, data["mid"][idx], data["thick"][idx], rng)
        r0 = int(rng.integers(0, pp.ROWS - crop + 1))
        x, mid, thick = x[:, r0 : r0 + crop], mid[:, :, r0 : r0 + crop], thick[:, :, r0 : r0 + crop]
        y = net(torch.from_numpy(np.ascontiguousarray(x[:, None])))
        l_mid, l_thick = scanline_losses(y, torch.from_numpy(_mid_distribution(mid)), torch.from_numpy(thick))
        loss = l_mid + lam * l_thick
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  seg step {step}/{steps} mid {l_mid.item():.3f} thick {l_thick.item():.2f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    return net


def soft_masks(seg_fn, x_u8: np.ndarray, batch: int = 16) -> np.ndarray:
    """Conv11 outputs (float16) of a segmentation callable over a uint8 image stack."""
    out = []
    for i in range(0, len(x_u8), batch):
        out.append(seg_fn(x_u8[i : i + batch].astype(np.float32)[:, None] / 255.0).astype(np.float16))
    return np.concatenate(out)


def torch_fn(net):
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    return run


def train_cls(data: dict[str, np.ndarray], soft: np.ndarray, width: int, epochs: int, seed: int, batch: int = 32):
    import torch
    import torch.nn.functional as F

    from .model import ClsNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    net = ClsNet(width=width)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    n = len(data["x"])
    steps = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.5e-3, total_steps=steps, pct_start=0.15)
    weights = {}
    for task, k in (("scoliosis", 2), ("positioning", 2), ("curves", 3)):
        counts = np.bincount(data[task], minlength=k).astype(np.float64)
        w = counts.sum() / np.maximum(counts, 1) / k  # inverse class frequency, the paper's balanced loss
        weights[task] = torch.tensor(w, dtype=torch.float32)
    t0 = time.time()
    step = 0
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(n)
        tot = 0.0
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            x = data["x"][idx].astype(np.float32) / 255.0
            s = soft[idx].astype(np.float32)
            for j in range(len(idx)):
                if rng.random() < 0.5:
                    x[j] = x[j, :, ::-1]
                    s[j] = s[j, :, :, ::-1]
                    s[j, [4, 5]] = s[j, [5, 4]]
                dx, dy = int(rng.integers(-8, 9)), int(rng.integers(-8, 9))
                x[j] = np.roll(x[j], (dy, dx), axis=(0, 1))
                s[j] = np.roll(s[j], (dy, dx), axis=(1, 2))
            out, _ = net.logits(torch.from_numpy(np.ascontiguousarray(x[:, None])), torch.from_numpy(np.ascontiguousarray(s)))
            loss = sum(F.cross_entropy(out[t], torch.from_numpy(data[t][idx]), weight=weights[t]) for t in ("scoliosis", "positioning", "curves"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += loss.item() * len(idx)
        print(f"  cls epoch {epoch + 1}/{epochs} loss {tot / n:.3f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    return net


def export(seg, cls, out: Path) -> tuple[Path, Path]:
    """Both networks as ONNX files in ``out``; ``seg`` may be the path of an already exported one."""
    import shutil

    import torch

    out.mkdir(parents=True, exist_ok=True)
    seg_path, cls_path = out / "dxa_seg.onnx", out / "dxa_cls.onnx"
    x = torch.zeros(2, 1, pp.ROWS, pp.COLS)
    with torch.no_grad():
        if isinstance(seg, Path):
            if seg.resolve() != seg_path.resolve():
                shutil.copyfile(seg, seg_path)
            y = torch.zeros(2, len(PARTS), pp.ROWS, pp.COLS)
        else:
            y = seg(x)
            torch.onnx.export(seg, (x,), str(seg_path), input_names=["image"], output_names=["conv11"], dynamic_axes={"image": {0: "batch"}, "conv11": {0: "batch"}}, opset_version=17, dynamo=False)
        torch.onnx.export(cls, (x, y), str(cls_path), input_names=["image", "soft_mask"], output_names=["p_scoliosis", "p_positioning", "p_curves", "evidence"], dynamic_axes={k: {0: "batch"} for k in ("image", "soft_mask", "p_scoliosis", "p_positioning", "p_curves", "evidence")}, opset_version=17, dynamo=False)
    return seg_path, cls_path


def onnx_fns(seg_path: Path, cls_path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(seg_path), so, providers=["CPUExecutionProvider"])
    c = ort.InferenceSession(str(cls_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in c.get_outputs()]
    seg_fn = lambda b: s.run(["conv11"], {"image": b})[0]  # noqa: E731
    cls_fn = lambda b, m: dict(zip(names, c.run(names, {"image": b, "soft_mask": m})))  # noqa: E731
    return seg_fn, cls_fn


def _seg_pair(seg_fn, x_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x_u8.astype(np.float32) / 255.0
    y = seg_fn(np.stack([x, x[:, ::-1]])[:, None].astype(np.float32))
    return y[0], mirror(y[1][None])[0]


def calibrate_masks(data: dict[str, np.ndarray], seg_fn, taus=(1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 8.0)) -> tuple[MaskCalibration, dict[str, Any]]:
    """Per part: mid-point rule (expectation or plateau centre), thickness offset and presence threshold.

    Fitted on calibration phantoms, whose seeds are neither training nor evaluation seeds.
    """
    pairs = [_seg_pair(seg_fn, x) for x in data["x"]]
    n_parts = len(PARTS)
    err_exp, err_run, n_rows = np.zeros(n_parts), np.zeros(n_parts), np.zeros(n_parts)
    tp, tt = [[] for _ in range(n_parts)], [[] for _ in range(n_parts)]
    for (y0, y1), mid_t, th_t in zip(pairs, data["mid"], data["thick"]):
        m0, t0 = midpoints(y0)
        m1, t1 = midpoints(y1)
        r = (run_centres(y0) + run_centres(y1)) / 2
        e = (m0 + m1) / 2
        t = (t0 + t1) / 2
        seen = np.maximum(y0.max(-1), y1.max(-1)) > 0.5
        for k in range(n_parts):
            rows = th_t[k] > 0
            n_rows[k] += rows.sum()
            err_exp[k] += np.abs(e[k][rows] - mid_t[k][rows].astype(np.float32)).sum()
            err_run[k] += np.abs(r[k][rows] - mid_t[k][rows].astype(np.float32)).sum()
            both = rows & seen[k]
            tp[k].append(t[k][both])
            tt[k].append(th_t[k][both].astype(np.float32))
    offset = tuple(round(float(np.median(np.concatenate(tt[k]) - np.concatenate(tp[k]))), 3) for k in range(n_parts))
    run = tuple(bool(err_run[k] < err_exp[k]) for k in range(n_parts))
    scores = {}
    for tau in taus:
        cal = MaskCalibration(run, (float(tau),) * n_parts, offset)
        ious = []
        for (y0, y1), mid_t, th_t in zip(pairs, data["mid"], data["thick"]):
            mid, thick = part_maps(y0, y1, cal)
            pm = rebuild_masks(mid, thick)
            true = rebuild_masks(np.nan_to_num(mid_t.astype(np.float32)), th_t.astype(np.float32))
            ious.append((pm & true).sum((1, 2)) / np.maximum((pm | true).sum((1, 2)), 1))
        scores[str(tau)] = np.mean(ious, 0)
    best = tuple(float(max(taus, key=lambda t: scores[str(t)][k])) for k in range(n_parts))
    cal = MaskCalibration(run, best, offset)
    report = {
        "mid_error_px_expectation": (err_exp / np.maximum(n_rows, 1)).round(3).tolist(),
        "mid_error_px_plateau": (err_run / np.maximum(n_rows, 1)).round(3).tolist(),
        "iou_by_min_thickness": {k: [round(float(v), 4) for v in val] for k, val in scores.items()},
    }
    return cal, report


def calibrate_sigma(data: dict[str, np.ndarray], seg_fn, cal: MaskCalibration, candidates=(2.0, 3.0, 4.0, 6.0, 8.0)) -> tuple[float, dict[str, float]]:
    """Midline smoothing (rows) that minimises the Cobb error on the calibration phantoms."""
    from .inference import spine_geometry

    spines = []
    for x in data["x"]:
        mid, thick = part_maps(*_seg_pair(seg_fn, x), cal)
        spines.append((mid[1], thick[1]))
    scores = {}
    for s in candidates:
        err = []
        for (m, t), c in zip(spines, data["cobb"]):
            g = spine_geometry(m, t, s)
            err.append(abs(g.cobb - c) if g else 45.0)
        scores[str(s)] = round(float(np.mean(err)), 3)
    best = min(candidates, key=lambda s: scores[str(s)])
    return float(best), scores


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    ap.add_argument("--studies", type=Path, help="train on studies in the phantom layout instead of generated phantoms")
    ap.add_argument("--n-train", type=int, default=1400)
    ap.add_argument("--n-cal", type=int, default=120)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--test-seed", type=int, default=TEST_SEED, help="seed of the held-out phantoms (frozen per release)")
    ap.add_argument("--seg-width", type=int, default=8)
    ap.add_argument("--seg-steps", type=int, default=800)
    ap.add_argument("--cls-width", type=int, default=16)
    ap.add_argument("--cls-epochs", type=int, default=24)
    ap.add_argument("--cache", type=Path, help="npz cache of generated training phantoms")
    ap.add_argument("--seg-onnx", type=Path, help="reuse this exported segmentation CNN and train only the classifier")
    ap.add_argument("--save-torch", type=Path, help="also save the torch state dicts here (for fine-tuning)")
    ap.add_argument("--calibrate-only", action="store_true", help="keep the ONNX files in --out; redo calibration, evaluation and registry files")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.calibrate_only:
        seg_path, cls_path = args.out / "dxa_seg.onnx", args.out / "dxa_cls.onnx"
        n_train = json.loads((args.out / "metrics.json").read_text()).get("n_train") if (args.out / "metrics.json").exists() else None
        finish(args, seg_path, cls_path, n_train, t0)
        return
    if args.studies:
        train = load_studies(args.studies)
    elif args.cache and args.cache.exists():
        train = dict(np.load(args.cache))
    else:
        print(f"generating {args.n_train} training phantoms (seed {args.seed})", flush=True)
        train = generate(args.n_train, args.seed)
        if args.cache:
            np.savez(args.cache, **train)
    if args.seg_onnx:
        import onnxruntime as ort

        print(f"reusing the segmentation CNN {args.seg_onnx}", flush=True)
        sess = ort.InferenceSession(str(args.seg_onnx), providers=["CPUExecutionProvider"])
        seg = args.seg_onnx
        soft = soft_masks(lambda b: sess.run(["conv11"], {"image": b})[0], train["x"])
    else:
        print(f"training segmentation CNN ({args.seg_steps} steps)", flush=True)
        seg = train_seg(train, args.seg_width, args.seg_steps, args.seed)
        soft = soft_masks(torch_fn(seg), train["x"])
    print(f"training classification CNN ({args.cls_epochs} epochs)", flush=True)
    cls = train_cls(train, soft, args.cls_width, args.cls_epochs, args.seed)
    del soft
    if args.save_torch:
        args.save_torch.mkdir(parents=True, exist_ok=True)
        torch.save(cls.state_dict(), args.save_torch / "dxa_cls.pt")
        if not isinstance(seg, Path):
            torch.save(seg.state_dict(), args.save_torch / "dxa_seg.pt")
    seg_path, cls_path = export(seg, cls, args.out)
    finish(args, seg_path, cls_path, int(len(train["x"])), t0)


def finish(args: argparse.Namespace, seg_path: Path, cls_path: Path, n_train: int | None, t0: float) -> None:
    """Calibrate on fresh phantoms, evaluate on held-out phantoms, write the registry files and metrics.json."""
    seg_fn, cls_fn = onnx_fns(seg_path, cls_path)
    print("calibrating mask rebuild and midline smoothing", flush=True)
    cal_data = generate(args.n_cal, args.seed + 1000, log_every=0)
    cal, cal_report = calibrate_masks(cal_data, seg_fn)
    sigma, sigma_scores = calibrate_sigma(cal_data, seg_fn, cal)
    print(f"  {cal.to_json()} sigma {sigma} ({sigma_scores})", flush=True)
    print(f"evaluating on {args.n_test} held-out phantoms (seed {args.test_seed})", flush=True)
    test = generate(args.n_test, args.test_seed, log_every=0)
    metrics = evaluate(test, seg_fn, cls_fn, sigma, cal)
    metrics["failures"] = failures(metrics)
    metrics.update(seed_test=args.test_seed, seed_train=args.seed, seed_calibration=args.seed + 1000, n_train=n_train, n_calibration=args.n_cal, sigma_calibration=sigma_scores, mask_calibration=cal_report, seconds=round(time.time() - t0))
    print(json.dumps(metrics, indent=2), flush=True)

    phantom = not bool(args.studies)
    io = {"rows": pp.ROWS, "cols": pp.COLS}
    RegistryEntry(
        name="dxa_scoliosis_seg", version=VERSION, file=seg_path.name, sha256=sha256_file(seg_path), phantom_trained=phantom,
        extra={"input": io, "parts": list(PARTS), "heaviside_k": HEAVISIDE_K, "width": args.seg_width, "midline_sigma_rows": sigma, "min_swing_deg": 4.0, "mask_calibration": cal.to_json()},
    ).save(args.out / "dxa_scoliosis_seg.json")
    RegistryEntry(
        name="dxa_scoliosis_cls", version=VERSION, file=cls_path.name, sha256=sha256_file(cls_path), phantom_trained=phantom,
        extra={"input": io, "configuration": "E (raw scan + soft mask)", "width": args.cls_width, "scoliosis_threshold": 0.5, "positioning_threshold": 0.5, "review_band": [0.25, 0.75], "cobb_disagreement_deg": 3.0},
    ).save(args.out / "dxa_scoliosis_cls.json")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
