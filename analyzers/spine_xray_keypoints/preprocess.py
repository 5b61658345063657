"""From a lateral spine radiograph to network inputs: display image, detector input, vertebra crops."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from dicomnode import imaging

if TYPE_CHECKING:  # pragma: no cover
    import pydicom

DETECTOR_SIZE = 256
CROP_SHAPE = (64, 128)
"""(rows, columns) of a vertebra crop; the crop box is widened to this aspect."""
CROP_PAD = 0.12
"""Padding on each side of a vertebra box at inference, as a fraction of its size."""
BODY_CROP_SHAPE = (96, 128)
"""(rows, columns) of a vertebral-body crop (four corners, no spinous process): finer mm per pixel."""
BODY_CROP_PAD = 0.15
"""Padding on each side of the body-corner box at inference."""
CORNER_SHAPE = (64, 64)
"""(rows, columns) of a corner patch: a square around one body corner."""
CORNER_HALF = 0.25
"""Half the side of a corner patch, as a fraction of the vertebral body's depth."""
_H_PARTNER = (1, 0, 3, 2)  # the other corner of the same endplate
_V_PARTNER = (3, 2, 1, 0)  # the other corner of the same wall


def load_image(ds: "pydicom.Dataset") -> tuple[np.ndarray, tuple[float, float]]:
    """Bone-white image in [0, 1] and its (row, column) pixel spacing in mm.

    Raises
    ------
    NotApplicable
        When the pixels cannot be decoded or there is no pixel spacing.
    """
    spacing = imaging.require_spacing(ds, "keypoint distances and heights are reported in mm")
    return imaging.display_image(ds, 0), spacing


def standardise(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean()) / (x.std() + 1e-6)).astype(np.float32)


def detector_input(img: np.ndarray) -> np.ndarray:
    """The image resized to the detector's square input, standardised, shape (1, 1, S, S)."""
    small = imaging.resize(img, (DETECTOR_SIZE, DETECTOR_SIZE), order=1)
    return standardise(small)[None, None]


def tight_box(points: np.ndarray) -> np.ndarray:
    """(c0, r0, c1, r1) around keypoints (N, 2)."""
    return np.array([points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()], dtype=np.float64)


def body_box(points: np.ndarray) -> np.ndarray:
    """(c0, r0, c1, r1) around the four body corners of a vertebra's (5, 2) keypoints."""
    return tight_box(np.asarray(points)[:4])


def body_size(points: np.ndarray) -> tuple[float, float]:
    """Mean depth (along the endplates) and height (along the walls) of a vertebral body, in pixels."""
    p = np.asarray(points, np.float64)
    depth = 0.5 * (np.linalg.norm(p[1] - p[0]) + np.linalg.norm(p[2] - p[3]))
    height = 0.5 * (np.linalg.norm(p[3] - p[0]) + np.linalg.norm(p[2] - p[1]))
    return float(depth), float(height)


def corner_boxes(points: np.ndarray, half: float = CORNER_HALF, centres: np.ndarray | None = None) -> list[np.ndarray]:
    """Square patches around the four body corners of a vertebra's (5, 2) keypoints, one per corner.

    Each box is oriented so that the vertebral body lies towards increasing columns and rows of
    its patch (a box may run right to left or bottom to top; :func:`crop`, :func:`to_crop` and
    :func:`from_crop` follow it), so every corner looks alike to the corner model: its body to
    the lower right, the disc and the neighbouring vertebra above or to the left. ``centres``
    (4, 2) moves the patches off the corners (training jitter).
    """
    p = np.asarray(points, np.float64)
    depth, height = body_size(p)
    r = half * max(depth, height, 1.0)
    out = []
    for k in range(4):
        sx = 1.0 if p[_H_PARTNER[k], 0] >= p[k, 0] else -1.0
        sy = 1.0 if p[_V_PARTNER[k], 1] >= p[k, 1] else -1.0
        cx, cy = (p[k] if centres is None else centres[k])
        out.append(np.array([cx - sx * r, cy - sy * r, cx + sx * r, cy + sy * r]))
    return out


