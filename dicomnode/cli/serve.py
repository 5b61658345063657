"""``dicomnode serve``: run the node in the foreground."""

from __future__ import annotations

import argparse

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, config_of


def cmd_serve(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from ..service import Node

    cfg = config_of(args)
    setup_logging(cfg, process="node")
    try:
        node = Node(cfg, role=args.role)
    except Exception as exc:
        raise CliError(f"cannot start: {exc}", EXIT_USAGE) from None
    try:
        node.serve_forever()
    except OSError as exc:
        raise CliError(f"cannot listen on {cfg.node.host}:{cfg.node.port}: {exc.strerror or exc}; "
                       "another process may hold the port (change node.port)", EXIT_FAIL) from None
    except RuntimeError as exc:
        raise CliError(f"cannot start: {exc}", EXIT_FAIL) from None
    return EXIT_OK


def register(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", parents=[common], help="run the node in the foreground")
    s.add_argument("--role", choices=("all", "receiver", "worker"), default="all",
                   help="stages to run when several nodes share a PostgreSQL database: receiver (no worker or sender), "
                        "worker (no receiver), or all (default)")
    s.set_defaults(func=cmd_serve, own_logging=True)
