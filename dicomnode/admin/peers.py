"""Any DICOM peer tested with the node's own SCU: C-ECHO it, C-STORE files to it.

A peer is a configured destination by name, or given as echoscu and storescu take it: host,
port, the called AE title (``-aec``, default ``ANY-SCP``) and the calling one (``-aet``, default
the node's sender AE title).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import Config, Destination, _ae_title
from ..sender import echo as echo_destination
from ..sender import send_files
from . import AdminError

DEFAULT_CALLED = "ANY-SCP"  # echoscu's and storescu's default


@dataclass
class Peer:
    label: str
    destination: Destination
    cfg: Config  # the node's configuration, with the calling AE title this test uses

    def __str__(self) -> str:
        d = self.destination
        return f"{self.label} ({d.ae_title}@{d.host}:{d.port})" if self.label else f"{d.ae_title}@{d.host}:{d.port}"


def peer(cfg: Config | None, target: list[str], called: str | None = None, calling: str | None = None) -> tuple[Peer, list[str]]:
    """The peer named at the start of ``target`` (a destination name, or HOST PORT) and the rest of ``target``.

    Raises
    ------
    AdminError
        When ``target`` is neither, or the AE titles or port are not valid.
    """
    cfg = cfg or Config()
    if calling is not None:
        cfg = cfg.model_copy(update={"sender": cfg.sender.model_copy(update={"ae_title": _title(calling, "-aet")})})
    if target and target[0] in cfg.destinations and called is None:
        return Peer(target[0], cfg.destinations[target[0]], cfg), target[1:]
    if len(target) < 2 or not target[1].isdigit():
        known = ", ".join(sorted(cfg.destinations)) or "none configured"
        raise AdminError(f"{' '.join(target[:2]) or 'nothing'} is neither a configured destination ({known}) nor HOST PORT; "
                         "give a destination name, or -aec AE HOST PORT as echoscu takes them", 2)
    try:
        dest = Destination(ae_title=_title(called or DEFAULT_CALLED, "-aec"), host=target[0], port=int(target[1]))
    except ValidationError as exc:
        raise AdminError(f"port {target[1]}: {exc.errors()[0]['msg']}", 2) from None
    return Peer("", dest, cfg), target[2:]


def echo(p: Peer) -> tuple[bool, str]:
    """C-ECHO the peer; (ok, one line saying who answered what, or why not)."""
    name = p.label or "peer"
    cfg = p.cfg if p.label else p.cfg.model_copy(update={"destinations": {**p.cfg.destinations, name: p.destination}})
    ok, message = echo_destination(cfg, name)
    return ok, message if p.label else f"{p}: {message.split(': ', 1)[1]}"


def send(p: Peer, files: list[Path]) -> dict[str, Any]:
    """C-STORE ``files`` to the peer on one association; what was stored and, per file, why not."""
    kept, errors, assoc_error = send_files(p.cfg, p.destination, files)
    return {"peer": str(p), "files": len(files), "stored": [str(files[i]) for i in kept],
            "failed": {str(files[i]): why for i, why in sorted(errors.items())}, "association_error": assoc_error}


def _title(value: str, option: str) -> str:
    try:
        return _ae_title(value, option)
    except ValueError as exc:
        raise AdminError(str(exc), 2) from None
