"""Metrics of the bundled weights on held-out real splits and fresh phantoms (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


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


def bootstrap_ci(y: np.ndarray, p: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the AUROC (resampling images)."""
    rng = np.random.default_rng(seed)
    y, p = np.asarray(y).astype(bool), np.asarray(p, float)
    values = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if y[i].any() and (~y[i]).any():
            values.append(auroc(y[i], p[i]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _r(x: float) -> float:
    return round(float(x), 4)


def _analyzer(weights: Path | None):
    from dicomnode.analysis import AnalyzerSettings

    from .analyzer import ChestXrayThoracic
    from .constants import CLASSIFIER, SEGMENTER

    settings = AnalyzerSettings(device="cpu")
    if weights is not None:
        settings.model_paths = {SEGMENTER: Path(weights) / f"{SEGMENTER}.json", CLASSIFIER: Path(weights) / f"{CLASSIFIER}.json"}
    a = ChestXrayThoracic(settings)
    a.load()
    return a


def _png_pipeline(analyzer, display: np.ndarray):
    """A [0, 1] radiograph through the analyzer's networks and gates: masks, geometry, verdict, probabilities."""
    from . import inference, preprocess

    x = preprocess.to_net_input(display)[None]
    prob = inference.segment(analyzer._seg, x)[0]
    _, masks = inference.full_masks(prob, display.shape)
    geometry = inference.ctr_geometry(masks)
    verdict = inference.plausibility(prob, masks, geometry, display)
    probs, _ = inference.classify(analyzer._cls, x, inference.classifier_mask(prob))
    return masks, geometry, verdict, probs[0]


def evaluate_masks(analyzer, root: Path, part: str = "test") -> dict[str, Any]:
    """Dice per structure and CTR error on one split (by image) of a lung/heart mask set."""
    from . import data
    from .constants import SEGMENTS
    from .inference import ctr_geometry

    cases = data.read_mask_folder(root)
    split = data.split_by_group([c.stem for c in cases], data.SPLIT_SEED, val=data.MASK_VAL, test=data.MASK_TEST)
    dices: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    ctr_err, ctrs, declined, withheld = [], [], 0, 0
    for case, s in zip(cases, split):
        if s != part:
            continue
        img, ref = case.load()
        masks, geometry, verdict, _ = _png_pipeline(analyzer, img)
        for j, name in enumerate(SEGMENTS):
            dices[name].append(dice(masks[j], ref[j]))
        ref_g = ctr_geometry(ref)
        declined += bool(verdict.decline)
        withheld += bool(verdict.withhold)
        ctr_err.append(abs(geometry.ctr - ref_g.ctr) if geometry is not None else float("nan"))
        ctrs.append(geometry.ctr if geometry is not None else float("nan"))
    err = np.asarray(ctr_err)
    return {
        "n": len(err),
        "dice": {k: {"mean": _r(np.mean(v)), "median": _r(np.median(v)), "min": _r(np.min(v))} for k, v in dices.items()},
        "ctr_abs_error": {"mean": _r(np.nanmean(err)), "p95": _r(np.nanpercentile(err, 95)), "max": _r(np.nanmax(err)),
                          "not_measured": int(np.isnan(err).sum())},
        "ctr_range": [_r(np.nanmin(ctrs)), _r(np.nanmax(ctrs))],
        "declined": declined,
        "withheld": withheld,
    }


def evaluate_cxr14(analyzer, csv_path: Path, images: Path, part: str = "test") -> dict[str, Any]:
    """AUROC with 95% bootstrap intervals per trained label on one split (by patient) of a ChestX-ray14 table."""
    from . import data
    from .constants import LABELS

    records = data.read_chestxray14(csv_path, images)
    split = data.split_by_group([r.patient_id for r in records], data.SPLIT_SEED, val=data.CXR14_VAL, test=data.CXR14_TEST)
    ops = analyzer.operating_points()
    y, p, ctr, declined, withheld = [], [], [], 0, 0
    for rec, s in zip(records, split):
        if s != part:
            continue
        _, geometry, verdict, probs = _png_pipeline(analyzer, data.load_png(rec.path))
        y.append(rec.labels)
        p.append(probs)
        ctr.append(geometry.ctr if geometry is not None else float("nan"))
        declined += bool(verdict.decline)
        withheld += bool(verdict.withhold)
    y, p, ctr = np.asarray(y).astype(bool), np.asarray(p), np.asarray(ctr)
    out: dict[str, Any] = {"n": len(y), "patients": len({r.patient_id for r, s in zip(records, split) if s == part}),
                           "declined": declined, "withheld": withheld, "auroc": {}, "at_operating_point": {}}
    for label in analyzer.classified_labels():
        j = LABELS.index(label)
        lo, hi = bootstrap_ci(y[:, j], p[:, j])
        out["auroc"][label] = {"auroc": _r(auroc(y[:, j], p[:, j])), "ci95": [_r(lo), _r(hi)], "positives": int(y[:, j].sum())}
        called = p[:, j] >= ops[label]
        out["at_operating_point"][label] = {"threshold": ops[label], "sensitivity": _r(called[y[:, j]].mean()),
                                            "specificity": _r((~called[~y[:, j]]).mean())}
    j = LABELS.index("Pneumonia")
    keep = y[:, j] | ~y.any(1)  # Pneumonia against No Finding
    lo, hi = bootstrap_ci(y[keep, j], p[keep, j])
    out["pneumonia_vs_no_finding"] = {"auroc": _r(auroc(y[keep, j], p[keep, j])), "ci95": [_r(lo), _r(hi)],
                                      "pneumonia": int(y[keep, j].sum()), "no_finding": int((~y[keep, j]).sum())}
    c = LABELS.index("Cardiomegaly")
    ok = np.isfinite(ctr)
    out["ctr"] = {"range": [_r(np.nanmin(ctr)), _r(np.nanmax(ctr))], "not_measured": int((~ok).sum()),
                  "mean_cardiomegaly": _r(np.nanmean(ctr[y[:, c]])) if y[:, c].any() else None,
                  "mean_other": _r(np.nanmean(ctr[~y[:, c]])), "cardiomegaly_positives": int(y[:, c].sum())}
    return out


def evaluate_phantoms(analyzer, n: int, seed: int) -> dict[str, Any]:
    """Dice and CTR error of the whole analyzer (DICOM in) on ``n`` fresh phantom studies."""
    import json
    import tempfile

    import pydicom

    from dicomnode.analysis import Study

    from .constants import SEGMENTS
    from .phantom import write_phantoms

    dices: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    err = []
    with tempfile.TemporaryDirectory() as tmp:
        for folder in write_phantoms(Path(tmp), n, seed):
            truth = json.loads((folder / "truth.json").read_text())
            with np.load(folder / truth["masks_file"]) as z:
                true_masks = z["masks"]
            path = folder / truth["file"]
            result = analyzer.analyze(analyzer.select(Study.from_datasets([pydicom.dcmread(path)], [path])))
            pred = result.segmentations[0].masks[0]
            for j, s in enumerate(SEGMENTS):
                dices[s].append(dice(pred[..., j], true_masks[j]))
            ctr = {m.key: m.value for m in result.measurements}.get("cardiothoracic_ratio", float("nan"))
            err.append(abs(ctr - truth["ctr"]))
    e = np.asarray(err, float)
    return {"n": n, "seed": seed,
            "dice": {k: {"mean": _r(np.mean(v)), "min": _r(np.min(v))} for k, v in dices.items()},
            "ctr_abs_error": {"mean": _r(np.nanmean(e)), "p95": _r(np.nanpercentile(e, 95)), "not_measured": int(np.isnan(e).sum())}}


def _missing_or_nan(obj: Any, path: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [m for k, v in obj.items() for m in _missing_or_nan(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, (list, tuple)):
        return [m for i, v in enumerate(obj) for m in _missing_or_nan(v, f"{path}[{i}]")]
    if isinstance(obj, float) and not np.isfinite(obj):
        return [path]
    return []


REQUIRED = ("masks_test.dice.right_lung.mean", "masks_test.dice.left_lung.mean", "masks_test.dice.heart.mean",
            "masks_test.ctr_abs_error.mean", "cxr14_test.pneumonia_vs_no_finding.auroc", "phantoms.dice.right_lung.mean")


def _get(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m analyzers.chest_xray_thoracic.evaluate",
                                description="Metrics of the chest weights on the held-out real splits and fresh phantoms (never trains, never rewrites weights).")
    p.add_argument("--masks", type=Path, required=True, help="folder of radiographs with lung and heart masks (as for train)")
    p.add_argument("--cxr14-csv", type=Path, required=True)
    p.add_argument("--cxr14-images", type=Path, required=True)
    p.add_argument("--weights", type=Path, help="folder with the two registry entries (default: the bundled weights)")
    p.add_argument("--phantoms", type=int, default=100)
    p.add_argument("--phantom-seed", type=int, default=3000)
    p.add_argument("--out", type=Path, help="write the metrics here (default: print them)")
    p.add_argument("--write", action="store_true", help="write metrics.json beside the weights (what train does after export)")
    args = p.parse_args(argv)
    analyzer = _analyzer(args.weights)
    metrics = {
        "masks_test": evaluate_masks(analyzer, args.masks),
        "cxr14_test": evaluate_cxr14(analyzer, args.cxr14_csv, args.cxr14_images),
        "phantoms": evaluate_phantoms(analyzer, args.phantoms, args.phantom_seed),
        "splits": "masks: by image, cxr14: by patient; seed and fractions in analyzers/chest_xray_thoracic/data.py; "
                  "test splits are never read by training or for operating points",
    }
    bad = _missing_or_nan(metrics) + [k for k in REQUIRED if _get(metrics, k) is None]
    text = json.dumps(metrics, indent=2) + "\n"
    if args.write:
        from .analyzer import WEIGHTS

        (Path(args.weights or WEIGHTS) / "metrics.json").write_text(text)
    if args.out:
        args.out.write_text(text)
    if not args.out and not args.write:
        sys.stdout.write(text)
    if bad:
        sys.stderr.write(f"missing or NaN metrics: {', '.join(bad)}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
