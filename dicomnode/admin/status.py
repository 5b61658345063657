"""Whether the node is up, from the rows it keeps in node_status, plus queue depths."""

from __future__ import annotations

import os
import time
from typing import Any

from .. import metrics
from ..config import Config
from ..heartbeat import Heartbeat
from ..outbox import Outbox
from ..queue import JobQueue
from ..router import RuleSet, RulesError
from ..store import Store


HEARTBEAT_STALE = 15.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process holds the pid: alive, but not ours to signal
    return True


def node_state(store: Any) -> dict[str, Any]:
    """Whether the node is up, read from the node_status rows it keeps, plus queue depths."""
    status = Heartbeat(store).get()
    node = (status.get("node") or {}).get("value") or {}
    receiver = status.get("receiver") or {}
    pid = node.get("pid")
    beat = receiver.get("updated_at")
    now = time.time()
    if not node:
        up, why = False, "the node has never run with this data folder"
    elif node.get("state") != "running":
        up, why = False, f"the node is stopped (cleanly, {_age(node.get('stopped_at'), now)})"
    elif not pid or not pid_alive(int(pid)):
        up, why = False, f"the node is down: its process {pid} is gone (killed or crashed; it did not stop cleanly)"
    elif beat is not None and now - beat > HEARTBEAT_STALE and beat >= float(node.get("started_at") or 0):
        up, why = False, f"the node's process {pid} is alive but has not reported for {now - beat:.0f} s (hung?)"
    else:
        up, why = True, f"the node is running (pid {pid}, port {node.get('port')}, up {_age(node.get('started_at'), now, suffix='')})"
    last_error = status.get("last_error")
    return {
        "up": up,
        "summary": why,
        "pid": pid,
        "ae_title": node.get("ae_title"),
        "port": node.get("port"),
        "started_at": node.get("started_at"),
        "associations": (receiver.get("value") or {}).get("associations") if up else 0,
        "stored": (receiver.get("value") or {}).get("stored"),
        "heartbeat_at": beat,
        "jobs": JobQueue(store).depths(),
        "outbox": Outbox(store).depths(),
        "last_error": dict(last_error["value"], at=last_error["updated_at"]) if last_error else None,
    }


def report(cfg: Config) -> dict[str, Any]:
    """:func:`node_state` for the configured data folder (also when the node never ran), plus the rules file's state."""
    if not cfg.has_data():
        state = {"up": False, "summary": f"the node has never run with data folder {cfg.data_dir}", "jobs": {}, "outbox": {},
                 "last_error": None, "associations": 0}
    else:
        state = node_state(Store.from_config(cfg))
    try:
        state["rules"] = f"{len(RuleSet.load(cfg.rules_path).rules)} rules in {cfg.rules_path}"
    except RulesError as exc:
        state["rules"] = f"INVALID: {exc}"
    state["metrics"] = metrics.summary(cfg)  # the counters /metrics serves, since the node last started
    return state


def node_note(cfg: Config) -> str:
    """A line saying whether a running node will act on a change now or when it starts."""
    if not cfg.has_data():
        return "the node is not running; the change takes effect when it starts (`dicomnode serve`)"
    state = node_state(Store.from_config(cfg))
    if state["up"]:
        return "the running node picks this up within a few seconds"
    return f"{state['summary']}; the change takes effect when it starts (`dicomnode serve`)"


def _age(ts: float | None, now: float, suffix: str = " ago") -> str:
    if not ts:
        return "at an unknown time"
    s = now - float(ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s / size:.0f}{unit}{suffix}"
    return f"{s:.0f}s{suffix}"
