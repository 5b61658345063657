"""Per-study network time of every bundled analyzer: torch eager against ONNX Runtime on the CPU.

    python benchmarks/torch_vs_onnx.py [--runs 15] [--readme benchmarks/README.md]

For each analyzer one phantom study is written and run through the analyzer
itself (``select`` + ``analyze``, CPU sessions) while every ONNX Runtime call is
recorded: the recorded feeds are the network inputs of one study as the
analyzer's own preprocessing builds them (for spine_xray_keypoints this
includes the MC-dropout masks, so torch and ONNX Runtime evaluate the same
dropout samples). The torch modules are then built as each ``train.py``
exports them (same wrapper class, width and configuration from the registry
json), put in eval mode, and given the bundled weights:

* spine_xray_keypoints: the bundled ``.pt`` state dicts;
* chest_xray_thoracic and dxa_scoliosis (no ``.pt`` bundled): the ONNX
  initializers copied back into the torch modules; where the exporter folded a
  BatchNorm into the preceding convolution, the folded weight and bias go into
  the convolution and that BatchNorm is set to the identity.

The max abs difference of the outputs, torch against ONNX Runtime, shows that
the torch modules are the bundled networks. Both runtimes are timed on the
same feeds with 1 and 2 intra-op threads (warm-up, then the median of
``--runs`` runs of all of a study's network calls). A markdown table is
printed; with ``--readme`` it is appended to that file under
``## Torch eager vs ONNX Runtime`` (replacing an earlier copy of the section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dicomnode import runtime  # noqa: E402
from dicomnode.analysis import AnalyzerSettings, RegistryEntry, Study  # noqa: E402
from analyzers.onnx_import import load_from_onnx  # noqa: E402

HEADING = "## Torch eager vs ONNX Runtime"
THREADS = (1, 2)


@dataclass
class Call:
    """One ONNX Runtime call the analyzer made for the study."""

    model: str
    path: Path
    feeds: dict[str, np.ndarray]


@dataclass
class Network:
    """A bundled network: its torch module, where its weights came from, and the study's calls to it."""

    name: str
    path: Path
    module: nn.Module
    weights: str
    calls: list[Call] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Recording one study's network inputs
# ---------------------------------------------------------------------------


def record_study(analyzer_cls: type, seed: int, n: int, want: Callable[[list[Call]], bool]) -> list[Call]:
    """Run phantom studies through the analyzer on the CPU until one makes the calls ``want`` accepts; return them."""
    calls: list[Call] = []
    original = runtime.OnnxModel.__call__

    def recording(self, **feeds):
        calls.append(Call(self.entry.name, Path(self.entry.path), {k: np.array(v, copy=True) for k, v in feeds.items()}))
        return original(self, **feeds)

    runtime.OnnxModel.__call__ = recording
    try:
        with tempfile.TemporaryDirectory() as tmp:
            analyzer = analyzer_cls(AnalyzerSettings(device="cpu"))
            analyzer.load()
            for folder in analyzer_cls.write_phantoms(Path(tmp), n, seed):
                paths = sorted(folder.rglob("*.dcm"))
                calls.clear()
                study = Study.from_datasets([pydicom.dcmread(p) for p in paths], paths)
                try:
                    analyzer.analyze(analyzer.select(study))
                except Exception:  # a phantom this analyzer does not apply to; try the next one
                    continue
                if want(calls):
                    return list(calls)
    finally:
        runtime.OnnxModel.__call__ = original
    raise RuntimeError(f"none of {n} phantom studies of {analyzer_cls.__name__} (seed {seed}) ran the networks")


# ---------------------------------------------------------------------------
# The analyzers' networks, built as their train.py exports them
# ---------------------------------------------------------------------------


