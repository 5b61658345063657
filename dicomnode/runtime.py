"""ONNX Runtime for analyzers: execution providers (CUDA when present and asked for, CPU otherwise), sessions checked against their registry entry, and which entry a model uses."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import structlog

from .analysis import AnalyzerSettings, RegistryEntry

log = structlog.get_logger("dicomnode.runtime")

Device = Literal["auto", "cpu", "cuda"]


def providers_for(device: Device) -> list[str]:
    """Execution providers for a device setting; ``auto`` takes CUDA when ONNX Runtime offers it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(
            "analyzers.device is 'cuda' but this ONNX Runtime has no CUDA provider; "
            "install the gpu extra (pip install -e .[gpu]) or set analyzers.device to auto"
        )
    return ["CPUExecutionProvider"]


def resolve_entry(settings: AnalyzerSettings, model_name: str, bundled: Path) -> RegistryEntry:
    """The registry entry for ``model_name``: the configured override, else the bundled one."""
    path = settings.model_paths.get(model_name, bundled)
    return RegistryEntry.load(Path(path))


class OnnxModel:
    """One inference session, created once, checked against its registry sha256."""

    def __init__(self, entry: RegistryEntry, device: Device = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        entry.verify()
        self.entry = entry
        opts = ort.SessionOptions()
        n = threads or int(os.environ.get("DICOMNODE_ORT_THREADS", "0") or 0)
        if n:
            opts.intra_op_num_threads = n
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(entry.path), sess_options=opts, providers=providers_for(device))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._lock = threading.Lock()
        log.info("model_loaded", model=entry.name, version=entry.version, providers=self.session.get_providers())

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise ValueError(f"model {self.entry.name!r} needs inputs {sorted(missing)}")
        with self._lock:
            outs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outs))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()
