"""Finding analyzers (entry points and configured plugins) and building them from the configuration.

The only core module that loads analyzer code: through the ``dicomnode.analyzers`` entry-point
group and the configured ``analyzers.plugins``, never by importing the ``analyzers`` package.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

from .analysis import Analyzer, AnalyzerSettings
from .config import Config


@functools.lru_cache(maxsize=None)
def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="dicomnode.analyzers")}


def available_analyzers() -> list[str]:
    """Names of the installed analyzers (entry-point group ``dicomnode.analyzers``)."""
    return sorted(_entry_points())


def analyzer_class(name: str) -> type[Analyzer]:
    """The Analyzer subclass an installed entry point names.

    Raises
    ------
    KeyError
        When no installed analyzer has that name (the message lists those that are).
    TypeError
        When the entry point names something other than an Analyzer subclass.
    """
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise KeyError(f"unknown analyzer {name!r}; installed analyzers: {known}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Analyzer)):
        raise TypeError(f"entry point {name!r} does not name an Analyzer subclass")
    return cls


def _plugin(spec: str) -> type[Analyzer]:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"analyzers.plugins entry {spec!r} must be 'module:Class'")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Analyzer)):
        raise TypeError(f"analyzers.plugins entry {spec!r} is not an Analyzer subclass")
    return cls


def analyzer_names(cfg: Config | None) -> list[str]:
    names = set(available_analyzers())
    if cfg is not None:
        for spec in cfg.analyzers.plugins:
            try:
                names.add(_plugin(spec).name)
            except Exception:
                continue
        names -= {n for n, s in cfg.analyzers.settings.items() if not s.enabled}
    return sorted(names)


def get_class(name: str, cfg: Config | None = None) -> type[Analyzer]:
    if cfg is not None:
        for spec in cfg.analyzers.plugins:
            cls = _plugin(spec)
            if cls.name == name:
                return cls
    return analyzer_class(name)


def settings_for(name: str, cfg: Config | None) -> AnalyzerSettings:
    if cfg is None:
        return AnalyzerSettings()
    opts = cfg.analyzers.settings.get(name)
    return AnalyzerSettings(
        device=cfg.analyzers.device,
        model_paths={k: cfg.resolve(Path(v)) for k, v in (opts.models if opts else {}).items()},
        options=dict(opts.options) if opts else {},
    )


def build(name: str, cfg: Config | None = None) -> Analyzer:
    return get_class(name, cfg)(settings_for(name, cfg))


def template_for(name: str, cfg: Config | None = None):
    """The SR template of an analyzer: its own ``template_file`` if it ships one, else ``sr_templates/<name>.yaml``."""
    from sr_templates.loader import load_template, load_template_file

    cls = get_class(name, cfg)
    return load_template_file(cls.template_file) if cls.template_file else load_template(name)


def check_templates(cfg: Config | None) -> dict[str, str]:
    """Load and validate every enabled analyzer's template against its declared outputs (start-up).

    Returns ``{analyzer: problem}`` for analyzers that cannot be used (import error, missing or
    wrong template); the node starts without them and their jobs fail with that message, visible
    in ``dicomnode jobs``, until it is fixed.
    """
    from sr_templates.loader import check_private_codes, validate_template

    problems: dict[str, str] = {}
    templates = []
    for n in analyzer_names(cfg):
        try:
            cls = get_class(n, cfg)
            template = template_for(n, cfg)
            validate_template(template, cls.outputs)
            templates.append(template)
        except Exception as exc:
            problems[n] = f"{type(exc).__name__}: {exc}"
    try:
        check_private_codes(templates)
    except Exception as exc:
        problems["sr_templates"] = str(exc)
    return problems
