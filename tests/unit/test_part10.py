"""Part 10 file meta, written by the receiver and read back by the sender and at start-up."""

import io

import pydicom
import pytest

from dicomnode.dimse.part10 import file_header, read_file_meta


def test_file_header_reads_back_with_pydicom_and_ours(tmp_path):
    head = file_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", source_ae="PACS")
    path = tmp_path / "x.dcm"
    path.write_bytes(head)
    meta = read_file_meta(path)
    assert (meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax, meta.offset) == (
        "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", len(head))
    ds = pydicom.dcmread(io.BytesIO(head), force=True)
    assert ds.file_meta.SourceApplicationEntityTitle == "PACS"
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"


@pytest.mark.parametrize("tail", [
    b"\x02\x00\x01\x00OB\x00\x00",                     # a long VR whose length field is cut off (found by fuzzing)
    b"\x02\x00\x02\x00UI\x20\x00" + b"1.2",            # a value cut off
    b"\x02\x00\x02\x00u1\x02\x00" + b"1.",             # not Explicit VR
    b"",                                               # no UIDs at all
])
def test_damaged_file_meta_is_a_value_error(tmp_path, tail):
    path = tmp_path / "bad.dcm"
    path.write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\xe0\x00\x00\x00" + tail)
    with pytest.raises(ValueError):
        read_file_meta(path)
