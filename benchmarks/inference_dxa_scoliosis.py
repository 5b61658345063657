"""Inference timing of the dxa_scoliosis analyzer on phantom studies.

    python benchmarks/inference_dxa_scoliosis.py --n 20 --device auto

Prints one JSON line: ONNX Runtime providers, model load and warm-up seconds,
per-study wall-clock (median, p95, max) of ``select`` + ``analyze`` with the
bundled weights, and the share of the networks in it. Studies mix the header
styles of the phantoms: iDXA-like series of six views (select reads the pixels
of every tall candidate to find the whole-body bone image) and single-image
BMD / DX studies. Each study runs both networks twice (the image and its
mirror image, the paper's test-time averaging).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.analysis import AnalyzerSettings, Study  # noqa: E402
from analyzers.dxa_scoliosis.analyzer import DxaScoliosis  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=9101)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folders = DxaScoliosis.write_phantoms(Path(tmp), args.n, args.seed)
        analyzer = DxaScoliosis(AnalyzerSettings(device=args.device))
        t0 = time.perf_counter()
        analyzer.load()
        t1 = time.perf_counter()
        analyzer.warmup()
        t2 = time.perf_counter()
        net_time = [0.0]
        seg_fn, cls_fn = analyzer._seg_fn, analyzer._cls_fn

        def timed(fn):
            def run(*a):
                s = time.perf_counter()
                out = fn(*a)
                net_time[0] += time.perf_counter() - s
                return out

            return run

        analyzer._seg_fn, analyzer._cls_fn = timed(seg_fn), timed(cls_fn)
        times, nets, styles = [], [], []
        for folder in folders:
            paths = sorted(folder.glob("*.dcm"))
            styles.append(json.loads((folder / "truth.json").read_text())["style"])
            net_time[0] = 0.0
            start = time.perf_counter()
            study = Study.from_datasets([pydicom.dcmread(q, stop_before_pixels=True) for q in paths], paths)
            for s in study.series:  # headers only, pixels read lazily as the node's store does
                for inst in s.instances:
                    inst._dataset = None
            analyzer.analyze(analyzer.select(study))
            times.append(time.perf_counter() - start)
            nets.append(net_time[0])
    t, nt = np.asarray(times), np.asarray(nets)
    print(json.dumps({
        "analyzer": analyzer.name,
        "n": args.n,
        "styles": {s: styles.count(s) for s in sorted(set(styles))},
        "providers": analyzer._seg.providers,
        "machine": platform.processor() or platform.machine(),
        "load_s": round(t1 - t0, 3),
        "warmup_s": round(t2 - t1, 3),
        "study_s": {"median": round(float(np.median(t)), 3), "p95": round(float(np.percentile(t, 95)), 3), "max": round(float(t.max()), 3)},
        "networks_s": {"median": round(float(np.median(nt)), 3)},
    }))


if __name__ == "__main__":
    main()
