"""The node's own install has no torch (`scripts/setup.sh run`): inference must not need it."""

import subprocess
import sys
import textwrap

import pytest

from tests.peers import REPO

BUNDLED = ["chest_xray_thoracic", "spine_xray_keypoints", "dxa_scoliosis", "spine_mri_grading", "ct_vertebral_fracture"]


@pytest.mark.parametrize("name", BUNDLED)
def test_analyzer_runs_without_torch(name, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails, as in the node's install
        from pathlib import Path
        from dicomnode.analysis import NotApplicable, Study
        from dicomnode.registry import analyzer_class
        from dicomnode.cli.common import collect_files, read_studies
        cls = analyzer_class({name!r})
        analyzer = cls()
        analyzer.load()
        folder = cls.write_phantoms(Path({str(tmp_path)!r}), 1, 99)[0]
        studies, _ = read_studies(collect_files([str(folder)]))
        result = analyzer.analyze(analyzer.select(studies[0]))
        print("OK", len(result.findings), len(result.measurements))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout
