"""Analyzer models: versions, checksums and device per model; verify weights load and run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import Config
from . import AdminError


def _device(cfg: Config | None) -> str:
    from ..runtime import providers_for

    try:
        first = providers_for(cfg.analyzers.device if cfg else "auto")[0]
    except Exception as exc:  # a CUDA request without a CUDA build: say so in the row
        return f"error: {exc}"
    return "cuda" if first.startswith("CUDA") else "cpu"


def model_rows(cfg: Config | None) -> list[dict[str, Any]]:
    """One row per model of every enabled analyzer; an analyzer that cannot be loaded is an error row."""
    from ..registry import analyzer_names, build

    device = _device(cfg)
    rows = []
    for name in analyzer_names(cfg):
        try:
            analyzer = build(name, cfg)
            infos = analyzer.models()
        except Exception as exc:
            rows.append({"analyzer": name, "analyzer_version": None, "model": None, "version": None, "sha256": None,
                         "device": device, "phantom_trained": None, "path": None, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if not infos:
            rows.append({"analyzer": name, "analyzer_version": analyzer.version, "model": None, "version": None,
                         "sha256": None, "device": device, "phantom_trained": None, "path": None, "error": None})
        for m in infos:
            rows.append({"analyzer": name, "analyzer_version": analyzer.version, "model": m.name, "version": m.version,
                         "sha256": m.sha256, "device": device, "phantom_trained": m.phantom_trained, "path": m.path or None,
                         "error": None})
    return rows


def verify_models(cfg: Config | None, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Per analyzer: checksums of its weight files, each ONNX file loads, one warm-up inference.

    Raises
    ------
    AdminError
        When ``names`` holds an analyzer that is not installed and enabled.
    """
    from ..analysis import sha256_file
    from ..registry import analyzer_names, build

    known = analyzer_names(cfg)
    for n in names or []:
        if n not in known:
            raise AdminError(f"unknown analyzer {n!r}; installed and enabled: {', '.join(known) or 'none'}", 2)
    device = _device(cfg)
    out = []
    for name in names or known:
        row: dict[str, Any] = {"analyzer": name, "device": device, "models": [], "warmup_seconds": None, "ok": False, "error": None}
        out.append(row)
        try:
            analyzer = build(name, cfg)
            infos = analyzer.models()
        except Exception as exc:
            row["error"] = f"cannot load the analyzer: {type(exc).__name__}: {exc}"
            continue
        problems = []
        for m in infos:
            check: dict[str, Any] = {"model": m.name, "version": m.version, "sha256": "not checked", "onnx": "not checked"}
            row["models"].append(check)
            path = Path(m.path) if m.path else None
            if path is None:
                check["sha256"] = "no weights file"
                continue
            if not path.is_file():
                check["sha256"] = "missing"
                problems.append(f"{m.name}: weights file {path} does not exist")
                continue
            actual = sha256_file(path)
            check["sha256"] = "ok" if actual == m.sha256 else "MISMATCH"
            if actual != m.sha256:
                problems.append(f"{m.name}: sha256 of {path} is {actual[:12]}…, the registry says {m.sha256[:12]}…")
                continue
            if path.suffix == ".onnx":
                try:
                    import onnxruntime as ort

                    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    check["onnx"] = "loads"
                except Exception as exc:
                    check["onnx"] = "FAILED"
                    problems.append(f"{m.name}: ONNX Runtime cannot load {path}: {exc}")
        if not problems:
            t0 = time.monotonic()
            try:
                analyzer.warmup()
                row["warmup_seconds"] = round(time.monotonic() - t0, 3)
            except Exception as exc:
                problems.append(f"warm-up inference failed: {type(exc).__name__}: {exc}")
        row["error"] = "; ".join(problems) or None
        row["ok"] = not problems
    return out
