"""The node's database: move an SQLite node's index, queue and outbox onto PostgreSQL."""

from __future__ import annotations

import fcntl
from typing import Any

from ..config import Config
from ..index import Index
from ..outbox import Outbox
from ..queue import JobQueue
from ..store import Store
from . import AdminError


def migrate(cfg: Config, url: str) -> dict[str, Any]:
    """Copy every study, series, instance, job and outbox row of the node's SQLite database to ``url``.

    The node must be stopped (its data folder's lock is taken for the copy) and the target
    database empty; the copy is one transaction, so a failure leaves the target as it was. The
    spool and result files stay where they are: the rows name them by path.

    Raises
    ------
    AdminError
        When the node runs, the node has no SQLite database, or the target is not empty or unreachable.
    """
    if cfg.storage.database is not None:
        raise AdminError(f"this node already uses {cfg.storage.database}; migrate moves a node from SQLite", 2)
    if not url.startswith(("postgresql://", "postgres://")):
        raise AdminError("--to must be a postgresql://user@host:port/dbname URL", 2)
    if not cfg.db_path.exists():
        raise AdminError(f"no node database at {cfg.db_path}; nothing to migrate", 1)
    with open(cfg.data_dir / "node.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AdminError(f"the node is running with data folder {cfg.data_dir}; stop it first", 1) from None
        src = Store(cfg.data_dir, fsync=cfg.node.fsync)
        try:
            dst = Store(cfg.data_dir, fsync=cfg.node.fsync, database=url, shared_dir=cfg.shared_dir)
        except RuntimeError as exc:
            raise AdminError(str(exc), 1) from None
        index, queue, outbox = Index(src), JobQueue(src), Outbox(src)
        Index(dst), JobQueue(dst), Outbox(dst)
        try:
            with dst.transaction() as db:
                counts = {**index.copy_into(db), "jobs": queue.copy_into(db), "outbox": outbox.copy_into(db)}
        except RuntimeError as exc:
            raise AdminError(str(exc), 1) from None
        dst.continue_ids("jobs", queue.last_id())
        dst.continue_ids("outbox", outbox.last_id())
    return {"to": dst.where, "copied": counts}
