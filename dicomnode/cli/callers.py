"""``dicomnode callers``: list, allow and remove the calling AEs that may send to the node."""

from __future__ import annotations

import argparse

from ..admin import callers
from .common import EXIT_OK, admin_errors, config_of, config_path_checked, emit, json_opt, saved


def cmd_callers_list(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    rows = [c.model_dump() for c in cfg.callers]
    emit(args, rows, [("ae_title", "AE TITLE"), ("host", "HOST"), ("destination", "DESTINATION"), ("stable_after", "STABLE AFTER")],
          "(no callers: the node accepts no association)")
    return EXIT_OK


@admin_errors
def cmd_callers_add(args: argparse.Namespace) -> int:
    cf, cfg = callers.add(config_path_checked(args), args.ae_title, args.host, args.destination, args.stable_after)
    return saved(cf, cfg, f"caller {args.ae_title!r}" + (f" from {args.host}" if args.host else " from any host") + " allowed")


@admin_errors
def cmd_callers_remove(args: argparse.Namespace) -> int:
    cf, cfg, n = callers.remove(config_path_checked(args), args.ae_title, args.host)
    return saved(cf, cfg, f"{n} caller entr{'y' if n == 1 else 'ies'} for {args.ae_title!r} removed")


def register(sub, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("callers", parents=[common], help="who may send to the node: list, add, remove",
                       description="Callers live under callers: in the configuration; associations from others are rejected.")
    gs = g.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = gs.add_parser("list", parents=[common], help="allowed calling AEs")
    json_opt(s)
    s.set_defaults(func=cmd_callers_list)
    s = gs.add_parser("add", parents=[common], help="allow a calling AE")
    s.add_argument("ae_title")
    s.add_argument("--host", help="only from this address (default: any)")
    s.add_argument("--destination", help="where results of its studies go (a configured destination)")
    s.add_argument("--stable-after", type=float, metavar="SECONDS", help="quiet time for its studies")
    s.set_defaults(func=cmd_callers_add)
    s = gs.add_parser("remove", parents=[common], help="stop accepting a calling AE")
    s.add_argument("ae_title")
    s.add_argument("--host", help="only the entry for this address")
    s.set_defaults(func=cmd_callers_remove)
