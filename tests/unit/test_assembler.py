"""Study completion, re-opening by late instances, and the job queue, on a real SQLite index and on PostgreSQL."""

import time

import numpy as np
import pytest

from analyzers.phantoms import PhantomPatient, image_dataset

from dicomnode.uids import CR_IMAGE
from dicomnode.assembler import Assembler, RulesHolder
from dicomnode.config import Config
from dicomnode.index import Index
from dicomnode.queue import JobQueue
from dicomnode.receiver import record_from

RULES = """
- name: chest
  when: {Modality: {in: [CR, DX]}}
  analyzers: [chest_xray_thoracic]
  stable_after: 10
- name: ct
  when: {Modality: CT}
  analyzers: [ct_vertebral_fracture]
  stable_after: 5
  required_series:
    - {SeriesDescription: {regex: "(?i)bone"}}
"""


@pytest.fixture()
def env(tmp_path, open_store):
    (tmp_path / "rules.yaml").write_text(RULES)
    cfg = Config.model_validate({
        "storage": {"data_dir": str(tmp_path / "data")},
        "callers": [{"ae_title": "PACS", "destination": "pacs"}],
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}},
        "rules_file": str(tmp_path / "rules.yaml"),
        "assembly": {"stable_after": 30, "force_after": 100},
    })
    store = open_store(cfg.data_dir)
    queue = JobQueue(store)
    asm = Assembler(cfg, store, queue, RulesHolder(cfg.rules_path))
    pat = PhantomPatient.make(np.random.default_rng(0), "asm", 1)
    return cfg, store, queue, asm, pat


def arrive(store, pat, now, modality="CR", series_uid="1.2.3.1", description=""):
    ds = image_dataset(np.zeros((4, 4), np.uint16), patient=pat, modality=modality, sop_class_uid=CR_IMAGE,
                       series_uid=series_uid, series_description=description)
    Index(store).add(record_from(ds, store.spool / "x.dcm", 10, "PACS", "127.0.0.1"), now=now)
    return ds


def test_study_completes_after_rule_quiet_time_and_late_instance_reopens_only_its_series(env):
    cfg, store, queue, asm, pat = env
    arrive(store, pat, 1000.0, series_uid="1.2.3.1")
    arrive(store, pat, 1001.0, series_uid="1.2.3.2")
    assert asm.sweep(now=1010.0) == 0  # 9 s quiet < 10 s
    assert asm.sweep(now=1011.5) == 1
    jobs = queue.list()
    assert len(jobs) == 1 and jobs[0]["destinations"] == ["pacs"] and jobs[0]["series_uids"] == ["1.2.3.1", "1.2.3.2"]
    assert Index(store).study(pat.study_uid)["state"] == "complete"
    assert asm.sweep(now=1050.0) == 0  # nothing new

    job = queue.claim()
    queue.finish(job.id, [], {"objects": 0})
    arrive(store, pat, 1100.0, series_uid="1.2.3.2")  # late instance
    assert Index(store).study(pat.study_uid)["state"] == "receiving"
    assert asm.sweep(now=1111.0) == 1
    late = queue.list()[0]
    assert late["id"] != job.id and late["series_uids"] == ["1.2.3.2"]


def test_required_series_complete_early_and_forced_completion(env):
    cfg, store, queue, asm, pat = env
    arrive(store, pat, 1000.0, modality="CT", series_uid="1.2.4.1", description="soft tissue")
    assert asm.sweep(now=1002.0) == 0
    arrive(store, pat, 1002.0, modality="CT", series_uid="1.2.4.2", description="BONE 1mm")
    assert asm.sweep(now=1002.5) == 1  # required series present: no need to wait

    pat2 = PhantomPatient.make(np.random.default_rng(1), "asm", 2)
    for t in range(0, 120, 2):  # an instance every 2 s: never quiet for 10 s
        arrive(store, pat2, 2000.0 + t, series_uid="1.2.5.1")
        queued = asm.sweep(now=2000.0 + t + 1)
        if queued:
            break
    assert queued == 1 and t >= 100


def test_unmatched_series_are_closed_without_jobs(env):
    cfg, store, queue, asm, pat = env
    arrive(store, pat, 1000.0, modality="MR", series_uid="1.2.6.1")
    assert asm.sweep(now=1029.0) == 0
    assert Index(store).study(pat.study_uid)["state"] == "receiving"
    assert asm.sweep(now=1031.0) == 0
    assert Index(store).study(pat.study_uid)["state"] == "complete" and queue.list() == []


def test_queue_merges_pending_jobs_retries_with_backoff_then_parks(env):
    cfg, store, queue, asm, pat = env
    a = queue.enqueue("1.2", "x", "r", ["pacs"], ["1.1"])
    assert queue.enqueue("1.2", "x", "r", ["pacs"], ["1.3"]) == a
    assert queue.list()[0]["series_uids"] == ["1.1", "1.3"]
    job = queue.claim()
    assert queue.fail(job.id, "boom") == "queued"
    assert queue.claim() is None  # backing off
    for _ in range(2):
        store.db.execute("UPDATE jobs SET not_before=0")
        job = queue.claim()
        outcome = queue.fail(job.id, "boom")
    assert outcome == "failed" and queue.list(["failed"])[0]["error"] == "boom"
    assert queue.retry(job.id) and queue.claim().id == job.id


def test_running_jobs_are_requeued_after_a_crash(env):
    cfg, store, queue, asm, pat = env
    queue.enqueue("1.2", "x", "r", [], ["1.1"])
    queue.claim()
    if store.postgres:  # another node may be running it: recovered only once its lease has run out
        assert queue.recover() == 0
        store.db.execute("UPDATE jobs SET lease_until=?", (time.time() - 1,))
    assert queue.recover() == 1
    row = queue.list()[0]
    assert row["state"] == "queued" and "interrupted" in row["error"]


def test_broken_rules_file_keeps_the_working_rules(env, tmp_path):
    cfg, store, queue, asm, pat = env
    holder = asm.rules
    (tmp_path / "rules.yaml").write_text("- name: x\n  when: {Modalty: CT}\n  analyzers: [a]\n")
    import os
    os.utime(tmp_path / "rules.yaml", ns=(1, 10**18))
    assert holder.reload() is False
    assert [r.name for r in holder.rules] == ["chest", "ct"] and "Modalty" in holder.error
