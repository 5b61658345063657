"""The node's configuration: a typed model loaded from YAML, with errors that name the key and the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path("config/node.yaml")


class ConfigError(Exception):
    """A configuration problem, worded for the person who has to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ae_title(value: str, key: str = "ae_title") -> str:
    value = str(value)
    if not value.strip() or len(value) > 16 or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{key} must be 1-16 characters without backslash or control characters, got {value!r}")
    return value.strip()


class TLSConfig(_Strict):
    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files(self) -> "TLSConfig":
        if self.enabled and (self.cert is None or self.key is None):
            raise ValueError("tls.enabled is true: set tls.cert and tls.key to the PEM certificate and key files")
        if self.require_client_cert and self.ca is None:
            raise ValueError("tls.require_client_cert is true: set tls.ca to the CA bundle that signs client certificates")
        return self


class NodeSection(_Strict):
    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535, description="0 picks a free port")
    max_associations: int = Field(16, ge=1, le=1024)
    max_pdu: int = Field(1 << 20, ge=4096, le=0xFFFFFFFF, description="maximum PDU length we announce")
    receivers: int = Field(1, ge=1, le=32, description="receiver processes sharing the port (SO_REUSEPORT); more use more cores")
    tls: TLSConfig = TLSConfig()
    fsync: bool = True
    extra_sop_classes: list[str] = Field(default_factory=list, description="private storage SOP classes to accept")
    network_timeout: float = Field(60, gt=0)
    manufacturer: str = "dicomnode project"
    institution: str = ""
    device_serial: str = "0"
    series_number_base: int = Field(9000, ge=1, description="result series are numbered from here")

    _check_ae = field_validator("ae_title")(lambda cls, v: _ae_title(v))


