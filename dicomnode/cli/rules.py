"""``dicomnode rules``: list, show, add, remove, enable, disable, move, test and validate the routing rules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..admin import rules as admin_rules
from ..admin.match import describe
from ..admin.rules_file import RulesFile
from ..admin.status import node_note
from .common import (EXIT_OK, EXIT_USAGE, CliError, admin_errors, collect_files, config_of, json_opt, open_store,
                     print_table, read_studies, split)


MATCH_HELP = """\
--match forms (several are ANDed): Key=Value, Key!=Value, 'Key in A,B', 'Key ~ REGEX' (Python regex,
search), Key<N, Key<=N, Key>N, Key>=N, Key? (present), !Key? (absent). Keys are DICOM keywords
(Modality, BodyPartExamined, SeriesDescription, ImageType, ViewPosition, ...) or CallingAETitle.
Conditions with 'any' or 'not' around several parts: edit rules.yaml (see `rules show`);
`dicomnode rules validate` checks the file, and the node reloads it.

example: dicomnode rules add chest-lat --match Modality=CR --match 'BodyPartExamined in CHEST,THORAX' \\
           --match 'SeriesDescription ~ (?i)lat' --analyzer chest_xray_thoracic --destination pacs
"""


def _rules_file(args: argparse.Namespace, cfg, missing_ok: bool = True) -> RulesFile:
    return RulesFile.open(Path(args.rules) if getattr(args, "rules", None) else cfg.rules_path, missing_ok=missing_ok)


def _write_rules(args: argparse.Namespace, cfg, rf, rules, text: str, what: str) -> int:
    """Validate the edited rules (syntax and references), write them atomically, report."""
    new_problems = admin_rules.save_edit(cfg, rf, rules, text, force=getattr(args, "force", False))
    for p in new_problems:
        print(f"warning: {p}", file=sys.stderr)
    if not rf.kept_layout:
        print(f"note: {rf.path} was rewritten in the standard layout; its comments could not be kept", file=sys.stderr)
    print(f"{what} ({len(rules)} rules in {rf.path})")
    print(node_note(cfg))
    return EXIT_OK


@admin_errors
def cmd_rules_list(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    rf = _rules_file(args, cfg)
    rows = []
    for i, r in enumerate(rf.rules.rules, 1):
        d = r.to_yaml_dict()
        rows.append({"position": i, **d, "enabled": r.enabled, "priority": r.priority, "condition": describe(r.when),
                     "analyzers_text": ",".join(r.analyzers), "destinations_text": ",".join(r.destinations or []) or "(caller's)",
                     "state": "on" if r.enabled else "off", "stable": r.stable_after if r.stable_after is not None else "-",
                     "cont": "yes" if r.continue_ else ""})
    if getattr(args, "json", False):
        keep = ("position", "name", "enabled", "when", "analyzers", "destinations", "priority", "stable_after", "continue",
                "description", "required_series", "force_after", "condition")
        print(json.dumps([{k: v for k, v in r.items() if k in keep} for r in rows], indent=2))
        return EXIT_OK
    print_table(rows, [("position", "#"), ("name", "NAME"), ("state", "ON"), ("analyzers_text", "ANALYZERS"),
                       ("destinations_text", "DESTINATIONS"), ("priority", "PRIO"), ("stable", "STABLE"), ("cont", "CONT"),
                       ("condition", "WHEN")], f"(no rules in {rf.path})")
    return EXIT_OK


@admin_errors
def cmd_rules_show(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    rf = _rules_file(args, cfg)
    rule = rf.get(args.name)
    if getattr(args, "json", False):
        print(json.dumps({"position": rf.index(args.name) + 1, **rule.to_yaml_dict(), "enabled": rule.enabled,
                          "priority": rule.priority, "condition": describe(rule.when)}, indent=2))
    else:
        print(f"# rule {rf.index(args.name) + 1} of {len(rf.rules.rules)} in {rf.path}; matches when {describe(rule.when)}")
        print(rf.block_text(args.name), end="")
    return EXIT_OK


@admin_errors
def cmd_rules_add(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    rf = _rules_file(args, cfg)
    rule = admin_rules.make_rule(args.name, args.match, split(args.analyzer), split(args.destination) or None, args.priority,
                     args.stable_after, args.disabled, args.cont, args.description or "")
    rules, text = rf.add(rule, args.before)
    return _write_rules(args, cfg, rf, rules, text, f"rule {rule.name!r} added at position {rules.index(rule) + 1}"
                        + (" (disabled)" if args.disabled else ""))


@admin_errors
def cmd_rules_remove(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    rf = _rules_file(args, cfg, missing_ok=False)
    rules, text = rf.remove(args.name)
    return _write_rules(args, cfg, rf, rules, text, f"rule {args.name!r} removed")


@admin_errors
def cmd_rules_enable(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    rf = _rules_file(args, cfg, missing_ok=False)
    enabled = args.verb == "enable"
    if rf.get(args.name).enabled == enabled:
        print(f"rule {args.name!r} is already {'enabled' if enabled else 'disabled'}; nothing changed")
        return EXIT_OK
    rules, text = rf.set_enabled(args.name, enabled)
    return _write_rules(args, cfg, rf, rules, text, f"rule {args.name!r} {'enabled' if enabled else 'disabled'}")


@admin_errors
def cmd_rules_move(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    rf = _rules_file(args, cfg, missing_ok=False)
    rules, text = rf.move(args.name, before=args.before, after=args.after)
    pos = next(i for i, r in enumerate(rules) if r.name == args.name) + 1
    return _write_rules(args, cfg, rf, rules, text, f"rule {args.name!r} moved to position {pos}")


@admin_errors
def cmd_rules_validate(args: argparse.Namespace) -> int:
    cfg = config_of(args, required=args.file is None)
    path = Path(args.file) if args.file else cfg.rules_path
    report = admin_rules.validate(path, cfg)
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    if report["errors"]:
        raise CliError(report["errors"][0], EXIT_USAGE)
    problems = report["problems"]
    if not getattr(args, "json", False):
        for p in problems:
            print(f"{path}: {p}")
        if cfg is None:
            print("note: no configuration found, so destinations were not checked", file=sys.stderr)
        print(f"{path}: {report['rules']} rules, " + (f"{len(problems)} problems" if problems else "valid"))
    return EXIT_USAGE if problems else EXIT_OK


@admin_errors
def cmd_rules_test(args: argparse.Namespace) -> int:
    if bool(args.inputs) == bool(args.study):
        raise CliError("give FILE_OR_DIR... or --study STUDY_UID (one of them)", EXIT_USAGE)
    cfg = config_of(args, required=bool(args.study))
    rules = (_rules_file(args, cfg, missing_ok=False) if cfg or getattr(args, "rules", None) else None)
    if rules is None:
        raise CliError("no configuration found; pass --config PATH or --rules FILE", EXIT_USAGE)
    if args.study:
        studies = admin_rules.test(rules.rules, cfg, store=open_store(cfg), study_uid=args.study)
    else:
        found, skipped = read_studies(collect_files(args.inputs))
        for f in skipped:
            print(f"skipped {f}: not a readable DICOM file", file=sys.stderr)
        if not found:
            raise CliError("no DICOM instances found in the given files", EXIT_USAGE)
        studies = admin_rules.test(rules.rules, cfg, studies=found, calling_ae=args.calling_ae)
    if getattr(args, "json", False):
        print(json.dumps(studies, indent=2))
        return EXIT_OK
    print(f"dry run of {rules.path} (nothing is queued)")
    for s in studies:
        print(f"study {s['study_uid']}" + (f" from {s['calling_ae']}" if s["calling_ae"] else "") + f": {len(s['series'])} series")
        for se in s["series"]:
            print(f"  series {se['series_uid']}  {se['modality']}" + (f"  {se['description']!r}" if se["description"] else ""))
            for d in se["decisions"]:
                print(f"    {d['outcome'].upper() if d['outcome'] == 'match' else d['outcome']:<9} {d['rule']}: {d['reason']}")
            for run in se["would_run"]:
                print(f"    -> {run['analyzer']} -> {', '.join(run['destinations']) or _NO_DEST} (rule {run['rule']})"
                      + ("" if run["installed"] else f"; but {run['analyzer']} is not installed or is disabled: it would not run"))
            if not se["would_run"]:
                print("    -> nothing would run for this series")
        for j in s["would_queue"]:
            if j["installed"]:
                print(f"  would queue {j['analyzer']} on {len(j['series'])} series -> {', '.join(j['destinations']) or _NO_DEST}")
        if not s["would_queue"]:
            print("  would queue nothing: no rule matches")
        elif not any(j["installed"] for j in s["would_queue"]):
            print("  would queue nothing: the matching rules name analyzers this node does not have")
    return EXIT_OK


_NO_DEST = "(the calling AE's destination; pass --calling-ae to see it)"


def register(sub, common: argparse.ArgumentParser) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    g = sub.add_parser("rules", parents=[common], help="routing rules: list, show, add, remove, enable, disable, move, test, validate",
                       description="Routing rules live in one file (rules_file in the configuration). Every change is validated "
                                   "before the file is replaced atomically; a running node reloads it.")
    rf = argparse.ArgumentParser(add_help=False)
    rf.add_argument("--rules", metavar="FILE", help="rules file to use instead of the configured one")
    gs = g.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = gs.add_parser("list", parents=[common, rf], help="the rules in order (first match wins unless continue)")
    json_opt(s)
    s.set_defaults(func=cmd_rules_list)
    s = gs.add_parser("show", parents=[common, rf], help="one rule as it stands in the file")
    s.add_argument("name")
    json_opt(s)
    s.set_defaults(func=cmd_rules_show)

    s = gs.add_parser("add", parents=[common, rf], help="add a rule built from --match conditions", epilog=MATCH_HELP,
                      formatter_class=fmt)
    s.add_argument("name", help="rule name: letters, digits, '.', '_' or '-'")
    s.add_argument("--match", action="append", required=True, metavar="EXPR", help="a condition (see below); repeat to AND")
    s.add_argument("--analyzer", action="append", required=True, help="analyzer to run (repeat or comma-separate)")
    s.add_argument("--destination", action="append", help="where results go (repeat or comma-separate); "
                                                          "default: the calling AE's destination")
    s.add_argument("--priority", type=int, help="job priority 0-9, 0 runs first (default 2)")
    s.add_argument("--stable-after", type=float, metavar="SECONDS", help="quiet time before the study counts as complete")
    s.add_argument("--disabled", action="store_true", help="add the rule switched off")
    s.add_argument("--continue", dest="cont", action="store_true", help="later rules are still tried after this one matches")
    s.add_argument("--description", help="a line saying what the rule is for")
    s.add_argument("--before", metavar="OTHER", help="insert before this rule (default: at the end)")
    s.add_argument("--force", action="store_true", help="write even if the rule names an unknown analyzer or destination, "
                                                        "or is unreachable")
    s.set_defaults(func=cmd_rules_add)

    force = argparse.ArgumentParser(add_help=False)
    force.add_argument("--force", action="store_true", help="write even if the change leaves a rule unreachable")
    s = gs.add_parser("remove", parents=[common, rf, force], help="remove a rule")
    s.add_argument("name")
    s.set_defaults(func=cmd_rules_remove)
    for verb in ("enable", "disable"):
        s = gs.add_parser(verb, parents=[common, rf, force], help=f"{verb} a rule (it stays in the file)")
        s.add_argument("name")
        s.set_defaults(func=cmd_rules_enable)
    s = gs.add_parser("move", parents=[common, rf, force], help="change a rule's place in the order")
    s.add_argument("name")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--before", metavar="OTHER")
    where.add_argument("--after", metavar="OTHER")
    s.set_defaults(func=cmd_rules_move)

    s = gs.add_parser("test", parents=[common, rf], help="dry run: per series, which rules match and why, what would run; "
                                                         "nothing is queued")
    s.add_argument("inputs", nargs="*", metavar="FILE_OR_DIR", help="DICOM files or folders")
    s.add_argument("--study", metavar="STUDY_UID", help="a study stored in the node instead of files")
    s.add_argument("--calling-ae", metavar="AE", help="the AE title the files would come from (CallingAETitle, destination)")
    json_opt(s)
    s.set_defaults(func=cmd_rules_test)

    s = gs.add_parser("validate", parents=[common], help="check syntax, attribute keywords, analyzers, destinations, "
                                                         "unreachable rules (exit 2 on any problem)")
    s.add_argument("file", nargs="?", help="rules file (default: the configured one)")
    json_opt(s)
    s.set_defaults(func=cmd_rules_validate)


