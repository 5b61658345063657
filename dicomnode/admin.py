"""Administration: what ``dicomnode rules|destinations|callers|studies|models|status`` do, without argparse.

- ``--match`` expressions become conditions of the rule language (parsed, never evaluated as code).
- ``rules.yaml`` and ``config/node.yaml`` are edited as text, one rule or entry at a time, so the
  comments and layout of a reviewed, versioned file survive; every edit is read back and must
  give exactly the intended rules or configuration, is validated, and replaces the file
  atomically. A running node reloads both files when they change.
- Dry runs of the rules over files or stored studies, with the condition that decided.
- Node status, re-processing and purging of stored studies, and model checks.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydicom.datadict import keyword_dict

from .config import Config, _format_errors
from .router import PSEUDO_KEYWORDS, Rule, RuleSet, RulesError, check_condition, series_view, view_of_dataset


class AdminError(Exception):
    """A request that cannot be carried out; the message says why and what to do.

    ``code`` is the CLI exit status: 1 failure, 2 usage or configuration, 3 not applicable.
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------
# durations
# ---------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (a bare number is days).

    Raises
    ------
    AdminError
        For anything else.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text).lower())
    if not m:
        raise AdminError(f"duration {text!r} is not understood; write a number and a unit, e.g. 30d, 12h, 90m")
    return float(m.group(1)) * _UNITS[m.group(2) or "d"]


# ---------------------------------------------------------------------------
# --match mini-language
# ---------------------------------------------------------------------------

_EXISTS = re.compile(r"\s*(!?)\s*([A-Za-z][A-Za-z0-9]*)\s*\?\s*")
_BINARY = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)\s*(!=|<=|>=|=|<|>|~|\s+in\s+)(.*)", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _value(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if _NUMBER.fullmatch(text):
        return float(text) if "." in text else int(text)
    return text


def _keyword(kw: str, expr: str) -> None:
    if kw in keyword_dict or kw in PSEUDO_KEYWORDS:
        return
    close = difflib.get_close_matches(kw, [*keyword_dict, *PSEUDO_KEYWORDS], n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]}?" if close else "; use a DICOM keyword such as Modality or BodyPartExamined"
    raise AdminError(f"--match {expr!r}: unknown attribute {kw!r}{hint}")


def parse_match(expr: str) -> dict[str, Any]:
    """One ``--match`` expression as a rule condition.

    ``Key=Value``, ``Key!=Value``, ``Key in A,B``, ``Key ~ REGEX``, ``Key < N`` (``<=``, ``>``,
    ``>=``), ``Key?`` (present), ``!Key?`` (absent). Keys are DICOM keywords or CallingAETitle.

    Raises
    ------
    AdminError
        Naming the expression and what is wrong with it.
    """
    m = _EXISTS.fullmatch(expr)
    if m:
        _keyword(m.group(2), expr)
        return {m.group(2): {"exists": not m.group(1)}}
    m = _BINARY.fullmatch(expr)
    if not m:
        raise AdminError(f"--match {expr!r}: write Key=Value, Key!=Value, 'Key in A,B', 'Key ~ REGEX', "
                         "Key<N (<=, >, >=), Key? or !Key?")
    key, op, rest = m.group(1), m.group(2).strip(), m.group(3).strip()
    _keyword(key, expr)
    if not rest:
        raise AdminError(f"--match {expr!r}: give a value after {op!r}")
    if op == "in":
        values = [_value(v) for v in rest.split(",") if v.strip()]
        if not values:
            raise AdminError(f"--match {expr!r}: list the values after 'in', separated by commas")
        cond: dict[str, Any] = {key: {"in": values}}
    elif op == "~":
        try:
            re.compile(rest)
        except re.error as exc:
            raise AdminError(f"--match {expr!r}: invalid regular expression: {exc}") from None
        cond = {key: {"regex": rest}}
    elif op in ("<", "<=", ">", ">="):
        n = _value(rest)
        if not isinstance(n, (int, float)):
            raise AdminError(f"--match {expr!r}: {op} needs a number, got {rest!r}")
        cond = {key: {{"<": "lt", "<=": "le", ">": "gt", ">=": "ge"}[op]: n}}
    elif op == "=":
        cond = {key: {"equals": _value(rest)}}
    else:
        cond = {"not": {key: {"equals": _value(rest)}}}
    try:
        check_condition(cond, "when")
    except ValueError as exc:
        raise AdminError(f"--match {expr!r}: {exc}") from None
    return cond


