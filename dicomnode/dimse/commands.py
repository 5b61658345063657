"""DIMSE command sets (PS3.7 9.3, E.1): group 0000 elements, always Implicit VR Little Endian (PS3.7 6.3.1)."""

from __future__ import annotations

import struct
from enum import IntEnum

from .pdu import ABORT_INVALID_PARAMETER, ProtocolError
from .syntaxes import VERIFICATION

ELEMENT = struct.Struct("<HHI")

# Command Data Set Type (0000,0800)
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0000


class Command(IntEnum):
    """Command Field (0000,0100) values the node sends or serves."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    C_CANCEL_RQ = 0x0FFF


# Requests the acceptor does not serve but whose response is defined (C-GET/FIND/MOVE, N-*):
# answered with "unrecognized operation" rather than an abort.
ANSWERED_UNSUPPORTED = frozenset({0x0010, 0x0020, 0x0021, 0x0100, 0x0110, 0x0120, 0x0130, 0x0140, 0x0150})


def parse_command(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """Element number -> raw value for a group 0000 command set.

    Raises
    ------
    ProtocolError
        When an element is truncated or outside group 0000, or CommandField is missing.
    """
    fields: dict[int, bytes] = {}
    offset, end = 0, len(data)
    unpack = ELEMENT.unpack_from
    while offset < end:
        if end - offset < 8:
            raise ProtocolError("truncated element in the DIMSE command set", ABORT_INVALID_PARAMETER)
        group, number, length = unpack(data, offset)
        offset += 8
        if group != 0 or offset + length > end:
            raise ProtocolError("malformed DIMSE command set", ABORT_INVALID_PARAMETER)
        fields[number] = bytes(data[offset: offset + length])
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


def encode_response(command: int, message_id: int, status: int, sop_class: str, sop_instance: str = "",
                    comment: str = "") -> bytes:
    """A response command set: group length first, then ascending tags."""
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
        + element(0x0100, struct.pack("<H", Command.C_STORE_RQ))
        + element(0x0110, struct.pack("<H", message_id))
        + element(0x0700, struct.pack("<H", priority))
        + element(0x0800, struct.pack("<H", DATA_SET_PRESENT))
        + element(0x1000, padded(sop_instance, b"\x00")))


def encode_echo_rq(message_id: int) -> bytes:
    """A C-ECHO-RQ command set (PS3.7 9.3.5.1)."""
    return _with_group_length(
        element(0x0002, padded(VERIFICATION, b"\x00"))
        + element(0x0100, struct.pack("<H", Command.C_ECHO_RQ))
        + element(0x0110, struct.pack("<H", message_id))
        + element(0x0800, struct.pack("<H", NO_DATA_SET)))
