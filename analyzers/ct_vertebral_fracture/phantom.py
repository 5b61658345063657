"""Phantom CT studies of the thoracolumbar spine with fractures graded by height loss.

Each vertebra is drawn in its own frame along a curved spine (kyphosis, lordosis, mild
scoliosis): an elliptic body with a cortical shell and endplates around trabecular bone,
discs, the canal and posterior arch with spinous and transverse processes, ribs on T1-T12,
sternum, lungs, aorta (with or without contrast), fat and muscle, sacrum and iliac wings.
Every surface is drawn anti-aliased from a signed distance, so heights are defined below
the voxel size. Fractures are wedge, biconcave or crush deformities whose height loss is
drawn continuously across the Genant boundaries (20 %, 25 %, 40 %); normal vertebrae vary
in height and shape up to the 20 % boundary, so there is no gap at any grade boundary.
Confounders: osteophytes, Schmorl's nodes, degenerative endplates, contrast in the aorta,
metal (pedicle screws) with streaks. Field of view (whole torso or targeted on the spine),
pixel and slice spacing, z coverage, noise, kernel sharpness, rescale intercept, patient
position (head or feet first) and body part labelling vary from study to study.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from analyzers.phantoms import CT_IMAGE, PhantomPatient, image_dataset, new_uid, save, write_truth

if TYPE_CHECKING:  # pragma: no cover
    from analyzers.volume import Volume

from .constants import HEIGHT_LINE, CONTEXT_LEVELS, LEVELS, NOMINAL_HEIGHT, genant_grade

SHAPES = ("wedge", "biconcave", "crush")
FRACTURE_RATE = 0.14
"""Probability that a vertebra is fractured (Genant grade >= 1)."""
MEASURE_T = HEIGHT_LINE
MAX_VOXELS = 10_000_000
"""Largest phantom grid (slices x rows x columns); bounds the time and memory of one study."""


@dataclass
class VertebraTruth:
    label: str
    centroid: list[float]
    """Body centroid (LPS, mm)."""
    axis: list[float]
    """Unit vector along the spine (towards the head) at the vertebra."""
    heights: list[float]
    """Anterior, middle, posterior body height (mm)."""
    expected_height: float
    height_loss: float
    grade: int
    fractured: bool
    shape: str
    covered: bool
    """The whole body is inside the scanned range."""
    confounders: list[str] = field(default_factory=list)


@dataclass
class CtPhantom:
    """A phantom study as arrays: HU on a (slice, row, column) grid along +z, +y, +x (LPS)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    vertebrae: list[VertebraTruth]
    meta: dict[str, Any]

    def to_volume(self) -> "Volume":
        """The arrays as the volume the analyzer assembles from the DICOM series (no source frames)."""
        from dicomnode.analysis import SourceRef
        from analyzers.volume import Volume

        return Volume(
            array=self.hu, spacing=self.spacing, origin=np.asarray(self.origin, dtype=np.float64), direction=np.eye(3),
            sources=[SourceRef(f"phantom-slice-{k}") for k in range(self.hu.shape[0])], series_instance_uid="phantom", modality="CT",
        )

    def truth(self) -> dict[str, Any]:
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "shape": list(self.hu.shape),
            "vertebrae": [asdict(v) for v in self.vertebrae],
            **self.meta,
        }


