"""``dicomnode`` command line: run the node, try analyzers on files, look into its state, and administer it
(rules, destinations, callers, jobs, outbox, studies, models, status; the logic lives in :mod:`dicomnode.admin`).

Listing commands take ``--json``; a failure prints one line ``dicomnode: <reason>`` on stderr.

Exit status: 0 success; 1 failure (or the node is down, for status); 2 usage or configuration error;
3 not applicable (analyze; studies reprocess when no rule matches).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_APPLICABLE = 0, 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _config(args: argparse.Namespace, required: bool = True):
    from .config import ConfigError, config_path, load_config

    path = config_path(getattr(args, "config", None))
    if not required and not path.exists():
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _store(cfg):
    from .store import Store

    if not cfg.db_path.exists():
        raise CliError(f"no node data at {cfg.data_dir} yet; start the node with `dicomnode serve` first", EXIT_FAIL)
    return Store(cfg.data_dir, fsync=cfg.node.fsync)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = time.time() - ts
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    if s < 172800:
        return f"{s / 3600:.1f}h ago"
    return f"{s / 86400:.0f}d ago"


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], empty: str = "(none)") -> None:
    if not rows:
        print(empty)
        return
    cells = [[str(r.get(k, "") if r.get(k) is not None else "-") for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


def _emit(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[tuple[str, str]], empty: str = "(none)") -> None:
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, default=str))
    else:
        print_table(rows, columns, empty)


_NOT_DICOM = frozenset({".json", ".txt", ".md", ".png", ".jpg", ".npz", ".npy", ".nii", ".gz", ".nrrd", ".mat", ".csv", ".yaml"})


def collect_files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # folders hold other things too (phantoms' truth.json and masks): take only what may be DICOM
            out += sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")
                          and x.suffix.lower() not in _NOT_DICOM)
        elif p.is_file():
            out.append(p)
        else:
            raise CliError(f"{p}: no such file or folder", EXIT_USAGE)
    return out


def read_studies(files: list[Path]):
    """Readable DICOM files grouped into studies; unreadable files are listed, not fatal."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from .analysis import Instance, Study

    datasets, paths, skipped = [], [], []
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
            _ = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError):
            try:
                ds = dcmread(f, stop_before_pixels=True, force=True)
                _ = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID
            except Exception:
                skipped.append(f)
                continue
        datasets.append(ds)
        paths.append(f)
    by_study: dict[str, list[int]] = {}
    for i, ds in enumerate(datasets):
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(i)
    studies = []
    for idx in by_study.values():
        study = Study.from_datasets([datasets[i] for i in idx], [paths[i] for i in idx])
        for s in study.series:  # headers only were read: load full datasets lazily from the files
            s.instances = [Instance(i.path, i.sop_instance_uid, i.sop_class_uid, i.instance_number) for i in s.instances]
        studies.append(study)
    return studies, skipped


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .service import Node

    cfg = _config(args)
    setup_logging(cfg, process="node")
    try:
        node = Node(cfg)
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


