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