def crop_box(box: np.ndarray, pad: float = CROP_PAD, aspect: float = CROP_SHAPE[0] / CROP_SHAPE[1]) -> np.ndarray:
    """Pad a box on every side and widen it to the crop's rows/columns aspect, about its centre."""
    c0, r0, c1, r1 = box
    w, h = max(c1 - c0, 2.0), max(r1 - r0, 2.0)
    w, h = w * (1 + 2 * pad), h * (1 + 2 * pad)
    if h / w < aspect:
        h = w * aspect
    else:
        w = h / aspect
    cc, cr = (c0 + c1) / 2, (r0 + r1) / 2
    return np.array([cc - w / 2, cr - h / 2, cc + w / 2, cr + h / 2])


def crop(img: np.ndarray, box: np.ndarray, shape: tuple[int, int] = CROP_SHAPE) -> np.ndarray:
    """Bilinear resample of ``box`` (c0, r0, c1, r1) to ``shape``; outside the image reads as 0."""
    c0, r0, c1, r1 = box
    rr = r0 + (np.arange(shape[0]) + 0.5) * (r1 - r0) / shape[0] - 0.5
    cc = c0 + (np.arange(shape[1]) + 0.5) * (c1 - c0) / shape[1] - 0.5
    grid = np.meshgrid(rr, cc, indexing="ij")
    return ndimage.map_coordinates(img, grid, order=1, mode="constant", cval=0.0).astype(np.float32)


def to_crop(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Pixel (column, row) -> fractions of the crop box."""
    c0, r0, c1, r1 = box
    return np.stack([(points[..., 0] - c0) / (c1 - c0), (points[..., 1] - r0) / (r1 - r0)], axis=-1)


def from_crop(frac: np.ndarray, box: np.ndarray) -> np.ndarray:
    c0, r0, c1, r1 = box
    return np.stack([c0 + frac[..., 0] * (c1 - c0), r0 + frac[..., 1] * (r1 - r0)], axis=-1)


def clahe(x: np.ndarray, tiles: tuple[int, int] = (2, 4), clip: float = 2.5, bins: int = 64) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of an image in [0, 1] (training augmentation)."""
    x = np.clip(x, 0.0, 1.0)
    rows, cols = x.shape
    th, tw = rows // tiles[0], cols // tiles[1]
    q = np.minimum((x * bins).astype(int), bins - 1)
    maps = np.empty((tiles[0], tiles[1], bins))
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            hist = np.bincount(q[i * th : (i + 1) * th, j * tw : (j + 1) * tw].ravel(), minlength=bins).astype(float)
            limit = clip * hist.sum() / bins
            excess = np.clip(hist - limit, 0, None).sum()
            hist = np.minimum(hist, limit) + excess / bins
            cdf = np.cumsum(hist)
            maps[i, j] = cdf / max(cdf[-1], 1e-9)
    # bilinear blend of the tile mappings at each pixel
    fi = np.clip((np.arange(rows) + 0.5) / th - 0.5, 0, tiles[0] - 1)
    fj = np.clip((np.arange(cols) + 0.5) / tw - 0.5, 0, tiles[1] - 1)
    i0, j0 = np.floor(fi).astype(int), np.floor(fj).astype(int)
    i1, j1 = np.minimum(i0 + 1, tiles[0] - 1), np.minimum(j0 + 1, tiles[1] - 1)
    wi, wj = (fi - i0)[:, None], (fj - j0)[None, :]
    ii0, jj0, ii1, jj1 = i0[:, None], j0[None, :], i1[:, None], j1[None, :]
    v00, v01 = maps[ii0, jj0, q], maps[ii0, jj1, q]
    v10, v11 = maps[ii1, jj0, q], maps[ii1, jj1, q]
    return ((1 - wi) * ((1 - wj) * v00 + wj * v01) + wi * ((1 - wj) * v10 + wj * v11)).astype(np.float32)
