"""The running node: receiver, assembler, worker process, sender, and a clean stop on SIGTERM/SIGINT.

Its role picks the stages: ``all`` (default), ``receiver`` (no worker or sender: a host without a
GPU behind the load balancer) or ``worker`` (no receiver: a GPU host). Every role takes part in
the duties one node performs at a time when several share a database (the assembler's sweep,
retention) and returns the jobs of dead nodes to the queue once their leases run out.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import structlog

from . import audit, metrics
from .assembler import Assembler, RulesHolder
from .config import Config
from .heartbeat import Heartbeat
from .index import Index
from .logs import safe_error
from .outbox import Outbox
from .queue import JobQueue
from .receiver import Receiver, reindex_file
from .registry import analyzer_names
from .sender import Sender
from .store import Store
from .worker import WorkerProcess

log = structlog.get_logger("dicomnode.service")


ROLES = ("all", "receiver", "worker")


class Node:
    def __init__(self, cfg: Config, role: str = "all") -> None:
        if cfg.path is None:
            raise ValueError("the node needs a configuration file path (the worker process reads it)")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        if role != "all" and cfg.storage.database is None:
            raise ValueError(f"role {role} shares the work with other nodes: set storage.database to a PostgreSQL URL "
                             "(SQLite serves one node)")
        self.cfg = cfg
        self.role = role
        self.store = Store.from_config(cfg)
        self.index = Index(self.store)
        self.heartbeat = Heartbeat(self.store)
        self.queue = JobQueue(self.store, cfg.analyzers.max_attempts, cfg.analyzers.retry_delay, cfg.analyzers.lease)
        self.outbox = Outbox(self.store, cfg.sender.max_attempts, cfg.sender.backoff_initial, cfg.sender.backoff_max)
        self.rules = RulesHolder(cfg.rules_path)
        known = set(analyzer_names(cfg))
        self.assembler = Assembler(cfg, self.store, self.queue, self.rules, analyzer_known=lambda n: n in known)
        shared_port = cfg.node.receivers > 1 and cfg.node.port != 0
        self.receiver = Receiver(cfg, self.store, reuse_port=shared_port)
        self._extra_receivers: list = []
        self._receivers_stop = None
        import multiprocessing as mp

        delivered = mp.get_context("spawn").Event()  # the worker sets it when results are in the outbox
        self.sender = Sender(cfg, self.outbox, wake=delivered)
        self.workers = [WorkerProcess(cfg.path, delivered) for _ in range(cfg.analyzers.workers if role != "receiver" else 0)]
        self.receiving = role != "worker"
        self.sending = role != "receiver"
        self.health: metrics.HealthServer | None = None
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self._config_mtime = cfg.path.stat().st_mtime_ns
        self._next_purge = 0.0

    def _lock_data_dir(self) -> None:
        """One node per data folder: a second one would share the spool and queue with the first."""
        import fcntl

        self._lock_file = open(self.cfg.data_dir / "node.lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another node is running with data folder {self.cfg.data_dir}; stop it or set "
                               "storage.data_dir to another folder") from None

    def start(self) -> None:
        from .registry import check_templates

        self._lock_data_dir()
        metrics.init(self.cfg, fresh=True)  # before the worker and receivers start writing theirs
        audit.init(self.cfg)
        for name, problem in check_templates(self.cfg).items():
            log.error("analyzer_unavailable", analyzer=name, error=problem,
                      note="the node runs without it; its jobs fail with this error until it is fixed")
        # PostgreSQL loses no commit, and a shared spool holds other nodes' files still being written
        recovered = 0 if self.store.postgres else self.index.reconcile(reindex_file)
        if self.store.postgres:
            self.store.clear_tmp()
        requeued = self.queue.recover()
        log.info("node_starting", ae_title=self.cfg.node.ae_title, port=self.cfg.node.port, data_dir=str(self.cfg.data_dir),
                 rules=len(self.rules.rules.rules), reindexed=recovered, jobs_requeued=requeued, pid=os.getpid(),
                 role=self.role, database=self.store.where)
        if self.receiving:
            self.receiver.start()  # first: a port already in use stops the start before anything else runs
        if self.cfg.metrics.enabled:
            self.health = metrics.HealthServer(self.cfg, lambda: metrics.readiness(self), lambda: sorted(self.cfg.destinations))
            self.health.start()
        if self.receiving:
            self.receiver.on_association_end = self.assembler.wake
            self._start_extra_receivers()
        for w in self.workers:
            w.start()
        self.assembler.on_jobs = self._wake_workers
        self.assembler.start()
        if self.sending:
            self.sender.start()
        self.heartbeat.set("node", {"pid": os.getpid(), "started_at": time.time(),
                                       "port": self.receiver.port if self.receiving else None,
                                       "ae_title": self.cfg.node.ae_title, "state": "running", "role": self.role})
        self._watch = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._watch.start()
        port = self.receiver.port if self.receiving else None
        audit.record("node_started", port=port, pid=os.getpid(), role=self.role)
        log.info("node_ready", port=port, role=self.role)

    def _start_extra_receivers(self) -> None:
        """Further receiver processes on the same port, so several associations use several cores."""
        if self.cfg.node.receivers <= 1 or self.cfg.node.port == 0 or not self.receiving:
            return
        import multiprocessing as mp

        from .receiver import receiver_process_main

        ctx = mp.get_context("spawn")
        self._receivers_stop = ctx.Event()
        ended = ctx.Event()  # an association ended in another receiver process: sweep now
        threading.Thread(target=self._relay, args=(ended,), name="assembly-wake", daemon=True).start()
        for _ in range(self.cfg.node.receivers - 1):
            p = ctx.Process(target=receiver_process_main, args=(str(self.cfg.path), self._receivers_stop, ended),
                            name="dicomnode-receiver", daemon=True)
            p.start()
            self._extra_receivers.append(p)

    def _relay(self, ended) -> None:
        while not self._stop.is_set():
            if ended.wait(1.0):
                ended.clear()
                self.assembler.wake()

    def _wake_workers(self) -> None:
        for w in self.workers:
            w.wake()

    def _supervise(self) -> None:
        """Restart a worker that died (an analyzer crash must not take the node down); time out long jobs."""
        while not self._stop.wait(1.0):
            try:
                if self.receiving:
                    self.heartbeat.set("receiver", {"associations": self.receiver.active_associations,
                                                       "stored": self.receiver.stored})
                for w in self.workers:
                    if not w.alive() and not self._stop.is_set():
                        pid = w.proc.pid if w.proc else None
                        self._recover_jobs_of(pid, "the worker process died while running this job")
                        w.restarts += 1
                        metrics.worker_restarted()
                        log.error("worker_died", pid=pid, exitcode=w.proc.exitcode if w.proc else None, restarts=w.restarts)
                        w.start()
                self._time_out_jobs()
                if self.queue.expire():
                    self._wake_workers()
                self._reload_config()
                self._retention()
                if self.sending and self.outbox.next_due_in() == 0:
                    self.sender.wake()
            except Exception as exc:
                log.error("supervisor_error", error=safe_error(exc))

    def _reload_config(self) -> None:
        """Callers, destinations, assembly and sender settings follow config/node.yaml without a restart."""
        from .config import ConfigError, load_config

        try:
            mtime = self.cfg.path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            new = load_config(self.cfg.path)
        except ConfigError as exc:
            log.error("config_rejected", file=str(self.cfg.path), error=str(exc), note="the previous configuration stays in force")
            return
        fixed = [k for k in ("node", "storage", "rules_file") if getattr(new, k) != getattr(self.cfg, k)]
        if fixed:
            log.warning("config_restart_needed", sections=fixed, note="these sections take effect after a restart")
            for k in fixed:
                setattr(new, k, getattr(self.cfg, k))
        self.cfg = new
        self.receiver.update_config(new)
        self.sender.cfg = new
        self.assembler.cfg = new
        log.info("config_reloaded", callers=len(new.callers), destinations=len(new.destinations))

    def _retention(self) -> None:
        """Hourly: purge studies older than storage.retention_days (0 keeps everything)."""
        days = self.cfg.storage.retention_days
        if days <= 0 or time.time() < self._next_purge or not self.store.holds("retention"):
            return
        self._next_purge = time.time() + 3600
        from .retention import purge

        report = purge(self.store, days * 86400.0)
        if report.purged or report.kept:
            log.info("retention_purge", older_than_days=days, purged=len(report.purged), kept=len(report.kept))

    def _recover_jobs_of(self, pid: int | None, why: str) -> None:
        if pid is None:
            return
        for job_id in self.queue.running_on(pid):
            outcome = self.queue.fail(job_id, why)
            self.heartbeat.set("last_error", {"job": job_id, "error": why})
            log.error("job_interrupted", job=job_id, outcome=outcome, reason=why)

    def _time_out_jobs(self) -> None:
        limit = time.time() - self.cfg.analyzers.job_timeout
        for job_id, pid in self.queue.running_since(limit):
            for w in self.workers:
                if w.proc is not None and w.proc.pid == pid:
                    log.error("job_timeout", job=job_id, seconds=self.cfg.analyzers.job_timeout)
                    w.proc.kill()
                    w.proc.join(5)

    def stop(self, grace: float = 60.0) -> None:
        """Stop taking associations, let the worker finish its job (or park it), flush the sender."""
        if self._stop.is_set():
            return
        self._stop.set()
        log.info("node_stopping")
        if self.receiving:
            self.receiver.stop()
        if self._receivers_stop is not None:
            self._receivers_stop.set()
            for p in self._extra_receivers:
                p.join(15)
                if p.is_alive():
                    p.kill()
        self.assembler.stop()
        for w in self.workers:
            pid = w.proc.pid if w.proc else None
            if not w.stop(grace):
                self._recover_jobs_of(pid, "interrupted by the node stopping; it will run again")
        if self.sending:
            self.sender.stop(timeout=grace)
        if self.health is not None:
            self.health.stop()
        self.heartbeat.set("node", {"pid": os.getpid(), "state": "stopped", "stopped_at": time.time()})
        audit.record("node_stopped", pid=os.getpid())
        log.info("node_stopped")

    def serve_forever(self) -> None:
        received: list[int] = []  # set by the handler without taking any lock the main thread may hold

        signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
        signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
        try:
            self.start()
            while not received:
                time.sleep(0.2)
            log.info("signal", signal=signal.Signals(received[0]).name)
        finally:
            self.stop()

