"""Run the DICOM checkers tests rely on: dicom3tools' ``dciodvfy`` and DCMTK's ``dsrdump``.

Call the Debian binaries by absolute path: the virtual environment's ``bin/``
holds pynetdicom tools with DCMTK's names.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"


@dataclass
class ToolReport:
    output: str
    errors: list[str]
    warnings: list[str]


def have(tool: str) -> bool:
    return Path(tool).is_file() and shutil.which(tool) is not None


def require(tool: str) -> None:
    """Skip the calling test when ``tool`` is not installed (scripts/setup.sh installs it)."""
    if not have(tool):
        pytest.skip(f"{tool} is not installed; run scripts/setup.sh test")


def _as_file(ds_or_path: pydicom.Dataset | Path | str, tmp: Path) -> Path:
    if isinstance(ds_or_path, pydicom.Dataset):
        path = tmp / "object.dcm"
        ds_or_path.save_as(path, enforce_file_format=True)
        return path
    return Path(ds_or_path)


def dciodvfy(ds_or_path: pydicom.Dataset | Path | str) -> ToolReport:
    """Validate against the IOD; ``errors`` holds every line that starts with ``Error``."""
    require(DCIODVFY)
    with tempfile.TemporaryDirectory() as tmp:
        path = _as_file(ds_or_path, Path(tmp))
        proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    return ToolReport(
        output=out,
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
    )


def dsrdump(ds_or_path: pydicom.Dataset | Path | str) -> ToolReport:
    """Render an SR as text; ``warnings``/``errors`` hold DCMTK's ``W:``/``E:`` lines."""
    require(DSRDUMP)
    with tempfile.TemporaryDirectory() as tmp:
        path = _as_file(ds_or_path, Path(tmp))
        proc = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    errors = [line for line in lines if line.startswith(("E:", "F:"))]
    if proc.returncode != 0 and not errors:
        errors.append(f"dsrdump exited with status {proc.returncode}")
    return ToolReport(output=out, errors=errors, warnings=[line for line in lines if line.startswith("W:")])


DCMPSCHK = "/usr/bin/dcmpschk"


def dcmpschk(ds_or_path: pydicom.Dataset | Path | str) -> ToolReport:
    """Check a presentation state with DCMTK: its semantic pass must run and say ``Test passed``."""
    require(DCMPSCHK)
    with tempfile.TemporaryDirectory() as tmp:
        path = _as_file(ds_or_path, Path(tmp))
        proc = subprocess.run([DCMPSCHK, "-v", str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    errors = [line for line in lines if line.startswith(("E:", "F:"))]
    if "Semantic Check of Presentation State" not in out or "skipping pass 3" in out:
        errors.append("dcmpschk did not check it as a presentation state")
    if "Test passed" not in out:
        errors.append("dcmpschk did not report 'Test passed'")
    return ToolReport(output=out, errors=errors, warnings=[line for line in lines if line.startswith("W:") and "Test" not in line])
