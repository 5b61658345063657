"""Each table has one owning module: no module runs SQL on another module's tables (read from the source)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import dicomnode

PACKAGE = Path(dicomnode.__file__).parent

# table -> the module (path under dicomnode/, without .py) that owns its DDL, migrations and SQL
OWNERS = {
    "schema_versions": "store",
    "studies": "index", "series": "index", "instances": "index",
    "jobs": "queue",
    "outbox": "outbox",
    "node_status": "heartbeat",
}

# SQL in this code base is written in capitals; English text ("read from the index") is not SQL
_TABLE_REF = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE(?: IF NOT EXISTS)?|ON)\s+([A-Za-z_][A-Za-z0-9_]*)\s*(?=[\s(,;]|$)")
_DYNAMIC = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE)\s*$")


def sql_tables(source: str) -> tuple[set[str], list[str]]:
    """Tables named in SQL string literals of ``source``, and SQL that takes its table name from a variable."""
    found: set[str] = set()
    dynamic: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(_TABLE_REF.findall(node.value))
        elif isinstance(node, ast.JoinedStr):
            parts = node.values
            for i, part in enumerate(parts):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    if _DYNAMIC.search(part.value) and i + 1 < len(parts) and isinstance(parts[i + 1], ast.FormattedValue):
                        dynamic.append(part.value.strip())
    # clauses, not tables: ON CONFLICT, ON DELETE, DO UPDATE SET, FOR UPDATE SKIP LOCKED
    return found - {"CONFLICT", "DELETE", "UPDATE", "SET", "SKIP"}, dynamic


def modules() -> list[tuple[str, str]]:
    return [(str(p.relative_to(PACKAGE).with_suffix("")), p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def test_the_scanner_sees_sql_and_names_a_trespass():
    tables, dynamic = sql_tables('q = "SELECT id FROM jobs WHERE x=?"\nr = f"DELETE FROM {t} WHERE y=?"\n'
                                 '"""the sender reads from the outbox"""\n'
                                 'db.execute("INSERT INTO outbox (a) VALUES (?) ON CONFLICT (a) DO NOTHING")')
    assert tables == {"jobs", "outbox"} and dynamic == ["DELETE FROM"]


def test_every_table_is_touched_only_by_its_owner():
    trespass, unknown, dynamic, seen = [], [], [], set()
    for name, source in modules():
        tables, dyn = sql_tables(source)
        dynamic += [f"{name}: {d} {{...}}" for d in dyn]
        for t in tables:
            seen.add(t)
            if t not in OWNERS:
                unknown.append(f"{name}: {t}")
            elif OWNERS[t] != name:
                trespass.append(f"{name} runs SQL on {t} (owned by {OWNERS[t]})")
    assert not trespass, "ask the owning module instead: " + "; ".join(trespass)
    assert not unknown, "give each new table an owner in OWNERS: " + "; ".join(unknown)
    assert not dynamic, "write table names literally so that ownership can be checked: " + "; ".join(dynamic)
    assert seen == set(OWNERS), f"tables no module uses any more: {set(OWNERS) - seen}"


def test_each_owner_creates_its_tables_in_its_own_migrations():
    for name, source in modules():
        created = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", source))
        assert created == {t for t, owner in OWNERS.items() if owner == name}, name


def _imports(source: str) -> set[str]:
    """Modules imported, relative ones as written (``.store``), also inside functions."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out |= {base} if node.module else {base + a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_stage_modules_do_not_reach_into_admin_or_the_store_from_the_parser():
    found = dict(modules())
    assert not {i for i in _imports(found["header"]) if i.startswith(".store")}, "header.py must not import the store"
    for name in ("service", "assembler", "receiver", "sender", "worker", "queue", "outbox", "index", "retention"):
        if name in found:
            assert not {i for i in _imports(found[name]) if i.startswith(".admin") or i.startswith(".cli")}, \
                f"{name} imports the administration layer"
