"""The receiver's check of an arriving data set: header parsed, pixel bytes length-checked, never decoded."""

import numpy as np
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from analyzers.phantoms import CR_IMAGE, PhantomPatient, image_dataset
from dicomnode.receiver import parse_dataset

EXPLICIT = "1.2.840.10008.1.2.1"


def encoded(size=512, big_header=False):
    rng = np.random.default_rng(0)
    ds = image_dataset((rng.random((size, size)) * 4000).astype(np.uint16), patient=PhantomPatient.make(rng, "pd", 1),
                       modality="CR", sop_class_uid=CR_IMAGE)
    if big_header:
        ds.add_new(0x00091010, "LO", "x")  # a private block and a long text push PixelData past 64 KiB
        ds.ImageComments = "y" * 70000
    return ds, _bytes(ds)


def _bytes(ds):
    """The data set as it travels: Explicit VR Little Endian, no file meta."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.mark.parametrize("big_header", [False, True])
def test_whole_data_set_parses_and_cut_one_is_refused(big_header):
    ds, raw = encoded(big_header=big_header)
    parsed = parse_dataset(raw, EXPLICIT)
    assert parsed.SOPInstanceUID == ds.SOPInstanceUID and "PixelData" not in parsed
    with pytest.raises(ValueError, match="PixelData has"):
        parse_dataset(raw[:-1000], EXPLICIT)
    end_of_header = raw.index(b"\xe0\x7f\x10\x00")
    for cut in (201, 333, end_of_header - 3):  # inside an element of the header
        with pytest.raises(ValueError, match="cut short|ends inside"):
            parse_dataset(raw[:cut], EXPLICIT)
    with pytest.raises(ValueError, match="without its pixel data"):
        parse_dataset(raw[:end_of_header], EXPLICIT)


def test_encapsulated_pixels_need_their_delimiter():
    ds, _ = encoded(size=64)
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00" * 100])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
    raw = _bytes(ds)
    assert parse_dataset(raw, "1.2.840.10008.1.2.4.90").Rows == 64
    with pytest.raises(ValueError, match="no sequence delimiter"):
        parse_dataset(raw[:-8], "1.2.840.10008.1.2.4.90")