class _Canvas:
    """The HU grid being drawn, with anti-aliased painting in local boxes."""

    def __init__(self, hu: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> None:
        self.hu = hu
        self.spacing = np.asarray(spacing, dtype=np.float64)  # (z, y, x)
        self.origin = np.asarray(origin, dtype=np.float64)  # (x, y, z)
        self.edge = float(max(spacing))

    def box(self, centre: np.ndarray, radius: float | np.ndarray) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Index slices of the grid within ``radius`` mm of ``centre`` (x, y, z) and the world points there."""
        radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (3,))
        lo = (centre - radius - self.origin) / self.spacing[::-1]
        hi = (centre + radius - self.origin) / self.spacing[::-1]
        shape = self.hu.shape[::-1]  # (x, y, z)
        lo_i = np.maximum(np.floor(lo).astype(int), 0)
        hi_i = np.minimum(np.ceil(hi).astype(int) + 1, shape)
        if np.any(hi_i <= lo_i):
            return None
        # float32 grids: the drawing is memory-bound and sub-micrometre precision is plenty
        xs = (self.origin[0] + np.arange(lo_i[0], hi_i[0]) * self.spacing[2]).astype(np.float32)
        ys = (self.origin[1] + np.arange(lo_i[1], hi_i[1]) * self.spacing[1]).astype(np.float32)
        zs = (self.origin[2] + np.arange(lo_i[2], hi_i[2]) * self.spacing[0]).astype(np.float32)
        z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
        pts = np.stack([x, y, z], axis=-1)
        return (slice(lo_i[2], hi_i[2]), slice(lo_i[1], hi_i[1]), slice(lo_i[0], hi_i[0])), pts

    def paint(self, where: tuple[slice, slice, slice], dist: np.ndarray, value: np.ndarray | float) -> None:
        """Blend ``value`` in where the signed distance ``dist`` (mm, positive inside) is positive."""
        alpha = np.clip(dist / self.edge + 0.5, 0.0, 1.0).astype(np.float32)
        region = self.hu[where]
        region += alpha * (np.asarray(value, dtype=np.float32) - region)


def _frame(axis: np.ndarray) -> np.ndarray:
    """Rows: lateral (x), anteroposterior (y, posterior), axial (z, towards the head) unit vectors."""
    ez = axis / np.linalg.norm(axis)
    ey = np.array([0.0, 1.0, 0.0]) - ez[1] * ez
    ey /= np.linalg.norm(ey)
    ex = np.cross(ey, ez)
    return np.stack([ex, ey, ez])


def _local(pts: np.ndarray, centre: np.ndarray, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rel = pts - centre.astype(np.float32)
    f = frame.astype(np.float32)
    return rel @ f[0], rel @ f[1], rel @ f[2]


def _box_dist(*pairs: tuple[np.ndarray, float]) -> np.ndarray:
    """Signed distance (approximate, positive inside) of an axis-aligned box in local coordinates."""
    return np.minimum.reduce([half - np.abs(c) for c, half in pairs])


@dataclass
class _Vertebra:
    label: str
    centre: np.ndarray
    frame: np.ndarray
    height: float
    a: float
    b: float
    loss: float
    shape: str
    top_share: float
    trab: float
    cortex: float
    endplate: float
    confounders: list[str]
    schmorl: tuple[float, float, float, float] | None = None
    sclerosis: float = 0.0

    def surfaces(self, q: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Half-heights above and below the centre at normalised lateral q and AP t positions."""
        rho = np.sqrt(q * q + t * t)
        if self.shape == "wedge":
            profile = np.clip((MEASURE_T - t) / (2 * MEASURE_T), 0.0, 1.1)
        elif self.shape == "biconcave":
            profile = np.clip(1.0 - (rho / MEASURE_T) ** 2, 0.0, 1.0)
        else:
            profile = np.ones_like(t)
        cut = self.height * self.loss * profile
        return self.height / 2 - self.top_share * cut, self.height / 2 - (1 - self.top_share) * cut

    def heights(self) -> list[float]:
        out = []
        for t in (-MEASURE_T, 0.0, MEASURE_T):
            top, bot = self.surfaces(np.zeros(1), np.full(1, t))
            out.append(float(top[0] + bot[0]))
        return out


def _levels(rng: np.random.Generator, size: float) -> list[dict[str, Any]]:
    """Body sizes and disc heights from C3 to the sacrum."""
    out = []
    for i, label in enumerate(CONTEXT_LEVELS):
        region = label[0]
        k = i - CONTEXT_LEVELS.index("T1")
        if region == "C":
            a, b, disc = 8.0, 11.0, 5.0
        elif region == "T":
            a, b, disc = 9.0 + 0.55 * k, 13.0 + 0.55 * k, 3.5 + 0.25 * k
        else:
            j = int(label[1:]) - 1
            a, b, disc = 16.0 + 0.4 * j, 22.0 + 0.8 * j, 8.0 + 0.6 * j
        out.append({
            "label": label,
            "height": NOMINAL_HEIGHT[label] * size * rng.uniform(0.94, 1.06),
            "a": a * size * rng.uniform(0.94, 1.06),
            "b": b * size * rng.uniform(0.94, 1.06),
            "disc": disc * size * rng.uniform(0.8, 1.15),
        })
    return out


def _deformity(rng: np.random.Generator, label: str) -> tuple[float, str, float]:
    """Height loss, shape and the share of it at the upper endplate; normal shapes go up to 20 %."""
    if label in LEVELS and rng.random() < FRACTURE_RATE:
        loss = rng.uniform(0.20, 0.60)
        shape = str(rng.choice(SHAPES, p=[0.5, 0.3, 0.2]))
    else:
        # physiological wedging (thoracic), mild concavity or a small body: continuous up to the boundary
        loss = rng.uniform(0.0, 0.20) if rng.random() < 0.7 else rng.uniform(0.0, 0.08)
        shape = str(rng.choice(SHAPES, p=[0.55, 0.3, 0.15]))
    top = {"wedge": rng.uniform(0.6, 1.0), "biconcave": rng.uniform(0.35, 0.65), "crush": rng.uniform(0.4, 0.6)}[shape]
    return float(loss), shape, float(top)


def render(rng: np.random.Generator) -> CtPhantom:
    """One phantom study as an HU array with ground truth."""
    size = rng.uniform(0.88, 1.12)
    levels = _levels(rng, size)
    kyphosis, lordosis, cervical = rng.uniform(10, 35), rng.uniform(8, 25), rng.uniform(3, 12)
    scoliosis = rng.uniform(-10, 10)
    rx, ry = rng.uniform(135, 175) * size, rng.uniform(95, 125) * size
    back = rng.uniform(70, 95) * size
    fat = rng.uniform(5, 30)
    trab_base = rng.uniform(70, 240)  # osteoporotic to young bone

    # positions along the spine (u grows downwards from the top of C3)
    u, centres_u = 0.0, []
    for lv in levels:
        centres_u.append(u + lv["height"] / 2)
        u += lv["height"] + lv["disc"]
    sacrum_u = u + 15.0
    t_of = {lv["label"]: cu for lv, cu in zip(levels, centres_u)}
    span_t = (t_of["T1"], t_of["T12"])
    span_l = (t_of["L1"], t_of["L5"])

    def bump(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return np.exp(-(((x - (lo + hi) / 2) / ((hi - lo) / 2 + 1e-6)) ** 2) * 1.5)

    def curve(uu: np.ndarray) -> np.ndarray:
        uu = np.asarray(uu, dtype=np.float64)
        y = kyphosis * bump(uu, *span_t) - lordosis * bump(uu, *span_l) - cervical * bump(uu, 0.0, t_of["C7"])
        x = scoliosis * np.sin(np.pi * (uu - span_t[0]) / (span_l[1] - span_t[0]))
        return np.stack([x, y, -uu], axis=-1)

    def axis_at(uu: float) -> np.ndarray:
        d = curve(uu - 1.0) - curve(uu + 1.0)
        return d / np.linalg.norm(d)

    # scanned range: whole thoracolumbar spine, chest, abdomen or a short thoracolumbar segment
    scenario = str(rng.choice(["full", "chest", "abdomen", "thoracolumbar"], p=[0.4, 0.2, 0.25, 0.15]))
    lo_label, hi_label = {
        "full": (str(rng.choice(["C6", "C7", "T1"])), str(rng.choice(["L5", "L5", "L4"]))),
        "chest": (str(rng.choice(["C6", "C7", "T1", "T2"])), str(rng.choice(["T12", "L1", "L2"]))),
        "abdomen": (str(rng.choice(["T8", "T9", "T10", "T11"])), "L5"),
        "thoracolumbar": (str(rng.choice(["T8", "T9", "T10"])), str(rng.choice(["L2", "L3"]))),
    }[scenario]
    z_top = -t_of[lo_label] + rng.uniform(-5, 15)
    z_bottom = -(sacrum_u + 25) if hi_label == "L5" and rng.random() < 0.6 else -t_of[hi_label] - rng.uniform(5, 25)
    dz = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0], p=[0.08, 0.07, 0.15, 0.25, 0.2, 0.25]))
    n_slices = int((z_top - z_bottom) / dz) + 1

    mid_u = 0.5 * (-z_top - z_bottom)
    spine_mid = curve(mid_u)
    targeted = rng.random() < 0.2
    if targeted:
        fov = rng.uniform(150, 240)
        dx = rng.uniform(0.6, 0.95)
        cx, cy = spine_mid[0] + rng.uniform(-10, 10), spine_mid[1] + back * 0.3 + rng.uniform(-15, 15)
    else:
        fov = 2 * rx + rng.uniform(10, 70)
        dx = rng.uniform(1.1, 1.7)
        cx, cy = rng.uniform(-10, 10), spine_mid[1] - (ry - back) + rng.uniform(-10, 10)
    n = int(fov / dx)
    # keep a phantom within MAX_VOXELS: thinner slices on a finer grid make coarser slices, as a
    # reconstruction for a smaller workstation would (no random draw here, so seeds stay put)
    while n_slices * n * n > MAX_VOXELS and dz < 3.0:
        dz = min(3.0, dz + 0.5)
        n_slices = int((z_top - z_bottom) / dz) + 1
    if n_slices * n * n > MAX_VOXELS:
        dx *= float(np.sqrt(n_slices * n * n / MAX_VOXELS))
        n = int(fov / dx)
    origin = (cx - n * dx / 2, cy - n * dx / 2, z_bottom)
    spacing = (dz, dx, dx)

    air = -1000.0
    hu = np.full((n_slices, n, n), air, dtype=np.float32)
    canvas = _Canvas(hu, spacing, origin)
    xs = origin[0] + np.arange(n) * dx
    ys = origin[1] + np.arange(n) * dx
    zs = origin[2] + np.arange(n_slices) * dz
    t1_z, c7_z = -t_of["T1"], -t_of["C7"]
    lung_top, lung_base = -t_of["T1"] + 10, -t_of[str(rng.choice(["T10", "T11", "T12"]))]
    contrast = rng.random() < 0.4
    aorta_hu = rng.uniform(150, 350) if contrast else rng.uniform(35, 50)
    muscle = rng.uniform(40, 60)

    # soft tissue slice by slice: skin, subcutaneous fat, muscle/organs, lungs, aorta, canal
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    for k, z in enumerate(zs):
        uu = -z
        sp = curve(np.array(uu))
        neck = np.clip((z - (c7_z + t1_z) / 2) / 15.0, 0.0, 1.0)  # 0 torso, 1 neck
        ex_rx = rx * (1 - neck) + 60 * size * neck
        ex_ry = ry * (1 - neck) + 55 * size * neck
        ybody = sp[1] - (ry - back) * (1 - neck) - 25 * neck
        rr = ((xx - 0) / ex_rx) ** 2 + ((yy - ybody) / ex_ry) ** 2
        sl = hu[k]
        sl[rr <= 1.0] = -100.0
        inner = ((xx / (ex_rx - fat)) ** 2 + ((yy - ybody) / (ex_ry - fat)) ** 2) <= 1.0
        sl[inner] = muscle
        if lung_base < z < lung_top:
            zf = np.sqrt(np.clip(1 - ((z - (lung_top + lung_base) / 2) / ((lung_top - lung_base) / 2)) ** 2, 0, 1))
            for side in (-1, 1):
                lx = ((xx - side * 0.5 * rx) / (0.36 * rx * zf + 1e-3)) ** 2 + ((yy - (ybody - 0.05 * ry)) / (0.68 * ry * zf + 1e-3)) ** 2
                sl[lx <= 1.0] = -850.0
        if -t_of["L4"] < z < -t_of["T4"]:
            ax, ay = sp[0] + 18 * size, sp[1] - 30 * size
            sl[((xx - ax) ** 2 + (yy - ay) ** 2) <= (11 * size) ** 2] = aorta_hu

    body = []
    confounders_all: dict[str, list[str]] = {}
    for lv, cu in zip(levels, centres_u):
        loss, shape, top = _deformity(rng, lv["label"])
        conf: list[str] = []
        v = _Vertebra(
            label=lv["label"], centre=curve(cu), frame=_frame(axis_at(cu)), height=lv["height"], a=lv["a"], b=lv["b"],
            loss=loss, shape=shape, top_share=top, trab=trab_base + rng.uniform(-25, 25), cortex=rng.uniform(500, 900),
            endplate=rng.uniform(0.9, 1.5), confounders=conf,
        )
        if loss >= 0.2 and rng.random() < 0.5:
            v.sclerosis = rng.uniform(40, 120)
        if rng.random() < 0.12:
            conf.append("degenerative_endplates")
            v.endplate = rng.uniform(2.0, 3.0)
            v.cortex = rng.uniform(800, 1100)
        if rng.random() < 0.1:
            conf.append("schmorl_node")
            r = rng.uniform(0.1, 0.55)
            ang = rng.uniform(0, 2 * np.pi)
            v.schmorl = (r * np.cos(ang) * v.b, r * np.sin(ang) * v.a, float(rng.choice([-1.0, 1.0])), rng.uniform(2.0, 4.0))
        if rng.random() < 0.15:
            conf.append("osteophytes")
        body.append(v)
        confounders_all[v.label] = conf

    # discs first (the bodies overwrite their overlap and the disc fills concave endplates)
    for upper, lower, lv in zip(body[:-1], body[1:], levels[:-1]):
        centre = (upper.centre + lower.centre) / 2
        frame = _frame(upper.frame[2] + lower.frame[2])
        gap = float(np.linalg.norm(upper.centre - lower.centre)) - (upper.height + lower.height) / 2
        half = gap / 2 + 0.35 * max(upper.height, lower.height) * max(upper.loss, lower.loss, 0.1) + 1.5
        got = canvas.box(centre, max(lower.b, lower.a) + half + 4)
        if got is None:
            continue
        where, pts = got
        lx, ly, lz = _local(pts, centre, frame)
        a, b = (upper.a + lower.a) / 2 * 0.97, (upper.b + lower.b) / 2 * 0.97
        rho = np.sqrt((lx / b) ** 2 + (ly / a) ** 2)
        dist = np.minimum(half - np.abs(lz), (1 - rho) * min(a, b))
        disc_hu = rng.uniform(75, 105) if "degenerative_endplates" not in lower.confounders else rng.uniform(90, 130)
        canvas.paint(where, dist, disc_hu)

    for v in body:
        _draw_vertebra(canvas, v, rng, size)
    _draw_ribs_and_sternum(canvas, body, rng, rx, ry, back, fat, size)
    _draw_pelvis(canvas, curve(sacrum_u), _frame(axis_at(sacrum_u)), rng, size)

    metal_level = None
    if rng.random() < 0.15:
        candidates = [v for v in body if v.label in LEVELS and zs[0] + 20 < v.centre[2] < zs[-1] - 20]
        if candidates:
            mv = candidates[int(rng.integers(len(candidates)))]
            metal_level = mv.label
            _draw_screws(canvas, mv, rng)

    # scanner: kernel blur, correlated noise
    blur = rng.uniform(0.3, 0.8)
    ndimage.gaussian_filter(hu, sigma=[blur / s for s in spacing], output=hu, truncate=2.5)
    sigma = rng.uniform(8, 40)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    ndimage.gaussian_filter(noise, sigma=(0, 0.6, 0.6), output=noise, truncate=2.0)
    hu += noise * np.float32(sigma / 0.45)
    del noise
    np.clip(hu, -1024, 3071, out=hu)

    vertebrae = []
    for v in body:
        if v.label not in LEVELS:
            continue
        heights = v.heights()
        expected = v.height
        loss = 1.0 - min(heights) / expected
        margin = v.height / 2 + 1.0
        vertebrae.append(VertebraTruth(
            label=v.label,
            centroid=[float(c) for c in v.centre],
            axis=[float(c) for c in v.frame[2]],
            heights=heights,
            expected_height=float(expected),
            height_loss=float(loss),
            grade=genant_grade(loss),
            fractured=genant_grade(loss) >= 1,
            shape=v.shape,
            covered=bool(zs[0] + margin <= v.centre[2] <= zs[-1] - margin),
            confounders=confounders_all[v.label] + (["metal"] if v.label == metal_level else []),
        ))
    meta = {
        "all_centroids": {v.label: [float(c) for c in v.centre] for v in body},
        "scenario": scenario, "targeted_fov": bool(targeted), "contrast": bool(contrast), "metal_level": metal_level,
        "noise_hu": float(sigma), "trabecular_hu": float(trab_base), "size": float(size),
    }
    return CtPhantom(hu=hu, spacing=spacing, origin=origin, vertebrae=vertebrae, meta=meta)


