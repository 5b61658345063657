"""The ``--match`` language: one-line conditions that become conditions of the rule language.

Parsed, never evaluated as code; :func:`describe` writes any condition back as one line.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable

from pydicom.datadict import keyword_dict

from ..router import PSEUDO_KEYWORDS, check_condition
from . import AdminError


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
