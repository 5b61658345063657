"""Upper-layer PDUs and their items (PS3.8 9.3): codecs, the one PDV iterator, and reading PDUs off a socket.

Everything here is pure encoding and decoding except :class:`PDUReader`, which reads whole PDUs
from a blocking socket into one reusable buffer. Decoders raise :class:`ProtocolError` carrying
the A-ABORT reason the caller should answer with.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Iterator

from .syntaxes import APPLICATION_CONTEXT

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1137.1"
IMPLEMENTATION_VERSION_NAME = "DICOMNODE"

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = frozenset({ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT})

# A-ABORT sources and provider reasons (PS3.8 9.3.8)
SOURCE_USER, SOURCE_PROVIDER = 0, 2
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0, 1, 2
ABORT_UNRECOGNIZED_PARAMETER, ABORT_UNEXPECTED_PARAMETER, ABORT_INVALID_PARAMETER = 4, 5, 6

# A-ASSOCIATE-RJ (result, source, reason) triples (PS3.8 9.3.4)
REJECT_APPLICATION_CONTEXT = (1, 1, 2)  # permanent, service-user, application context name not supported
REJECT_CALLING_AE = (1, 1, 3)           # permanent, service-user, calling AE title not recognised
REJECT_PROTOCOL_VERSION = (1, 2, 2)     # permanent, service-provider (ACSE), protocol version not supported
REJECT_LOCAL_LIMIT = (2, 3, 2)          # transient, service-provider (presentation), local limit exceeded

# Presentation context results in the A-ASSOCIATE-AC (PS3.8 9.3.3.2)
CONTEXT_ACCEPTED = 0
CONTEXT_USER_REJECTION = 1
CONTEXT_NO_REASON = 2
CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

PDU_HEADER = struct.Struct(">BxI")
PDV_HEADER = struct.Struct(">IBB")

RELEASE_RQ_PDU = bytes((RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0))
RELEASE_RP_PDU = bytes((RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))


class ProtocolError(Exception):
    """The peer broke the upper-layer or DIMSE protocol; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


def abort_pdu(reason: int = ABORT_NOT_SPECIFIED, source: int = SOURCE_PROVIDER) -> bytes:
    """An A-ABORT PDU; source 0 is the service user, 2 the service provider (PS3.8 9.3.8)."""
    return bytes((ABORT, 0, 0, 0, 0, 4, 0, 0, source, reason))


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return bytes((ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, result, source, reason))


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


def _fixed_part(called_ae: str, calling_ae: str) -> bytes:
    """Protocol version 1, reserved, called and calling AE titles, 32 reserved bytes (PS3.8 9.3.2, 9.3.3)."""
    return struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + bytes(32)


# -- A-ASSOCIATE-RQ ----------------------------------------------------------------------------

@dataclass(slots=True)
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ the acceptor needs."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str = ""
    contexts: list[tuple[int, str, list[str]]] = field(default_factory=list)  # (id, abstract syntax, transfer syntaxes)
    max_pdu: int = 0
    implementation_class_uid: str = ""


def encode_associate_rq(called_ae: str, calling_ae: str, contexts: list[tuple[int, str, list[str]]],
                        max_pdu: int) -> bytes:
    """A-ASSOCIATE-RQ proposing ``(context id, abstract syntax, transfer syntaxes)`` contexts (PS3.8 9.3.2)."""
    parts = [item(0x10, APPLICATION_CONTEXT.encode())]
    for pcid, abstract, transfers in contexts:
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in transfers)
        parts.append(item(0x20, bytes((pcid, 0, 0, 0)) + sub))
    parts.append(user_information(max_pdu))
    body = _fixed_part(called_ae, calling_ae) + b"".join(parts)
    return PDU_HEADER.pack(ASSOCIATE_RQ, len(body)) + body


