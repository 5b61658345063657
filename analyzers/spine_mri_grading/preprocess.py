"""Arrays in: a sagittal volume in canonical orientation, detector canvases, corner crops and disc volumes.

Canonical orientation: rows run superior to inferior, columns anterior to
posterior, slices towards the patient's left, square pixels. Every array
position keeps its way back to the source frame (:meth:`Canonical.source_point`)
so regions land on the images the radiologist reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from analyzers.volume import Volume
from dicomnode.analysis import NotApplicable, SourceRef

from .constants import (
    CORNER_ENLARGE,
    CORNER_SIZE,
    DETECTOR_MM,
    DETECTOR_SIZE,
    DISC_SHAPE,
    DISC_SLICES,
    DISC_WIDTH_DEPTHS,
)

MAX_PIXEL_MM = 2.0
"""Coarser in-plane sampling than this cannot show endplates and nuclei."""
MAX_SLICE_MM = 6.0
MIN_SLICES = 5
VERTEBRA_LEVEL = 0.4
"""Disc volumes are scaled so that the median of the vertebral bodies in them is this (thesis: 0.5; lower keeps bright nuclei below 1)."""


@dataclass
class Canonical:
    array: np.ndarray
    """(slices, rows, columns), scaled so that the 99th percentile is 1."""
    pixel_mm: float
    slice_mm: float
    volume: Volume
    transpose: bool
    flip_rows: bool
    flip_cols: bool
    flip_slices: bool
    zoom: tuple[float, float]
    """Source pixels per canonical pixel along (rows, columns) of the canonical grid."""

    def source_point(self, k: float, col: float, row: float) -> tuple[SourceRef, float, float]:
        """The source frame of canonical slice ``k`` and the (column, row) there of a canonical point."""
        n_k = len(self.volume.sources)
        kk = int(np.clip(round(k), 0, n_k - 1))
        if self.flip_slices:
            kk = n_k - 1 - kk
        r, c = row * self.zoom[0], col * self.zoom[1]
        rows, cols = (self.volume.array.shape[2], self.volume.array.shape[1]) if self.transpose else self.volume.array.shape[1:]
        if self.flip_rows:
            r = rows - r
        if self.flip_cols:
            c = cols - c
        if self.transpose:
            r, c = c, r
        return self.volume.sources[kk], float(c), float(r)


def canonical(volume: Volume) -> Canonical:
    """The sagittal volume turned into canonical orientation with square pixels.

    Raises
    ------
    NotApplicable
        When the stack is not sagittal or too coarse to grade discs.
    """
    if volume.plane != "sagittal":
        raise NotApplicable(f"the series is {volume.plane}; this analyzer needs a sagittal lumbar T2 series")
    if volume.array.shape[0] < MIN_SLICES:
        raise NotApplicable(f"the sagittal series has {volume.array.shape[0]} slices; at least {MIN_SLICES} are needed to cover the discs")
    if volume.spacing[0] > MAX_SLICE_MM:
        raise NotApplicable(f"the slices are {volume.spacing[0]:.1f} mm apart; discs need a sagittal series with slices at most {MAX_SLICE_MM:.0f} mm apart")
    if max(volume.spacing[1:]) > MAX_PIXEL_MM:
        raise NotApplicable(f"the pixels are {max(volume.spacing[1:]):.1f} mm; disc grading needs at most {MAX_PIXEL_MM:.0f} mm pixels")
    col_axis, row_axis, normal = volume.direction
    arr = volume.array
    row_mm, col_mm = volume.spacing[1], volume.spacing[2]
    # the in-plane axis closer to the patient's head-foot axis becomes the rows
    transpose = abs(col_axis[2]) > abs(row_axis[2])
    if transpose:
        arr = arr.transpose(0, 2, 1)
        col_axis, row_axis = row_axis, col_axis
        row_mm, col_mm = col_mm, row_mm
    flip_rows = row_axis[2] > 0
    flip_cols = col_axis[1] < 0
    flip_slices = normal[0] < 0
    if flip_rows:
        arr = arr[:, ::-1]
    if flip_cols:
        arr = arr[:, :, ::-1]
    if flip_slices:
        arr = arr[::-1]
    pixel_mm = min(row_mm, col_mm)
    zoom = (pixel_mm / row_mm, pixel_mm / col_mm)
    if abs(row_mm - col_mm) > 0.01 * pixel_mm:
        arr = ndimage.zoom(arr, (1.0, 1.0 / zoom[0], 1.0 / zoom[1]), order=1)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    scale = float(np.percentile(arr, 99.0))
    if not np.isfinite(scale) or scale <= 0:
        raise NotApplicable("the sagittal series has no signal (all pixels equal)")
    return Canonical(arr / scale, float(pixel_mm), float(volume.spacing[0]), volume, transpose, flip_rows, flip_cols, flip_slices, zoom)


# ---------------------------------------------------------------------------
# Detector canvas
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CanvasMap:
    """Canonical pixel = canvas pixel * factor + offset (per axis, column then row)."""

    factor: float
    offset: np.ndarray

    def to_image(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(p, dtype=np.float64) * self.factor + self.offset

    def to_canvas(self, p: np.ndarray) -> np.ndarray:
        return (np.asarray(p, dtype=np.float64) - self.offset) / self.factor


def detector_canvas(img: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, CanvasMap]:
    """A slice resampled to DETECTOR_MM on a DETECTOR_SIZE square, centred; clipped to [0, 1.5]."""
    factor = DETECTOR_MM / pixel_mm
    rows, cols = img.shape
    centre = np.array([cols, rows]) / 2.0
    offset = centre - factor * DETECTOR_SIZE / 2.0
    grid = (np.arange(DETECTOR_SIZE) + 0.5) * factor
    rr = grid[:, None] + offset[1] - 0.5
    cc = grid[None, :] + offset[0] - 0.5
    out = ndimage.map_coordinates(img, [np.broadcast_to(rr, (DETECTOR_SIZE,) * 2), np.broadcast_to(cc, (DETECTOR_SIZE,) * 2)], order=1, cval=0.0)
    return np.clip(out, 0.0, 1.5).astype(np.float32), CanvasMap(float(factor), offset)


# ---------------------------------------------------------------------------
# Rotated crops
# ---------------------------------------------------------------------------


def rotated_crop(img: np.ndarray, centre: np.ndarray, x_axis: np.ndarray, width_px: float, height_px: float, shape: tuple[int, int]) -> np.ndarray:
    """Sample a (rows, cols) = ``shape`` grid over a rectangle centred at ``centre`` (column, row) whose columns run along ``x_axis``."""
    x_axis = np.asarray(x_axis, dtype=np.float64)
    x_axis = x_axis / np.linalg.norm(x_axis)
    y_axis = np.array([-x_axis[1], x_axis[0]])
    if y_axis[1] < 0:  # rows of the crop run downwards in the image
        y_axis = -y_axis
    h, w = shape
    u = ((np.arange(w) + 0.5) / w - 0.5) * width_px
    v = ((np.arange(h) + 0.5) / h - 0.5) * height_px
    pc = centre[0] + u[None, :] * x_axis[0] + v[:, None] * y_axis[0]
    pr = centre[1] + u[None, :] * x_axis[1] + v[:, None] * y_axis[1]
    return ndimage.map_coordinates(img, [pr - 0.5, pc - 0.5], order=1, cval=0.0).astype(np.float32)


def crop_frame(centre: np.ndarray, x_axis: np.ndarray, width_px: float, height_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre and the image vectors of one crop half-width along columns and one half-height along rows."""
    x_axis = np.asarray(x_axis, dtype=np.float64) / np.linalg.norm(x_axis)
    y_axis = np.array([-x_axis[1], x_axis[0]])
    if y_axis[1] < 0:
        y_axis = -y_axis
    return np.asarray(centre, dtype=np.float64), x_axis * width_px / 2, y_axis * height_px / 2


