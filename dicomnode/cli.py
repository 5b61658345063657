"""``dicomnode`` command line: run the node, try analyzers on files, and look into its state.

Exit status: 0 success; 1 failure; 2 usage or configuration error; 3 not applicable (analyze).
"""

from __future__ import annotations

import argparse
import json
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

    path = config_path(args.config)
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


def collect_files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".") and x.suffix.lower() not in (".json", ".txt", ".md", ".png"))
        elif p.is_file():
            out.append(p)
        else:
            raise CliError(f"{p}: no such file or folder", EXIT_USAGE)
    return out


def read_studies(files: list[Path]):
    """Readable DICOM files grouped into studies; unreadable files are listed, not fatal."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from analyzers.base import Instance, Study

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
    from analyzers.base import NotApplicable

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


def cmd_studies(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = _store(cfg)
    rows = store.studies(args.limit)
    for r in rows:
        r["arrived"] = _ago(r["last_arrival"])
    _emit(args, rows, [("study_uid", "STUDY"), ("mods", "MOD"), ("n_series", "SERIES"), ("n_instances", "INSTANCES"),
                       ("state", "STATE"), ("calling_ae", "FROM"), ("arrived", "LAST ARRIVAL")], "(no studies)")
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from .queue import JobQueue

    cfg = _config(args)
    rows = JobQueue(_store(cfg)).list(args.state.split(",") if args.state else None, args.limit)
    for r in rows:
        r["created"] = _ago(r["created_at"])
        r["took"] = f"{r['finished_at'] - r['started_at']:.1f}s" if r["finished_at"] and r["started_at"] else "-"
        r["error_short"] = (r["error"] or "")[:80]
    _emit(args, rows, [("id", "ID"), ("state", "STATE"), ("analyzer", "ANALYZER"), ("study_uid", "STUDY"),
                       ("attempts", "TRIES"), ("n_objects", "OBJECTS"), ("took", "TOOK"), ("created", "CREATED"),
                       ("error_short", "ERROR")], "(no jobs)")
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    from .outbox import Outbox

    cfg = _config(args)
    rows = Outbox(_store(cfg)).list(args.state.split(",") if args.state else None, args.limit)
    for r in rows:
        r["next"] = _ago(r["next_attempt"]) if r["state"] == "pending" and r["next_attempt"] > time.time() else "-"
        r["sent"] = _ago(r["sent_at"])
    _emit(args, rows, [("id", "ID"), ("state", "STATE"), ("destination", "DEST"), ("description", "SERIES"),
                       ("sop_uid", "SOP INSTANCE"), ("attempts", "TRIES"), ("sent", "SENT"), ("last_error", "ERROR")],
          "(outbox empty)")
    return EXIT_OK


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="configuration file (default: $DICOMNODE_CONFIG, then config/node.yaml)")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--limit", type=int, default=200, help="at most this many rows (default 200)")

    p = argparse.ArgumentParser(prog="dicomnode", description="A DICOM node that runs AI analyzers on studies a PACS sends it.",
                                parents=[common])
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

    s = sub.add_parser("studies", parents=[common, listing], help="studies the node has stored")
    s.set_defaults(func=cmd_studies)
    s = sub.add_parser("jobs", parents=[common, listing], help="analysis jobs: queued, running, done, failed")
    s.add_argument("--state", help="only these states, comma-separated (queued,running,done,not_applicable,failed)")
    s.set_defaults(func=cmd_jobs)
    s = sub.add_parser("outbox", parents=[common, listing], help="result objects waiting for or sent to destinations")
    s.add_argument("--state", help="only these states, comma-separated (pending,sent,failed)")
    s.set_defaults(func=cmd_outbox)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
