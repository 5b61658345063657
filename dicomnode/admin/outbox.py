"""Result objects in the outbox: list them by state, send rows again."""

from __future__ import annotations

from typing import Any

from ..outbox import OUTBOX_STATES, Outbox
from ..store import Store
from . import AdminError

STATES = OUTBOX_STATES


def listing(store: Store, states: list[str] | None, limit: int) -> list[dict[str, Any]]:
    return Outbox(store).list(states, limit)


def resend(store: Store, ids: list[int] | None, failed: bool = False) -> int:
    """Put rows back to pending now, by id or every failed one; returns how many.

    Raises
    ------
    AdminError
        When an id names no row (nothing changed).
    """
    outbox = Outbox(store)
    if ids:
        missing = outbox.missing(ids)
        if missing:
            raise AdminError(f"no outbox row {', '.join(map(str, missing))}; `dicomnode outbox list` shows the rows", 1)
    return outbox.resend(ids or None, failed=failed)
