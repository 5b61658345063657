"""Inference timing of the chest_xray_thoracic analyzer on phantom studies.

    python benchmarks/inference_chest_xray_thoracic.py --n 20 --device auto

Prints one JSON line: ONNX Runtime providers, model load and warm-up seconds,
and per-study wall-clock (median, p95, max) of ``select`` + ``analyze`` with
the bundled weights (DICOM decode, U-Net, classifier, masks, outlines and
heatmaps at source size included).
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
from analyzers.chest_xray_thoracic.analyzer import ChestXrayThoracic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=9001)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folders = ChestXrayThoracic.write_phantoms(Path(tmp), args.n, args.seed)
        paths = [next(f.glob("*.dcm")) for f in folders]
        analyzer = ChestXrayThoracic(AnalyzerSettings(device=args.device))
        t0 = time.perf_counter()
        analyzer.load()
        t1 = time.perf_counter()
        analyzer.warmup()
        t2 = time.perf_counter()
        times, cpu = [], []
        for path in paths:
            start, start_cpu = time.perf_counter(), time.process_time()
            study = Study.from_datasets([pydicom.dcmread(path)], [path])
            analyzer.analyze(analyzer.select(study))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    t, c = np.asarray(times), np.asarray(cpu)
    print(json.dumps({
        "analyzer": analyzer.name,
        "n": args.n,
        "providers": analyzer._seg.providers,
        "machine": platform.processor() or platform.machine(),
        "load_s": round(t1 - t0, 3),
        "warmup_s": round(t2 - t1, 3),
        "study_s": {"median": round(float(np.median(t)), 3), "p95": round(float(np.percentile(t, 95)), 3), "max": round(float(t.max()), 3)},
        # CPU seconds of this process (all threads): on a shared, loaded machine wall-clock mostly measures the queue
        "study_cpu_s": {"median": round(float(np.median(c)), 3), "p95": round(float(np.percentile(c, 95)), 3), "max": round(float(c.max()), 3)},
    }))


if __name__ == "__main__":
    main()
