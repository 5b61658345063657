"""Job queue: the jobs table, one row per (study, analyzer) to run, surviving restarts.

States: ``queued`` → ``running`` → ``done`` | ``not_applicable`` | ``failed`` (parked after
``max_attempts``; ``dicomnode jobs retry`` re-queues it). A job found ``running`` at start-up was
cut off by a crash or stop; it goes back to ``queued`` and counts the attempt.

Several nodes may share the queue (PostgreSQL): a worker claims a job with ``FOR UPDATE SKIP
LOCKED``, so each job is claimed once, and holds it by a lease (``lease_until``) that it renews
while it runs. A job whose lease ran out (its node died) goes back to the queue on whichever node
notices first (:meth:`JobQueue.expire`); the worker that lost it can no longer finish or fail it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import structlog

from .outbox import Outbox
from .store import Store

log = structlog.get_logger("dicomnode.queue")

JOB_STATES = ("queued", "running", "done", "not_applicable", "failed")

OWNER = "queue"

# One entry per schema version; a database at version n runs entries n and later, in order.
MIGRATIONS = (
    """
    CREATE TABLE IF NOT EXISTS jobs (
        id {id},
        study_uid TEXT NOT NULL, analyzer TEXT NOT NULL, rule TEXT,
        destinations TEXT NOT NULL, series_uids TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'queued', priority INTEGER NOT NULL DEFAULT 2,
        attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL DEFAULT 3,
        not_before REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, started_at REAL, finished_at REAL,
        worker TEXT, error TEXT, summary TEXT, n_objects INTEGER
    );
    CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, priority, not_before);
    """,
    "ALTER TABLE jobs ADD COLUMN lease_until REAL",
)


def worker_name(pid: int | None = None) -> str:
    """A worker process's name in the jobs it runs: host and process id (several nodes may share the queue)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


@dataclass
class Job:
    id: int
    study_uid: str
    analyzer: str
    rule: str | None
    destinations: list[str]
    series_uids: list[str]
    attempts: int
    max_attempts: int

    @classmethod
    def from_row(cls, row: Any) -> "Job":
        return cls(row["id"], row["study_uid"], row["analyzer"], row["rule"], json.loads(row["destinations"]),
                   json.loads(row["series_uids"]), row["attempts"], row["max_attempts"])


