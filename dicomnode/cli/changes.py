"""Which commands change the node: each one that succeeds leaves an ``admin_change`` audit event with the user."""

from __future__ import annotations

import argparse

CHANGES = {
    "rules": {"add", "remove", "enable", "disable", "move"},
    "destinations": {"add", "remove"},
    "callers": {"add", "remove"},
    "jobs": {"retry"},
    "outbox": {"resend"},
    "studies": {"reprocess", "purge"},
}
# the argument that names what was changed, per command (the first one present)
_TARGETS = ("name", "ae_title", "ids", "study_uid", "older_than", "failed")


def audit_change(args: argparse.Namespace) -> None:
    """Record a successful change (never a listing, a test or a dry run) in the audit trail."""
    verb = getattr(args, "verb", None)
    if verb not in CHANGES.get(getattr(args, "command", None) or "", ()) or getattr(args, "dry_run", False):
        return
    from ..audit import admin_change
    from .common import config_of

    target = next((getattr(args, k) for k in _TARGETS if getattr(args, k, None) not in (None, [], False)), "")
    if isinstance(target, list):
        target = ",".join(map(str, target))
    elif target is True:
        target = "every failed row"
    admin_change(config_of(args), f"{args.command} {verb}", str(target))
