"""Sender: C-STORE SCU that empties the outbox to the configured destinations, with back-off."""

from __future__ import annotations

import ssl
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import structlog

from . import audit, metrics
from .config import Config, Destination
from .dimse import requestor
from .logs import safe_error
from .outbox import Outbox

log = structlog.get_logger("dicomnode.sender")


def _requestor_title(cfg: Config) -> str:
    return cfg.sender.ae_title or cfg.node.ae_title


def _client_tls(cfg: Config, dest: Destination) -> ssl.SSLContext | None:
    """TLS for destinations marked tls: verify the peer against node.tls.ca, present the node's certificate."""
    if not dest.tls:
        return None
    tls = cfg.node.tls
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.resolve(tls.ca)) if tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert and tls.key:
        ctx.load_cert_chain(cfg.resolve(tls.cert), cfg.resolve(tls.key))
    return ctx


def echo(cfg: Config, name: str) -> tuple[bool, str]:
    """C-ECHO a configured destination; (ok, one-line message)."""
    if name not in cfg.destinations:
        return False, f"unknown destination {name!r}; configured: {', '.join(sorted(cfg.destinations)) or 'none'}"
    d = cfg.destinations[name]
    ok, message = requestor.echo(d.host, d.port, d.ae_title, _requestor_title(cfg), timeout=cfg.node.network_timeout,
                               ssl_context=_client_tls(cfg, d))
    return ok, f"{name} ({d.ae_title}@{d.host}:{d.port}): {message}"


def send_files(cfg: Config, dest: Destination, paths: list[Path]) -> tuple[list[int], dict[int, str], str | None]:
    """Send files over one association; returns (indices kept, {index: error}, association error)."""
    return requestor.send_files(dest.host, dest.port, dest.ae_title, _requestor_title(cfg), paths,
                              timeout=cfg.node.network_timeout, ssl_context=_client_tls(cfg, dest))


class Sender:
    """Background thread: sends due outbox rows, one association per destination per round."""

    def __init__(self, cfg: Config, outbox: Outbox, wake: Any = None) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self._stop = threading.Event()
        self._wake = wake if wake is not None else threading.Event()  # a process-shared event lets the worker wake us
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
                log.error("sender_error", error=safe_error(exc))
                busy = False
            if not busy:
                self._wake.wait(self.cfg.sender.poll_interval)
                self._wake.clear()

    def _account(self, name: str, dest: Destination, items: list[dict], kept: list[int], errors: dict[int, str]) -> None:
        """Metrics and one audit event per object; a study whose results are all in observes its end-to-end time."""
        metrics.objects_sent(name, len(kept), len(errors))
        for i, error in [(i, None) for i in kept] + sorted(errors.items()):
            r = items[i]
            audit.record("object_delivered", "success" if error is None else "minor_failure", study_uid=r["study_uid"],
                         sop_uid=r["sop_uid"], sop_class_uid=r["sop_class_uid"], destination=name,
                         destination_ae=dest.ae_title, destination_host=dest.host,
                         status="acknowledged" if error is None else error[:200])
        now = time.time()
        for study_uid in sorted({items[i]["study_uid"] for i in kept}):
            completed_at = self._settled(study_uid, name)
            if completed_at is not None:
                metrics.study_delivered(name, max(0.0, now - completed_at))
                log.info("study_delivered", study_uid=study_uid, destination=name, seconds=round(now - completed_at, 3))

    def _settled(self, study_uid: str, destination: str) -> float | None:
        """When every result of a study has reached ``destination``: the time the study was complete; else None."""
        from .index import Index
        from .queue import JobQueue

        db = self.outbox.store.db
        if Outbox.waiting(db, study_uid, destination) or JobQueue.open_work(db, study_uid):
            return None
        return Index.completed_at(db, study_uid)

    def round(self) -> bool:
        # with a shared database the rows are this node's for a while; alone, there is no one to keep them from
        rows = self.outbox.claim_due(claim=self.cfg.sender.claim if self.outbox.store.postgres else 0.0)
        if not rows:
            return False
        by_dest: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_dest[r["destination"]].append(r)
        for name, items in by_dest.items():
            if self._stop.is_set():
                self.outbox.release([r["id"] for d in by_dest.values() for r in d if r["state"] == "pending"])
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
                self._account(name, dest, items, [], dict.fromkeys(range(len(items)), assoc_error))
                continue
            self.outbox.mark_sent([items[i]["id"] for i in kept])
            self.sent += len(kept)
            for i in kept:
                log.info("object_sent", destination=name, sop_uid=items[i]["sop_uid"], study_uid=items[i]["study_uid"])
            if errors:
                self.outbox.mark_failed([items[i]["id"] for i in errors], "; ".join(sorted(set(errors.values())))[:500])
                log.warning("send_failed", destination=name, objects=len(errors), reason=next(iter(errors.values())))
            self._account(name, dest, items, kept, errors)
            log.info("send_round", destination=name, sent=len(kept), failed=len(errors), seconds=round(time.monotonic() - t0, 3))
        return True