class JobQueue:
    def __init__(self, store: Store, max_attempts: int = 3, retry_delay: float = 10.0, lease: float = 30.0) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.lease = lease
        store.migrate(OWNER, MIGRATIONS)

    def enqueue(self, study_uid: str, analyzer: str, rule: str | None, destinations: list[str],
                series_uids: list[str], priority: int = 2) -> int:
        """Queue a job; a job for the same study and analyzer that has not started absorbs the new series."""
        now = time.time()
        with self.store.transaction() as db:
            row = db.execute("SELECT id, series_uids, destinations FROM jobs WHERE study_uid=? AND analyzer=? AND state='queued'",
                             (study_uid, analyzer)).fetchone()
            if row:
                series = sorted(set(json.loads(row["series_uids"])) | set(series_uids))
                dests = sorted(set(json.loads(row["destinations"])) | set(destinations))
                db.execute("UPDATE jobs SET series_uids=?, destinations=? WHERE id=?", (json.dumps(series), json.dumps(dests), row["id"]))
                return int(row["id"])
            job_id = int(db.execute(
                "INSERT INTO jobs (study_uid, analyzer, rule, destinations, series_uids, priority, max_attempts, created_at)"
                " VALUES (?,?,?,?,?,?,?,?) RETURNING id",
                (study_uid, analyzer, rule, json.dumps(sorted(set(destinations))), json.dumps(sorted(set(series_uids))),
                 priority, self.max_attempts, now),
            ).fetchone()[0])
        log.info("job_queued", job=job_id, study_uid=study_uid, analyzer=analyzer, rule=rule, series=len(series_uids))
        return job_id

    def claim(self, analyzers: list[str] | None = None) -> Job | None:
        now = time.time()
        where = ""
        args: list[Any] = [now]
        if analyzers is not None:
            where = f" AND analyzer IN ({','.join('?' * len(analyzers))})"
            args += analyzers
        with self.store.transaction() as db:
            row = db.execute(
                f"SELECT id FROM jobs WHERE state='queued' AND not_before<=?{where} ORDER BY priority, id"
                f" LIMIT 1{self.store.skip_locked}", args
            ).fetchone()
            if row is None:
                return None
            (job,) = self._start(db, [row["id"]], now, self.lease)
        return job

    def claim_batch(self, analyzer: str, limit: int) -> list[Job]:
        """Up to ``limit`` more queued jobs of ``analyzer`` to run with one already claimed.

        Only first attempts: a job that ran before (and may have taken the worker down with it)
        runs alone, so it cannot cost other jobs their attempts again.
        """
        if limit < 1:
            return []
        now = time.time()
        with self.store.transaction() as db:
            ids = [r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE state='queued' AND analyzer=? AND attempts=0 AND not_before<=? ORDER BY priority, id"
                f" LIMIT ?{self.store.skip_locked}", (analyzer, now, limit))]
            return self._start(db, ids, now, self.lease)

    @staticmethod
    def _start(db: Any, ids: list[int], now: float, lease: float) -> list[Job]:
        """Mark queued jobs running for this worker (counting the attempt), inside the caller's transaction."""
        worker = worker_name()
        for job_id in ids:
            db.execute("UPDATE jobs SET state='running', started_at=?, worker=?, attempts=attempts+1, error=NULL, lease_until=?"
                       " WHERE id=?", (now, worker, now + lease, job_id))
        return [Job.from_row(db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()) for job_id in ids]

    def finish(self, job_id: int, outbox_rows: list[dict[str, Any]], summary: dict[str, Any]) -> bool:
        """Mark done and hand the result objects to the outbox in one transaction.

        False (and nothing written) when this worker no longer holds the job: its lease ran out
        and the job went back to the queue, to run elsewhere.
        """
        now = time.time()
        outbox = Outbox(self.store)
        n_objects = len({r['sop_uid'] for r in outbox_rows}) if outbox_rows else summary.get("objects", 0)
        with self.store.transaction() as db:
            if not db.execute("UPDATE jobs SET state='done', finished_at=?, summary=?, n_objects=?, lease_until=NULL"
                              " WHERE id=? AND state='running' AND worker=?",
                              (now, json.dumps(summary), n_objects, job_id, worker_name())).rowcount:
                log.warning("job_lost", job=job_id, note="its lease ran out; the job runs again elsewhere")
                return False
            outbox.add(db, job_id, outbox_rows, now)
        return True

    def not_applicable(self, job_id: int, reason: str) -> None:
        self.store.db.execute("UPDATE jobs SET state='not_applicable', finished_at=?, error=?, lease_until=NULL"
                              " WHERE id=? AND state='running' AND worker=?", (time.time(), reason, job_id, worker_name()))

    def renew(self) -> int:
        """Extend the leases of the jobs this worker process runs; returns how many it holds."""
        return self.store.db.execute("UPDATE jobs SET lease_until=? WHERE state='running' AND worker=?",
                                     (time.time() + self.lease, worker_name())).rowcount

    def fail(self, job_id: int, error: str, worker: str | None = None) -> str:
        """Record a failure of a running job: re-queued with back-off while attempts remain, else parked as ``failed``.

        ``worker``: only while that worker still holds the job (a worker reporting its own failure).
        """
        now = time.time()
        with self.store.transaction() as db:
            row = db.execute(f"SELECT attempts, max_attempts, state, worker FROM jobs WHERE id=?"
                             f"{' FOR UPDATE' if self.store.postgres else ''}", (job_id,)).fetchone()
            if row is None or row["state"] != "running" or (worker is not None and row["worker"] != worker):
                return "missing"
            return self._fail(db, job_id, row["attempts"], row["max_attempts"], error, now)

    def _fail(self, db: Any, job_id: int, attempts: int, max_attempts: int, error: str, now: float) -> str:
        if attempts >= max_attempts:
            db.execute("UPDATE jobs SET state='failed', finished_at=?, error=?, lease_until=NULL WHERE id=?",
                       (now, error[:2000], job_id))
            return "failed"
        delay = self.retry_delay * 2 ** (attempts - 1)
        db.execute("UPDATE jobs SET state='queued', not_before=?, error=?, lease_until=NULL WHERE id=?",
                   (now + delay, error[:2000], job_id))
        return "queued"

    def expire(self, now: float | None = None) -> list[int]:
        """Running jobs whose lease ran out (their worker or node died) go back to the queue, or park."""
        now = now or time.time()
        done = []
        with self.store.transaction() as db:
            rows = db.execute("SELECT id, attempts, max_attempts FROM jobs WHERE state='running' AND lease_until < ?"
                              f"{self.store.skip_locked}", (now,)).fetchall()
            for r in rows:
                outcome = self._fail(db, r["id"], r["attempts"], r["max_attempts"],
                                     "interrupted: the node running this job stopped renewing its lease", now)
                done.append(r["id"])
                log.warning("job_lease_expired", job=r["id"], outcome=outcome)
        return done

    def recover(self) -> int:
        """At start-up: jobs left ``running`` by a crash or stop go back to the queue (or park when out of attempts).

        With SQLite this node is the only one, so every running job was its own. With a shared
        database other nodes' jobs run on; only those whose lease ran out are recovered.
        """
        if self.store.postgres:
            return len(self.expire())
        rows = self.store.db.execute("SELECT id FROM jobs WHERE state='running'").fetchall()
        for r in rows:
            outcome = self.fail(r["id"], "interrupted: the node stopped while this job ran")
            log.warning("job_recovered", job=r["id"], outcome=outcome)
        return len(rows)

    def running_on(self, pid: int) -> list[int]:
        """Jobs marked running by this host's worker process ``pid``."""
        rows = self.store.db.execute("SELECT id FROM jobs WHERE state='running' AND worker=?", (worker_name(pid),))
        return [r[0] for r in rows]

    def running_since(self, before: float) -> list[tuple[int, int]]:
        """(job id, worker pid) of this host's jobs that started running before ``before``."""
        rows = self.store.db.execute("SELECT id, worker FROM jobs WHERE state='running' AND started_at < ? AND worker LIKE ?",
                                     (before, f"{socket.gethostname()}:%"))
        return [(r["id"], int(str(r["worker"]).rsplit(":", 1)[-1])) for r in rows]

    def retry(self, job_id: int) -> bool:
        cur = self.store.db.execute(
            "UPDATE jobs SET state='queued', attempts=0, not_before=0, error=NULL WHERE id=? AND state IN ('failed','not_applicable','done')",
            (job_id,))
        return cur.rowcount == 1

    def list(self, states: list[str] | None = None, limit: int = 200) -> list[dict[str, Any]]:
        q = "SELECT * FROM jobs"
        args: list[Any] = []
        if states:
            q += f" WHERE state IN ({','.join('?' * len(states))})"
            args += states
        q += " ORDER BY id DESC LIMIT ?"
        rows = self.store.db.execute(q, [*args, limit]).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["destinations"] = json.loads(d["destinations"])
            d["series_uids"] = json.loads(d["series_uids"])
            d["summary"] = json.loads(d["summary"]) if d["summary"] else None
            out.append(d)
        return out

    @staticmethod
    def by_analyzer_and_state(db: Any) -> list[tuple[str, str, int]]:
        """How many jobs each analyzer has in each state (the metrics' gauge)."""
        return [(r[0], r[1], r[2]) for r in db.execute("SELECT analyzer, state, COUNT(*) FROM jobs GROUP BY analyzer, state")]

    @staticmethod
    def queue_wait(db: Any, job_id: int) -> float | None:
        """Seconds from when a started job became due (queued, or its retry time) to its start."""
        row = db.execute("SELECT created_at, not_before, started_at FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None or row[2] is None else max(0.0, row[2] - max(row[0], row[1]))

    def depths(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.store.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    def get(self, job_id: int) -> dict[str, Any] | None:
        """One job's row, or None when there is no such job."""
        row = self.store.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return dict(row) if row else None

    # -- moving to another database (dicomnode db migrate) --------------------------

    def copy_into(self, db: Any) -> int:
        """Every job, with its id, into ``db`` (another store's transaction)."""
        return self.store.copy_rows(db, "SELECT * FROM jobs ORDER BY id", "INSERT INTO jobs", "SELECT 1 FROM jobs LIMIT 1")

    def last_id(self) -> int | None:
        return self.store.db.execute("SELECT MAX(id) FROM jobs").fetchone()[0]

    # -- retention: inside the caller's transaction ------------------------------

    @staticmethod
    def open_work(db: Any, study_uid: str) -> dict[str, int]:
        """Queued and running jobs of a study, by state."""
        return {r[0]: r[1] for r in db.execute(
            "SELECT state, COUNT(*) FROM jobs WHERE study_uid=? AND state IN ('queued','running') GROUP BY state", (study_uid,))}

    @staticmethod
    def ids_of(db: Any, study_uid: str) -> list[int]:
        return [r[0] for r in db.execute("SELECT id FROM jobs WHERE study_uid=?", (study_uid,))]

    @staticmethod
    def forget(db: Any, study_uid: str) -> None:
        db.execute("DELETE FROM jobs WHERE study_uid=?", (study_uid,))
