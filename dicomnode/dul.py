"""DICOM upper layer (PS3.8) and DIMSE command-set encoding shared by the node's acceptor and requestor.

:mod:`dicomnode.fastscp` (the receiver) and :mod:`dicomnode.fastscu` (the sender) both speak the
upper layer themselves on blocking sockets; this module holds what they have in common: PDU and
item framing, A-ASSOCIATE-RQ/AC encoding and decoding, P-DATA-TF framing, and DIMSE command sets,
which are always Implicit VR Little Endian (PS3.7 section 6.3.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1137.1"
IMPLEMENTATION_VERSION_NAME = "DICOMNODE"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

# DIMSE status codes (PS3.7 annex C, PS3.4 B.2.3)
SUCCESS = 0x0000
UNRECOGNIZED_OPERATION = 0x0211
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0xC211
OUT_OF_RESOURCES = 0xA700

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0000

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = frozenset({ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT})

# A-ABORT reasons from the service provider (PS3.8 9.3.8)
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0, 1, 2
ABORT_UNEXPECTED_PARAMETER, ABORT_INVALID_PARAMETER = 5, 6

# Presentation context results in the A-ASSOCIATE-AC (PS3.8 9.3.3.2)
CONTEXT_ACCEPTED = 0
CONTEXT_USER_REJECTION = 1
CONTEXT_NO_REASON = 2
CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")
ELEMENT = struct.Struct("<HHI")

RELEASE_RQ_PDU = bytes((RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0))
RELEASE_RP_PDU = bytes((RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))


class ProtocolError(Exception):
    """The peer broke the upper-layer or DIMSE protocol; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


def abort_pdu(reason: int = ABORT_NOT_SPECIFIED, source: int = 2) -> bytes:
    """An A-ABORT PDU; source 0 is the service user, 2 the service provider (PS3.8 9.3.8)."""
    return bytes((ABORT, 0, 0, 0, 0, 4, 0, 0, source, reason))


# -- items of association PDUs (PS3.8 9.3.2-9.3.4) ---------------------------------------------

def uid_text(raw: bytes | memoryview) -> str:
    """A UID or AE title from an item, without its padding."""
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace").strip()


def items(data: memoryview, pdu_name: str = "association PDU") -> Iterator[tuple[int, memoryview]]:
    """Yield (type, value) of consecutive items: type (1), reserved (1), length (2 bytes, big endian).

    Raises
    ------
    ProtocolError
        When an item header is truncated or an item overruns its parent.
    """
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 4:
            raise ProtocolError(f"truncated item header in {pdu_name}", ABORT_INVALID_PARAMETER)
        item_type = data[offset]
        length = struct.unpack_from(">H", data, offset + 2)[0]
        if offset + 4 + length > end:
            raise ProtocolError(f"item 0x{item_type:02x} overruns the {pdu_name}", ABORT_INVALID_PARAMETER)
        yield item_type, data[offset + 4: offset + 4 + length]
        offset += 4 + length


def item(item_type: int, value: bytes) -> bytes:
    """One item: type, reserved byte, 2-byte big-endian length, value."""
    return struct.pack(">BxH", item_type, len(value)) + value


def user_information(max_pdu: int) -> bytes:
    """The user information item: maximum length, our implementation class UID and version name."""
    return item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, IMPLEMENTATION_CLASS_UID.encode())
                + item(0x55, IMPLEMENTATION_VERSION_NAME.encode()))


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16)


def encode_associate_rq(called_ae: str, calling_ae: str, contexts: list[tuple[int, str, list[str]]],
                        max_pdu: int) -> bytes:
    """A-ASSOCIATE-RQ proposing ``(context id, abstract syntax, transfer syntaxes)`` contexts (PS3.8 9.3.2)."""
    parts = [item(0x10, APPLICATION_CONTEXT.encode())]
    for pcid, abstract, transfers in contexts:
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in transfers)
        parts.append(item(0x20, bytes((pcid, 0, 0, 0)) + sub))
    parts.append(user_information(max_pdu))
    body = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + bytes(32) + b"".join(parts)
    return PDU_HEADER.pack(ASSOCIATE_RQ, len(body)) + body


@dataclass(slots=True)
class AssociateAccept:
    """The parts of an A-ASSOCIATE-AC a requestor needs."""

    application_context: str = ""
    results: dict[int, tuple[int, str]] = field(default_factory=dict)  # context id -> (result, transfer syntax)
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""