def chest_networks(calls: list[Call]) -> list[Network]:
    from analyzers.chest_xray_thoracic import model as M
    from analyzers.chest_xray_thoracic.analyzer import WEIGHTS

    seg_entry = RegistryEntry.load(WEIGHTS / "lung_heart_unet.json")
    cls_entry = RegistryEntry.load(WEIGHTS / "thoracic_classifier.json")
    seg = M.SegmenterExport(M.UNet(base=int(seg_entry.extra["unet_base"]), downsample=int(seg_entry.extra["unet_downsample"]))).eval()
    d = cls_entry.extra["densenet"]
    cfg = M.DenseNetConfig(growth_rate=d["growth_rate"], block_config=tuple(d["block_config"]), num_init_features=d["num_init_features"], bn_size=d["bn_size"])
    cls = M.ClassifierExport(M.ThoracicClassifier(cfg, dropout=0.1)).eval()
    s = M.INPUT_SIZE
    nets = [
        Network("lung_heart_unet", seg_entry.path, seg, load_from_onnx(seg, seg_entry.path, (torch.zeros(1, 3, s, s),))),
        Network("thoracic_classifier", cls_entry.path, cls, load_from_onnx(cls, cls_entry.path, (torch.zeros(1, 3, s, s), torch.ones(1, 1, s, s)))),
    ]
    return attach(nets, calls)


def spine_networks(calls: list[Call]) -> list[Network]:
    from analyzers.spine_xray_keypoints import model as M
    from analyzers.spine_xray_keypoints.analyzer import WEIGHTS

    nets = []
    regions = sorted({c.model.rsplit("_", 1)[1] for c in calls})
    for region in regions:
        det_entry = RegistryEntry.load(WEIGHTS / f"spine_xray_detector_{region}.json")
        kp_entry = RegistryEntry.load(WEIGHTS / f"spine_xray_keypoints_{region}.json")
        det = M.VertebraDetector(len(det_entry.extra["labels"]))
        det.load_state_dict(torch.load(WEIGHTS / f"detector_{region}.pt", map_location="cpu"))
        state = torch.load(WEIGHTS / f"keypoints_{region}.pt", map_location="cpu")
        width = state["features.0.0.weight"].shape[0]  # train.py --width; the registry records only hidden
        kp = M.BayeCBAMKeypointNet(width=width, hidden=int(kp_entry.extra["hidden"]), p_drop=float(kp_entry.extra["p_drop"]))
        kp.load_state_dict(state)
        nets.append(Network(det_entry.name, det_entry.path, det.eval(), f"detector_{region}.pt"))
        nets.append(Network(kp_entry.name, kp_entry.path, M.MCDropoutKeypoints(kp).eval(), f"keypoints_{region}.pt (width {width})"))
        body_name = kp_entry.extra.get("body_model")
        if body_name:  # the vertebral-body keypoint model: same network, body crops
            body_entry = RegistryEntry.load(WEIGHTS / f"{body_name}.json")
            body = M.BayeCBAMKeypointNet(width=width, hidden=int(body_entry.extra["hidden"]), p_drop=float(body_entry.extra["p_drop"]))
            body.load_state_dict(torch.load(WEIGHTS / f"keypoints_body_{region}.pt", map_location="cpu"))
            nets.append(Network(body_entry.name, body_entry.path, M.MCDropoutKeypoints(body).eval(), f"keypoints_body_{region}.pt (width {width})"))
        corner_name = kp_entry.extra.get("corner_model")
        if corner_name:  # the corner model: one point per corner patch
            c_entry = RegistryEntry.load(WEIGHTS / f"{corner_name}.json")
            corner = M.BayeCBAMKeypointNet(width=width, hidden=int(c_entry.extra["hidden"]), p_drop=float(c_entry.extra["p_drop"]),
                                           pool=tuple(c_entry.extra["pool"]), n_points=int(c_entry.extra["n_points"]))
            corner.load_state_dict(torch.load(WEIGHTS / f"keypoints_corner_{region}.pt", map_location="cpu"))
            nets.append(Network(c_entry.name, c_entry.path, M.MCDropoutKeypoints(corner).eval(), f"keypoints_corner_{region}.pt (width {width})"))
    return attach(nets, calls)


def dxa_networks(calls: list[Call]) -> list[Network]:
    from analyzers.dxa_scoliosis import model as M
    from analyzers.dxa_scoliosis import preprocess as pp
    from analyzers.dxa_scoliosis.analyzer import WEIGHTS

    seg_entry = RegistryEntry.load(WEIGHTS / "dxa_scoliosis_seg.json")
    cls_entry = RegistryEntry.load(WEIGHTS / "dxa_scoliosis_cls.json")
    seg = M.SegNet(width=int(seg_entry.extra["width"])).eval()
    cls = M.ClsNet(width=int(cls_entry.extra["width"])).eval()
    x = torch.zeros(1, 1, pp.ROWS, pp.COLS)
    nets = [
        Network(seg_entry.name, seg_entry.path, seg, load_from_onnx(seg, seg_entry.path, (x,))),
        Network(cls_entry.name, cls_entry.path, cls, load_from_onnx(cls, cls_entry.path, (x, torch.zeros(1, len(M.PARTS), pp.ROWS, pp.COLS)))),
    ]
    return attach(nets, calls)


