"""Volume in, arrays out: the sagittal reformat for localisation, spine-aligned 96^3 patches, body heights.

Everything here works in patient space (LPS, mm) through the volume's own index/patient
mapping, so any orientation, slice order and spacing gives the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from analyzers.volume import Volume

from .constants import HEIGHT_LINE, HU_RANGE, PATCH_SIZE, PATCH_SPACING, REFORMAT_SPACING, SLAB_HALF_MM

AIR = -1000.0
BONE_HU = 200.0
"""Voxels above this count as bone when the spine's midline is traced."""


def unit_hu(hu: np.ndarray) -> np.ndarray:
    """HU clipped to [-1000, 1000] and scaled to [0, 1] (the paper's intensity normalisation)."""
    lo, hi = HU_RANGE
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def sample(volume: Volume, points: np.ndarray, order: int = 1) -> np.ndarray:
    """HU at patient points (..., 3); air outside the volume."""
    idx = volume.patient_to_index(points.reshape(-1, 3)).T
    out = ndimage.map_coordinates(volume.array, idx, order=order, mode="constant", cval=AIR, prefilter=False)
    return out.reshape(points.shape[:-1]).astype(np.float32)


@dataclass
class Grid:
    """An LPS-aligned grid: array axes (z, y, x) ascending from ``origin`` (x, y, z) in steps of ``spacing``."""

    origin: np.ndarray
    shape: tuple[int, int, int]
    spacing: float

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.spacing
        return (self.origin[2] + np.arange(self.shape[0]) * s, self.origin[1] + np.arange(self.shape[1]) * s, self.origin[0] + np.arange(self.shape[2]) * s)

    def to_patient(self, zyx: np.ndarray) -> np.ndarray:
        zyx = np.asarray(zyx, dtype=np.float64)
        return np.stack([self.origin[0] + zyx[..., 2] * self.spacing, self.origin[1] + zyx[..., 1] * self.spacing, self.origin[2] + zyx[..., 0] * self.spacing], axis=-1)