def _draw_vertebra(canvas: _Canvas, v: _Vertebra, rng: np.random.Generator, size: float) -> None:
    canal_x, canal_y = (10.0 + 1.5 * (v.label[0] == "L")) * size, 7.5 * size
    canal_c = v.a + canal_y + 1.5
    arch = rng.uniform(3.5, 5.5) * size
    spin_len = rng.uniform(25, 40) * size
    tp_len = rng.uniform(18, 32) * size * (1.3 if v.label[0] == "L" else 1.0)
    extent = max(v.b + tp_len + canal_x, canal_c + canal_y + arch + spin_len) + 4
    got = canvas.box(v.centre, np.array([extent, extent, v.height / 2 + 30]))
    if got is None:
        return
    where, pts = got
    lx, ly, lz = _local(pts, v.centre, v.frame)
    keep = (np.abs(lz) < v.height) & (ly > -v.a - 12)
    if not keep.any():
        return

    # canal (CSF), then the posterior arch, spinous and transverse processes
    rc = np.sqrt((lx / canal_x) ** 2 + ((ly - canal_c) / canal_y) ** 2)
    canvas.paint(where, np.minimum((1 - rc) * canal_y, v.height * 0.5 + 3 - np.abs(lz)), 15.0)
    ring = np.minimum(np.minimum((rc - 1) * canal_y, arch - (rc - 1) * canal_y), 0.36 * v.height - np.abs(lz))
    ring = np.minimum(ring, ly - (v.a - 2))
    canvas.paint(where, ring, 450.0)
    slope = 0.6 if v.label[0] == "T" else 0.15
    s_start = canal_c + canal_y + arch * 0.5
    s_mid = s_start + spin_len / 2
    spinous = _box_dist((lx, 3.5 * size), (ly - s_mid, spin_len / 2), (lz + (ly - s_start) * slope, 0.25 * v.height + 1))
    canvas.paint(where, spinous, 420.0)
    for side in (-1.0, 1.0):
        tp = _box_dist((lx - side * (canal_x + tp_len / 2), tp_len / 2), (ly - canal_c, 5.0 * size), (lz, 4.5 * size))
        canvas.paint(where, tp, 380.0)

    # the body: cortical shell and endplates around trabecular bone
    q, t = lx / v.b, ly / v.a
    top, bot = v.surfaces(q, t)
    rho = np.sqrt(q * q + t * t)
    dist = np.minimum.reduce([top - lz, lz + bot, (1 - rho) * min(v.a, v.b)])
    inner = np.minimum.reduce([top - lz - v.endplate, lz + bot - v.endplate, (1 - rho) * min(v.a, v.b) - 1.0])
    w = np.clip(inner / canvas.edge + 0.5, 0.0, 1.0)
    value = v.cortex * (1 - w) + v.trab * w
    if v.sclerosis:
        value = value + w * v.sclerosis * np.exp(-np.clip(np.minimum(top - lz, lz + bot), 0, None) / 3.0)
    canvas.paint(where, np.where(keep, dist, -10.0), value)

    if v.schmorl is not None:
        sx, sy, side, r = v.schmorl
        z0 = (top if side > 0 else -bot)
        d = np.sqrt((lx - sx) ** 2 + (ly - sy) ** 2 + (lz - z0) ** 2)
        canvas.paint(where, np.where(keep, r + 1.0 - d, -10.0), 650.0)
        canvas.paint(where, np.where(keep, r - d, -10.0), 90.0)
    if "osteophytes" in v.confounders:
        for side in (-1.0, 1.0):
            zc = side * (v.height / 2 - 1)
            d = np.sqrt((lx / (7 * size)) ** 2 + ((ly + v.a + 1.5) / 3.5) ** 2 + ((lz - zc * 1.05) / 3.0) ** 2)
            canvas.paint(where, np.where(keep, (1 - d) * 3.0, -10.0), 600.0)