def cmd_echo(args: argparse.Namespace) -> int:
    from .sender import echo

    cfg = _config(args)
    ok, msg = echo(cfg, args.destination)
    print(msg)
    if not ok and args.destination not in cfg.destinations:
        return EXIT_USAGE
    return EXIT_OK if ok else EXIT_FAIL


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import NotApplicable

    from .encoders import encode_result
    from .logs import setup_logging
    from .registry import analyzer_names, build, template_for
    from .worker import encoder_context

    cfg = _config(args, required=False)
    setup_logging(cfg, process="analyze", level="WARNING" if not args.verbose else "INFO", fmt="console")
    names = analyzer_names(cfg)
    if args.analyzer not in names:
        raise CliError(f"unknown analyzer {args.analyzer!r}; installed: {', '.join(names) or 'none'}", EXIT_USAGE)
    files = collect_files(args.inputs)
    studies, skipped = read_studies(files)
    for f in skipped:
        print(f"skipped {f}: not a readable DICOM file", file=sys.stderr)
    if not studies:
        raise CliError("no DICOM instances found in the given files", EXIT_USAGE)
    from .config import Config

    analyzer = build(args.analyzer, cfg)
    ctx = encoder_context(cfg or Config())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, declined, failed = 0, [], 0
    report = []
    for study in studies:
        t0 = time.monotonic()
        try:
            inputs = analyzer.select(study)
            result = analyzer.analyze(inputs)
        except NotApplicable as exc:
            declined.append(str(exc))
            report.append({"study_uid": study.study_instance_uid, "outcome": "not_applicable", "reason": str(exc)})
            continue
        except Exception as exc:
            failed += 1
            print(f"error: {study.study_instance_uid}: {type(exc).__name__}: {exc}", file=sys.stderr)
            report.append({"study_uid": study.study_instance_uid, "outcome": "error", "error": f"{type(exc).__name__}: {exc}"})
            continue
        datasets = encode_result(result, study, ctx, template_for(args.analyzer, cfg))
        files_out = []
        for ds in datasets:
            kind = _kind(ds)
            path = out / f"{kind}_{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files_out.append(str(path))
        written += len(datasets)
        report.append({"study_uid": study.study_instance_uid, "outcome": "ok", "seconds": round(time.monotonic() - t0, 3),
                       "files": files_out, "result": result.summary()})
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for r in report:
            if r["outcome"] == "ok":
                print(f"{r['study_uid']}: {len(r['files'])} objects in {r['seconds']} s"
                      + ("  (review required: " + "; ".join(r["result"]["review_reasons"]) + ")" if r["result"]["review_required"] else ""))
                for f in r["files"]:
                    print(f"  {f}")
    if written:
        return EXIT_OK if not failed else EXIT_FAIL
    if declined and not failed:
        print(f"not applicable: {declined[0]}")
        return EXIT_NOT_APPLICABLE
    return EXIT_FAIL


def _kind(ds) -> str:
    modality = str(ds.get("Modality", "OT"))
    return {"SR": "sr", "SEG": "seg", "PR": "gsps"}.get(modality, "sc" if modality == "OT" else modality.lower())


def cmd_phantom(args: argparse.Namespace) -> int:
    from .registry import analyzer_names, get_class

    cfg = _config(args, required=False)
    names = analyzer_names(cfg)
    if args.name not in names:
        raise CliError(f"unknown analyzer {args.name!r}; installed: {', '.join(names) or 'none'}", EXIT_USAGE)
    if args.n < 1:
        raise CliError("--n must be at least 1", EXIT_USAGE)
    folders = get_class(args.name, cfg).write_phantoms(Path(args.out), args.n, args.seed)
    for f in folders:
        print(f)
    return EXIT_OK


# -- administration: the node's state, read from its database whether or not it runs --------


