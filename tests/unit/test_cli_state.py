"""Admin commands that read or change the node's database, without a running node: status, jobs,
outbox, reprocess, purge, rule dry runs and model checks."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import structlog
import yaml

from dicomnode.analysis import Analyzer, ModelInfo, sha256_file
from analyzers.phantoms import PhantomPatient, image_dataset, save
from dicomnode.uids import CR_IMAGE, CT_IMAGE
from dicomnode.cli import main
from dicomnode.heartbeat import Heartbeat
from dicomnode.index import Index
from dicomnode.outbox import Outbox
from dicomnode.queue import JobQueue
from dicomnode.receiver import record_from
from dicomnode.registry import available_analyzers
from dicomnode.store import Store

DAY = 86400.0
RULES = [
    {"name": "lateral-chest", "when": {"all": [{"Modality": {"equals": "CR"}}, {"SeriesDescription": {"regex": "(?i)lat"}}]},
     "analyzers": ["intensity_probe"], "priority": 1},
    {"name": "any-cr", "when": {"Modality": {"in": ["CR", "DX"]}}, "analyzers": ["intensity_probe"], "destinations": ["archive"]},
]


class OnnxProbe(Analyzer):
    """A plugin whose one model is an ONNX file named in its options: checks run on real files."""

    name = "onnx_probe"
    version = "0.1"

    def models(self):
        o = self.settings.options
        if o.get("broken"):
            raise RuntimeError("registry entry unreadable")
        return [ModelInfo("identity", "3", o["sha256"], phantom_trained=False, path=o["file"])]

    def warmup(self):
        import onnxruntime as ort

        sess = ort.InferenceSession(self.settings.options["file"], providers=["CPUExecutionProvider"])
        sess.run(None, {"x": np.zeros((1, 2), np.float32)})


def identity_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture()
def site(tmp_path, monkeypatch):
    onnx_file = identity_onnx(tmp_path / "identity.onnx")
    cfg = {
        "storage": {"data_dir": "data"},
        "callers": [{"ae_title": "PACS", "host": "127.0.0.1", "destination": "pacs"}],
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
                         "archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243}},
        "rules_file": "rules.yaml",
        "analyzers": {"device": "cpu", "plugins": ["tests.plugins.probe:IntensityProbe", "tests.unit.test_cli_state:OnnxProbe"],
                      "settings": {**{name: {"enabled": False} for name in available_analyzers()},
                                   "onnx_probe": {"options": {"file": str(onnx_file), "sha256": sha256_file(onnx_file)}}}},
        "node": {"fsync": False},
    }
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(RULES, sort_keys=False))
    monkeypatch.setenv("DICOMNODE_CONFIG", str(tmp_path / "node.yaml"))
    return tmp_path


@pytest.fixture(autouse=True)
def _default_logging():
    yield
    structlog.reset_defaults()  # the CLI configured logging for its process; other tests expect the defaults


def run(capsys, *argv):
    capsys.readouterr()  # only this command's output
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def arrive(store: Store, seed: int, when: float, modality="CR", description="", n=2):
    """Index a study with real spool files, arrived at ``when``."""
    pat = PhantomPatient.make(np.random.default_rng(seed), "adm", seed)
    series_uid = f"1.2.826.0.1.3680043.10.1137.88.{seed}.1"
    for i in range(n):
        ds = image_dataset(np.full((8, 8), 100 * (i + 1), np.uint16), patient=pat, modality=modality,
                           sop_class_uid=CR_IMAGE if modality == "CR" else CT_IMAGE, series_uid=series_uid,
                           instance_number=i + 1, series_description=description)
        path = store.spool_path(str(ds.StudyInstanceUID), series_uid, str(ds.SOPInstanceUID))
        save(ds, path.parent, path.name)
        Index(store).add(record_from(ds, path, path.stat().st_size, "PACS", "127.0.0.1"), now=when)
    return pat.study_uid


def finished_job(store: Store, study_uid: str, sent: bool, when: float) -> int:
    q = JobQueue(store)
    job = q.enqueue(study_uid, "intensity_probe", "any-cr", ["pacs"], [], priority=0)  # ahead of any queued job
    assert q.claim().id == job
    out = store.results / str(job)
    out.mkdir(parents=True)
    (out / "1.2.3.dcm").write_bytes(b"result")
    q.finish(job, [{"study_uid": study_uid, "destination": "pacs", "sop_uid": f"1.2.3.{job}", "sop_class_uid": "1.2",
                    "path": str(out / "1.2.3.dcm")}], {"objects": 1})
    if sent:
        Outbox(store).mark_sent([r["id"] for r in Outbox(store).list() if r["job_id"] == job])
    store.db.execute("UPDATE jobs SET created_at=?, finished_at=? WHERE id=?", (when, when, job))
    return job


def test_status_says_whether_the_node_is_up(site, capsys):
    code, out, _ = run(capsys, "status")
    assert code == 1 and "never run" in out
    store = Store(site / "data", fsync=False)
    code, out, _ = run(capsys, "status")
    assert code == 1 and "never run" in out
    Heartbeat(store).set("node", {"pid": os.getpid(), "started_at": time.time() - 10, "port": 11112, "ae_title": "DICOMNODE",
                              "state": "running"})
    Heartbeat(store).set("receiver", {"associations": 2, "stored": 7})
    Heartbeat(store).set("last_error", {"job": 4, "error": "the worker process died while running this job"})
    JobQueue(store).enqueue("1.2.3", "intensity_probe", "r", ["pacs"], [])
    code, out, _ = run(capsys, "status")
    assert code == 0, out
    assert out.startswith("up:") and "2 open" in out and "1 queued" in out and "worker process died" in out and "2 rules" in out
    code, out, _ = run(capsys, "status", "--json")
    s = json.loads(out)
    assert s["up"] and s["associations"] == 2 and s["jobs"] == {"queued": 1} and s["last_error"]["job"] == 4

    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    Heartbeat(store).set("node", {"pid": dead, "started_at": time.time() - 10, "port": 11112, "state": "running"})
    code, out, _ = run(capsys, "status")
    assert code == 1 and out.startswith("DOWN:") and f"process {dead} is gone" in out
    Heartbeat(store).set("node", {"pid": os.getpid(), "state": "stopped", "stopped_at": time.time()})
    code, out, _ = run(capsys, "status")
    assert code == 1 and "stopped" in out
    (site / "rules.yaml").write_text("- name: x\n  when: {Modality: {equal: CR}}\n  analyzers: [intensity_probe]\n")
    code, out, _ = run(capsys, "status", "--json")
    assert "INVALID" in json.loads(out)["rules"] and "equal" in json.loads(out)["rules"]


def test_jobs_retry_and_outbox_resend(site, capsys):
    store = Store(site / "data", fsync=False)
    q = JobQueue(store, max_attempts=1)
    job = q.enqueue("1.2.3", "intensity_probe", "r", ["pacs"], [])
    q.claim()
    q.fail(job, "RuntimeError: boom")
    queued = q.enqueue("1.2.4", "intensity_probe", "r", ["pacs"], [])

    code, out, _ = run(capsys, "jobs", "--state", "failed", "--json")  # the old form, no verb
    assert code == 0 and [j["id"] for j in json.loads(out)] == [job]
    code, out, _ = run(capsys, "jobs", "list", "--state", "failed,queued", "--json")
    assert code == 0 and {j["id"] for j in json.loads(out)} == {job, queued}
    code, out, _ = run(capsys, "jobs", "--json", "list")
    assert code == 0 and len(json.loads(out)) == 2
    code, _, err = run(capsys, "jobs", "--state", "faild")
    assert code == 2 and "unknown state 'faild'" in err
    code, out, _ = run(capsys, "jobs", "retry", str(job))
    assert code == 0 and "queued again" in out and "takes effect when it starts" in out
    assert q.list(["queued"])[-1]["id"] == job and q.list(["queued"])[-1]["attempts"] == 0
    code, _, err = run(capsys, "jobs", "retry", str(queued))
    assert code == 1 and "is queued" in err
    code, _, err = run(capsys, "jobs", "retry", "999")
    assert code == 1 and "no job 999" in err

    done = finished_job(store, "1.2.5", sent=False, when=time.time())
    box = Outbox(store, max_attempts=1)
    row = box.list()[0]["id"]
    box.mark_failed([row], "association with PACS failed")
    code, out, _ = run(capsys, "outbox", "--state", "failed", "--json")
    assert code == 0 and json.loads(out)[0]["job_id"] == done
    code, out, _ = run(capsys, "outbox", "resend", "--failed")
    assert code == 0 and out.startswith("1 object to send again")
    assert box.list()[0]["state"] == "pending"
    assert run(capsys, "outbox", "resend", str(row))[0] == 0
    code, _, err = run(capsys, "outbox", "resend", "42")
    assert code == 1 and "no outbox row 42" in err
    assert run(capsys, "outbox", "resend")[0] == 2
    assert run(capsys, "outbox", "resend", str(row), "--failed")[0] == 2


def test_reprocess_queues_jobs_by_the_rules_or_one_analyzer(site, capsys):
    store = Store(site / "data", fsync=False)
    lat = arrive(store, 1, time.time(), description="Chest LAT")
    ct = arrive(store, 2, time.time(), modality="CT")
    code, out, err = run(capsys, "studies", "reprocess", lat, "--json")
    assert code == 0, err
    planned = json.loads(out)
    assert len(planned) == 1 and planned[0]["analyzer"] == "intensity_probe" and planned[0]["rules"] == ["lateral-chest"]
    job = JobQueue(store).list()[0]
    assert job["id"] == planned[0]["job"] and job["state"] == "queued" and job["destinations"] == ["pacs"] and job["priority"] == 1

    code, _, err = run(capsys, "studies", "reprocess", ct)
    assert code == 3 and "no rule matches" in err and "rules test --study" in err
    code, out, err = run(capsys, "studies", "reprocess", ct, "--analyzer", "intensity_probe", "--destination", "archive")
    assert code == 0, err
    assert "-> archive" in out
    assert JobQueue(store).list()[0]["study_uid"] == ct and JobQueue(store).list()[0]["destinations"] == ["archive"]
    assert run(capsys, "studies", "reprocess", ct, "--analyzer", "nope")[0] == 2
    assert run(capsys, "studies", "reprocess", ct, "--analyzer", "intensity_probe", "--destination", "nowhere")[0] == 2
    code, _, err = run(capsys, "studies", "reprocess", "1.2.3.4")
    assert code == 1 and "no study 1.2.3.4" in err


def test_purge_removes_old_finished_studies_and_keeps_open_work(site, capsys):
    store = Store(site / "data", fsync=False)
    now = time.time()
    old_done = arrive(store, 10, now - 40 * DAY)
    job_done = finished_job(store, old_done, sent=True, when=now - 40 * DAY)
    old_pending = arrive(store, 11, now - 40 * DAY)
    finished_job(store, old_pending, sent=False, when=now - 40 * DAY)
    old_queued = arrive(store, 12, now - 40 * DAY)
    JobQueue(store).enqueue(old_queued, "intensity_probe", "r", ["pacs"], [])
    recent = arrive(store, 13, now - 2 * DAY)
    spool_files = {uid: list((store.spool / uid).rglob("*.dcm")) for uid in (old_done, old_pending, old_queued, recent)}
    assert all(len(f) == 2 for f in spool_files.values())

    code, out, _ = run(capsys, "studies", "purge", "--older-than", "30d", "--dry-run", "--json")
    report = json.loads(out)
    assert code == 0 and report["purged"] == [old_done] and report["files_removed"] == 3
    assert all(p.exists() for files in spool_files.values() for p in files)  # a dry run deletes nothing
    code, out, _ = run(capsys, "studies", "purge", "--dry-run", "--json")  # default: storage.retention_days (30)
    assert code == 0 and json.loads(out)["purged"] == [old_done]

    code, out, _ = run(capsys, "studies", "purge", "--older-than", "30d")
    assert code == 0 and out.startswith("purged 1 study") and "kept 2" in out
    assert "1 pending outbox row" in out and "1 queued job" in out
    assert Index(store).study(old_done) is None and not (store.spool / old_done).exists()
    assert not (store.results / str(job_done)).exists()
    assert store.db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?", (old_done,)).fetchone()[0] == 0
    assert store.db.execute("SELECT COUNT(*) FROM jobs WHERE study_uid=?", (old_done,)).fetchone()[0] == 0
    for uid in (old_pending, old_queued, recent):
        assert Index(store).study(uid) is not None and all(p.exists() for p in spool_files[uid])

    code, out, _ = run(capsys, "studies", "purge", "--older-than", "1h", "--json")
    assert json.loads(out)["purged"] == [recent]
    assert run(capsys, "studies", "purge", "--older-than", "soon")[0] == 2
    code, out, _ = run(capsys, "studies", "--json")  # the old form, no verb
    assert {s["study_uid"] for s in json.loads(out)} == {old_pending, old_queued}


def test_rules_test_explains_matches_and_queues_nothing(site, capsys, tmp_path):
    lat = [save(image_dataset(np.zeros((8, 8), np.uint16), patient=PhantomPatient.make(np.random.default_rng(3), "t", 3),
                              modality="CR", sop_class_uid=CR_IMAGE, series_description="Thorax lat"), tmp_path / "files")]
    ct = [save(image_dataset(np.zeros((8, 8), np.uint16), patient=PhantomPatient.make(np.random.default_rng(4), "t", 4),
                             modality="CT", sop_class_uid=CT_IMAGE), tmp_path / "files")]
    (tmp_path / "files" / "notes.bin").write_bytes(b"not dicom")
    code, out, err = run(capsys, "rules", "test", str(tmp_path / "files"), "--calling-ae", "PACS")
    assert code == 0, err
    assert "notes.bin" in err
    assert "MATCH     lateral-chest: Modality='CR' equals 'CR' and SeriesDescription='Thorax lat' matches /(?i)lat/" in out
    assert "skipped   any-cr: an earlier rule 'lateral-chest' matched without continue (its own condition holds too)" in out
    assert "no match  lateral-chest: Modality='CT' is not 'CR'" in out
    assert "no match  any-cr: Modality='CT' not in ['CR', 'DX']" in out
    assert "-> intensity_probe -> pacs (rule lateral-chest)" in out and "would queue nothing" in out

    code, out, _ = run(capsys, "rules", "test", str(lat[0]), str(ct[0]), "--json")
    studies = {s["series"][0]["modality"]: s for s in json.loads(out)}
    assert studies["CR"]["would_queue"][0]["analyzer"] == "intensity_probe"
    assert studies["CR"]["would_queue"][0]["destinations"] == []  # no calling AE given: its destination is unknown
    assert studies["CT"]["would_queue"] == [] and [d["outcome"] for d in studies["CT"]["series"][0]["decisions"]] == ["no match"] * 2

    store = Store(site / "data", fsync=False)
    uid = arrive(store, 5, time.time(), description="PA")
    code, out, err = run(capsys, "rules", "test", "--study", uid)
    assert code == 0, err
    assert "no match  lateral-chest: SeriesDescription='PA' does not match /(?i)lat/" in out
    assert "MATCH     any-cr" in out and "-> intensity_probe -> archive (rule any-cr)" in out
    assert JobQueue(store).list() == []  # a dry run
    assert run(capsys, "rules", "test")[0] == 2

    candidate = tmp_path / "candidate.yaml"  # try a rules file before installing it
    candidate.write_text(yaml.safe_dump([dict(RULES[0], enabled=False),
                                         {"name": "cr-other", "when": {"Modality": "CR"}, "analyzers": ["not_installed"]}]))
    code, out, _ = run(capsys, "rules", "test", str(lat[0]), "--rules", str(candidate))
    assert code == 0 and f"dry run of {candidate}" in out
    assert "skipped   lateral-chest: the rule is disabled" in out
    assert "not_installed is not installed or is disabled: it would not run" in out
    assert "would queue nothing: the matching rules name analyzers this node does not have" in out
    assert run(capsys, "rules", "test", "--study", "1.2.3")[0] == 1


def test_models_list_and_verify(site, capsys):
    code, out, err = run(capsys, "models", "list", "--json")
    rows = {r["analyzer"]: r for r in json.loads(out)}
    assert code == 0, err
    assert set(rows) == {"intensity_probe", "onnx_probe"}
    assert rows["intensity_probe"]["phantom_trained"] is True and rows["intensity_probe"]["device"] == "cpu"
    assert rows["onnx_probe"]["sha256"] == sha256_file(site / "identity.onnx") and rows["onnx_probe"]["version"] == "3"
    code, out, _ = run(capsys, "models", "list")
    assert "yes (not for clinical use)" in out and "identity" in out

    code, out, _ = run(capsys, "models", "verify", "--json")
    checks = {r["analyzer"]: r for r in json.loads(out)}
    assert code == 0 and all(r["ok"] for r in checks.values())
    assert checks["onnx_probe"]["models"][0] == {"model": "identity", "version": "3", "sha256": "ok", "onnx": "loads"}
    assert checks["onnx_probe"]["warmup_seconds"] is not None

    cfg = yaml.safe_load((site / "node.yaml").read_text())
    cfg["analyzers"]["settings"]["onnx_probe"]["options"]["sha256"] = "0" * 64
    (site / "node.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = run(capsys, "models", "verify", "--analyzer", "onnx_probe")
    assert code == 1 and "FAILED onnx_probe" in out and "sha256 MISMATCH" in out

    (site / "identity.onnx").write_bytes(b"not a model")
    cfg["analyzers"]["settings"]["onnx_probe"]["options"]["sha256"] = sha256_file(site / "identity.onnx")
    (site / "node.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = run(capsys, "models", "verify", "--analyzer", "onnx_probe")
    assert code == 1 and "onnx FAILED" in out

    cfg["analyzers"]["settings"]["onnx_probe"]["options"]["broken"] = True
    (site / "node.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = run(capsys, "models", "list", "--json")
    broken = [r for r in json.loads(out) if r["analyzer"] == "onnx_probe"][0]
    assert code == 0 and "registry entry unreadable" in broken["error"]
    code, out, _ = run(capsys, "models", "verify")
    assert code == 1 and "cannot load the analyzer" in out and "ok     intensity_probe" in out
    assert run(capsys, "models", "verify", "--analyzer", "nope")[0] == 2
