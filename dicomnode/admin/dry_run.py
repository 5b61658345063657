"""Dry runs of the rules over files or stored studies: per series, every rule's verdict and what would run.

Nothing is queued; :func:`jobs_of` says what a study would queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..index import Index
from ..router import RuleSet, series_view, view_of_dataset
from . import AdminError
from .match import describe


@dataclass
class SeriesVerdict:
    series_uid: str
    modality: str
    description: str
    decisions: list[dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"series_uid": self.series_uid, "modality": self.modality, "description": self.description,
                "decisions": self.decisions, "would_run": self.runs}


def _verdict(rules: RuleSet, view: Any, modality: str, description: str, default_dest: list[str]) -> SeriesVerdict:
    decisions, runs = [], []
    for d in rules.decide(view):
        outcome = "skipped" if d.skipped else ("match" if d.matched else "no match")
        reason = d.reason
        if d.skipped == "disabled":
            reason = "the rule is disabled"
        elif d.skipped:
            reason = d.skipped + (" (its own condition holds too)" if d.matched else "")
        decisions.append({"rule": d.rule.name, "outcome": outcome, "reason": reason,
                          "condition": describe(d.rule.when)})
        if d.matched and not d.skipped:
            dests = d.rule.destinations if d.rule.destinations is not None else default_dest
            runs += [{"analyzer": a, "rule": d.rule.name, "destinations": list(dests)} for a in d.rule.analyzers]
    return SeriesVerdict(view.series_uid, modality or "", description or "", decisions, runs)


def caller_destinations(cfg: Config | None, calling_ae: str | None, host: str | None) -> list[str]:
    if cfg is None or not calling_ae:
        return []
    caller = cfg.caller(calling_ae, host)
    if caller is None and host is None:  # files on disk: the sender's address is not known, its AE title is
        caller = next((c for c in cfg.callers if c.ae_title == calling_ae.strip()), None)
    return [caller.destination] if caller and caller.destination else []


def dry_run_files(rules: RuleSet, studies: list[Any], cfg: Config | None, calling_ae: str | None = None) -> list[dict[str, Any]]:
    """Per study and series of files on disk: every rule's verdict and what would run. Nothing is queued."""
    from pydicom import dcmread

    out = []
    dests = caller_destinations(cfg, calling_ae, None)
    for study in studies:
        series = []
        for s in study.series:
            ds = dcmread(s.instances[0].path, stop_before_pixels=True, force=True)
            series.append(_verdict(rules, view_of_dataset(ds, calling_ae), s.modality, s.description, dests).as_dict())
        out.append({"study_uid": study.study_instance_uid, "calling_ae": calling_ae, "series": series})
    return out


def dry_run_study(rules: RuleSet, store: Any, study_uid: str, cfg: Config | None) -> dict[str, Any]:
    """The same dry run for a study in the node's index (read from the database, nothing queued)."""
    index = Index(store)
    study = index.study(study_uid)
    if study is None:
        raise AdminError(f"no study {study_uid} in the node's index; `dicomnode studies list` shows the stored studies", 1)
    dests = caller_destinations(cfg, study["calling_ae"], study["calling_host"])
    series = []
    for s in index.series_of(study_uid):
        view = series_view(s, study["calling_ae"], index.first_instance_path(s["series_uid"]))
        series.append(_verdict(rules, view, s["modality"], s["description"], dests).as_dict())
    return {"study_uid": study_uid, "calling_ae": study["calling_ae"], "series": series}


def jobs_of(dry: dict[str, Any]) -> list[dict[str, Any]]:
    """The jobs a dry-run study would queue: one per analyzer, over the series its rules matched."""
    jobs: dict[str, dict[str, Any]] = {}
    for s in dry["series"]:
        for run in s["would_run"]:
            j = jobs.setdefault(run["analyzer"], {"analyzer": run["analyzer"], "rules": [], "destinations": [], "series": []})
            for k, v in (("rules", run["rule"]), ("series", s["series_uid"])):
                if v not in j[k]:
                    j[k].append(v)
            j["destinations"] = sorted(set(j["destinations"]) | set(run["destinations"]))
    return list(jobs.values())
