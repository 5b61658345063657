"""Whole-body DXA preprocessing: display values, body extent, height normalisation, view checks.

Height normalisation follows the paper: the empty space above the head and
below the feet is removed, the scan is cropped isotropically around the body
(keeping its aspect ratio) and resized to 416 x 128. :class:`Normalisation`
keeps the affine map so results go back onto the source image's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from dicomnode import imaging

if TYPE_CHECKING:  # pragma: no cover
    import pydicom

ROWS, COLS = 416, 128
"""The paper's normalised scan size."""

MIN_ASPECT = 2.0
MAX_ASPECT = 3.8
"""Height over width (in mm) of a whole-body DXA scan: about 2.9 on a GE Lunar iDXA (790 x 270); an NM whole-body bone scan (1024 x 256) has 4."""
MIN_BONE_CONTRAST = 1.8


def display(ds: "pydicom.Dataset") -> np.ndarray:
    """The first frame in [0, 1], bone bright (modality LUT, VOI or percentile window, MONOCHROME1 inverted)."""
    return imaging.display_image(ds, 0)


def foreground(img: np.ndarray) -> np.ndarray:
    """Body pixels: above a threshold after removing each row's background level.

    Subtracting a low percentile per row cancels the bright or dark detector
    rows of a line scanner, which would otherwise stretch the body extent.
    """
    smooth = ndimage.gaussian_filter(img, 1.2)
    base = np.percentile(smooth, 10, axis=1, keepdims=True)
    flat = smooth - base
    top = float(np.percentile(flat, 99.5))
    if top <= 1e-6:
        return np.zeros(img.shape, bool)
    return flat > 0.12 * top


def body_extent(mask: np.ndarray) -> tuple[int, int, float] | None:
    """(first row, last row, column centre) of the tallest run of body rows; None when there is no body."""
    rows = mask.sum(axis=1) >= 2
    if not rows.any():
        return None
    # close gaps of a few rows (the neck, the knees) before taking the longest run
    rows = ndimage.binary_closing(rows, structure=np.ones(9, bool)) | rows
    lab, n = ndimage.label(rows)
    sizes = ndimage.sum(rows, lab, index=np.arange(1, n + 1))
    k = int(np.argmax(sizes)) + 1
    idx = np.flatnonzero(lab == k)
    r0, r1 = int(idx[0]), int(idx[-1])
    cols = mask[r0 : r1 + 1].sum(axis=0).astype(np.float64)
    centre = float((cols * np.arange(len(cols))).sum() / max(cols.sum(), 1.0))
    return r0, r1, centre


