"""Receiver: the C-ECHO / C-STORE SCP.

An instance is written exactly as it arrived (file meta plus the encoded dataset, in the transfer
syntax it came in), fsynced, renamed into the spool and indexed before the success status goes
back. Anything wrong with a dataset gets a DICOM failure status and one log line; the association
and the node carry on.
"""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from .config import Config
from .store import ROUTING_KEYWORDS, InstanceRecord, Store, to_jsonable, valid_uid

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
        if not self.allowed:
            return []
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


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for requestors: pynetdicom leaves Nagle's algorithm on."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def parse_header(raw: bytes | Path) -> Dataset:
    """Parse a whole encoded file; raises on truncated or malformed data (the pixel bytes are read, not decoded)."""
    src = raw if isinstance(raw, Path) else io.BytesIO(raw)
    return dcmread(src, force=True)


def record_from(ds: Dataset, path: Path, size: int, calling_ae: str | None = None, host: str | None = None) -> InstanceRecord:
    attrs = {kw: to_jsonable(ds.get(kw)) for kw in ROUTING_KEYWORDS if kw in ds}
    number = ds.get("InstanceNumber")
    try:
        number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    ts = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", Dataset()) else ""
    return InstanceRecord(
        sop_uid=str(ds.SOPInstanceUID), series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID),
        sop_class_uid=str(ds.SOPClassUID), transfer_syntax=ts, instance_number=number, path=path, size=size,
        attributes=attrs, calling_ae=calling_ae, calling_host=host, study_date=str(ds.get("StudyDate", "") or "") or None,
    )


def reindex_file(path: Path) -> InstanceRecord | None:
    """An index record for a spool file (start-up reconciliation); None for an unreadable file."""
    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        return record_from(ds, path, path.stat().st_size)
    except Exception as exc:  # a damaged spool file must not stop the node
        log.warning("spool_file_unreadable", path=str(path), error=type(exc).__name__)
        return None


class Receiver:
    """The node's storage SCP on ``node.host:node.port``."""

    def __init__(self, cfg: Config, store: Store, reuse_port: bool = False) -> None:
        self.cfg = cfg
        self.store = store
        self.reuse_port = reuse_port
        self._server: ThreadedAssociationServer | None = None
        self._active = 0
        self._lock = threading.Lock()
        self.stored = 0
        self.extra_classes = frozenset(cfg.node.extra_sop_classes)

    # -- handlers ------------------------------------------------------------

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        host = assoc.requestor.address
        context_class = str(event.context.abstract_syntax)
        try:
            raw = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            log.warning("store_rejected", reason="unreadable request", error=type(exc).__name__, calling_ae=calling)
            return _failure(ERROR_CANNOT_UNDERSTAND, "request data set could not be read")
        try:
            ds = parse_header(raw)
            sop_uid = ds.get("SOPInstanceUID")
            study_uid = ds.get("StudyInstanceUID")
            series_uid = ds.get("SeriesInstanceUID")
            sop_class = ds.get("SOPClassUID")
            _check_pixel_length(ds)
        except Exception as exc:
            log.warning("store_rejected", reason="malformed or truncated data set", error=type(exc).__name__,
                        calling_ae=calling, sop_class=context_class)
            return _failure(ERROR_CANNOT_UNDERSTAND, "malformed or truncated data set")

        missing = [kw for kw, v in (("SOPInstanceUID", sop_uid), ("StudyInstanceUID", study_uid),
                                    ("SeriesInstanceUID", series_uid), ("SOPClassUID", sop_class)) if not valid_uid(str(v or ""))]
        if missing:
            log.warning("store_rejected", reason="missing or invalid UID", attributes=missing, calling_ae=calling)
            return _failure(ERROR_CANNOT_UNDERSTAND, f"missing or invalid {', '.join(missing)}")
        sop_class = str(sop_class)
        if sop_class not in STORAGE_SOP_CLASSES and sop_class not in self.extra_classes:
            log.warning("store_rejected", reason="unsupported SOP class", sop_class=sop_class, sop_uid=str(sop_uid), calling_ae=calling)
            return _failure(REFUSED_SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")
        if sop_class != context_class:
            log.warning("store_rejected", reason="SOP class differs from presentation context", sop_class=sop_class,
                        context=context_class, sop_uid=str(sop_uid), calling_ae=calling)
            return _failure(ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID does not match context")
        affected = str(event.request.AffectedSOPInstanceUID or "")
        if affected and affected != str(sop_uid):
            log.warning("store_rejected", reason="SOPInstanceUID differs from the request", sop_uid=str(sop_uid), calling_ae=calling)
            return _failure(ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID does not match request")

        path = self.store.spool_path(str(study_uid), str(series_uid), str(sop_uid))
        try:
            size = self.store.write_durably(path, raw)
            self.store.index_instance(record_from(ds, path, size, calling, host))
        except OSError as exc:
            log.error("store_failed", reason="cannot write", error=str(exc), sop_uid=str(sop_uid))
            return _failure(REFUSED_OUT_OF_RESOURCES, "cannot write the instance")
        except Exception as exc:
            log.error("store_failed", reason="cannot index", error=f"{type(exc).__name__}: {exc}", sop_uid=str(sop_uid))
            return _failure(REFUSED_OUT_OF_RESOURCES, "cannot index the instance")
        assoc._dn_count = getattr(assoc, "_dn_count", 0) + 1  # per-association tally for the log line
        assoc._dn_bytes = getattr(assoc, "_dn_bytes", 0) + size
        log.debug("instance_stored", sop_uid=str(sop_uid), series_uid=str(series_uid), study_uid=str(study_uid), bytes=size)
        return SUCCESS

    def _assoc_open(self, event: evt.Event) -> None:
        with self._lock:
            self._active += 1
        event.assoc._dn_started = time.monotonic()

    def _assoc_closed(self, event: evt.Event, how: str) -> None:
        with self._lock:
            self._active -= 1
        assoc = event.assoc
        n = getattr(assoc, "_dn_count", 0)
        self.stored += n
        log.info("association", outcome=how, calling_ae=assoc.requestor.ae_title, host=assoc.requestor.address,
                 instances=n, bytes=getattr(assoc, "_dn_bytes", 0),
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
        return self._active

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

    def start(self) -> None:
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
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def _check_pixel_length(ds: Dataset) -> None:
    """A native (uncompressed) PixelData shorter than its image needs is a truncated transfer."""
    if "PixelData" not in ds or getattr(ds.file_meta, "TransferSyntaxUID", None) is None:
        return
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise ValueError("image pixel module incomplete") from None
    need = rows * cols * frames * spp * bits // 8
    if len(ds.PixelData) < need:
        raise ValueError(f"PixelData has {len(ds.PixelData)} bytes, the image needs {need}")
