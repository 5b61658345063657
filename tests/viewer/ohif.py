"""The OHIF viewer against a test Orthanc: a small web server for its prebuilt site, and the browser.

The site (``@ohif/app``'s ``dist/``) and playwright-core are installed into ``.viewer/`` by
``scripts/viewer_setup.sh``. :class:`ViewerSite` serves the site on a free loopback port with a
generated ``app-config.js`` and forwards ``/dicom-web`` to Orthanc's DICOMweb plugin, so the page
and its data share one origin (no CORS). :func:`run_browser` runs ``view.mjs``, which drives
Debian's Chromium through playwright-core and writes screenshots and a JSON report.
"""

from __future__ import annotations

import http.client
import http.server
import json
import mimetypes
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BIN, REPO, free_port

OHIF_VERSION = "3.13.2"
VIEWER_DIR = REPO / ".viewer"
DIST = VIEWER_DIR / f"ohif-{OHIF_VERSION}" / "dist"
NODE_MODULES = VIEWER_DIR / "node_modules"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
VIEW_SCRIPT = Path(__file__).with_name("view.mjs")

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")

# Hop-by-hop and length headers the proxy sets itself.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
        "transfer-encoding", "upgrade", "content-length", "accept-encoding"}


def missing() -> str | None:
    """Why the viewer suite cannot run here, or None when everything it drives is installed."""
    if not (DIST / "index.html").is_file() or not (NODE_MODULES / "playwright-core").is_dir():
        return "the OHIF viewer is not installed; run scripts/setup.sh viewer (or scripts/viewer_setup.sh)"
    for path in (CHROMIUM, ORTHANC_BIN, DICOMWEB_PLUGIN):
        if not path.exists():
            return f"{path} is missing; run scripts/setup.sh viewer"
    if shutil.which("node") is None:
        return "node is missing; run scripts/setup.sh viewer"
    return None


def app_config() -> bytes:
    """OHIF's runtime configuration: one DICOMweb source at this origin's /dicom-web."""
    config = {
        "routerBasename": "/",
        "showStudyList": True,
        "extensions": [],
        "modes": [],
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "orthanc",
            "configuration": {
                "friendlyName": "dicomnode test Orthanc",
                "name": "orthanc",
                "qidoRoot": "/dicom-web",
                "wadoRoot": "/dicom-web",
                "wadoUriRoot": "/wado",
                # Orthanc's QIDO ignores includefield=all and answers fuzzy matching literally.
                "qidoSupportsIncludeField": False,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "omitQuotationForMultipartRequest": True,
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            },
        }],
    }
    return f"window.config = {json.dumps(config, indent=1)};\n".encode()


class ViewerSite:
    """OHIF's static site plus a /dicom-web proxy to Orthanc, on a free 127.0.0.1 port."""

    def __init__(self, orthanc_http_port: int, dist: Path = DIST) -> None:
        self.port = free_port()
        self.failed_requests: list[dict[str, Any]] = []
        handler = _handler(dist, orthanc_http_port, self.failed_requests)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-site", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ViewerSite":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(dist: Path, orthanc_port: int, failed: list[dict[str, Any]]) -> type[http.server.BaseHTTPRequestHandler]:
    index = (dist / "index.html").read_bytes()
    config = app_config()
    root = dist.resolve()

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(dist), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def end_headers(self) -> None:
            # Cross-origin isolation gives the viewer's decoders SharedArrayBuffer.
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cache-Control", "no-store")
            super().end_headers()

        def _reply(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn = http.client.HTTPConnection("127.0.0.1", orthanc_port, timeout=120)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except OSError as exc:
                failed.append({"path": self.path, "status": 502, "error": str(exc)})
                self.send_error(502, "Orthanc did not answer")
                return
            finally:
                conn.close()
            if response.status >= 400:
                failed.append({"path": self.path, "status": response.status, "body": data[:300].decode("latin-1")})
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in _HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith(("/dicom-web/", "/wado")):
                return self._proxy()
            if path == "/app-config.js":
                return self._reply(config, "text/javascript")
            if path in ("/sw.js", "/init-service-worker.js"):
                # A throw-away page needs no service worker (it would cache across runs).
                return self._reply(b"", "text/javascript")
            target = (root / path.lstrip("/")).resolve()
            if path != "/" and target.is_relative_to(root) and target.is_file():
                return super().do_GET()
            # Routes such as /viewer belong to the single-page app.
            return self._reply(index, "text/html")

        do_HEAD = do_GET

        def do_POST(self) -> None:
            self._proxy()

    return Handler


def run_browser(job: dict[str, Any], out_dir: Path, timeout: float = 300) -> dict[str, Any]:
    """Run view.mjs on ``job`` (site URL, views); returns its report, also written to out_dir/report.json.

    Chromium runs in its own session so that a timeout stops it with everything it started.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {**job, "outDir": str(out_dir), "chromium": str(CHROMIUM)}
    job_file = out_dir / "job.json"
    job_file.write_text(json.dumps(job, indent=1))
    env = {**os.environ, "VIEWER_NODE_MODULES": str(NODE_MODULES)}
    log = open(out_dir / "browser.log", "wb")
    proc = subprocess.Popen(["node", str(VIEW_SCRIPT), str(job_file)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    started = time.monotonic()
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise TimeoutError(f"the browser did not finish {len(job['views'])} views in {timeout:.0f} s; "
                           f"see {out_dir / 'browser.log'}") from None
    finally:
        log.close()
    report_file = out_dir / "report.json"
    if rc != 0 or not report_file.is_file():
        raise RuntimeError(f"view.mjs exited with {rc}; see {out_dir / 'browser.log'}")
    report = json.loads(report_file.read_text())
    report["seconds"] = round(time.monotonic() - started, 1)
    return report
