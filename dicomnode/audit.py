"""Audit trail: one structured event per received study, analysis, delivered object and admin change.

Events are JSON lines in their own file (``audit.file``, in the data folder by default), rotated
at ``audit.max_bytes``. Several processes append to it (the service, the worker, the CLI): each
event is one ``write`` on a file opened for appending under an exclusive ``flock``, and whoever
finds the file full rotates it under that lock; a writer that opened the file just before it was
rotated notices the changed inode and reopens.

Events carry UIDs, AE titles, hosts, counts, names of rules, analyzers and models, and the user
behind an admin change — never patient names, IDs or birth dates. With ``audit.syslog`` each event
is also sent as an RFC 5424 syslog message whose body is a DICOM PS3.15 (IHE ATNA) audit message:

=================== ========================================== ===================================
event               audit message (EventID)                    EventActionCode / EventTypeCode
=================== ========================================== ===================================
study_received      DICOM Instances Transferred (DCM 110104)   C: the node now holds the instances
analysis            DICOM Instances Accessed (DCM 110103)      C when result objects were made, else R
object_delivered    DICOM Instances Transferred (DCM 110104)   R: the node sent a copy it holds
admin_change        Security Alert (DCM 110113)                Software Configuration (DCM 110131)
node_started/stopped Application Activity (DCM 110100)         Application Start / Stop (110120/110121)
=================== ========================================== ===================================

PS3.15 asks for the patient as a participant object of the transfer messages; it is left out on
purpose (no patient identifiers leave the node's index), and the Study Instance UID joins an audit
repository's messages to the patient there.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import structlog

from .config import Config, SyslogTarget
from .logs import PHI_KEYS

log = structlog.get_logger("dicomnode.audit")

EVENTS = ("study_received", "analysis", "object_delivered", "admin_change", "node_started", "node_stopped")


def current_user() -> str:
    """Who runs an admin command: the login behind sudo when there is one, else the process's user."""
    import getpass

    return os.environ.get("SUDO_USER") or getpass.getuser()


class AuditTrail:
    def __init__(self, path: Path, max_bytes: int, backups: int, syslog: SyslogTarget | None = None,
                 source_id: str = "DICOMNODE") -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.source_id = source_id
        self.syslog = _Syslog(syslog, source_id) if syslog is not None else None
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, outcome: str = "success", **fields: Any) -> dict[str, Any]:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        leaked = PHI_KEYS.intersection(fields)
        if leaked:
            raise ValueError(f"audit events carry no patient identity; drop {', '.join(sorted(leaked))}")
        entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "event": event,
                 "outcome": outcome, "source": self.source_id, **fields}
        self._append((json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode())
        if self.syslog is not None:
            self.syslog.send(entry)
        return entry

    def _append(self, line: bytes) -> None:
        with self._lock:
            while True:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if not _same_file(fd, self.path):
                        continue  # rotated between our open and our lock
                    size = os.fstat(fd).st_size
                    if size and size + len(line) > self.max_bytes:
                        self._rotate()
                        continue
                    os.write(fd, line)
                    return
                finally:
                    os.close(fd)  # also releases the lock

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


_trail: AuditTrail | None = None


def init(cfg: Config) -> AuditTrail:
    """The audit trail of this process (every process of a node appends to the same file)."""
    global _trail
    _trail = AuditTrail(cfg.audit_path, cfg.audit.max_bytes, cfg.audit.backups, cfg.audit.syslog, cfg.node.ae_title)
    return _trail


def record(event: str, outcome: str = "success", **fields: Any) -> None:
    """Record an event when this process has an audit trail; a failure to write is logged, never raised."""
    if _trail is None:
        return
    try:
        _trail.record(event, outcome, **fields)
    except Exception as exc:
        log.error("audit_write_failed", audit_event=event, file=str(_trail.path), error=f"{type(exc).__name__}: {exc}")


def admin_change(cfg: Config, action: str, target: str, **fields: Any) -> None:
    """An administrator changed the node (``rules add``, ``outbox resend``, ...): who, what, on which object."""
    if _trail is None:
        init(cfg)
    record("admin_change", action=action, target=target, user=current_user(), **fields)


def study_received(index: Any, study_uid: str, **fields: Any) -> None:
    """The study_received event: who sent it from where, and how many instances of which SOP classes."""
    if _trail is None:
        return
    study = index.study(study_uid) or {}
    classes = index.sop_classes_of(study_uid)
    record("study_received", study_uid=study_uid, calling_ae=study.get("calling_ae"), host=study.get("calling_host"),
           series=len(index.series_of(study_uid)), instances=sum(classes.values()), sop_classes=classes, **fields)


# -- RFC 5424 syslog carrying DICOM PS3.15 audit messages ------------------------------------

_FACILITY_AUTHPRIV = 10  # security/authorization messages, as IHE ATNA asks
_SEVERITY = {"success": 5, "minor_failure": 4, "failure": 3}  # notice, warning, error
_OUTCOME = {"success": "0", "minor_failure": "4", "failure": "8"}


class _Syslog:
    def __init__(self, target: SyslogTarget, source_id: str) -> None:
        self.target = target
        self.source_id = source_id
        self.hostname = socket.gethostname() or "-"
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, entry: dict[str, Any]) -> None:
        msg = syslog_message(entry, self.hostname)
        with self._lock:
            if self.target.protocol == "udp":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(msg, (self.target.host, self.target.port))
                return
            frame = str(len(msg)).encode() + b" " + msg  # octet counting (RFC 6587 3.4.1), as RFC 5425 uses
            for attempt in (1, 2):  # one reconnect when the collector dropped the connection
                try:
                    if self._sock is None:
                        self._sock = socket.create_connection((self.target.host, self.target.port), timeout=5)
                    self._sock.sendall(frame)
                    return
                except OSError:
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                    if attempt == 2:
                        raise


