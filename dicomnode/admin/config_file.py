"""``config/node.yaml`` edited as text: callers and destinations change in place, the rest untouched.

Every edit is validated as a configuration and read back before the file is replaced atomically;
a running node reloads it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, _format_errors
from . import AdminError
from .yamltext import Dumper, atomic_write, flow


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
            return "".join(lines) + yaml.dump({key: new_value}, Dumper=Dumper, sort_keys=False, default_flow_style=None)
        start, end, inline = sec
        if inline == "" and (edited := edit(lines, start, end)) is not None:
            return edited
        block = f"{key}:\n" + "".join(f"  - {flow(v)}\n" for v in new_value) if isinstance(new_value, list) else \
            f"{key}:\n" + "".join(f"  {k}: {flow(v)}\n" for k, v in new_value.items())
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
            return "".join(lines[:end]) + f"{indent}- {flow(entry)}\n" + "".join(lines[end:])

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
            return "".join(lines[:end]) + f"{indent}{flow({name: entry})[1:-1]}\n" + "".join(lines[end:])

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
        atomic_write(self.path, text, self.text)
        self.text, self.raw = text, raw
        cfg.path = self.path.resolve()
        return cfg
