"""Routing rules: build a rule from command-line parts, find problems, write an edit of the rules file."""

from __future__ import annotations

from typing import Any

from pathlib import Path

from ..config import Config
from ..router import Rule, RuleSet, RulesError
from ..store import Store
from . import AdminError
from .dry_run import dry_run_files, dry_run_study, jobs_of
from .match import condition_of
from .rules_file import RulesFile


def problems_of(rules: RuleSet, cfg: Config | None) -> list[str]:
    """Unknown analyzers and destinations, unreachable rules."""
    from ..registry import analyzer_names

    dests = list(cfg.destinations) if cfg is not None else [d for r in rules for d in (r.destinations or [])]
    return rules.problems(analyzer_names(cfg), dests)


def make_rule(name: str, matches: list[str], analyzers: list[str], destinations: list[str] | None = None,
              priority: int | None = None, stable_after: float | None = None, disabled: bool = False,
              continue_: bool = False, description: str = "") -> Rule:
    """A rule from command-line parts, validated."""
    from pydantic import ValidationError

    data: dict[str, Any] = {"name": name, "when": condition_of(matches), "analyzers": analyzers}
    if destinations:
        data["destinations"] = destinations
    if priority is not None:
        data["priority"] = priority
    if stable_after is not None:
        data["stable_after"] = stable_after
    if disabled:
        data["enabled"] = False
    if continue_:
        data["continue"] = True
    if description:
        data["description"] = description
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "rule"
        raise AdminError(f"rule {name!r}: {key}: {err['msg'].removeprefix('Value error, ')}") from None


def save_edit(cfg: Config | None, rf: RulesFile, rules: list[Rule], text: str, force: bool = False) -> list[str]:
    """Write an edit of the rules file when it adds no problem (unknown names, unreachable rules) or ``force``.

    Returns the problems the edit added (written anyway under ``force``).

    Raises
    ------
    AdminError
        Naming the new problems, the file left as it was.
    """
    before = set(problems_of(rf.rules, cfg))
    new = [p for p in problems_of(RuleSet(rules, rf.path), cfg) if p not in before]
    if new and not force:
        raise AdminError("; ".join(new) + f"; {rf.path} was not changed (--force writes it anyway)", 2)
    rf.save(rules, text)
    return new


def validate(path: Path, cfg: Config | None) -> dict[str, Any]:
    """The rules file checked: ``valid``, the number of ``rules``, syntax ``errors``, semantic ``problems``."""
    try:
        rules = RuleSet.load(path)
    except RulesError as exc:
        return {"file": str(path), "valid": False, "errors": [str(exc)], "problems": []}
    problems = problems_of(rules, cfg)
    return {"file": str(path), "valid": not problems, "rules": len(rules.rules), "errors": [], "problems": problems}


def test(rules: RuleSet, cfg: Config | None, store: Store | None = None, study_uid: str | None = None,
         studies: list[Any] | None = None, calling_ae: str | None = None) -> list[dict[str, Any]]:
    """A dry run over a stored study or studies read from files; each run and job says whether its analyzer is installed.

    Nothing is queued.
    """
    from ..registry import analyzer_names

    if study_uid is not None:
        dry = [dry_run_study(rules, store, study_uid, cfg)]
    else:
        dry = dry_run_files(rules, studies or [], cfg, calling_ae)
    known = set(analyzer_names(cfg))
    for s in dry:
        for se in s["series"]:
            for run in se["would_run"]:
                run["installed"] = run["analyzer"] in known  # the node skips (and logs) an analyzer it does not have
        s["would_queue"] = [dict(j, installed=j["analyzer"] in known) for j in jobs_of(s)]
    return dry
