"""``dicomnode jobs``: list analysis jobs by state, retry them."""

from __future__ import annotations

import argparse

from ..admin import jobs
from ..admin.status import node_note
from .common import EXIT_OK, admin_errors, ago, config_of, emit, listing_group, open_store, states_of


def cmd_jobs(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    states = states_of(args, jobs.STATES)
    rows = jobs.listing(open_store(cfg), states, getattr(args, "limit", 200))
    for r in rows:
        r["created"] = ago(r["created_at"])
        r["took"] = f"{r['finished_at'] - r['started_at']:.1f}s" if r["finished_at"] and r["started_at"] else "-"
        r["error_short"] = (r["error"] or "")[:80]
    emit(args, rows, [("id", "ID"), ("state", "STATE"), ("analyzer", "ANALYZER"), ("study_uid", "STUDY"),
                       ("attempts", "TRIES"), ("n_objects", "OBJECTS"), ("took", "TOOK"), ("created", "CREATED"),
                       ("error_short", "ERROR")], "(no jobs)")
    return EXIT_OK


@admin_errors
def cmd_jobs_retry(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    for job_id, before in zip(args.ids, jobs.retry(open_store(cfg), args.ids)):
        print(f"job {job_id} queued again ({before} before)")
    print(node_note(cfg))
    return EXIT_OK


def register(sub, common: argparse.ArgumentParser) -> None:
    gs = listing_group(sub, "jobs", "analysis jobs: queued, running, done, failed; retry them",
                       ",".join(jobs.STATES), cmd_jobs)
    s = gs.add_parser("retry", parents=[common], help="queue failed, not-applicable or done jobs again")
    s.add_argument("ids", nargs="+", type=int, metavar="ID")
    s.set_defaults(func=cmd_jobs_retry)
