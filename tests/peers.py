"""Real DICOM peers for tests: a private Orthanc (the PACS), DCMTK tools, and the node as a process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DCMTK = Path("/usr/bin")
ORTHANC_BIN = Path(os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(os.environ.get("DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
# Debian's DCMTK and Orthanc leave Nagle's algorithm on unless told otherwise (~60 ms per instance).
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout} s")


def storescu(port: int, files: list[Path] | list[str], aet: str = "STORESCU", aec: str = "DICOMNODE",
             extra: list[str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """DCMTK storescu (the Debian binary, not pynetdicom's app of the same name)."""
    cmd = [str(DCMTK / "storescu"), "-aet", aet, "-aec", aec, *(extra or []), "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, env=PEER_ENV, capture_output=True, text=True, timeout=timeout)


# storescu proposes one compressed transfer syntax family per run (it cannot transcode JPEG 2000).
_TS_FLAG = {
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.57": "-xs", "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.5": "-xr",
}


def storescu_each_syntax(port: int, files: list[Path], **kw: Any) -> list[subprocess.CompletedProcess]:
    """Send files in their own transfer syntaxes: one storescu run per compressed syntax family."""
    from pydicom import dcmread

    groups: dict[str, list[Path]] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True, force=True)
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        groups.setdefault(_TS_FLAG.get(ts, ""), []).append(f)
    return [storescu(port, group, extra=["-R", *([flag] if flag else [])], **kw) for flag, group in groups.items()]


def echoscu(port: int, aet: str = "ECHOSCU", aec: str = "DICOMNODE") -> subprocess.CompletedProcess:
    return subprocess.run([str(DCMTK / "echoscu"), "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          env=PEER_ENV, capture_output=True, text=True, timeout=60)


class Orthanc:
    """A private Orthanc on free loopback ports, standing in for the hospital PACS."""

    def __init__(self, workdir: Path, aet: str = "PACS", modalities: dict[str, list[Any]] | None = None,
                 lua_scripts: list[Path] | None = None, dicomweb: bool = False) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicomweb = dicomweb
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.lua_scripts = [str(p) for p in lua_scripts or []]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "Orthanc":
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = {
            "Name": "dicomnode-test-pacs",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "HttpTimeout": 60,
            "StableAge": 1,
            "SaveJobs": False,
            "LuaScripts": self.lua_scripts,
        }
        if self.dicomweb:
            # No "Host": the plugin then writes BulkDataURIs from each request's Host header, so a
            # viewer that reaches Orthanc through a proxy gets URIs that point back at the proxy.
            conf["Plugins"] = [str(DICOMWEB_PLUGIN)]
            conf["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                                "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
        (self.workdir / "orthanc.json").write_text(json.dumps(conf, indent=2))
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([str(ORTHANC_BIN), str(self.workdir / "orthanc.json")], env=PEER_ENV,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.http_port, 60, self.proc)
        wait_port(self.dicom_port, 30, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def upload(self, files: list[Path]) -> list[str]:
        """Store files through the REST API (POST /instances); returns their Orthanc ids."""
        ids = []
        for f in files:
            req = urllib.request.Request(self.url + "/instances", data=Path(f).read_bytes(),
                                         headers={"Content-Type": "application/dicom"}, method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:
                ids.append(json.loads(r.read())["ID"])
        return ids

    def instances(self) -> list[str]:
        return self.get("/instances")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")

    def tags(self, orthanc_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def wait_instances(self, predicate, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Poll until ``predicate(list of simplified tags)`` is true; return the tags."""
        deadline = time.monotonic() + timeout
        tags: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            tags = [dict(self.tags(i), _id=i) for i in self.instances()]
            if predicate(tags):
                return tags
            time.sleep(0.5)
        raise TimeoutError(f"Orthanc did not reach the expected state in {timeout} s; it has {len(tags)} instances")


class NodeProcess:
    """``dicomnode serve`` as a subprocess with its own config, data folder and free port."""

    def __init__(self, workdir: Path, pacs: Orthanc | None = None, rules: list[dict[str, Any]] | None = None,
                 config: dict[str, Any] | None = None, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.config_path = self.workdir / "node.yaml"
        self.rules_path = self.workdir / "rules.yaml"
        cfg: dict[str, Any] = {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": self.port},
            "storage": {"data_dir": "data"},
            "callers": [{"ae_title": "STORESCU", "host": "127.0.0.1", "destination": "pacs"},
                        {"ae_title": "PACS", "host": "127.0.0.1", "destination": "pacs"}],
            "destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}} if pacs else {},
            "rules_file": "rules.yaml",
            "analyzers": {"device": "cpu"},
            "assembly": {"stable_after": 2, "sweep_interval": 0.25},
            "sender": {"backoff_initial": 1, "backoff_max": 2, "poll_interval": 0.25},
            "logging": {"level": "INFO", "format": "json"},
        }
        for section, values in (config or {}).items():
            if isinstance(values, dict) and isinstance(cfg.get(section), dict):
                cfg[section] = {**cfg[section], **values}
            else:
                cfg[section] = values
        if not pacs:
            cfg["callers"] = [{k: v for k, v in c.items() if k != "destination"} for c in cfg["callers"]]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if rules is not None:
            self.rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "node.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def start(self, timeout: float = 60) -> "NodeProcess":
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONPATH": str(REPO), "DICOMNODE_ORT_THREADS": "1"}
        self.proc = subprocess.Popen([str(VENV_BIN / "dicomnode"), "serve", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_port(self.port, timeout, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        elif sig == signal.SIGKILL:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker process too, whatever happened
        rc = self.proc.returncode
        self.proc = None
        return rc

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "dicomnode"), *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    events.append(obj)
        return events

    def wait_for(self, predicate, timeout: float = 120.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode} while waiting for {what}; log tail:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.25)
        raise TimeoutError(f"timed out waiting for {what}; node log tail:\n" + self.log_path.read_text(errors="replace")[-3000:])


def have_peers() -> bool:
    return ORTHANC_BIN.exists() and (DCMTK / "storescu").exists() and shutil.which("dciodvfy") is not None