def _admin(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn an administration refusal (AdminError) into the CLI's one-line reason and exit status."""
    def run(args: argparse.Namespace) -> int:
        from .admin import AdminError

        try:
            return fn(args)
        except AdminError as exc:
            raise CliError(str(exc), exc.code) from None
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _node_note(cfg) -> str:
    """A line saying whether a running node will act on a change now or when it starts."""
    from .admin import node_state
    from .store import Store

    if not cfg.db_path.exists():
        return "the node is not running; the change takes effect when it starts (`dicomnode serve`)"
    state = node_state(Store(cfg.data_dir, fsync=cfg.node.fsync))
    if state["up"]:
        return "the running node picks this up within a few seconds"
    return f"{state['summary']}; the change takes effect when it starts (`dicomnode serve`)"


def cmd_studies(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = _store(cfg)
    from .index import Index

    rows = Index(store).studies(getattr(args, "limit", 200))
    for r in rows:
        r["arrived"] = _ago(r["last_arrival"])
    _emit(args, rows, [("study_uid", "STUDY"), ("mods", "MOD"), ("n_series", "SERIES"), ("n_instances", "INSTANCES"),
                       ("state", "STATE"), ("calling_ae", "FROM"), ("arrived", "LAST ARRIVAL")], "(no studies)")
    return EXIT_OK


@_admin
def cmd_studies_reprocess(args: argparse.Namespace) -> int:
    from .admin import reprocess

    cfg = _config(args)
    planned = reprocess(cfg, _store(cfg), args.study_uid, args.analyzer, args.destination)
    if getattr(args, "json", False):
        print(json.dumps(planned, indent=2))
    else:
        for p in planned:
            print(f"job {p['job']} queued: {p['analyzer']} on {len(p['series'])} series -> {', '.join(p['destinations'])}"
                  + (f" (rule {', '.join(p['rules'])})" if p["rules"] else ""))
        print(_node_note(cfg))
    return EXIT_OK


@_admin
def cmd_studies_purge(args: argparse.Namespace) -> int:
    from .admin import parse_duration
    from .retention import purge

    cfg = _config(args)
    if not args.older_than and not cfg.storage.retention_days:
        raise CliError("storage.retention_days is 0 (keep studies); say how old with --older-than, e.g. 30d", EXIT_USAGE)
    seconds = parse_duration(args.older_than) if args.older_than else cfg.storage.retention_days * 86400.0
    report = purge(_store(cfg), seconds, dry_run=args.dry_run)
    if getattr(args, "json", False):
        print(json.dumps(report.as_dict(), indent=2))
        return EXIT_OK
    verb = "would purge" if args.dry_run else "purged"
    print(f"{verb} {len(report.purged)} stud{'y' if len(report.purged) == 1 else 'ies'} "
          f"({report.files} files, {report.bytes / 1e6:.1f} MB); kept {len(report.kept)} with work still open")
    for uid, why in report.kept.items():
        print(f"  kept {uid}: {why}")
    return EXIT_OK


def _states(args: argparse.Namespace, known: Sequence[str]) -> list[str] | None:
    state = getattr(args, "state", None)
    if not state:
        return None
    states = [s.strip() for s in state.split(",") if s.strip()]
    wrong = [s for s in states if s not in known]
    if wrong:
        raise CliError(f"unknown state {', '.join(map(repr, wrong))}; states are {', '.join(known)}", EXIT_USAGE)
    return states


def cmd_jobs(args: argparse.Namespace) -> int:
    from .queue import JOB_STATES, JobQueue

    cfg = _config(args)
    states = _states(args, JOB_STATES)
    rows = JobQueue(_store(cfg)).list(states, getattr(args, "limit", 200))
    for r in rows:
        r["created"] = _ago(r["created_at"])
        r["took"] = f"{r['finished_at'] - r['started_at']:.1f}s" if r["finished_at"] and r["started_at"] else "-"
        r["error_short"] = (r["error"] or "")[:80]
    _emit(args, rows, [("id", "ID"), ("state", "STATE"), ("analyzer", "ANALYZER"), ("study_uid", "STUDY"),
                       ("attempts", "TRIES"), ("n_objects", "OBJECTS"), ("took", "TOOK"), ("created", "CREATED"),
                       ("error_short", "ERROR")], "(no jobs)")
    return EXIT_OK


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from .queue import JobQueue

    cfg = _config(args)
    queue = JobQueue(_store(cfg))
    for job_id in args.ids:
        row = queue.get(job_id)
        if row is None:
            raise CliError(f"no job {job_id}; `dicomnode jobs list` shows the jobs", EXIT_FAIL)
        if not queue.retry(job_id):
            raise CliError(f"job {job_id} is {row['state']}; only failed, not_applicable or done jobs can be retried", EXIT_FAIL)
        print(f"job {job_id} queued again ({row['state']} before)")
    print(_node_note(cfg))
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    from .outbox import OUTBOX_STATES, Outbox

    cfg = _config(args)
    states = _states(args, OUTBOX_STATES)
    rows = Outbox(_store(cfg)).list(states, getattr(args, "limit", 200))
    for r in rows:
        r["next"] = _ago(r["next_attempt"]) if r["state"] == "pending" and r["next_attempt"] > time.time() else "-"
        r["sent"] = _ago(r["sent_at"])
    _emit(args, rows, [("id", "ID"), ("state", "STATE"), ("destination", "DEST"), ("description", "SERIES"),
                       ("sop_uid", "SOP INSTANCE"), ("attempts", "TRIES"), ("sent", "SENT"), ("last_error", "ERROR")],
          "(outbox empty)")
    return EXIT_OK


def cmd_outbox_resend(args: argparse.Namespace) -> int:
    from .outbox import Outbox

    if bool(args.ids) == bool(args.failed):
        raise CliError("give outbox row IDs or --failed (not both)", EXIT_USAGE)
    cfg = _config(args)
    outbox = Outbox(_store(cfg))
    if args.ids:
        missing = outbox.missing(args.ids)
        if missing:
            raise CliError(f"no outbox row {', '.join(map(str, missing))}; `dicomnode outbox list` shows the rows", EXIT_FAIL)
    n = outbox.resend(args.ids or None, failed=args.failed)
    print(f"{n} object{'s' if n != 1 else ''} to send again")
    print(_node_note(cfg))
    return EXIT_OK


@_admin
def cmd_status(args: argparse.Namespace) -> int:
    from .admin import node_state
    from .router import RuleSet, RulesError
    from .store import Store

    cfg = _config(args)
    if not cfg.db_path.exists():
        state = {"up": False, "summary": f"the node has never run with data folder {cfg.data_dir}", "jobs": {}, "outbox": {},
                 "last_error": None, "associations": 0}
    else:
        state = node_state(Store(cfg.data_dir, fsync=cfg.node.fsync))
    try:
        state["rules"] = f"{len(RuleSet.load(cfg.rules_path).rules)} rules in {cfg.rules_path}"
    except RulesError as exc:
        state["rules"] = f"INVALID: {exc}"
    if getattr(args, "json", False):
        print(json.dumps(state, indent=2, default=str))
    else:
        print(("up:    " if state["up"] else "DOWN:  ") + state["summary"])
        if state["up"]:
            print(f"associations: {state['associations']} open, {state.get('stored') or 0} instances stored since start")
        depths = lambda d: ", ".join(f"{v} {k}" for k, v in sorted(d.items())) or "empty"  # noqa: E731
        print(f"jobs:   {depths(state['jobs'])}")
        print(f"outbox: {depths(state['outbox'])}")
        print(f"rules:  {state['rules']}")
        err = state.get("last_error")
        print("last error: " + (f"{err.get('error')} (job {err.get('job')}, {_ago(err.get('at'))})" if err else "none"))
    return EXIT_OK if state["up"] else EXIT_FAIL


# -- rules -------------------------------------------------------------------


def _rules_file(args: argparse.Namespace, cfg, missing_ok: bool = True):
    from .admin import RulesFile

    return RulesFile.open(Path(args.rules) if getattr(args, "rules", None) else cfg.rules_path, missing_ok=missing_ok)


def _write_rules(args: argparse.Namespace, cfg, rf, rules, text: str, what: str) -> int:
    """Validate the edited rules (syntax and references), write them atomically, report."""
    from .admin import problems_of
    from .router import RuleSet

    before = set(problems_of(rf.rules, cfg))
    new_problems = [p for p in problems_of(RuleSet(rules, rf.path), cfg) if p not in before]
    if new_problems and not getattr(args, "force", False):
        raise CliError("; ".join(new_problems) + f"; {rf.path} was not changed (--force writes it anyway)", EXIT_USAGE)
    rf.save(rules, text)
    for p in new_problems:
        print(f"warning: {p}", file=sys.stderr)
    if not rf.kept_layout:
        print(f"note: {rf.path} was rewritten in the standard layout; its comments could not be kept", file=sys.stderr)
    print(f"{what} ({len(rules)} rules in {rf.path})")
    print(_node_note(cfg))
    return EXIT_OK


@_admin
def cmd_rules_list(args: argparse.Namespace) -> int:
    from .admin import describe

    cfg = _config(args)
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


@_admin
def cmd_rules_show(args: argparse.Namespace) -> int:
    from .admin import describe

    cfg = _config(args)
    rf = _rules_file(args, cfg)
    rule = rf.get(args.name)
    if getattr(args, "json", False):
        print(json.dumps({"position": rf.index(args.name) + 1, **rule.to_yaml_dict(), "enabled": rule.enabled,
                          "priority": rule.priority, "condition": describe(rule.when)}, indent=2))
    else:
        print(f"# rule {rf.index(args.name) + 1} of {len(rf.rules.rules)} in {rf.path}; matches when {describe(rule.when)}")
        print(rf.block_text(args.name), end="")
    return EXIT_OK


@_admin
def cmd_rules_add(args: argparse.Namespace) -> int:
    from .admin import make_rule

    cfg = _config(args)
    rf = _rules_file(args, cfg)
    rule = make_rule(args.name, args.match, _split(args.analyzer), _split(args.destination) or None, args.priority,
                     args.stable_after, args.disabled, args.cont, args.description or "")
    rules, text = rf.add(rule, args.before)
    return _write_rules(args, cfg, rf, rules, text, f"rule {rule.name!r} added at position {rules.index(rule) + 1}"
                        + (" (disabled)" if args.disabled else ""))


@_admin
def cmd_rules_remove(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rf = _rules_file(args, cfg, missing_ok=False)
    rules, text = rf.remove(args.name)
    return _write_rules(args, cfg, rf, rules, text, f"rule {args.name!r} removed")


@_admin
def cmd_rules_enable(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rf = _rules_file(args, cfg, missing_ok=False)
    enabled = args.verb == "enable"
    if rf.get(args.name).enabled == enabled:
        print(f"rule {args.name!r} is already {'enabled' if enabled else 'disabled'}; nothing changed")
        return EXIT_OK
    rules, text = rf.set_enabled(args.name, enabled)
    return _write_rules(args, cfg, rf, rules, text, f"rule {args.name!r} {'enabled' if enabled else 'disabled'}")


@_admin
def cmd_rules_move(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rf = _rules_file(args, cfg, missing_ok=False)
    rules, text = rf.move(args.name, before=args.before, after=args.after)
    pos = next(i for i, r in enumerate(rules) if r.name == args.name) + 1
    return _write_rules(args, cfg, rf, rules, text, f"rule {args.name!r} moved to position {pos}")


@_admin
def cmd_rules_validate(args: argparse.Namespace) -> int:
    from .admin import problems_of
    from .router import RuleSet, RulesError

    cfg = _config(args, required=args.file is None)
    path = Path(args.file) if args.file else cfg.rules_path
    try:
        rules = RuleSet.load(path)
    except RulesError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"file": str(path), "valid": False, "errors": [str(exc)], "problems": []}, indent=2))
        raise CliError(str(exc), EXIT_USAGE) from None
    problems = problems_of(rules, cfg)
    if getattr(args, "json", False):
        print(json.dumps({"file": str(path), "valid": not problems, "rules": len(rules.rules), "errors": [],
                          "problems": problems}, indent=2))
    else:
        for p in problems:
            print(f"{path}: {p}")
        if cfg is None:
            print("note: no configuration found, so destinations were not checked", file=sys.stderr)
        print(f"{path}: {len(rules.rules)} rules, " + (f"{len(problems)} problems" if problems else "valid"))
    return EXIT_USAGE if problems else EXIT_OK


@_admin
def cmd_rules_test(args: argparse.Namespace) -> int:
    from .admin import dry_run_files, dry_run_study, jobs_of

    if bool(args.inputs) == bool(args.study):
        raise CliError("give FILE_OR_DIR... or --study STUDY_UID (one of them)", EXIT_USAGE)
    cfg = _config(args, required=bool(args.study))
    rules = (_rules_file(args, cfg, missing_ok=False) if cfg or getattr(args, "rules", None) else None)
    if rules is None:
        raise CliError("no configuration found; pass --config PATH or --rules FILE", EXIT_USAGE)
    if args.study:
        studies = [dry_run_study(rules.rules, _store(cfg), args.study, cfg)]
    else:
        found, skipped = read_studies(collect_files(args.inputs))
        for f in skipped:
            print(f"skipped {f}: not a readable DICOM file", file=sys.stderr)
        if not found:
            raise CliError("no DICOM instances found in the given files", EXIT_USAGE)
        studies = dry_run_files(rules.rules, found, cfg, args.calling_ae)
    from .registry import analyzer_names

    known = set(analyzer_names(cfg))
    for s in studies:
        for se in s["series"]:
            for run in se["would_run"]:
                run["installed"] = run["analyzer"] in known  # the node skips (and logs) an analyzer it does not have
        s["would_queue"] = [dict(j, installed=j["analyzer"] in known) for j in jobs_of(s)]
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


def _split(values: list[str] | None) -> list[str]:
    return [x.strip() for v in values or [] for x in v.split(",") if x.strip()]


# -- destinations and callers ---------------------------------------------------------


def _config_file(args: argparse.Namespace):
    from .admin import ConfigFile
    from .config import config_path

    path = config_path(getattr(args, "config", None))
    _config(args)  # the file must be valid before it is edited
    return ConfigFile.open(path)


def _saved(args, cf, raw, text, what: str) -> int:
    cfg = cf.save(raw, text)
    if not cf.kept_layout:
        print(f"note: {cf.path} was rewritten; its comments could not be kept", file=sys.stderr)
    print(f"{what} in {cf.path}")
    print(_node_note(cfg))
    return EXIT_OK


def cmd_destinations_list(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rows = [{"name": n, **d.model_dump()} for n, d in sorted(cfg.destinations.items())]
    _emit(args, rows, [("name", "NAME"), ("ae_title", "AE TITLE"), ("host", "HOST"), ("port", "PORT"), ("tls", "TLS")],
          "(no destinations)")
    return EXIT_OK


@_admin
def cmd_destinations_add(args: argparse.Namespace) -> int:
    cf = _config_file(args)
    raw, text = cf.add_destination(args.name, args.ae_title, args.host, args.port, args.tls)
    return _saved(args, cf, raw, text, f"destination {args.name!r} ({args.ae_title}@{args.host}:{args.port}) added")


@_admin
def cmd_destinations_remove(args: argparse.Namespace) -> int:
    from .admin import destination_users

    cfg = _config(args)
    users = destination_users(cfg, args.name) if args.name in cfg.destinations else []
    if users:
        raise CliError(f"destination {args.name!r} is used by {', '.join(users)}; change or remove them first", EXIT_USAGE)
    cf = _config_file(args)
    raw, text = cf.remove_destination(args.name)
    return _saved(args, cf, raw, text, f"destination {args.name!r} removed")


def cmd_callers_list(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rows = [c.model_dump() for c in cfg.callers]
    _emit(args, rows, [("ae_title", "AE TITLE"), ("host", "HOST"), ("destination", "DESTINATION"), ("stable_after", "STABLE AFTER")],
          "(no callers: the node accepts no association)")
    return EXIT_OK


@_admin
def cmd_callers_add(args: argparse.Namespace) -> int:
    cf = _config_file(args)
    raw, text = cf.add_caller(args.ae_title, args.host, args.destination, args.stable_after)
    return _saved(args, cf, raw, text, f"caller {args.ae_title!r}" + (f" from {args.host}" if args.host else " from any host") + " allowed")


@_admin
def cmd_callers_remove(args: argparse.Namespace) -> int:
    cf = _config_file(args)
    raw, text, n = cf.remove_callers(args.ae_title, args.host)
    return _saved(args, cf, raw, text, f"{n} caller entr{'y' if n == 1 else 'ies'} for {args.ae_title!r} removed")


# -- models --------------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    from .admin import model_rows

    cfg = _config(args, required=False)
    rows = model_rows(cfg)
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


def cmd_models_verify(args: argparse.Namespace) -> int:
    from .admin import verify_models
    from .registry import analyzer_names

    cfg = _config(args, required=False)
    names = _split(args.analyzer) or None
    for n in names or []:
        if n not in analyzer_names(cfg):
            raise CliError(f"unknown analyzer {n!r}; installed and enabled: {', '.join(analyzer_names(cfg)) or 'none'}", EXIT_USAGE)
    rows = verify_models(cfg, names)
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


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------

MATCH_HELP = """\
--match forms (several are ANDed): Key=Value, Key!=Value, 'Key in A,B', 'Key ~ REGEX' (Python regex,
search), Key<N, Key<=N, Key>N, Key>=N, Key? (present), !Key? (absent). Keys are DICOM keywords
(Modality, BodyPartExamined, SeriesDescription, ImageType, ViewPosition, ...) or CallingAETitle.
Conditions with 'any' or 'not' around several parts: edit rules.yaml (see `rules show`);
`dicomnode rules validate` checks the file, and the node reloads it.

example: dicomnode rules add chest-lat --match Modality=CR --match 'BodyPartExamined in CHEST,THORAX' \\
           --match 'SeriesDescription ~ (?i)lat' --analyzer chest_xray_thoracic --destination pacs
"""


def _opts(p: argparse.ArgumentParser, listing: bool = False, state: str | None = None, top: bool = False) -> None:
    """Common options; below the top level they default to 'unset' so that `jobs --json list` keeps --json."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--config", metavar="PATH", help="configuration file (default: $DICOMNODE_CONFIG, then config/node.yaml)",
                   **({"default": None} if top else d))
    if listing:
        p.add_argument("--json", action="store_true", help="machine-readable output", **d)
        p.add_argument("--limit", type=int, help="at most this many rows (default 200)", **({"default": 200} if top else d))
        if state:
            p.add_argument("--state", help=f"only these states, comma-separated ({state})", **({"default": None} if top else d))


def _json_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _opts(common)
    fmt = argparse.RawDescriptionHelpFormatter

    p = argparse.ArgumentParser(prog="dicomnode", description="A DICOM node that runs AI analyzers on studies a PACS sends it.",
                                epilog="exit status: 0 ok, 1 failure, 2 usage or configuration error, 3 not applicable")
    _opts(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the node in the foreground")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("echo", parents=[common], help="C-ECHO a configured destination")
    s.add_argument("destination", help="a name under destinations: in the configuration")
    s.set_defaults(func=cmd_echo)

    s = sub.add_parser("analyze", parents=[common], help="run one analyzer on files, no network; write result objects")
    s.add_argument("--analyzer", required=True, help="analyzer name (see `dicomnode models list`)")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for the result DICOM files")
    s.add_argument("--json", action="store_true", help="print a JSON report")
    s.add_argument("-v", "--verbose", action="store_true", help="show the analyzer's log events")
    s.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    s.set_defaults(func=cmd_analyze)

    s = sub.add_parser("phantom", parents=[common], help="write phantom studies with ground truth for an analyzer")
    s.add_argument("name", help="analyzer name")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--n", type=int, default=1, help="number of studies (default 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=cmd_phantom)

    s = sub.add_parser("status", parents=[common], help="is the node up; associations, queue depths, last error (exit 1 when down)")
    _json_opt(s)
    s.set_defaults(func=cmd_status)

    _rules_parser(sub, common, fmt)
    _queue_parsers(sub)
    _config_parsers(sub, common)

    g = sub.add_parser("models", parents=[common], help="analyzer models: versions, checksums, device; verify them")
    gs = g.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = gs.add_parser("list", parents=[common], help="analyzer, model version, sha256, device, phantom-trained or not")
    _json_opt(s)
    s.set_defaults(func=cmd_models_list)
    s = gs.add_parser("verify", parents=[common], help="check sha256 of the weights, load each ONNX file, run one warm-up inference "
                      "(exit 1 when any analyzer fails)")
    s.add_argument("--analyzer", action="append", help="only these analyzers (repeat or comma-separate)")
    _json_opt(s)
    s.set_defaults(func=cmd_models_verify)
    return p


def _rules_parser(sub, common, fmt) -> None:
    g = sub.add_parser("rules", parents=[common], help="routing rules: list, show, add, remove, enable, disable, move, test, validate",
                       description="Routing rules live in one file (rules_file in the configuration). Every change is validated "
                                   "before the file is replaced atomically; a running node reloads it.")
    rf = argparse.ArgumentParser(add_help=False)
    rf.add_argument("--rules", metavar="FILE", help="rules file to use instead of the configured one")
    gs = g.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = gs.add_parser("list", parents=[common, rf], help="the rules in order (first match wins unless continue)")
    _json_opt(s)
    s.set_defaults(func=cmd_rules_list)
    s = gs.add_parser("show", parents=[common, rf], help="one rule as it stands in the file")
    s.add_argument("name")
    _json_opt(s)
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
    _json_opt(s)
    s.set_defaults(func=cmd_rules_test)

    s = gs.add_parser("validate", parents=[common], help="check syntax, attribute keywords, analyzers, destinations, "
                                                         "unreachable rules (exit 2 on any problem)")
    s.add_argument("file", nargs="?", help="rules file (default: the configured one)")
    _json_opt(s)
    s.set_defaults(func=cmd_rules_validate)


def _queue_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    _opts(common)
    for name, helptext, states, lister in (
        ("studies", "studies the node has stored; reprocess or purge them", None, cmd_studies),
        ("jobs", "analysis jobs: queued, running, done, failed; retry them", "queued,running,done,not_applicable,failed", cmd_jobs),
        ("outbox", "result objects waiting for or sent to destinations; resend them", "pending,sent,failed", cmd_outbox),
    ):
        g = sub.add_parser(name, help=helptext, description=f"{helptext}. Without a verb: list.")
        _opts(g, listing=True, state=states)
        g.set_defaults(func=lister)
        gs = g.add_subparsers(dest="verb", metavar="VERB")
        s = gs.add_parser("list", help=f"list {name} (the default)")
        _opts(s, listing=True, state=states)
        s.set_defaults(func=lister)
        if name == "studies":
            s = gs.add_parser("reprocess", parents=[common], help="queue new jobs for a stored study, by the rules or one analyzer")
            s.add_argument("study_uid")
            s.add_argument("--analyzer", help="run this analyzer on all series instead of what the rules say")
            s.add_argument("--destination", action="append", help="send results here instead (repeat for several)")
            _json_opt(s)
            s.set_defaults(func=cmd_studies_reprocess)
            s = gs.add_parser("purge", parents=[common], help="delete stored studies whose last instance arrived before a time; "
                              "studies with open jobs or undelivered results are kept")
            s.add_argument("--older-than", metavar="AGE", help="30d, 12h, 90m (default: storage.retention_days)")
            s.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
            _json_opt(s)
            s.set_defaults(func=cmd_studies_purge)
        elif name == "jobs":
            s = gs.add_parser("retry", parents=[common], help="queue failed, not-applicable or done jobs again")
            s.add_argument("ids", nargs="+", type=int, metavar="ID")
            s.set_defaults(func=cmd_jobs_retry)
        else:
            s = gs.add_parser("resend", parents=[common], help="send outbox rows again, by ID or every failed one")
            s.add_argument("ids", nargs="*", type=int, metavar="ID")
            s.add_argument("--failed", action="store_true", help="every row parked as failed")
            s.set_defaults(func=cmd_outbox_resend)


def _config_parsers(sub, common) -> None:
    g = sub.add_parser("destinations", parents=[common], help="where results are sent: list, add, remove, echo",
                       description="Destinations live under destinations: in the configuration; edits keep the rest of the "
                                   "file as it is, and a running node reloads it.")
    gs = g.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = gs.add_parser("list", parents=[common], help="configured destinations")
    _json_opt(s)
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

    g = sub.add_parser("callers", parents=[common], help="who may send to the node: list, add, remove",
                       description="Callers live under callers: in the configuration; associations from others are rejected.")
    gs = g.add_subparsers(dest="verb", metavar="VERB", required=True)
    s = gs.add_parser("list", parents=[common], help="allowed calling AEs")
    _json_opt(s)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    if func not in (cmd_serve, cmd_analyze):
        from .logs import setup_logging

        # stdout is the command's answer (tables, JSON); events go to stderr, warnings and worse only
        setup_logging(None, process="cli", level=os.environ.get("DICOMNODE_LOG_LEVEL", "WARNING"), fmt="console")
    try:
        return func(args)
    except CliError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
