"""``rules.yaml`` edited as text, one rule at a time, so the comments and layout of a reviewed file survive.

Every edit is read back and must give exactly the intended rules before the file is replaced
atomically; a running node reloads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..router import Rule, RuleSet, RulesError
from . import AdminError
from .yamltext import atomic_write, ensure_nl, join_blocks, rule_yaml


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
        return rules, join_blocks("".join(lines[:at]), rule_yaml(rule)) + "".join(lines[at:])

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
        moved = ensure_nl(chunks.pop(i))
        chunks = [ensure_nl(c) for c in chunks]
        chunks.insert(j, moved)
        return rules, join_blocks(head, chunks[0]) + "".join(chunks[1:])

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
        """Check that ``text`` reads back as exactly ``rules``, then replace the file atomically.

        A file left with comments only (its last rule removed) reads as no rules, as the node reads it.
        """
        wanted = RuleSet(rules, self.path)
        try:
            got = RuleSet.parse(yaml.safe_load(text) or [], self.path)
        except (RulesError, yaml.YAMLError):
            got = None
        if got is None or got.dump() != wanted.dump():
            text = self._rebuilt(rules)
            try:
                got = RuleSet.parse(yaml.safe_load(text) or [], self.path)
            except RulesError as exc:
                raise AdminError(f"{exc}; {self.path} was not changed", 2) from None
            if got.dump() != wanted.dump():
                raise AdminError(f"internal error: {self.path} would not read back as the intended rules; nothing written", 1)
        atomic_write(self.path, text, self.text)
        self.text, self.rules = text, wanted