def condition_of(matches: Iterable[str]) -> dict[str, Any]:
    """Several ``--match`` expressions, ANDed."""
    conds = [parse_match(m) for m in matches]
    if not conds:
        raise AdminError("give at least one --match")
    return conds[0] if len(conds) == 1 else {"all": conds}


def describe(cond: dict[str, Any]) -> str:
    """A condition in one line, for listings: ``Modality in [CR, DX] and not BodyPartExamined present``."""
    (key, body), = cond.items()
    if key in ("all", "any"):
        parts = [describe(c) for c in body]
        joined = f" {'and' if key == 'all' else 'or'} ".join(f"({p})" if " and " in p or " or " in p else p for p in parts)
        return joined
    if key == "not":
        inner = describe(body)
        return f"not ({inner})" if " " in inner else f"not {inner}"
    op, operand = next(iter(body.items())) if isinstance(body, dict) else ("equals", body)
    if op == "exists":
        return f"{key} {'present' if operand else 'absent'}"
    if op == "in":
        return f"{key} in [{', '.join(map(str, operand))}]"
    if op == "regex":
        return f"{key} ~ /{operand}/"
    sym = {"equals": "=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}[op]
    return f"{key}{sym}{operand}"


# ---------------------------------------------------------------------------
# YAML text that reads like the hand-written files
# ---------------------------------------------------------------------------


class _FlowDict(dict):
    pass


class _FlowList(list):
    pass


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False):  # noqa: ARG002
        return super().increase_indent(flow, False)  # list items indented under their key, as people write them


_Dumper.add_representer(_FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", dict(v), flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", list(v), flow_style=True))


def _styled_condition(cond: Any) -> Any:
    (key, body), = cond.items()
    if key in ("all", "any"):
        return {key: [_styled_condition(c) for c in body]}
    if key == "not":
        return {key: _styled_condition(body)}
    if isinstance(body, dict):
        body = _FlowDict({k: _FlowList(v) if isinstance(v, list) else v for k, v in body.items()})
    return _FlowDict({key: body})


