"""Connections outside an association: accept, TLS handshake, read the A-ASSOCIATE-RQ, wait for the peer to close.

Everything here runs on one thread with non-blocking sockets, so a connection that has not been
accepted as an association costs a socket, a few dozen bytes of state and the bytes its peer
actually sent, never a thread or a PDU-sized buffer. Two states of PS3.8's table live here:

- **Sta2** (transport open, awaiting A-ASSOCIATE-RQ): the request must arrive whole within the
  ARTIM time, counted from the connection, however the bytes trickle in; otherwise the
  connection is closed (AA-2). Any other PDU is answered with A-ABORT (AA-1) and a PDU type that
  does not exist, or a request longer than ``max_request``, too. A complete request goes to
  ``on_request``, which answers it (and hands the socket to an association thread or back here).
- **Sta13** (awaiting transport close, after A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT): PDUs are
  ignored (AA-6), except an A-ASSOCIATE-RQ or an unknown PDU, answered with A-ABORT (AA-7); an
  A-ABORT, the peer's close or the ARTIM time ends it (AA-2, AR-5).

At most ``max_connections`` connections wait here; a new one beyond that closes the oldest, so a
flood of stalled connections can delay but never lock out a sender that talks at once.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from typing import Callable

import structlog

from .pdu import (
    ABORT, ABORT_NOT_SPECIFIED, ABORT_UNEXPECTED_PDU, ABORT_UNRECOGNIZED_PDU, ASSOCIATE_RQ, PDU_HEADER, PDU_TYPES,
    SOURCE_PROVIDER, SOURCE_USER, abort_pdu,
)

log = structlog.get_logger("dicomnode.dimse.transport")

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_CHUNK = 65536
_SUMMARY_EVERY = 10.0  # seconds between log lines about dropped connections, so a flood cannot flood the log


class _Connection:
    __slots__ = ("sock", "address", "state", "deadline", "header", "got", "length", "body", "skip", "started",
                 "writing")

    def __init__(self, sock: socket.socket, address: tuple, state: str, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.state = state          # "handshake", "request" (Sta2) or "closing" (Sta13)
        self.deadline = deadline
        self.header = bytearray(6)
        self.got = 0                # bytes of the PDU header read so far
        self.length = -1            # body length once the header is complete
        self.body: bytearray | None = None
        self.skip = 0               # bytes of an ignored PDU body still to discard (Sta13)
        self.started = time.monotonic()
        self.writing = False        # waiting for the socket to become writable (a TLS handshake's turn)


class Gate:
    """The acceptor's single network thread for everything before and after an association.

    Parameters
    ----------
    listener : socket.socket
        A bound, listening socket; the gate accepts on it until :meth:`stop`.
    artim : float
        The ARTIM time in seconds (the node's ``network_timeout``).
    on_request : callable
        ``on_request(sock, address, body)`` with the body of a complete A-ASSOCIATE-RQ, called on
        the gate's thread; the socket is then the callee's (blocking again, timeout unset).
    ssl_context : ssl.SSLContext, optional
        Server-side TLS: the handshake runs here, also within the ARTIM time.
    max_connections : int
        Connections held here at once (negotiating and closing together).
    max_request : int
        Largest A-ASSOCIATE-RQ accepted, in bytes.
    """

    def __init__(self, listener: socket.socket, *, artim: float,
                 on_request: Callable[[socket.socket, tuple, bytearray], None],
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 256,
                 max_request: int = 1 << 17) -> None:
        self.listener = listener
        self.artim = artim
        self.on_request = on_request
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.max_request = max_request
        self._selector = selectors.DefaultSelector()
        self._connections: dict[int, _Connection] = {}
        self._waker_r, self._waker_w = socket.socketpair()
        self._handed: list[tuple[socket.socket, tuple]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._dropped: dict[str, int] = {}
        self._last_summary = 0.0

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        self.listener.setblocking(False)
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)  # a full waker must never block an association thread
        self._selector.register(self.listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._waker_r, selectors.EVENT_READ, "waker")
        self._thread = threading.Thread(target=self._run, name=f"acceptor-{self.listener.getsockname()[1]}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection waiting here; returns once the thread has ended."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def waiting(self) -> int:
        """Connections negotiating or closing here right now."""
        return len(self._connections)

    def linger(self, sock: socket.socket, address: tuple) -> None:
        """Take back a socket whose association ended by A-RELEASE-RP or A-ABORT: wait for the peer's close (Sta13)."""
        with self._lock:
            taken = not self._stopping
            if taken:
                self._handed.append((sock, address))
        if taken:
            self._wake()
        else:
            _close(sock)

    def answer(self, sock: socket.socket, address: tuple, pdu: bytes) -> None:
        """From ``on_request``: send a short PDU (A-ASSOCIATE-RJ, A-ABORT) and wait for the peer's close (Sta13)."""
        _send_quietly(sock, pdu)
        self._hold(_Connection(sock, address, "closing", time.monotonic() + self.artim))

    def _wake(self) -> None:
        try:
            self._waker_w.send(b"\x00")
        except OSError:
            pass

    # -- the loop ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    handed, self._handed = self._handed, []
                try:
                    self._turn(handed)
                except Exception as exc:  # the gate is the node's only door: log the bug and keep it open
                    log.error("acceptor_gate_crashed", error=f"{type(exc).__name__}: {exc}")
                    time.sleep(0.1)
        finally:
            for conn in list(self._connections.values()):
                self._drop(conn)
            with self._lock:
                self._stopping = True
                handed, self._handed = self._handed, []
            for sock, _ in handed:
                _close(sock)
            self._selector.close()
            _close(self.listener)
            _close(self._waker_r)
            _close(self._waker_w)

    def _turn(self, handed: list[tuple[socket.socket, tuple]]) -> None:
        """One turn of the loop: take back handed sockets, expire deadlines, serve what is ready."""
        now = time.monotonic()
        for sock, address in handed:
            self._hold(_Connection(sock, address, "closing", now + self.artim))
        self._expire(now)
        timeout = min((c.deadline for c in self._connections.values()), default=now + 1.0) - now
        for key, _ in self._selector.select(max(0.0, min(timeout, 1.0))):
            if key.data == "listener":
                self._accept()
            elif key.data == "waker":
                try:
                    while self._waker_r.recv(4096):
                        pass
                except _WOULD_BLOCK:
                    pass
            else:
                conn = self._connections.get(key.fd)
                if conn is not None:
                    try:
                        self._step(conn)
                    except Exception as exc:  # a bug met by one connection must not close the door
                        log.error("acceptor_connection_crashed", error=f"{type(exc).__name__}: {exc}")
                        self._drop(conn)
        self._summarise()

    def _accept(self) -> None:
        for _ in range(64):  # a burst at a time, so the connections already here keep being served
            try:
                sock, address = self.listener.accept()
            except _WOULD_BLOCK:
                return
            except OSError:  # e.g. EMFILE: free a descriptor by closing the oldest waiting connection
                if not self._evict_oldest("descriptors exhausted"):
                    time.sleep(0.01)
                return
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                state = "request"
                if self.ssl_context is not None:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                    state = "handshake"
            except (OSError, ValueError):
                _close(sock)
                continue
            self._hold(_Connection(sock, address, state, time.monotonic() + self.artim))

    def _hold(self, conn: _Connection) -> None:
        while len(self._connections) >= self.max_connections:
            self._evict_oldest("too many connections waiting")
        try:
            conn.sock.setblocking(False)
            self._selector.register(conn.sock, selectors.EVENT_READ, "connection")
        except (OSError, ValueError):
            _close(conn.sock)
            return
        self._connections[conn.sock.fileno()] = conn

    def _evict_oldest(self, why: str) -> bool:
        if not self._connections:
            return False
        oldest = min(self._connections.values(), key=lambda c: c.started)
        self._count(why)
        self._drop(oldest)
        return True

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._connections.values() if c.deadline <= now]:
            if conn.state != "closing":  # Sta2 + ARTIM expired: AA-2, close without a word
                self._count("no association request within the network timeout")
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        self._release(conn)
        _close(conn.sock)

    def _drop_after_abort(self, conn: _Connection) -> None:
        """Close after the peer's A-ABORT, reading the rest of it first: unread bytes would make the close a reset."""
        try:
            conn.sock.recv(min(conn.length, 64))
        except (OSError, ValueError):
            pass
        self._drop(conn)

    def _release(self, conn: _Connection) -> None:
        self._connections.pop(conn.sock.fileno(), None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _count(self, why: str) -> None:
        self._dropped[why] = self._dropped.get(why, 0) + 1

    def _summarise(self) -> None:
        now = time.monotonic()
        if self._dropped and now - self._last_summary >= _SUMMARY_EVERY:
            log.warning("connections_dropped", stage="before association", counts=dict(self._dropped),
                        waiting=len(self._connections))
            self._dropped.clear()
            self._last_summary = now

    # -- one connection ------------------------------------------------------

    def _step(self, conn: _Connection) -> None:
        try:
            if conn.writing:
                conn.writing = False
                self._selector.modify(conn.sock, selectors.EVENT_READ, "connection")
            if conn.state == "handshake":
                conn.sock.do_handshake()  # type: ignore[attr-defined]
                conn.state = "request"
            while True:  # read until the socket would block: TLS may hold decrypted bytes select cannot see
                if conn.state == "request":
                    if self._read_request(conn):
                        return
                elif self._read_closing(conn):
                    return
        except ssl.SSLWantWriteError:
            conn.writing = True
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, "connection")
        except _WOULD_BLOCK:
            pass
        except (OSError, ValueError) as exc:  # reset, TLS failure: nothing to answer
            if conn.state != "closing":
                self._count(f"connection failed ({type(exc).__name__})")
            self._drop(conn)

    def _read_header(self, conn: _Connection) -> bool:
        """Read toward the 6-byte PDU header; True once it is complete. Raises ConnectionError at end of stream."""
        view = memoryview(conn.header)
        n = conn.sock.recv_into(view[conn.got:], 6 - conn.got)
        if n == 0:
            raise ConnectionError("closed by the peer")
        conn.got += n
        if conn.got < 6:
            return False
        conn.got = 0
        conn.length = PDU_HEADER.unpack(conn.header)[1]
        return True

    def _read_request(self, conn: _Connection) -> bool:
        """One read in Sta2; True when the connection left this loop (answered, handed on or dropped)."""
        if conn.body is None:
            try:
                if not self._read_header(conn):
                    return False
            except ConnectionError:  # Sta2 + transport closed: AA-5
                self._drop(conn)
                return True
            pdu_type = conn.header[0]
            if pdu_type == ABORT:  # AA-2
                self._drop_after_abort(conn)
                return True
            if pdu_type != ASSOCIATE_RQ or conn.length > self.max_request:  # AA-1
                why = "not an association request" if pdu_type != ASSOCIATE_RQ else "association request too long"
                self._count(why)
                self._to_closing(conn, abort_pdu(ABORT_NOT_SPECIFIED, SOURCE_USER))
                conn.skip = conn.length
                return False
            conn.body = bytearray()
        want = conn.length - len(conn.body)
        if want:
            chunk = conn.sock.recv(min(want, _CHUNK))
            if not chunk:
                self._drop(conn)
                return True
            conn.body += chunk
            if len(conn.body) < conn.length:
                return False
        self._release(conn)
        try:
            conn.sock.setblocking(True)
        except OSError:
            _close(conn.sock)
            return True
        try:
            self.on_request(conn.sock, conn.address, conn.body)
        except Exception as exc:  # the callee owns the socket now, but a bug there must not leak it
            log.error("acceptor_request_failed", error=f"{type(exc).__name__}: {exc}")
            _close(conn.sock)
        return True

    def _to_closing(self, conn: _Connection, pdu: bytes) -> None:
        _send_quietly(conn.sock, pdu)
        conn.state, conn.body, conn.got = "closing", None, 0
        conn.deadline = time.monotonic() + self.artim

    def _read_closing(self, conn: _Connection) -> bool:
        """One read in Sta13; True when the connection is closed."""
        try:
            if conn.skip:
                data = conn.sock.recv(min(conn.skip, _CHUNK))
                if not data:
                    raise ConnectionError("closed by the peer")
                conn.skip -= len(data)
                return False
            if not self._read_header(conn):
                return False
        except ConnectionError:  # AR-5: the peer closed, as it should
            self._drop(conn)
            return True
        pdu_type = conn.header[0]
        if pdu_type == ABORT:  # AA-2
            self._drop_after_abort(conn)
            return True
        if pdu_type == ASSOCIATE_RQ:  # AA-7
            _send_quietly(conn.sock, abort_pdu(ABORT_UNEXPECTED_PDU, SOURCE_PROVIDER))
        elif pdu_type not in PDU_TYPES:  # AA-7
            _send_quietly(conn.sock, abort_pdu(ABORT_UNRECOGNIZED_PDU, SOURCE_PROVIDER))
        conn.skip = conn.length  # AA-6: anything else is ignored
        return False


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send a short PDU on a socket that may be non-blocking; a peer that does not read it loses it."""
    try:
        sock.send(data)
    except (OSError, ValueError):
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass

