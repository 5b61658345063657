"""The C-STORE and C-ECHO service class provider: the receiver's upper layer, one blocking thread per association.

Each connection reads a PDU header, ``recv_into`` its body, walks its PDV items and hands the data
set bytes to a ``store`` callback exactly as they arrived, then answers with a C-STORE-RSP. A data
set that grows past ``incoming_after`` bytes goes to a file while it arrives instead of memory.
Negotiation follows PS3.8 9.3.2-9.3.4: Verification in Implicit VR Little Endian, storage
contexts in the sender's first standard transfer syntax (the node keeps instances as they came).
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
    ABORT, ABORT_NOT_SPECIFIED, ABORT_UNEXPECTED_PARAMETER, ABORT_UNEXPECTED_PDU, ASSOCIATE_RQ,
    CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED, CONTEXT_ACCEPTED, CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED, P_DATA_TF,
    REJECT_APPLICATION_CONTEXT, REJECT_CALLING_AE, REJECT_LOCAL_LIMIT, REJECT_PROTOCOL_VERSION, RELEASE_RP_PDU,
    RELEASE_RQ, SOURCE_USER, AssociateRequest, PDUReader, ProtocolError, abort_pdu, encode_associate_ac,
    encode_associate_rj, encode_p_data, parse_associate_rq, pdvs,
)
from .status import Status, is_kept
from .syntaxes import APPLICATION_CONTEXT, IMPLICIT_VR_LE, VERIFICATION, is_standard_transfer_syntax

log = structlog.get_logger("dicomnode.dimse.acceptor")

# Non-P-DATA PDUs (association requests) larger than this are refused as malformed.
_MAX_CONTROL_PDU = 1 << 20
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
    """Accept Verification with Implicit VR LE and storage contexts in their first proposed standard syntax.

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
            syntax = next((ts for ts in transfers if is_standard_transfer_syntax(ts)), None)
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
        Associations beyond this are rejected (transient, local limit exceeded).
    max_pdu : int
        Our maximum P-DATA-TF length, announced in the A-ASSOCIATE-AC.
    network_timeout : float
        Seconds of silence from the peer before the association is aborted.
    reuse_port : bool
        Set SO_REUSEPORT so several processes can share the port.
    ssl_context : ssl.SSLContext, optional
        Server-side TLS context; accepted sockets are wrapped (handshake on the association thread).
    on_association : callable, optional
        Called with an :class:`AssociationInfo` when an established association ends.
    accept_sop_class : callable
        Decides, per proposed abstract syntax, whether a storage context is accepted.
    incoming : callable, optional
        ``incoming(StoreRequest) -> file`` for a data set that reaches ``incoming_after`` bytes
        while it is still arriving: the rest of it is written to ``file`` (``write(bytes)``)
        instead of memory; ``file.dataset()`` gives the whole data set to ``store`` and
        ``file.close()`` is called afterwards, whatever happened. None keeps every data set in memory.
    incoming_after : int
        Size in bytes at which a data set goes to ``incoming``.
    """

    def __init__(self, ae_title: str, host: str, port: int, *,
                 store: Callable[[StoreRequest], tuple[int, str]],
                 allow: Callable[[str, str], bool],
                 max_associations: int = 16, max_pdu: int = 1 << 20, network_timeout: float = 60,
                 reuse_port: bool = False, ssl_context: ssl.SSLContext | None = None,
                 on_association: Callable[[AssociationInfo], None] | None = None,
                 accept_sop_class: Callable[[str], bool] = lambda uid: True,
                 incoming: Callable[[StoreRequest], Any] | None = None, incoming_after: int = 1 << 20) -> None:
        if not 4096 <= max_pdu <= 0xFFFFFFFF:
            raise ValueError(f"max_pdu must be between 4096 and 4294967295 bytes, got {max_pdu}")
        if max_associations < 1:
            raise ValueError(f"max_associations must be at least 1, got {max_associations}")
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
        self.accept_sop_class = accept_sop_class
        self.incoming = incoming
        self.incoming_after = incoming_after
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._active = 0

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        """Bind and listen, then accept on a background thread; returns at once."""
        if self._listener is not None:
            raise RuntimeError("the SCP is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self._requested_port), family=family, backlog=128,
                                              reuse_port=self.reuse_port and hasattr(socket, "SO_REUSEPORT"))
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"acceptor-{self.port}", daemon=True)
        self._accept_thread.start()
        log.info("acceptor_listening", ae_title=self.ae_title, host=self.host, port=self.port,
                 tls=self.ssl_context is not None, max_pdu=self.max_pdu, max_associations=self.max_associations)

    @property
    def port(self) -> int:
        """The bound port (the free one the system chose when started with port 0)."""
        if self._listener is None:
            raise RuntimeError("the SCP is not started")
        return int(self._listener.getsockname()[1])

    @property
    def active_associations(self) -> int:
        """Connections being negotiated or served right now."""
        return self._active

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end open associations and join their threads.

        A store callback that is running finishes and its response is sent; then the
        association's reads see end of stream and it closes.
        """
        if self._listener is None:
            return
        self._stopping.set()
        listener, self._listener = self._listener, None
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
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

    # -- accepting -----------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, address = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)  # e.g. EMFILE: let connections close before trying again
                continue
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            with self._lock:
                over_limit = self._active >= self.max_associations
                self._active += 1
            thread = threading.Thread(target=self._serve, args=(conn, address, over_limit),
                                      name=f"acceptor-{address[0]}:{address[1]}", daemon=True)
            with self._lock:
                self._connections[thread] = conn
            thread.start()

    def _serve(self, conn: socket.socket, address: tuple, over_limit: bool) -> None:
        assoc = _Association(self, conn, address)
        try:
            assoc.run(over_limit)
        except Exception as exc:  # the last line of defence: a bug must never take the acceptor down
            log.error("association_crashed", host=address[0], error=f"{type(exc).__name__}: {exc}")
        finally:
            try:
                assoc.sock.close()
            except OSError:
                pass
            with self._lock:
                self._active -= 1
                self._connections.pop(threading.current_thread(), None)


