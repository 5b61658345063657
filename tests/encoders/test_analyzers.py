"""Every installed analyzer's SR template, encoded from a representative result on its own phantom.

The result is synthetic (no model runs): it covers every key the analyzer
declares in its ``Outputs``, with regions on the phantom's source image, so a
template that cannot be encoded, or an object that fails dciodvfy or loses an
item on read-back, fails here before an analyzer ever runs in the node.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.analysis import (
    AnalysisResult,
    Finding,
    Heatmap,
    Measurement,
    ModelInfo,
    Outputs,
    Region,
    Segmentation,
    SourceRef,
    Study,
    UncertaintyClass,
)
from dicomnode.encoders import EncoderContext, encode_result
from dicomnode.registry import analyzer_class, available_analyzers
from sr_templates.loader import Template, check_all, load_template, template_path, validate_template
from tests.encoders.checks import check_all as check_objects


def _ready(name: str):
    """The analyzer class; an installed analyzer that does not import or lacks its template fails here."""
    cls = analyzer_class(name)
    assert template_path(name).is_file(), f"analyzer {name} has no sr_templates/{name}.yaml"
    return cls


def _phantom_study(cls, folder: Path) -> Study:
    study_dirs = cls.write_phantoms(folder, 1, 0)
    files = sorted(Path(study_dirs[0]).rglob("*.dcm"))
    assert files, f"{cls.name}.write_phantoms wrote no DICOM files"
    return Study.from_datasets([pydicom.dcmread(p) for p in files], files)


def _source_series(cls, study: Study):
    try:
        return cls().select(study)[0]
    except Exception:  # select may want models; any image series of the phantom will do
        return max(study.series, key=lambda s: len(s.instances))


def representative_result(cls, template: Template, study: Study) -> AnalysisResult:
    """A result that uses every declared key once, laid out on the phantom's source image."""
    outputs: Outputs = cls.outputs
    series = _source_series(cls, study)
    middle = series.instances[len(series.instances) // 2]
    ds = middle.dataset
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    src = SourceRef(middle.sop_instance_uid, (frames + 1) // 2)
    sites = itertools.cycle(outputs.sites) if outputs.sites else itertools.repeat(None)
    classes = itertools.cycle([UncertaintyClass.CERTAIN, UncertaintyClass.MODERATE, UncertaintyClass.HIGH, None])

    regions: list[Region] = []
    n_regions = max(1, len(outputs.regions))
    for i, key in enumerate(outputs.regions):
        # Spread small shapes over the image; alternate polygon, point and polyline.
        cx = cols * (0.2 + 0.6 * ((i % 4) + 0.5) / 4)
        cy = rows * (0.2 + 0.6 * ((i // 4) % 4 + 0.5) / 4)
        r = max(2.0, min(rows, cols) * 0.04)
        kind = ("polygon", "point", "polyline")[i % 3]
        points = {
            "polygon": [[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r]],
            "point": [[cx, cy]],
            "polyline": [[cx - r, cy], [cx, cy + r], [cx + r, cy]],
        }[kind]
        regions.append(
            Region(key, kind, points, src, group=f"G{i}", label=f"{template.regions[key].label} {i}",
                   uncertainty=0.5 + i if kind == "point" else None, uncertainty_class=next(classes))
        )
    groups = [r.group for r in regions] or [None]

    findings: list[Finding] = []
    heatmaps: list[Heatmap] = []
    for i, (key, values) in enumerate(outputs.findings.items()):
        group = groups[i % len(groups)] if i % 2 == 0 else None
        if i == 2:
            value = None
        elif values == "boolean":
            value = i % 3 != 1
        else:
            value = values[i % len(values)]
        heat_key = None
        if not heatmaps and value is not None:
            heat_key = f"{key}_evidence"
            yy, xx = np.mgrid[0:rows, 0:cols]
            data = np.exp(-(((xx - cols / 2) / (cols / 8)) ** 2 + ((yy - rows / 2) / (rows / 8)) ** 2)).astype(np.float32)
            heatmaps.append(Heatmap(heat_key, key, data, src))
        findings.append(
            Finding(key, value, probability=None if value is None else round(0.1 + 0.8 * ((i * 37) % 10) / 10, 2),
                    uncertainty=0.05 if value is not None else None, site=next(sites), group=group, source=src, heatmap=heat_key)
        )
    measurements = [
        Measurement(key, 1.5 + i, unit, site=next(sites), group=groups[i % len(groups)], source=src,
                    uncertainty=0.25 if i % 2 == 0 else None)
        for i, (key, unit) in enumerate(outputs.measurements.items())
    ]

    segmentations = []
    if outputs.segments:
        n_seg = len(outputs.segments)
        instances = series.instances[:8] if frames == 1 else [middle]
        refs = [SourceRef(inst.sop_instance_uid) for inst in instances] if frames == 1 else [SourceRef(middle.sop_instance_uid, f) for f in range(1, min(frames, 8) + 1)]
        masks = np.zeros((len(refs), rows, cols, n_seg), bool)
        for j in range(n_seg):
            band = slice(int(cols * j / n_seg), int(cols * (j + 1) / n_seg))
            masks[len(refs) // 2, rows // 4 : 3 * rows // 4, band, j] = True  # other frames stay empty
        segmentations.append(Segmentation(list(outputs.segments), masks, refs))

    return AnalysisResult(
        analyzer=cls.name,
        analyzer_version=cls.version,
        models=[ModelInfo(f"{cls.name}-model", "0.0-test", "0" * 64, phantom_trained=True)],
        findings=findings,
        measurements=measurements,
        regions=regions,
        segmentations=segmentations,
        heatmaps=heatmaps,
        review_required=True,
        review_reasons=["representative result for the encoder test"],
        sources=[src],
    )


@pytest.mark.parametrize("name", available_analyzers())
def test_template_validates_and_every_object_encodes(name, tmp_path):
    cls = _ready(name)
    template = load_template(name)
    validate_template(template, cls.outputs)
    study = _phantom_study(cls, tmp_path / "phantom")
    result = representative_result(cls, template, study)
    objects = encode_result(result, study, EncoderContext(), template)
    check_objects(objects, result, template, study, tmp_path / "out")
    # Without a template argument the encoder loads the same installed template itself.
    again = encode_result(result, study, EncoderContext())
    assert [str(ds.SOPClassUID) for ds in again] == [str(ds.SOPClassUID) for ds in objects]


def test_installed_templates_pass_the_start_up_check():
    names = available_analyzers()
    assert names, "no analyzer is installed (entry-point group dicomnode.analyzers)"
    for name in names:
        _ready(name)
    assert sorted(check_all(analyzers=names)) == sorted(names)
