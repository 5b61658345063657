"""Outbox: one row per result object and destination, until the destination has acknowledged it."""

from __future__ import annotations

import time
from typing import Any

from .store import Store

OUTBOX_STATES = ("pending", "sent", "failed")


class Outbox:
    def __init__(self, store: Store, max_attempts: int = 10, backoff_initial: float = 5.0, backoff_max: float = 600.0) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

    def due(self, limit: int = 500) -> list[dict[str, Any]]:
        rows = self.store.db.execute(
            "SELECT * FROM outbox WHERE state='pending' AND next_attempt<=? ORDER BY destination, id LIMIT ?",
            (time.time(), limit)).fetchall()
        return [dict(r) for r in rows]

    def next_due_in(self) -> float | None:
        row = self.store.db.execute("SELECT MIN(next_attempt) FROM outbox WHERE state='pending'").fetchone()
        return None if row[0] is None else max(0.0, row[0] - time.time())

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

    def depths(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.store.db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state")}

    def missing(self, ids: list[int]) -> list[int]:
        """The ids among ``ids`` that name no outbox row."""
        found = {r[0] for r in self.store.db.execute(f"SELECT id FROM outbox WHERE id IN ({','.join('?' * len(ids))})", ids)}
        return sorted(set(ids) - found)
