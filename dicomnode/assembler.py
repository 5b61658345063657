"""Assembler: decides when a study has fully arrived and hands its new series to the router.

One periodic sweep (APScheduler, about once a second; on one node at a time when several share the
database, :meth:`dicomnode.store.Store.holds`) looks at the series that have received
instances since they were last routed. A study is complete for a rule when no instance has
arrived for the rule's ``stable_after`` (or the calling AE's), when every series the rule lists in
``required_series`` is in, or when it has been arriving for ``force_after`` seconds without going
quiet (logged). Only series that received instances are routed again, so a late instance re-opens
its own series and re-triggers only what that series needs.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import structlog

from . import audit, metrics
from .config import Config
from .index import Index
from .logs import safe_error
from .queue import JobQueue
from .router import RuleSet, RulesError, evaluate, series_view
from .store import Store

log = structlog.get_logger("dicomnode.assembler")


class RulesHolder:
    """The working rules, reloaded when the file changes; a broken file never replaces good rules."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self.rules = RuleSet([], path)
        self.error: str | None = None
        self.reload(initial=True)

    def reload(self, initial: bool = False) -> bool:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime and not initial:
            return False
        self._mtime = mtime
        try:
            rules = RuleSet.load(self.path)
        except RulesError as exc:
            self.error = str(exc)
            if initial:
                raise
            log.error("rules_rejected", file=str(self.path), error=str(exc), kept=len(self.rules.rules))
            return False
        self.rules = rules
        self.error = None
        if not initial:
            log.info("rules_reloaded", file=str(self.path), rules=len(rules.rules))
        return True


class Assembler:
    def __init__(self, cfg: Config, store: Store, queue: JobQueue, rules: RulesHolder,
                 analyzer_known: Callable[[str], bool] = lambda name: True) -> None:
        self.cfg = cfg
        self.store = store
        self.index = Index(store)
        self.queue = queue
        self.rules = rules
        self.analyzer_known = analyzer_known
        self._scheduler = None
        self._lock = threading.Lock()
        self.on_jobs: Callable[[], None] = lambda: None

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self._scheduled_sweep, "interval", seconds=self.cfg.assembly.sweep_interval,
                                max_instances=1, coalesce=True, id="sweep")
        self._scheduler.start()

    def wake(self) -> None:
        """Sweep now rather than at the next tick (an association ended: a rule may complete early)."""
        import datetime as dt

        scheduler = self._scheduler
        if scheduler is not None and scheduler.running:
            scheduler.modify_job("sweep", next_run_time=dt.datetime.now(dt.timezone.utc))

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    def _scheduled_sweep(self) -> None:
        """The periodic sweep, on the one node that holds the duty (every node with SQLite's single node)."""
        if self.store.holds("assembler"):
            self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """One pass; returns the number of jobs queued."""
        with self._lock:
            try:
                return self._sweep(now or time.time())
            except Exception as exc:  # one bad study must not stop future sweeps
                log.error("sweep_failed", error=safe_error(exc))
                return 0

    def _sweep(self, now: float) -> int:
        self.rules.reload()
        dirty = self.index.unrouted_series()
        if not dirty:
            return 0
        by_study: dict[str, list[Any]] = defaultdict(list)
        for row in dirty:
            by_study[row["study_uid"]].append(row)
        queued = 0
        for study_uid, rows in by_study.items():
            queued += self._consider(study_uid, rows, now)
        if queued:
            self.on_jobs()
        return queued

    def _consider(self, study_uid: str, dirty_rows: list[Any], now: float) -> int:
        study = self.index.study(study_uid)
        if study is None:
            return 0
        caller = self.cfg.caller(study["calling_ae"] or "", study["calling_host"])
        all_series = self.index.series_of(study_uid)
        dirty_uids = {r["series_uid"] for r in dirty_rows}
        matches: dict[str, tuple[Any, list[str]]] = {}
        for s in all_series:
            if s["series_uid"] not in dirty_uids:
                continue
            view = series_view(s, study["calling_ae"], self.index.first_instance_path(s["series_uid"]))
            for rule in self.rules.rules.match(view):
                matches.setdefault(rule.name, (rule, []))[1].append(s["series_uid"])

        quiet = now - study["last_arrival"]
        first_dirty = min(r["first_arrival"] if r["routed_at"] is None else r["routed_at"] for r in dirty_rows)
        default_wait = caller.stable_after if caller and caller.stable_after is not None else self.cfg.assembly.stable_after
        if not matches:
            if quiet >= default_wait:
                self.index.mark_routed(study_uid, dirty_uids, now)
                log.info("study_complete", study_uid=study_uid, series=len(dirty_uids), jobs=0, reason="quiet",
                         note="no rule matched")
                self._completed(study_uid, "quiet", [])
            return 0

        waits = [caller.stable_after if caller and caller.stable_after is not None else
                 (r.stable_after if r.stable_after is not None else self.cfg.assembly.stable_after) for r, _ in matches.values()]
        force = min(r.force_after or self.cfg.assembly.force_after for r, _ in matches.values())
        reason = None
        if quiet >= max(waits):
            reason = "quiet"
        elif any(r.required_series and self._required_present(r, all_series, study["calling_ae"]) for r, _ in matches.values()):
            reason = "required_series"
        elif now - first_dirty >= force:
            reason = "forced"
            log.warning("study_forced", study_uid=study_uid, seconds=round(now - first_dirty, 1),
                        note="the study never went quiet; processing it anyway")
        if reason is None:
            return 0

        jobs = 0
        default_dest = [caller.destination] if caller and caller.destination else []
        for rule, series_uids in matches.values():
            dests = rule.destinations if rule.destinations is not None else default_dest
            if not dests:
                log.error("no_destination", study_uid=study_uid, rule=rule.name,
                          fix="give the rule destinations: or the calling AE a destination under callers:")
            for analyzer in rule.analyzers:
                if not self.analyzer_known(analyzer):
                    log.error("unknown_analyzer", rule=rule.name, analyzer=analyzer, study_uid=study_uid)
                    continue
                self.queue.enqueue(study_uid, analyzer, rule.name, dests, series_uids, rule.priority)
                jobs += 1
        self.index.mark_routed(study_uid, dirty_uids, now)
        log.info("study_complete", study_uid=study_uid, series=len(dirty_uids), jobs=jobs, reason=reason,
                 rules=sorted(matches), quiet_seconds=round(quiet, 1))
        self._completed(study_uid, reason, sorted(matches))
        return jobs

    def _completed(self, study_uid: str, reason: str, rules: list[str]) -> None:
        metrics.study_completed(reason)
        audit.study_received(self.index, study_uid, reason=reason, rules=rules)

    def _required_present(self, rule, all_series: list[dict[str, Any]], calling_ae: str | None) -> bool:
        views = [series_view(s, calling_ae, None) for s in all_series]
        return all(any(evaluate(cond, v).matched for v in views) for cond in rule.required_series)
