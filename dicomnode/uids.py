"""UIDs: the project's UID root, making new and reproducible UIDs, and the SOP classes the node reads and writes."""

from __future__ import annotations

from pydicom.uid import generate_uid

UID_PREFIX = "1.2.826.0.1.3680043.10.1137."
"""Root of every UID the project makes (pydicom's generate_uid prefix + a project arc keeps them valid)."""

# Source images (phantoms are written as these)
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"

# Result objects
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = SC_IMAGE
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


def new_uid(*entropy: object) -> str:
    """A new UID under the project's root; derived from ``entropy`` when given (the same parts give the same UID)."""
    if entropy:
        return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(e) for e in entropy])
    return generate_uid(prefix=UID_PREFIX)


def stable_uid(*parts: object) -> str:
    """A UID that is the same every time for the same parts (under the project's root)."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])
