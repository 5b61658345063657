"""``dicomnode echo`` and ``dicomnode send``: test any DICOM peer with the node's own SCU.

The peer is a configured destination by name, or ``-aet AET -aec AEC HOST PORT`` as DCMTK's
echoscu and storescu take it.
"""

from __future__ import annotations

import argparse
import json

from ..admin import peers
from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, admin_errors, collect_files, config_of, json_opt

USAGE_NOTE = "PEER is a destination name from the configuration, or HOST PORT (with -aec, -aet as echoscu and storescu take them)"


def _peer(args: argparse.Namespace, target: list[str]):
    cfg = config_of(args, required=False)
    return peers.peer(cfg, target, getattr(args, "aec", None), getattr(args, "aet", None))


@admin_errors
def cmd_echo(args: argparse.Namespace) -> int:
    target = [args.destination] if isinstance(getattr(args, "destination", None), str) else args.peer
    p, rest = _peer(args, target)
    if rest:
        raise CliError(f"unexpected {' '.join(rest)!r} after the peer; {USAGE_NOTE}", EXIT_USAGE)
    ok, message = peers.echo(p)
    print(message)
    return EXIT_OK if ok else EXIT_FAIL


@admin_errors
def cmd_send(args: argparse.Namespace) -> int:
    p, rest = _peer(args, args.peer_and_files)
    if not rest:
        raise CliError(f"name the files or folders to send after the peer; {USAGE_NOTE}", EXIT_USAGE)
    report = peers.send(p, collect_files(rest))
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        if report["association_error"]:
            print(f"{report['peer']}: association failed: {report['association_error']}")
        else:
            print(f"{report['peer']}: {len(report['stored'])} of {report['files']} files stored")
            for f, why in report["failed"].items():
                print(f"  not stored: {f}: {why}")
    return EXIT_OK if report["files"] and len(report["stored"]) == report["files"] else EXIT_FAIL


def _peer_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("-aet", "--aetitle", dest="aet", metavar="AET", help="calling AE title (default: sender.ae_title, "
                                                                         "else node.ae_title)")
    s.add_argument("-aec", "--call", dest="aec", metavar="AEC", help=f"called AE title (default {peers.DEFAULT_CALLED}; "
                                                                      "with HOST PORT)")


def register(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("echo", parents=[common], help="C-ECHO a configured destination or any peer (HOST PORT)",
                       epilog=USAGE_NOTE + ". Examples: dicomnode echo pacs; dicomnode echo -aec ORTHANC 10.0.0.5 4242")
    _peer_options(s)
    s.add_argument("peer", nargs="+", metavar="PEER", help="a destination name, or HOST PORT")
    s.set_defaults(func=cmd_echo)

    s = sub.add_parser("send", parents=[common], help="C-STORE files to a configured destination or any peer (HOST PORT)",
                       epilog=USAGE_NOTE + ". Examples: dicomnode send pacs study/; "
                                           "dicomnode send -aet DICOMNODE -aec STORESCP 10.0.0.5 104 a.dcm b.dcm")
    _peer_options(s)
    s.add_argument("peer_and_files", nargs="+", metavar="PEER FILE_OR_DIR", help="a destination name or HOST PORT, "
                                                                                   "then files or folders")
    json_opt(s)
    s.set_defaults(func=cmd_send)
