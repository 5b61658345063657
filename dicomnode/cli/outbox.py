"""``dicomnode outbox``: result objects waiting for or sent to destinations; send them again."""

from __future__ import annotations

import argparse
import time

from ..admin import outbox
from ..admin.status import node_note
from .common import EXIT_OK, EXIT_USAGE, CliError, admin_errors, ago, config_of, emit, listing_group, open_store, states_of


def cmd_outbox(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    states = states_of(args, outbox.STATES)
    rows = outbox.listing(open_store(cfg), states, getattr(args, "limit", 200))
    for r in rows:
        r["next"] = ago(r["next_attempt"]) if r["state"] == "pending" and r["next_attempt"] > time.time() else "-"
        r["sent"] = ago(r["sent_at"])
    emit(args, rows, [("id", "ID"), ("state", "STATE"), ("destination", "DEST"), ("description", "SERIES"),
                       ("sop_uid", "SOP INSTANCE"), ("attempts", "TRIES"), ("sent", "SENT"), ("last_error", "ERROR")],
          "(outbox empty)")
    return EXIT_OK


@admin_errors
def cmd_outbox_resend(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.failed):
        raise CliError("give outbox row IDs or --failed (not both)", EXIT_USAGE)
    cfg = config_of(args)
    n = outbox.resend(open_store(cfg), args.ids, failed=args.failed)
    print(f"{n} object{'s' if n != 1 else ''} to send again")
    print(node_note(cfg))
    return EXIT_OK


def register(sub, common: argparse.ArgumentParser) -> None:
    gs = listing_group(sub, "outbox", "result objects waiting for or sent to destinations; resend them",
                       ",".join(outbox.STATES), cmd_outbox)
    s = gs.add_parser("resend", parents=[common], help="send outbox rows again, by ID or every failed one")
    s.add_argument("ids", nargs="*", type=int, metavar="ID")
    s.add_argument("--failed", action="store_true", help="every row parked as failed")
    s.set_defaults(func=cmd_outbox_resend)
