"""The spool's durable writes and start-up reconciliation."""

import numpy as np
import pydicom
import pytest

from analyzers.phantoms import PhantomPatient, image_dataset, save

from dicomnode.index import Index
from dicomnode.receiver import reindex_file
from dicomnode.store import Store
from dicomnode.uids import CT_IMAGE


def test_write_durably_creates_and_replaces(tmp_path):
    store = Store(tmp_path / "d")
    target = store.spool_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert store.write_durably(target, (b"abc", memoryview(b"def"))) == 6
    assert target.read_bytes() == b"abcdef"
    store.write_durably(target, b"replaced")  # a re-sent instance replaces the old one atomically
    assert target.read_bytes() == b"replaced" and list(store.tmp.iterdir()) == []


def test_reconcile_indexes_whole_files_and_quarantines_cut_ones(tmp_path):
    store = Store(tmp_path / "d", fsync=False)
    rng = np.random.default_rng(0)
    pat = PhantomPatient.make(rng, "st", 1)
    files = []
    for i in range(3):
        ds = image_dataset((rng.random((32, 32)) * 1000).astype(np.uint16), patient=pat, modality="CT",
                           sop_class_uid=CT_IMAGE, series_uid="1.2.9.1", instance_number=i + 1)
        src = save(ds, tmp_path / "src")
        dst = store.spool_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        data = src.read_bytes()
        store.write_durably(dst, data if i < 2 else data[:-500])  # the third was cut off mid-write
        files.append(dst)
    assert Index(store).reconcile(reindex_file) == 2
    assert Index(store).studies()[0]["n_instances"] == 2
    assert not files[2].exists() and (store.data_dir / "quarantine" / files[2].name).exists()
    assert Index(store).reconcile(reindex_file) == 0
    assert pydicom.dcmread(files[0]).SOPInstanceUID == files[0].stem


def test_each_owner_migrates_its_own_tables_once_and_a_newer_database_is_refused(tmp_path, open_store):
    store = open_store(tmp_path / "d")
    store.migrate("probe", ("CREATE TABLE probe (a INTEGER)",))
    again = open_store(tmp_path / "d")  # another process opening the same database, one step later
    again.migrate("probe", ("CREATE TABLE probe (a INTEGER)", "ALTER TABLE probe ADD COLUMN b TEXT"))
    again.migrate("probe", ("CREATE TABLE probe (a INTEGER)", "ALTER TABLE probe ADD COLUMN b TEXT"))
    again.db.execute("INSERT INTO probe VALUES (1, 'x')")
    assert list(dict(again.db.execute("SELECT * FROM probe").fetchone())) == ["a", "b"]
    Index(again)
    assert dict(again.db.execute("SELECT owner, version FROM schema_versions").fetchall()) == {"probe": 2, "index": 1}
    again.db.execute("UPDATE schema_versions SET version=2 WHERE owner='index'")
    with pytest.raises(RuntimeError, match="newer than this dicomnode knows"):
        Index(open_store(tmp_path / "d"))


def _instance(tmp_path, store, study_uid: str, series_uid: str, sop_uid: str):
    rng = np.random.default_rng(1)
    ds = image_dataset((rng.random((32, 32)) * 1000).astype(np.uint16), patient=PhantomPatient.make(rng, "mv", 1),
                       modality="CT", sop_class_uid=CT_IMAGE, series_uid=series_uid)
    ds.StudyInstanceUID, ds.SOPInstanceUID = study_uid, sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    data = save(ds, tmp_path / "src" / study_uid).read_bytes()
    dst = store.spool_path(study_uid, series_uid, sop_uid)
    store.write_durably(dst, data)
    return dst


def _counts(index: Index) -> dict[str, int]:
    return {s["study_uid"]: s["n_instances"] for s in index.studies()}


def test_an_instance_resent_under_another_study_moves_there_and_stays_after_restarts(tmp_path, open_store):
    store = open_store(tmp_path / "d")
    index = Index(store)
    old = _instance(tmp_path, store, "1.2.9.10", "1.2.9.10.1", "1.2.9.10.1.1")
    keep = _instance(tmp_path, store, "1.2.9.10", "1.2.9.10.1", "1.2.9.10.1.2")
    index.add(reindex_file(old))
    index.add(reindex_file(keep))
    new = _instance(tmp_path, store, "1.2.9.20", "1.2.9.20.1", "1.2.9.10.1.1")  # the same SOP Instance UID, another study
    index.add(reindex_file(new))
    assert not old.exists() and new.exists() and keep.exists()
    assert _counts(index) == {"1.2.9.10": 1, "1.2.9.20": 1}
    assert [s["n_instances"] for s in index.series_of("1.2.9.10")] == [1]
    for _ in range(2):  # each restart reconciles the spool: nothing flips back
        assert Index(open_store(tmp_path / "d")).reconcile(reindex_file) == 0
        assert _counts(index) == {"1.2.9.10": 1, "1.2.9.20": 1}
        assert index.store.db.execute("SELECT study_uid FROM instances WHERE sop_uid='1.2.9.10.1.1'").fetchone()[0] == "1.2.9.20"

    # a crash after the move was committed but before the old file went: the restart removes the stale copy
    stale = _instance(tmp_path, store, "1.2.9.10", "1.2.9.10.1", "1.2.9.10.1.1")
    assert Index(open_store(tmp_path / "d")).reconcile(reindex_file) == 0
    assert not stale.exists() and new.exists()
    assert _counts(index) == {"1.2.9.10": 1, "1.2.9.20": 1}


def test_an_instance_moved_out_of_a_one_instance_study_removes_the_empty_study(tmp_path, open_store):
    store = open_store(tmp_path / "d")
    index = Index(store)
    index.add(reindex_file(_instance(tmp_path, store, "1.2.9.30", "1.2.9.30.1", "1.2.9.30.1.1")))
    index.add(reindex_file(_instance(tmp_path, store, "1.2.9.30", "1.2.9.30.2", "1.2.9.30.1.1")))  # another series, same study
    assert _counts(index) == {"1.2.9.30": 1}
    assert [s["series_uid"] for s in index.series_of("1.2.9.30")] == ["1.2.9.30.2"]
    index.add(reindex_file(_instance(tmp_path, store, "1.2.9.40", "1.2.9.40.1", "1.2.9.30.1.1")))
    assert _counts(index) == {"1.2.9.40": 1}


def test_spool_files_folders_and_the_database_are_owner_only(tmp_path):
    data = tmp_path / "d"
    data.mkdir(mode=0o755)
    store = Store(data)
    path = _instance(tmp_path, store, "1.2.9.50", "1.2.9.50.1", "1.2.9.50.1.1")
    Index(store).add(reindex_file(path))
    store.write_durably(path, path.read_bytes())  # a replaced file keeps the mode
    incoming = store.incoming(b"")
    assert (incoming.path.stat().st_mode & 0o777) == 0o600
    incoming.close()
    store.quarantine(_instance(tmp_path, store, "1.2.9.50", "1.2.9.50.1", "1.2.9.50.1.2"))
    files = [p for p in data.rglob("*") if p.is_file()]
    folders = [data, *(p for p in data.rglob("*") if p.is_dir())]
    assert {store.db_path, path} <= set(files) and any(p.name.endswith("-wal") for p in files)
    assert {p.relative_to(data).as_posix(): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o077} == {}
    assert {p.relative_to(data).as_posix(): oct(p.stat().st_mode & 0o777) for p in folders if p.stat().st_mode & 0o077} == {}
