"""Analysis jobs: list them by state, queue finished or parked ones again."""

from __future__ import annotations

from typing import Any

from ..queue import JOB_STATES, JobQueue
from ..store import Store
from . import AdminError

STATES = JOB_STATES


def listing(store: Store, states: list[str] | None, limit: int) -> list[dict[str, Any]]:
    return JobQueue(store).list(states, limit)


def retry(store: Store, job_ids: list[int]) -> list[str]:
    """Queue jobs again; returns each job's state before.

    Raises
    ------
    AdminError
        For an unknown job, or one that is queued or running; the jobs before it stay queued again.
    """
    queue = JobQueue(store)
    before = []
    for job_id in job_ids:
        row = queue.get(job_id)
        if row is None:
            raise AdminError(f"no job {job_id}; `dicomnode jobs list` shows the jobs", 1)
        if not queue.retry(job_id):
            raise AdminError(f"job {job_id} is {row['state']}; only failed, not_applicable or done jobs can be retried", 1)
        before.append(row["state"])
    return before
