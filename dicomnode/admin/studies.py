"""Stored studies: list them, queue them again, purge old ones (through :mod:`dicomnode.retention`)."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..index import Index
from ..queue import JobQueue
from ..retention import PurgeReport
from ..retention import purge as purge_older
from ..store import Store
from ..router import RuleSet
from . import AdminError
from .dry_run import caller_destinations, dry_run_study, jobs_of
from .durations import parse_duration


def listing(store: Store, limit: int) -> list[dict[str, Any]]:
    """The stored studies, latest arrival first, with their series count and modalities."""
    return Index(store).studies(limit)


def reprocess(cfg: Config, store: Any, study_uid: str, analyzer: str | None = None,
              destinations: list[str] | None = None, rules: RuleSet | None = None) -> list[dict[str, Any]]:
    """Queue new jobs for a stored study: by the rules, or one named analyzer over all its series.

    Results go to ``destinations``, else the rule's, else the calling AE's destination.

    Raises
    ------
    AdminError
        Unknown study or analyzer (2), no rule matching (3), no destination (2).
    """
    from ..registry import analyzer_names

    study = Index(store).study(study_uid)
    if study is None:
        raise AdminError(f"no study {study_uid} in the node's index; `dicomnode studies list` shows the stored studies", 1)
    for d in destinations or []:
        if d not in cfg.destinations:
            raise AdminError(f"unknown destination {d!r}; configured: {', '.join(sorted(cfg.destinations)) or 'none'}", 2)
    default_dest = destinations or caller_destinations(cfg, study["calling_ae"], study["calling_host"])
    queue = JobQueue(store, cfg.analyzers.max_attempts, cfg.analyzers.retry_delay)
    known = analyzer_names(cfg)
    if rules is None and not analyzer:
        rules = RuleSet.load(cfg.rules_path)
    if analyzer:
        if analyzer not in known:
            raise AdminError(f"unknown analyzer {analyzer!r}; installed and enabled: {', '.join(known) or 'none'}", 2)
        planned = [{"analyzer": analyzer, "rules": [], "destinations": default_dest,
                    "series": [s["series_uid"] for s in Index(store).series_of(study_uid)], "priority": 2}]
    else:
        dry = dry_run_study(rules, store, study_uid, cfg)
        planned = jobs_of(dry)
        if not planned:
            raise AdminError(f"no rule matches study {study_uid}; name an analyzer with --analyzer, or see why with "
                             f"`dicomnode rules test --study {study_uid}`", 3)
        by_name = {r.name: r for r in rules}
        for p in planned:
            p["priority"] = min(by_name[r].priority for r in p["rules"])
            if destinations:
                p["destinations"] = destinations
    for p in planned:
        if p["analyzer"] not in known:
            raise AdminError(f"rule {', '.join(p['rules'])} names analyzer {p['analyzer']!r}, which is not installed or "
                             "is disabled; nothing was queued", 2)
        if not p["destinations"]:
            raise AdminError(f"no destination for study {study_uid}: its calling AE {study['calling_ae']!r} has none under "
                             "callers:; pass --destination NAME", 2)
    for p in planned:
        p["job"] = queue.enqueue(study_uid, p["analyzer"], ",".join(p["rules"]) or "reprocess", p["destinations"],
                                 p["series"], p["priority"])
    return planned


def purge_age(cfg: Config, older_than: str | None) -> float:
    """Seconds in ``older_than`` (``30d``), by default ``storage.retention_days``.

    Raises
    ------
    AdminError
        When neither says how old (retention 0 keeps studies), or the duration is not understood.
    """
    if not older_than and not cfg.storage.retention_days:
        raise AdminError("storage.retention_days is 0 (keep studies); say how old with --older-than, e.g. 30d", 2)
    return parse_duration(older_than) if older_than else cfg.storage.retention_days * 86400.0


def purge(store: Store, older_than: float, dry_run: bool = False) -> PurgeReport:
    """:func:`dicomnode.retention.purge`: studies with open jobs or undelivered results are kept."""
    return purge_older(store, older_than, dry_run=dry_run)
