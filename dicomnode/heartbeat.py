"""The node_status table: what the running node reports about itself, for `dicomnode status`.

The node writes its state at start and stop (``node``), the receiver's figures every second
(``receiver``, whose time is the heartbeat) and the last job a dead worker took with it
(``last_error``); the CLI reads them whether or not the node runs.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import Store

OWNER = "heartbeat"

# One entry per schema version; a database at version n runs entries n and later, in order.
MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS node_status (key TEXT PRIMARY KEY, value TEXT, updated_at REAL)",
)


class Heartbeat:
    def __init__(self, store: "Store") -> None:
        self.store = store
        store.migrate(OWNER, MIGRATIONS)

    def set(self, key: str, value: Any) -> None:
        self.store.db.execute(
            "INSERT INTO node_status VALUES (?,?,?) ON CONFLICT (key) DO UPDATE SET value=excluded.value, "
            "updated_at=excluded.updated_at", (key, json.dumps(value), time.time()))

    @staticmethod
    def probe_write(db: Any, begin: bool = True) -> None:
        """One small write transaction on ``db`` (/readyz asks whether the index takes writes); ``begin``: run its own."""
        if begin:
            db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO node_status VALUES ('readyz', ?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value, "
                   "updated_at=excluded.updated_at", (json.dumps({"pid": os.getpid()}), time.time()))
        if begin:
            db.execute("COMMIT")

    def get(self) -> dict[str, Any]:
        """Every key's value and when it was written."""
        return {r["key"]: {"value": json.loads(r["value"]), "updated_at": r["updated_at"]}
                for r in self.store.db.execute("SELECT * FROM node_status")}
