"""``dicomnode models``: versions, checksums and device of the analyzers' models; verify them."""

from __future__ import annotations

import argparse
import json

from ..admin import models
from .common import EXIT_FAIL, EXIT_OK, admin_errors, config_of, json_opt, print_table, split


def cmd_models_list(args: argparse.Namespace) -> int:
    rows = models.model_rows(config_of(args, required=False))
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for r in rows:
        r["sha"] = (r["sha256"] or "")[:12] or "-"
        r["phantom"] = {True: "yes (not for clinical use)", False: "no", None: "-"}[r["phantom_trained"]]
        r["model_text"] = r["model"] or ("-" if r["error"] else "(no model files)")
        r["error_short"] = (r["error"] or "")[:120]
    print_table(rows, [("analyzer", "ANALYZER"), ("analyzer_version", "VERSION"), ("model_text", "MODEL"), ("version", "MODEL VERSION"),
                       ("sha", "SHA256"), ("device", "DEVICE"), ("phantom", "PHANTOM-TRAINED"), ("error_short", "ERROR")],
                "(no analyzers installed)")
    return EXIT_OK


@admin_errors
def cmd_models_verify(args: argparse.Namespace) -> int:
    rows = models.verify_models(config_of(args, required=False), split(args.analyzer) or None)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            checks = "; ".join(f"{m['model']} sha256 {m['sha256']}, onnx {m['onnx']}" for m in r["models"])
            if not checks and r["error"] is None or r["error"] and not r["error"].startswith("cannot load"):
                checks = checks or "no model files"
            head = f"{'ok    ' if r['ok'] else 'FAILED'} {r['analyzer']} ({r['device']})" + (f": {checks}" if checks else "")
            print(head + (f"; warm-up {r['warmup_seconds']} s" if r["warmup_seconds"] is not None else ""))
            if r["error"]:
                print(f"       {r['error']}")
    return EXIT_OK if rows and all(r["ok"] for r in rows) else EXIT_FAIL


def register(sub, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("models", parents=[common], help="analyzer models: versions, checksums, device; verify them")
    gs = g.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = gs.add_parser("list", parents=[common], help="analyzer, model version, sha256, device, phantom-trained or not")
    json_opt(s)
    s.set_defaults(func=cmd_models_list)
    s = gs.add_parser("verify", parents=[common], help="check sha256 of the weights, load each ONNX file, run one warm-up inference "
                      "(exit 1 when any analyzer fails)")
    s.add_argument("--analyzer", action="append", help="only these analyzers (repeat or comma-separate)")
    json_opt(s)
    s.set_defaults(func=cmd_models_verify)