def rule_yaml(rule: Rule) -> str:
    """A rule as a block of ``rules.yaml`` (leaf conditions and name lists in flow style)."""
    data: dict[str, Any] = {}
    for k, v in rule.to_yaml_dict().items():
        if k == "when":
            v = _styled_condition(v)
        elif k == "required_series":
            v = [_styled_condition(c) for c in v]
        elif isinstance(v, list):
            v = _FlowList(v)
        data[k] = v
    return yaml.dump([data], Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def _atomic_write(path: Path, text: str, expected_old: str | None) -> None:
    """Replace ``path`` with ``text``; refuse when someone else changed it since we read it."""
    path = Path(path)
    current = path.read_text() if path.exists() else None
    if current != expected_old:
        raise AdminError(f"{path} changed while this command was editing it; run the command again", 1)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power loss
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_nl(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def _join(head: str, block: str) -> str:
    """``head`` then ``block``; a blank line keeps a block's own leading comment apart from a header comment."""
    head = _ensure_nl(head)
    if block.startswith("#") and head.splitlines()[-1:] and head.splitlines()[-1].startswith("#"):
        head += "\n"
    return head + block


# ---------------------------------------------------------------------------
# rules.yaml
# ---------------------------------------------------------------------------


@dataclass
class RulesFile:
    """The rules file as text and as rules; edits keep every other line of the file as it was."""

    path: Path
    text: str | None
    rules: RuleSet
    kept_layout: bool = True

    @classmethod
    def open(cls, path: Path, missing_ok: bool = True) -> "RulesFile":
        path = Path(path)
        if not path.exists():
            if not missing_ok:
                raise AdminError(f"rules file {path} does not exist; create it with `dicomnode rules add`", 2)
            return cls(path, None, RuleSet([], path))
        try:
            rules = RuleSet.load(path)
        except RulesError as exc:
            raise AdminError(f"{exc}; fix the file first (`dicomnode rules validate` checks it); nothing was changed", 2) from None
        return cls(path, path.read_text(), rules)

    # -- blocks of text, one per rule -----------------------------------------

    def _blocks(self) -> tuple[list[str], list[tuple[int, int]]] | None:
        """Lines of the file and the [start, end) line span of each rule, or None when the layout is unusual."""
        if self.text is None:
            return None
        lines = self.text.splitlines(keepends=True)
        items = [i for i, ln in enumerate(lines) if re.match(r"-(\s|$)", ln)]
        if len(items) != len(self.rules.rules):
            return None
        starts = []
        for n, i in enumerate(items):
            s = i
            while s > 0 and lines[s - 1].startswith("#"):
                s -= 1  # a comment right above a rule belongs to that rule...
            starts.append(i if n == 0 and s == 0 else s)  # ...unless it opens the file: the file's header
        spans = [(s, starts[n + 1] if n + 1 < len(starts) else len(lines)) for n, s in enumerate(starts)]
        for (s, e), rule in zip(spans, self.rules.rules):
            try:
                parsed = yaml.safe_load("".join(lines[s:e]))
            except yaml.YAMLError:
                return None
            if not (isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict) and parsed[0].get("name") == rule.name):
                return None
        return lines, spans

    def block_text(self, name: str) -> str:
        rule = self.get(name)
        b = self._blocks()
        if b is None:
            return rule_yaml(rule)
        lines, spans = b
        s, e = spans[self.index(name)]
        return "".join(lines[s:e]).rstrip("\n") + "\n"

    def header(self) -> str:
        if self.text is None:
            return ("# Routing rules, in order; the first matching rule wins unless it says `continue: true`.\n"
                    "# Edit with `dicomnode rules ...` or by hand; the node reloads this file when it changes.\n")
        out = []
        for ln in self.text.splitlines(keepends=True):
            if ln.startswith("#") or not ln.strip():
                out.append(ln)
            else:
                break
        return "".join(out)

    # -- lookups ----------------------------------------------------------------

    def index(self, name: str) -> int:
        for i, r in enumerate(self.rules.rules):
            if r.name == name:
                return i
        known = ", ".join(r.name for r in self.rules.rules) or "none"
        raise AdminError(f"no rule named {name!r} in {self.path}; rules: {known}", 2)

    def get(self, name: str) -> Rule:
        return self.rules.rules[self.index(name)]

    # -- edits: each returns the new text; save() checks and writes it ---------------

    def _rebuilt(self, rules: list[Rule]) -> str:
        self.kept_layout = False
        return self.header() + "".join(rule_yaml(r) for r in rules)

    def add(self, rule: Rule, before: str | None = None) -> tuple[list[Rule], str]:
        if any(r.name == rule.name for r in self.rules.rules):
            raise AdminError(f"a rule named {rule.name!r} already exists; remove it first or choose another name", 2)
        pos = self.index(before) if before else len(self.rules.rules)
        rules = [*self.rules.rules[:pos], rule, *self.rules.rules[pos:]]
        b = self._blocks()
        if b is None:
            return rules, self._rebuilt(rules)
        lines, spans = b
        at = spans[pos][0] if pos < len(spans) else len(lines)
        return rules, _join("".join(lines[:at]), rule_yaml(rule)) + "".join(lines[at:])

    def remove(self, name: str) -> tuple[list[Rule], str]:
        i = self.index(name)
        rules = [r for r in self.rules.rules if r.name != name]
        b = self._blocks()
        if b is None:
            return rules, self._rebuilt(rules)
        lines, spans = b
        s, e = spans[i]
        return rules, "".join(lines[:s] + lines[e:])

    def move(self, name: str, before: str | None = None, after: str | None = None) -> tuple[list[Rule], str]:
        target = before or after
        if target == name:
            raise AdminError("a rule cannot be moved relative to itself", 2)
        i = self.index(name)
        self.index(target)  # names the missing rule if there is none
        rules = [r for r in self.rules.rules if r.name != name]
        j = next(k for k, r in enumerate(rules) if r.name == target) + (1 if after else 0)
        rules.insert(j, self.rules.rules[i])
        b = self._blocks()
        if b is None:
            return rules, self._rebuilt(rules)
        lines, spans = b
        chunks = ["".join(lines[s:e]) for s, e in spans]
        head = "".join(lines[: spans[0][0]])
        moved = _ensure_nl(chunks.pop(i))
        chunks = [_ensure_nl(c) for c in chunks]
        chunks.insert(j, moved)
        return rules, _join(head, chunks[0]) + "".join(chunks[1:])

    def set_enabled(self, name: str, enabled: bool) -> tuple[list[Rule], str]:
        i = self.index(name)
        rules = list(self.rules.rules)
        rules[i] = Rule.model_validate({**rules[i].model_dump(by_alias=True), "enabled": enabled})
        b = self._blocks()
        if b is None:
            return rules, self._rebuilt(rules)
        lines, spans = b
        s, e = spans[i]
        item = next(k for k in range(s, e) if lines[k].startswith("-"))
        m = re.match(r"-(\s+)name\s*:", lines[item])
        if not m:
            return rules, self._rebuilt(rules)
        indent = " " * (1 + len(m.group(1)))
        flag = re.compile(rf"{indent}enabled\s*:\s*\S+\s*(#.*)?\n?$")
        block = lines[s:e]
        at = next((k for k, ln in enumerate(block) if flag.match(ln)), None)
        if at is not None:
            if enabled:
                del block[at]
            else:
                block[at] = f"{indent}enabled: false\n"
        elif not enabled:
            block.insert(item - s + 1, f"{indent}enabled: false\n")
        return rules, "".join(lines[:s] + block + lines[e:])

    def save(self, rules: list[Rule], text: str) -> None:
        """Check that ``text`` reads back as exactly ``rules``, then replace the file atomically."""
        wanted = RuleSet(rules, self.path)
        try:
            got = RuleSet.parse(yaml.safe_load(text), self.path)
        except (RulesError, yaml.YAMLError):
            got = None
        if got is None or got.dump() != wanted.dump():
            text = self._rebuilt(rules)
            try:
                got = RuleSet.parse(yaml.safe_load(text), self.path)
            except RulesError as exc:
                raise AdminError(f"{exc}; {self.path} was not changed", 2) from None
            if got.dump() != wanted.dump():
                raise AdminError(f"internal error: {self.path} would not read back as the intended rules; nothing written", 1)
        _atomic_write(self.path, text, self.text)
        self.text, self.rules = text, wanted


def problems_of(rules: RuleSet, cfg: Config | None) -> list[str]:
    """Unknown analyzers and destinations, unreachable rules."""
    from .registry import analyzer_names

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


# ---------------------------------------------------------------------------
# dry runs
# ---------------------------------------------------------------------------


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


def _caller_destinations(cfg: Config | None, calling_ae: str | None, host: str | None) -> list[str]:
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
    dests = _caller_destinations(cfg, calling_ae, None)
    for study in studies:
        series = []
        for s in study.series:
            ds = dcmread(s.instances[0].path, stop_before_pixels=True, force=True)
            series.append(_verdict(rules, view_of_dataset(ds, calling_ae), s.modality, s.description, dests).as_dict())
        out.append({"study_uid": study.study_instance_uid, "calling_ae": calling_ae, "series": series})
    return out


def dry_run_study(rules: RuleSet, store: Any, study_uid: str, cfg: Config | None) -> dict[str, Any]:
    """The same dry run for a study in the node's index (read from the database, nothing queued)."""
    from .index import Index

    index = Index(store)
    study = index.study(study_uid)
    if study is None:
        raise AdminError(f"no study {study_uid} in the node's index; `dicomnode studies list` shows the stored studies", 1)
    dests = _caller_destinations(cfg, study["calling_ae"], study["calling_host"])
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


# ---------------------------------------------------------------------------
# config/node.yaml: callers and destinations
# ---------------------------------------------------------------------------


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000).strip()