@dataclass(frozen=True)
class Normalisation:
    """Normalised pixel (row i, column j) -> source (row, column): r0 + (i + .5) * sy - .5, c0 + (j + .5) * sx - .5."""

    r0: float
    c0: float
    sy: float
    sx: float
    source_shape: tuple[int, int]

    def to_source(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.c0 + (np.asarray(cols) + 0.5) * self.sx - 0.5, self.r0 + (np.asarray(rows) + 0.5) * self.sy - 0.5

    def to_norm(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(cols) + 0.5 - self.c0) / self.sx - 0.5, (np.asarray(rows) + 0.5 - self.r0) / self.sy - 0.5

    def sample(self, img: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Resample a source-grid image (or (C, rows, cols) stack) onto the 416 x 128 grid."""
        jj, ii = np.meshgrid(np.arange(COLS, dtype=np.float32), np.arange(ROWS, dtype=np.float32))
        cc, rr = self.to_source(jj, ii)
        stack = img[None] if img.ndim == 2 else img
        sigma = (max(self.sy - 1, 0) / 2, max(self.sx - 1, 0) / 2)
        out = []
        for a in stack.astype(np.float32):
            if order > 0 and (sigma[0] > 0.25 or sigma[1] > 0.25):
                a = ndimage.gaussian_filter(a, sigma)
            out.append(ndimage.map_coordinates(a, [rr, cc], order=order, mode="constant", cval=cval))
        res = np.stack(out)
        return res[0] if img.ndim == 2 else res

    def back(self, maps: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample (C, 416, 128) maps onto the source grid (zero outside the crop)."""
        rows, cols = self.source_shape
        cc, rr = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
        jj, ii = self.to_norm(cc, rr)
        return np.stack([ndimage.map_coordinates(m.astype(np.float32), [ii, jj], order=order, mode="constant", cval=0.0) for m in maps])


def normalisation(img: np.ndarray, spacing: tuple[float, float] | None = None, margin: float = 0.015) -> Normalisation:
    """The crop around the body from head to feet, isotropic in mm (square pixels when spacing is unknown).

    Raises
    ------
    ValueError
        When no body is visible.
    """
    ext = body_extent(foreground(img))
    if ext is None:
        raise ValueError("no body is visible in the image")
    r0, r1, centre = ext
    height = (r1 - r0 + 1) * (1 + 2 * margin)
    sy = height / ROWS
    ratio = spacing[0] / spacing[1] if spacing else 1.0
    sx = sy * ratio
    top = r0 - (r1 - r0 + 1) * margin
    c0 = centre + 0.5 - COLS / 2 * sx
    return Normalisation(r0=top, c0=c0, sy=sy, sx=sx, source_shape=(int(img.shape[0]), int(img.shape[1])))


def normalise(img: np.ndarray, spacing: tuple[float, float] | None = None) -> tuple[np.ndarray, Normalisation]:
    """The 416 x 128 height-normalised scan in [0, 1] and its map back to the source."""
    norm = normalisation(img, spacing)
    bg = float(np.percentile(img, 2))
    return np.clip(norm.sample(img, order=1, cval=bg), 0, 1).astype(np.float32), norm


@dataclass(frozen=True)
class ViewCheck:
    """What the pixels say about a DXA image: is it a whole body, and the bone (not soft-tissue) image?"""

    aspect: float
    extent: float
    legs: float
    head: float
    bone_contrast: float

    @property
    def whole_body(self) -> bool:
        return MIN_ASPECT <= self.aspect <= MAX_ASPECT and self.extent >= 0.55 and self.legs >= 0.5 and self.head <= 0.7

    @property
    def bone(self) -> bool:
        return self.bone_contrast >= MIN_BONE_CONTRAST

    def reason(self) -> str:
        if self.aspect < MIN_ASPECT:
            return f"the image is not tall and narrow (rows/columns {self.aspect:.1f}, a whole-body scan has 2 or more)"
        if self.aspect > MAX_ASPECT:
            return f"the image is too narrow for a whole-body DXA scan (rows/columns {self.aspect:.1f}, more than {MAX_ASPECT}), as in a whole-body bone scan"
        if self.extent < 0.55:
            return "the body covers too little of the image height for a whole-body scan"
        if self.legs < 0.5:
            return "no pair of legs in the lower part of the image, as in a spine, hip or knee view"
        if self.head > 0.7:
            return "no head above the shoulders at the top of the image"
        if not self.bone:
            return "it looks like the soft-tissue image (little bone contrast), not the bone image"
        return "it is a whole-body bone image"


def check_view(img: np.ndarray, spacing: tuple[float, float] | None = None) -> ViewCheck:
    """Content measures used to pick the whole-body bone image among a study's DXA views."""
    rows, cols = img.shape
    aspect = rows / cols * ((spacing[0] / spacing[1]) if spacing else 1.0)
    mask = foreground(img)
    ext = body_extent(mask)
    if ext is None:
        return ViewCheck(aspect, 0.0, 0.0, 1.0, 0.0)
    r0, r1, _ = ext
    n = r1 - r0 + 1
    body = mask[r0 : r1 + 1]
    width = body.sum(axis=1).astype(np.float64)
    lower = body[int(n * 0.7) :]
    runs = np.array([_runs(r) for r in lower]) if len(lower) else np.zeros(1)
    legs = float(np.mean(runs >= 2))
    head_w = float(np.median(width[: max(int(n * 0.07), 1)]))
    trunk_w = float(np.percentile(width[int(n * 0.15) : max(int(n * 0.45), int(n * 0.15) + 1)], 90))
    head = head_w / max(trunk_w, 1.0)
    vals = img[r0 : r1 + 1][body]
    if vals.size < 50:
        return ViewCheck(aspect, n / rows, legs, head, 0.0)
    med = float(np.median(vals))
    hi = float(np.mean(np.sort(vals)[-max(vals.size // 10, 1) :]))
    contrast = hi / max(med, 1e-3)
    return ViewCheck(float(aspect), float(n / rows), legs, float(head), float(contrast))


def _runs(row: np.ndarray, min_len: int = 2) -> int:
    """Number of foreground runs of at least ``min_len`` pixels in one row."""
    lab, n = ndimage.label(row)
    if n == 0:
        return 0
    sizes = ndimage.sum(row, lab, index=np.arange(1, n + 1))
    return int(np.sum(sizes >= min_len))
