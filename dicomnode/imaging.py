"""Pure image helpers for the analyzers' ``preprocess.py`` and the encoders: pixels, photometry, spacing, resizing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pydicom

from .analysis import NotApplicable


def frames(ds: "pydicom.Dataset") -> np.ndarray:
    """Stored pixel values as float32 with shape (frames, rows, columns); decodes compressed syntaxes."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise NotApplicable("the instance has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise NotApplicable(f"colour images ({ds.get('PhotometricInterpretation', '?')}) are not supported; a greyscale image is needed")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # a decoder missing or corrupt data: the analyzer cannot see the image
        raise NotApplicable(f"pixel data cannot be decoded ({type(exc).__name__})") from exc
    arr = np.asarray(arr, dtype=np.float32)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n == 1 and arr.ndim == 2:
        arr = arr[None]
    return arr


def modality_values(ds: "pydicom.Dataset", stored: np.ndarray) -> np.ndarray:
    """Apply the Modality LUT (RescaleSlope / RescaleIntercept), e.g. CT numbers in HU."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return stored * np.float32(slope) + np.float32(intercept)


def display_image(ds: "pydicom.Dataset", frame: int = 0) -> np.ndarray:
    """A greyscale frame as float32 in [0, 1] with bright meaning dense (bone white).

    Applies the modality LUT, the first VOI window when present (else a
    0.5–99.5 percentile window) and inverts MONOCHROME1.
    """
    stored = frames(ds)
    if not 0 <= frame < stored.shape[0]:
        raise IndexError(f"frame {frame} out of range 0..{stored.shape[0] - 1}")
    img = modality_values(ds, stored[frame])
    lo, hi = _window(ds, img)
    out = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out


def _window(ds: "pydicom.Dataset", img: np.ndarray) -> tuple[float, float]:
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        try:
            c = float(centre[0] if hasattr(centre, "__len__") and not isinstance(centre, str) else centre)
            w = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
            if w > 1:
                return c - w / 2.0, c + w / 2.0
        except (TypeError, ValueError, IndexError):
            pass
    lo, hi = np.percentile(img, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def pixel_spacing(ds: "pydicom.Dataset") -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; None when absent or zero."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(kw)
        if value is None:
            continue
        try:
            r, c = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if r > 0 and c > 0 and np.isfinite(r) and np.isfinite(c):
            return r, c
    return None


def require_spacing(ds: "pydicom.Dataset", why: str) -> tuple[float, float]:
    spacing = pixel_spacing(ds)
    if spacing is None:
        raise NotApplicable(f"the image has no usable pixel spacing; {why}")
    return spacing


def resize(img: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize a 2-D array to ``shape`` (rows, columns) with spline order ``order``."""
    from scipy import ndimage

    zoom = (shape[0] / img.shape[0], shape[1] / img.shape[1])
    out = ndimage.zoom(img, zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # rounding in zoom: pad or crop by at most one pixel
        fixed = np.zeros(shape, dtype=out.dtype)
        r, c = min(shape[0], out.shape[0]), min(shape[1], out.shape[1])
        fixed[:r, :c] = out[:r, :c]
        out = fixed
    return out