def parse_associate_ac(body: bytes | memoryview) -> AssociateAccept:
    """Decode the variable part of an A-ASSOCIATE-AC PDU (everything after its 6-byte header).

    Raises
    ------
    ProtocolError
        When the PDU or one of its items is truncated.
    """
    body = memoryview(body)
    if len(body) < 68:
        raise ProtocolError(f"A-ASSOCIATE-AC of {len(body)} bytes is shorter than its fixed part", ABORT_INVALID_PARAMETER)
    ac = AssociateAccept()
    for item_type, value in items(body[68:], "A-ASSOCIATE-AC"):
        if item_type == 0x10:
            ac.application_context = uid_text(value)
        elif item_type == 0x21:
            if len(value) < 4:
                raise ProtocolError("presentation context item too short", ABORT_INVALID_PARAMETER)
            syntax = ""
            for sub_type, sub in items(value[4:], "A-ASSOCIATE-AC"):
                if sub_type == 0x40:
                    syntax = uid_text(sub)
            ac.results[value[0]] = (value[2], syntax)
        elif item_type == 0x50:
            for sub_type, sub in items(value, "A-ASSOCIATE-AC"):
                if sub_type == 0x51 and len(sub) >= 4:
                    ac.max_pdu = struct.unpack_from(">I", sub, 0)[0]
                elif sub_type == 0x52:
                    ac.implementation_class_uid = uid_text(sub)
                elif sub_type == 0x55:
                    ac.implementation_version_name = uid_text(sub)
    return ac


# -- DIMSE command sets (PS3.7 E.1, Implicit VR Little Endian) ------------------------------

def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """Element number -> raw value for a group 0000 command set.

    Raises
    ------
    ProtocolError
        When an element is truncated or outside group 0000.
    """
    fields: dict[int, bytes] = {}
    offset, end = 0, len(data)
    unpack = ELEMENT.unpack_from
    while offset < end:
        if end - offset < 8:
            raise ProtocolError("truncated element in the DIMSE command set", ABORT_INVALID_PARAMETER)
        group, element, length = unpack(data, offset)
        offset += 8
        if group != 0 or offset + length > end:
            raise ProtocolError("malformed DIMSE command set", ABORT_INVALID_PARAMETER)
        fields[element] = bytes(data[offset: offset + length])
        offset += length
    if 0x0100 not in fields:
        raise ProtocolError("DIMSE command set without CommandField (0000,0100)", ABORT_INVALID_PARAMETER)
    return fields


def uint(raw: bytes | None, size: int, default: int) -> int:
    """A little-endian unsigned value of a command element, or ``default`` when absent or short."""
    if raw is None or len(raw) < size:
        return default
    return int.from_bytes(raw[:size], "little")


def text(raw: bytes | None) -> str:
    """A command element's string value without padding."""
    return raw.rstrip(b"\x00 ").decode("ascii", "replace") if raw else ""


def element(number: int, value: bytes) -> bytes:
    """One group 0000 element, Implicit VR Little Endian."""
    return ELEMENT.pack(0, number, len(value)) + value


def padded(value: str, pad: bytes) -> bytes:
    """ASCII bytes of even length, padded with ``pad`` (NUL for UIDs, space for text)."""
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def _with_group_length(body: bytes) -> bytes:
    return element(0x0000, struct.pack("<I", len(body))) + body


def encode_command(command: int, message_id: int, status: int, sop_class: str, sop_instance: str = "",
                   comment: str = "") -> bytes:
    """A response command set: group length first, then ascending tags, Implicit VR Little Endian."""
    body = b""
    if sop_class:
        body += element(0x0002, padded(sop_class, b"\x00"))
    body += element(0x0100, struct.pack("<H", command))
    body += element(0x0120, struct.pack("<H", message_id))
    body += element(0x0800, struct.pack("<H", NO_DATA_SET))
    body += element(0x0900, struct.pack("<H", status))
    if comment:
        body += element(0x0902, padded(comment[:64], b" "))
    if sop_instance:
        body += element(0x1000, padded(sop_instance, b"\x00"))
    return _with_group_length(body)


def encode_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    """A C-STORE-RQ command set announcing a data set (PS3.7 9.3.1.1)."""
    return _with_group_length(
        element(0x0002, padded(sop_class, b"\x00"))
        + element(0x0100, struct.pack("<H", C_STORE_RQ))
        + element(0x0110, struct.pack("<H", message_id))
        + element(0x0700, struct.pack("<H", priority))
        + element(0x0800, struct.pack("<H", DATA_SET_PRESENT))
        + element(0x1000, padded(sop_instance, b"\x00")))


def encode_echo_rq(message_id: int) -> bytes:
    """A C-ECHO-RQ command set (PS3.7 9.3.5.1)."""
    return _with_group_length(
        element(0x0002, padded(VERIFICATION, b"\x00"))
        + element(0x0100, struct.pack("<H", C_ECHO_RQ))
        + element(0x0110, struct.pack("<H", message_id))
        + element(0x0800, struct.pack("<H", NO_DATA_SET)))


def encode_p_data(context_id: int, command: bytes, peer_max_pdu: int) -> bytes:
    """The command set as P-DATA-TF PDUs, split only when the peer's maximum PDU length is smaller."""
    chunk = len(command) if not peer_max_pdu else max(1, min(len(command), peer_max_pdu - 6))
    out = []
    for start in range(0, len(command), chunk):
        piece = command[start: start + chunk]
        mch = 0x03 if start + chunk >= len(command) else 0x01
        pdv = PDV_HEADER.pack(len(piece) + 2, context_id, mch) + piece
        out.append(PDU_HEADER.pack(P_DATA_TF, len(pdv)) + pdv)
    return b"".join(out)