def resampled(volume: Volume, spacing: float = REFORMAT_SPACING, chunk: int = 16) -> tuple[np.ndarray, Grid]:
    """The volume on an LPS-aligned isotropic grid covering its extent (HU, float32), slab by slab to bound memory."""
    n = np.array(volume.array.shape) - 1
    corners = np.array([[k, r, c] for k in (0, n[0]) for r in (0, n[1]) for c in (0, n[2])], dtype=np.float64)
    world = volume.index_to_patient(corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    shape = tuple(int(np.floor((hi[i] - lo[i]) / spacing)) + 1 for i in (2, 1, 0))
    grid = Grid(origin=lo, shape=shape, spacing=spacing)
    zs, ys, xs = grid.axes()
    out = np.empty(shape, dtype=np.float32)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    for k0 in range(0, shape[0], chunk):
        k1 = min(shape[0], k0 + chunk)
        zz = np.broadcast_to(zs[k0:k1, None, None], (k1 - k0, *yy.shape))
        p = np.stack([np.broadcast_to(xx, zz.shape), np.broadcast_to(yy, zz.shape), zz], axis=-1)
        out[k0:k1] = sample(volume, p)
    return out, grid


def midline(iso: np.ndarray) -> np.ndarray:
    """Column (x index) of the spine per axial row of the grid: median x of bone, which ribs and pelvis flank symmetrically."""
    bone = iso > BONE_HU
    xs = np.arange(iso.shape[2], dtype=np.float64)
    out = np.full(iso.shape[0], np.nan)
    for k in range(iso.shape[0]):
        col = bone[k].sum(axis=0)
        total = col.sum()
        if total >= 5:
            cum = np.cumsum(col)
            out[k] = xs[int(np.searchsorted(cum, total / 2))]
    good = np.isfinite(out)
    if not good.any():
        return np.full(iso.shape[0], (iso.shape[2] - 1) / 2)
    out = np.interp(np.arange(len(out)), np.flatnonzero(good), out[good])
    out = ndimage.median_filter(out, size=9, mode="nearest")
    return ndimage.gaussian_filter1d(out, 3.0, mode="nearest")


def reformat(iso: np.ndarray, mid: np.ndarray, spacing: float = REFORMAT_SPACING) -> np.ndarray:
    """Detector input (3, z, y): slab mean and slab maximum around the midline, and the mean over the full width.

    Rows run from the highest z (head) down, as a sagittal image is read.
    """
    half = SLAB_HALF_MM / spacing
    xs = np.arange(iso.shape[2])[None, None, :]
    slab = np.abs(xs - mid[:, None, None]) <= half
    u = unit_hu(iso)
    count = np.maximum(slab.sum(axis=2), 1)
    mean = (u * slab).sum(axis=2) / count
    mx = np.where(slab, u, 0.0).max(axis=2)
    full = u.mean(axis=2)
    return np.stack([mean, mx, full])[:, ::-1].astype(np.float32)


def pad_to(x: np.ndarray, multiple: int = 16) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the last two axes up to a multiple (air); returns the padded array and the original (rows, columns)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    ph, pw = max(ph, 64 - h) if h < 64 else ph, max(pw, 64 - w) if w < 64 else pw
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(x, pad, mode="constant", constant_values=0.0), (h, w)


# ---------------------------------------------------------------------------
# Spine-aligned patches
# ---------------------------------------------------------------------------


def frame(axis: np.ndarray) -> np.ndarray:
    """Rows: lateral (x), anteroposterior (y, posterior) and spinal (z, towards the head) unit vectors."""
    ez = np.asarray(axis, dtype=np.float64)
    ez = ez / np.linalg.norm(ez)
    ey = np.array([0.0, 1.0, 0.0]) - ez[1] * ez
    ey /= np.linalg.norm(ey)
    return np.stack([np.cross(ey, ez), ey, ez])


def spine_axes(centroids: np.ndarray) -> np.ndarray:
    """Unit tangents (towards the head) of a smoothing spline through centroids ordered head to feet."""
    c = np.asarray(centroids, dtype=np.float64)
    if len(c) < 2:
        return np.tile([0.0, 0.0, 1.0], (len(c), 1))
    from scipy.interpolate import make_smoothing_spline

    z = c[:, 2]
    order = np.argsort(z)
    zs = z[order]
    if len(c) >= 5 and np.all(np.diff(zs) > 1e-3):
        dx = make_smoothing_spline(zs, c[order, 0], lam=2e4).derivative()(zs)
        dy = make_smoothing_spline(zs, c[order, 1], lam=2e4).derivative()(zs)
    else:
        dx = np.gradient(c[order, 0], zs) if len(c) > 1 else np.zeros(1)
        dy = np.gradient(c[order, 1], zs) if len(c) > 1 else np.zeros(1)
    t = np.stack([dx, dy, np.ones_like(zs)], axis=-1)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    out = np.empty_like(t)
    out[order] = t
    return out


def patch_points(centre: np.ndarray, axis: np.ndarray, size: int = PATCH_SIZE, spacing: float = PATCH_SPACING) -> np.ndarray:
    """Patient points of a patch (size^3, axes: spinal from the head down, AP from anterior, lateral)."""
    f = frame(axis)
    r = (np.arange(size) - (size - 1) / 2) * spacing
    a, b, c = np.meshgrid(-r, r, r, indexing="ij")
    return centre + a[..., None] * f[2] + b[..., None] * f[1] + c[..., None] * f[0]


def patch(volume: Volume, centre: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """The 96^3 1 mm patch in HU around ``centre``, its vertical axis along ``axis``."""
    return sample(volume, patch_points(centre, axis))


# ---------------------------------------------------------------------------
# Heights
# ---------------------------------------------------------------------------


@dataclass
class Heights:
    anterior: float
    middle: float
    posterior: float
    depth: float
    """Anteroposterior depth of the body at mid-height (mm)."""

    def as_list(self) -> list[float]:
        return [self.anterior, self.middle, self.posterior]


MAX_HALF_MM = 30.0
"""No cortex of the body lies further than this from a detected centre (half an L5 body, about 14 mm, plus the
detector's offset and tolerance)."""


def _edge(profile: np.ndarray, start: int, step: int, spacing: float) -> float | None:
    """Distance (mm) from ``start`` to the outer half-maximum of the first cortical peak walking by ``step``.

    None when no cortex is found within MAX_HALF_MM (a missing or blurred endplate must not be
    replaced by the next vertebra's).
    """
    n = min(len(profile), start + int(MAX_HALF_MM / spacing) + 1) if step > 0 else len(profile)
    lo = max(0, start - int(MAX_HALF_MM / spacing) - 1) if step < 0 else 0
    inside = float(np.median(profile[max(0, start - 2): start + 3]))
    i = start
    best, best_i = -np.inf, None
    while lo <= i < n:
        v = profile[i]
        if v > best:
            best, best_i = v, i
        # past the cortex: well below its peak and near the surroundings for a few samples
        if best_i is not None and best > inside + 60 and v < inside + 0.3 * (best - inside) and abs(i - best_i) >= 2:
            break
        i += step
    if best_i is None or best <= inside + 60 or not (lo <= i < n):
        return None
    outside = float(np.median(profile[i: i + 4 * step: step])) if 0 <= i + 4 * step < n else float(profile[i])
    half = 0.5 * (best + outside)
    j = best_i
    while 0 <= j + step < n and profile[j + step] > half:
        j += step
    a, b = profile[j], profile[j + step] if 0 <= j + step < n else profile[j]
    frac = 0.0 if a == b else (a - half) / (a - b)
    return abs(j + frac * step - start) * spacing


def heights(hu_patch: np.ndarray, spacing: float = PATCH_SPACING, bias_mm: float = 0.0) -> Heights | None:
    """Anterior, middle and posterior body heights from the mid-sagittal plane of a patch; None if unreadable.

    The body's AP depth is read at mid-height; heights are measured on vertical lines at
    -65 %, 0 and +65 % of the half-depth (as the phantoms define them), as the distance between
    the outer half-maxima of the endplate cortex above and below. ``bias_mm`` is the
    systematic overestimate of a height by the half-maximum rule (calibrated on phantoms).
    """
    c = hu_patch.shape[0] // 2
    plane = ndimage.gaussian_filter(hu_patch[:, :, c - 2: c + 2].mean(axis=2), 0.7)
    row = plane[c - 2: c + 2].mean(axis=0)
    ant = _edge(row, c, -1, spacing)
    post = _edge(row, c, 1, spacing)
    if ant is None or post is None:
        return None
    half_depth = (ant + post) / 2
    centre = c + (post - ant) / 2 / spacing
    out = []
    for t in (-HEIGHT_LINE, 0.0, HEIGHT_LINE):
        y = int(round(centre + t * half_depth / spacing))
        if not 1 <= y < hu_patch.shape[1] - 1:
            return None
        col = plane[:, y - 1: y + 2].mean(axis=1)
        up = _edge(col, c, -1, spacing)
        down = _edge(col, c, 1, spacing)
        if up is None or down is None:
            return None
        out.append(up + down - bias_mm)
    return Heights(out[0], out[1], out[2], ant + post)
