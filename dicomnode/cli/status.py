"""``dicomnode status``: is the node up; associations, queue depths, rules, last error (exit 1 when down)."""

from __future__ import annotations

import argparse
import json

from ..admin.status import report
from .common import EXIT_FAIL, EXIT_OK, admin_errors, ago, config_of, json_opt


@admin_errors
def cmd_status(args: argparse.Namespace) -> int:
    state = report(config_of(args))
    if getattr(args, "json", False):
        print(json.dumps(state, indent=2, default=str))
    else:
        print(("up:    " if state["up"] else "DOWN:  ") + state["summary"])
        if state["up"]:
            print(f"associations: {state['associations']} open, {state.get('stored') or 0} instances stored since start")
        depths = lambda d: ", ".join(f"{v} {k}" for k, v in sorted(d.items())) or "empty"  # noqa: E731
        print(f"jobs:   {depths(state['jobs'])}")
        print(f"outbox: {depths(state['outbox'])}")
        print(f"rules:  {state['rules']}")
        m = state.get("metrics")
        if m:
            e2e = m["study_to_delivery_seconds"]
            print(f"since start: {m['instances_received']} instances ({m['bytes_received'] / 1e6:.1f} MB) received, "
                  f"{m['studies_completed']} studies complete, jobs {depths(m['jobs_finished'])}, "
                  f"{m['objects_sent']} objects sent, {m['worker_restarts']} worker restarts")
            if e2e["count"]:
                print(f"study complete -> last result acknowledged: median {e2e['p50']} s, p95 {e2e['p95']} s "
                      f"({e2e['count']} studies)")
        err = state.get("last_error")
        print("last error: " + (f"{err.get('error')} (job {err.get('job')}, {ago(err.get('at'))})" if err else "none"))
    return EXIT_OK if state["up"] else EXIT_FAIL


def register(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("status", parents=[common], help="is the node up; associations, queue depths, last error (exit 1 when down)")
    json_opt(s)
    s.set_defaults(func=cmd_status)
