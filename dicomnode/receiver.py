"""Receiver: the C-ECHO / C-STORE stage on top of the node's acceptor (:mod:`dicomnode.dimse.acceptor`).

An instance is written exactly as it arrived (file meta plus the encoded dataset, in the transfer
syntax it came in) into the spool, fsynced and indexed before the success status goes back: a small
instance is created in place, a large one is received into ``tmp/`` as it arrives and renamed into
the spool. Anything wrong with a dataset gets a DICOM failure status and one log line; the association
and the node carry on.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Callable

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AllStoragePresentationContexts

from . import metrics
from .config import Config
from .dimse.acceptor import StorageSCP, StoreRequest, is_storage_like
from .dimse.part10 import file_header, read_file_meta
from .dimse.status import Status
from .header import Header, header_from_dataset, read_header, text
from .logs import debug_enabled, safe_error
from .index import ROUTING_KEYWORDS, Index, InstanceRecord
from .store import IncomingFile, Store, valid_uid

log = structlog.get_logger("dicomnode.receiver")

STORAGE_SOP_CLASSES = frozenset(cx.abstract_syntax for cx in AllStoragePresentationContexts)


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
        meta = read_file_meta(path)
        raw = path.read_bytes()
        header = read_header(memoryview(raw)[meta.offset:], meta.transfer_syntax)
        return record_from_header(header, path, len(raw), transfer_syntax=meta.transfer_syntax)
    except Exception as exc:  # a file cut off mid-write was never acknowledged: set it aside
        log.warning("spool_file_damaged", path=str(path), error=safe_error(exc), action="moved to quarantine")
        return None


class Receiver:
    """The node's storage SCP on ``node.host:node.port``."""

    def __init__(self, cfg: Config, store: Store, reuse_port: bool = False) -> None:
        self.cfg = cfg
        self.store = store
        self.index = Index(store)
        self.reuse_port = reuse_port
        self._scp: StorageSCP | None = None
        self.stored = 0
        self.extra_classes = frozenset(cfg.node.extra_sop_classes)
        self.on_association_end: Callable[[], None] = lambda: None  # the service wakes the assembler

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
            return Status.CANNOT_UNDERSTAND, "malformed or truncated data set"
        sop_uid, study_uid, series_uid, sop_class = (
            text(header, kw) for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"))
        missing = [kw for kw, v in (("SOPInstanceUID", sop_uid), ("StudyInstanceUID", study_uid),
                                    ("SeriesInstanceUID", series_uid), ("SOPClassUID", sop_class)) if not valid_uid(v)]
        if missing:
            log.warning("store_rejected", reason="missing or invalid UID", attributes=missing, calling_ae=calling)
            return Status.CANNOT_UNDERSTAND, f"missing or invalid {', '.join(missing)}"
        if sop_class not in STORAGE_SOP_CLASSES and sop_class not in self.extra_classes:
            log.warning("store_rejected", reason="unsupported SOP class", sop_class=sop_class, sop_uid=sop_uid, calling_ae=calling)
            return Status.SOP_CLASS_NOT_SUPPORTED, "SOP class not supported"
        if sop_class != context_class:
            log.warning("store_rejected", reason="SOP class differs from presentation context", sop_class=sop_class,
                        context=context_class, sop_uid=sop_uid, calling_ae=calling)
            return Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID does not match context"
        if affected_uid and affected_uid != sop_uid:
            log.warning("store_rejected", reason="SOPInstanceUID differs from the request", sop_uid=sop_uid, calling_ae=calling)
            return Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID does not match request"

        path = self.store.spool_path(study_uid, series_uid, sop_uid)
        meta = file_header(sop_class, sop_uid, transfer_syntax, source_ae=calling)
        try:
            if isinstance(incoming, IncomingFile) and incoming.key == (sop_class, sop_uid):
                size = incoming.commit(path)
            else:
                size = self.store.write_durably(path, (meta, dataset))
            self.index.add(record_from_header(header, path, size, calling, host, transfer_syntax))
        except OSError as exc:
            log.error("store_failed", reason="cannot write", error=str(exc), sop_uid=sop_uid)
            return Status.OUT_OF_RESOURCES, "cannot write the instance"
        except Exception as exc:
            log.error("store_failed", reason="cannot index", error=f"{type(exc).__name__}: {exc}", sop_uid=sop_uid)
            return Status.OUT_OF_RESOURCES, "cannot index the instance"
        self.stored += 1
        if debug_enabled():
            log.debug("instance_stored", sop_uid=sop_uid, series_uid=series_uid, study_uid=study_uid, bytes=size)
        return Status.SUCCESS, ""

    def update_config(self, cfg: Config) -> None:
        """Take new callers (the allow-list) from a reloaded configuration."""
        self.cfg = cfg

    @property
    def listening(self) -> bool:
        return self._scp is not None

    @property
    def active_associations(self) -> int:
        return self._scp.active_associations if self._scp is not None else 0

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

    def allowed(self, calling_ae: str, host: str) -> bool:
        """The allow-list: a caller's AE title, from its host when one is configured."""
        return any(c.ae_title == calling_ae.strip() and (c.host is None or c.host == host) for c in self.cfg.callers)

    def _store(self, req: StoreRequest) -> tuple[int, str]:
        status, comment = self.store_bytes(req.dataset, req.transfer_syntax, req.sop_class_uid,
                                           req.affected_sop_instance_uid, req.calling_ae, req.host, req.incoming)
        metrics.stored(status, len(req.dataset))
        return status, comment

    def _association_ended(self, info: Any) -> None:
        metrics.association("accepted")
        self.on_association_end()

    def _incoming(self, req: StoreRequest) -> IncomingFile:
        """A file for a large data set to go to disk as it arrives, headed by the Part 10 header it will need."""
        sop_class = req.affected_sop_class_uid or req.sop_class_uid
        return self.store.incoming(file_header(sop_class, req.affected_sop_instance_uid, req.transfer_syntax,
                                               source_ae=req.calling_ae),
                                   key=(sop_class, req.affected_sop_instance_uid))

    def start(self) -> None:
        if not self.cfg.callers:
            log.warning("no_callers", note="callers: is empty, so every association is rejected; add the PACS under callers:")
        node = self.cfg.node
        self._scp = StorageSCP(
            node.ae_title, node.host, node.port, store=self._store, allow=self.allowed,
            max_associations=node.max_associations, max_pdu=node.max_pdu, network_timeout=node.network_timeout,
            reuse_port=self.reuse_port, ssl_context=self._ssl_context(), accept_sop_class=is_storage_like,
            incoming=self._incoming, on_association=self._association_ended,
            on_reject=lambda reason: metrics.association("rejected", reason))
        self._scp.start()
        log.info("receiver_listening", ae_title=node.ae_title, host=node.host, port=self._scp.port,
                 tls=node.tls.enabled, callers=len(self.cfg.callers))

    @property
    def port(self) -> int:
        if self._scp is None:
            raise RuntimeError("the receiver is not started")
        return self._scp.port

    def stop(self) -> None:
        if self._scp is not None:
            self._scp.stop()
            self._scp = None


def receiver_process_main(config_path: str, stop: Any, ended: Any = None) -> None:
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
    metrics.init(cfg)
    parent = os.getppid()
    rx = Receiver(cfg, Store.from_config(cfg), reuse_port=True)
    if ended is not None:
        rx.on_association_end = ended.set  # the service's assembler sweeps when it is set
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
