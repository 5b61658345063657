"""Inference timing of the spine_xray_keypoints analyzer on phantom studies.

    python benchmarks/inference_spine_xray_keypoints.py --n 20 --device auto

Prints one JSON line: ONNX Runtime providers, model load and warm-up seconds,
and per-study wall-clock (median, p95, max) of ``select`` + ``analyze`` with
the bundled weights, for cervical and lumbar studies together (DICOM decode,
detector, four batched MC-dropout passes of T samples (vertebra, re-centred
vertebra, body and corner crops), each over the crops and their mirror images, mensuration and result building included), plus the share
spent in the ONNX sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.analysis import AnalyzerSettings, Study  # noqa: E402
from analyzers.spine_xray_keypoints.analyzer import SpineXrayKeypoints  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=9201)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folders = SpineXrayKeypoints.write_phantoms(Path(tmp), args.n, args.seed)
        paths = [next(f.glob("*.dcm")) for f in folders]
        analyzer = SpineXrayKeypoints(AnalyzerSettings(device=args.device))
        t0 = time.perf_counter()
        analyzer.load()
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyzer.warmup()
        t_warm = time.perf_counter() - t0

        session_time = [0.0]
        for *models, _ in analyzer._sessions.values():
            for model in (m for m in models if m is not None):
                run = model.session.run

                def timed(*a, _run=run, **k):
                    s = time.perf_counter()
                    try:
                        return _run(*a, **k)
                    finally:
                        session_time[0] += time.perf_counter() - s

                model.session.run = timed
        times = []
        for path in paths:
            t0 = time.perf_counter()
            study = Study.from_datasets([pydicom.dcmread(path)], [path])
            analyzer.analyze(analyzer.select(study))
            times.append(time.perf_counter() - t0)
        providers = sorted({p for *models, _ in analyzer._sessions.values() for m in models if m is not None for p in m.providers})
    t = np.array(times)
    print(
        json.dumps(
            {
                "analyzer": analyzer.name,
                "studies": len(t),
                "providers": providers,
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_s": round(t_load, 3),
                "warmup_s": round(t_warm, 3),
                "study_median_s": round(float(np.median(t)), 3),
                "study_p95_s": round(float(np.quantile(t, 0.95)), 3),
                "study_max_s": round(float(t.max()), 3),
                "onnx_share": round(session_time[0] / float(t.sum()), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
