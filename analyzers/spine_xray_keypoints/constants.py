"""Constants of the spine_xray_keypoints analyzer (vertebral levels, keypoints per vertebra), importable without torch."""

N_POINTS_PER_VERTEBRA = 5
POINT_KEYS = ("anterior_superior_corner", "posterior_superior_corner", "posterior_inferior_corner", "anterior_inferior_corner", "spinous_process")
"""The five keypoints of a vertebra, in the networks' output order."""
CERVICAL = ("C3", "C4", "C5", "C6", "C7")
LUMBAR = ("L1", "L2", "L3", "L4", "L5")
LEVELS = {"cervical": CERVICAL, "lumbar": LUMBAR}