class StorageSection(_Strict):
    data_dir: Path = Path("./data")
    retention_days: int = Field(30, ge=0)
    database: str | None = Field(None, description="postgresql://user@host:port/db shared by several nodes; "
                                                    "unset: SQLite in the data folder")
    shared_dir: Path | None = Field(None, description="spool and results on a filesystem every node mounts; "
                                                      "unset: the data folder")

    @field_validator("database")
    @classmethod
    def _database(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("storage.database must be a postgresql://user@host:port/dbname URL, "
                             "or left out for SQLite in the data folder")
        return v


class Caller(_Strict):
    ae_title: str
    host: str | None = None
    destination: str | None = None
    stable_after: float | None = Field(None, ge=0)

    _check_ae = field_validator("ae_title")(lambda cls, v: _ae_title(v))


class Destination(_Strict):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False

    _check_ae = field_validator("ae_title")(lambda cls, v: _ae_title(v))


class ModelOverride(_Strict):
    registry: Path = Field(description="path of a model.json registry entry (name, version, file, sha256)")


class AnalyzerOptions(_Strict):
    enabled: bool = True
    models: dict[str, Path] = Field(default_factory=dict, description="model name -> model.json registry file")
    options: dict[str, Any] = Field(default_factory=dict)


class AnalyzersSection(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(1, ge=1, le=16)
    max_attempts: int = Field(3, ge=1, le=20)
    retry_delay: float = Field(10, ge=0, description="first retry of a failed job after this many seconds, doubling")
    job_timeout: float = Field(900, gt=0)
    lease: float = Field(30, gt=0, description="a running job's claim lasts this many seconds unless its worker renews "
                                               "it; after that another node runs the job again")
    batch_size: int = Field(8, ge=1, le=64, description="at most this many queued jobs of one batchable analyzer run together; 1 turns batching off")
    plugins: list[str] = Field(default_factory=list, description="extra analyzers as 'module:Class'")
    settings: dict[str, AnalyzerOptions] = Field(default_factory=dict)


class AssemblySection(_Strict):
    stable_after: float = Field(30, ge=0)
    force_after: float = Field(3600, gt=0, description="process a study that never went quiet after this many seconds")
    sweep_interval: float = Field(1.0, gt=0)


class SenderSection(_Strict):
    max_attempts: int = Field(10, ge=1)
    backoff_initial: float = Field(5, gt=0)
    backoff_max: float = Field(600, gt=0)
    poll_interval: float = Field(1.0, gt=0)
    ae_title: str | None = None
    claim: float = Field(300, gt=0, description="with a shared database, result rows a sender took stay its own this "
                                                "many seconds; a node that died sending leaves them to others after that")


class MetricsSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 turns the listener off")
    min_free_mb: float = Field(1024, ge=0, description="/readyz fails when the data folder's disk has less free space")

    @property
    def enabled(self) -> bool:
        return self.port != 0


class SyslogTarget(_Strict):
    host: str
    port: int = Field(514, ge=1, le=65535)
    protocol: Literal["udp", "tcp"] = "udp"


class AuditSection(_Strict):
    file: Path = Field(Path("audit.log"), description="relative to storage.data_dir")
    max_bytes: int = Field(10 << 20, ge=4096, description="rotate the audit file at this size")
    backups: int = Field(10, ge=1, le=1000, description="rotated files kept (audit.log.1 ...)")
    syslog: SyslogTarget | None = Field(None, description="also send DICOM PS3.15 audit messages as RFC 5424 syslog")


class Config(_Strict):
    node: NodeSection = NodeSection()
    storage: StorageSection = StorageSection()
    callers: list[Caller] = Field(default_factory=list)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    rules_file: Path = Path("rules.yaml")
    analyzers: AnalyzersSection = AnalyzersSection()
    assembly: AssemblySection = AssemblySection()
    sender: SenderSection = SenderSection()
    metrics: MetricsSection = MetricsSection()
    audit: AuditSection = AuditSection()
    logging: dict[str, Any] = Field(default_factory=lambda: {"level": "INFO", "format": "json"})

    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _references(self) -> "Config":
        for i, caller in enumerate(self.callers):
            if caller.destination is not None and caller.destination not in self.destinations:
                raise ValueError(
                    f"callers[{i}].destination: {caller.destination!r} is not a configured destination; "
                    + (f"use one of {', '.join(sorted(self.destinations))} or add it under destinations:" if self.destinations
                       else "add it under destinations: (name: {ae_title, host, port})")
                )
        if self.metrics.enabled and self.metrics.port == self.node.port:
            raise ValueError(f"metrics.port: {self.metrics.port} is also node.port (the DICOM port); choose another, "
                             "e.g. 9110, or 0 to turn the metrics listener off")
        return self

    # -- resolved paths ------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, p: Path) -> Path:
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.storage.data_dir)

    @property
    def shared_dir(self) -> Path | None:
        return self.resolve(self.storage.shared_dir) if self.storage.shared_dir is not None else None

    @property
    def rules_path(self) -> Path:
        return self.resolve(self.rules_file)

    @property
    def audit_path(self) -> Path:
        p = Path(os.path.expanduser(str(self.audit.file)))
        return p if p.is_absolute() else self.data_dir / p

    @property
    def db_path(self) -> Path:
        return self.data_dir / "index.sqlite"

    def has_data(self) -> bool:
        """Whether a node ran with this configuration (a PostgreSQL database is taken to be there)."""
        return self.storage.database is not None or self.db_path.exists()

    def caller(self, ae_title: str, host: str | None) -> Caller | None:
        for c in self.callers:
            if c.ae_title == ae_title.strip() and (c.host is None or c.host == host):
                return c
        return None


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against config/node.yaml's documented keys"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")
    return "\n".join(lines)


def config_path(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("DICOMNODE_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a configuration file.

    Raises
    ------
    ConfigError
        With one line per problem, each naming the key and what to do.
    """
    p = config_path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file {p} does not exist; pass --config PATH or set DICOMNODE_CONFIG")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (node:, storage:, ...)")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(p))) from None
    cfg.path = p.resolve()
    return cfg


def dump_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` back atomically (the CLI edits callers and destinations this way)."""
    data = cfg.model_dump(mode="json", exclude={"path"}, exclude_defaults=False)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
