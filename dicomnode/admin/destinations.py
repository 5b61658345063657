"""Destinations (where results go): who uses one, add and remove them in ``config/node.yaml``."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..router import RuleSet, RulesError
from . import AdminError
from .config_file import ConfigFile


def destination_users(cfg: Config, name: str) -> list[str]:
    """Who sends results to destination ``name``: callers and rules, as readable words."""
    users = [f"caller {c.ae_title}" for c in cfg.callers if c.destination == name]
    try:
        rules = RuleSet.load(cfg.rules_path)
    except RulesError:
        rules = RuleSet([])
    users += [f"rule {r.name!r}" for r in rules if name in (r.destinations or [])]
    return users


def add(path: Path, name: str, ae_title: str, host: str, port: int, tls: bool = False) -> tuple[ConfigFile, Config]:
    """Add a destination to the configuration file at ``path``; returns the file (edited) and the new configuration."""
    cf = ConfigFile.open(path)
    raw, text = cf.add_destination(name, ae_title, host, port, tls)
    return cf, cf.save(raw, text)


def remove(cfg: Config, path: Path, name: str) -> tuple[ConfigFile, Config]:
    """Remove a destination no caller or rule uses from ``cfg``, read from the configuration file at ``path``.

    Raises
    ------
    AdminError
        Naming who still uses it, or when there is no such destination.
    """
    users = destination_users(cfg, name) if name in cfg.destinations else []
    if users:
        raise AdminError(f"destination {name!r} is used by {', '.join(users)}; change or remove them first", 2)
    cf = ConfigFile.open(path)
    raw, text = cf.remove_destination(name)
    return cf, cf.save(raw, text)
