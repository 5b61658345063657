"""A raw-socket DICOM peer for tests that must send what no real peer sends: partial, oversized or misplaced PDUs."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from dicomnode.dimse import commands, pdu
from dicomnode.dimse.syntaxes import IMPLICIT_VR_LE, VERIFICATION

ECHO_CONTEXT = (1, VERIFICATION, [IMPLICIT_VR_LE])


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_pdu(s: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU's (type, body), or None when the node closed the connection."""
    header = recv_exact(s, 6)
    if header is None:
        return None
    pdu_type, length = struct.unpack(">BxI", header)
    body = recv_exact(s, length)
    return None if body is None else (pdu_type, body)


def request(contexts=(ECHO_CONTEXT,), calling: str = "PYSCU", max_pdu: int = 16384) -> bytes:
    return pdu.encode_associate_rq("DICOMNODE", calling, list(contexts), max_pdu)


def associate(port: int, contexts=(ECHO_CONTEXT,), calling: str = "PYSCU", timeout: float = 5.0) -> socket.socket:
    """A socket with an established association (the A-ASSOCIATE-AC read)."""
    s = connect(port, timeout)
    s.sendall(request(contexts, calling))
    answer = read_pdu(s)
    assert answer is not None and answer[0] == pdu.ASSOCIATE_AC, answer
    return s


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """One P-DATA-TF PDU holding ``(context id, message control header, fragment)`` PDVs."""
    body = b"".join(pdu.PDV_HEADER.pack(len(data) + 2, pcid, mch) + data for pcid, mch, data in pdvs)
    return pdu.PDU_HEADER.pack(pdu.P_DATA_TF, len(body)) + body


def echo_rq(message_id: int = 1) -> bytes:
    return commands.encode_echo_rq(message_id)


def response_status(s: socket.socket) -> tuple[int, int]:
    """(command field, status) of the next response; the response's PDVs may span PDUs."""
    command = b""
    while True:
        got = read_pdu(s)
        assert got is not None and got[0] == pdu.P_DATA_TF, got
        for _, mch, fragment in pdu.pdvs(memoryview(got[1])):
            assert mch & 1
            command += bytes(fragment)
            if mch & 2:
                fields = commands.parse_command(command)
                return commands.uint(fields.get(0x0100), 2, -1), commands.uint(fields.get(0x0900), 2, -1)


def abort_of(answer: tuple[int, bytes] | None) -> tuple[int, int]:
    """(source, reason) of an A-ABORT answer."""
    assert answer is not None and answer[0] == pdu.ABORT, answer
    return answer[1][2], answer[1][3]


def wait_closed(s: socket.socket, limit: float) -> float:
    """Seconds until the node closed the connection, reading and dropping what it sends; fails after ``limit``."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < limit:
        try:
            if not s.recv(65536):
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    raise AssertionError(f"the node kept the connection open for more than {limit} s")


def rss_bytes() -> int:
    """This process's resident set size."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_ABORT_SOURCES = {0: "service user", 2: "service provider"}
_ABORT_REASONS = {0: "not specified", 1: "unrecognized PDU", 2: "unexpected PDU", 4: "unrecognized parameter",
                  5: "unexpected parameter", 6: "invalid parameter value"}
_PDU_NAMES = {pdu.ASSOCIATE_AC: "A-ASSOCIATE-AC", pdu.ASSOCIATE_RJ: "A-ASSOCIATE-RJ", pdu.P_DATA_TF: "P-DATA-TF",
              pdu.RELEASE_RP: "A-RELEASE-RP", pdu.RELEASE_RQ: "A-RELEASE-RQ"}


def describe(answer: tuple[int, bytes] | None) -> str:
    """The node's answer in words, for benchmarks/RELIABILITY.md (recorded with pytest's record_property)."""
    if answer is None:
        return "connection closed"
    pdu_type, body = answer
    if pdu_type == pdu.ABORT and len(body) >= 4:
        source = _ABORT_SOURCES.get(body[2], str(body[2]))
        reason = _ABORT_REASONS.get(body[3], str(body[3])) if body[2] == 2 else "not significant"
        return f"A-ABORT ({source}, {reason})"
    if pdu_type == pdu.ASSOCIATE_RJ and len(body) >= 4:
        return f"A-ASSOCIATE-RJ (result {body[1]}, source {body[2]}, reason {body[3]})"
    return _PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02x}")
