"""``dicomnode db migrate --to URL``: move the node's SQLite index, queue and outbox onto PostgreSQL."""

from __future__ import annotations

import argparse
import json

from ..admin import db
from .common import EXIT_OK, admin_errors, config_of, json_opt


@admin_errors
def cmd_db_migrate(args: argparse.Namespace) -> int:
    done = db.migrate(config_of(args), args.to)
    if getattr(args, "json", False):
        print(json.dumps(done, indent=2))
    else:
        print(f"copied to {done['to']}: " + ", ".join(f"{n} {table}" for table, n in done["copied"].items()))
        print("next: set storage.database to this URL in the node's configuration and start the node")
    return EXIT_OK


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("db", help="the node's database: move it from SQLite to PostgreSQL")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    m = verbs.add_parser("migrate", parents=[common], help="copy the SQLite index, queue and outbox to an empty PostgreSQL "
                                                           "database (the node stopped)")
    m.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host:port/dbname")
    json_opt(m)
    m.set_defaults(func=cmd_db_migrate)
