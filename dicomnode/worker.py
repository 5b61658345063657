"""Worker: a separate process that owns the models (and the GPU), runs jobs through
:func:`~dicomnode.analysis.run_analyses` (select → analyze → encode), fills the outbox.

Models are loaded once per analyzer and kept warm. A job's result objects are written durably
under ``<data>/results/<job id>/<attempt>/`` and handed to the outbox in the same transaction that marks
the job done, so a crash either repeats the whole job (its half-written folder is cleared first)
or delivers exactly what was committed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from . import audit, metrics
from .analysis import Analysis, AnalysisContext, Analyzer, NotApplicable, run_analyses
from .config import Config, load_config
from .index import Index
from .queue import Job, JobQueue, worker_name
from .heartbeat import Heartbeat
from .logs import safe_error, safe_trace
from .store import Store

log = structlog.get_logger("dicomnode.worker")


def encoder_context(cfg: Config):
    from . import __version__
    from .encoders import EncoderContext

    return EncoderContext(
        manufacturer=cfg.node.manufacturer,
        software_version=__version__,
        device_serial=cfg.node.device_serial,
        institution=cfg.node.institution,
        series_number_base=cfg.node.series_number_base,
        station_name=cfg.node.ae_title,
    )


class Worker:
    def __init__(self, cfg: Config, store: Store | None = None) -> None:
        self.cfg = cfg
        self.store = store or Store.from_config(cfg)
        self.index = Index(self.store)
        self.queue = JobQueue(self.store, cfg.analyzers.max_attempts, cfg.analyzers.retry_delay, cfg.analyzers.lease)
        self._analyzers: dict[str, Analyzer] = {}
        self._templates: dict[str, Any] = {}
        self._ctx = None
        self.on_delivered: Callable[[], None] = lambda: None  # wakes the sender in the service's process

    def analyzer(self, name: str) -> Analyzer:
        if name not in self._analyzers:
            from .registry import build

            t0 = time.monotonic()
            try:
                a = build(name, self.cfg)
                a.load()
            except Exception:
                metrics.model_load_failed(name)
                raise
            log.info("analyzer_loaded", analyzer=name, version=a.version, seconds=round(time.monotonic() - t0, 2))
            self._analyzers[name] = a
        return self._analyzers[name]

    def warm_up(self) -> dict[str, str]:
        """Load the analyzers the rules name, before the first job, and tell the index (for /readyz).

        Returns ``{analyzer: error}`` for those that failed to load; their jobs fail with the same error.
        """
        from .registry import analyzer_names
        from .router import RuleSet

        key = f"worker:{os.getpid()}"
        Heartbeat(self.store).set(key, {"pid": os.getpid(), "state": "loading"})
        try:
            wanted = {a for rule in RuleSet.load(self.cfg.rules_path).rules for a in rule.analyzers}
        except Exception:
            wanted = set()  # the service reports a broken rules file; nothing to warm up for it
        failed: dict[str, str] = {}
        from .encoders import encode_result  # noqa: F401  (its imports would otherwise land on the first job)

        for name in sorted(wanted & set(analyzer_names(self.cfg))):
            try:
                self.analyzer(name)
                self._context(name)
            except Exception as exc:
                failed[name] = safe_error(exc)
                log.error("analyzer_load_failed", analyzer=name, error=failed[name])
        Heartbeat(self.store).set(key, {"pid": os.getpid(), "state": "ready", "loaded": sorted(self._analyzers),
                                    "failed": failed})
        return failed

    def run_one(self) -> bool:
        """Claim the next job (with queued first attempts of the same analyzer when it batches) and run it."""
        job = self.queue.claim()
        if job is None:
            return False
        jobs = [job]
        if job.attempts == 1 and self.cfg.analyzers.batch_size > 1:
            try:
                analyzer: Analyzer | None = self.analyzer(job.analyzer)
            except Exception:
                analyzer = None  # process_batch reports it against the job
            if analyzer is not None and analyzer.batchable:
                jobs += self.queue.claim_batch(job.analyzer, min(self.cfg.analyzers.batch_size, analyzer.max_batch) - 1)
        self.process_batch(jobs)
        return True

    def process(self, job: Job) -> None:
        self.process_batch([job])

    def process_batch(self, jobs: list[Job]) -> None:
        """Run claimed jobs of one analyzer: select per study, analyze together, then per job encode and hand over.

        Every job ends on its own: done (results in the outbox), not applicable, or failed
        (re-queued or parked); one study's problem never settles another's.
        """
        t0 = time.monotonic()
        ready: list[tuple[Job, Any, Path]] = []
        for job in jobs:
            metrics.job_claimed(self.store, job.id, job.analyzer)
            log.info("job_started", job=job.id, study_uid=job.study_uid, analyzer=job.analyzer, attempt=job.attempts,
                     batch=len(jobs))
            # a folder per attempt: a worker that lost its lease never touches the files of the run that replaced it
            out_dir = self.store.results / str(job.id) / str(job.attempts)
            shutil.rmtree(out_dir, ignore_errors=True)
            try:
                self.analyzer(job.analyzer)
                study = self.index.load_study(job.study_uid)
            except Exception as exc:
                self._settle(job, exc, out_dir)
                continue
            ready.append((job, study, out_dir))
        if not ready:
            return
        name = ready[0][0].analyzer
        try:
            context = self._context(name)
        except Exception as exc:
            for job, _, out_dir in ready:
                self._settle(job, exc, out_dir)
            return
        outcomes = run_analyses(self.analyzer(name), [study for _, study, _ in ready], context)
        metrics.analysis_took(name, next((o.analyze_seconds for o in outcomes if isinstance(o, Analysis)), None))
        for (job, _, out_dir), outcome in zip(ready, outcomes):
            if isinstance(outcome, BaseException):
                self._settle(job, outcome, out_dir)
                continue
            try:
                n_objects = self._deliver(job, outcome, out_dir)
            except Exception as exc:
                self._settle(job, exc, out_dir)
                continue
            log.info("job_finished", job=job.id, study_uid=job.study_uid, analyzer=job.analyzer,
                     objects=n_objects, analyze_seconds=round(outcome.analyze_seconds, 3), batch=len(ready),
                     seconds=round(time.monotonic() - t0, 3), review_required=outcome.result.review_required)
            self._audit(job, "done", objects=n_objects, review_required=bool(outcome.result.review_required))

    def _context(self, name: str) -> AnalysisContext:
        """The encoder context and the analyzer's SR template, made once and kept."""
        if self._ctx is None:
            self._ctx = encoder_context(self.cfg)
        if name not in self._templates:
            from .registry import template_for

            self._templates[name] = template_for(name, self.cfg)
        return AnalysisContext(self._ctx, self._templates[name])

    def _deliver(self, job: Job, analysis: Analysis, out_dir: Path) -> int:
        """Write a job's result objects durably and hand them to the outbox as the job finishes; returns the object count."""
        t0 = time.monotonic()
        rows = []
        for ds in analysis.datasets:
            path = out_dir / f"{ds.SOPInstanceUID}.dcm"
            self.store.write_durably(path, _encode(ds))
            for dest in job.destinations:
                rows.append({"study_uid": job.study_uid, "destination": dest, "sop_uid": str(ds.SOPInstanceUID),
                             "sop_class_uid": str(ds.SOPClassUID), "description": str(ds.get("SeriesDescription", "")),
                             "path": str(path)})
        summary = analysis.result.summary()
        summary["objects"] = len(analysis.datasets)
        metrics.encode_took(job.analyzer, analysis.encode_seconds + time.monotonic() - t0)
        if not self.queue.finish(job.id, rows, summary):
            raise LeaseLost(f"job {job.id} ran past its lease and runs again elsewhere")
        self.on_delivered()
        return len(analysis.datasets)

    def _settle(self, job: Job, exc: BaseException, out_dir: Path) -> None:
        """A job that did not finish: not applicable, or a failure that is retried or parks."""
        if isinstance(exc, NotApplicable):
            self.queue.not_applicable(job.id, f"not applicable: {exc}")
            log.info("job_not_applicable", job=job.id, study_uid=job.study_uid, analyzer=job.analyzer, reason=str(exc))
            self._audit(job, "not_applicable")
            return
        shutil.rmtree(out_dir, ignore_errors=True)
        if isinstance(exc, LeaseLost):
            return
        error = safe_error(exc)
        outcome = self.queue.fail(job.id, error, worker=worker_name())
        log.error("job_failed", job=job.id, study_uid=job.study_uid, analyzer=job.analyzer, error=error,
                  outcome=outcome, trace=safe_trace(exc))
        self._audit(job, "failed" if outcome == "failed" else "retry")

    def _audit(self, job: Job, result: str, **fields: Any) -> None:
        """The job's metric and its audit event: rule, analyzer and model versions with sha256, outcome."""
        metrics.job_finished(job.analyzer, result)
        analyzer = self._analyzers.get(job.analyzer)
        try:
            models = [{"name": m.name, "version": m.version, "sha256": m.sha256} for m in analyzer.models()] if analyzer else []
        except Exception:
            models = []  # an analyzer that cannot describe its models still gets its event
        outcome = {"done": "success", "not_applicable": "success", "retry": "minor_failure"}.get(result, "failure")
        audit.record("analysis", outcome, study_uid=job.study_uid, job=job.id, attempt=job.attempts, rule=job.rule,
                     analyzer=job.analyzer, analyzer_version=getattr(analyzer, "version", None), models=models,
                     result=result, **fields)


