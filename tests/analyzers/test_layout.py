"""Every bundled analyzer package is laid out alike, and analyzers import only the core's contract modules."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dicomnode.analysis import Analyzer
from dicomnode.registry import analyzer_class, available_analyzers
from tests.peers import REPO

ANALYZERS = REPO / "analyzers"
FILES = ("constants.py", "model.py", "preprocess.py", "inference.py", "evaluate.py", "analyzer.py", "phantom.py",
         "train.py", "MODEL_CARD.md")
TORCH_FREE = ("constants", "preprocess", "inference", "evaluate", "analyzer", "phantom")
CORE_FOR_ANALYZERS = {"analysis", "imaging", "uids", "runtime"}


def _bundled() -> list[str]:
    """Installed analyzers whose code lives in this repository's ``analyzers/`` package."""
    return [n for n in available_analyzers() if analyzer_class(n).__module__.startswith("analyzers.")]


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (``from x import y`` gives ``x`` and ``x.y``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_bundled_analyzers_are_found():
    assert {"chest_xray_thoracic", "dxa_scoliosis", "spine_xray_keypoints"} <= set(_bundled())


@pytest.mark.parametrize("name", _bundled())
def test_package_has_the_common_files_and_roles(name):
    folder = ANALYZERS / name
    missing = [f for f in FILES if not (folder / f).is_file()]
    assert not missing, f"analyzers/{name} lacks {', '.join(missing)}"
    assert (folder / "weights").is_dir(), f"analyzers/{name} has no weights/ folder"
    assert list((folder / "weights").glob("*.json")), f"analyzers/{name}/weights has no registry entry (model.json)"
    cls = analyzer_class(name)
    assert issubclass(cls, Analyzer) and cls.__module__ == f"analyzers.{name}.analyzer"
    assert cls.name == name
    assert any(n.startswith("torch") for n in _imports(folder / "model.py")), "model.py holds the torch architecture"
    for module in TORCH_FREE:
        torch = sorted(n for n in _imports(folder / f"{module}.py") if n.split(".")[0] == "torch")
        assert not torch, f"analyzers/{name}/{module}.py imports {torch}; it must run without torch"
    phantom = ast.parse((folder / "phantom.py").read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "write_phantoms" for n in phantom.body), "phantom.py defines write_phantoms"
    train = ast.parse((folder / "train.py").read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in train.body), "train.py defines main"


@pytest.mark.parametrize("name", _bundled())
def test_torch_free_modules_import_without_torch(name):
    code = textwrap.dedent(f"""
        import importlib, sys
        sys.modules["torch"] = None  # any `import torch` fails, as in the node's install
        for module in {TORCH_FREE!r}:
            importlib.import_module(f"analyzers.{name}.{{module}}")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]


def _core_modules(path: Path) -> set[str]:
    """The dicomnode modules a file imports: ``dicomnode.x`` for ``from dicomnode import x`` and ``import dicomnode.x``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "dicomnode"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "dicomnode":
            names |= {f"dicomnode.{a.name}" for a in node.names} if node.module == "dicomnode" else {node.module}
    return names


def test_analyzers_import_only_the_contract_modules_of_the_core():
    bad = []
    for path in sorted(ANALYZERS.rglob("*.py")):
        for name in _core_modules(path):
            parts = name.split(".")
            if len(parts) < 2 or parts[1] not in CORE_FOR_ANALYZERS:
                bad.append(f"{path.relative_to(REPO)}: {name}")
    assert not bad, "analyzers may import dicomnode.analysis, imaging, uids and runtime only:\n" + "\n".join(bad)
