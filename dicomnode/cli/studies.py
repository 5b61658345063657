"""``dicomnode studies``: list stored studies, reprocess one, purge old ones."""

from __future__ import annotations

import argparse
import json

from ..admin import studies
from ..admin.status import node_note
from .common import EXIT_OK, admin_errors, ago, config_of, emit, json_opt, listing_group, open_store


def cmd_studies(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    rows = studies.listing(open_store(cfg), getattr(args, "limit", 200))
    for r in rows:
        r["arrived"] = ago(r["last_arrival"])
    emit(args, rows, [("study_uid", "STUDY"), ("mods", "MOD"), ("n_series", "SERIES"), ("n_instances", "INSTANCES"),
                       ("state", "STATE"), ("calling_ae", "FROM"), ("arrived", "LAST ARRIVAL")], "(no studies)")
    return EXIT_OK


@admin_errors
def cmd_studies_reprocess(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    planned = studies.reprocess(cfg, open_store(cfg), args.study_uid, args.analyzer, args.destination)
    if getattr(args, "json", False):
        print(json.dumps(planned, indent=2))
    else:
        for p in planned:
            print(f"job {p['job']} queued: {p['analyzer']} on {len(p['series'])} series -> {', '.join(p['destinations'])}"
                  + (f" (rule {', '.join(p['rules'])})" if p["rules"] else ""))
        print(node_note(cfg))
    return EXIT_OK


@admin_errors
def cmd_studies_purge(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    seconds = studies.purge_age(cfg, args.older_than)
    report = studies.purge(open_store(cfg), seconds, dry_run=args.dry_run)
    if getattr(args, "json", False):
        print(json.dumps(report.as_dict(), indent=2))
        return EXIT_OK
    verb = "would purge" if args.dry_run else "purged"
    print(f"{verb} {len(report.purged)} stud{'y' if len(report.purged) == 1 else 'ies'} "
          f"({report.files} files, {report.bytes / 1e6:.1f} MB); kept {len(report.kept)} with work still open")
    for uid, why in report.kept.items():
        print(f"  kept {uid}: {why}")
    return EXIT_OK


def register(sub, common: argparse.ArgumentParser) -> None:
    gs = listing_group(sub, "studies", "studies the node has stored; reprocess or purge them", None, cmd_studies)
    s = gs.add_parser("reprocess", parents=[common], help="queue new jobs for a stored study, by the rules or one analyzer")
    s.add_argument("study_uid")
    s.add_argument("--analyzer", help="run this analyzer on all series instead of what the rules say")
    s.add_argument("--destination", action="append", help="send results here instead (repeat for several)")
    json_opt(s)
    s.set_defaults(func=cmd_studies_reprocess)
    s = gs.add_parser("purge", parents=[common], help="delete stored studies whose last instance arrived before a time; "
                      "studies with open jobs or undelivered results are kept")
    s.add_argument("--older-than", metavar="AGE", help="30d, 12h, 90m (default: storage.retention_days)")
    s.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    json_opt(s)
    s.set_defaults(func=cmd_studies_purge)
