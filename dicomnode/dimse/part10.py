"""DICOM Part 10 files (PS3.10 7.1): the preamble and file meta group, written and read without pydicom.

The node keeps every instance as it arrived: :func:`file_header` plus the data set bytes from
the wire is the spool file, and :func:`read_file_meta` finds where those bytes start again so
the sender can put them back on the wire unchanged.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .commands import padded
from .pdu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

# Explicit VRs whose value length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def _explicit(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    if vr in LONG_VRS:
        return struct.pack("<HH2sxxI", group, number, vr, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str = "") -> bytes:
    """128-byte preamble, ``DICM`` and the file meta information group, Explicit VR Little Endian."""
    meta = (_explicit(2, 0x0001, b"OB", b"\x00\x01")
            + _explicit(2, 0x0002, b"UI", padded(sop_class_uid, b"\x00"))
            + _explicit(2, 0x0003, b"UI", padded(sop_instance_uid, b"\x00"))
            + _explicit(2, 0x0010, b"UI", padded(transfer_syntax, b"\x00"))
            + _explicit(2, 0x0012, b"UI", padded(IMPLEMENTATION_CLASS_UID, b"\x00"))
            + _explicit(2, 0x0013, b"SH", padded(IMPLEMENTATION_VERSION_NAME, b" ")))
    if source_ae:
        meta += _explicit(2, 0x0016, b"AE", padded(source_ae[:16], b" "))
    return bytes(128) + b"DICM" + _explicit(2, 0x0000, b"UL", struct.pack("<I", len(meta))) + meta


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What sending or re-indexing a Part 10 file needs from its file meta group.

    Attributes
    ----------
    path : Path
        The file.
    sop_class_uid, sop_instance_uid, transfer_syntax : str
        (0002,0002), (0002,0003) and (0002,0010).
    offset : int
        Where the data set starts: the bytes from here to the end are the data set as encoded.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    offset: int


def read_file_meta(path: str | os.PathLike) -> FileMeta:
    """Parse the preamble and file meta group (always Explicit VR Little Endian) of a DICOM file.

    Raises
    ------
    ValueError
        When the file is not a DICOM Part 10 file or its meta group lacks a UID the node needs.
    OSError
        When the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16384)
        if len(head) < 132 or head[128:132] != b"DICM":
            raise ValueError(f"{path.name} is not a DICOM Part 10 file (no 'DICM' after the 128-byte preamble)")
        values: dict[int, bytes] = {}
        offset = 132
        while True:
            if len(head) - offset < 12:  # a long meta group (rare): read on
                more = f.read(65536)
                if more:
                    head += more
                    continue
            if len(head) - offset < 8:
                break
            group, number = struct.unpack_from("<HH", head, offset)
            if group != 2:
                break
            vr = head[offset + 4: offset + 6]
            if not vr.isalpha() or not vr.isupper():
                raise ValueError(f"{path.name} has a file meta group that is not Explicit VR Little Endian")
            if vr in LONG_VRS:
                if len(head) - offset < 12:
                    raise ValueError(f"{path.name} ends inside its file meta group")
                length = struct.unpack_from("<I", head, offset + 8)[0]
                start = offset + 12
            else:
                length = struct.unpack_from("<H", head, offset + 6)[0]
                start = offset + 8
            while len(head) < start + length:
                more = f.read(max(65536, start + length - len(head)))
                if not more:
                    raise ValueError(f"{path.name} ends inside its file meta group")
                head += more
            values[number] = head[start: start + length]
            offset = start + length

    def uid(number: int, keyword: str) -> str:
        value = values.get(number, b"").rstrip(b"\x00 ").decode("ascii", "replace").strip()
        if not value:
            raise ValueError(f"{path.name} has no {keyword} (0002,{number:04X}) in its file meta group")
        return value

    return FileMeta(path, uid(0x0002, "MediaStorageSOPClassUID"), uid(0x0003, "MediaStorageSOPInstanceUID"),
                    uid(0x0010, "TransferSyntaxUID"), offset)