def parse_associate_rq(body: bytes | memoryview) -> AssociateRequest:
    """Decode the variable part of an A-ASSOCIATE-RQ PDU (everything after its 6-byte header).

    Raises
    ------
    ProtocolError
        When an item is truncated or overruns its parent, or a presentation context ID is even or
        repeated.
    """
    body = memoryview(body)
    if len(body) < 68:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than its fixed part", ABORT_INVALID_PARAMETER)
    version = struct.unpack_from(">H", body, 0)[0]
    rq = AssociateRequest(protocol_version=version, called_ae=uid_text(body[4:20]), calling_ae=uid_text(body[20:36]))
    for item_type, value in items(body[68:], "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            rq.application_context = uid_text(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise ProtocolError("presentation context item too short", ABORT_INVALID_PARAMETER)
            abstract, transfers = "", []
            for sub_type, sub in items(value[4:], "A-ASSOCIATE-RQ"):
                if sub_type == 0x30:
                    abstract = uid_text(sub)
                elif sub_type == 0x40:
                    transfers.append(uid_text(sub))
            pcid = value[0]
            if not pcid & 1 or any(pcid == known for known, _, _ in rq.contexts):  # PS3.8 9.3.2.2
                raise ProtocolError(f"presentation context ID {pcid} is even or proposed twice",
                                    ABORT_INVALID_PARAMETER)
            rq.contexts.append((pcid, abstract, transfers))
        elif item_type == 0x50:
            for sub_type, sub in items(value, "A-ASSOCIATE-RQ"):
                if sub_type == 0x51 and len(sub) >= 4:
                    rq.max_pdu = struct.unpack_from(">I", sub, 0)[0]
                elif sub_type == 0x52:
                    rq.implementation_class_uid = uid_text(sub)
    return rq


# -- A-ASSOCIATE-AC ----------------------------------------------------------------------------

@dataclass(slots=True)
class AssociateAccept:
    """The parts of an A-ASSOCIATE-AC a requestor needs."""

    application_context: str = ""
    results: dict[int, tuple[int, str]] = field(default_factory=dict)  # context id -> (result, transfer syntax)
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""


def encode_associate_ac(called_ae: str, calling_ae: str, results: list[tuple[int, int, str]], max_pdu: int) -> bytes:
    """A-ASSOCIATE-AC answering each proposed context with ``(context id, result, transfer syntax)`` (PS3.8 9.3.3).

    The called and calling AE titles are echoed from the request, as PS3.8 asks.
    """
    parts = [item(0x10, APPLICATION_CONTEXT.encode())]
    for pcid, result, ts in results:
        parts.append(item(0x21, bytes((pcid, 0, result, 0)) + item(0x40, ts.encode())))
    parts.append(user_information(max_pdu))
    body = _fixed_part(called_ae, calling_ae) + b"".join(parts)
    return PDU_HEADER.pack(ASSOCIATE_AC, len(body)) + body


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


# -- P-DATA-TF (PS3.8 9.3.5, annex E) ----------------------------------------------------------

def pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """Yield (presentation context id, message control header, fragment) of each PDV item in a P-DATA-TF body.

    Bit 0 of the control header is set for a command fragment, bit 1 for the last fragment.

    Raises
    ------
    ProtocolError
        When the PDU holds no PDV item, or an item header is truncated or overruns the PDU.
    """
    offset, end = 0, len(body)
    if end < 6:
        raise ProtocolError("P-DATA-TF without a PDV item", ABORT_INVALID_PARAMETER)
    unpack = PDV_HEADER.unpack_from
    while offset < end:
        if end - offset < 6:
            raise ProtocolError("truncated PDV item header", ABORT_INVALID_PARAMETER)
        length, pcid, mch = unpack(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise ProtocolError(f"PDV item length {length} does not fit its PDU", ABORT_INVALID_PARAMETER)
        yield pcid, mch, body[offset + 6: offset + 4 + length]
        offset += 4 + length


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


# -- reading PDUs ------------------------------------------------------------------------------

class PDUReader:
    """Reads whole PDUs from a blocking socket into one buffer that grows to the largest PDU read.

    Parameters
    ----------
    sock : socket.socket
        The connection (plain or TLS); replace :attr:`sock` after wrapping it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._header = bytearray(6)
        self._header_view = memoryview(self._header)
        self._buffer = bytearray(0)

    @property
    def allocated(self) -> int:
        """Bytes held for PDU bodies."""
        return len(self._buffer)

    def _recv_exact(self, view: memoryview, deadline: float | None) -> None:
        got, need = 0, len(view)
        sock = self.sock
        while got < need:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("deadline passed")
                sock.settimeout(remaining)
            n = sock.recv_into(view[got:], need - got)
            if n == 0:
                raise ConnectionError("the peer closed the connection")
            got += n

    def read(self, limit: int, deadline: float | None = None) -> tuple[int, memoryview]:
        """The next PDU's type and body (a view valid until the next read).

        ``deadline`` (``time.monotonic()``) bounds the whole PDU; None leaves each read to the
        socket's own timeout.

        Raises
        ------
        ProtocolError
            For an unknown PDU type or a PDU longer than ``limit``.
        TimeoutError, ConnectionError, OSError
            When the peer is too slow, closed the connection or the socket failed.
        """
        self._recv_exact(self._header_view, deadline)
        pdu_type, length = PDU_HEADER.unpack(self._header)
        if pdu_type not in PDU_TYPES:
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02x}", ABORT_UNRECOGNIZED_PDU)
        if length > limit:
            raise ProtocolError(f"PDU of {length} bytes exceeds the {limit}-byte maximum", ABORT_INVALID_PARAMETER)
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        self._recv_exact(body, deadline)
        return pdu_type, body