@dataclass
class ConfigFile:
    """``config/node.yaml`` as text; callers and destinations are edited in place, the rest untouched."""

    path: Path
    text: str
    raw: dict[str, Any]
    kept_layout: bool = True

    @classmethod
    def open(cls, path: Path) -> "ConfigFile":
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise AdminError(f"{path}: the top level must be a mapping of sections", 2)
        return cls(Path(path), text, raw)

    def _section(self, lines: list[str], key: str) -> tuple[int, int, str] | None:
        """(line of ``key:``, end of its body, what follows the colon) for a top-level section."""
        pat = re.compile(rf"{re.escape(key)}\s*:(.*)$")
        for i, ln in enumerate(lines):
            m = pat.match(ln.rstrip("\n"))
            if not m:
                continue
            end = i + 1
            for k in range(i + 1, len(lines)):
                ln2 = lines[k]
                if not ln2.strip() or ln2.startswith("#"):
                    continue
                if ln2[0] in " \t-":
                    end = k + 1
                else:
                    break
            return i, end, m.group(1).split(" #")[0].strip()
        return None

    def _items(self, lines: list[str], start: int, end: int, pattern: str) -> list[tuple[int, int, str]]:
        """Entries of a block section that open with a line matching ``pattern``: (start, end, opening line)."""
        firsts = [k for k in range(start + 1, end) if re.match(pattern, lines[k])]
        starts = []
        for n, k in enumerate(firsts):
            s = k
            while s - 1 > start and lines[s - 1].lstrip().startswith("#"):
                s -= 1  # a comment right above an entry goes with it, unless it heads the section
            starts.append(k if n == 0 and s == start + 1 else s)
        return [(starts[n], starts[n + 1] if n + 1 < len(starts) else end, lines[k]) for n, k in enumerate(firsts)]

    def _edit(self, key: str, new_value: Any, edit) -> str:
        """Text with section ``key`` changed by ``edit(lines, start, end)``, or the section rewritten when unusual."""
        lines = self.text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        sec = self._section(lines, key)
        if sec is None:
            return "".join(lines) + yaml.dump({key: new_value}, Dumper=_Dumper, sort_keys=False, default_flow_style=None)
        start, end, inline = sec
        if inline == "" and (edited := edit(lines, start, end)) is not None:
            return edited
        block = f"{key}:\n" + "".join(f"  - {_flow(v)}\n" for v in new_value) if isinstance(new_value, list) else \
            f"{key}:\n" + "".join(f"  {k}: {_flow(v)}\n" for k, v in new_value.items())
        if not new_value:
            block = f"{key}: {'[]' if isinstance(new_value, list) else '{}'}\n"
        return "".join(lines[:start]) + block + "".join(lines[end:])

    # -- callers ---------------------------------------------------------------

    def add_caller(self, ae_title: str, host: str | None, destination: str | None, stable_after: float | None) -> tuple[dict, str]:
        callers = list(self.raw.get("callers") or [])
        for c in callers:
            if isinstance(c, dict) and str(c.get("ae_title", "")).strip() == ae_title.strip() and c.get("host") == host:
                raise AdminError(f"caller {ae_title!r}{' from ' + host if host else ''} is already allowed; "
                                 "remove it first to change it", 2)
        entry = {"ae_title": ae_title}
        for k, v in (("host", host), ("destination", destination), ("stable_after", stable_after)):
            if v is not None:
                entry[k] = v
        raw = copy.deepcopy(self.raw)
        raw["callers"] = [*callers, entry]

        def edit(lines, start, end):
            items = self._items(lines, start, end, r"\s*-\s")
            indent = re.match(r"(\s*)-", items[0][2]).group(1) if items else "  "
            return "".join(lines[:end]) + f"{indent}- {_flow(entry)}\n" + "".join(lines[end:])

        return raw, self._edit("callers", raw["callers"], edit)

    def remove_callers(self, ae_title: str, host: str | None) -> tuple[dict, str, int]:
        callers = list(self.raw.get("callers") or [])
        gone = [i for i, c in enumerate(callers) if isinstance(c, dict) and str(c.get("ae_title", "")).strip() == ae_title.strip()
                and (host is None or c.get("host") == host)]
        if not gone:
            known = ", ".join(f"{c.get('ae_title')}" + (f"@{c['host']}" if c.get("host") else "") for c in callers) or "none"
            raise AdminError(f"no caller {ae_title!r}{' from ' + host if host else ''} is configured; callers: {known}", 2)
        raw = copy.deepcopy(self.raw)
        raw["callers"] = [c for i, c in enumerate(callers) if i not in gone]

        def edit(lines, start, end):
            items = self._items(lines, start, end, r"\s*-\s")
            if len(items) != len(callers) or not raw["callers"]:
                return None  # an unusual layout, or an empty list: the section is rewritten
            drop = {k for i, (s, e, _) in enumerate(items) if i in gone for k in range(s, e)}
            return "".join(ln for k, ln in enumerate(lines) if k not in drop)

        return raw, self._edit("callers", raw["callers"], edit), len(gone)

    # -- destinations ----------------------------------------------------------------

    def add_destination(self, name: str, ae_title: str, host: str, port: int, tls: bool = False) -> tuple[dict, str]:
        dests = dict(self.raw.get("destinations") or {})
        if name in dests:
            raise AdminError(f"destination {name!r} already exists; remove it first to change it", 2)
        entry: dict[str, Any] = {"ae_title": ae_title, "host": host, "port": port}
        if tls:
            entry["tls"] = True
        raw = copy.deepcopy(self.raw)
        raw["destinations"] = {**dests, name: entry}

        def edit(lines, start, end):
            items = self._items(lines, start, end, r"\s+[^\s#-][^:]*:")
            indent = re.match(r"(\s*)", items[0][2]).group(1) if items else "  "
            return "".join(lines[:end]) + f"{indent}{_flow({name: entry})[1:-1]}\n" + "".join(lines[end:])

        return raw, self._edit("destinations", raw["destinations"], edit)

    def remove_destination(self, name: str) -> tuple[dict, str]:
        dests = dict(self.raw.get("destinations") or {})
        if name not in dests:
            raise AdminError(f"no destination {name!r}; configured: {', '.join(sorted(dests)) or 'none'}", 2)
        raw = copy.deepcopy(self.raw)
        raw["destinations"] = {k: v for k, v in dests.items() if k != name}

        def edit(lines, start, end):
            first = self._items(lines, start, end, r"\s+[^\s#-][^:]*:")
            if not first:
                return None
            indent = re.match(r"(\s*)", first[0][2]).group(1)
            items = self._items(lines, start, end, rf"{indent}[^\s#-][^:]*:")
            keys = [re.match(r"\s*(['\"]?)(.*?)\1\s*:(\s|$)", t).group(2) for _, _, t in items]
            if sorted(keys) != sorted(str(k) for k in dests) or not raw["destinations"]:
                return None
            s, e, _ = items[keys.index(name)]
            return "".join(lines[:s] + lines[e:])

        return raw, self._edit("destinations", raw["destinations"], edit)

    def save(self, raw: dict[str, Any], text: str) -> Config:
        """Validate ``raw`` as a configuration, check ``text`` reads back as it, write atomically."""
        from pydantic import ValidationError

        try:
            cfg = Config.model_validate(raw)
        except ValidationError as exc:
            raise AdminError(_format_errors(exc, str(self.path)).replace("\n", "; ") + "; the configuration was not changed", 2) from None
        try:
            ok = yaml.safe_load(text) == raw
        except yaml.YAMLError:
            ok = False
        if not ok:
            self.kept_layout = False
            text = yaml.safe_dump(raw, sort_keys=False)
        _atomic_write(self.path, text, self.text)
        self.text, self.raw = text, raw
        cfg.path = self.path.resolve()
        return cfg


