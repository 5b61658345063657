"""Names, levels and grading thresholds of ct_vertebral_fracture, shared by every module (torch-free)."""

from __future__ import annotations

NAME = "ct_vertebral_fracture"
DETECTOR = "ct_vertebra_detector"
CLASSIFIER = "ct_fracture_classifier"

LEVELS = tuple([f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)])
"""The levels the analyzer reports (cervical vertebrae excluded, as in the paper)."""
CONTEXT_LEVELS = ("C3", "C4", "C5", "C6", "C7", *LEVELS)
"""Level indices of the detector's level map: C3 = 0 ... L5 = 21 (S1 = 22 is the sacrum)."""
T1_INDEX = CONTEXT_LEVELS.index("T1")

# Paper: 96^3 patches at 1 mm, HU clipped to [-1000, 1000] and scaled to [0, 1].
PATCH_SIZE = 96
PATCH_SPACING = 1.0
HU_RANGE = (-1000.0, 1000.0)

# Localisation on a sagittal reformat: 2 mm pixels, a slab of +-12 mm around the spine's midline.
REFORMAT_SPACING = 2.0
SLAB_HALF_MM = 12.0
MIN_VERTEBRAE = 4
"""Fewer vertebral bodies than this cannot be labelled by their order along the spine."""

# Genant semi-quantitative grade by height loss (fraction of the expected height).
GENANT_BOUNDS = (0.20, 0.25, 0.40)
FRACTURE_GRADE = 1
"""Genant grade from which a vertebra counts as fractured (the training label)."""

# Nominal vertebral body heights (mm, posterior) by level for an adult of average size; used by the
# phantom and to scale a neighbour's height when the expected height of a vertebra is estimated.
NOMINAL_HEIGHT = {
    "C3": 13.0, "C4": 13.0, "C5": 13.5, "C6": 14.0, "C7": 15.0,
    "T1": 16.0, "T2": 16.6, "T3": 17.2, "T4": 17.8, "T5": 18.4, "T6": 19.0, "T7": 19.6,
    "T8": 20.2, "T9": 20.8, "T10": 21.4, "T11": 22.4, "T12": 23.4,
    "L1": 24.5, "L2": 25.5, "L3": 26.5, "L4": 27.0, "L5": 27.0,
}
HEIGHT_LINE = 0.65
"""Anterior and posterior heights are measured at 65 % of the AP half-depth from the body's centre
(inside the walls, whose cortex would blur into a line on the wall itself)."""
TOP_UNITS = 3
"""Detector units shown (SC) and reported (SR) per vertebra called fractured."""
DISSECTION_QUANTILE = 0.005
"""P(a_k > T_k) over the reference set (Bau et al., as in the paper)."""


def genant_grade(height_loss: float) -> int:
    """Genant grade 0-3 from the height loss fraction: <20 %, 20-25 %, 25-40 %, >=40 %."""
    return sum(height_loss >= b for b in GENANT_BOUNDS)