def _draw_ribs_and_sternum(canvas: _Canvas, body: list[_Vertebra], rng: np.random.Generator, rx: float, ry: float, back: float, fat: float, size: float) -> None:
    reach = {"T1": 0.55, "T11": 0.45, "T12": 0.3, "T8": 0.85, "T9": 0.8, "T10": 0.75}
    sternum_span = []
    for v in body:
        if not v.label.startswith("T"):
            continue
        frac = reach.get(v.label, 0.92) * rng.uniform(0.9, 1.05)
        drop = rng.uniform(20, 55) * size
        radius = (3.0 if v.label == "T1" else 4.5) * size
        ybody = v.centre[1] - (ry - back)
        for side in (-1.0, 1.0):
            start = v.centre + v.frame[0] * side * (v.b + 22 * size) + v.frame[1] * (v.a + 8 * size)
            a0 = np.arctan2((start[1] - ybody) / (ry - fat - 8), side * start[0] / (rx - fat - 8))
            steps = int(frac * np.pi * (rx + ry) / 2 / 2.0)
            for i in range(steps):
                s = i / max(steps - 1, 1)
                ang = a0 - s * frac * np.pi
                p = np.array([
                    side * (rx - fat - 8) * np.cos(ang) * min(1.0, 0.6 + 2 * s),
                    ybody + (ry - fat - 8) * np.sin(ang),
                    start[2] - drop * s ** 1.2,
                ])
                if s < 0.2:  # from the transverse process out to the arc
                    p = start * (1 - s / 0.2) + p * (s / 0.2)
                got = canvas.box(p, radius + 2)
                if got is None:
                    continue
                where, pts = got
                d = radius - np.linalg.norm(pts - p, axis=-1)
                canvas.paint(where, d, 380.0)
        if v.label in ("T2", "T9"):
            sternum_span.append(v)
    if len(sternum_span) == 2:
        top, low = sternum_span
        for s in np.linspace(0, 1, 40):
            c = top.centre * (1 - s) + low.centre * s
            ybody = c[1] - (ry - back)
            p = np.array([0.0, ybody - ry + fat + 14, c[2] - 25 * size])
            got = canvas.box(p, np.array([16.0, 7.0, 6.0]) * size)
            if got is None:
                continue
            where, pts = got
            rel = pts - p
            canvas.paint(where, _box_dist((rel[..., 0], 14 * size), (rel[..., 1], 5 * size), (rel[..., 2], 4 * size)), 350.0)


