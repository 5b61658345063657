"""``dicomnode analyze`` and ``dicomnode phantom``: an analyzer on files, no network; phantom studies to try it on."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import EXIT_FAIL, EXIT_NOT_APPLICABLE, EXIT_OK, EXIT_USAGE, CliError, collect_files, config_of, read_studies


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..analysis import AnalysisContext, NotApplicable, run_analysis
    from ..config import Config
    from ..logs import setup_logging
    from ..registry import analyzer_names, build, template_for
    from ..worker import encoder_context

    cfg = config_of(args, required=False)
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
    analyzer = build(args.analyzer, cfg)
    context = AnalysisContext(encoder_context(cfg or Config()), template_for(args.analyzer, cfg))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, declined, failed = 0, [], 0
    report = []
    for study in studies:
        t0 = time.monotonic()
        try:
            analysis = run_analysis(analyzer, study, context)
        except NotApplicable as exc:
            declined.append(str(exc))
            report.append({"study_uid": study.study_instance_uid, "outcome": "not_applicable", "reason": str(exc)})
            continue
        except Exception as exc:
            failed += 1
            print(f"error: {study.study_instance_uid}: {type(exc).__name__}: {exc}", file=sys.stderr)
            report.append({"study_uid": study.study_instance_uid, "outcome": "error", "error": f"{type(exc).__name__}: {exc}"})
            continue
        files_out = []
        for ds in analysis.datasets:
            kind = _kind(ds)
            path = out / f"{kind}_{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files_out.append(str(path))
        written += len(analysis.datasets)
        if args.format:
            table = out / f"{study.study_instance_uid}_findings.{args.format}"
            files_out.append(str(write_findings_table(analysis.result, type(analyzer).outputs.findings, table)))
        report.append({"study_uid": study.study_instance_uid, "outcome": "ok", "seconds": round(time.monotonic() - t0, 3),
                       "files": files_out, "result": analysis.result.summary()})
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


def findings_table(result, keys) -> list[dict]:
    """One row per result group with findings (a disc level, a vertebra...), one column per finding key in ``keys`` order."""
    rows: dict[str, dict] = {}
    for f in result.findings:
        if f.group is None:
            continue
        row = rows.setdefault(f.group, {"group": f.group, **{k: None for k in keys}})
        row[f.key] = f.value
    return list(rows.values())


def write_findings_table(result, keys, path: Path) -> Path:
    """The findings table as CSV (booleans as 1/0, not evaluated as empty) or JSON, by the file's suffix."""
    rows = findings_table(result, list(keys))
    if path.suffix == ".json":
        path.write_text(json.dumps({"analyzer": result.analyzer, "review_required": result.review_required,
                                    "review_reasons": result.review_reasons, "rows": rows}, indent=2) + "\n")
        return path
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["group", *keys])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else int(v) if isinstance(v, bool) else v for k, v in row.items()})
    return path


def _kind(ds) -> str:
    modality = str(ds.get("Modality", "OT"))
    return {"SR": "sr", "SEG": "seg", "PR": "gsps"}.get(modality, "sc" if modality == "OT" else modality.lower())


def cmd_phantom(args: argparse.Namespace) -> int:
    from ..registry import analyzer_names, get_class

    cfg = config_of(args, required=False)
    names = analyzer_names(cfg)
    if args.name not in names:
        raise CliError(f"unknown analyzer {args.name!r}; installed: {', '.join(names) or 'none'}", EXIT_USAGE)
    if args.n < 1:
        raise CliError("--n must be at least 1", EXIT_USAGE)
    folders = get_class(args.name, cfg).write_phantoms(Path(args.out), args.n, args.seed)
    for f in folders:
        print(f)
    return EXIT_OK


def register(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("analyze", parents=[common], help="run one analyzer on files, no network; write result objects")
    s.add_argument("--analyzer", required=True, help="analyzer name (see `dicomnode models list`)")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for the result DICOM files")
    s.add_argument("--json", action="store_true", help="print a JSON report")
    s.add_argument("--format", choices=["csv", "json"], help="also write each study's findings as a table (one row per disc, vertebra..., "
                   "one column per finding) to OUT/<study uid>_findings.csv or .json")
    s.add_argument("-v", "--verbose", action="store_true", help="show the analyzer's log events")
    s.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    s.set_defaults(func=cmd_analyze, own_logging=True)

    s = sub.add_parser("phantom", parents=[common], help="write phantom studies with ground truth for an analyzer")
    s.add_argument("name", help="analyzer name")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--n", type=int, default=1, help="number of studies (default 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=cmd_phantom)
