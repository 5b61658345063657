"""Sender: C-STORE SCU that empties the outbox to the configured destinations, with back-off."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import structlog
from pydicom import dcmread
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import build_context

from .config import Config, Destination
from .outbox import Outbox
from .receiver import set_nodelay

log = structlog.get_logger("dicomnode.sender")

# C-STORE statuses that mean the destination kept the object (success and the B-range warnings).
_KEPT = {0x0000, 0xB000, 0xB007, 0xB006}


def requestor_ae(cfg: Config) -> AE:
    _config.STORE_SEND_CHUNKED_DATASET = True  # send files as stored, without decoding them
    ae = AE(ae_title=cfg.sender.ae_title or cfg.node.ae_title)
    ae.network_timeout = cfg.node.network_timeout
    ae.acse_timeout = cfg.node.network_timeout
    ae.dimse_timeout = cfg.node.network_timeout
    return ae


def echo(cfg: Config, name: str) -> tuple[bool, str]:
    """C-ECHO a configured destination; (ok, one-line message)."""
    if name not in cfg.destinations:
        return False, f"unknown destination {name!r}; configured: {', '.join(sorted(cfg.destinations)) or 'none'}"
    d = cfg.destinations[name]
    ae = requestor_ae(cfg)
    ae.add_requested_context("1.2.840.10008.1.1")
    t0 = time.monotonic()
    assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        return False, f"{name} ({d.ae_title}@{d.host}:{d.port}): association failed (rejected, aborted or unreachable)"
    status = assoc.send_c_echo()
    assoc.release()
    code = getattr(status, "Status", None)
    ms = (time.monotonic() - t0) * 1000
    if code == 0:
        return True, f"{name} ({d.ae_title}@{d.host}:{d.port}): C-ECHO success in {ms:.0f} ms"
    return False, f"{name} ({d.ae_title}@{d.host}:{d.port}): C-ECHO status {code!r}"


def send_files(cfg: Config, dest: Destination, paths: list[Path]) -> tuple[list[int], dict[int, str], str | None]:
    """Send files over one association; returns (indices kept, {index: error}, association error)."""
    headers = [dcmread(p, stop_before_pixels=True, force=True) for p in paths]
    contexts: dict[tuple[str, str], None] = {}
    for ds in headers:
        contexts[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))] = None
    ae = requestor_ae(cfg)
    by_class: dict[str, list[str]] = defaultdict(list)
    for sop_class, ts in contexts:
        by_class[sop_class].append(ts)
    for sop_class, tss in list(by_class.items())[:127]:
        syntaxes = list(dict.fromkeys([*tss, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]))
        ae.requested_contexts = [*ae.requested_contexts, build_context(sop_class, syntaxes)]
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=0,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        return [], {}, f"association with {dest.ae_title}@{dest.host}:{dest.port} failed"
    kept: list[int] = []
    errors: dict[int, str] = {}
    try:
        for i, path in enumerate(paths):
            if not assoc.is_established:
                errors[i] = "association lost"
                continue
            try:
                status = assoc.send_c_store(path)
            except Exception as exc:  # an unreadable file or a context the peer refused
                errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            code = getattr(status, "Status", None)
            if code in _KEPT:
                kept.append(i)
            else:
                errors[i] = f"C-STORE status 0x{code:04X}" if isinstance(code, int) else "no response"
    finally:
        if assoc.is_established:
            assoc.release()
    return kept, errors, None


class Sender:
    """Background thread: sends due outbox rows, one association per destination per round."""

    def __init__(self, cfg: Config, outbox: Outbox) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.round()
            except Exception as exc:  # the sender must keep going whatever one round met
                log.error("sender_error", error=f"{type(exc).__name__}: {exc}")
                busy = False
            if not busy:
                self._wake.wait(self.cfg.sender.poll_interval)
                self._wake.clear()

    def round(self) -> bool:
        rows = self.outbox.due()
        if not rows:
            return False
        by_dest: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_dest[r["destination"]].append(r)
        for name, items in by_dest.items():
            if self._stop.is_set():
                break
            dest = self.cfg.destinations.get(name)
            if dest is None:
                self.outbox.mark_failed([r["id"] for r in items], f"destination {name!r} is not configured")
                log.error("send_failed", destination=name, objects=len(items), reason="destination not configured",
                          fix="add it under destinations: or run `dicomnode destinations add`")
                continue
            t0 = time.monotonic()
            kept, errors, assoc_error = send_files(self.cfg, dest, [Path(r["path"]) for r in items])
            if assoc_error:
                self.outbox.mark_failed([r["id"] for r in items], assoc_error)
                log.warning("send_deferred", destination=name, objects=len(items), reason=assoc_error)
                continue
            self.outbox.mark_sent([items[i]["id"] for i in kept])
            self.sent += len(kept)
            for i in kept:
                log.info("object_sent", destination=name, sop_uid=items[i]["sop_uid"], study_uid=items[i]["study_uid"])
            if errors:
                self.outbox.mark_failed([items[i]["id"] for i in errors], "; ".join(sorted(set(errors.values())))[:500])
                log.warning("send_failed", destination=name, objects=len(errors), reason=next(iter(errors.values())))
            log.info("send_round", destination=name, sent=len(kept), failed=len(errors), seconds=round(time.monotonic() - t0, 3))
        return True
