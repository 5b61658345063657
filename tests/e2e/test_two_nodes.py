"""Two nodes sharing one PostgreSQL and one spool: studies pushed to both, one node killed mid-analysis.

Every study is analyzed exactly once (one job, done, its results committed once) and every result
reaches Orthanc once; a study whose instances arrive at both nodes is one study.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psycopg
import pytest

from tests.e2e.test_pipeline import BUNDLED, make_study
from tests.peers import NodeProcess, Orthanc, have_peers, storescu

pytestmark = [pytest.mark.postgres, pytest.mark.integration,
              pytest.mark.skipif(not have_peers(), reason="Orthanc/DCMTK/dicom3tools not installed")]

RULES = [{"name": "probe", "when": {"Modality": "CR"}, "analyzers": ["slow_probe"], "stable_after": 1}]
RESULT_MODALITIES = ("SR", "OT", "PR", "SEG")


def node_config(url: str, shared: Path) -> dict:
    return {
        "storage": {"data_dir": "data", "database": url, "shared_dir": str(shared)},
        "analyzers": {"device": "cpu", "plugins": ["tests.plugins.probe:SlowProbe"], "max_attempts": 3, "retry_delay": 0.5,
                      "lease": 4, "settings": {name: {"enabled": False} for name in BUNDLED}},
        "sender": {"backoff_initial": 1, "backoff_max": 2, "poll_interval": 0.25, "claim": 10},
    }


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_two_nodes_share_the_work_and_survive_one_being_killed(tmp_path, postgres):
    url = postgres.new_database()
    pacs = Orthanc(tmp_path / "pacs").start()
    nodes = [NodeProcess(tmp_path / f"node{i}", pacs=pacs, rules=RULES, config=node_config(url, tmp_path / "shared"))
             for i in range(2)]
    try:
        for n in nodes:
            n.start()
        studies = [make_study(tmp_path / "in" / str(i), 2, size=32, seed=100 + i) for i in range(20)]
        # study 0 arrives half at each node (a load balancer spreads associations); the rest alternate
        assert storescu(nodes[0].port, studies[0][:1]).returncode == 0
        assert storescu(nodes[1].port, studies[0][1:]).returncode == 0
        for i, files in enumerate(studies[1:], 1):
            r = storescu(nodes[i % 2].port, files)
            assert r.returncode == 0, r.stderr

        with psycopg.connect(url, autocommit=True) as db:
            # SIGKILL the node whose worker is running a job, while it runs
            victim = None
            deadline = time.monotonic() + 120
            while victim is None and time.monotonic() < deadline:
                for (worker,) in db.execute("SELECT worker FROM jobs WHERE state='running'"):
                    ppid = parent_of(int(worker.rsplit(":", 1)[1]))
                    victim = next((n for n in nodes if n.proc is not None and n.proc.pid == ppid), None)
                    if victim is not None:
                        break
                time.sleep(0.05)
            assert victim is not None, "no job was seen running"
            killed_job = db.execute("SELECT id FROM jobs WHERE state='running' AND worker=%s", (worker,)).fetchone()[0]
            victim.stop(signal.SIGKILL)
            survivor = nodes[1 - nodes.index(victim)]

            def settled() -> bool:
                states = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
                pending = db.execute("SELECT COUNT(*) FROM outbox WHERE state<>'sent'").fetchone()[0]
                return states == {"done": 20} and pending == 0

            survivor.wait_for(settled, 240, "every job done and every result sent")
            jobs = db.execute("SELECT study_uid, state, attempts, n_objects, id FROM jobs").fetchall()
            assert sorted(j[0] for j in jobs) == sorted(_study_uid(f[0]) for f in studies)  # one job per study
            assert dict((j[4], j[2]) for j in jobs)[killed_job] == 2  # cut off once, ran again on the survivor
            n_instances = dict(db.execute("SELECT study_uid, n_instances FROM studies").fetchall())
            assert n_instances == {_study_uid(f[0]): 2 for f in studies}  # study 0 is one study of two instances
            outbox = db.execute("SELECT sop_uid, destination, attempts FROM outbox").fetchall()
        expected = {j[0]: j[3] for j in jobs}
        assert sum(expected.values()) == len(outbox) and all(n >= 2 for n in expected.values())
        tags = pacs.wait_instances(lambda t: len([x for x in t if x.get("Modality") in RESULT_MODALITIES]) >= len(outbox), 60)
        results = [t for t in tags if t.get("Modality") in RESULT_MODALITIES]
        per_study: dict[str, int] = {}
        for t in results:
            per_study[t["StudyInstanceUID"]] = per_study.get(t["StudyInstanceUID"], 0) + 1
        assert per_study == expected  # one analysis per study reached the PACS, none twice
        assert sorted(t["SOPInstanceUID"] for t in results) == sorted(o[0] for o in outbox)
        events = [e.get("event") for n in nodes for e in n.log_events()]
        assert "job_lease_expired" in events
        print(json.dumps({"killed_job": killed_job, "results": len(results)}))
    finally:
        for n in nodes:
            n.stop()
        pacs.stop()


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
