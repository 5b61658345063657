"""The C-STORE and C-ECHO service class user: the sender's upper layer, one blocking socket per association.

It sends the command PDV, streams the file's data set bytes from disk in P-DATA-TF PDUs exactly
as stored (no decoding, no transcoding), then reads the C-STORE-RSP with a deadline. pynetdicom's
requestor hands every PDU through its DUL and reactor threads, which poll with a sleep per loop;
that capped one association at about 100 small instances per second.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path
from typing import Sequence

import structlog

from .commands import NO_DATA_SET, Command, encode_echo_rq, encode_store_rq, parse_command, text, uint
from .part10 import FileMeta, read_file_meta
from .pdu import (
    ABORT, ABORT_INVALID_PARAMETER, ABORT_NOT_SPECIFIED, ABORT_UNEXPECTED_PARAMETER, ABORT_UNEXPECTED_PDU,
    ASSOCIATE_AC, ASSOCIATE_RJ, CONTEXT_ACCEPTED, P_DATA_TF, PDU_HEADER, PDV_HEADER, RELEASE_RP, RELEASE_RP_PDU,
    RELEASE_RQ, RELEASE_RQ_PDU, SOURCE_USER, PDUReader, ProtocolError, abort_pdu, encode_associate_rq, encode_p_data,
    parse_associate_ac, pdvs,
)
from .status import is_kept
from .syntaxes import APPLICATION_CONTEXT, EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION

log = structlog.get_logger("dicomnode.dimse.requestor")

MAX_CONTEXTS = 128  # odd presentation context IDs 1..255 (PS3.8 9.3.2.2)
# A peer announcing 0 takes PDUs of any length; 1 MiB fragments keep the syscall count low without big buffers.
_UNLIMITED_FRAGMENT = 1 << 20
_MAX_CONTROL_PDU = 1 << 20

# A-ASSOCIATE-RJ (source, reason) -> words (PS3.8 9.3.4)
_REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}
_CONTEXT_RESULTS = {1: "user rejection", 2: "no reason given", 3: "abstract syntax not supported",
                    4: "transfer syntaxes not supported"}


class AssociationError(Exception):
    """The association could not be established, or it was lost (aborted, released, timed out, connection dropped)."""


# -- planning --------------------------------------------------------------------------------

def propose_contexts(metas: Sequence[FileMeta]) -> list[tuple[str, list[str]]]:
    """Presentation contexts for ``metas``: one per (SOP class, transfer syntax), plus per SOP class a
    fallback offering Explicit then Implicit VR Little Endian, for peers that refuse single-syntax contexts."""
    by_class: dict[str, dict[str, None]] = {}
    for m in metas:
        by_class.setdefault(m.sop_class_uid, {})[m.transfer_syntax] = None
    contexts: list[tuple[str, list[str]]] = []
    for sop_class, syntaxes in by_class.items():
        contexts += [(sop_class, [ts]) for ts in syntaxes]
        contexts.append((sop_class, [EXPLICIT_VR_LE, IMPLICIT_VR_LE]))
    return contexts


def plan_associations(metas: dict[int, FileMeta]) -> list[tuple[list[tuple[str, list[str]]], list[int]]]:
    """Split files into associations of at most :data:`MAX_CONTEXTS` contexts, whole SOP classes together.

    Returns ``[(contexts, file indices)]`` in the order the files came.
    """
    by_class: dict[str, list[int]] = {}
    for i, m in metas.items():
        by_class.setdefault(m.sop_class_uid, []).append(i)
    plans: list[tuple[list[tuple[str, list[str]]], list[int]]] = []
    contexts: list[tuple[str, list[str]]] = []
    indices: list[int] = []
    for members in by_class.values():
        wanted = propose_contexts([metas[i] for i in members])[:MAX_CONTEXTS]
        if contexts and len(contexts) + len(wanted) > MAX_CONTEXTS:
            plans.append((contexts, sorted(indices)))
            contexts, indices = [], []
        contexts += wanted
        indices += members
    if contexts:
        plans.append((contexts, sorted(indices)))
    return plans


# -- one association -------------------------------------------------------------------------

class StoreSCU:
    """One association to a storage SCP, for C-STORE of Part 10 files and C-ECHO.

    Parameters
    ----------
    host, port : str, int
        The peer.
    called_ae, calling_ae : str
        The peer's AE title and ours.
    contexts : list of (abstract syntax, [transfer syntaxes])
        Presentation contexts to propose, at most :data:`MAX_CONTEXTS`; see :func:`propose_contexts`.
    max_pdu : int
        Our maximum P-DATA-TF length, announced in the A-ASSOCIATE-RQ.
    timeout : float
        Seconds allowed for connecting, for each send, and for each awaited response as a whole.
    ssl_context : ssl.SSLContext, optional
        Client-side TLS context; the socket is wrapped before the A-ASSOCIATE-RQ.

    Use as a context manager: entering opens the association (raising :class:`AssociationError`
    when it cannot be established), leaving releases it, or aborts it when an exception escaped.
    """

    def __init__(self, host: str, port: int, called_ae: str, calling_ae: str, *,
                 contexts: list[tuple[str, list[str]]], max_pdu: int = 1 << 20, timeout: float = 60,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if not contexts:
            raise ValueError("propose at least one presentation context")
        if len(contexts) > MAX_CONTEXTS:
            raise ValueError(f"at most {MAX_CONTEXTS} presentation contexts fit one association, got {len(contexts)}")
        if not 4096 <= max_pdu <= 0xFFFFFFFF:
            raise ValueError(f"max_pdu must be between 4096 and 4294967295 bytes, got {max_pdu}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.host, self.port = host, port
        self.called_ae, self.calling_ae = called_ae, calling_ae
        self.max_pdu = max_pdu
        self.timeout = float(timeout)
        self.ssl_context = ssl_context
        self.proposed = {2 * n + 1: (abstract, list(syntaxes)) for n, (abstract, syntaxes) in enumerate(contexts)}
        self.accepted: dict[int, tuple[str, str]] = {}   # context id -> (abstract syntax, transfer syntax)
        self.refused: dict[int, int] = {}                 # context id -> result (1..4)
        self.peer_max_pdu = 0
        self.peer_implementation = ""
        self.lost: str | None = None                      # why the association ended, once it has
        self._sock: socket.socket | None = None
        self._message_id = 0
        self._reader: PDUReader | None = None
        self._fragment = 0
        self._out = bytearray(0)

    # -- life cycle ----------------------------------------------------------

    @property
    def is_established(self) -> bool:
        """True while the association is up."""
        return self._sock is not None and self.lost is None

    @property
    def peer(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"

    def open(self) -> "StoreSCU":
        """Connect and negotiate.

        Raises
        ------
        AssociationError
            When the peer cannot be reached, rejects or aborts the association, or accepts no context.
        """
        if self._sock is not None:
            raise RuntimeError("the association is already open")
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise AssociationError(f"cannot connect to {self.peer}: {exc.strerror or exc}") from None
        try:
            self._sock = sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self._sock = self.ssl_context.wrap_socket(
                    sock, server_hostname=self.host if self.ssl_context.check_hostname else None)
            self._reader = PDUReader(sock)
            contexts = [(pcid, abstract, syntaxes) for pcid, (abstract, syntaxes) in self.proposed.items()]
            sock.sendall(encode_associate_rq(self.called_ae, self.calling_ae, contexts, self.max_pdu))
            pdu_type, body = self._read_pdu(time.monotonic() + self.timeout, _MAX_CONTROL_PDU)
            if pdu_type == ASSOCIATE_RJ:
                result, source, reason = (bytes(body[1:4]) + b"\x00\x00\x00")[:3]
                why = _REJECT_REASONS.get((source, reason), f"source {source}, reason {reason}")
                kind = "permanently" if result == 1 else "for now"
                raise AssociationError(f"{self.peer} rejected the association {kind}: {why}")
            if pdu_type == ABORT:
                raise AssociationError(f"{self.peer} aborted the association request{_abort_words(body)}")
            if pdu_type != ASSOCIATE_AC:
                raise ProtocolError(f"expected A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02x}", ABORT_UNEXPECTED_PDU)
            self._accept(parse_associate_ac(body))
        except AssociationError:
            self._close()
            raise
        except ProtocolError as exc:
            self._send(abort_pdu(exc.reason))
            self._close()
            raise AssociationError(f"{self.peer} broke the association protocol: {exc}") from None
        except (TimeoutError, socket.timeout):
            self._send(abort_pdu(ABORT_NOT_SPECIFIED, source=SOURCE_USER))
            self._close()
            raise AssociationError(f"{self.peer} did not answer the association request within {self.timeout:g} s") from None
        except (OSError, ConnectionError) as exc:
            self._close()
            raise AssociationError(f"connection to {self.peer} lost while associating: {_os_words(exc)}") from None
        # the peer's maximum counts the PDV item header (length, context ID, flags: 6 bytes), not the PDU header
        self._fragment = max(1, min((self.peer_max_pdu or _UNLIMITED_FRAGMENT + 6) - 6, _UNLIMITED_FRAGMENT))
        self._out = bytearray(12 + self._fragment)
        return self

    def _accept(self, ac) -> None:
        if ac.application_context != APPLICATION_CONTEXT:
            raise ProtocolError(f"unknown application context {ac.application_context!r}", ABORT_INVALID_PARAMETER)
        for pcid, (result, syntax) in ac.results.items():
            if pcid not in self.proposed:
                raise ProtocolError(f"A-ASSOCIATE-AC answers context {pcid}, which was not proposed",
                                    ABORT_UNEXPECTED_PARAMETER)
            if result == CONTEXT_ACCEPTED:
                if syntax not in self.proposed[pcid][1]:
                    raise ProtocolError(f"context {pcid} accepted with transfer syntax {syntax}, which was not proposed",
                                        ABORT_INVALID_PARAMETER)
                self.accepted[pcid] = (self.proposed[pcid][0], syntax)
            else:
                self.refused[pcid] = result
        self.peer_max_pdu = ac.max_pdu
        self.peer_implementation = ac.implementation_class_uid
        if not self.accepted:
            self.release()
            refused = sorted({_CONTEXT_RESULTS.get(r, str(r)) for r in self.refused.values()})
            raise AssociationError(f"{self.peer} accepted none of the {len(self.proposed)} proposed presentation "
                                   f"contexts ({', '.join(refused) or 'no answer'})")

    def __enter__(self) -> "StoreSCU":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()

    def release(self) -> None:
        """A-RELEASE-RQ, wait (at most the timeout) for the A-RELEASE-RP, close. Never raises."""
        if not self.is_established:
            self._close()
            return
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(RELEASE_RQ_PDU)
            deadline = time.monotonic() + self.timeout
            while True:
                pdu_type, _ = self._read_pdu(deadline, _MAX_CONTROL_PDU)
                if pdu_type == RELEASE_RQ:  # release collision (PS3.8 7.2.2): the requestor answers too
                    self._sock.sendall(RELEASE_RP_PDU)
                if pdu_type in (RELEASE_RP, ABORT):
                    break
        except (ProtocolError, OSError, ConnectionError):
            self._send(abort_pdu(ABORT_NOT_SPECIFIED, source=SOURCE_USER))
        self.lost = self.lost or "released"
        self._close()

    def abort(self) -> None:
        """A-ABORT (service user) and close. Never raises."""
        if self.is_established:
            self._send(abort_pdu(ABORT_NOT_SPECIFIED, source=SOURCE_USER))
            self.lost = "aborted by the node"
        self._close()

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _send(self, data: bytes) -> None:
        if self._sock is not None:
            try:
                self._sock.settimeout(min(self.timeout, 5.0))
                self._sock.sendall(data)
            except OSError:
                pass

    def _lose(self, why: str, abort_reason: int | None = None) -> str:
        """Mark the association dead (aborting it first when ``abort_reason`` is given) and return ``why``."""
        if abort_reason is not None:
            self._send(abort_pdu(abort_reason, source=2 if abort_reason else 0))
        self.lost = why
        self._close()
        log.warning("requestor_association_lost", peer=self.peer, reason=why)
        return why

    def _read_pdu(self, deadline: float, limit: int) -> tuple[int, memoryview]:
        assert self._reader is not None
        return self._reader.read(limit, deadline)

    # -- DIMSE ---------------------------------------------------------------

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def context_for(self, sop_class: str, transfer_syntax: str) -> tuple[int | None, str]:
        """The accepted context to send a ``transfer_syntax`` instance of ``sop_class`` on, or (None, why not)."""
        others = []
        for pcid, (abstract, syntax) in self.accepted.items():
            if abstract == sop_class:
                if syntax == transfer_syntax:
                    return pcid, ""
                others.append(syntax)
        if others:
            return None, (f"{self.peer} accepted SOP class {sop_class} only in {', '.join(sorted(set(others)))}; "
                          f"the file is in {transfer_syntax} and the node does not transcode")
        proposed = [pcid for pcid, (abstract, _) in self.proposed.items() if abstract == sop_class]
        if not proposed:
            return None, f"SOP class {sop_class} was not proposed on this association"
        why = sorted({_CONTEXT_RESULTS.get(self.refused.get(p, 0), "no answer") for p in proposed})
        return None, f"{self.peer} refused SOP class {sop_class} ({', '.join(why)})"

    def store_file(self, path: str | os.PathLike) -> tuple[int | None, str]:
        """C-STORE one Part 10 file, its data set bytes exactly as stored.

        Returns
        -------
        (status, comment)
            The C-STORE-RSP status and ErrorComment; status is None when no response came: the
            file could not be read or has no matching context (the association carries on), or
            the association was lost (see :attr:`lost`). ``comment`` then says why.
        """
        try:
            meta = read_file_meta(path)
        except (OSError, ValueError) as exc:
            return None, f"cannot send {Path(path).name}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        return self.store(meta)

    def store(self, meta: FileMeta) -> tuple[int | None, str]:
        """C-STORE a file whose meta group was read already; see :meth:`store_file`."""
        if not self.is_established:
            return None, f"association lost: {self.lost or 'not open'}"
        pcid, why = self.context_for(meta.sop_class_uid, meta.transfer_syntax)
        if pcid is None:
            return None, why
        try:
            f = open(meta.path, "rb")
        except OSError as exc:
            return None, f"cannot send {meta.path.name}: {exc.strerror or exc}"
        message_id = self._next_message_id()
        sock = self._sock
        try:
            with f:
                size = os.fstat(f.fileno()).st_size
                remaining = size - meta.offset
                if remaining < 0:
                    return None, f"cannot send {meta.path.name}: the file is shorter than its file meta group"
                f.seek(meta.offset)
                command = encode_store_rq(message_id, meta.sop_class_uid, meta.sop_instance_uid)
                sock.settimeout(self.timeout)
                sock.sendall(encode_p_data(pcid, command, self.peer_max_pdu))
                out, fragment = self._out, self._fragment
                view = memoryview(out)
                first = True
                while remaining or first:
                    n = min(fragment, remaining)
                    got = f.readinto(view[12: 12 + n]) if n else 0
                    while got < n:
                        more = f.readinto(view[12 + got: 12 + n])
                        if not more:
                            return None, self._lose(f"{meta.path.name} shrank while it was being sent",
                                                    ABORT_NOT_SPECIFIED)
                        got += more
                    remaining -= n
                    PDU_HEADER.pack_into(out, 0, P_DATA_TF, n + 6)
                    PDV_HEADER.pack_into(out, 6, n + 2, pcid, 0x00 if remaining else 0x02)
                    sock.sendall(view[: 12 + n])
                    first = False
            fields = self._await(message_id, Command.C_STORE_RSP)
        except ProtocolError as exc:
            return None, self._lose(f"{self.peer} broke the protocol: {exc}", exc.reason)
        except _PeerEnded as exc:
            return None, self._lose(str(exc))
        except (TimeoutError, socket.timeout):
            return None, self._lose(f"no response from {self.peer} within {self.timeout:g} s", ABORT_NOT_SPECIFIED)
        except (OSError, ConnectionError) as exc:
            return None, self._lose(f"connection to {self.peer} lost: {_os_words(exc)}")
        return uint(fields.get(0x0900), 2, 0xFFFF), text(fields.get(0x0902))

    def echo(self) -> int:
        """C-ECHO on the accepted Verification context; returns the status.

        Raises
        ------
        AssociationError
            When Verification was not accepted, or no response came (the association is then lost).
        """
        pcid = next((p for p, (abstract, _) in self.accepted.items() if abstract == VERIFICATION), None)
        if not self.is_established:
            raise AssociationError(f"association lost: {self.lost or 'not open'}")
        if pcid is None:
            raise AssociationError(f"{self.peer} did not accept the Verification SOP class")
        message_id = self._next_message_id()
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(encode_p_data(pcid, encode_echo_rq(message_id), self.peer_max_pdu))
            fields = self._await(message_id, Command.C_ECHO_RSP)
        except ProtocolError as exc:
            raise AssociationError(self._lose(f"{self.peer} broke the protocol: {exc}", exc.reason)) from None
        except _PeerEnded as exc:
            raise AssociationError(self._lose(str(exc))) from None
        except (TimeoutError, socket.timeout):
            raise AssociationError(self._lose(f"no response from {self.peer} within {self.timeout:g} s",
                                              ABORT_NOT_SPECIFIED)) from None
        except (OSError, ConnectionError) as exc:
            raise AssociationError(self._lose(f"connection to {self.peer} lost: {_os_words(exc)}")) from None
        return uint(fields.get(0x0900), 2, 0xFFFF)

    def _await(self, message_id: int, expected: int) -> dict[int, bytes]:
        """Read PDUs until the response to ``message_id`` is complete; the whole wait is bounded by the timeout."""
        deadline = time.monotonic() + self.timeout
        command = bytearray()
        fields: dict[int, bytes] | None = None  # a response whose (unexpected) data set is still arriving
        while True:
            pdu_type, body = self._read_pdu(deadline, max(self.max_pdu, _MAX_CONTROL_PDU))
            if pdu_type == ABORT:
                raise _PeerEnded(f"{self.peer} aborted the association{_abort_words(body)}")
            if pdu_type == RELEASE_RQ:
                self._send(RELEASE_RP_PDU)
                raise _PeerEnded(f"{self.peer} released the association before answering")
            if pdu_type != P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02x} while awaiting a response",
                                    ABORT_UNEXPECTED_PDU)
            for pcid, mch, fragment in pdvs(body):
                if pcid not in self.accepted:
                    raise ProtocolError(f"PDV on presentation context {pcid}, which was not accepted",
                                        ABORT_UNEXPECTED_PARAMETER)
                if not mch & 1:
                    if fields is None:
                        raise ProtocolError("data set fragment without a response command", ABORT_UNEXPECTED_PARAMETER)
                    if mch & 2:
                        return fields
                    continue
                if fields is not None:
                    raise ProtocolError("command fragment while a data set was arriving", ABORT_UNEXPECTED_PARAMETER)
                command += fragment
                if not mch & 2:
                    continue
                parsed = parse_command(command)
                command = bytearray()
                cmd = uint(parsed.get(0x0100), 2, -1)
                answered = uint(parsed.get(0x0120), 2, -1)
                if cmd != expected or answered != message_id:
                    raise ProtocolError(f"expected response 0x{expected:04x} to message {message_id}, got command "
                                        f"0x{cmd:04x} for message {answered}", ABORT_UNEXPECTED_PARAMETER)
                if len(parsed.get(0x0900, b"")) < 2:
                    raise ProtocolError("response without a Status (0000,0900)", ABORT_INVALID_PARAMETER)
                if uint(parsed.get(0x0800), 2, NO_DATA_SET) == NO_DATA_SET:
                    return parsed
                fields = parsed


class _PeerEnded(Exception):
    """The peer aborted or released the association while a response was awaited."""


def _abort_words(body: memoryview) -> str:
    if len(body) >= 4:
        source, reason = body[2], body[3]
        who = {0: "service user", 2: "service provider"}.get(source, f"source {source}")
        return f" ({who}, reason {reason})"
    return ""


def _os_words(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# -- the sender's entry points ---------------------------------------------------------------

def send_files(host: str, port: int, called_ae: str, calling_ae: str, paths: Sequence[str | os.PathLike], *,
               timeout: float = 60, ssl_context: ssl.SSLContext | None = None,
               max_pdu: int = 1 << 20) -> tuple[list[int], dict[int, str], str | None]:
    """C-STORE Part 10 files to one destination, as they are stored.

    One association per 128 presentation contexts (in practice one); when an association is lost
    after it had stored something, the files not yet sent go on one fresh association. Never raises.

    Returns
    -------
    (kept, errors, association_error)
        Indices into ``paths`` the peer stored (success or warning status), ``{index: error
        sentence}`` for the others, and, when no association could be established at all, why
        (then nothing was sent and ``kept`` and ``errors`` are empty).
    """
    kept: list[int] = []
    errors: dict[int, str] = {}
    metas: dict[int, FileMeta] = {}
    for i, path in enumerate(paths):
        try:
            metas[i] = read_file_meta(path)
        except (OSError, ValueError) as exc:
            errors[i] = f"cannot send {Path(path).name}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
    opened = 0
    first_error: str | None = None
    try:
        for contexts, indices in plan_associations(metas):
            pending = indices
            fresh_tries = 1
            while pending:
                scu = StoreSCU(host, port, called_ae, calling_ae, contexts=contexts, max_pdu=max_pdu, timeout=timeout,
                               ssl_context=ssl_context)
                t0 = time.monotonic()
                try:
                    scu.open()
                except AssociationError as exc:
                    first_error = first_error or str(exc)
                    log.warning("requestor_association_failed", peer=scu.peer, files=len(pending), reason=str(exc))
                    errors.update({i: str(exc) for i in pending})
                    break
                opened += 1
                stored, done = 0, 0
                try:
                    for i in pending:
                        if not scu.is_established:
                            break
                        status, comment = scu.store(metas[i])
                        done += 1
                        if is_kept(status):
                            kept.append(i)
                            stored += 1
                        elif status is None:
                            errors[i] = comment
                        else:
                            errors[i] = f"C-STORE status 0x{status:04X}" + (f": {comment}" if comment else "")
                finally:
                    outcome = scu.lost
                    scu.release()
                log.info("requestor_association", peer=scu.peer, stored=stored, failed=done - stored,
                         seconds=round(time.monotonic() - t0, 3), outcome=outcome or "released")
                pending = pending[done:]
                if pending and (stored == 0 or fresh_tries == 0):
                    errors.update({i: f"not sent: association lost ({outcome})" for i in pending})
                    break
                fresh_tries -= 1
    except Exception as exc:  # the outbox must always get an answer per file
        log.error("requestor_send_crashed", peer=f"{called_ae}@{host}:{port}", error=f"{type(exc).__name__}: {exc}")
        done_set = set(kept) | set(errors)
        errors.update({i: f"internal error while sending: {type(exc).__name__}" for i in metas if i not in done_set})
    if opened == 0 and first_error is not None:
        return [], {}, first_error
    return sorted(kept), errors, None


def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 30,
         ssl_context: ssl.SSLContext | None = None) -> tuple[bool, str]:
    """C-ECHO a peer on a fresh association; never raises.

    Returns
    -------
    (ok, message)
        ``message`` is "C-ECHO success in N ms", "C-ECHO status 0x....", "association failed: why"
        or "C-ECHO failed: why" (the association was established but lost).
    """
    t0 = time.monotonic()
    try:
        scu = StoreSCU(host, port, called_ae, calling_ae, contexts=[(VERIFICATION, [IMPLICIT_VR_LE])],
                       timeout=timeout, ssl_context=ssl_context)
        scu.open()
    except (AssociationError, ValueError) as exc:
        return False, f"association failed: {exc}"
    try:
        status = scu.echo()
    except AssociationError as exc:
        return False, f"C-ECHO failed: {exc}"
    finally:
        scu.release()
    ms = (time.monotonic() - t0) * 1000
    if status == 0:
        return True, f"C-ECHO success in {ms:.0f} ms"
    return False, f"C-ECHO status 0x{status:04X}"
