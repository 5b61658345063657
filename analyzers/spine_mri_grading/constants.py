"""Names, levels, gradings and thresholds of the spine_mri_grading analyzer (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

VERTEBRAE = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
"""The labelled chain, top to bottom; S1 is the anchor of the chain model."""
LEVELS = tuple(f"{a}-{b}" for a, b in zip(VERTEBRAE[:-1], VERTEBRAE[1:]))
"""Disc levels T12-L1 ... L5-S1."""


@dataclass(frozen=True)
class Grading:
    """One head of the grading network: its template key, class names and the demo table's column."""

    key: str
    classes: tuple[str, ...]
    column: str

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2


GRADINGS = (
    Grading("pfirrmann_grade", ("1", "2", "3", "4", "5"), "Pfirrmann"),
    Grading("disc_narrowing", ("normal", "slight", "moderate", "severe"), "Narrowing"),
    Grading("upper_endplate_defect", ("absent", "present"), "UpperEndplate"),
    Grading("lower_endplate_defect", ("absent", "present"), "LowerEndplate"),
    Grading("upper_marrow_change", ("absent", "present"), "UpperMarrow"),
    Grading("lower_marrow_change", ("absent", "present"), "LowerMarrow"),
    Grading("spondylolisthesis", ("absent", "present"), "Spondylolisthesis"),
    Grading("central_canal_stenosis", ("absent", "present"), "CentralStenosis"),
)
GRADING_KEYS = tuple(g.key for g in GRADINGS)
N_CLASSES = tuple(len(g.classes) for g in GRADINGS)

# Phantom thresholds: every grade follows from a continuous quantity by these cut points.
PFIRRMANN_CUTS = (1.5, 2.5, 3.5, 4.5)
"""Degeneration score d in [0.5, 5.5]; the grade is the bin of d."""
NARROWING_CUTS = (0.2, 0.4, 0.6)
"""Fractional disc height loss: slight, moderate, severe from these on."""
ENDPLATE_DEFECT_MM = 1.5
"""Depth of an endplate notch from which it counts as a defect."""
MARROW_CHANGE_MM = 3.0
"""Thickness of a marrow signal band beside the endplate from which it counts as a change."""
SLIP_FRACTION = 0.1
"""Anterior slip of the upper vertebra, as a fraction of the endplate depth, from which it is spondylolisthesis."""
STENOSIS_FRACTION = 0.5
"""Loss of canal depth at the disc from which it counts as central canal stenosis."""

# Disc volumes (the thesis: 9 slices of 112 x 224; the bundled weights use a smaller grid).
DISC_SLICES = 9
DISC_SHAPE = (48, 96)
"""Rows x columns of each disc volume slice; 1:2 as in the thesis."""
DISC_WIDTH_DEPTHS = 2.0
"""The disc volume spans this many endplate depths horizontally (about 40% of each vertebra shows)."""

# Detector input: every slice resampled to this spacing onto a fixed canvas.
DETECTOR_MM = 3.5
DETECTOR_SIZE = 96
DETECTOR_STRIDE = 4
CORNER_SIZE = 48
"""Corner-regression crops (the thesis: 224 x 224), boxes enlarged by 50%."""
CORNER_ENLARGE = 1.5
