"""Several nodes on one database: each job claimed once, leases, fenced finishes, outbox claims, one duty holder."""

import threading
import time

import pytest

from dicomnode.outbox import Outbox
from dicomnode.queue import JobQueue
from dicomnode.store import Store


def test_concurrent_claims_take_each_job_once(tmp_path, open_store):
    stores = [open_store(tmp_path / f"n{i}") for i in range(2)]
    queues = [JobQueue(s) for s in stores]
    for i in range(30):
        queues[0].enqueue(f"1.2.{i}", "x", "r", [], ["1.1"])
    taken: list[list[int]] = [[], [], [], []]

    def drain(k: int) -> None:
        q = JobQueue(stores[k % 2])  # threads of two "nodes", each thread its own connection
        while (job := q.claim()) is not None:
            taken[k].append(job.id)

    threads = [threading.Thread(target=drain, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = sorted(i for t in taken for i in t)
    assert ids == sorted(r["id"] for r in queues[0].list())
    assert len(ids) == len(set(ids)) == 30


def test_an_expired_lease_requeues_and_the_old_worker_cannot_finish(tmp_path, open_store):
    store = open_store(tmp_path / "d")
    queue = JobQueue(store, lease=30)
    job_id = queue.enqueue("1.2", "x", "r", ["pacs"], ["1.1"])
    job = queue.claim()
    assert queue.renew() == 1 and queue.expire() == []  # renewed: nobody takes it
    assert queue.expire(now=time.time() + 31) == [job_id]
    assert queue.get(job_id)["state"] == "queued"
    row = {"study_uid": "1.2", "destination": "pacs", "sop_uid": "9.9", "sop_class_uid": "1.2.840", "path": "/x"}
    assert queue.finish(job.id, [row], {"objects": 1}) is False  # the lease was lost: nothing written
    assert Outbox(store).list() == [] and queue.fail(job.id, "boom", worker="elsewhere:1") == "missing"
    store.db.execute("UPDATE jobs SET not_before=0")
    again = queue.claim()
    assert again.id == job_id and again.attempts == 2
    assert queue.finish(again.id, [row], {"objects": 1}) is True
    assert [r["sop_uid"] for r in Outbox(store).list()] == ["9.9"]


def test_outbox_rows_are_claimed_by_one_sender_until_the_claim_runs_out(tmp_path, open_store):
    store = open_store(tmp_path / "d")
    outbox = Outbox(store)
    with store.transaction() as db:
        rows = [{"study_uid": "1.2", "destination": d, "sop_uid": f"9.{i}", "sop_class_uid": "1.2.840", "path": "/x"}
                for i in range(5) for d in ("a", "b")]
        outbox.add(db, 1, rows, time.time())
        outbox.add(db, 1, rows, time.time())  # the same object for the same destination is queued once
    first = outbox.claim_due(limit=6, claim=60)
    second = outbox.claim_due(limit=100, claim=60)
    assert len(first) == 6 and len(second) == 4
    assert {r["id"] for r in first}.isdisjoint(r["id"] for r in second)
    assert outbox.claim_due(claim=60) == []
    outbox.mark_sent([r["id"] for r in first])
    later = outbox.claim_due(claim=60, now=time.time() + 61)  # the second sender died: its rows come back
    assert sorted(r["id"] for r in later) == sorted(r["id"] for r in second)


@pytest.mark.postgres
def test_one_node_holds_a_duty_and_another_takes_it_over(tmp_path, postgres):
    url = postgres.new_database()
    a, b = Store(tmp_path / "a", fsync=False, database=url), Store(tmp_path / "b", fsync=False, database=url)
    assert a.holds("assembler") and a.holds("assembler") and not b.holds("assembler")
    assert b.holds("retention") and not a.holds("retention")  # duties are independent
    a._duties["assembler"].close()  # the holder's session ends, as when its node dies
    assert b.holds("assembler")
    assert not a.holds("assembler") and not a.holds("assembler")


def test_sqlite_serves_one_node_which_holds_every_duty(tmp_path):
    assert Store(tmp_path / "d", fsync=False).holds("assembler")


def _node_config(tmp_path, database=None):
    import yaml

    from dicomnode.config import load_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "rules.yaml").write_text("[]\n")
    storage = {"data_dir": "data", **({"database": database} if database else {})}
    (tmp_path / "node.yaml").write_text(yaml.safe_dump({"storage": storage, "rules_file": "rules.yaml", "node": {"port": 0}}))
    return load_config(tmp_path / "node.yaml")


def test_a_partial_role_needs_a_shared_database(tmp_path):
    from dicomnode.service import Node

    with pytest.raises(ValueError, match="set storage.database"):
        Node(_node_config(tmp_path), role="worker")
    assert Node(_node_config(tmp_path)).workers  # all: as before


@pytest.mark.postgres
def test_roles_pick_the_stages(tmp_path, postgres):
    from dicomnode.service import Node

    url = postgres.new_database()
    receiver = Node(_node_config(tmp_path / "r", url), role="receiver")
    assert receiver.workers == [] and receiver.receiving and not receiver.sending
    worker = Node(_node_config(tmp_path / "w", url), role="worker")
    assert worker.workers and not worker.receiving and worker.sending


def test_retention_purges_finished_studies_and_keeps_open_work(tmp_path, open_store):
    from dicomnode.index import Index
    from dicomnode.retention import purge
    from tests.unit.test_cli_state import arrive, finished_job

    store = open_store(tmp_path / "d")
    old = time.time() - 40 * 86400
    done = arrive(store, 1, old)
    finished_job(store, done, sent=True, when=old)
    waiting = arrive(store, 2, old)
    finished_job(store, waiting, sent=False, when=old)  # its result not delivered yet
    recent = arrive(store, 3, time.time())
    report = purge(store, 30 * 86400.0)
    assert report.purged == [done] and set(report.kept) == {waiting} and "pending outbox row" in report.kept[waiting]
    assert report.files == 3  # two instances and the delivered result
    assert {s["study_uid"] for s in Index(store).studies()} == {waiting, recent}
    assert not (store.spool / done).exists() and (store.spool / waiting).is_dir()
