"""Constants of the dxa_scoliosis analyzer (body parts, curve classes, vertebral levels, the scoliosis cut), importable without torch."""

import numpy as np

PARTS: tuple[str, ...] = ("head", "spine", "pelvis", "pelvic_cavity", "left_leg", "right_leg")
"""The six body parts, in the segmentation network's channel order."""
CURVE_CLASSES = ("0", "1", ">1")
"""Number-of-curves classes of the classifier, in its output order."""
HEAVISIDE_K = 10.0
"""Steepness of the smooth step that turns a scan line's mid-point and thickness into a mask."""

LEVELS: tuple[str, ...] = tuple([f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)])
"""The vertebrae whose midline the Cobb angle is measured on, top to bottom."""

# Relative heights (vertebral body plus the disc below it) from T1 to L5, used to
# turn a fractional position along the T1-L5 midline into a vertebral level.
LEVEL_HEIGHTS = np.array([1.0 + 0.4 * i / 11 for i in range(12)] + [1.5, 1.55, 1.6, 1.6, 1.6])

SCOLIOSIS_COBB_DEG = 10.0
"""Scoliosis is a curve of 10 degrees or more, as in the paper (Taylor et al. 2013)."""
