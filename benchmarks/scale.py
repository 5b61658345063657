"""Scaling out: one node on SQLite, one node on PostgreSQL, two nodes sharing PostgreSQL, in one run.

    .venv/bin/python benchmarks/scale.py [--instances 200] [--studies 20] [--out benchmarks/results/scale.json]

Receive rate: CT-like instances (256x256, 16-bit) pushed by DCMTK storescu, two associations at
once (with two nodes, one to each node, as a load balancer would spread them); fsync on, and
PostgreSQL with its durable defaults (fsync, synchronous_commit). End to end: studies of two small
CR instances pushed the same way, analyzed by the test analyzer ``intensity_probe`` (cheap, so the
figure is the node's own overhead: assembly, queue, encoding, sending) and sent to Orthanc; the
clock runs from the first push to the last result acknowledged, in studies per minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.receive import make_files, push  # noqa: E402
from dicomnode.outbox import Outbox  # noqa: E402
from dicomnode.queue import JobQueue  # noqa: E402
from dicomnode.store import Store  # noqa: E402
from tests.e2e.test_pipeline import BUNDLED, make_study  # noqa: E402
from tests.peers import NodeProcess, Orthanc  # noqa: E402
from tests.pg import Postgres  # noqa: E402

SETUPS = (("1 node, SQLite", 1, False), ("1 node, PostgreSQL", 1, True), ("2 nodes, PostgreSQL", 2, True))


def start_nodes(work: Path, n: int, url: str | None, pacs: Orthanc) -> list[NodeProcess]:
    storage = {"data_dir": "data"} if url is None else {"data_dir": "data", "database": url, "shared_dir": str(work / "shared")}
    config = {"storage": storage, "node": {"fsync": True},
              "analyzers": {"device": "cpu", "plugins": ["tests.plugins.probe:IntensityProbe"],
                            "settings": {name: {"enabled": False} for name in BUNDLED}}}
    rules = [{"name": "probe", "when": {"Modality": "CR"}, "analyzers": ["intensity_probe"], "stable_after": 1}]
    return [NodeProcess(work / f"node{i}", pacs=pacs, rules=rules, config=config).start() for i in range(n)]


def spread(nodes: list[NodeProcess], files: list[Path]) -> float:
    """Push over two associations at once: both to one node, or one to each of two nodes."""
    import threading

    if len(nodes) == 1:
        return push(nodes[0].port, files, 2, "DICOMNODE")
    times: list[float] = []
    halves = [files[0::2], files[1::2]]
    threads = [threading.Thread(target=lambda n=n, h=h: times.append(push(n.port, h, 1, "DICOMNODE")))
               for n, h in zip(nodes, halves)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_setup(work: Path, label: str, n_nodes: int, url: str | None, ct: list[Path], studies: list[list[Path]]) -> dict:
    pacs = Orthanc(work / "pacs").start()
    nodes = start_nodes(work, n_nodes, url, pacs)
    try:
        receive_s = spread(nodes, ct)
        store = Store(nodes[0].data_dir, fsync=False, database=url)
        queue, outbox = JobQueue(store), Outbox(store)
        base_jobs = sum(queue.depths().values())
        t0 = time.perf_counter()
        if n_nodes == 1:
            spread(nodes, [f for s in studies for f in s])
        else:  # whole studies per association, alternating between the nodes
            _per_study(nodes, studies)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            jobs, out = queue.depths(), outbox.depths()
            if jobs.get("done", 0) >= len(studies) and sum(jobs.values()) - base_jobs >= len(studies) \
                    and out.get("pending", 0) == 0 and out.get("sent", 0) > 0:
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"{label}: studies not through within 600 s: {queue.depths()} {outbox.depths()}")
        e2e_s = time.perf_counter() - t0
    finally:
        for n in nodes:
            n.stop()
        pacs.stop()
    return {"setup": label, "instances": len(ct), "receive_seconds": round(receive_s, 3),
            "instances_per_s": round(len(ct) / receive_s, 1), "studies": len(studies),
            "e2e_seconds": round(e2e_s, 2), "studies_per_min": round(len(studies) / e2e_s * 60, 1)}


def _per_study(nodes: list[NodeProcess], studies: list[list[Path]]) -> None:
    import threading

    groups = [[f for s in studies[i::2] for f in s] for i in range(2)]
    threads = [threading.Thread(target=push, args=(n.port, g, 1, "DICOMNODE")) for n, g in zip(nodes, groups)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args()
    os.environ.setdefault("DICOMNODE_ORT_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="dicomnode-scale-") as tmp:
        work = Path(tmp)
        ct = make_files(work / "ct", args.instances, 256, "CT", 1)
        server = Postgres(durable=True).start()
        rows = []
        try:
            for i, (label, n_nodes, pg) in enumerate(SETUPS):
                studies = [make_study(work / f"studies{i}" / str(k), 2, size=64, seed=1000 * (i + 1) + k)
                           for k in range(args.studies)]
                rows.append(run_setup(work / f"run{i}", label, n_nodes, server.new_database() if pg else None, ct, studies))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
