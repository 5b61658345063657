"""Pure mask maths after inference: clean-up, outlines, cardiothoracic ratio."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Moore neighbourhood, clockwise from west, as (row, column) offsets.
_NEIGHBOURS = [(0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1)]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D mask (empty stays empty)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def outline(mask: np.ndarray, max_points: int = 120) -> np.ndarray | None:
    """Outer boundary of the largest component as (column, row) pixel-centre points.

    Traced by Moore-neighbour following, then thinned to at most ``max_points``;
    None when the mask has fewer than 3 boundary points.
    """
    m = largest_component(np.asarray(mask, bool))
    if m.sum() < 3:
        return None
    m = ndimage.binary_fill_holes(m)
    padded = np.pad(m, 1)
    rows, cols = np.nonzero(padded)
    start = (int(rows[0]), int(cols[0]))  # top-most, then left-most pixel
    boundary = [start]
    current, back = start, 0  # came from the west
    for _ in range(4 * padded.size):
        found = False
        for k in range(8):
            d = (back + k) % 8
            r, c = current[0] + _NEIGHBOURS[d][0], current[1] + _NEIGHBOURS[d][1]
            if padded[r, c]:
                # next search starts from the neighbour just before this one
                back = (d + 5) % 8
                current = (r, c)
                found = True
                break
        if not found or current == start:
            break
        boundary.append(current)
    if len(boundary) < 3:
        return None
    pts = np.asarray(boundary, dtype=np.float64)[:, ::-1] - 1.0 + 0.5  # (col, row) centres, unpadded
    step = max(1, int(np.ceil(len(pts) / max_points)))
    pts = pts[::step]
    return pts if len(pts) >= 3 else None


def clean_masks(masks: np.ndarray) -> np.ndarray:
    """Keep the largest component of each organ and fill its holes; (3, rows, cols) bool."""
    return np.stack([ndimage.binary_fill_holes(largest_component(m)) for m in masks])


def cardiothoracic_ratio(masks: np.ndarray) -> float:
    """Maximal transverse heart width over maximal internal thoracic width.

    ``masks`` is (3, rows, columns) bool: right lung, left lung, heart. The
    thoracic width is measured row by row from the outer edge of one lung field
    to the outer edge of the other; the ratio needs no pixel spacing. NaN when a
    structure is missing.
    """
    lungs = masks[0] | masks[1]
    heart = masks[2]
    if not heart.any() or not masks[0].any() or not masks[1].any():
        return float("nan")
    cols_h = np.flatnonzero(heart.any(axis=0))
    heart_w = cols_h[-1] - cols_h[0] + 1
    any_row = lungs.any(axis=1)
    first = np.where(any_row, lungs.argmax(axis=1), 0)
    last = np.where(any_row, lungs.shape[1] - 1 - lungs[:, ::-1].argmax(axis=1), -1)
    thorax_w = int((last - first + 1)[any_row].max())
    return float(heart_w / thorax_w)
