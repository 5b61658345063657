"""DIMSE status codes (PS3.7 annex C, PS3.4 B.2.3): one enum for the acceptor, the requestor and the receiver."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """The statuses the node sends; any 16-bit value may come back from a peer."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122            # Refused: SOP class not supported
    UNRECOGNIZED_OPERATION = 0x0211
    OUT_OF_RESOURCES = 0xA700                   # Refused: out of resources
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: data set does not match SOP class
    CANNOT_UNDERSTAND = 0xC000                  # Error: cannot understand
    HANDLER_FAILED = 0xC211                     # a "cannot understand" code; pynetdicom's for a failing handler


def is_kept(status: int | None) -> bool:
    """True for C-STORE statuses that mean the instance was stored: success and the 0xBxxx warnings."""
    return status is not None and (status == Status.SUCCESS or 0xB000 <= status <= 0xBFFF)
