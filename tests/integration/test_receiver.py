"""The receiver against real senders: DCMTK storescu/echoscu and a pynetdicom SCU for broken input."""

import copy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE

from analyzers.phantoms import PhantomPatient, image_dataset, save

from dicomnode.uids import CR_IMAGE, CT_IMAGE
from dicomnode.config import Config
from dicomnode.dimse.part10 import read_file_meta
from dicomnode.dimse.requestor import send_files
from dicomnode.index import Index
from dicomnode.receiver import Receiver
from dicomnode.store import Store
from tests.peers import echoscu, storescu, storescu_each_syntax

pytestmark = pytest.mark.integration


@pytest.fixture()
def node(tmp_path):
    cfg = Config.model_validate({
        "node": {"host": "127.0.0.1", "port": 0, "network_timeout": 10},
        "storage": {"data_dir": str(tmp_path / "data")},
        "callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}, {"ae_title": "ECHOSCU"}, {"ae_title": "PYSCU"}],
    })
    store = Store(cfg.data_dir)
    rx = Receiver(cfg, store)
    rx.start()
    yield rx, store
    rx.stop()


def spool_files(store):
    return sorted(store.spool.rglob("*.dcm"))


def phantom_files(folder: Path, n: int, modality="CT", size=64) -> list[Path]:
    rng = np.random.default_rng(7)
    pat = PhantomPatient.make(rng, "rx", 1)
    series = "1.2.826.0.1.3680043.10.1137.99.1"
    out = []
    for i in range(n):
        ds = image_dataset((rng.random((size, size)) * 4000).astype(np.uint16), patient=pat, modality=modality,
                           sop_class_uid=CT_IMAGE if modality == "CT" else CR_IMAGE, series_uid=series, instance_number=i + 1)
        out.append(save(ds, folder))
    return out


def test_storescu_study_is_stored_and_indexed(node, tmp_path):
    rx, store = node
    files = phantom_files(tmp_path / "in", 12)
    r = storescu(rx.port, files)
    assert r.returncode == 0, r.stderr
    stored = spool_files(store)
    assert len(stored) == 12
    study = Index(store).studies()[0]
    assert study["n_instances"] == 12 and study["calling_ae"] == "STORESCU" and study["mods"] == "CT"
    src = pydicom.dcmread(files[0])
    copy = pydicom.dcmread(store.spool / src.StudyInstanceUID / src.SeriesInstanceUID / f"{src.SOPInstanceUID}.dcm")
    assert copy.PixelData == src.PixelData and copy.PatientID == src.PatientID
    assert echoscu(rx.port).returncode == 0


def test_unknown_caller_is_rejected_at_association(node, tmp_path):
    rx, store = node
    files = phantom_files(tmp_path / "in", 1)
    r = storescu(rx.port, files, aet="INTRUDER")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr
    assert spool_files(store) == []


def _scu_store(port, ds_or_path, sop_class, ts="1.2.840.10008.1.2.1"):
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    status = assoc.send_c_store(ds_or_path)
    assoc.release()
    return status


def test_broken_input_gets_failure_status_and_leaves_no_file(node, tmp_path):
    rx, store = node
    good = pydicom.dcmread(phantom_files(tmp_path / "in", 1)[0])

    no_study = copy.deepcopy(good)
    del no_study.StudyInstanceUID
    status = _scu_store(rx.port, no_study, CT_IMAGE)
    assert status.Status == 0xC000 and "StudyInstanceUID" in status.ErrorComment

    bad_class = copy.deepcopy(good)
    bad_class.SOPClassUID = "1.2.840.10008.5.1.4.1.1.999"
    bad_class.file_meta.MediaStorageSOPClassUID = bad_class.SOPClassUID
    status = _scu_store(rx.port, bad_class, bad_class.SOPClassUID)
    assert status.Status == 0x0122

    truncated = tmp_path / "truncated.dcm"
    data = Path(good.filename).read_bytes()
    truncated.write_bytes(data[: len(data) - 3000])
    status = _scu_store(rx.port, truncated, CT_IMAGE)
    assert status.Status == 0xC000

    assert spool_files(store) == [] and list(store.tmp.iterdir()) == []
    assert echoscu(rx.port).returncode == 0  # still serving


def _dataset_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


def test_large_instances_are_written_while_they_arrive(node, tmp_path):
    rx, store = node
    opened = []
    real_incoming = store.incoming
    store.incoming = lambda *a, **k: opened.append(1) or real_incoming(*a, **k)
    files = phantom_files(tmp_path / "in", 3, modality="CR", size=1100)  # 2.4 MB each, above the 1 MiB mark
    r = storescu(rx.port, files)
    assert r.returncode == 0, r.stderr
    r = storescu(rx.port, files[:1])  # the same instance again replaces the stored one
    assert r.returncode == 0, r.stderr
    for f in files:
        src = pydicom.dcmread(f, stop_before_pixels=True)
        stored = store.spool / src.StudyInstanceUID / src.SeriesInstanceUID / f"{src.SOPInstanceUID}.dcm"
        assert _dataset_bytes(stored) == _dataset_bytes(f)
        assert pydicom.dcmread(stored).file_meta.SourceApplicationEntityTitle == "STORESCU"
    assert Index(store).studies()[0]["n_instances"] == 3
    assert len(opened) == 4

    truncated = tmp_path / "truncated.dcm"
    data = files[0].read_bytes()
    truncated.write_bytes(data[: len(data) - 5000])
    status = _scu_store(rx.port, truncated, CR_IMAGE)
    assert status.Status == 0xC000
    assert len(spool_files(store)) == 3 and list(store.tmp.iterdir()) == []


def test_real_world_files_are_accepted_byte_for_byte(node, realdata, tmp_path):
    rx, store = node
    picks = [
        "pydicom-data/data_store/data/RG1_J2KI.dcm",          # JPEG 2000 lossy, MONOCHROME1, CR
        "pydicom-data/data_store/data/693_J2KR.dcm",          # JPEG 2000 lossless CT
        "pydicom-data/data_store/data/eCT_Supplemental.dcm",  # enhanced multi-frame CT
        "pydicom-data/data_store/data/emri_small.dcm",        # enhanced MR
        "fo-dicom/Tests/FO-DICOM.Tests/Test Data/CR-MONO1-10-chest",  # no file meta
        "fo-dicom/Tests/FO-DICOM.Tests/Test Data/IM-0001-0001-0001.dcm",  # JPEG lossless
        "dcmqi/data/sr-example/sr.dcm",                       # TID 1500 SR
        "dcmqi/data/sr-example/seg.dcm",                      # SEG
    ]
    files = [realdata / p for p in picks]
    jpeg = tmp_path / "jpeg_baseline.dcm"  # JPEG baseline made by DCMTK from an 8-bit phantom
    rng = np.random.default_rng(3)
    ds8 = image_dataset((rng.random((128, 128)) * 255).astype(np.uint8), patient=PhantomPatient.make(rng, "rx", 2),
                        modality="CR", bits_stored=8)
    raw8 = save(ds8, tmp_path / "u8")
    if shutil.which("dcmcjpeg"):
        subprocess.run(["dcmcjpeg", "+eb", str(raw8), str(jpeg)], check=True, capture_output=True)
        files.append(jpeg)
    for r in storescu_each_syntax(rx.port, files):  # each file in its own transfer syntax, as a PACS sends
        assert r.returncode == 0, r.stderr
    assert len(spool_files(store)) == len(files)
    for f in files:
        src = pydicom.dcmread(f, force=True)
        copy = pydicom.dcmread(store.spool / src.StudyInstanceUID / src.SeriesInstanceUID / f"{src.SOPInstanceUID}.dcm")
        src_ts = getattr(getattr(src, "file_meta", None), "TransferSyntaxUID", None)
        if src_ts is not None and src_ts.is_compressed:
            assert copy.file_meta.TransferSyntaxUID == src_ts, f.name
            assert copy.PixelData == src.PixelData, f.name
        assert copy.SOPInstanceUID == src.SOPInstanceUID
        assert len(copy) == len(src), f.name
    assert {r["sop_class_uid"] for r in store.db.execute("SELECT sop_class_uid FROM instances")} >= {
        "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.2.1"}


def _whole_part10(path: Path) -> bool:
    """A Part 10 file pydicom reads, with the UIDs a stored instance needs."""
    try:
        raw = path.read_bytes()
        ds = pydicom.dcmread(path)
    except Exception:
        return False
    meta = getattr(ds, "file_meta", None)
    return (raw[128:132] == b"DICM" and meta is not None and "TransferSyntaxUID" in meta
            and all(kw in ds for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")))


def _variants(realdata: Path, folder: Path) -> list[Path]:
    """Encodings no file in ../shared/realdata has: big endian and deflated (by DCMTK), double float pixel data."""
    folder.mkdir()
    out = []
    for n, (flag, name) in enumerate((("+tb", "big_endian.dcm"), ("+td", "deflated.dcm"))):
        ct = pydicom.dcmread(realdata / "highdicom/data/test_files/ct_image.dcm")
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1137.99.65.{n}"
        ct.save_as(folder / f"source_{name}")
        if shutil.which("dcmconv"):
            subprocess.run(["dcmconv", flag, str(folder / f"source_{name}"), str(folder / name)], check=True,
                           capture_output=True)
            out.append(folder / name)
    ds = pydicom.dcmread(realdata / "pydicom-data/data_store/data/parametric_map_float.dcm")
    values = np.frombuffer(ds.FloatPixelData, dtype="<f4").astype("<f8")
    del ds.FloatPixelData
    ds.DoubleFloatPixelData = values.tobytes()
    ds.BitsAllocated = 64
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1137.99.64.1"
    ds.save_as(folder / "double_float.dcm", enforce_file_format=True)
    out.append(folder / "double_float.dcm")
    return out


def test_every_readable_realdata_file_is_accepted_in_its_own_syntax(node, realdata, tmp_path, record_property):
    """Strictness must never refuse a valid object: each file goes as it is, by the node's own requestor."""
    rx, store = node
    files = [p for p in sorted(realdata.rglob("*")) if p.is_file() and p.suffix in (".dcm", "") and _whole_part10(p)]
    files += _variants(realdata, tmp_path / "variants")
    by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in by_uid.values()}
    assert len(by_uid) >= 25 and "1.2.840.10008.1.2.4.90" in syntaxes
    if shutil.which("dcmconv"):
        assert {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"} <= syntaxes
    paths = list(by_uid.values())
    kept, errors, assoc_error = send_files("127.0.0.1", rx.port, "DICOMNODE", "STORESCU", paths, timeout=30)
    record_property("answer", f"{len(kept)} of {len(paths)} files in {len(syntaxes)} transfer syntaxes stored")
    assert assoc_error is None and errors == {}, {paths[i].name: e for i, e in errors.items()}
    assert len(kept) == len(paths)
    for uid, f in by_uid.items():
        src = pydicom.dcmread(f, stop_before_pixels=True)
        stored = store.spool / src.StudyInstanceUID / src.SeriesInstanceUID / f"{uid}.dcm"
        assert _dataset_bytes(stored) == f.read_bytes()[read_file_meta(f).offset:], f.name
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
