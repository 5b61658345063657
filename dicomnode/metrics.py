"""Prometheus metrics, and the HTTP listener that serves them with /healthz and /readyz.

The node is several processes (the service, the worker, extra receivers sharing the DICOM port),
so counters and histograms use prometheus_client's multiprocess mode: each process writes its
own memory-mapped files under ``<data>/metrics/`` and a scrape sums them, so no count is lost when
a worker dies and is restarted. Depths and states (jobs by state, outbox backlog and its oldest
row) are not counted as events but read from the index at scrape time, so they are right even
after a crash or a change made by the CLI while the node was down.

Every stage calls the small functions below (one line per event); they do nothing unless the
process called :func:`init`, so code paths outside a serving node pay nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import structlog

from .config import Config

log = structlog.get_logger("dicomnode.metrics")

# Latency buckets in seconds: fine below a second (the node's own overhead), coarse up to minutes.
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_END_TO_END = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, labels, registry=None)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, registry=None, buckets=buckets)

        self.instances = counter("dicomnode_instances_received", "Instances stored and acknowledged")
        self.bytes = counter("dicomnode_received_bytes", "Bytes of instances stored and acknowledged")
        self.associations = counter("dicomnode_associations", "Associations by outcome (accepted, rejected) and reason",
                                    ("outcome", "reason"))
        self.store_failures = counter("dicomnode_cstore_failures", "C-STORE requests answered with a failure, by status",
                                      ("status",))
        self.studies = counter("dicomnode_studies_completed", "Studies found complete by the assembler, by reason",
                               ("reason",))
        self.jobs = counter("dicomnode_jobs_finished", "Job attempts by analyzer and outcome", ("analyzer", "outcome"))
        self.queue_wait = histogram("dicomnode_job_queue_wait_seconds", "From a job becoming due to a worker claiming it",
                                    ("analyzer",), _FAST)
        self.analysis = histogram("dicomnode_analysis_seconds", "Analyzer time per batch of studies", ("analyzer",), _FAST)
        self.encode = histogram("dicomnode_encode_seconds", "Encoding and writing one study's result objects",
                                ("analyzer",), _FAST)
        self.end_to_end = histogram("dicomnode_study_to_delivery_seconds",
                                    "From study complete to its last result object acknowledged by the destination",
                                    ("destination",), _END_TO_END)
        self.sent = counter("dicomnode_objects_sent", "Result objects acknowledged by a destination", ("destination",))
        self.send_failures = counter("dicomnode_send_failures", "Result objects a destination did not take (retried)",
                                     ("destination",))
        self.worker_restarts = counter("dicomnode_worker_restarts", "Worker processes restarted after dying")
        self.model_load_failures = counter("dicomnode_model_load_failures", "Analyzers whose models failed to load",
                                           ("analyzer",))


_m: _Metrics | None = None


def metrics_dir(cfg: Config) -> Path:
    return cfg.data_dir / "metrics"


def init(cfg: Config, fresh: bool = False) -> bool:
    """Turn metrics on in this process when ``metrics.port`` is set; ``fresh`` (the service) clears old files.

    Each process of one node writes to ``<data>/metrics/``; the service clears it before it starts
    the others, as prometheus_client's multiprocess mode requires.
    """
    global _m
    if not cfg.metrics.enabled:
        return False
    from prometheus_client import values

    directory = metrics_dir(cfg)
    if fresh:
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # whatever was imported before this process knew its folder
    _m = _Metrics()
    return True


# -- the hooks the stages call -------------------------------------------------


def stored(status: int, nbytes: int) -> None:
    """One C-STORE answered: success and warnings (0xB...) mean stored, anything else is a failure."""
    if _m is not None:
        if status == 0 or 0xB000 <= status <= 0xBFFF:
            _m.instances.inc()
            _m.bytes.inc(nbytes)
        else:
            _m.store_failures.labels(f"0x{status:04X}").inc()


def association(outcome: str, reason: str = "") -> None:
    if _m is not None:
        _m.associations.labels(outcome, reason).inc()


def study_completed(reason: str) -> None:
    if _m is not None:
        _m.studies.labels(reason).inc()


def job_finished(analyzer: str, outcome: str) -> None:
    if _m is not None:
        _m.jobs.labels(analyzer, outcome).inc()


def job_claimed(store: Any, job_id: int, analyzer: str) -> None:
    """Queue wait of a claimed job: from when it became due (queued, or its retry time) to its start."""
    if _m is not None:
        from .queue import JobQueue

        waited = JobQueue.queue_wait(store.db, job_id)
        if waited is not None:
            _m.queue_wait.labels(analyzer).observe(waited)


def analysis_took(analyzer: str, seconds: float | None) -> None:
    """One batch analysed (None when every study of it failed before or during the analysis)."""
    if _m is not None and seconds is not None:
        _m.analysis.labels(analyzer).observe(seconds)


def encode_took(analyzer: str, seconds: float) -> None:
    if _m is not None:
        _m.encode.labels(analyzer).observe(seconds)


def objects_sent(destination: str, n: int, failed: int = 0) -> None:
    if _m is not None:
        if n:
            _m.sent.labels(destination).inc(n)
        if failed:
            _m.send_failures.labels(destination).inc(failed)


def study_delivered(destination: str, seconds: float) -> None:
    if _m is not None:
        _m.end_to_end.labels(destination).observe(seconds)


def worker_restarted() -> None:
    if _m is not None:
        _m.worker_restarts.inc()


def model_load_failed(analyzer: str) -> None:
    if _m is not None:
        _m.model_load_failures.labels(analyzer).inc()


# -- exposition ------------------------------------------------------------------


class IndexCollector:
    """Gauges read from the index at scrape time: jobs by analyzer and state, outbox backlog per destination."""

    def __init__(self, db_path: Path, destinations: Callable[[], list[str]], database: str | None = None) -> None:
        self.db_path = db_path
        self.destinations = destinations
        self.database = database

    def collect(self) -> Any:
        if self.database is not None:
            from .store import connect

            db = connect(self.database)
        else:
            db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        try:
            yield from self._collect(db)
        finally:
            db.close()

    def _collect(self, db: Any) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from .outbox import Outbox
        from .queue import JOB_STATES, JobQueue
        from .index import Index

        now = time.time()
        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs in the queue by analyzer and state", labels=["analyzer", "state"])
        counts: dict[str, dict[str, int]] = {}
        for analyzer, state, n in JobQueue.by_analyzer_and_state(db):
            counts.setdefault(analyzer, dict.fromkeys(JOB_STATES, 0))[state] = n
        for analyzer, states in sorted(counts.items()):
            for state, n in states.items():
                jobs.add_metric([analyzer, state], n)
        yield jobs

        depth = GaugeMetricFamily("dicomnode_outbox_pending", "Result objects waiting for a destination", labels=["destination"])
        oldest = GaugeMetricFamily("dicomnode_outbox_oldest_pending_age_seconds",
                                   "Age of the oldest result object waiting for a destination (0 when none)",
                                   labels=["destination"])
        failed = GaugeMetricFamily("dicomnode_outbox_failed", "Result objects parked after their last attempt",
                                   labels=["destination"])
        rows = {**{d: (0, None, 0) for d in self.destinations()}, **Outbox.backlog(db)}
        for dest, (pending, first, parked) in sorted(rows.items()):
            depth.add_metric([dest], pending)
            oldest.add_metric([dest], max(0.0, now - first) if first is not None else 0.0)
            failed.add_metric([dest], parked)
        yield depth
        yield oldest
        yield failed

        studies = GaugeMetricFamily("dicomnode_studies", "Studies in the index by state", labels=["state"])
        for state, n in sorted(Index.study_states(db).items()):
            studies.add_metric([state], n)
        yield studies


def scrape(cfg: Config, destinations: Callable[[], list[str]] | None = None) -> bytes:
    """The text exposition of every process's metrics plus the index gauges."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir(cfg)))
    registry.register(IndexCollector(cfg.db_path, destinations or (lambda: sorted(cfg.destinations)), cfg.storage.database))
    return generate_latest(registry)


