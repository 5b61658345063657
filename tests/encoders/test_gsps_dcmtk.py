"""The GSPS as a presentation-state viewer applies it: DCMTK's dcmp2pgm renders the image through it.

OHIF 3.13 does not apply presentation states (it flags the PR series and shows the image without
it); readers there get the same outlines from the SR. This checks the other side: a viewer that
implements GSPS finds every region as a graphic on its layer, over the right image, and renders
the image with the state's display window.
"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from dicomnode.encoders import EncoderContext, encode_result
from dicomnode.encoders.gsps import layer_for
from sr_templates.loader import load_template
from tests.dicomtools import have
from tests.encoders.checks import GSPS_CLASS
from tests.encoders.results import FIXTURE_DIR, cr_study, fixture_result

DCMP2PGM = "/usr/bin/dcmp2pgm"


def _graphics_by_layer(dump: str) -> dict[str, list[np.ndarray]]:
    """Graphic objects per layer from dcmp2pgm's verbose dump of the presentation state."""
    out: dict[str, list[np.ndarray]] = {}
    layer = None
    lines = dump.splitlines()
    for i, line in enumerate(lines):
        if m := re.search(r"Graphic Layer #\d+ \[(\w+)\]", line):
            layer = m.group(1)
        elif re.search(r"graphic \d+: points=\d+", line) and layer is not None:
            coords = lines[i + 1].split("coordinates:", 1)[1]
            pts = [tuple(map(float, p.split("\\"))) for p in coords.replace(" ", "").strip(",").split(",") if p]
            out.setdefault(layer, []).append(np.asarray(pts, dtype=np.float32))
    return out


def test_dcmp2pgm_applies_the_gsps_with_every_region_on_its_layer(tmp_path):
    if not have(DCMP2PGM):
        pytest.skip(f"{DCMP2PGM} is not installed; run scripts/setup.sh test")
    study = cr_study()
    result = fixture_result(study)
    objects = encode_result(result, study, EncoderContext(), load_template("fixture_spine", FIXTURE_DIR))
    (gsps,) = [ds for ds in objects if str(ds.SOPClassUID) == GSPS_CLASS]
    image = study.series[0].instances[0].dataset
    image_path, gsps_path = tmp_path / "image.dcm", tmp_path / "gsps.dcm"
    image.save_as(image_path, enforce_file_format=True)
    gsps.save_as(gsps_path, enforce_file_format=True)

    plain = subprocess.run([DCMP2PGM, str(image_path), str(tmp_path / "plain.pgm")], capture_output=True, text=True, timeout=60)
    run = subprocess.run([DCMP2PGM, "-v", "-p", str(gsps_path), str(image_path), str(tmp_path / "ps.pgm")],
                         capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and run.returncode == 0, run.stderr
    dump = run.stdout + run.stderr
    assert "E:" not in dump and "W:" not in dump, dump

    # The state's display window is applied to the rendered image.
    window = re.search(r"VOI transformation: window center=([-\d.]+) width=([-\d.]+)", dump)
    assert window and float(window.group(1)) == pytest.approx(float(gsps.SoftcopyVOILUTSequence[0].WindowCenter), abs=0.5)
    rendered = np.asarray(Image.open(tmp_path / "ps.pgm"))
    assert rendered.shape == (image.Rows, image.Columns)
    assert not np.array_equal(rendered, np.asarray(Image.open(tmp_path / "plain.pgm")))

    drawn = _graphics_by_layer(dump)
    assert sum(len(v) for v in drawn.values()) == len(result.regions)
    for region in result.regions:
        want = np.asarray(region.points, dtype=np.float32)
        found = [g for g in drawn.get(layer_for(region), []) if len(g) >= len(want) and np.allclose(g[: len(want)], want, atol=0.01)]
        assert found, f"region {region.label} is not a graphic on layer {layer_for(region)}"
