"""``dicomnode destinations``: list, add, remove and echo where results are sent."""

from __future__ import annotations

import argparse

from ..admin import destinations
from .common import EXIT_OK, admin_errors, config_of, config_path_checked, emit, json_opt, saved
from .peers import cmd_echo


def cmd_destinations_list(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    rows = [{"name": n, **d.model_dump()} for n, d in sorted(cfg.destinations.items())]
    emit(args, rows, [("name", "NAME"), ("ae_title", "AE TITLE"), ("host", "HOST"), ("port", "PORT"), ("tls", "TLS")],
          "(no destinations)")
    return EXIT_OK


@admin_errors
def cmd_destinations_add(args: argparse.Namespace) -> int:
    cf, cfg = destinations.add(config_path_checked(args), args.name, args.ae_title, args.host, args.port, args.tls)
    return saved(cf, cfg, f"destination {args.name!r} ({args.ae_title}@{args.host}:{args.port}) added")


@admin_errors
def cmd_destinations_remove(args: argparse.Namespace) -> int:
    cf, cfg = destinations.remove(config_of(args), config_path_checked(args), args.name)
    return saved(cf, cfg, f"destination {args.name!r} removed")


def register(sub, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("destinations", parents=[common], help="where results are sent: list, add, remove, echo",
                       description="Destinations live under destinations: in the configuration; edits keep the rest of the "
                                   "file as it is, and a running node reloads it.")
    gs = g.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = gs.add_parser("list", parents=[common], help="configured destinations")
    json_opt(s)
    s.set_defaults(func=cmd_destinations_list)
    s = gs.add_parser("add", parents=[common], help="add a destination")
    s.add_argument("name", help="the name rules and callers use")
    s.add_argument("--ae-title", required=True, help="the destination's AE title")
    s.add_argument("--host", required=True)
    s.add_argument("--port", required=True, type=int)
    s.add_argument("--tls", action="store_true", help="use TLS")
    s.set_defaults(func=cmd_destinations_add)
    s = gs.add_parser("remove", parents=[common], help="remove a destination no caller or rule uses")
    s.add_argument("name")
    s.set_defaults(func=cmd_destinations_remove)
    s = gs.add_parser("echo", parents=[common], help="C-ECHO a destination")
    s.add_argument("destination")
    s.set_defaults(func=cmd_echo)
