"""YAML text that reads like the hand-written files, and replacing such a file atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..router import Rule
from . import AdminError


class _FlowDict(dict):
    pass


class _FlowList(list):
    pass


class Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False):  # noqa: ARG002
        return super().increase_indent(flow, False)  # list items indented under their key, as people write them


Dumper.add_representer(_FlowDict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", dict(v), flow_style=True))
Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", list(v), flow_style=True))


def styled_condition(cond: Any) -> Any:
    (key, body), = cond.items()
    if key in ("all", "any"):
        return {key: [styled_condition(c) for c in body]}
    if key == "not":
        return {key: styled_condition(body)}
    if isinstance(body, dict):
        body = _FlowDict({k: _FlowList(v) if isinstance(v, list) else v for k, v in body.items()})
    return _FlowDict({key: body})


def rule_yaml(rule: Rule) -> str:
    """A rule as a block of ``rules.yaml`` (leaf conditions and name lists in flow style)."""
    data: dict[str, Any] = {}
    for k, v in rule.to_yaml_dict().items():
        if k == "when":
            v = styled_condition(v)
        elif k == "required_series":
            v = [styled_condition(c) for c in v]
        elif isinstance(v, list):
            v = _FlowList(v)
        data[k] = v
    return yaml.dump([data], Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)


def flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000).strip()


def atomic_write(path: Path, text: str, expected_old: str | None) -> None:
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


def ensure_nl(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def join_blocks(head: str, block: str) -> str:
    """``head`` then ``block``; a blank line keeps a block's own leading comment apart from a header comment."""
    head = ensure_nl(head)
    if block.startswith("#") and head.splitlines()[-1:] and head.splitlines()[-1].startswith("#"):
        head += "\n"
    return head + block
