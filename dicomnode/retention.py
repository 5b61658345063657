"""Retention: remove stored studies older than a time, never one whose work is still open.

The node runs :func:`purge` hourly for ``storage.retention_days``; ``dicomnode studies purge``
runs it on demand. Each table's rows go through the table's owner (index, queue, outbox), all in
one transaction per study.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .index import Index
from .outbox import Outbox
from .queue import JobQueue
from .store import Store


@dataclass
class PurgeReport:
    purged: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"purged": self.purged, "kept": self.kept, "files_removed": self.files, "bytes_removed": self.bytes}


def _keep_reason(db: Any, study_uid: str) -> str | None:
    jobs = JobQueue.open_work(db, study_uid)
    if jobs:
        return ", ".join(f"{n} {state} job{'s' if n > 1 else ''}" for state, n in sorted(jobs.items()))
    out = Outbox.open_work(db, study_uid)
    if out:
        return ", ".join(f"{n} {state} outbox row{'s' if n > 1 else ''}"
                         + (" (results not delivered; `dicomnode outbox resend --failed`)" if state == "failed" else "")
                         for state, n in sorted(out.items()))
    return None


def purge(store: Store, older_than: float, dry_run: bool = False, now: float | None = None) -> PurgeReport:
    """Remove spool files, index rows and sent result files of studies whose last arrival is older.

    A study with queued or running jobs, or with results not yet delivered (pending or failed
    outbox rows), is kept. The rows go in one transaction that re-checks those conditions, and only
    the files those rows named are deleted, so an instance arriving meanwhile is never lost.
    """
    cutoff = (now or time.time()) - older_than
    report = PurgeReport()
    index, queue, outbox = Index(store), JobQueue(store), Outbox(store)
    for uid in index.studies_before(cutoff):
        files: list[Path] = []
        result_dirs: list[Path] = []
        with store.transaction() as db:
            last = index.last_arrival(db, uid)
            if last is None or last >= cutoff:
                continue
            reason = _keep_reason(db, uid)
            if reason:
                report.kept[uid] = reason
                continue
            files = index.files_of(db, uid) + outbox.files_of(db, uid)
            result_dirs = [store.results / str(job_id) for job_id in queue.ids_of(db, uid)]
            if not dry_run:
                index.forget(db, uid)
                outbox.forget(db, uid)
                queue.forget(db, uid)
        report.purged.append(uid)
        for f in files:
            try:
                size = f.stat().st_size
                if not dry_run:
                    f.unlink()
                report.files += 1
                report.bytes += size
            except FileNotFoundError:
                pass
        if not dry_run:
            for d in result_dirs:  # every result of these jobs was delivered (or there was none)
                shutil.rmtree(d, ignore_errors=True)
            for d in [*{f.parent for f in files}, store.spool / uid]:
                _prune(d, stop=store.data_dir)
    return report


def _prune(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents while they are empty (never ``stop`` or above)."""
    folder = folder.resolve()
    stop = stop.resolve()
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
        if folder.name in ("spool", "results") and folder.parent == stop:
            return
