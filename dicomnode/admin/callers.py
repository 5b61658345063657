"""Callers (who may send to the node): allow and remove calling AEs in ``config/node.yaml``."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from .config_file import ConfigFile


def add(path: Path, ae_title: str, host: str | None, destination: str | None,
        stable_after: float | None) -> tuple[ConfigFile, Config]:
    """Allow a calling AE (from one host, or any); returns the file (edited) and the new configuration."""
    cf = ConfigFile.open(path)
    raw, text = cf.add_caller(ae_title, host, destination, stable_after)
    return cf, cf.save(raw, text)


def remove(path: Path, ae_title: str, host: str | None) -> tuple[ConfigFile, Config, int]:
    """Stop accepting a calling AE (every entry, or the one for ``host``); returns how many entries went too."""
    cf = ConfigFile.open(path)
    raw, text, n = cf.remove_callers(ae_title, host)
    return cf, cf.save(raw, text), n