def destination_users(cfg: Config, name: str) -> list[str]:
    """Who sends results to destination ``name``: callers and rules, as readable words."""
    users = [f"caller {c.ae_title}" for c in cfg.callers if c.destination == name]
    try:
        rules = RuleSet.load(cfg.rules_path)
    except RulesError:
        rules = RuleSet([])
    users += [f"rule {r.name!r}" for r in rules if name in (r.destinations or [])]
    return users


# ---------------------------------------------------------------------------
# node status
# ---------------------------------------------------------------------------

HEARTBEAT_STALE = 15.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process holds the pid: alive, but not ours to signal
    return True


def node_state(store: Any) -> dict[str, Any]:
    """Whether the node is up, read from the node_status rows it keeps, plus queue depths."""
    from .outbox import Outbox
    from .queue import JobQueue

    from .heartbeat import Heartbeat

    status = Heartbeat(store).get()
    node = (status.get("node") or {}).get("value") or {}
    receiver = status.get("receiver") or {}
    pid = node.get("pid")
    beat = receiver.get("updated_at")
    now = time.time()
    if not node:
        up, why = False, "the node has never run with this data folder"
    elif node.get("state") != "running":
        up, why = False, f"the node is stopped (cleanly, {_age(node.get('stopped_at'), now)})"
    elif not pid or not pid_alive(int(pid)):
        up, why = False, f"the node is down: its process {pid} is gone (killed or crashed; it did not stop cleanly)"
    elif beat is not None and now - beat > HEARTBEAT_STALE and beat >= float(node.get("started_at") or 0):
        up, why = False, f"the node's process {pid} is alive but has not reported for {now - beat:.0f} s (hung?)"
    else:
        up, why = True, f"the node is running (pid {pid}, port {node.get('port')}, up {_age(node.get('started_at'), now, suffix='')})"
    last_error = status.get("last_error")
    return {
        "up": up,
        "summary": why,
        "pid": pid,
        "ae_title": node.get("ae_title"),
        "port": node.get("port"),
        "started_at": node.get("started_at"),
        "associations": (receiver.get("value") or {}).get("associations") if up else 0,
        "stored": (receiver.get("value") or {}).get("stored"),
        "heartbeat_at": beat,
        "jobs": JobQueue(store).depths(),
        "outbox": Outbox(store).depths(),
        "last_error": dict(last_error["value"], at=last_error["updated_at"]) if last_error else None,
    }


