"""Spool files plus the SQLite index of studies, series, instances, jobs and the outbox.

The spool is ``<data>/spool/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``. An instance is written to a
temporary file, fsynced and renamed into place before it is indexed, and it is indexed before the
receiver answers success. The index runs in WAL mode with ``synchronous=NORMAL``: a killed process
loses no committed transaction; after a power loss the last commits can be missing, which
:meth:`Store.reconcile` repairs at start-up by indexing spool files the index does not know.

One connection per thread (SQLite connections are not shared), short transactions, busy timeout.
All storage goes through this module so that a server database can replace SQLite.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import mmap
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    calling_ae TEXT, calling_host TEXT,
    first_arrival REAL NOT NULL, last_arrival REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'receiving',
    completed_at REAL,
    study_date TEXT, modalities TEXT,
    n_instances INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT, description TEXT, series_number INTEGER,
    attributes TEXT NOT NULL,
    first_arrival REAL NOT NULL, last_arrival REAL NOT NULL,
    routed_at REAL,
    n_instances INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, transfer_syntax TEXT,
    instance_number INTEGER,
    path TEXT NOT NULL, size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL, analyzer TEXT NOT NULL, rule TEXT,
    destinations TEXT NOT NULL, series_uids TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued', priority INTEGER NOT NULL DEFAULT 2,
    attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL DEFAULT 3,
    not_before REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    worker TEXT, error TEXT, summary TEXT, n_objects INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, priority, not_before);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER, study_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    sop_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, description TEXT,
    path TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, sent_at REAL, last_error TEXT,
    UNIQUE (sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt);
CREATE TABLE IF NOT EXISTS node_status (key TEXT PRIMARY KEY, value TEXT, updated_at REAL);
"""

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Series-level attributes kept in the index for the router (never patient identity).
ROUTING_KEYWORDS = (
    "Modality", "BodyPartExamined", "SeriesDescription", "ImageType", "ViewPosition", "SOPClassUID",
    "Manufacturer", "ManufacturerModelName", "ProtocolName", "StudyDescription", "Laterality",
    "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames", "SliceThickness", "PixelSpacing",
    "ImagerPixelSpacing", "BitsStored", "SeriesNumber", "ScanningSequence", "SequenceName",
    "MRAcquisitionType", "EchoTime", "RepetitionTime", "KVP", "ConvolutionKernel", "PatientPosition",
    "ImageOrientationPatient", "StationName", "InstitutionName", "ContrastBolusAgent", "AcquisitionType",
)


def valid_uid(uid: Any) -> bool:
    return isinstance(uid, str) and 0 < len(uid) <= 64 and bool(_UID.match(uid))


def to_jsonable(value: Any) -> Any:
    """A DICOM element value as plain JSON (multi-values as lists, numbers as numbers)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [to_jsonable(v) for v in value]
    return str(value)


@dataclass
class InstanceRecord:
    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    instance_number: int | None
    path: Path
    size: int
    attributes: dict[str, Any]
    calling_ae: str | None = None
    calling_host: str | None = None
    study_date: str | None = None


class Store:
    """The spool folder and the SQLite index; safe to use from many threads."""

    def __init__(self, data_dir: Path, fsync: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.spool = self.data_dir / "spool"
        self._spool_prefix = f"{self.spool}/"
        self.tmp = self.data_dir / "tmp"
        self.results = self.data_dir / "results"
        for d in (self.spool, self.tmp, self.results):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "index.sqlite"
        self.fsync = fsync
        self._local = threading.local()
        # one writer at a time within the process: SQLite's busy handler would otherwise put
        # concurrent writers (receiver threads) to sleep for milliseconds
        self._write_lock = threading.RLock()
        self.db.executescript(SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- connections ---------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != _pid:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=OFF")
            self._local.conn = conn
            self._local.pid = _pid
        return conn

    def transaction(self) -> "_Transaction":
        """``with store.transaction() as db:``: one write transaction (BEGIN IMMEDIATE), rolled back on an exception."""
        return _Transaction(self.db, self._write_lock)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- files ---------------------------------------------------------------

    def spool_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not valid_uid(uid):
                raise ValueError(f"not a valid UID: {uid!r}")
        return Path(f"{self._spool_prefix}{study_uid}/{series_uid}/{sop_uid}.dcm")

    def write_durably(self, path: Path, chunks: Any) -> int:
        """Write bytes (or an iterable of bytes) to ``path`` so that it survives a crash once this returns.

        A new file is created in place (exclusively) and fsynced: one device flush. The journal
        commit of that fsync carries the new directory entry on ext4 and XFS; folders created here
        are fsynced into their parents. Replacing an existing file goes through a temporary file
        and a rename, so an instance acknowledged before is never left half-overwritten. A crash
        while writing leaves a file that is neither indexed nor acknowledged; :meth:`reconcile`
        moves such files aside at start-up.
        """
        parts = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else list(chunks)
        try:
            fd = self._in_folder(path, lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return self._replace(path, parts)
        try:
            size = _write_all(fd, parts)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return size

    def incoming(self, prefix: bytes, key: Any = None) -> "IncomingFile":
        """A file to receive a large instance into as it arrives; see :class:`IncomingFile`."""
        return IncomingFile(self, prefix, key)

    def _replace(self, path: Path, parts: list[Any]) -> int:
        tmp_name = self.tmp / f"{path.name}.{os.getpid()}.{threading.get_ident()}.part"
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            size = _write_all(fd, parts)
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp_name, path)
            if self.fsync:
                _fsync_dir(path.parent)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            tmp_name.unlink(missing_ok=True)
            raise
        return size

    def _in_folder(self, path: Path, create: Any) -> Any:
        """``create()``, which makes ``path``; when its folder is missing (the first instance of a series), make it and retry.

        Trying first spares the receiver a lookup per instance: the folder usually exists.
        """
        try:
            return create()
        except FileNotFoundError:
            self._make_dirs(path.parent)
            return create()

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` and missing parents, each fsynced into its parent when the store is durable."""
        missing = []
        d = folder
        while not d.exists():
            missing.append(d)
            d = d.parent
        folder.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for d in reversed(missing):
                _fsync_dir(d.parent)

    # -- receiving -----------------------------------------------------------

    def index_instance(self, rec: InstanceRecord, now: float | None = None) -> None:
        """Record an instance already in the spool; a re-sent instance replaces its row.

        Runs once per received instance, before the receiver answers: the series and study rows
        are updated in place, and only the first instance of a series or study inserts its row
        (with the series' routing attributes as JSON).
        """
        now = now or time.time()
        with self.transaction() as db:
            new = 0 if db.execute("SELECT 1 FROM instances WHERE sop_uid=?", (rec.sop_uid,)).fetchone() else 1
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
                (rec.sop_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid, rec.transfer_syntax,
                 rec.instance_number, str(rec.path), rec.size, now),
            )
            if not db.execute("UPDATE series SET last_arrival=?, n_instances=n_instances+? WHERE series_uid=?",
                              (now, new, rec.series_uid)).rowcount:
                attrs = rec.attributes
                db.execute(
                    """INSERT INTO series (series_uid, study_uid, modality, description, series_number, attributes,
                           first_arrival, last_arrival, n_instances) VALUES (?,?,?,?,?,?,?,?,1)""",
                    (rec.series_uid, rec.study_uid, attrs.get("Modality"), attrs.get("SeriesDescription"),
                     _int(attrs.get("SeriesNumber")), json.dumps(attrs, separators=(",", ":")), now, now),
                )
            if not db.execute(
                    """UPDATE studies SET last_arrival=?, state='receiving', calling_ae=COALESCE(?, calling_ae),
                           calling_host=COALESCE(?, calling_host), n_instances=n_instances+? WHERE study_uid=?""",
                    (now, rec.calling_ae, rec.calling_host, new, rec.study_uid)).rowcount:
                db.execute(
                    """INSERT INTO studies (study_uid, calling_ae, calling_host, first_arrival, last_arrival, state,
                           study_date, modalities, n_instances) VALUES (?,?,?,?,?,'receiving',?,?,1)""",
                    (rec.study_uid, rec.calling_ae, rec.calling_host, now, now, rec.study_date,
                     rec.attributes.get("Modality")),
                )

    # -- queries -------------------------------------------------------------

    def studies(self, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            """SELECT s.*, (SELECT COUNT(*) FROM series WHERE study_uid=s.study_uid) AS n_series,
                      (SELECT GROUP_CONCAT(DISTINCT modality) FROM series WHERE study_uid=s.study_uid) AS mods
               FROM studies s ORDER BY last_arrival DESC LIMIT ?""",
            (limit,),
        ).fetchall()
        return [dict(r) for r in rows]

    def study(self, study_uid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return dict(row) if row else None

    def series_of(self, study_uid: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM series WHERE study_uid=? ORDER BY series_number, first_arrival", (study_uid,))
        out = []
        for r in rows:
            d = dict(r)
            d["attributes"] = json.loads(d["attributes"])
            out.append(d)
        return out

    def instances_of_series(self, series_uid: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM instances WHERE series_uid=? ORDER BY instance_number IS NULL, instance_number, received_at",
            (series_uid,),
        )
        return [dict(r) for r in rows]

    def load_study(self, study_uid: str, series_uids: list[str] | None = None):
        """The study as the analyzers see it (``analyzers.base.Study``), from the index."""
        from .analysis import Instance, Series, Study

        series = []
        for s in self.series_of(study_uid):
            if series_uids is not None and s["series_uid"] not in series_uids:
                continue
            insts = [
                Instance(Path(i["path"]), i["sop_uid"], i["sop_class_uid"], i["instance_number"])
                for i in self.instances_of_series(s["series_uid"])
            ]
            if insts:
                series.append(Series(s["series_uid"], s["modality"] or "", insts, s["description"] or "", s["attributes"]))
        return Study(study_uid, series)

    def set_status(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO node_status VALUES (?,?,?)", (key, json.dumps(value), time.time())
        )

    def get_status(self) -> dict[str, Any]:
        return {r["key"]: {"value": json.loads(r["value"]), "updated_at": r["updated_at"]}
                for r in self.db.execute("SELECT * FROM node_status")}

    # -- recovery ------------------------------------------------------------

    def reconcile(self, parse) -> int:
        """Index spool files that the index lacks; move damaged ones (cut off mid-write) aside.

        ``parse(path)`` returns an :class:`InstanceRecord`, or None for a file that is not a whole
        instance. Returns the number of files indexed.
        """
        known = {r[0] for r in self.db.execute("SELECT path FROM instances")}
        added = 0
        for path in self.spool.glob("*/*/*.dcm"):
            if str(path) in known:
                continue
            rec = parse(path)
            if rec is None:
                quarantine = self.data_dir / "quarantine"
                quarantine.mkdir(exist_ok=True)
                os.replace(path, quarantine / path.name)
                continue
            self.index_instance(rec, now=path.stat().st_mtime)
            added += 1
        for stale in self.tmp.iterdir():
            stale.unlink(missing_ok=True)
        return added


_WRITEBACK_STEP = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2
_names = itertools.count()

# This process's id, kept current across fork: a connection opened before a fork is never used after it.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _writeback_starter() -> Any:
    """Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing a range to the device, without waiting."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_start_writeback = _writeback_starter()


class IncomingFile:
    """A large instance written to disk while it is still arriving.

    A multi-megabyte image would otherwise be held in memory until its last fragment and then
    written and flushed while the sender waits; here each fragment goes to a file in ``tmp/`` as
    it arrives and the kernel is asked to start writing it to the device at once, so receiving
    and flushing overlap and the final fsync has little left to do. :meth:`commit` makes the
    file durable and renames it into the spool; :meth:`close` (always called) removes a file that
    was not committed. ``prefix`` is the Part 10 header written before the data set; ``key``
    records what it was built from, so the receiver adopts the file only when the data set agrees.
    """

    def __init__(self, store: "Store", prefix: bytes, key: Any = None) -> None:
        self.store = store
        self.key = key
        self.offset = len(prefix)
        self.path = store.tmp / f"incoming.{os.getpid()}.{threading.get_ident()}.{next(_names)}.part"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.size = 0
        self._flushed = 0
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self.committed = False
        try:
            self.write(prefix)
        except BaseException:  # e.g. disk full: no descriptor or empty file may outlive the failure
            self.close()
            raise

    def write(self, data: Any) -> None:
        self.size += _write_all(self.fd, [data])
        if self.store.fsync and _start_writeback is not None and self.size - self._flushed >= _WRITEBACK_STEP:
            _start_writeback(self.fd, self._flushed, self.size - self._flushed, _SYNC_FILE_RANGE_WRITE)
            self._flushed = self.size

    def dataset(self) -> memoryview:
        """The data set received so far (after the prefix), mapped from the file."""
        if self._view is None:
            self._map = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
            self._view = memoryview(self._map)[self.offset:]
        return self._view

    def commit(self, path: Path) -> int:
        """Flush the file and rename it to ``path`` in the spool; returns its size."""
        if self.store.fsync:
            os.fsync(self.fd)
        self.store._in_folder(path, lambda: os.replace(self.path, path))
        self.committed = True
        if self.store.fsync:
            _fsync_dir(path.parent)
        return self.size

    def close(self) -> None:
        """Release the file; one that was not committed is removed."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a slice of the view is still referenced; the map goes with it
                pass
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed:
            self.path.unlink(missing_ok=True)


class _Transaction:
    """A write transaction on one connection, serialised within the process (see :meth:`Store.transaction`)."""

    __slots__ = ("db", "lock")

    def __init__(self, db: sqlite3.Connection, lock: Any) -> None:
        self.db = db
        self.lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            else:
                self._rollback()
        finally:
            self.lock.release()

    def _rollback(self) -> None:
        if self.db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
            self.db.execute("ROLLBACK")


def _int(v: Any) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _write_all(fd: int, parts: list[Any]) -> int:
    size = 0
    for chunk in parts:
        view = memoryview(chunk)
        while view:
            n = os.write(fd, view)
            view = view[n:]
            size += n
    return size


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
