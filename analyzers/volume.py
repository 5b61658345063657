"""Volume assembly: the instances of a series as one 3-D array in patient space.

Shared by the cross-sectional analyzers (MR, CT). A series may hold one stack
of single-frame slices, an enhanced multi-frame instance, or several stacks
(a three-plane localiser, two acquisitions): :func:`stacks` splits it by
orientation and returns one :class:`Volume` per stack, each sorted along its
normal with the slice spacing measured from ImagePositionPatient.

Voxel values are modality values (RescaleSlope/Intercept applied) with the
MONOCHROME2 convention (high is bright); MONOCHROME1 stacks are inverted.
Array axes are (slice, row, column); ``direction`` holds the patient-space
(LPS) unit vectors of the column, row and slice index axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from dicomnode.analysis import NotApplicable, Series, SourceRef
from dicomnode.imaging import frames

if TYPE_CHECKING:  # pragma: no cover
    import pydicom
    import SimpleITK as sitk

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines of slices in one stack."""
SPACING_TOLERANCE = 0.05
"""Largest relative deviation of a slice gap from the median gap before the stack counts as irregular."""
PLANES = ("sagittal", "coronal", "axial")
"""Plane names by the patient axis (x, y, z) closest to the slice normal."""


@dataclass
class Volume:
    """One stack of parallel slices.

    ``array`` has shape (slices, rows, columns), float32 modality values.
    ``spacing`` is (slice, row, column) in mm; ``origin`` the patient position
    (LPS, mm) of the centre of voxel (0, 0, 0); ``direction`` a 3x3 array whose
    rows are the unit vectors along increasing column index, row index and
    slice index. ``sources[k]`` is the source frame of slice ``k``.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray
    sources: list[SourceRef]
    series_instance_uid: str
    modality: str = ""
    irregular_spacing: bool = False
    """True when the slice gaps differ by more than SPACING_TOLERANCE (spacing is their median)."""

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a volume array must be 3-D (slices, rows, columns), got shape {self.array.shape}")
        if len(self.sources) != self.array.shape[0]:
            raise ValueError(f"a volume of {self.array.shape[0]} slices needs as many sources, got {len(self.sources)}")

    @property
    def normal(self) -> np.ndarray:
        return self.direction[2]

    @property
    def plane(self) -> str:
        """'sagittal', 'coronal' or 'axial': the patient axis closest to the slice normal."""
        return plane_of_normal(self.normal)

    def index_to_patient(self, index: np.ndarray) -> np.ndarray:
        """Patient coordinates (LPS, mm) of voxel indices (..., 3) given as (slice, row, column)."""
        index = np.asarray(index, dtype=np.float64)
        k, r, c = index[..., 0], index[..., 1], index[..., 2]
        d = self.direction
        return (
            self.origin
            + (c * self.spacing[2])[..., None] * d[0]
            + (r * self.spacing[1])[..., None] * d[1]
            + (k * self.spacing[0])[..., None] * d[2]
        )

    def patient_to_index(self, point: np.ndarray) -> np.ndarray:
        """Voxel indices (slice, row, column) of patient points (..., 3); the inverse of index_to_patient."""
        rel = np.asarray(point, dtype=np.float64) - self.origin
        c = rel @ self.direction[0] / self.spacing[2]
        r = rel @ self.direction[1] / self.spacing[1]
        k = rel @ self.direction[2] / self.spacing[0]
        return np.stack([k, r, c], axis=-1)

    def to_sitk(self) -> "sitk.Image":
        """The volume as a SimpleITK image (x = column, y = row, z = slice)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.array)
        img.SetSpacing((self.spacing[2], self.spacing[1], self.spacing[0]))
        img.SetOrigin(tuple(float(v) for v in self.origin))
        img.SetDirection(tuple(float(v) for v in self.direction.T.reshape(-1)))
        return img


def plane_of_normal(normal: Sequence[float]) -> str:
    return PLANES[int(np.argmax(np.abs(np.asarray(normal, dtype=np.float64))))]