class _Association:
    """One connection from A-ASSOCIATE-RQ to release or abort, on its own thread."""

    def __init__(self, scp: StorageSCP, conn: socket.socket, address: tuple) -> None:
        self.scp = scp
        self.sock = conn
        self.reader = PDUReader(conn)
        self.host = str(address[0])
        self.port = int(address[1])
        self.info = AssociationInfo(calling_ae="", called_ae="", host=self.host, port=self.port, started=time.monotonic())
        self._incoming: Any = None

    def _send_abort(self, reason: int, source: int = 2) -> None:
        try:
            self.sock.sendall(abort_pdu(reason, source))
        except OSError:
            pass

    # -- association ---------------------------------------------------------

    def run(self, over_limit: bool) -> None:
        scp = self.scp
        self.sock.settimeout(scp.network_timeout or None)
        try:
            if scp.ssl_context is not None:
                self.sock = self.reader.sock = scp.ssl_context.wrap_socket(self.sock, server_side=True)
                with scp._lock:  # stop() must shut down the socket that now owns the descriptor
                    scp._connections[threading.current_thread()] = self.sock
            pdu_type, body = self.reader.read(_MAX_CONTROL_PDU)
            if pdu_type != ASSOCIATE_RQ:
                raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02x}", ABORT_UNEXPECTED_PDU)
            rq = parse_associate_rq(body)
        except (ProtocolError, OSError, ssl.SSLError, ConnectionError) as exc:
            self._fail_before_association(exc)
            return
        self.info.calling_ae, self.info.called_ae = rq.calling_ae, rq.called_ae
        reject = self._check(rq, over_limit)
        if reject is not None:
            try:
                self.sock.sendall(encode_associate_rj(*reject))
            except OSError:
                pass
            log.warning("association_rejected", calling_ae=rq.calling_ae, called_ae=rq.called_ae, host=self.host,
                        reason=_REJECT_TEXT[reject])
            return
        negotiated = negotiate(rq, scp.accept_sop_class)
        try:
            self.sock.sendall(encode_associate_ac(rq.called_ae, rq.calling_ae, negotiated.results(rq), scp.max_pdu))
            outcome = self._dimse_loop(negotiated)
        except ProtocolError as exc:
            self._send_abort(exc.reason)
            outcome = f"aborted: {exc}"
        except (TimeoutError, socket.timeout):
            self._send_abort(ABORT_NOT_SPECIFIED)
            outcome = "aborted: network timeout"
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            if scp._stopping.is_set():
                self._send_abort(ABORT_NOT_SPECIFIED, source=SOURCE_USER)
                outcome = "aborted: the node is stopping"
            else:
                outcome = f"aborted: connection lost ({type(exc).__name__})"
        self._finish(outcome)

    def _fail_before_association(self, exc: BaseException) -> None:
        if isinstance(exc, ProtocolError):
            self._send_abort(exc.reason)
        elif isinstance(exc, (TimeoutError, socket.timeout)):
            self._send_abort(ABORT_NOT_SPECIFIED)
        log.warning("association_failed", host=self.host, stage="negotiation",
                    error=f"{type(exc).__name__}: {exc}")

    def _check(self, rq: AssociateRequest, over_limit: bool) -> tuple[int, int, int] | None:
        if not rq.protocol_version & 1:
            return REJECT_PROTOCOL_VERSION
        if rq.application_context != APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT
        try:
            allowed = self.scp.allow(rq.calling_ae, self.host)
        except Exception as exc:  # a broken allow-list must refuse, not crash
            log.error("allow_failed", error=f"{type(exc).__name__}: {exc}")
            allowed = False
        if not allowed:
            return REJECT_CALLING_AE
        if over_limit:
            return REJECT_LOCAL_LIMIT
        return None

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

    def _open_incoming(self, neg: Negotiated, pcid: int, fields: dict[int, bytes]) -> Any:
        request = self._request(neg, pcid, fields, b"")
        try:
            return self.scp.incoming(request)
        except Exception as exc:  # keep receiving into memory; storing will report a real failure
            log.error("incoming_failed", sop_uid=request.affected_sop_instance_uid,
                      error=f"{type(exc).__name__}: {exc}")
            return None

    def _dimse_messages(self, neg: Negotiated) -> str:
        contexts = neg.contexts
        incoming_after = self.scp.incoming_after if self.scp.incoming is not None else 0
        max_pdu = self.scp.max_pdu
        command = bytearray()
        fields: dict[int, bytes] | None = None  # a parsed command waiting for its data set
        dataset = bytearray()
        context_id = 0
        while True:
            pdu_type, body = self.reader.read(max_pdu)
            if pdu_type == RELEASE_RQ:
                self.sock.sendall(RELEASE_RP_PDU)
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
                    command += fragment
                    if not mch & 2:
                        continue
                    parsed = parse_command(command)
                    command = bytearray()
                    if uint(parsed.get(0x0800), 2, NO_DATA_SET) == NO_DATA_SET:
                        self._dispatch(neg, pcid, parsed, None)
                    else:
                        fields = parsed
                else:
                    if fields is None or pcid != context_id:
                        raise ProtocolError("data set fragment without its command", ABORT_UNEXPECTED_PARAMETER)
                    if self._incoming is not None:
                        try:
                            self._incoming.write(fragment)
                        except OSError as exc:  # e.g. disk full: drain the rest, answer a failure status
                            self._close_incoming()
                            self._incoming = _Unwritable(exc)
                    else:
                        dataset += fragment
                        if incoming_after and len(dataset) >= incoming_after and not mch & 2 \
                                and uint(fields.get(0x0100), 2, -1) == Command.C_STORE_RQ:
                            self._incoming = self._open_incoming(neg, pcid, fields)
                            if self._incoming is not None:
                                self._incoming.write(dataset)
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
        self.sock.sendall(encode_p_data(pcid, rsp, neg.peer_max_pdu))

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