def corner_crop(img: np.ndarray, centre: np.ndarray, angle: float, height_px: float, depth_px: float) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A square crop around a detected box enlarged by CORNER_ENLARGE, rotated with the body; its frame for mapping back."""
    x_axis = np.array([np.cos(angle), -np.sin(angle)])
    side = CORNER_ENLARGE * max(height_px, depth_px)
    frame = crop_frame(centre, x_axis, side, side)
    return rotated_crop(img, centre, x_axis, side, side, (CORNER_SIZE, CORNER_SIZE)), frame


def from_crop(frame: tuple[np.ndarray, np.ndarray, np.ndarray], uv: np.ndarray) -> np.ndarray:
    """Image (column, row) of crop-normalised points (u, v) in [-1, 1]."""
    centre, ex, ey = frame
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    return centre + uv[:, :1] * ex + uv[:, 1:] * ey


def to_crop(frame: tuple[np.ndarray, np.ndarray, np.ndarray], points: np.ndarray) -> np.ndarray:
    centre, ex, ey = frame
    rel = np.asarray(points, dtype=np.float64).reshape(-1, 2) - centre
    return np.stack([rel @ ex / (ex @ ex), rel @ ey / (ey @ ey)], axis=1)


# ---------------------------------------------------------------------------
# Disc volumes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscGeometry:
    """Where a disc volume was taken: centre (column, row), horizontal axis, size in pixels, centre slice."""

    centre: np.ndarray
    x_axis: np.ndarray
    width_px: float
    height_px: float
    slice: int
    endplate_depth_px: float
    height_gap_px: float
    """Distance between the endplates at the disc centre."""
    tilt_deg: float
    """Angle between the two endplates."""


def disc_geometry(upper: np.ndarray, lower: np.ndarray, slice_index: float) -> DiscGeometry:
    """From the corners (AS, PS, PI, AI) of the vertebra above and below, canonical pixels."""
    upper, lower = np.asarray(upper, dtype=np.float64), np.asarray(lower, dtype=np.float64)
    ant = (upper[3] + lower[0]) / 2
    post = (upper[2] + lower[1]) / 2
    centre = (ant + post) / 2
    x_axis = post - ant
    e_up, e_lo = upper[2] - upper[3], lower[1] - lower[0]
    depth = float((np.linalg.norm(e_up) + np.linalg.norm(e_lo)) / 2)
    width = DISC_WIDTH_DEPTHS * depth
    mid_up, mid_lo = (upper[2] + upper[3]) / 2, (lower[0] + lower[1]) / 2
    cos = float(e_up @ e_lo / max(np.linalg.norm(e_up) * np.linalg.norm(e_lo), 1e-9))
    return DiscGeometry(centre, x_axis / max(np.linalg.norm(x_axis), 1e-9), width, width * DISC_SHAPE[0] / DISC_SHAPE[1], int(round(slice_index)),
                        depth, float(np.linalg.norm(mid_lo - mid_up)), float(np.degrees(np.arccos(np.clip(cos, -1, 1)))))


def disc_volume(vol: np.ndarray, geom: DiscGeometry, slice_shift: int = 0) -> np.ndarray:
    """DISC_SLICES slices of DISC_SHAPE around a disc, horizontal, scaled so the vertebrae sit at VERTEBRA_LEVEL, in [0, 1]."""
    out = np.zeros((DISC_SLICES, *DISC_SHAPE), np.float32)
    half = DISC_SLICES // 2
    for j in range(DISC_SLICES):
        k = geom.slice + slice_shift + j - half
        if 0 <= k < vol.shape[0]:
            out[j] = rotated_crop(vol[k], geom.centre, geom.x_axis, geom.width_px, geom.height_px, DISC_SHAPE)
    mid = out[half]
    h, w = DISC_SHAPE
    bodies = np.concatenate([mid[: h // 5, w // 4: 3 * w // 4].ravel(), mid[-h // 5:, w // 4: 3 * w // 4].ravel()])
    level = float(np.median(bodies))
    if level <= 1e-3:
        level = float(np.percentile(mid, 75)) or 1.0
    return np.clip(out * (VERTEBRA_LEVEL / level), 0.0, 1.0)
