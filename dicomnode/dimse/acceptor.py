"""The C-STORE and C-ECHO service class provider: the receiver's upper layer.

Connections wait in the gate (:mod:`.transport`, one thread, no PDU buffers) until their
A-ASSOCIATE-RQ has arrived whole; then the request is checked (protocol version, application
context, calling AE and host, the association limit) and an accepted association gets its own
thread. It reads each PDU with ``recv_into`` within the network timeout, walks its PDV items and
hands the data set bytes to a ``store`` callback exactly as they arrived, then answers with a
C-STORE-RSP. A data set that grows past ``incoming_after`` bytes goes to a file while it arrives,
so an association holds at most one PDU and ``incoming_after`` bytes of data set in memory.
Negotiation follows PS3.8 9.3.2-9.3.4: Verification in Implicit VR Little Endian, storage
contexts in the sender's first transfer syntax the standard defines (the node keeps instances as
they came).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from .commands import (
    ANSWERED_UNSUPPORTED, NO_DATA_SET, Command, encode_response, parse_command, text, uint,
)
from .part10 import file_header
from .pdu import (
    ABORT, ABORT_INVALID_PARAMETER, ABORT_NOT_SPECIFIED, ABORT_UNEXPECTED_PARAMETER, ABORT_UNEXPECTED_PDU,
    CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED, CONTEXT_ACCEPTED, CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED, P_DATA_TF,
    REJECT_APPLICATION_CONTEXT, REJECT_CALLING_AE, REJECT_LOCAL_LIMIT, REJECT_PROTOCOL_VERSION, RELEASE_RP_PDU,
    RELEASE_RQ, SOURCE_PROVIDER, SOURCE_USER, AssociateRequest, PDUReader, ProtocolError, abort_pdu,
    encode_associate_ac, encode_associate_rj, encode_p_data, parse_associate_rq, pdvs,
)
from .status import Status, is_kept
from .syntaxes import APPLICATION_CONTEXT, IMPLICIT_VR_LE, VERIFICATION, is_known_transfer_syntax
from .transport import Gate

log = structlog.get_logger("dicomnode.dimse.acceptor")

# An A-ASSOCIATE-RQ longer than this is refused: 128 contexts with a dozen transfer syntaxes each fit.
_MAX_REQUEST = 1 << 17
# A command set is a few hundred bytes; a longer one is not a command the node could serve.
MAX_COMMAND = 1 << 16
# Data sets of requests answered without reading them (C-FIND identifiers, N-SET attributes, ...) are
# counted, not kept; a longer one is a peer filling the association with bytes.
MAX_IGNORED_DATA_SET = 1 << 20
# Service classes that are not storage although any SOP class UID could be proposed on a context:
# query/retrieve, worklist, storage commitment, MPPS and other N-services, print, instance availability.
_NOT_STORAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.2.", "1.2.840.10008.5.1.4.31", "1.2.840.10008.5.1.4.32", "1.2.840.10008.5.1.4.33",
    "1.2.840.10008.5.1.4.34.", "1.2.840.10008.5.1.4.37.", "1.2.840.10008.5.1.4.38.", "1.2.840.10008.5.1.4.39.",
    "1.2.840.10008.5.1.4.41", "1.2.840.10008.5.1.4.42", "1.2.840.10008.5.1.4.43.", "1.2.840.10008.5.1.4.44.",
    "1.2.840.10008.5.1.4.45.", "1.2.840.10008.5.1.1.", "1.2.840.10008.1.20.", "1.2.840.10008.1.40",
    "1.2.840.10008.1.42", "1.2.840.10008.3.1.2.", "1.2.840.10008.4.2", "1.2.840.10008.5.1.4.20.",
)

_REJECT_TEXT = {
    REJECT_CALLING_AE: "calling AE title not recognised",
    REJECT_APPLICATION_CONTEXT: "application context name not supported",
    REJECT_PROTOCOL_VERSION: "protocol version not supported",
    REJECT_LOCAL_LIMIT: "local limit exceeded (too many associations)",
}


@dataclass(slots=True)
class StoreRequest:
    """One C-STORE request as received, for the ``store`` callback.

    Attributes
    ----------
    calling_ae, called_ae : str
        AE titles from the A-ASSOCIATE-RQ, without padding.
    host : str
        The peer's IP address.
    sop_class_uid : str
        The presentation context's abstract syntax.
    transfer_syntax : str
        The transfer syntax accepted on that context: the encoding of ``dataset``.
    affected_sop_class_uid, affected_sop_instance_uid : str
        From the command set, (0000,0002) and (0000,1000).
    message_id : int
        (0000,0110) of the request.
    dataset : bytearray or memoryview
        The data set exactly as received: the concatenated P-DATA fragments, no file meta.
    incoming : object, optional
        When the data set was large enough to be written to disk while it arrived, what the
        ``incoming`` callback returned for it (``dataset`` is then a view of that file).
    """

    calling_ae: str
    called_ae: str
    host: str
    sop_class_uid: str
    transfer_syntax: str
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    message_id: int
    dataset: Any
    incoming: Any = None

    def file_meta(self) -> bytes:
        """The Part 10 header (preamble, ``DICM`` and the file meta group) for writing ``dataset`` as a file.

        ``file_meta() + dataset`` is a complete DICOM file in the transfer syntax the instance arrived in.
        """
        return file_header(self.affected_sop_class_uid or self.sop_class_uid, self.affected_sop_instance_uid,
                           self.transfer_syntax, source_ae=self.calling_ae)


@dataclass(slots=True)
class AssociationInfo:
    """What one association did, given to ``on_association`` when it ends and logged as one event."""

    calling_ae: str
    called_ae: str
    host: str
    port: int
    started: float
    instances: int = 0
    bytes: int = 0
    echoes: int = 0
    failures: int = 0
    seconds: float = 0.0
    outcome: str = "open"


@dataclass(slots=True)
class Context:
    """An accepted presentation context."""

    abstract_syntax: str
    transfer_syntax: str


@dataclass(slots=True)
class Negotiated:
    """The outcome of negotiation: accepted contexts and, for the others, their result."""

    calling_ae: str
    called_ae: str
    peer_max_pdu: int
    contexts: dict[int, Context] = field(default_factory=dict)
    refused: dict[int, int] = field(default_factory=dict)  # context id -> result (3 or 4)

    def results(self, rq: AssociateRequest) -> list[tuple[int, int, str]]:
        """``(context id, result, transfer syntax)`` for every proposed context, for the A-ASSOCIATE-AC."""
        out = []
        for pcid, _, transfers in rq.contexts:
            ctx = self.contexts.get(pcid)
            if ctx is not None:
                out.append((pcid, CONTEXT_ACCEPTED, ctx.transfer_syntax))
            else:  # the syntax is not significant when the context is not accepted
                out.append((pcid, self.refused.get(pcid, CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED),
                            transfers[0] if transfers else IMPLICIT_VR_LE))
        return out


def is_storage_like(uid: str) -> bool:
    """False for abstract syntaxes of well-known non-storage services (query/retrieve, worklist, MPPS, print, ...)."""
    return uid != VERIFICATION and not uid.startswith(_NOT_STORAGE_PREFIXES)


def negotiate(rq: AssociateRequest, accept_sop_class: Callable[[str], bool]) -> Negotiated:
    """Accept Verification with Implicit VR LE and storage contexts in their first proposed known syntax.

    The node keeps instances in the syntax they arrived in, so the sender's first preference wins.
    Refused contexts carry result 3 (abstract syntax not supported) or 4 (no usable transfer syntax).
    """
    neg = Negotiated(calling_ae=rq.calling_ae, called_ae=rq.called_ae, peer_max_pdu=rq.max_pdu)
    for pcid, abstract, transfers in rq.contexts:
        if abstract == VERIFICATION:
            syntax = IMPLICIT_VR_LE if IMPLICIT_VR_LE in transfers else None
        else:
            try:
                accept = bool(abstract) and is_storage_like(abstract) and accept_sop_class(abstract)
            except Exception as exc:
                log.error("accept_sop_class_failed", sop_class=abstract, error=f"{type(exc).__name__}: {exc}")
                accept = False
            if not accept:
                neg.refused[pcid] = CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED
                continue
            syntax = next((ts for ts in transfers if is_known_transfer_syntax(ts)), None)
        if syntax is None:
            neg.refused[pcid] = CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED
        else:
            neg.contexts[pcid] = Context(abstract, syntax)
    return neg


class StorageSCP:
    """C-STORE and C-ECHO service class provider on a plain TCP (or TLS) socket.

    Parameters
    ----------
    ae_title : str
        Our AE title (any called AE title is accepted, like the node always did).
    host, port : str, int
        Where to listen; port 0 picks a free port (see :attr:`port`).
    store : callable
        ``store(StoreRequest) -> (status, error_comment)``; called on the association's thread once
        the last data set fragment arrived. The status goes back in the C-STORE-RSP, with
        ErrorComment (0000,0902) when the comment is not empty. An exception becomes 0xC211.
    allow : callable
        ``allow(calling_ae, peer_host) -> bool``; False rejects the association (calling AE title
        not recognised).
    max_associations : int
        Associations at once, counted from the moment a whole A-ASSOCIATE-RQ has arrived (while it
        is negotiated) until the association ends; one more is rejected at once (transient, local
        limit exceeded). Connections that have not sent a whole request wait in the gate
        (:mod:`.transport`) without a thread.
    max_pdu : int
        Our maximum P-DATA-TF length, announced in the A-ASSOCIATE-AC.
    network_timeout : float
        The ARTIM time and the time allowed for each PDU: a peer gets this long to send its whole
        A-ASSOCIATE-RQ, each later PDU (counted from the end of the one before), and to close the
        connection after A-RELEASE-RP or A-ABORT.
    reuse_port : bool
        Set SO_REUSEPORT so several processes can share the port.
    ssl_context : ssl.SSLContext, optional
        Server-side TLS context; the handshake runs in the gate, within the network timeout.
    on_association : callable, optional
        Called with an :class:`AssociationInfo` when an established association ends.
    on_reject : callable, optional
        Called with the reason (as logged) when an association request is rejected.
    accept_sop_class : callable
        Decides, per proposed abstract syntax, whether a storage context is accepted.
    incoming : callable, optional
        ``incoming(StoreRequest) -> file`` for a data set that reaches ``incoming_after`` bytes
        while it is still arriving: the rest of it is written to ``file`` (``write(bytes)``)
        instead of memory; ``file.dataset()`` gives the whole data set to ``store`` and
        ``file.close()`` is called afterwards, whatever happened. None keeps every data set in memory.
    incoming_after : int
        Size in bytes at which a data set goes to ``incoming``.
    max_waiting : int
        Connections held at once before an association or after it ended (see :class:`.transport.Gate`).
    """

    def __init__(self, ae_title: str, host: str, port: int, *,
                 store: Callable[[StoreRequest], tuple[int, str]],
                 allow: Callable[[str, str], bool],
                 max_associations: int = 16, max_pdu: int = 1 << 20, network_timeout: float = 60,
                 reuse_port: bool = False, ssl_context: ssl.SSLContext | None = None,
                 on_association: Callable[[AssociationInfo], None] | None = None,
                 on_reject: Callable[[str], None] | None = None,
                 accept_sop_class: Callable[[str], bool] = lambda uid: True,
                 incoming: Callable[[StoreRequest], Any] | None = None, incoming_after: int = 1 << 20,
                 max_waiting: int = 256) -> None:
        if not 4096 <= max_pdu <= 0xFFFFFFFF:
            raise ValueError(f"max_pdu must be between 4096 and 4294967295 bytes, got {max_pdu}")
        if max_associations < 1:
            raise ValueError(f"max_associations must be at least 1, got {max_associations}")
        if network_timeout <= 0:
            raise ValueError(f"network_timeout must be positive, got {network_timeout}")
        self.ae_title = ae_title
        self.host = host
        self._requested_port = port
        self.store = store
        self.allow = allow
        self.max_associations = max_associations
        self.max_pdu = max_pdu
        self.network_timeout = network_timeout
        self.reuse_port = reuse_port
        self.ssl_context = ssl_context
        self.on_association = on_association
        self.on_reject = on_reject
        self.accept_sop_class = accept_sop_class
        self.incoming = incoming
        self.incoming_after = incoming_after
        self.max_waiting = max_waiting
        self._gate: Gate | None = None
        self._port = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._active = 0

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        """Bind and listen, then accept on a background thread; returns at once."""
        if self._gate is not None:
            raise RuntimeError("the SCP is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self._requested_port), family=family, backlog=128,
                                        reuse_port=self.reuse_port and hasattr(socket, "SO_REUSEPORT"))
        self._port = int(listener.getsockname()[1])
        self._stopping.clear()
        self._gate = Gate(listener, artim=self.network_timeout, on_request=self._on_request,
                          ssl_context=self.ssl_context, max_connections=self.max_waiting, max_request=_MAX_REQUEST)
        self._gate.start()
        log.info("acceptor_listening", ae_title=self.ae_title, host=self.host, port=self._port,
                 tls=self.ssl_context is not None, max_pdu=self.max_pdu, max_associations=self.max_associations)

    @property
    def port(self) -> int:
        """The bound port (the free one the system chose when started with port 0)."""
        if self._gate is None:
            raise RuntimeError("the SCP is not started")
        return self._port

    @property
    def active_associations(self) -> int:
        """Associations being negotiated or served right now."""
        return self._active

    @property
    def waiting_connections(self) -> int:
        """Connections still sending their A-ASSOCIATE-RQ, or closing after their association ended."""
        return self._gate.waiting if self._gate is not None else 0

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end open associations and join their threads.

        A store callback that is running finishes and its response is sent; then the
        association's reads see end of stream and it aborts.
        """
        gate, self._gate = self._gate, None
        if gate is None:
            return
        self._stopping.set()
        gate.stop(timeout)
        with self._lock:
            connections = list(self._connections.items())
        for _, conn in connections:
            try:  # the plain socket's shutdown: SSLSocket.shutdown would drop the TLS state the response needs
                socket.socket.shutdown(conn, socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread, _ in connections:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- association requests (on the gate's thread) --------------------------

    def _on_request(self, sock: socket.socket, address: tuple, body: bytearray) -> None:
        gate = self._gate
        host = str(address[0])
        if gate is None:
            sock.close()
            return
        try:
            rq = parse_associate_rq(body)
        except ProtocolError as exc:  # Sta2 + invalid PDU: AA-1
            log.warning("association_failed", host=host, stage="negotiation", error=str(exc))
            gate.answer(sock, address, abort_pdu(ABORT_NOT_SPECIFIED, SOURCE_USER))
            return
        reject = self._check(rq, host)
        if reject is not None:
            log.warning("association_rejected", calling_ae=rq.calling_ae, called_ae=rq.called_ae, host=host,
                        reason=_REJECT_TEXT[reject])
            gate.answer(sock, address, encode_associate_rj(*reject))
            if self.on_reject is not None:
                self.on_reject(_REJECT_TEXT[reject])
            return
        started, thread = False, None
        try:  # the slot was taken by _check: whatever happens now, it and the socket are given back
            thread = threading.Thread(target=self._serve, args=(sock, address, rq),
                                      name=f"association-{host}:{address[1]}", daemon=True)
            with self._lock:
                self._connections[thread] = sock
            thread.start()
            started = True
        finally:
            if not started:
                with self._lock:
                    self._active -= 1
                    if thread is not None:
                        self._connections.pop(thread, None)
                sock.close()

    def _check(self, rq: AssociateRequest, host: str) -> tuple[int, int, int] | None:
        """Why the request is rejected, or None after taking an association slot for it."""
        if not rq.protocol_version & 1:
            return REJECT_PROTOCOL_VERSION
        if rq.application_context != APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT
        try:
            allowed = self.allow(rq.calling_ae, host)
        except Exception as exc:  # a broken allow-list must refuse, not crash
            log.error("allow_failed", error=f"{type(exc).__name__}: {exc}")
            allowed = False
        if not allowed:
            return REJECT_CALLING_AE
        with self._lock:
            if self._active >= self.max_associations:
                return REJECT_LOCAL_LIMIT
            self._active += 1
        return None

    def _serve(self, sock: socket.socket, address: tuple, rq: AssociateRequest) -> None:
        assoc = None
        try:
            assoc = _Association(self, sock, address, rq)
            assoc.run()
        except Exception as exc:  # the last line of defence: a bug must never take the acceptor down
            log.error("association_crashed", host=address[0], error=f"{type(exc).__name__}: {exc}")
            if assoc is None or not assoc.handed_on:
                try:
                    sock.close()
                except OSError:
                    pass
        finally:
            with self._lock:
                self._active -= 1
                self._connections.pop(threading.current_thread(), None)

    def _linger(self, sock: socket.socket, address: tuple) -> None:
        """After A-RELEASE-RP or A-ABORT: the gate waits for the peer to close (Sta13, ARTIM)."""
        gate = self._gate
        if gate is None or self._stopping.is_set():
            sock.close()
        else:
            gate.linger(sock, address)


class _Association:
    """One association from A-ASSOCIATE-AC to release or abort (Sta6 of PS3.8's table), on its own thread.

    The socket is this object's until :meth:`run` returns: then it is closed or handed back to the
    gate to wait for the peer's close.
    """

    def __init__(self, scp: StorageSCP, sock: socket.socket, address: tuple, rq: AssociateRequest) -> None:
        self.scp = scp
        self.sock = sock
        self.address = address
        self.rq = rq
        self.reader = PDUReader(sock)
        self.host = str(address[0])
        self.info = AssociationInfo(calling_ae=rq.calling_ae, called_ae=rq.called_ae, host=self.host,
                                    port=int(address[1]), started=time.monotonic())
        self._incoming: Any = None
        self.handed_on = False  # the socket went back to the gate (or was closed) when run() ended

    def _send(self, data: bytes) -> None:
        self.sock.settimeout(self.scp.network_timeout)  # reads leave their own, shorter, timeout behind
        self.sock.sendall(data)

    def _send_abort(self, reason: int, source: int) -> None:
        try:
            self._send(abort_pdu(reason, source))
        except OSError:
            pass

    def run(self) -> None:
        scp = self.scp
        linger = False
        try:
            negotiated = negotiate(self.rq, scp.accept_sop_class)
            self._send(encode_associate_ac(self.rq.called_ae, self.rq.calling_ae, negotiated.results(self.rq),
                                           scp.max_pdu))
            outcome = self._dimse_loop(negotiated)
            linger = outcome.startswith("released")
        except ProtocolError as exc:  # Sta6 + unexpected or invalid PDU: AA-8
            self._send_abort(exc.reason, SOURCE_PROVIDER)
            outcome, linger = f"aborted: {exc}", True
        except (TimeoutError, socket.timeout):  # the node gives up on a silent peer: an A-ABORT of its own
            self._send_abort(ABORT_NOT_SPECIFIED, SOURCE_USER)
            outcome, linger = "aborted: network timeout", True
        except MemoryError:  # a PDU or data set buffer could not be had: this association ends, the node goes on
            self._send_abort(ABORT_NOT_SPECIFIED, SOURCE_USER)
            outcome, linger = "aborted: out of memory", True
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            if scp._stopping.is_set():
                self._send_abort(ABORT_NOT_SPECIFIED, SOURCE_USER)
                outcome = "aborted: the node is stopping"
            else:
                outcome = f"aborted: connection lost ({type(exc).__name__})"
        try:
            self._finish(outcome)
        finally:
            self.handed_on = True
            if linger:
                scp._linger(self.sock, self.address)
            else:
                self.sock.close()

    def _finish(self, outcome: str) -> None:
        info = self.info
        info.outcome = outcome
        info.seconds = round(time.monotonic() - info.started, 3)
        event = log.info if outcome == "released" else log.warning
        event("association", outcome=outcome, calling_ae=info.calling_ae, called_ae=info.called_ae,
              host=info.host, instances=info.instances, bytes=info.bytes, echoes=info.echoes, failures=info.failures,
              seconds=info.seconds)
        if self.scp.on_association is not None:
            try:
                self.scp.on_association(info)
            except Exception as exc:
                log.error("on_association_failed", error=f"{type(exc).__name__}: {exc}")

    # -- DIMSE ---------------------------------------------------------------

    def _dimse_loop(self, neg: Negotiated) -> str:
        try:
            return self._dimse_messages(neg)
        finally:
            self._close_incoming()

    def _close_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            try:
                incoming.close()
            except Exception as exc:
                log.error("incoming_close_failed", error=f"{type(exc).__name__}: {exc}")

    def _request(self, neg: Negotiated, pcid: int, fields: dict[int, bytes], dataset: Any) -> StoreRequest:
        ctx = neg.contexts[pcid]
        return StoreRequest(
            calling_ae=neg.calling_ae, called_ae=neg.called_ae, host=self.host, sop_class_uid=ctx.abstract_syntax,
            transfer_syntax=ctx.transfer_syntax, affected_sop_class_uid=text(fields.get(0x0002)),
            affected_sop_instance_uid=text(fields.get(0x1000)), message_id=uint(fields.get(0x0110), 2, 0),
            dataset=dataset)

    def _open_incoming(self, neg: Negotiated, pcid: int, fields: dict[int, bytes], received: bytearray) -> Any:
        """The file the rest of a large data set goes to; one that cannot be written drains it instead."""
        request = self._request(neg, pcid, fields, b"")
        incoming = None
        try:
            incoming = self.scp.incoming(request)
            incoming.write(received)
            return incoming
        except Exception as exc:  # e.g. disk full: read the rest and drop it, answer Out of Resources
            log.error("incoming_failed", sop_uid=request.affected_sop_instance_uid,
                      error=f"{type(exc).__name__}: {exc}")
            if incoming is not None:
                self._incoming = incoming
                self._close_incoming()
            return _Unwritable(exc if isinstance(exc, OSError) else OSError(str(exc)))

    def _dimse_messages(self, neg: Negotiated) -> str:
        contexts = neg.contexts
        incoming_after = self.scp.incoming_after if self.scp.incoming is not None else 0
        max_pdu, timeout = self.scp.max_pdu, self.scp.network_timeout
        command = bytearray()
        fields: dict[int, bytes] | None = None  # a parsed command waiting for its data set
        keep = False                            # whether that data set is kept (C-STORE) or only counted
        dataset = bytearray()
        ignored = 0
        context_id = 0
        while True:
            pdu_type, body = self.reader.read(max_pdu, time.monotonic() + timeout)
            if pdu_type == RELEASE_RQ:
                self._send(RELEASE_RP_PDU)
                return "released" if fields is None and not command else "released mid-message"
            if pdu_type == ABORT:
                return "aborted by peer"
            if pdu_type != P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02x} on an established association",
                                    ABORT_UNEXPECTED_PDU)
            for pcid, mch, fragment in pdvs(body):
                if pcid not in contexts:
                    raise ProtocolError(f"PDV on presentation context {pcid}, which was not accepted",
                                        ABORT_UNEXPECTED_PARAMETER)
                if mch & 1:
                    if fields is not None or (command and pcid != context_id):
                        raise ProtocolError("command fragment while a data set was expected", ABORT_UNEXPECTED_PARAMETER)
                    context_id = pcid
                    if len(command) + len(fragment) > MAX_COMMAND:
                        raise ProtocolError(f"DIMSE command set longer than {MAX_COMMAND} bytes",
                                            ABORT_INVALID_PARAMETER)
                    command += fragment
                    if not mch & 2:
                        continue
                    parsed = parse_command(command)
                    command = bytearray()
                    cmd = uint(parsed.get(0x0100), 2, -1)
                    if uint(parsed.get(0x0800), 2, NO_DATA_SET) == NO_DATA_SET:
                        self._dispatch(neg, pcid, parsed, None)
                    elif cmd == Command.C_ECHO_RQ:
                        raise ProtocolError("C-ECHO-RQ announcing a data set", ABORT_INVALID_PARAMETER)
                    else:
                        fields, keep, ignored = parsed, cmd == Command.C_STORE_RQ, 0
                else:
                    if fields is None or pcid != context_id:
                        raise ProtocolError("data set fragment without its command", ABORT_UNEXPECTED_PARAMETER)
                    if not keep:  # a request the node answers without reading its data set
                        ignored += len(fragment)
                        if ignored > MAX_IGNORED_DATA_SET:
                            raise ProtocolError(f"data set of an unsupported request longer than "
                                                f"{MAX_IGNORED_DATA_SET} bytes", ABORT_INVALID_PARAMETER)
                    elif self._incoming is not None:
                        try:
                            self._incoming.write(fragment)
                        except OSError as exc:  # e.g. disk full: drain the rest, answer a failure status
                            log.error("incoming_failed", sop_uid=text(fields.get(0x1000)),
                                      error=f"{type(exc).__name__}: {exc}")
                            self._close_incoming()
                            self._incoming = _Unwritable(exc)
                    else:
                        dataset += fragment
                        if incoming_after and len(dataset) >= incoming_after and not mch & 2:
                            self._incoming = self._open_incoming(neg, pcid, fields, dataset)
                            dataset = bytearray()
                    if mch & 2:
                        done, fields = fields, None
                        try:
                            self._dispatch(neg, pcid, done, dataset)
                        finally:
                            self._close_incoming()
                        dataset = bytearray()

    def _dispatch(self, neg: Negotiated, pcid: int, fields: dict[int, bytes], dataset: bytearray | None) -> None:
        ctx = neg.contexts[pcid]
        cmd = uint(fields.get(0x0100), 2, -1)
        message_id = uint(fields.get(0x0110), 2, 0)
        if cmd == Command.C_STORE_RQ:
            status, comment = self._store(neg, pcid, fields, dataset)
            rsp = encode_response(Command.C_STORE_RSP, message_id, status,
                                  text(fields.get(0x0002)) or ctx.abstract_syntax, text(fields.get(0x1000)), comment)
        elif cmd == Command.C_ECHO_RQ:
            self.info.echoes += 1
            rsp = encode_response(Command.C_ECHO_RSP, message_id, Status.SUCCESS,
                                  text(fields.get(0x0002)) or ctx.abstract_syntax)
        elif cmd == Command.C_CANCEL_RQ:
            return  # nothing of ours is cancellable; C-CANCEL has no response
        elif cmd in ANSWERED_UNSUPPORTED:
            self.info.failures += 1
            rsp = encode_response(cmd | 0x8000, message_id, Status.UNRECOGNIZED_OPERATION,
                                  text(fields.get(0x0002) or fields.get(0x0003)),
                                  text(fields.get(0x1000) or fields.get(0x1001)))
        else:
            raise ProtocolError(f"unexpected DIMSE command 0x{cmd:04x}", ABORT_UNEXPECTED_PARAMETER)
        self._send(encode_p_data(pcid, rsp, neg.peer_max_pdu))

    def _store(self, neg: Negotiated, pcid: int, fields: dict[int, bytes], dataset: Any) -> tuple[int, str]:
        if dataset is None:
            self.info.failures += 1
            return Status.CANNOT_UNDERSTAND, "C-STORE request without a data set"
        incoming = self._incoming
        if incoming is not None:
            try:
                dataset = incoming.dataset()
            except OSError as exc:
                log.error("store_callback_failed", sop_uid=text(fields.get(0x1000)), reason="cannot write",
                          error=f"{type(exc).__name__}: {exc}")
                self.info.failures += 1
                return Status.OUT_OF_RESOURCES, "cannot write the instance"
        request = self._request(neg, pcid, fields, dataset)
        request.incoming = incoming
        try:
            status, comment = self.scp.store(request)
            status, comment = int(status), str(comment or "")
            if not 0 <= status <= 0xFFFF:
                raise ValueError(f"status {status} is not a 16-bit DIMSE status")
        except Exception as exc:
            log.error("store_callback_failed", sop_uid=request.affected_sop_instance_uid,
                      error=f"{type(exc).__name__}: {exc}")
            status, comment = Status.HANDLER_FAILED, "the node could not process the instance"
        if is_kept(status):
            self.info.instances += 1
            self.info.bytes += len(dataset)
        else:
            self.info.failures += 1
        return status, comment


class _Unwritable:
    """Stands in for an incoming file that failed: the rest of the data set is read and dropped."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def write(self, data: Any) -> None:
        pass

    def dataset(self) -> memoryview:
        raise self.error

    def close(self) -> None:
        pass
