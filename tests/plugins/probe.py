"""A small analyzer for pipeline tests: real arithmetic on the pixels, shipped outside the project.

It loads through ``analyzers.plugins`` with its own SR template (as a third-party analyzer would),
so the node's pipeline can be tested end to end without the cost of the bundled models. A series
described as "CRASH" kills the worker process, to show that an analyzer crash is contained.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dicomnode import imaging
from dicomnode.analysis import Analyzer, Finding, Heatmap, Measurement, ModelInfo, NotApplicable, Outputs, Region, SourceRef


class IntensityProbe(Analyzer):
    name = "intensity_probe"
    version = "1.0"
    title = "Intensity probe (test analyzer)"
    outputs = Outputs(findings={"bright": "boolean"}, measurements={"mean_intensity": "1"}, regions=("bright_area",))
    template_file = Path(__file__).with_name("intensity_probe.yaml")

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("intensity-probe", "1.0", "0" * 64, phantom_trained=True)]

    def select(self, study):
        usable = [s for s in study.series if s.modality in ("CR", "DX", "CT", "MR")]
        if not usable:
            raise NotApplicable("no CR, DX, CT or MR series; this analyzer needs an image series")
        return usable[:1]

    def analyze(self, inputs):
        series = inputs[0]
        if "CRASH" in series.description.upper():
            os._exit(70)  # stands in for a native crash inside an analyzer
        inst = series.instances[len(series.instances) // 2]
        img = imaging.display_image(inst.dataset)
        src = SourceRef(inst.sop_instance_uid)
        mean = float(img.mean())
        rows, cols = np.nonzero(img > np.median(img))
        r0, r1 = (rows.min(), rows.max()) if rows.size else (0, img.shape[0] - 1)
        c0, c1 = (cols.min(), cols.max()) if cols.size else (0, img.shape[1] - 1)
        box = Region("bright_area", "polygon", [[c0, r0], [c1 + 1, r0], [c1 + 1, r1 + 1], [c0, r1 + 1]], src, group="Image",
                     label="Bright area")
        return self.result(
            findings=[Finding("bright", mean > 0.5, probability=mean, group="Image", source=src, heatmap="bright")],
            measurements=[Measurement("mean_intensity", mean, "1", group="Image", source=src)],
            regions=[box],
            heatmaps=[Heatmap("bright", "bright", img, src, label="Bright")],
            sources=[src],
        )


class BatchProbe(IntensityProbe):
    """The probe as an analyzer that batches: it records each batch it is given.

    A series described as "FAIL" raises inside the batch, to show that only its own job fails.
    """

    name = "batch_probe"
    title = "Intensity probe, batched (test analyzer)"
    template_file = Path(__file__).with_name("batch_probe.yaml")
    batchable = True
    max_batch = 4

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.batches: list[list[str]] = []

    def analyze_batch(self, batch):
        self.batches.append([str(inputs[0].first().StudyInstanceUID) for inputs in batch])
        out = []
        for inputs in batch:
            if "FAIL" in inputs[0].description.upper():
                # as a real analyzer does: one study's exception is caught, with its traceback, and returned
                try:
                    raise ValueError("the probe was told to fail on this series")
                except ValueError as exc:
                    out.append(exc)
            else:
                out.append(self.analyze(inputs))
        return out


class SlowProbe(IntensityProbe):
    """The probe taking a while per study (``DICOMNODE_PROBE_SECONDS``, default 1.5), so a test can stop a node mid-analysis."""

    name = "slow_probe"
    title = "Intensity probe, slow (test analyzer)"
    template_file = Path(__file__).with_name("slow_probe.yaml")

    def analyze(self, inputs):
        import time

        time.sleep(float(os.environ.get("DICOMNODE_PROBE_SECONDS", "1.5")))
        return super().analyze(inputs)
