"""Receiver: the C-ECHO / C-STORE SCP.

An instance is written exactly as it arrived (file meta plus the encoded dataset, in the transfer
syntax it came in), fsynced, renamed into the spool and indexed before the success status goes
back. Anything wrong with a dataset gets a DICOM failure status and one log line; the association
and the node carry on.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from .config import Config
from .fastscp import FastStorageSCP, StoreRequest, is_storage_like, part10_header
from .header import Header, header_from_dataset, read_header, text
from .logs import debug_enabled
from .store import ROUTING_KEYWORDS, IncomingFile, InstanceRecord, Store, valid_uid

log = structlog.get_logger("dicomnode.receiver")

# DICOM status codes of the Storage Service Class (PS3.4 B.2.3)
SUCCESS = 0x0000
REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
REFUSED_OUT_OF_RESOURCES = 0xA700
ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
ERROR_CANNOT_UNDERSTAND = 0xC000

STORAGE_SOP_CLASSES = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())

# Every other association is refused with "calling AE title not recognised" when it matches nobody.
_NOBODY = ["\x7f"]


class _AllowListAE(AE):
    """An AE whose calling-AE allow-list depends on the peer's host.

    pynetdicom checks ``require_calling_aet`` while the acceptor's association thread negotiates,
    so the thread tells us the peer address; the reject then carries the proper A-ASSOCIATE-RJ
    reason (calling AE title not recognised).
    """

    allowed: list[tuple[str, str | None]] = []

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        host = getattr(getattr(assoc, "requestor", None), "address", None)
        titles = [ae for ae, h in self.allowed if h is None or h == host]
        return titles or _NOBODY

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:  # pynetdicom's __init__ sets []
        pass


class _Server(ThreadedAssociationServer):
    """Sets TCP_NODELAY on every accepted socket and lets several processes share the port."""

    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self):  # type: ignore[override]
        client, address = super().get_request()
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return client, address


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def record_from_header(header: Header, path: Path, size: int, calling_ae: str | None = None, host: str | None = None,
                       transfer_syntax: str = "") -> InstanceRecord:
    number = text(header, "InstanceNumber")
    try:
        instance_number = int(float(number)) if number else None
    except ValueError:
        instance_number = None
    return InstanceRecord(
        sop_uid=text(header, "SOPInstanceUID"), series_uid=text(header, "SeriesInstanceUID"),
        study_uid=text(header, "StudyInstanceUID"), sop_class_uid=text(header, "SOPClassUID"),
        transfer_syntax=transfer_syntax, instance_number=instance_number, path=path, size=size,
        attributes={kw: header[kw] for kw in ROUTING_KEYWORDS if kw in header}, calling_ae=calling_ae,
        calling_host=host, study_date=text(header, "StudyDate") or None,
    )


def record_from(ds: Dataset, path: Path, size: int, calling_ae: str | None = None, host: str | None = None,
                transfer_syntax: str | None = None) -> InstanceRecord:
    """An index record from a pydicom Dataset (files read by other means than the receiver)."""
    if transfer_syntax is None:
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else ""
    return record_from_header(header_from_dataset(ds), path, size, calling_ae, host, transfer_syntax)


def reindex_file(path: Path) -> InstanceRecord | None:
    """An index record for a whole spool file (start-up reconciliation); None for a damaged one."""
    try:
        meta = read_file_meta_info(path)
        ts = str(meta.TransferSyntaxUID)
        raw = path.read_bytes()
        start = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble, DICM, (0002,0000), group
        header = read_header(memoryview(raw)[start:], ts)
        return record_from_header(header, path, len(raw), transfer_syntax=ts)
    except Exception as exc:  # a file cut off mid-write was never acknowledged: set it aside
        log.warning("spool_file_damaged", path=str(path), error=f"{type(exc).__name__}: {exc}", action="moved to quarantine")
        return None



class Receiver:
    """The node's storage SCP on ``node.host:node.port``."""

    def __init__(self, cfg: Config, store: Store, reuse_port: bool = False) -> None:
        self.cfg = cfg
        self.store = store
        self.reuse_port = reuse_port
        self._server: ThreadedAssociationServer | None = None
        self._scp: FastStorageSCP | None = None
        self._active = 0
        self._lock = threading.Lock()
        self.stored = 0
        self.extra_classes = frozenset(cfg.node.extra_sop_classes)

    # -- handlers ------------------------------------------------------------

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        assoc = event.assoc
        status, comment = self.store_bytes(
            event.request.DataSet.getvalue(), str(event.context.transfer_syntax), str(event.context.abstract_syntax),
            str(event.request.AffectedSOPInstanceUID or ""), assoc.requestor.ae_title, assoc.requestor.address)
        if status == SUCCESS:
            assoc._dn_count = getattr(assoc, "_dn_count", 0) + 1  # per-association tally for the log line
            return SUCCESS
        return _failure(status, comment)

    def store_bytes(self, dataset: bytes | memoryview, transfer_syntax: str, context_class: str, affected_uid: str,
                    calling: str, host: str, incoming: IncomingFile | None = None) -> tuple[int, str]:
        """Check, write durably and index one received data set; returns (status, error comment).

        ``dataset`` is the encoded data set as it arrived (no file meta). It is written after a file
        meta header of our own, unchanged, so the spool file is the instance in the syntax it came in.
        A large data set arrives already written to ``incoming`` (that header first): the file is
        then flushed and renamed into the spool instead of written again.
        """
        try:
            header = read_header(dataset, transfer_syntax)
        except Exception as exc:
            log.warning("store_rejected", reason="malformed or truncated data set", error=type(exc).__name__,
                        calling_ae=calling, sop_class=context_class)
            return ERROR_CANNOT_UNDERSTAND, "malformed or truncated data set"
        sop_uid, study_uid, series_uid, sop_class = (
            text(header, kw) for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"))
        missing = [kw for kw, v in (("SOPInstanceUID", sop_uid), ("StudyInstanceUID", study_uid),
                                    ("SeriesInstanceUID", series_uid), ("SOPClassUID", sop_class)) if not valid_uid(v)]
        if missing:
            log.warning("store_rejected", reason="missing or invalid UID", attributes=missing, calling_ae=calling)
            return ERROR_CANNOT_UNDERSTAND, f"missing or invalid {', '.join(missing)}"
        if sop_class not in STORAGE_SOP_CLASSES and sop_class not in self.extra_classes:
            log.warning("store_rejected", reason="unsupported SOP class", sop_class=sop_class, sop_uid=sop_uid, calling_ae=calling)
            return REFUSED_SOP_CLASS_NOT_SUPPORTED, "SOP class not supported"
        if sop_class != context_class:
            log.warning("store_rejected", reason="SOP class differs from presentation context", sop_class=sop_class,
                        context=context_class, sop_uid=sop_uid, calling_ae=calling)
            return ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID does not match context"
        if affected_uid and affected_uid != sop_uid:
            log.warning("store_rejected", reason="SOPInstanceUID differs from the request", sop_uid=sop_uid, calling_ae=calling)
            return ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID does not match request"

        path = self.store.spool_path(study_uid, series_uid, sop_uid)
        meta = part10_header(sop_class, sop_uid, transfer_syntax, source_ae=calling)
        try:
            if isinstance(incoming, IncomingFile) and incoming.key == (sop_class, sop_uid):
                size = incoming.commit(path)
            else:
                size = self.store.write_durably(path, (meta, dataset))
            self.store.index_instance(record_from_header(header, path, size, calling, host, transfer_syntax))
        except OSError as exc:
            log.error("store_failed", reason="cannot write", error=str(exc), sop_uid=sop_uid)
            return REFUSED_OUT_OF_RESOURCES, "cannot write the instance"
        except Exception as exc:
            log.error("store_failed", reason="cannot index", error=f"{type(exc).__name__}: {exc}", sop_uid=sop_uid)
            return REFUSED_OUT_OF_RESOURCES, "cannot index the instance"
        self.stored += 1
        if debug_enabled():
            log.debug("instance_stored", sop_uid=sop_uid, series_uid=series_uid, study_uid=study_uid, bytes=size)
        return SUCCESS, ""

    def _assoc_open(self, event: evt.Event) -> None:
        with self._lock:
            self._active += 1
        event.assoc._dn_started = time.monotonic()

    def _assoc_closed(self, event: evt.Event, how: str) -> None:
        with self._lock:
            self._active -= 1
        assoc = event.assoc
        log.info("association", outcome=how, calling_ae=assoc.requestor.ae_title, host=assoc.requestor.address,
                 instances=getattr(assoc, "_dn_count", 0),
                 seconds=round(time.monotonic() - getattr(assoc, "_dn_started", time.monotonic()), 3))

    def _rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        log.warning("association_rejected", calling_ae=assoc.requestor.ae_title, host=assoc.requestor.address,
                    reason="calling AE not allowed from this host, or too many associations",
                    fix="add it under callers: in the configuration (or `dicomnode callers add`)")

    def update_config(self, cfg: Config) -> None:
        """Take new callers (the allow-list) from a reloaded configuration."""
        self.cfg = cfg
        if getattr(self, "_ae", None) is not None:
            self._ae.allowed = [(c.ae_title, c.host) for c in cfg.callers]

    @property
    def active_associations(self) -> int:
        return self._scp.active_associations if self._scp is not None else self._active

    # -- life cycle ----------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.cfg.node.tls
        if not tls.enabled:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cfg.resolve(tls.cert), self.cfg.resolve(tls.key))
        if tls.ca is not None:
            ctx.load_verify_locations(self.cfg.resolve(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
        return ctx

    def build_ae(self) -> AE:
        _config.UNRESTRICTED_STORAGE_SERVICE = True  # accept every storage context; the handler decides
        ae = _AllowListAE(ae_title=self.cfg.node.ae_title)
        ae.allowed = [(c.ae_title, c.host) for c in self.cfg.callers]
        ae.maximum_associations = self.cfg.node.max_associations
        ae.maximum_pdu_size = self.cfg.node.max_pdu
        ae.network_timeout = self.cfg.node.network_timeout
        ae.dimse_timeout = self.cfg.node.network_timeout
        ae.acse_timeout = self.cfg.node.network_timeout
        ae.add_supported_context(Verification)
        return ae

    def allowed(self, calling_ae: str, host: str) -> bool:
        """The allow-list: a caller's AE title, from its host when one is configured."""
        return any(c.ae_title == calling_ae.strip() and (c.host is None or c.host == host) for c in self.cfg.callers)

    def _fast_store(self, req: StoreRequest) -> tuple[int, str]:
        return self.store_bytes(req.dataset, req.transfer_syntax, req.sop_class_uid, req.affected_sop_instance_uid,
                                req.calling_ae, req.host, req.incoming)

    def _fast_incoming(self, req: StoreRequest) -> IncomingFile:
        """A file for a large data set to go to disk as it arrives, headed by the Part 10 header it will need."""
        sop_class = req.affected_sop_class_uid or req.sop_class_uid
        return self.store.incoming(part10_header(sop_class, req.affected_sop_instance_uid, req.transfer_syntax,
                                                 source_ae=req.calling_ae),
                                   key=(sop_class, req.affected_sop_instance_uid))

    def start(self) -> None:
        if not self.cfg.callers:
            log.warning("no_callers", note="callers: is empty, so every association is rejected; add the PACS under callers:")
        if self.cfg.node.engine == "fast":
            self._scp = FastStorageSCP(
                self.cfg.node.ae_title, self.cfg.node.host, self.cfg.node.port, store=self._fast_store, allow=self.allowed,
                max_associations=self.cfg.node.max_associations, max_pdu=self.cfg.node.max_pdu,
                network_timeout=self.cfg.node.network_timeout, reuse_port=self.reuse_port, ssl_context=self._ssl_context(),
                accept_sop_class=lambda uid: is_storage_like(uid), incoming=self._fast_incoming)
            self._scp.start()
            log.info("receiver_listening", engine="fast", ae_title=self.cfg.node.ae_title, host=self.cfg.node.host,
                     port=self._scp.port, tls=self.cfg.node.tls.enabled, callers=len(self.cfg.callers))
            return
        ae = self.build_ae()
        handlers = [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ESTABLISHED, self._assoc_open),
            (evt.EVT_RELEASED, self._assoc_closed, ["released"]),
            (evt.EVT_ABORTED, self._assoc_closed, ["aborted"]),
            (evt.EVT_REJECTED, self._rejected),
        ]
        _Server.reuse_port = self.reuse_port
        address = (self.cfg.node.host, self.cfg.node.port)
        server = ae.make_server(address, ae_title=ae.ae_title, ssl_context=self._ssl_context(),
                                evt_handlers=handlers, server_class=_Server)
        thread = threading.Thread(target=server.serve_forever, name="receiver", daemon=True)
        thread.start()
        ae._servers.append(server)
        self._ae = ae
        self._server = server
        log.info("receiver_listening", ae_title=ae.ae_title, host=address[0], port=server.server_address[1],
                 tls=self.cfg.node.tls.enabled, callers=len(self.cfg.callers))

    @property
    def port(self) -> int:
        if self._scp is not None:
            return self._scp.port
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._scp is not None:
            self._scp.stop()
            self._scp = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def receiver_process_main(config_path: str, stop: Any) -> None:
    """An extra receiver process sharing the node's port (``node.receivers`` > 1).

    It follows the configuration file for callers like the main process does, and stops with
    the node or when the node's process is gone.
    """
    import os
    import signal as _signal

    from .config import ConfigError, load_config
    from .logs import setup_logging

    terminated: list[int] = []  # a signal handler must not take the shared event's lock
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    _signal.signal(_signal.SIGTERM, lambda signum, _frame: terminated.append(signum))
    cfg = load_config(config_path)
    setup_logging(cfg, process=f"receiver-{os.getpid()}")
    parent = os.getppid()
    rx = Receiver(cfg, Store(cfg.data_dir, fsync=cfg.node.fsync), reuse_port=True)
    rx.start()
    mtime = cfg.path.stat().st_mtime_ns if cfg.path else None
    while not terminated and not stop.wait(0.5) and os.getppid() == parent:
        try:
            now = cfg.path.stat().st_mtime_ns
            if now != mtime:
                mtime = now
                rx.update_config(load_config(config_path))
        except (OSError, ConfigError):
            pass  # the main process logs configuration problems
    rx.stop()
