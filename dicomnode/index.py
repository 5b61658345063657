"""The index of what the node has received: the studies, series and instances tables.

The receiver adds one row per instance (:meth:`Index.add`) once its file is in the spool; the
assembler asks which series received instances since they were last routed and marks them
routed; the CLI, the worker and retention read and forget studies through this module only.
Each series keeps the attributes the router needs (:data:`ROUTING_KEYWORDS`, never patient
identity) as JSON. A study's row carries its last arrival: the assembler's quiet time starts there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from .store import Store

OWNER = "index"
log = structlog.get_logger("dicomnode.index")

# One entry per schema version; a database at version n runs entries n and later, in order.
MIGRATIONS = (
    """
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
    """,
)

# Series-level attributes kept in the index for the router (never patient identity).
ROUTING_KEYWORDS = (
    "Modality", "BodyPartExamined", "SeriesDescription", "ImageType", "ViewPosition", "SOPClassUID",
    "Manufacturer", "ManufacturerModelName", "ProtocolName", "StudyDescription", "Laterality",
    "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames", "SliceThickness", "PixelSpacing",
    "ImagerPixelSpacing", "BitsStored", "SeriesNumber", "ScanningSequence", "SequenceName",
    "MRAcquisitionType", "EchoTime", "RepetitionTime", "KVP", "ConvolutionKernel", "PatientPosition",
    "ImageOrientationPatient", "StationName", "InstitutionName", "ContrastBolusAgent", "AcquisitionType",
)


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
    """An instance in the spool, as the receiver hands it to the index."""

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


class Index:
    """Studies, series and instances of one store's database; safe to use from many threads."""

    def __init__(self, store: "Store") -> None:
        self.store = store
        store.migrate(OWNER, MIGRATIONS)

    # -- receiving -----------------------------------------------------------

    def add(self, rec: InstanceRecord, now: float | None = None) -> None:
        """Record an instance already in the spool; a re-sent instance replaces its row.

        Re-sent under another series or study, the newer copy wins: the old file is removed and the
        old series and study count one instance fewer (and go when left empty).

        Runs once per received instance, before the receiver answers: the series and study rows
        are updated in place, and only the first instance of a series or study inserts its row
        (with the series' routing attributes as JSON). Instances of one study arriving at several
        nodes at once meet in one row: an insert that finds the row another node just inserted
        updates it instead.
        """
        now = now or time.time()
        moved = None
        with self.store.transaction() as db:
            old = db.execute("SELECT series_uid, study_uid, path FROM instances WHERE sop_uid=?", (rec.sop_uid,)).fetchone()
            new = 0 if old and old["series_uid"] == rec.series_uid else 1
            new_in_study = 0 if old and old["study_uid"] == rec.study_uid else 1
            if new and old:
                # the same SOP Instance UID under another series or study: the newer copy wins, the old one leaves
                moved = (old["series_uid"], old["study_uid"], old["path"])
                self._forget_one(db, old["series_uid"], old["study_uid"] if new_in_study else None)
            db.execute(
                """INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (sop_uid) DO UPDATE SET
                       series_uid=excluded.series_uid, study_uid=excluded.study_uid, sop_class_uid=excluded.sop_class_uid,
                       transfer_syntax=excluded.transfer_syntax, instance_number=excluded.instance_number,
                       path=excluded.path, size=excluded.size, received_at=excluded.received_at""",
                (rec.sop_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid, rec.transfer_syntax,
                 rec.instance_number, str(rec.path), rec.size, now),
            )
            if not db.execute("UPDATE series SET last_arrival=?, n_instances=n_instances+? WHERE series_uid=?",
                              (now, new, rec.series_uid)).rowcount:
                attrs = rec.attributes
                db.execute(
                    """INSERT INTO series (series_uid, study_uid, modality, description, series_number, attributes,
                           first_arrival, last_arrival, n_instances) VALUES (?,?,?,?,?,?,?,?,1)
                       ON CONFLICT (series_uid) DO UPDATE SET last_arrival=excluded.last_arrival,
                           n_instances=series.n_instances+?""",
                    (rec.series_uid, rec.study_uid, attrs.get("Modality"), attrs.get("SeriesDescription"),
                     _int(attrs.get("SeriesNumber")), json.dumps(attrs, separators=(",", ":")), now, now, new),
                )
            if not db.execute(
                    """UPDATE studies SET last_arrival=?, state='receiving', calling_ae=COALESCE(?, calling_ae),
                           calling_host=COALESCE(?, calling_host), n_instances=n_instances+? WHERE study_uid=?""",
                    (now, rec.calling_ae, rec.calling_host, new_in_study, rec.study_uid)).rowcount:
                db.execute(
                    """INSERT INTO studies (study_uid, calling_ae, calling_host, first_arrival, last_arrival, state,
                           study_date, modalities, n_instances) VALUES (?,?,?,?,?,'receiving',?,?,1)
                       ON CONFLICT (study_uid) DO UPDATE SET last_arrival=excluded.last_arrival, state='receiving',
                           n_instances=studies.n_instances+?""",
                    (rec.study_uid, rec.calling_ae, rec.calling_host, now, now, rec.study_date,
                     rec.attributes.get("Modality"), new),
                )
        if moved:
            if moved[2] != str(rec.path):
                Path(moved[2]).unlink(missing_ok=True)
            log.info("instance_moved", sop_uid=rec.sop_uid, old_series_uid=moved[0], old_study_uid=moved[1],
                     series_uid=rec.series_uid, study_uid=rec.study_uid)

    @staticmethod
    def _forget_one(db: Any, series_uid: str, study_uid: str | None) -> None:
        """One instance fewer in a series and (when given) its study; a series or study left empty goes."""
        db.execute("UPDATE series SET n_instances=n_instances-1 WHERE series_uid=?", (series_uid,))
        db.execute("DELETE FROM series WHERE series_uid=? AND n_instances<=0", (series_uid,))
        if study_uid is None:
            return
        db.execute("UPDATE studies SET n_instances=n_instances-1 WHERE study_uid=?", (study_uid,))
        db.execute("DELETE FROM studies WHERE study_uid=? AND n_instances<=0", (study_uid,))

    def reconcile(self, parse) -> int:
        """Index spool files that the index lacks; move damaged ones (cut off mid-write) aside.

        ``parse(path)`` returns an :class:`InstanceRecord`, or None for a file that is not a whole
        instance. Leftovers in the store's ``tmp/`` (never acknowledged) are removed. Returns the
        number of files indexed.
        """
        known = {r[0] for r in self.store.db.execute("SELECT path FROM instances")}
        added = 0
        for path in self.store.spool_files():
            if str(path) in known:
                continue
            rec = parse(path)
            if rec is None:
                self.store.quarantine(path)
                continue
            indexed = self.store.db.execute("SELECT path FROM instances WHERE sop_uid=?", (rec.sop_uid,)).fetchone()
            if indexed and Path(indexed[0]).is_file():
                # an older copy the node had replaced when a crash stopped it removing the file; the indexed one is newer
                path.unlink(missing_ok=True)
                log.info("stale_copy_removed", sop_uid=rec.sop_uid, study_uid=rec.study_uid, series_uid=rec.series_uid)
                continue
            self.add(rec, now=path.stat().st_mtime)
            added += 1
        self.store.clear_tmp()
        return added

    # -- queries -------------------------------------------------------------

    def studies(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest studies first, each with its number of series and its modalities (``mods``, comma-separated)."""
        db = self.store.db
        rows = [dict(r) for r in db.execute(
            """SELECT s.*, (SELECT COUNT(*) FROM series WHERE study_uid=s.study_uid) AS n_series
               FROM studies s ORDER BY last_arrival DESC LIMIT ?""", (limit,))]
        modalities: dict[str, set[str]] = {}
        for r in db.execute("""SELECT DISTINCT study_uid, modality FROM series WHERE modality IS NOT NULL AND study_uid IN
                                   (SELECT study_uid FROM studies ORDER BY last_arrival DESC LIMIT ?)""", (limit,)):
            modalities.setdefault(r[0], set()).add(r[1])
        for r in rows:
            r["mods"] = ",".join(sorted(modalities.get(r["study_uid"], ()))) or None
        return rows

    def study(self, study_uid: str) -> dict[str, Any] | None:
        row = self.store.db.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return dict(row) if row else None

    def series_of(self, study_uid: str) -> list[dict[str, Any]]:
        rows = self.store.db.execute("SELECT * FROM series WHERE study_uid=? ORDER BY series_number, first_arrival",
                                     (study_uid,))
        return [_series(r) for r in rows]

    def instances_of_series(self, series_uid: str) -> list[dict[str, Any]]:
        rows = self.store.db.execute(
            "SELECT * FROM instances WHERE series_uid=? ORDER BY instance_number IS NULL, instance_number, received_at",
            (series_uid,),
        )
        return [dict(r) for r in rows]

    def first_instance_path(self, series_uid: str) -> str | None:
        """The file of one instance of the series (the router reads instance-level keywords from it)."""
        row = self.store.db.execute("SELECT path FROM instances WHERE series_uid=? LIMIT 1", (series_uid,)).fetchone()
        return row["path"] if row else None

    def load_study(self, study_uid: str, series_uids: list[str] | None = None):
        """The study as the analyzers see it (:class:`dicomnode.analysis.Study`), from the index."""
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

    # -- assembly --------------------------------------------------------------

    def unrouted_series(self) -> list[dict[str, Any]]:
        """Series that received instances since they were last routed (or never were), by study."""
        rows = self.store.db.execute(
            "SELECT * FROM series WHERE routed_at IS NULL OR last_arrival > routed_at ORDER BY study_uid")
        return [_series(r) for r in rows]

    def mark_routed(self, study_uid: str, series_uids: set[str], now: float) -> None:
        """Series routed at ``now`` and the study complete, unless an instance arrived after ``now``."""
        with self.store.transaction() as db:
            db.executemany("UPDATE series SET routed_at=? WHERE series_uid=? AND last_arrival<=?",
                           [(now, uid, now) for uid in series_uids])
            db.execute("UPDATE studies SET state='complete', completed_at=? WHERE study_uid=? AND last_arrival<=?",
                       (now, study_uid, now))

    # -- moving to another database (dicomnode db migrate) --------------------------

    def copy_into(self, db: Any) -> dict[str, int]:
        """Every study, series and instance row into ``db``, another store's transaction; counts by table."""
        return {
            "studies": self.store.copy_rows(db, "SELECT * FROM studies", "INSERT INTO studies", "SELECT 1 FROM studies LIMIT 1"),
            "series": self.store.copy_rows(db, "SELECT * FROM series", "INSERT INTO series", "SELECT 1 FROM series LIMIT 1"),
            "instances": self.store.copy_rows(db, "SELECT * FROM instances", "INSERT INTO instances",
                                              "SELECT 1 FROM instances LIMIT 1"),
        }

    # -- retention: inside the caller's transaction ------------------------------

    def studies_before(self, cutoff: float) -> list[str]:
        """Studies whose last instance arrived before ``cutoff``."""
        return [r[0] for r in self.store.db.execute("SELECT study_uid FROM studies WHERE last_arrival < ?", (cutoff,))]

    def sop_classes_of(self, study_uid: str) -> dict[str, int]:
        """Instances of a study per SOP class (the audit trail's study_received)."""
        return {r[0]: r[1] for r in self.store.db.execute(
            "SELECT sop_class_uid, COUNT(*) FROM instances WHERE study_uid=? GROUP BY sop_class_uid", (study_uid,))}

    @staticmethod
    def study_states(db: Any) -> dict[str, int]:
        return {r[0]: r[1] for r in db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state")}

    @staticmethod
    def completed_at(db: Any, study_uid: str) -> float | None:
        row = db.execute("SELECT completed_at FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return row[0] if row is not None else None

    @staticmethod
    def last_arrival(db: Any, study_uid: str) -> float | None:
        row = db.execute("SELECT last_arrival FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def files_of(db: Any, study_uid: str) -> list[Path]:
        return [Path(r[0]) for r in db.execute("SELECT path FROM instances WHERE study_uid=?", (study_uid,))]

    @staticmethod
    def forget(db: Any, study_uid: str) -> None:
        """Delete the study's rows (its files are the caller's to remove once this commits)."""
        db.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,))
        db.execute("DELETE FROM series WHERE study_uid=?", (study_uid,))
        db.execute("DELETE FROM studies WHERE study_uid=?", (study_uid,))


def _series(row: Any) -> dict[str, Any]:
    d = dict(row)
    d["attributes"] = json.loads(d["attributes"])
    return d


def _int(v: Any) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None