def _draw_pelvis(canvas: _Canvas, centre: np.ndarray, frame: np.ndarray, rng: np.random.Generator, size: float) -> None:
    got = canvas.box(centre, np.array([125.0, 70.0, 110.0]) * size)
    if got is None:
        return
    where, pts = got
    lx, ly, lz = _local(pts, centre, frame)
    sac = np.minimum.reduce([(1 - np.sqrt((lx / (26 * size)) ** 2 + (ly / (18 * size)) ** 2)) * 18 * size, 30 * size - np.abs(lz + 15 * size)])
    canvas.paint(where, sac, 260.0)
    for side in (-1.0, 1.0):
        d = np.sqrt(((lx - side * 80 * size) / (16 * size)) ** 2 + ((ly - 5) / (45 * size)) ** 2 + ((lz + 40 * size) / (55 * size)) ** 2)
        canvas.paint(where, (1 - d) * 14 * size, 320.0)
        canvas.paint(where, (0.8 - d) * 14 * size, 180.0)


def _draw_screws(canvas: _Canvas, v: _Vertebra, rng: np.random.Generator) -> None:
    """Pedicle screws (titanium-like HU) with streaks across the slices they occupy."""
    got = canvas.box(v.centre, 2.5 * max(v.a, v.b) + 20)
    if got is None:
        return
    where, pts = got
    lx, ly, lz = _local(pts, v.centre, v.frame)
    for side in (-1.0, 1.0):
        # along the pedicle: from behind the arch into the body, converging medially
        px = side * (v.b * 0.45 + (ly - (-v.a * 0.4)) * 0.25)
        screw = np.minimum.reduce([3.0 - np.sqrt((lx - px) ** 2 + lz ** 2), ly + v.a * 0.4, v.a + 30 - ly])
        canvas.paint(where, screw, 3000.0)
    k0, k1 = where[0].start, where[0].stop
    ks = [k for k in range(k0, k1) if abs(canvas.origin[2] + k * canvas.spacing[0] - v.centre[2]) < 5]
    n = canvas.hu.shape[1]
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    cr = (v.centre[1] - canvas.origin[1]) / canvas.spacing[1]
    cc = (v.centre[0] - canvas.origin[0]) / canvas.spacing[2]
    streak = np.zeros((n, n), np.float32)
    for _ in range(6):
        ang = rng.uniform(0, np.pi)
        d = np.abs((rows - cr) * np.cos(ang) - (cols - cc) * np.sin(ang))
        streak += float(rng.choice([-1.0, 1.0])) * rng.uniform(150, 450) * np.exp(-(d ** 2) / 4.0)
    fall = np.exp(-np.sqrt((rows - cr) ** 2 + (cols - cc) ** 2) * canvas.spacing[1] / 120.0)
    for k in ks:
        canvas.hu[k] += streak * fall


