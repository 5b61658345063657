"""CPU time and peak memory of ct_vertebral_fracture on one 512 x 512 x 400 CT study; torch eager vs ONNX Runtime.

    python benchmarks/inference_ct_vertebral_fracture.py [--slices 400] [--matrix 512] [--torch]

Draws a phantom (seed 9501), resamples it to ``matrix`` x ``matrix`` pixels and ``slices`` axial
slices, writes it as a DICOM series, then runs ``select`` + ``analyze`` in a fresh process (as
the node's worker would: files read, volume assembled, networks on ONNX Runtime, CPU) and reports
wall and CPU seconds and the process's peak resident memory (ru_maxrss). ``--torch`` runs the
same array pipeline with the torch modules (``weights/*.pt``) as the networks, for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_study(folder: Path, slices: int, matrix: int, seed: int = 9501) -> Path:
    from scipy import ndimage

    from analyzers.ct_vertebral_fracture.phantom import CtPhantom, phantom_rng, render, write_study

    rng = phantom_rng(seed, 0)
    ph = render(rng)
    n_z, n_y, n_x = ph.hu.shape
    zoom = (slices / n_z, matrix / n_y, matrix / n_x)
    hu = np.empty((slices, matrix, matrix), np.float32)
    # slab by slab, so the writer itself stays small next to what it writes
    for k0 in range(0, slices, 50):
        k1 = min(slices, k0 + 50)
        zz = (np.arange(k0, k1) + 0.5) / zoom[0] - 0.5
        yy = (np.arange(matrix) + 0.5) / zoom[1] - 0.5
        xx = (np.arange(matrix) + 0.5) / zoom[2] - 0.5
        grid = np.meshgrid(zz, yy, xx, indexing="ij")
        hu[k0:k1] = ndimage.map_coordinates(ph.hu, grid, order=1, mode="nearest")
    spacing = (ph.spacing[0] * n_z / slices, ph.spacing[1] * n_y / matrix, ph.spacing[2] * n_x / matrix)
    big = CtPhantom(hu=hu, spacing=spacing, origin=ph.origin, vertebrae=ph.vertebrae, meta=ph.meta)
    return write_study(big, folder, rng, 0, prefix="ctbench")


RUN = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np
    import pydicom
    from dicomnode.analysis import AnalyzerSettings, NotApplicable, Study
    from analyzers.ct_vertebral_fracture.analyzer import CtVertebralFracture
    from analyzers.ct_vertebral_fracture import inference
    from analyzers import volume as volumes
    folder, use_torch = Path(sys.argv[1]), sys.argv[2] == "torch"
    t0, c0 = time.perf_counter(), time.process_time()
    files = sorted(folder.glob("*.dcm"))
    study = Study.from_datasets([pydicom.dcmread(f) for f in files], files)
    a = CtVertebralFracture(AnalyzerSettings(device="cpu"))
    a.load()
    series = a.select(study)
    if use_torch:
        import torch
        from analyzers.ct_vertebral_fracture.model import FractureClassifier, VertebraDetector
        torch.set_num_threads(2)
        _, _, dissection, entry = a.functions()
        w = a.models()
        det = VertebraDetector(width=8, levels=3); det.load_state_dict(torch.load(Path(entry.path).parent / "detector.pt")); det.eval()
        cls = FractureClassifier(width=8, levels=2, in_pool=3, crop=4); cls.load_state_dict(torch.load(Path(entry.path).parent / "classifier.pt")); cls.eval()
        def detector(x):
            with torch.inference_mode():
                return det(torch.from_numpy(x)).numpy()
        def classifier(x):
            with torch.inference_mode():
                lo, act = cls(torch.from_numpy(x))
                return lo.numpy(), act.numpy()
        vol = volumes.assemble(series[0])
        try:
            loc = inference.analyse(vol, detector, classifier, dissection, float(entry.extra.get("height_bias_mm", 0.0)))
            n, declined = len(loc.vertebrae), None
        except NotApplicable as exc:
            n, declined = 0, str(exc)
    else:
        try:
            result = a.analyze(series)
            n, declined = len({f.group for f in result.findings}), None
        except NotApplicable as exc:
            n, declined = 0, str(exc)
    print(json.dumps({"vertebrae": n, "declined": declined, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--torch", action="store_true", help="also run the pipeline with the torch modules")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_study(Path(tmp) / "study", args.slices, args.matrix)
        out = {"slices": args.slices, "matrix": args.matrix}
        for kind in (["onnx", "torch"] if args.torch else ["onnx"]):
            r = subprocess.run([sys.executable, "-c", RUN, str(folder), kind], capture_output=True, text=True, cwd=REPO)
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            out[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
