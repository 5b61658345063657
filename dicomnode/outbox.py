"""Outbox: the outbox table, one row per result object and destination, until the destination has acknowledged it.

The queue adds a job's rows (:meth:`Outbox.add`) in the transaction that marks the job done; the
sender claims the due rows (:meth:`Outbox.claim_due`, so that nodes sharing the database never send
a row twice at once) and marks them sent or failed; the CLI lists and re-sends them. An object goes
to a destination once: (SOP Instance UID, destination) is unique.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .store import Store

OUTBOX_STATES = ("pending", "sent", "failed")

OWNER = "outbox"

# One entry per schema version; a database at version n runs entries n and later, in order.
MIGRATIONS = (
    """
    CREATE TABLE IF NOT EXISTS outbox (
        id {id},
        job_id INTEGER, study_uid TEXT NOT NULL,
        destination TEXT NOT NULL,
        sop_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, description TEXT,
        path TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, sent_at REAL, last_error TEXT,
        UNIQUE (sop_uid, destination)
    );
    CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt);
    """,
)


class Outbox:
    def __init__(self, store: Store, max_attempts: int = 10, backoff_initial: float = 5.0, backoff_max: float = 600.0) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        store.migrate(OWNER, MIGRATIONS)

    @staticmethod
    def add(db: Any, job_id: int | None, rows: list[dict[str, Any]], now: float) -> None:
        """Rows to send, inside the caller's transaction; an object already queued for a destination is not added twice."""
        db.executemany(
            "INSERT INTO outbox (job_id, study_uid, destination, sop_uid, sop_class_uid, description, path, created_at)"
            " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (sop_uid, destination) DO NOTHING",
            [(job_id, r["study_uid"], r["destination"], r["sop_uid"], r["sop_class_uid"], r.get("description", ""), r["path"], now)
             for r in rows])

    def due(self, limit: int = 500) -> list[dict[str, Any]]:
        rows = self.store.db.execute(
            "SELECT * FROM outbox WHERE state='pending' AND next_attempt<=? ORDER BY destination, id LIMIT ?",
            (time.time(), limit)).fetchall()
        return [dict(r) for r in rows]

    def claim_due(self, limit: int = 500, claim: float = 300.0, now: float | None = None) -> list[dict[str, Any]]:
        """Due rows for this sender to send, not due again for ``claim`` seconds (other nodes' senders skip them).

        :meth:`mark_sent` or :meth:`mark_failed` settles them; a sender that dies meanwhile leaves
        them due again once the claim runs out.
        """
        now = now or time.time()
        with self.store.transaction() as db:
            rows = [dict(r) for r in db.execute(
                "SELECT * FROM outbox WHERE state='pending' AND next_attempt<=? ORDER BY destination, id"
                f" LIMIT ?{self.store.skip_locked}", (now, limit)).fetchall()]
            db.executemany("UPDATE outbox SET next_attempt=? WHERE id=?", [(now + claim, r["id"]) for r in rows])
        return rows

    def next_due_in(self) -> float | None:
        row = self.store.db.execute("SELECT MIN(next_attempt) FROM outbox WHERE state='pending'").fetchone()
        return None if row[0] is None else max(0.0, row[0] - time.time())

    def release(self, ids: list[int]) -> None:
        """Claimed rows not sent after all (the node stops): due again now, for any node."""
        self.store.db.executemany("UPDATE outbox SET next_attempt=? WHERE id=? AND state='pending'",
                                  [(time.time(), i) for i in ids])

    def mark_sent(self, ids: list[int]) -> None:
        now = time.time()
        with self.store.transaction() as db:
            db.executemany("UPDATE outbox SET state='sent', sent_at=?, attempts=attempts+1, last_error=NULL WHERE id=?",
                           [(now, i) for i in ids])

    def mark_failed(self, ids: list[int], error: str) -> None:
        """One more failed attempt: back off exponentially, park as ``failed`` when attempts run out."""
        now = time.time()
        with self.store.transaction() as db:
            for i in ids:
                row = db.execute("SELECT attempts FROM outbox WHERE id=?", (i,)).fetchone()
                attempts = (row["attempts"] if row else 0) + 1
                if attempts >= self.max_attempts:
                    db.execute("UPDATE outbox SET state='failed', attempts=?, last_error=? WHERE id=?", (attempts, error[:1000], i))
                else:
                    delay = min(self.backoff_max, self.backoff_initial * 2 ** (attempts - 1))
                    db.execute("UPDATE outbox SET attempts=?, next_attempt=?, last_error=? WHERE id=?",
                               (attempts, now + delay, error[:1000], i))

    def resend(self, ids: list[int] | None = None, failed: bool = False) -> int:
        """Put rows back to pending now (by id, or every failed row)."""
        if failed:
            cur = self.store.db.execute("UPDATE outbox SET state='pending', attempts=0, next_attempt=0 WHERE state='failed'")
        else:
            cur = self.store.db.execute(
                f"UPDATE outbox SET state='pending', attempts=0, next_attempt=0 WHERE id IN ({','.join('?' * len(ids or []))})",
                ids or [])
        return cur.rowcount

    def list(self, states: list[str] | None = None, limit: int = 200) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM outbox", []
        if states:
            q += f" WHERE state IN ({','.join('?' * len(states))})"
            args += states
        rows = self.store.db.execute(q + " ORDER BY id DESC LIMIT ?", [*args, limit]).fetchall()
        return [dict(r) for r in rows]

    @staticmethod
    def backlog(db: Any) -> dict[str, tuple[int, float | None, int]]:
        """Per destination: pending rows, when the oldest of them was created, failed (parked) rows."""
        out: dict[str, tuple[int, float | None, int]] = {}
        for dest, state, n, first in db.execute(
                "SELECT destination, state, COUNT(*), MIN(created_at) FROM outbox WHERE state IN ('pending','failed') "
                "GROUP BY destination, state"):
            pending, oldest, failed = out.get(dest, (0, None, 0))
            out[dest] = (n, first, failed) if state == "pending" else (pending, oldest, n)
        return out

    @staticmethod
    def waiting(db: Any, study_uid: str, destination: str) -> bool:
        """Whether a result of the study still waits for ``destination``."""
        return db.execute("SELECT 1 FROM outbox WHERE study_uid=? AND destination=? AND state='pending' LIMIT 1",
                          (study_uid, destination)).fetchone() is not None

    def depths(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.store.db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state")}

    def missing(self, ids: list[int]) -> list[int]:
        """The ids among ``ids`` that name no outbox row."""
        found = {r[0] for r in self.store.db.execute(f"SELECT id FROM outbox WHERE id IN ({','.join('?' * len(ids))})", ids)}
        return sorted(set(ids) - found)

    # -- moving to another database (dicomnode db migrate) --------------------------

    def copy_into(self, db: Any) -> int:
        """Every outbox row, with its id, into ``db`` (another store's transaction)."""
        return self.store.copy_rows(db, "SELECT * FROM outbox ORDER BY id", "INSERT INTO outbox", "SELECT 1 FROM outbox LIMIT 1")

    def last_id(self) -> int | None:
        return self.store.db.execute("SELECT MAX(id) FROM outbox").fetchone()[0]

    # -- retention: inside the caller's transaction ------------------------------

    @staticmethod
    def open_work(db: Any, study_uid: str) -> dict[str, int]:
        """Pending and failed (undelivered) rows of a study, by state."""
        return {r[0]: r[1] for r in db.execute(
            "SELECT state, COUNT(*) FROM outbox WHERE study_uid=? AND state IN ('pending','failed') GROUP BY state", (study_uid,))}

    @staticmethod
    def files_of(db: Any, study_uid: str) -> list[Path]:
        return [Path(r[0]) for r in db.execute("SELECT path FROM outbox WHERE study_uid=?", (study_uid,))]

    @staticmethod
    def forget(db: Any, study_uid: str) -> None:
        db.execute("DELETE FROM outbox WHERE study_uid=?", (study_uid,))