def summary(cfg: Config) -> dict[str, Any] | None:
    """The counters since the node last started, read from the same files a scrape reads (for ``dicomnode status``).

    None when metrics are off (nothing is counted then). Latency quantiles are estimated from the
    histogram buckets, as Prometheus' ``histogram_quantile`` does.
    """
    if not cfg.metrics.enabled or not metrics_dir(cfg).is_dir():
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir(cfg)))
    totals: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                b = buckets.setdefault(sample.name[: -len("_bucket")], {})
                b[le] = b.get(le, 0.0) + sample.value
            elif sample.name.endswith(("_total", "_sum", "_count")):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value

    def by(name: str, label: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == name:
                    key = sample.labels.get(label, "")
                    out[key] = out.get(key, 0) + int(sample.value)
        return out

    e2e = buckets.get("dicomnode_study_to_delivery_seconds", {})
    count = totals.get("dicomnode_study_to_delivery_seconds_count", 0.0)
    return {
        "instances_received": int(totals.get("dicomnode_instances_received_total", 0)),
        "bytes_received": int(totals.get("dicomnode_received_bytes_total", 0)),
        "associations": by("dicomnode_associations_total", "outcome"),
        "cstore_failures": by("dicomnode_cstore_failures_total", "status"),
        "studies_completed": int(sum(by("dicomnode_studies_completed_total", "reason").values())),
        "jobs_finished": by("dicomnode_jobs_finished_total", "outcome"),
        "objects_sent": int(sum(by("dicomnode_objects_sent_total", "destination").values())),
        "worker_restarts": int(totals.get("dicomnode_worker_restarts_total", 0)),
        "model_load_failures": int(sum(by("dicomnode_model_load_failures_total", "analyzer").values())),
        "study_to_delivery_seconds": {
            "count": int(count),
            "mean": round(totals["dicomnode_study_to_delivery_seconds_sum"] / count, 3) if count else None,
            "p50": _quantile(0.5, e2e), "p95": _quantile(0.95, e2e)},
    }


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Linear interpolation inside the bucket holding the q-th observation (cumulative counts by upper bound)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        if buckets[upper] >= rank:
            if upper == float("inf"):
                return round(lower, 3)
            width = buckets[upper] - below
            return round(lower + (upper - lower) * ((rank - below) / width if width else 1.0), 3)
        lower, below = upper, buckets[upper]
    return round(lower, 3)


# -- health ----------------------------------------------------------------------


@dataclass
class Check:
    ok: bool
    detail: str


def database_writable(db_path: Path, timeout: float = 2.0) -> Check:
    """A real write transaction on a fresh connection: a locked, read-only or full database fails it."""
    from .heartbeat import Heartbeat

    try:
        conn = sqlite3.connect(db_path, timeout=timeout, isolation_level=None)
        try:
            Heartbeat.probe_write(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Check(False, f"the index {db_path} cannot be written: {exc}")
    return Check(True, "writable")


def shared_database_writable(store: Any) -> Check:
    """The same write on PostgreSQL, through a connection of the store's."""
    from .heartbeat import Heartbeat

    try:
        with store.transaction() as db:
            Heartbeat.probe_write(db, begin=False)
    except Exception as exc:
        return Check(False, f"the database {store.where} cannot be written: {type(exc).__name__}: {exc}")
    return Check(True, "writable")


def disk_free(folder: Path, floor_mb: float) -> Check:
    free_mb = shutil.disk_usage(folder).free / (1 << 20)
    if free_mb < floor_mb:
        return Check(False, f"{free_mb:.0f} MB free under {folder}, below metrics.min_free_mb={floor_mb:g}; "
                            "free space or move storage.data_dir")
    return Check(True, f"{free_mb:.0f} MB free")


def readiness(node: Any) -> dict[str, Check]:
    """What /readyz checks on a running :class:`~dicomnode.service.Node`: the DICOM port listens, the index
    takes a write, every worker process is alive with the models its rules name loaded, and the data
    folder's disk is above ``metrics.min_free_mb``."""
    cfg = node.cfg
    checks = {}
    if node.receiving:
        listening = node.receiver.listening
        checks["receiver"] = Check(listening, f"listening on port {node.receiver.port}" if listening
                                   else "the receiver is not listening (the node is stopping)")
    checks["database"] = database_writable(cfg.db_path) if not node.store.postgres else shared_database_writable(node.store)
    status = node.heartbeat.get()
    for i, w in enumerate(node.workers):
        pid = w.proc.pid if w.proc is not None else None
        state = (status.get(f"worker:{pid}") or {}).get("value") or {}
        if not w.alive():
            checks[f"worker{i}"] = Check(False, "the worker process is not running; the node restarts it within a second")
        elif state.get("state") != "ready":
            checks[f"worker{i}"] = Check(False, f"worker pid {pid} is loading its models")
        elif state.get("failed"):
            checks[f"worker{i}"] = Check(False, "models failed to load: " + "; ".join(
                f"{k}: {v}" for k, v in sorted(state["failed"].items())) + " (see `dicomnode models verify`)")
        else:
            checks[f"worker{i}"] = Check(True, f"pid {pid}, models loaded: {', '.join(state.get('loaded') or []) or 'none needed'}")
    checks["disk"] = disk_free(cfg.data_dir, cfg.metrics.min_free_mb)
    return checks


class HealthServer:
    """``/metrics``, ``/healthz`` (the process answers) and ``/readyz`` (it can take and process studies).

    ``checks`` returns the readiness checks by name; each is re-run on every request.
    """

    def __init__(self, cfg: Config, checks: Callable[[], dict[str, Check]],
                 destinations: Callable[[], list[str]] | None = None) -> None:
        self.cfg = cfg
        self.checks = checks
        self.destinations = destinations
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        host, port = self.cfg.metrics.host, self.cfg.metrics.port
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        from prometheus_client import CONTENT_TYPE_LATEST

                        self._reply(200, scrape(outer.cfg, outer.destinations), CONTENT_TYPE_LATEST)
                    elif path == "/healthz":
                        self._reply(200, b"ok\n", "text/plain; charset=utf-8")
                    elif path == "/readyz":
                        results = outer.checks()
                        ready = all(c.ok for c in results.values())
                        body = {"ready": ready, "checks": {k: {"ok": c.ok, "detail": c.detail} for k, c in results.items()}}
                        self._reply(200 if ready else 503, json.dumps(body, indent=1).encode() + b"\n", "application/json")
                    else:
                        self._reply(404, b"not found; try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")
                except Exception as exc:  # a broken scrape must answer, not kill the listener
                    log.error("metrics_request_failed", path=path, error=f"{type(exc).__name__}: {exc}")
                    self._reply(500, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain; charset=utf-8")

            def _reply(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes every few seconds would flood the log
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise RuntimeError(f"cannot listen for metrics on {host}:{port}: {exc.strerror}; set metrics.port to a free "
                               "port, or 0 to turn the listener off") from None
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics_listening", host=host, port=self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
