"""Metrics from several processes add up in one scrape; the summary `dicomnode status` shows reads the same files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from dicomnode.metrics import _quantile

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, config: Path) -> str:
    script = textwrap.dedent(f"""
        from dicomnode.config import load_config
        from dicomnode import metrics
        cfg = load_config({str(config)!r})
    """) + textwrap.dedent(code)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_counts_of_several_processes_add_up(tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text("storage: {data_dir: data}\nmetrics: {port: 9999}\ndestinations:\n  pacs: {ae_title: P, host: h, port: 1}\n")
    _run("""
        metrics.init(cfg, fresh=True)
        for _ in range(3):
            metrics.stored(0, 100)
        metrics.association("accepted")
        metrics.study_delivered("pacs", 0.3)
    """, config)
    _run("""
        metrics.init(cfg)
        metrics.stored(0xB007, 50)
        metrics.stored(0xC000, 10)
        metrics.association("rejected", "calling AE title not recognised")
        metrics.study_delivered("pacs", 0.7)
        metrics.worker_restarted()
    """, config)
    out = _run("""
        import json
        from dicomnode.index import Index
        from dicomnode.outbox import Outbox
        from dicomnode.queue import JobQueue
        from dicomnode.store import Store
        store = Store(cfg.data_dir)
        Index(store), JobQueue(store), Outbox(store)  # each owner makes its tables, as the node does
        print(json.dumps(metrics.summary(cfg)))
        print(metrics.scrape(cfg).decode())
    """, config)
    import json

    summary = json.loads(out.splitlines()[0])
    assert summary["instances_received"] == 4 and summary["bytes_received"] == 350
    assert summary["cstore_failures"] == {"0xC000": 1}
    assert summary["associations"] == {"accepted": 1, "rejected": 1}
    assert summary["worker_restarts"] == 1
    e2e = summary["study_to_delivery_seconds"]
    assert e2e["count"] == 2 and e2e["mean"] == 0.5 and 0.2 < e2e["p50"] <= 0.3 and 0.6 < e2e["p95"] <= 0.8
    assert "dicomnode_instances_received_total 4.0" in out
    assert 'dicomnode_outbox_pending{destination="pacs"} 0.0' in out  # from the index, for every destination


def test_quantile_interpolates_within_the_bucket():
    inf = float("inf")
    assert _quantile(0.5, {0.1: 0, 0.5: 10, 1.0: 20, inf: 20}) == 0.5
    assert _quantile(0.75, {0.1: 0, 0.5: 10, 1.0: 20, inf: 20}) == 0.75
    assert _quantile(0.5, {1.0: 0, inf: 4}) == 1.0  # beyond the last finite bound: that bound
    assert _quantile(0.5, {1.0: 0, inf: 0}) is None