class LeaseLost(Exception):
    """This worker's claim on a job ran out before it finished; the job belongs to the queue again."""


def _keep_leases(queue: JobQueue, parent: int) -> None:
    """Renew this worker's job leases a few times per lease; leave at once when the node that started us is gone.

    A worker outliving its node (killed) would run on unsupervised; its job's lease then runs
    out and another node runs the job again.
    """
    while True:
        time.sleep(min(5.0, queue.lease / 3))
        if os.getppid() != parent:
            os._exit(1)
        try:
            queue.renew()
        except Exception as exc:  # the database is away for a moment: the next renewal may still be in time
            log.error("lease_renewal_failed", error=f"{type(exc).__name__}: {exc}")


def _encode(ds) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def worker_main(config_path: str, stop: Any, wake: Any, delivered: Any = None, parent: int | None = None) -> None:
    """Entry point of the worker process; ``delivered`` (an event) wakes the sender when results are in the outbox,
    ``parent`` is the node's process id."""
    terminated: list[int] = []  # a signal handler must not take the shared events' locks
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when we stop
    signal.signal(signal.SIGTERM, lambda signum, _frame: terminated.append(signum))
    from .logs import setup_logging

    cfg = load_config(config_path)
    setup_logging(cfg, process="worker")
    metrics.init(cfg)
    audit.init(cfg)
    worker = Worker(cfg)
    if delivered is not None:
        worker.on_delivered = delivered.set
    threading.Thread(target=_keep_leases, args=(worker.queue, parent or os.getppid()), name="leases", daemon=True).start()
    log.info("worker_started")
    worker.warm_up()
    while not terminated and not stop.is_set():
        try:
            busy = worker.run_one()
        except Exception as exc:  # the index was busy or broken for a moment: keep serving
            log.error("worker_error", error=safe_error(exc))
            busy = False
        if not busy:
            wake.wait(1.0)
            wake.clear()
    log.info("worker_stopped")


class WorkerProcess:
    """The service's handle on the worker process: start, watch, restart, stop."""

    def __init__(self, config_path: Path, delivered: Any = None) -> None:
        self.config_path = config_path
        self._ctx = mp.get_context("spawn")
        self.stop_event = self._ctx.Event()
        self.wake_event = self._ctx.Event()
        self.delivered = delivered
        self.proc: mp.process.BaseProcess | None = None
        self.restarts = 0

    def start(self) -> None:
        self.stop_event.clear()
        self.proc = self._ctx.Process(target=worker_main,
                                      args=(str(self.config_path), self.stop_event, self.wake_event, self.delivered, os.getpid()),
                                      name="dicomnode-worker", daemon=False)
        self.proc.start()

    def wake(self) -> None:
        self.wake_event.set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def stop(self, timeout: float) -> bool:
        """Ask the worker to finish its job and stop; kill it after ``timeout``. True when it stopped by itself."""
        if self.proc is None:
            return True
        self.stop_event.set()
        self.wake_event.set()
        self.proc.join(timeout)
        clean = not self.proc.is_alive()
        if not clean:
            self.proc.terminate()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        return clean