def _age(ts: float | None, now: float, suffix: str = " ago") -> str:
    if not ts:
        return "at an unknown time"
    s = now - float(ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s / size:.0f}{unit}{suffix}"
    return f"{s:.0f}s{suffix}"


# ---------------------------------------------------------------------------
# studies: reprocess and purge
# ---------------------------------------------------------------------------


def reprocess(cfg: Config, store: Any, study_uid: str, analyzer: str | None = None,
              destinations: list[str] | None = None, rules: RuleSet | None = None) -> list[dict[str, Any]]:
    """Queue new jobs for a stored study: by the rules, or one named analyzer over all its series.

    Results go to ``destinations``, else the rule's, else the calling AE's destination.

    Raises
    ------
    AdminError
        Unknown study or analyzer (2), no rule matching (3), no destination (2).
    """
    from .index import Index
    from .queue import JobQueue
    from .registry import analyzer_names

    study = Index(store).study(study_uid)
    if study is None:
        raise AdminError(f"no study {study_uid} in the node's index; `dicomnode studies list` shows the stored studies", 1)
    for d in destinations or []:
        if d not in cfg.destinations:
            raise AdminError(f"unknown destination {d!r}; configured: {', '.join(sorted(cfg.destinations)) or 'none'}", 2)
    default_dest = destinations or _caller_destinations(cfg, study["calling_ae"], study["calling_host"])
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


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


