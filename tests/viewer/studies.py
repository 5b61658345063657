"""Each registered analyzer's phantom study and its result objects, as a user makes them (the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import pydicom

from tests.peers import REPO

DICOMNODE = str(Path(sys.executable).parent / "dicomnode")


def registered_analyzers() -> list[str]:
    return sorted(ep.name for ep in entry_points(group="dicomnode.analyzers"))


@dataclass
class AnalyzedStudy:
    analyzer: str
    study_uid: str
    sources: list[Path]
    results: list[Path]
    # (Modality, SeriesDescription) of each result file, as the viewer's study browser lists them.
    series: dict[Path, tuple[str, str]] = field(default_factory=dict)

    def of_modality(self, modality: str) -> list[Path]:
        return [p for p in self.results if self.series[p][0] == modality]


def _cli(*args: str) -> str:
    r = subprocess.run([DICOMNODE, *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        raise RuntimeError(f"dicomnode {' '.join(args)} exited with {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r.stdout


def analyze_phantom(analyzer: str, workdir: Path, seed: int = 1) -> AnalyzedStudy:
    """`dicomnode phantom` then `dicomnode analyze`: one study and the objects the node would send back."""
    phantom, out = workdir / f"{analyzer}-phantom", workdir / f"{analyzer}-results"
    _cli("phantom", analyzer, "--out", str(phantom), "--n", "1", "--seed", str(seed))
    _cli("analyze", "--analyzer", analyzer, "--out", str(out), str(phantom))
    sources = sorted(phantom.rglob("*.dcm"))
    results = sorted(out.glob("*.dcm"))
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in sources + results}
    if len(uids) != 1:
        raise RuntimeError(f"{analyzer}: the phantom and its results span {len(uids)} studies, expected one")
    series = {}
    for p in results:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        series[p] = (str(ds.Modality), str(ds.get("SeriesDescription", "")))
    return AnalyzedStudy(analyzer, uids.pop(), sources, results, series)


def views(study: AnalyzedStudy) -> list[dict]:
    """What a reader opens: the study's default layout, then each SEG and SR."""
    out = [{"name": f"{study.analyzer}-image", "study": study.study_uid, "open": None, "kind": "image"}]
    for modality in ("SEG", "SR"):
        for i, path in enumerate(study.of_modality(modality), start=1):
            description = study.series[path][1]
            out.append({"name": f"{study.analyzer}-{modality.lower()}{i}", "study": study.study_uid,
                        "open": {"modality": modality, "description": description}, "kind": modality,
                        "file": path.name})
    return out
