"""``dicomnode`` command line: run the node, try analyzers on files, test peers, look into its state, and
administer it. One module per noun (rules, destinations, callers, jobs, outbox, studies, models, status,
echo and send in :mod:`.peers`), each registering its own subcommands and calling the
:mod:`dicomnode.admin` module of the same noun, where the logic lives.

Listing commands take ``--json``; a failure prints one line ``dicomnode: <reason>`` on stderr.

Exit status: 0 success; 1 failure (or the node is down, for status); 2 usage or configuration error;
3 not applicable (analyze; studies reprocess when no rule matches).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from . import analyze, callers, db, destinations, jobs, models, outbox, peers, rules, serve, status, studies
from .changes import audit_change
from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, opts

# in the order `dicomnode --help` lists them
NOUNS = (serve, peers, analyze, status, rules, studies, jobs, outbox, destinations, callers, models, db)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    opts(common)
    p = argparse.ArgumentParser(prog="dicomnode", description="A DICOM node that runs AI analyzers on studies a PACS sends it.",
                                epilog="exit status: 0 ok, 1 failure, 2 usage or configuration error, 3 not applicable")
    opts(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for noun in NOUNS:
        noun.register(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    if not getattr(args, "own_logging", False):
        from ..logs import setup_logging

        # stdout is the command's answer (tables, JSON); events go to stderr, warnings and worse only
        setup_logging(None, process="cli", level=os.environ.get("DICOMNODE_LOG_LEVEL", "WARNING"), fmt="console")
    try:
        code = func(args)
        if code == EXIT_OK:
            audit_change(args)
        return code
    except CliError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
