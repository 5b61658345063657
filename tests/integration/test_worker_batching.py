"""The worker runs queued jobs of a batching analyzer together, and settles each job on its own."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from analyzers.phantoms import PhantomPatient, image_dataset

from dicomnode.uids import CR_IMAGE
from dicomnode.config import Config
from dicomnode.index import Index
from dicomnode.receiver import record_from
from dicomnode.registry import available_analyzers
from dicomnode.store import Store
from dicomnode.worker import Worker

# every installed analyzer, disabled where a test wants the probe alone
BUNDLED = tuple(available_analyzers())


def _config(tmp_path, batch_size: int) -> Config:
    return Config.model_validate({
        "storage": {"data_dir": str(tmp_path / "data")},
        "analyzers": {"device": "cpu", "plugins": ["tests.plugins.probe:BatchProbe", "tests.plugins.probe:IntensityProbe"],
                      "max_attempts": 2, "retry_delay": 3600, "batch_size": batch_size,
                      "settings": {name: {"enabled": False} for name in BUNDLED}},
    })


def _store_study(store: Store, seed: int, modality: str = "CR", description: str = "") -> str:
    rng = np.random.default_rng(seed)
    ds = image_dataset((rng.random((32, 32)) * 3000 + 500).astype(np.uint16), patient=PhantomPatient.make(rng, "batch", seed),
                       modality=modality, sop_class_uid=CR_IMAGE, series_description=description)
    path = store.spool_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    body = pydicom.filebase.DicomBytesIO()
    ds.save_as(body, enforce_file_format=True)
    data = body.getvalue()
    size = store.write_durably(path, data)
    Index(store).add(record_from(pydicom.dcmread(path), path, size))
    return str(ds.StudyInstanceUID)


@pytest.fixture()
def worker_and_studies(tmp_path):
    def make(batch_size: int):
        cfg = _config(tmp_path, batch_size)
        w = Worker(cfg)
        studies = [_store_study(w.store, 100 + i) for i in range(5)]
        studies.insert(2, _store_study(w.store, 200, modality="OT"))  # nothing this analyzer can use
        studies.insert(4, _store_study(w.store, 300, description="FAIL"))  # fails inside the batch
        for uid in studies:
            w.queue.enqueue(uid, "batch_probe", None, ["PACS"], [])
        return w, studies
    return make


def _states(w: Worker) -> dict[str, str]:
    return {j["study_uid"]: j["state"] for j in w.queue.list()}


def test_jobs_of_a_batching_analyzer_run_together(worker_and_studies):
    w, studies = worker_and_studies(3)
    assert w.run_one() and w.run_one() and w.run_one()
    probe = w.analyzer("batch_probe")
    # 7 jobs, 3 per claim: the OT study (third) is settled at select and never reaches its batch
    assert [len(b) for b in probe.batches] == [2, 3, 1]
    assert sorted(u for b in probe.batches for u in b) == sorted(s for k, s in enumerate(studies) if k != 2)
    states = _states(w)
    assert states[studies[2]] == "not_applicable"
    assert states[studies[4]] == "queued"  # failed once, retried alone later
    assert [states[s] for k, s in enumerate(studies) if k not in (2, 4)] == ["done"] * 5
    failed = next(j for j in w.queue.list() if j["study_uid"] == studies[4])
    assert failed["attempts"] == 1 and "told to fail" in failed["error"]
    outbox = w.store.db.execute("SELECT DISTINCT study_uid FROM outbox").fetchall()
    assert len(outbox) == 5
    # the retried job runs alone, not with a fresh job queued beside it, and parks after its last attempt
    w.store.db.execute("UPDATE jobs SET not_before=0 WHERE state='queued'")
    fresh = _store_study(w.store, 400)
    w.queue.enqueue(fresh, "batch_probe", None, ["PACS"], [])
    assert w.run_one()
    assert probe.batches[-1] == [studies[4]]
    assert _states(w)[studies[4]] == "failed"
    assert w.run_one()
    assert probe.batches[-1] == [fresh]
    assert not w.run_one()


def test_batch_size_one_and_plain_analyzers_run_one_job_at_a_time(worker_and_studies):
    w, studies = worker_and_studies(1)
    while w.run_one():
        pass
    assert all(len(b) == 1 for b in w.analyzer("batch_probe").batches)
    assert sum(s == "done" for s in _states(w).values()) == 5


def test_chest_studies_queued_together_are_analysed_in_one_batch(tmp_path):
    """The bundled chest analyzer batches: three studies, one batch, three sets of result objects."""
    from analyzers.chest_xray_thoracic import phantom

    cfg = Config.model_validate({
        "storage": {"data_dir": str(tmp_path / "data")},
        "analyzers": {"device": "cpu", "batch_size": 8,
                      "settings": {name: {"enabled": False} for name in BUNDLED if name != "chest_xray_thoracic"}},
    })
    w = Worker(cfg)
    studies = []
    for folder in phantom.write_phantoms(tmp_path / "ph", 3, seed=5801):
        path = next(folder.glob("*.dcm"))
        ds = pydicom.dcmread(path)
        spool = w.store.spool_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        size = w.store.write_durably(spool, path.read_bytes())
        w.index.add(record_from(ds, spool, size))
        studies.append(str(ds.StudyInstanceUID))
        w.queue.enqueue(studies[-1], "chest_xray_thoracic", None, ["PACS"], [])
    analyzer = w.analyzer("chest_xray_thoracic")
    calls = []
    original = analyzer.analyze_batch
    analyzer.analyze_batch = lambda batch: calls.append(len(batch)) or original(batch)
    assert w.run_one() and not w.run_one()
    assert calls == [3]
    assert set(_states(w).values()) == {"done"}
    per_study = dict(w.store.db.execute("SELECT study_uid, COUNT(*) FROM outbox GROUP BY study_uid").fetchall())
    assert set(per_study) == set(studies) and min(per_study.values()) >= 2  # SR and SEG at least
