"""What every ``dicomnode`` command shares: exit statuses, the configuration and store, tables and JSON,
common options, and reading DICOM files from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..admin.status import node_note

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_APPLICABLE = 0, 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def config_of(args: argparse.Namespace, required: bool = True):
    from ..config import ConfigError, config_path, load_config

    path = config_path(getattr(args, "config", None))
    if not required and not path.exists():
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def open_store(cfg):
    from ..store import Store

    if not cfg.has_data():
        raise CliError(f"no node data at {cfg.data_dir} yet; start the node with `dicomnode serve` first", EXIT_FAIL)
    return Store.from_config(cfg)


def ago(ts: float | None) -> str:
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


def emit(args: argparse.Namespace, rows: list[dict[str, Any]], columns: list[tuple[str, str]], empty: str = "(none)") -> None:
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, default=str))
    else:
        print_table(rows, columns, empty)


def opts(p: argparse.ArgumentParser, listing: bool = False, state: str | None = None, top: bool = False) -> None:
    """Common options; below the top level they default to 'unset' so that `jobs --json list` keeps --json."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--config", metavar="PATH", help="configuration file (default: $DICOMNODE_CONFIG, then config/node.yaml)",
                   **({"default": None} if top else d))
    if listing:
        p.add_argument("--json", action="store_true", help="machine-readable output", **d)
        p.add_argument("--limit", type=int, help="at most this many rows (default 200)", **({"default": 200} if top else d))
        if state:
            p.add_argument("--state", help=f"only these states, comma-separated ({state})", **({"default": None} if top else d))


def json_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def listing_group(sub, name: str, helptext: str, states: str | None, lister: Callable[[argparse.Namespace], int]):
    """The parser of a noun that lists rows without a verb (``dicomnode jobs``), with its ``list`` verb; returns its verbs."""
    g = sub.add_parser(name, help=helptext, description=f"{helptext}. Without a verb: list.")
    opts(g, listing=True, state=states)
    g.set_defaults(func=lister)
    gs = g.add_subparsers(dest="verb", metavar="VERB")
    s = gs.add_parser("list", help=f"list {name} (the default)")
    opts(s, listing=True, state=states)
    s.set_defaults(func=lister)
    return gs


def admin_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn an administration refusal (AdminError) into the CLI's one-line reason and exit status."""
    def run(args: argparse.Namespace) -> int:
        from ..admin import AdminError

        try:
            return fn(args)
        except AdminError as exc:
            raise CliError(str(exc), exc.code) from None
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def states_of(args: argparse.Namespace, known: Sequence[str]) -> list[str] | None:
    state = getattr(args, "state", None)
    if not state:
        return None
    states = [s.strip() for s in state.split(",") if s.strip()]
    wrong = [s for s in states if s not in known]
    if wrong:
        raise CliError(f"unknown state {', '.join(map(repr, wrong))}; states are {', '.join(known)}", EXIT_USAGE)
    return states


def split(values: list[str] | None) -> list[str]:
    return [x.strip() for v in values or [] for x in v.split(",") if x.strip()]


def config_path_checked(args: argparse.Namespace) -> Path:
    """The configuration file to edit; it must be valid before it is edited."""
    from ..config import config_path

    config_of(args)
    return config_path(getattr(args, "config", None))


def saved(cf, cfg, what: str) -> int:
    """Report an edit of the configuration file (``cf`` from the admin layer, ``cfg`` as saved)."""
    if not cf.kept_layout:
        print(f"note: {cf.path} was rewritten; its comments could not be kept", file=sys.stderr)
    print(f"{what} in {cf.path}")
    print(node_note(cfg))
    return EXIT_OK


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

    from ..analysis import Instance, Study

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