# ---------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------

BODY_PART_LABELS = ("SPINE", "TSPINE", "LSPINE", "CHEST", "ABDOMEN", "CHESTABDOMEN", "")


def write_study(phantom: CtPhantom, folder: Path, rng: np.random.Generator, index: int, prefix: str = "ctvfx") -> Path:
    """The phantom as one axial CT series (a file per slice) plus ``truth.json``."""
    patient = PhantomPatient.make(rng, prefix, index, study_description="CT THORAX ABDOMEN")
    feet_first = rng.random() < 0.3
    intercept = float(rng.choice([-1024.0, -1000.0]))
    part = str(rng.choice(BODY_PART_LABELS))
    kernel = str(rng.choice(["B30f", "B60f", "BONE", "STANDARD", "Br38f"]))
    series_uid = new_uid("series", patient.study_uid, "ct")
    frame_uid = new_uid("frame", patient.study_uid)
    dz, dy, dx = phantom.spacing
    n_slices, rows, cols = phantom.hu.shape
    order = range(n_slices - 1, -1, -1)  # head first: instance 1 at the top
    if feet_first and rng.random() < 0.5:
        order = range(n_slices)
    stored = np.clip(np.rint(phantom.hu - intercept), 0, 4095).astype(np.uint16)
    for number, k in enumerate(order, start=1):
        pixels = stored[k]
        x0 = phantom.origin[0]
        iop = [1, 0, 0, 0, 1, 0]
        if feet_first:  # feet-first supine: columns run to the patient's right
            pixels = pixels[:, ::-1]
            x0 = phantom.origin[0] + (cols - 1) * dx
            iop = [-1, 0, 0, 0, 1, 0]
        z = phantom.origin[2] + k * dz
        attrs: dict[str, Any] = {
            "ImagePositionPatient": [f"{x0:.4f}", f"{phantom.origin[1]:.4f}", f"{z:.4f}"],
            "ImageOrientationPatient": iop,
            "SliceThickness": f"{dz:.3g}",
            "SliceLocation": f"{z:.4f}",
            "RescaleIntercept": f"{intercept:.0f}",
            "RescaleSlope": "1",
            "RescaleType": "HU",
            "KVP": "120",
            "AcquisitionNumber": 1,
            "FrameOfReferenceUID": frame_uid,
            "PositionReferenceIndicator": "",
            "PatientPosition": "FFS" if feet_first else "HFS",
            "ConvolutionKernel": kernel,
            "WindowCenter": "400",
            "WindowWidth": "1800",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        }
        if part:
            attrs["BodyPartExamined"] = part
        ds = image_dataset(
            np.ascontiguousarray(pixels), patient=patient, modality="CT", sop_class_uid=CT_IMAGE, series_uid=series_uid,
            series_number=2, instance_number=number, series_description="Thorax Abdomen 2.0 bone" if rng.random() < 0.5 else "CT BODY",
            pixel_spacing=(dy, dx), bits_stored=12, attributes=attrs,
        )
        save(ds, folder)
    truth = phantom.truth()
    truth.update({"study_instance_uid": patient.study_uid, "series_instance_uid": series_uid, "feet_first": bool(feet_first), "rescale_intercept": intercept})
    write_truth(folder, truth)
    return folder


def phantom_rng(seed: int, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"ct_vertebral_fracture:{seed}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def write_phantoms(out_dir: Path, n: int, seed: int) -> list[Path]:
    folders = []
    for i in range(n):
        rng = phantom_rng(seed, i)
        phantom = render(rng)
        folders.append(write_study(phantom, Path(out_dir) / f"study_{seed}_{i:04d}", rng, i))
    return folders