def orientation(ds: "pydicom.Dataset") -> np.ndarray | None:
    """The 3x3 direction rows (column axis, row axis, normal) from ImageOrientationPatient, or None."""
    return _orientation(_frame_attr(ds, "ImageOrientationPatient", 0))


def series_plane(series: Series) -> str | None:
    """The plane of the first instance of a series from its header, or None without usable orientation."""
    d = orientation(series.first())
    return None if d is None else plane_of_normal(d[2])


def stacks(series: Series) -> list[Volume]:
    """Every stack of parallel slices in a series, largest first.

    Raises
    ------
    NotApplicable
        When no instance has pixel data with orientation and position.
    """
    slices: list[_Slice] = []
    reasons: set[str] = set()
    for inst in series.instances:
        try:
            ds = inst.dataset
            pixels = frames(ds)
        except NotApplicable as exc:
            reasons.add(str(exc))
            continue
        for f in range(pixels.shape[0]):
            s = _slice(ds, pixels, f, inst.sop_instance_uid, reasons)
            if s is not None:
                slices.append(s)
    if not slices:
        why = "; ".join(sorted(reasons)) or "the series has no instances"
        raise NotApplicable(f"the series cannot be assembled into a volume: {why}")
    groups: list[list[_Slice]] = []
    for s in slices:
        for g in groups:
            first = g[0]
            if np.abs(first.direction - s.direction).max() < ORIENTATION_TOLERANCE and first.pixels.shape == s.pixels.shape:
                g.append(s)
                break
        else:
            groups.append([s])
    volumes = [_assemble(g, series) for g in groups]
    volumes.sort(key=lambda v: -v.array.shape[0])
    return volumes


def assemble(series: Series) -> Volume:
    """The largest stack of a series (see :func:`stacks`)."""
    return stacks(series)[0]


def study_volumes(series_list: Iterable[Series], plane: str | None = None) -> list[Volume]:
    """The stacks of several series, optionally only those in ``plane``; series that cannot be assembled are skipped."""
    out: list[Volume] = []
    for series in series_list:
        try:
            out.extend(v for v in stacks(series) if plane is None or v.plane == plane)
        except NotApplicable:
            continue
    return out


def resample(volume: Volume, spacing: tuple[float, float, float], order: int = 1) -> Volume:
    """The volume resampled (SimpleITK) to ``spacing`` (slice, row, column, mm), same origin and extent."""
    import SimpleITK as sitk

    img = volume.to_sitk()
    new_xyz = (spacing[2], spacing[1], spacing[0])
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(img.GetSize(), img.GetSpacing(), new_xyz)]
    interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear}.get(order, sitk.sitkBSpline)
    out = sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), new_xyz, img.GetDirection(), 0.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(out)
    # each output slice takes the source frame nearest along the normal, so findings still point at an image
    nearest = np.clip(np.rint(np.arange(array.shape[0]) * spacing[0] / volume.spacing[0]).astype(int), 0, len(volume.sources) - 1)
    return Volume(
        array=array,
        spacing=tuple(float(s) for s in spacing),
        origin=volume.origin.copy(),
        direction=volume.direction.copy(),
        sources=[volume.sources[i] for i in nearest],
        series_instance_uid=volume.series_instance_uid,
        modality=volume.modality,
        irregular_spacing=volume.irregular_spacing,
    )


# ---------------------------------------------------------------------------


@dataclass
class _Slice:
    pixels: np.ndarray
    direction: np.ndarray
    position: np.ndarray
    spacing: tuple[float, float]
    source: SourceRef
    instance_number: int
    thickness: float | None


