"""The UIDs an association negotiates: application context, Verification, and transfer syntaxes (PS3.5 annex A)."""

from __future__ import annotations

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")

_JPEG = "1.2.840.10008.1.2.4."
# Every transfer syntax of PS3.6 table A-1 that encodes a data set in DICOM's binary form, retired
# ones included (old modalities still send them). The two JPIP syntaxes are left out: their pixel
# data is a URL the node would have to fetch, so their instances are not whole.
TRANSFER_SYNTAXES = frozenset({
    IMPLICIT_VR_LE, EXPLICIT_VR_LE, "1.2.840.10008.1.2.1.98", "1.2.840.10008.1.2.1.99", EXPLICIT_VR_BE,
    *(_JPEG + str(n) for n in range(50, 67)), _JPEG + "70", _JPEG + "80", _JPEG + "81",
    *(_JPEG + str(n) for n in (90, 91, 92, 93)),
    *(_JPEG + str(n) for n in range(100, 107)), *(_JPEG + f"{n}.1" for n in range(100, 107)),
    _JPEG + "107", _JPEG + "108", _JPEG + "110", _JPEG + "111", _JPEG + "112",
    *(_JPEG + str(n) for n in range(201, 206)),
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.7.1", "1.2.840.10008.1.2.7.2", "1.2.840.10008.1.2.7.3",
})


def is_known_transfer_syntax(uid: str) -> bool:
    """True for the standard's binary transfer syntaxes; a made-up or private one would leave an unreadable file."""
    return uid in TRANSFER_SYNTAXES