def attach(nets: list[Network], calls: list[Call]) -> list[Network]:
    by_path = {n.path.resolve(): n for n in nets}
    for n in nets:
        n.inputs = [i.name for i in onnx.load(str(n.path)).graph.input]
    for c in calls:
        by_path[c.path.resolve()].calls.append(c)
    return [n for n in nets if n.calls]


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as dicomnode/runtime.py
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def torch_run(net: Network, call: Call) -> list[np.ndarray]:
    with torch.inference_mode():
        out = net.module(*(torch.from_numpy(call.feeds[k]) for k in net.inputs))
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def median_ms(fn_torch: Callable[[], object], fn_ort: Callable[[], object], runs: int, warmup: int = 2, budget_s: float = 3.0, min_runs: int = 5) -> tuple[float, float]:
    """Medians (ms) of up to ``runs`` timed runs of each, alternating torch and ONNX Runtime so both see the same load.

    After ``min_runs`` pairs, stops once ``budget_s`` seconds have gone, which keeps the whole benchmark to a few minutes
    on a loaded machine.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        fn_torch()
        fn_ort()
    t, o = [], []
    for i in range(runs):
        if i >= min_runs and time.perf_counter() - start > budget_s:
            break
        s = time.perf_counter()
        fn_torch()
        m = time.perf_counter()
        fn_ort()
        e = time.perf_counter()
        t.append(m - s)
        o.append(e - m)
    return 1000.0 * float(np.median(t)), 1000.0 * float(np.median(o))


def shapes(calls: list[Call]) -> str:
    """Input shapes of a network's calls; identical calls are counted once (``2 × ...``)."""
    one = [", ".join("x".join(map(str, v.shape)) for v in c.feeds.values()) for c in calls]
    return f"{len(one)} × {one[0]}" if len(one) > 1 and len(set(one)) == 1 else " + ".join(one)