def _slice(ds: "pydicom.Dataset", pixels: np.ndarray, f: int, uid: str, reasons: set[str]) -> _Slice | None:
    direction = _orientation(_frame_attr(ds, "ImageOrientationPatient", f))
    position = _vector(_frame_attr(ds, "ImagePositionPatient", f), 3)
    spacing = _vector(_frame_attr(ds, "PixelSpacing", f), 2)
    if direction is None or position is None:
        reasons.add("an instance lacks ImageOrientationPatient or ImagePositionPatient")
        return None
    if spacing is None or np.any(spacing <= 0):
        reasons.add("an instance has no usable PixelSpacing")
        return None
    values = _rescale(ds, pixels[f], f)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        values = values.max() + values.min() - values
    thickness = _frame_attr(ds, "SliceThickness", f)
    number = ds.get("InstanceNumber")
    return _Slice(
        pixels=values.astype(np.float32),
        direction=direction,
        position=position,
        spacing=(float(spacing[0]), float(spacing[1])),
        source=SourceRef(uid, f + 1),
        instance_number=int(number) if number not in (None, "") else 0,
        thickness=float(thickness) if thickness not in (None, "") and float(thickness) > 0 else None,
    )


def _assemble(group: list[_Slice], series: Series) -> Volume:
    normal = group[0].direction[2]
    depth = np.array([s.position @ normal for s in group])
    order = np.lexsort((np.array([s.instance_number for s in group]), depth))
    kept: list[_Slice] = []
    kept_depth: list[float] = []
    for i in order:
        # a repeated position (a second acquisition in the same series) keeps the lowest InstanceNumber
        if kept_depth and abs(depth[i] - kept_depth[-1]) < 1e-3:
            continue
        kept.append(group[i])
        kept_depth.append(float(depth[i]))
    irregular = False
    if len(kept) > 1:
        gaps = np.diff(kept_depth)
        gap = float(np.median(gaps))
        irregular = bool(np.abs(gaps - gap).max() > SPACING_TOLERANCE * gap)
    else:
        gap = kept[0].thickness or 1.0
    row_spacing, col_spacing = kept[0].spacing
    return Volume(
        array=np.stack([s.pixels for s in kept]),
        spacing=(gap, row_spacing, col_spacing),
        origin=kept[0].position.astype(np.float64),
        direction=kept[0].direction.copy(),
        sources=[s.source for s in kept],
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        irregular_spacing=irregular,
    )


def _frame_attr(ds: "pydicom.Dataset", keyword: str, frame: int):
    """An attribute from the top level, else from the per-frame or shared functional groups of an enhanced object."""
    macro = {
        "ImageOrientationPatient": "PlaneOrientationSequence",
        "ImagePositionPatient": "PlanePositionSequence",
        "PixelSpacing": "PixelMeasuresSequence",
        "SliceThickness": "PixelMeasuresSequence",
        "RescaleSlope": "PixelValueTransformationSequence",
        "RescaleIntercept": "PixelValueTransformationSequence",
    }.get(keyword)
    if macro is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and frame < len(per_frame):
            item = per_frame[frame].get(macro)
            if item and keyword in item[0]:
                return item[0].get(keyword)
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            item = shared[0].get(macro)
            if item and keyword in item[0]:
                return item[0].get(keyword)
    return ds.get(keyword)


def _vector(value, n: int) -> np.ndarray | None:
    try:
        v = np.array([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.shape == (n,) and np.all(np.isfinite(v)) else None


def _orientation(value) -> np.ndarray | None:
    v = _vector(value, 6)
    if v is None:
        return None
    row, col = v[:3], v[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        return None
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-6:
        return None
    return np.stack([row, col, normal / np.linalg.norm(normal)])


def _rescale(ds: "pydicom.Dataset", stored: np.ndarray, frame: int) -> np.ndarray:
    slope = _frame_attr(ds, "RescaleSlope", frame)
    intercept = _frame_attr(ds, "RescaleIntercept", frame)
    slope = float(slope) if slope not in (None, "") else 1.0
    intercept = float(intercept) if intercept not in (None, "") else 0.0
    return stored * np.float32(slope if slope != 0 else 1.0) + np.float32(intercept)
