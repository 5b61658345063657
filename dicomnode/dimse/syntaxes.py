"""The UIDs an association negotiates: application context, Verification, and transfer syntaxes (PS3.5 annex A)."""

from __future__ import annotations

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")


def is_standard_transfer_syntax(uid: str) -> bool:
    """True for transfer syntaxes in the standard's UID branch; private ones would be unreadable later."""
    return uid == IMPLICIT_VR_LE or uid.startswith(IMPLICIT_VR_LE + ".")