def measure(analyzer: str, nets: list[Network], runs: int) -> list[dict]:
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        sessions = {n.name: session(n.path, threads) for n in nets}
        per_net = []
        for net in nets:
            sess = sessions[net.name]
            t_ms, o_ms = median_ms(lambda: [torch_run(net, c) for c in net.calls], lambda: [sess.run(None, c.feeds) for c in net.calls], runs)
            diff = 0.0
            for c in net.calls:
                for a, b in zip(torch_run(net, c), sess.run(None, c.feeds)):
                    diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b))))
            per_net.append(diff)
            rows.append({"analyzer": analyzer, "network": net.name, "input": shapes(net.calls),
                         "threads": threads, "torch_ms": t_ms, "ort_ms": o_ms, "diff": diff, "weights": net.weights})
        if len(nets) > 1:
            t_ms, o_ms = median_ms(lambda: [torch_run(n, c) for n in nets for c in n.calls], lambda: [sessions[n.name].run(None, c.feeds) for n in nets for c in n.calls], runs)
            rows.append({"analyzer": analyzer, "network": "**all, one study**", "input": "as above", "threads": threads,
                         "torch_ms": t_ms, "ort_ms": o_ms, "diff": max(per_net), "weights": ""})
    return rows


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = ["| analyzer | network(s) | input shape | threads | torch ms | ONNX Runtime ms | speed-up | max abs diff |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["analyzer"], r["threads"])):
        lines.append(f"| {r['analyzer']} | {r['network']} | {r['input']} | {r['threads']} | {r['torch_ms']:.1f} | {r['ort_ms']:.1f} | {r['torch_ms'] / r['ort_ms']:.2f}x | {r['diff']:.1e} |")
    return "\n".join(lines)


def section(rows: list[dict], runs: int, load_before: str, load_after: str) -> str:
    weights = sorted({f"{r['network']}: {r['weights']}" for r in rows if r["weights"]})
    cpu = platform.processor() or platform.machine()
    return "\n".join([
        HEADING,
        "",
        f"`python benchmarks/torch_vs_onnx.py --runs {runs}` runs one phantom study through each analyzer and records every ONNX "
        "Runtime call (the inputs the analyzer's own preprocessing builds; spine_xray_keypoints' MC-dropout masks included), then "
        "times those calls through the torch modules as each `train.py` exports them (eval mode, `torch.inference_mode()`, the same "
        "masks, so the same dropout samples) and through the bundled ONNX files (`InferenceSession`, CPUExecutionProvider, all graph "
        f"optimisations), with 1 and 2 intra-op threads: 2 warm-up runs, then the median of {runs} runs (at least 5, fewer once a measurement passes 3 s), torch and ONNX Runtime runs alternating so that both see the same load. A network's row is all of its calls "
        "for the study (`2 × ...`: two calls with these inputs; crops, mask1, mask2 for the keypoint regressor); `all, one study` is every network call of the study in sequence. Speed-up is torch "
        "ms / ONNX Runtime ms. Max abs diff is over all outputs, torch against ONNX Runtime, so the torch modules carry the bundled "
        "weights:",
        "",
        *[f"- {w}" for w in weights],
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()}-core {cpu} (Python {platform.python_version()}, torch "
        f"{torch.__version__}, onnxruntime {ort.__version__}), no GPU, shared with other work: `uptime` before `{load_before}`, "
        f"after `{load_after}`. With a load above the core count, 2 threads "
        "oversubscribe the cores: torch's OpenMP threads wait for each other far longer than ONNX Runtime's, so the 2-thread "
        "torch figures then measure contention more than the networks; the 1-thread rows are the comparison to read.",
        "",
        table(rows),
        "",
        summary(rows),
        "",
    ])


def summary(rows: list[dict]) -> str:
    """One sentence per thread count: the per-study speed-up of ONNX Runtime over torch eager, per analyzer."""
    out = []
    for threads in THREADS:
        study = {}
        for r in rows:
            if r["threads"] == threads and (r["network"].startswith("**") or r["analyzer"] not in study):
                study[r["analyzer"]] = r["torch_ms"] / r["ort_ms"]
        out.append(f"Per study with {threads} thread{'s' if threads > 1 else ''}, torch eager takes "
                   + ", ".join(f"{v:.1f}x ({k})" for k, v in study.items()) + " the ONNX Runtime time.")
    return " ".join(out)


def write_readme(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if HEADING in old:
        head, _, tail = old.partition(HEADING)
        rest = tail.split("\n## ", 1)
        old = head.rstrip("\n") + "\n" + ("\n## " + rest[1] if len(rest) > 1 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--readme", type=Path, default=None, help="append (or replace) the section in this markdown file")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args()

    from analyzers.chest_xray_thoracic.analyzer import ChestXrayThoracic
    from analyzers.dxa_scoliosis.analyzer import DxaScoliosis
    from analyzers.spine_xray_keypoints.analyzer import SpineXrayKeypoints

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout carries the table only
    load_before = uptime()
    torch.manual_seed(0)
    rows: list[dict] = []
    studies = [
        ("chest_xray_thoracic", ChestXrayThoracic, 9001, 4, lambda c: len(c) >= 2, chest_networks),
        ("spine_xray_keypoints (cervical)", SpineXrayKeypoints, 9201, 4, lambda c: any("cervical" in x.model for x in c) and len(c) >= 3, spine_networks),
        ("spine_xray_keypoints (lumbar)", SpineXrayKeypoints, 9202, 4, lambda c: any("lumbar" in x.model for x in c) and len(c) >= 3, spine_networks),
        ("dxa_scoliosis", DxaScoliosis, 9101, 8, lambda c: any(x.model.endswith("_seg") for x in c) and any(x.model.endswith("_cls") for x in c), dxa_networks),
    ]
    for label, cls, seed, n, want, build in studies:
        t0 = time.perf_counter()
        nets = build(record_study(cls, seed, n, want))
        rows += measure(label, nets, args.runs)
        print(f"{label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    text = section(rows, args.runs, load_before, uptime())
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.readme:
        write_readme(args.readme, text)


if __name__ == "__main__":
    main()