def syslog_message(entry: dict[str, Any], hostname: str = "-") -> bytes:
    """An RFC 5424 message (APP-NAME dicomnode, MSGID ``DICOM+RFC3881``) whose body is the audit XML."""
    pri = _FACILITY_AUTHPRIV * 8 + _SEVERITY.get(entry["outcome"], 3)
    header = f"<{pri}>1 {entry['time']} {hostname} dicomnode {os.getpid()} DICOM+RFC3881 - "
    return header.encode() + b"\xef\xbb\xbf" + atna_xml(entry).encode()


def _code(tag: str, code: str, meaning: str, system: str = "DCM") -> str:
    return f'<{tag} csd-code="{code}" codeSystemName="{system}" originalText={quoteattr(meaning)}/>'


def _participant(user: str, requestor: bool, role: tuple[str, str] | None, host: str | None = None) -> str:
    attrs = f"UserID={quoteattr(user)} UserIsRequestor=\"{str(requestor).lower()}\""
    if host:
        attrs += f" NetworkAccessPointID={quoteattr(host)} NetworkAccessPointTypeCode=\"2\""
    inner = _code("RoleIDCode", *role) if role else ""
    return f"<ActiveParticipant {attrs}>{inner}</ActiveParticipant>"


def _study(study_uid: str, sop_classes: dict[str, int] | None = None, instance: tuple[str, str] | None = None,
           details: dict[str, str] | None = None) -> str:
    inner = _code("ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
    for key, value in (details or {}).items():
        inner += f"<ParticipantObjectDetail type={quoteattr(key)} value=\"{base64.b64encode(value.encode()).decode()}\"/>"
    for uid, n in (sop_classes or {}).items():
        inner += f"<SOPClass UID={quoteattr(uid)} NumberOfInstances=\"{n}\"/>"
    if instance is not None:
        sop_class, sop_uid = instance
        inner += f"<SOPClass UID={quoteattr(sop_class)} NumberOfInstances=\"1\"><Instance UID={quoteattr(sop_uid)}/></SOPClass>"
    return (f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(study_uid)} ParticipantObjectTypeCode=\"2\" "
            f"ParticipantObjectTypeCodeRole=\"3\">{inner}</ParticipantObjectIdentification>")


def atna_xml(entry: dict[str, Any]) -> str:
    """The DICOM PS3.15 A.5 audit message for one audit event (mapping in the module docstring)."""
    event, node = entry["event"], entry.get("source", "DICOMNODE")
    source_role, dest_role = ("110153", "Source Role ID"), ("110152", "Destination Role ID")
    type_code = ""
    if event == "study_received":
        event_id, action = ("110104", "DICOM Instances Transferred"), "C"
        parts = [_participant(entry.get("calling_ae", ""), True, source_role, entry.get("host")),
                 _participant(node, False, dest_role)]
        objects = [_study(entry["study_uid"], entry.get("sop_classes"))]
    elif event == "analysis":
        event_id, action = ("110103", "DICOM Instances Accessed"), "C" if entry.get("objects") else "R"
        parts = [_participant(f"{node}/{entry.get('analyzer', '')}", True, ("110150", "Application"))]
        details = {"rule": str(entry.get("rule") or ""), "analyzer": f"{entry.get('analyzer')} {entry.get('analyzer_version')}"}
        for m in entry.get("models") or []:
            details[f"model:{m.get('name')}"] = f"{m.get('version')} sha256:{m.get('sha256')}"
        objects = [_study(entry["study_uid"], details=details)]
    elif event == "object_delivered":
        event_id, action = ("110104", "DICOM Instances Transferred"), "R"
        parts = [_participant(node, True, source_role),
                 _participant(entry.get("destination_ae", entry.get("destination", "")), False, dest_role,
                              entry.get("destination_host"))]
        objects = [_study(entry["study_uid"], instance=(entry.get("sop_class_uid", ""), entry["sop_uid"]))]
    elif event == "admin_change":
        event_id, action = ("110113", "Security Alert"), "E"
        type_code = _code("EventTypeCode", "110131", "Software Configuration")
        parts = [_participant(entry.get("user", ""), True, None), _participant(node, False, ("110150", "Application"))]
        what = f"{entry.get('action', '')} {entry.get('target', '')}".strip()
        objects = [f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(what)} ParticipantObjectTypeCode=\"2\" "
                   f"ParticipantObjectTypeCodeRole=\"13\">{_code('ParticipantObjectIDTypeCode', '110182', 'Node ID')}"
                   "</ParticipantObjectIdentification>"]
    else:  # node_started / node_stopped
        event_id, action = ("110100", "Application Activity"), "E"
        type_code = _code("EventTypeCode", *(("110120", "Application Start") if event == "node_started"
                                             else ("110121", "Application Stop")))
        parts = [_participant(node, False, ("110150", "Application"))]
        objects = []
    ident = (f"<EventIdentification EventActionCode=\"{action}\" EventDateTime={quoteattr(entry['time'])} "
             f"EventOutcomeIndicator=\"{_OUTCOME.get(entry['outcome'], '8')}\">{_code('EventID', *event_id)}{type_code}"
             "</EventIdentification>")
    source = (f"<AuditSourceIdentification AuditSourceID={quoteattr(node)}>"
              f"{_code('AuditSourceTypeCode', '4', 'Application Server process tier', 'DCM')}</AuditSourceIdentification>")
    return f'<?xml version="1.0" encoding="UTF-8"?><AuditMessage>{ident}{"".join(parts)}{source}{"".join(objects)}</AuditMessage>'
