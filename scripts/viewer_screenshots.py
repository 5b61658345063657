"""Regenerate the README's OHIF screenshots (docs/viewer/<analyzer>.png), one per analyzer.

    .venv/bin/python scripts/viewer_screenshots.py        (after scripts/setup.sh viewer)

Each analyzer's phantom study and results go through the viewer suite's harness (tests/viewer): a
throw-away Orthanc with DICOMweb, the OHIF site, headless Chromium. The picture is the viewport
with the analyzer's SEG loaded, or its SR drawn when it writes no SEG, cropped and shrunk.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import Orthanc  # noqa: E402
from tests.viewer import ohif  # noqa: E402
from tests.viewer.studies import analyze_phantom, registered_analyzers, views  # noqa: E402

OUT = REPO / "docs" / "viewer"
WIDTH = 720


def main() -> int:
    reason = ohif.missing()
    if reason:
        print(f"viewer_screenshots: {reason}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dicomnode-shots-") as tmp:
        work = Path(tmp)
        studies = {name: analyze_phantom(name, work) for name in registered_analyzers()}
        chosen = []
        for name, study in studies.items():
            candidates = [v for v in views(study) if v["kind"] == "SEG"] or [v for v in views(study) if v["kind"] == "SR"]
            chosen.append(candidates[0])
        orthanc = Orthanc(work / "orthanc", dicomweb=True).start()
        try:
            for study in studies.values():
                orthanc.upload(study.sources + study.results)
            with ohif.ViewerSite(orthanc.http_port) as site:
                report = ohif.run_browser({"base": site.url, "width": 1920, "height": 1080, "views": chosen}, work / "shots")
        finally:
            orthanc.stop()
        failed = [v["name"] for v in report["views"] if not v["ready"] or v["errors"]]
        if failed:
            print(f"viewer_screenshots: OHIF did not show {', '.join(failed)} cleanly; run pytest -m viewer tests/viewer", file=sys.stderr)
            return 1
        for view in report["views"]:
            box = view["viewportBox"]
            x, y, w, h = (int(box[k]) for k in ("x", "y", "width", "height"))
            image = Image.open(view["screenshot"]).convert("RGB").crop((x, y, x + w, y + h))
            image = image.resize((WIDTH, round(h * WIDTH / w)), Image.LANCZOS)
            # A 128-colour palette keeps each file small enough to commit.
            target = OUT / f"{view['name'].rsplit('-', 1)[0]}.png"
            image.quantize(colors=128).save(target, optimize=True)
            print(f"{target.relative_to(REPO)}  ({target.stat().st_size // 1024} KiB, {view['kind']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
