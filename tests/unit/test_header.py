"""The receiver's check of an arriving data set: header read, pixel bytes length-checked, never decoded.

Both readers are checked: the fast one (``read_header``) and pydicom's (``parse_dataset``), which
the fast one hands unusual data sets to; on real files both must give the same attributes.
"""

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from analyzers.phantoms import PhantomPatient, image_dataset

from dicomnode.uids import CR_IMAGE
from dicomnode import header as header_mod
from dicomnode.header import KEYWORDS, header_from_dataset, parse_dataset, read_header

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"

EXPLICIT = "1.2.840.10008.1.2.1"


def encoded(size=512, big_header=False):
    rng = np.random.default_rng(0)
    ds = image_dataset((rng.random((size, size)) * 4000).astype(np.uint16), patient=PhantomPatient.make(rng, "pd", 1),
                       modality="CR", sop_class_uid=CR_IMAGE)
    if big_header:
        ds.add_new(0x00091010, "LO", "x")  # a private block and a long text push PixelData past 64 KiB
        ds.ImageComments = "y" * 70000
    return ds, _bytes(ds)


def _bytes(ds, implicit=False, little=True):
    """The data set as it travels (Explicit VR Little Endian unless told), no file meta."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = little, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _fast(raw, ts):
    return read_header(raw, ts)


def _slow(raw, ts):
    return header_from_dataset(parse_dataset(raw, ts))


@pytest.mark.parametrize("reader", [_fast, _slow])
@pytest.mark.parametrize("big_header", [False, True])
def test_whole_data_set_parses_and_cut_one_is_refused(big_header, reader):
    ds, raw = encoded(big_header=big_header)
    parsed = reader(raw, EXPLICIT)
    assert parsed["SOPInstanceUID"] == ds.SOPInstanceUID and parsed["Rows"] == 512
    parse_dataset = reader
    with pytest.raises(ValueError, match="PixelData has"):
        parse_dataset(raw[:-1000], EXPLICIT)
    end_of_header = raw.index(b"\xe0\x7f\x10\x00")
    for cut in (201, 333, end_of_header - 3):  # inside an element of the header
        with pytest.raises(ValueError, match="cut short|ends inside"):
            parse_dataset(raw[:cut], EXPLICIT)
    with pytest.raises(ValueError, match="without its pixel data"):
        parse_dataset(raw[:end_of_header], EXPLICIT)


@pytest.mark.parametrize("reader", [_fast, _slow])
def test_encapsulated_pixels_need_their_delimiter(reader):
    ds, _ = encoded(size=64)
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00" * 100])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
    raw = _bytes(ds)
    assert reader(raw, "1.2.840.10008.1.2.4.90")["Rows"] == 64
    assert reader(memoryview(raw), "1.2.840.10008.1.2.4.90")["Rows"] == 64
    with pytest.raises(ValueError, match="no sequence delimiter"):
        reader(raw[:-8], "1.2.840.10008.1.2.4.90")


def rich_dataset():
    """Multi-valued strings and numbers, padding, sequences of defined and undefined length."""
    ds, _ = encoded(size=32)
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL "]
    ds.SeriesDescription = "T2 sag "
    ds.ConvolutionKernel = ["B30f", "sharp"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = "2.5"
    ds.EchoTime = " 102.4"
    ds.NumberOfFrames = "1"
    ds.StationName = ""
    item = Dataset()
    item.ReferencedSOPClassUID = CR_IMAGE
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D1100", "SRT", "Chest"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.AnatomicRegionSequence = Sequence([inner])
    ds["ReferencedImageSequence"].is_undefined_length = True
    item["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("implicit,little,ts", [(False, True, EXPLICIT), (True, True, "1.2.840.10008.1.2"),
                                                (False, False, "1.2.840.10008.1.2.2")])
@pytest.mark.parametrize("undefined_items", [False, True])
def test_fast_reader_matches_pydicom_without_falling_back(monkeypatch, implicit, little, ts, undefined_items):
    ds = rich_dataset()
    for item in ds.ReferencedImageSequence:
        item.is_undefined_length_sequence_item = undefined_items
    raw = _bytes(ds, implicit, little)
    expected = _slow(raw, ts)
    monkeypatch.setattr(header_mod, "_parse_with_pydicom", lambda *a: pytest.fail("fell back to pydicom"))
    got = read_header(raw, ts)
    assert got == expected
    assert got["ImageType"] == ["DERIVED", "SECONDARY", "AXIAL"] and got["SeriesDescription"] == "T2 sag"
    assert got["ImageOrientationPatient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] and got["EchoTime"] == 102.4
    assert got["NumberOfFrames"] == 1 and "StationName" not in got and got["Rows"] == 32
    with pytest.raises(ValueError, match="cut short|ends inside"):  # cut inside the nested sequences
        read_header(raw[:raw.index(b"T-D1100") + 3], ts)


def test_text_in_another_character_set_is_read_by_pydicom():
    ds, _ = encoded(size=32)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = "Thorax p.a. — Übersicht"
    ds.InstitutionName = "Klinikum Süd"
    raw = _bytes(ds)
    got = read_header(raw, EXPLICIT)
    assert got["SeriesDescription"] == "Thorax p.a. — Übersicht" and got["InstitutionName"] == "Klinikum Süd"
    assert got == _slow(raw, EXPLICIT)


def test_values_that_do_not_parse_are_left_to_pydicom():
    ds, _ = encoded(size=32)
    ds.add_new(0x00180050, "DS", "2.5")  # SliceThickness
    raw = bytearray(_bytes(ds))
    at = raw.index(b"2.5 ")
    raw[at:at + 4] = b"n/a "  # not a decimal string: pydicom keeps the text
    assert read_header(bytes(raw), EXPLICIT) == _slow(bytes(raw), EXPLICIT)


def _real_files():
    if not REALDATA.is_dir():
        return []
    return sorted(p for p in REALDATA.rglob("*") if p.is_file() and p.suffix not in (".json", ".md", ".txt", ".gz", ".png",
                                                                                        ".nrrd", ".mat", ".csv", ".py"))


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is not present")
def test_real_files_give_the_same_attributes_both_ways():
    compared = refused = 0
    for path in _real_files():
        raw = path.read_bytes()
        if raw[128:132] != b"DICM":
            continue
        meta_length = int.from_bytes(raw[140:144], "little")
        ds = dcmread(path)
        ts = str(ds.file_meta.TransferSyntaxUID)
        data = memoryview(raw)[144 + meta_length:]
        try:
            _slow(data, ts)
        except ValueError:  # a damaged file (one is cut short) is refused both ways
            with pytest.raises(ValueError):
                read_header(data, ts)
            refused += 1
            continue
        assert read_header(data, ts) == header_from_dataset(ds), path.name
        compared += 1
    assert compared >= 20 and refused <= 2
    assert set(KEYWORDS) >= {"SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Modality"}


@pytest.mark.parametrize("reader", [_fast, _slow])
@pytest.mark.parametrize("keyword, dtype, bits", [("FloatPixelData", "<f4", 32), ("DoubleFloatPixelData", "<f8", 64)])
def test_float_pixel_data_is_pixel_data(reader, keyword, dtype, bits):
    """Parametric maps carry (7FE0,0008) or (7FE0,0009) instead of (7FE0,0010): whole ones pass, cut ones do not."""
    rng = np.random.default_rng(4)
    ds = image_dataset((rng.random((32, 32)) * 4000).astype(np.uint16), patient=PhantomPatient.make(rng, "pf", 1),
                       modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.30")
    del ds.PixelData
    for kw in ("BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, kw)
    ds.BitsAllocated = bits
    setattr(ds, keyword, rng.random((32, 32)).astype(dtype).tobytes())
    raw = _bytes(ds)
    assert reader(raw, EXPLICIT)["BitsAllocated"] == bits
    with pytest.raises(ValueError, match="PixelData has"):
        reader(raw[:-100], EXPLICIT)
    assert reader(_bytes(ds, implicit=True), "1.2.840.10008.1.2")["Rows"] == 32