def _device(cfg: Config | None) -> str:
    from .runtime import providers_for

    try:
        first = providers_for(cfg.analyzers.device if cfg else "auto")[0]
    except Exception as exc:  # a CUDA request without a CUDA build: say so in the row
        return f"error: {exc}"
    return "cuda" if first.startswith("CUDA") else "cpu"


def model_rows(cfg: Config | None) -> list[dict[str, Any]]:
    """One row per model of every enabled analyzer; an analyzer that cannot be loaded is an error row."""
    from .registry import analyzer_names, build

    device = _device(cfg)
    rows = []
    for name in analyzer_names(cfg):
        try:
            analyzer = build(name, cfg)
            infos = analyzer.models()
        except Exception as exc:
            rows.append({"analyzer": name, "analyzer_version": None, "model": None, "version": None, "sha256": None,
                         "device": device, "phantom_trained": None, "path": None, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if not infos:
            rows.append({"analyzer": name, "analyzer_version": analyzer.version, "model": None, "version": None,
                         "sha256": None, "device": device, "phantom_trained": None, "path": None, "error": None})
        for m in infos:
            rows.append({"analyzer": name, "analyzer_version": analyzer.version, "model": m.name, "version": m.version,
                         "sha256": m.sha256, "device": device, "phantom_trained": m.phantom_trained, "path": m.path or None,
                         "error": None})
    return rows


def verify_models(cfg: Config | None, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Per analyzer: checksums of its weight files, each ONNX file loads, one warm-up inference."""
    from .analysis import sha256_file

    from .registry import analyzer_names, build

    device = _device(cfg)
    out = []
    for name in names or analyzer_names(cfg):
        row: dict[str, Any] = {"analyzer": name, "device": device, "models": [], "warmup_seconds": None, "ok": False, "error": None}
        out.append(row)
        try:
            analyzer = build(name, cfg)
            infos = analyzer.models()
        except Exception as exc:
            row["error"] = f"cannot load the analyzer: {type(exc).__name__}: {exc}"
            continue
        problems = []
        for m in infos:
            check: dict[str, Any] = {"model": m.name, "version": m.version, "sha256": "not checked", "onnx": "not checked"}
            row["models"].append(check)
            path = Path(m.path) if m.path else None
            if path is None:
                check["sha256"] = "no weights file"
                continue
            if not path.is_file():
                check["sha256"] = "missing"
                problems.append(f"{m.name}: weights file {path} does not exist")
                continue
            actual = sha256_file(path)
            check["sha256"] = "ok" if actual == m.sha256 else "MISMATCH"
            if actual != m.sha256:
                problems.append(f"{m.name}: sha256 of {path} is {actual[:12]}…, the registry says {m.sha256[:12]}…")
                continue
            if path.suffix == ".onnx":
                try:
                    import onnxruntime as ort

                    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    check["onnx"] = "loads"
                except Exception as exc:
                    check["onnx"] = "FAILED"
                    problems.append(f"{m.name}: ONNX Runtime cannot load {path}: {exc}")
        if not problems:
            t0 = time.monotonic()
            try:
                analyzer.warmup()
                row["warmup_seconds"] = round(time.monotonic() - t0, 3)
            except Exception as exc:
                problems.append(f"warm-up inference failed: {type(exc).__name__}: {exc}")
        row["error"] = "; ".join(problems) or None
        row["ok"] = not problems
    return out
