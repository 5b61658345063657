"""End-to-end latency: from a study being complete to its last result object acknowledged by Orthanc.

    .venv/bin/python benchmarks/latency.py [--studies 10] [--baseline /path/to/older/checkout] [--out benchmarks/results/latency.json]

Phantom chest radiographs go one at a time (each after the previous one's results are in) through
a node running ``chest_xray_thoracic`` into a private Orthanc. For this tree the figures come from
the node's own Prometheus metrics: each study adds exactly one observation to
``dicomnode_study_to_delivery_seconds``, so the change of its ``_sum`` between two scrapes is that
study's latency; the changes of ``dicomnode_analysis_seconds``, ``dicomnode_encode_seconds`` and
``dicomnode_job_queue_wait_seconds`` split it. The same run reads the node's log too: study_complete
to the last object_sent, the job's own time (reading the study, analysis, encoding, writing the
results), and what the node adds beyond the job (``log_overhead_s``: waking the worker, waking the
sender, the association and Orthanc storing the objects). That is how ``--baseline`` measures an
older checkout (with its own ``.venv``), which has no metrics, side by side on the same machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import NodeProcess, Orthanc, free_port, storescu  # noqa: E402

RULES = [{"name": "chest", "when": {"Modality": {"in": ["CR", "DX"]}}, "analyzers": ["chest_xray_thoracic"], "stable_after": 1}]
OTHERS = ("spine_xray_keypoints", "dxa_scoliosis")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _ts(event: dict) -> float:
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def log_latency(node: NodeProcess, study_uid: str) -> dict[str, float] | None:
    """From the node's log, once the study is delivered: study_complete to the last object_sent (``e2e``),
    the job's own seconds, study_complete to job_started (``to_worker``) and job_finished to the last
    object_sent (``to_pacs``: waking the sender, the association, Orthanc storing the objects)."""
    events = [e for e in node.log_events() if e.get("study_uid") == study_uid]
    complete = [e for e in events if e.get("event") == "study_complete"]
    started = [e for e in events if e.get("event") == "job_started"]
    finished = [e for e in events if e.get("event") == "job_finished"]
    sent = [e for e in events if e.get("event") == "object_sent"]
    if not complete or not started or not finished or len(sent) < finished[-1].get("objects", 1):
        return None
    last = max(_ts(e) for e in sent)
    return {"e2e": last - _ts(complete[0]), "job": float(finished[-1]["seconds"]),
            "to_worker": _ts(started[0]) - _ts(complete[0]), "to_pacs": last - _ts(finished[-1])}


def run(label: str, dicomnode_bin: Path | None, studies: list[Path], workdir: Path) -> dict:
    pacs = Orthanc(workdir / "orthanc").start()
    metrics_port = free_port() if dicomnode_bin is None else 0
    config = {"analyzers": {"device": "cpu", "settings": {n: {"enabled": False} for n in OTHERS}}}
    if metrics_port:
        config["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    node = NodeProcess(workdir / "node", pacs=pacs, rules=RULES, config=config)
    node.config_path.write_text(node.config_path.read_text().replace("poll_interval: 0.25", "poll_interval: 1.0"))
    if dicomnode_bin is not None:  # an older checkout, with its own virtual environment
        node.start = _starter(node, dicomnode_bin)  # type: ignore[method-assign]
    node.start()
    rows = []
    try:
        import pydicom

        # the first study is not counted: the worker's first job pays one-off costs
        for i, folder in enumerate(studies):
            files = sorted(folder.glob("*.dcm"))
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            before = scrape(metrics_port) if metrics_port else {}
            r = storescu(node.port, files)
            if r.returncode != 0:
                raise RuntimeError(f"storescu failed: {r.stderr[-500:]}")
            node.wait_for(lambda: log_latency(node, study_uid) is not None, 120, f"study {i} delivered")
            lat = log_latency(node, study_uid)
            assert lat is not None
            row = {"study": i, **{f"log_{k}_s": round(v, 4) for k, v in lat.items()}}
            if metrics_port:
                key = 'dicomnode_study_to_delivery_seconds_{}{{destination="pacs"}}'
                after = {}
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    after = scrape(metrics_port)
                    if after.get(key.format("count"), 0) - before.get(key.format("count"), 0) == 1:
                        break
                    time.sleep(0.05)

                def d(name: str) -> float:
                    return after.get(name, 0.0) - before.get(name, 0.0)

                e2e = d(key.format("sum"))
                analysis = d('dicomnode_analysis_seconds_sum{analyzer="chest_xray_thoracic"}')
                encode = d('dicomnode_encode_seconds_sum{analyzer="chest_xray_thoracic"}')
                row.update(e2e_s=round(e2e, 4), analysis_s=round(analysis, 4), encode_s=round(encode, 4),
                           queue_wait_s=round(d('dicomnode_job_queue_wait_seconds_sum{analyzer="chest_xray_thoracic"}'), 4),
                           objects=int(d('dicomnode_objects_sent_total{destination="pacs"}')))
            rows.append(row)
    finally:
        node.stop()
        pacs.stop()
    measured = rows[1:]
    summary: dict = {"label": label, "studies": len(measured)}
    for r in measured:
        r["log_overhead_s"] = round(r["log_e2e_s"] - r["log_job_s"], 4)  # what the node adds beyond the job itself
    for key in ("e2e_s", "analysis_s", "encode_s", "queue_wait_s", "log_e2e_s", "log_job_s", "log_overhead_s",
                "log_to_worker_s", "log_to_pacs_s", "objects"):
        values = [r[key] for r in measured if key in r]
        if values:
            values.sort()
            summary[key] = {"median": round(statistics.median(values), 3), "p90": round(values[int(0.9 * (len(values) - 1))], 3),
                            "max": round(values[-1], 3)}
    return {"summary": summary, "studies": rows}


def _starter(node: NodeProcess, venv_bin: Path):
    from tests.peers import wait_port

    def start(timeout: float = 60) -> NodeProcess:
        log = open(node.log_path, "ab")
        env = {**os.environ, "DICOMNODE_ORT_THREADS": "1"}
        env.pop("PYTHONPATH", None)
        node.proc = subprocess.Popen([str(venv_bin / "dicomnode"), "serve", "--config", str(node.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_port(node.port, timeout, node.proc)
        return node

    return start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=10, help="measured studies (one more goes first, unmeasured)")
    ap.add_argument("--baseline", type=Path, help="an older checkout with its own .venv, measured in the same run")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "latency.json")
    args = ap.parse_args()
    from dicomnode.registry import analyzer_class

    with tempfile.TemporaryDirectory(prefix="dn-latency-") as tmp:
        tmp_path = Path(tmp)
        studies = analyzer_class("chest_xray_thoracic").write_phantoms(tmp_path / "phantoms", args.studies + 1, 4242)
        results = {"date": dt.date.today().isoformat(), "load": os.getloadavg()[0], "runs": []}
        if args.baseline is not None:
            results["runs"].append(run(f"baseline {args.baseline}", args.baseline / ".venv" / "bin", studies, tmp_path / "base"))
        results["runs"].append(run("this tree", None, studies, tmp_path / "this"))
        results["load_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for r in results["runs"]:
        print(json.dumps(r["summary"]))


if __name__ == "__main__":
    main()
