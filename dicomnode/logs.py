"""Structured logging: JSON events on stderr, carrying UIDs and counts, never patient identity."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

import structlog

# Keys that would carry patient identity; dropped from every event as a last line of defence.
PHI_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id", "birth_date",
    "PatientAddress", "OtherPatientIDs", "OtherPatientNames", "PatientTelephoneNumbers", "AccessionNumber",
})


def _drop_phi(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in PHI_KEYS.intersection(event):
        event[key] = "[removed]"
    return event


_level = logging.INFO


def debug_enabled() -> bool:
    """Whether debug events are written: lets a hot path skip building an event that would be dropped."""
    return _level <= logging.DEBUG


def setup_logging(cfg: Any = None, process: str = "node", level: str | None = None, fmt: str | None = None) -> None:
    conf = getattr(cfg, "logging", None) or {}
    level = (level or os.environ.get("DICOMNODE_LOG_LEVEL") or conf.get("level") or "INFO").upper()
    fmt = fmt or os.environ.get("DICOMNODE_LOG_FORMAT") or conf.get("format") or "json"
    global _level
    _level = getattr(logging, level, logging.INFO)
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_phi,
            lambda _l, _m, e: {**e, "process": process},
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs through the standard library; keep it quiet unless debugging.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # pydicom's and highdicom's warnings quote the offending values, which may be patient data: never logged, DEBUG included.
    logging.captureWarnings(True)
    for name in ("pydicom", "highdicom", "py.warnings"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# The project's own code (core, analyzers, templates) writes messages with UIDs, keys and counts, never header values.
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def safe_error(exc: BaseException) -> str:
    """An exception as text fit for a log line or the jobs table.

    Messages raised inside libraries that read data sets (pydicom, highdicom, numpy) may quote
    header values, so those keep only their type and where they were raised.
    """
    name = type(exc).__name__
    tb = traceback.extract_tb(exc.__traceback__)
    origin = os.path.abspath(tb[-1].filename) if tb else ""
    if origin.startswith(_PROJECT + os.sep) and "site-packages" not in origin:
        return f"{name}: {exc}"
    where = f" in {os.path.basename(origin)}:{tb[-1].lineno} {tb[-1].name}" if tb else ""
    return f"{name}{where} (message withheld: it may quote data set values)"


def safe_trace(exc: BaseException, limit: int = 5) -> str:
    """The traceback's last frames (file, line, function), without the message or any value."""
    frames = traceback.extract_tb(exc.__traceback__)[-limit:]
    return " > ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames)
