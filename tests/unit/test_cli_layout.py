"""The command line reads by noun: each CLI module registers its commands and calls the admin module of its noun."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import dicomnode.cli as cli

NOUNS = ("rules", "destinations", "callers", "jobs", "outbox", "studies", "models", "status", "peers", "db")


def test_each_noun_has_a_cli_module_that_calls_its_admin_module():
    for noun in NOUNS:
        module = importlib.import_module(f"dicomnode.cli.{noun}")
        assert module in cli.NOUNS and callable(module.register), noun
        tree = ast.parse(Path(module.__file__).read_text())
        # `from ..admin import rules` or `from ..admin.status import report`
        imported = {f"{n.module}.{a.name}" if n.module == "admin" else n.module
                    for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 2 for a in n.names}
        assert f"admin.{noun}" in imported, f"dicomnode.cli.{noun} does not call dicomnode.admin.{noun}"
        importlib.import_module(f"dicomnode.admin.{noun}")


def test_every_command_is_registered_once():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"serve", "echo", "send", "analyze", "phantom", "status", "rules", "studies", "jobs", "outbox",
                                "destinations", "callers", "models", "db"}
