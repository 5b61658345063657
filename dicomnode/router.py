"""Router: ordered rules from ``rules.yaml`` that map series attributes to analyzers and destinations.

A condition is a mapping ``{Keyword: {operator: operand}}`` (``{Keyword: value}`` is shorthand for
``equals``), or ``{all: [...]}``, ``{any: [...]}``, ``{not: condition}``. Operators: ``equals``,
``in``, ``regex``, ``exists``, ``lt``, ``le``, ``gt``, ``ge``. Keywords are DICOM keywords evaluated
per series (instance-level ones from the series' first instance), plus ``CallingAETitle``. For a
multi-valued attribute (ImageType) ``equals``/``in``/``regex`` hold when any value does. Nothing
the user writes is evaluated as code.

The first matching rule wins unless it says ``continue: true``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import keyword_dict

OPERATORS = ("equals", "in", "regex", "exists", "lt", "le", "gt", "ge")
PSEUDO_KEYWORDS = ("CallingAETitle",)


class RulesError(Exception):
    """A rules file that cannot be used; the message names the rule and key."""


def _check_keyword(kw: str) -> None:
    if kw not in keyword_dict and kw not in PSEUDO_KEYWORDS:
        import difflib

        close = difflib.get_close_matches(kw, [*keyword_dict, *PSEUDO_KEYWORDS], n=1)
        hint = f"did you mean {close[0]}?" if close else "use a DICOM keyword such as Modality or BodyPartExamined"
        raise ValueError(f"unknown attribute {kw!r}: {hint}")


def check_condition(cond: Any, where: str) -> None:
    """Validate a condition tree; raises ValueError naming the path of the bad part."""
    if not isinstance(cond, dict) or len(cond) != 1:
        raise ValueError(f"{where}: a condition is a mapping with exactly one key (an attribute, all, any or not), got {cond!r}")
    (key, body), = cond.items()
    if key in ("all", "any"):
        if not isinstance(body, list) or not body:
            raise ValueError(f"{where}.{key}: must be a non-empty list of conditions")
        for i, c in enumerate(body):
            check_condition(c, f"{where}.{key}[{i}]")
        return
    if key == "not":
        check_condition(body, f"{where}.not")
        return
    try:
        _check_keyword(key)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not isinstance(body, dict):
        return  # shorthand for equals
    if len(body) != 1:
        raise ValueError(f"{where}.{key}: give exactly one operator of {', '.join(OPERATORS)}")
    (op, operand), = body.items()
    if op not in OPERATORS:
        raise ValueError(f"{where}.{key}: unknown operator {op!r}; use one of {', '.join(OPERATORS)}")
    if op == "in" and not isinstance(operand, list):
        raise ValueError(f"{where}.{key}.in: must be a list of values")
    if op == "regex":
        try:
            re.compile(str(operand))
        except re.error as exc:
            raise ValueError(f"{where}.{key}.regex: invalid regular expression: {exc}") from None
    if op in ("lt", "le", "gt", "ge") and not isinstance(operand, (int, float)):
        raise ValueError(f"{where}.{key}.{op}: must be a number")
    if op == "exists" and not isinstance(operand, bool):
        raise ValueError(f"{where}.{key}.exists: must be true or false")


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    when: dict[str, Any]
    analyzers: list[str] = Field(min_length=1)
    destinations: list[str] | None = None
    stable_after: float | None = Field(None, ge=0)
    required_series: list[dict[str, Any]] = Field(default_factory=list)
    force_after: float | None = Field(None, gt=0)
    enabled: bool = True
    priority: int = Field(2, ge=0, le=9, description="job priority: 0 runs first")
    continue_: bool = Field(False, alias="continue")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError("rule names are 1-64 letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _conditions(self) -> "Rule":
        check_condition(self.when, "when")
        for i, c in enumerate(self.required_series):
            check_condition(c, f"required_series[{i}]")
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_defaults=True, exclude_none=True) | {"name": self.name, "when": self.when, "analyzers": self.analyzers}


@dataclass
class Explanation:
    """Why a condition held or not: the deciding leaf and the value it saw."""

    matched: bool
    reason: str


@dataclass
class SeriesView:
    """What the router sees of one series: its attributes, with a lazy reader for others."""

    series_uid: str
    attributes: dict[str, Any]
    calling_ae: str | None = None
    reader: Callable[[str], Any] | None = None
    _read: dict[str, Any] = field(default_factory=dict)

    def get(self, keyword: str) -> Any:
        if keyword == "CallingAETitle":
            return self.calling_ae
        if keyword in self.attributes:
            return self.attributes[keyword]
        if keyword not in self._read:
            self._read[keyword] = self.reader(keyword) if self.reader else None
        return self._read[keyword]


def _values(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [x for x in v if x is not None]
    return [v]


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        na = _num(a)
        return na is not None and na == float(b)
    return str(a).strip().upper() == str(b).strip().upper()


def evaluate(cond: dict[str, Any], view: SeriesView) -> Explanation:
    (key, body), = cond.items()
    if key == "all":
        for c in body:
            e = evaluate(c, view)
            if not e.matched:
                return e
        return Explanation(True, " and ".join(evaluate(c, view).reason for c in body))
    if key == "any":
        reasons = []
        for c in body:
            e = evaluate(c, view)
            if e.matched:
                return e
            reasons.append(e.reason)
        return Explanation(False, "none of: " + "; ".join(reasons))
    if key == "not":
        e = evaluate(body, view)
        return Explanation(not e.matched, f"not ({e.reason})")
    op, operand = next(iter(body.items())) if isinstance(body, dict) else ("equals", body)
    value = view.get(key)
    vals = _values(value)
    shown = value if not isinstance(value, str) else repr(value)
    if op == "exists":
        ok = bool(vals) == bool(operand)
        return Explanation(ok, f"{key} {'is present' if vals else 'is absent'}")
    if op == "equals":
        ok = any(_same(v, operand) for v in vals)
        return Explanation(ok, f"{key}={shown} {'equals' if ok else 'is not'} {operand!r}")
    if op == "in":
        ok = any(_same(v, o) for v in vals for o in operand)
        return Explanation(ok, f"{key}={shown} {'in' if ok else 'not in'} {operand}")
    if op == "regex":
        rx = re.compile(str(operand))
        ok = any(rx.search(str(v)) for v in vals)
        return Explanation(ok, f"{key}={shown} {'matches' if ok else 'does not match'} /{operand}/")
    n = _num(vals[0]) if vals else None
    if n is None:
        return Explanation(False, f"{key}={shown} is not a number")
    ok = {"lt": n < operand, "le": n <= operand, "gt": n > operand, "ge": n >= operand}[op]
    sym = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}[op]
    return Explanation(ok, f"{key}={n:g} {'' if ok else 'not '}{sym} {operand}")


@dataclass
class RuleDecision:
    rule: Rule
    matched: bool
    reason: str
    skipped: str = ""


class RuleSet:
    """The ordered rules of one file."""

    def __init__(self, rules: list[Rule], source: Path | None = None) -> None:
        self.rules = rules
        self.source = source
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RulesError(f"{source or 'rules'}: rule names must be unique; repeated: {', '.join(dupes)}")

    def __iter__(self):
        return iter(self.rules)

    def get(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule named {name!r}; `dicomnode rules list` shows the rules")

    def decide(self, view: SeriesView) -> list[RuleDecision]:
        """Every rule's verdict for a series, in order; the effective ones are ``matched`` and not ``skipped``."""
        out: list[RuleDecision] = []
        stopped_by = None
        for rule in self.rules:
            if not rule.enabled:
                out.append(RuleDecision(rule, False, "rule is disabled", skipped="disabled"))
                continue
            e = evaluate(rule.when, view)
            if stopped_by is not None:
                out.append(RuleDecision(rule, e.matched, e.reason, skipped=f"an earlier rule {stopped_by!r} matched without continue"))
                continue
            out.append(RuleDecision(rule, e.matched, e.reason))
            if e.matched and not rule.continue_:
                stopped_by = rule.name
        return out

    def match(self, view: SeriesView) -> list[Rule]:
        return [d.rule for d in self.decide(view) if d.matched and not d.skipped]

    # -- files -----------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> "RuleSet":
        path = Path(path)
        if not path.exists():
            raise RulesError(f"rules file {path} does not exist; create it with `dicomnode rules add` or fix rules_file in the configuration")
        try:
            raw = yaml.safe_load(path.read_text()) or []
        except yaml.YAMLError as exc:
            raise RulesError(f"{path}: not valid YAML: {exc}") from None
        return cls.parse(raw, path)

    @classmethod
    def parse(cls, raw: Any, source: Path | None = None) -> "RuleSet":
        where = source or "rules"
        if not isinstance(raw, list):
            raise RulesError(f"{where}: the rules file is a list of rules (each starting with '- name: ...')")
        rules = []
        for i, item in enumerate(raw):
            label = f"rule {i + 1}" + (f" ({item.get('name')!r})" if isinstance(item, dict) and item.get("name") else "")
            if not isinstance(item, dict):
                raise RulesError(f"{where}: {label}: each rule is a mapping with name, when, analyzers")
            try:
                rules.append(Rule.model_validate(item))
            except ValidationError as exc:
                errors = exc.errors()  # an unknown (misspelt) key explains the others: name it first
                err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
                key = ".".join(str(p) for p in err["loc"]) or "(rule)"
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown key; rule keys are name, when, analyzers, destinations, stable_after, required_series, force_after, enabled, priority, continue, description"
                elif err["type"] == "missing":
                    msg = "required key is missing"
                raise RulesError(f"{where}: {label}: {key}: {msg}") from None
        return cls(rules, source)

    def dump(self) -> list[dict[str, Any]]:
        return [r.to_yaml_dict() for r in self.rules]

    def save(self, path: Path) -> None:
        """Write atomically; the file is the single source of truth and stays reviewable."""
        text = yaml.safe_dump(self.dump(), sort_keys=False, allow_unicode=True)
        RuleSet.parse(yaml.safe_load(text), path)  # never write what we could not read back
        tmp = Path(path).with_suffix(".yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def problems(self, analyzers: Iterable[str], destinations: Iterable[str]) -> list[str]:
        """Semantic checks beyond syntax: unknown analyzers and destinations, unreachable rules."""
        known_a, known_d = set(analyzers), set(destinations)
        out = []
        for r in self.rules:
            for a in r.analyzers:
                if a not in known_a:
                    out.append(f"rule {r.name!r}: analyzers: unknown analyzer {a!r}; installed: {', '.join(sorted(known_a)) or 'none'}")
            for d in r.destinations or []:
                if d not in known_d:
                    out.append(f"rule {r.name!r}: destinations: unknown destination {d!r}; configured: {', '.join(sorted(known_d)) or 'none'}")
        for i, r in enumerate(self.rules):
            for earlier in self.rules[:i]:
                if earlier.enabled and not earlier.continue_ and _covers(earlier.when, r.when):
                    out.append(f"rule {r.name!r} is unreachable: rule {earlier.name!r} before it matches everything it matches and does not continue")
                    break
        return out


def _covers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when condition ``a`` holds wherever ``b`` holds (syntactic: a's conjuncts are among b's)."""
    def conjuncts(c: dict[str, Any]) -> list[str]:
        (k, v), = c.items()
        if k == "all":
            return [x for item in v for x in conjuncts(item)]
        return [yaml.safe_dump(c, sort_keys=True)]
    ca, cb = conjuncts(a), conjuncts(b)
    return all(x in cb for x in ca)


def series_view(series_row: dict[str, Any], calling_ae: str | None, first_instance_path: str | None) -> SeriesView:
    """A router view of an indexed series; attributes not in the index are read from its first file."""
    cache: dict[str, Any] = {}

    def reader(keyword: str) -> Any:
        if not first_instance_path:
            return None
        if "ds" not in cache:
            from pydicom import dcmread

            try:
                cache["ds"] = dcmread(first_instance_path, stop_before_pixels=True, force=True)
            except Exception:
                cache["ds"] = None
        ds = cache["ds"]
        if ds is None or keyword not in ds:
            return None
        from .index import to_jsonable

        return to_jsonable(ds.get(keyword))

    return SeriesView(series_row["series_uid"], series_row["attributes"], calling_ae, reader)


def view_of_dataset(ds: Any, calling_ae: str | None = None) -> SeriesView:
    from .index import ROUTING_KEYWORDS, to_jsonable

    attrs = {kw: to_jsonable(ds.get(kw)) for kw in ROUTING_KEYWORDS if kw in ds}
    return SeriesView(str(ds.get("SeriesInstanceUID", "")), attrs, calling_ae, lambda kw: to_jsonable(ds.get(kw)) if kw in ds else None)

