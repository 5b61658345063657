"""Phantom lateral cervical and lumbar spine radiographs with known keypoints.

Each phantom is a lateral CR/DX image of one spine region. The spine is built
in mm (patient facing +x, +y up) from vertebral bodies of varying depth, height
and wedging, discs of varying height and angle (lordosis), optional listhesis,
posterior elements with a spinous process, and the neighbouring vertebrae
(C2 and T1, or T12 and the sacrum). It is then drawn into soft tissue
(neck with airway, skull base and shoulders; abdomen with ribs, iliac crest and
bowel gas) with varying contrast, blur, noise and exposure gradient. Some
studies carry occluders: metal implants, a cervical collar, collimation or a
field edge that cuts off part of the spine. A keypoint under metal, under
collimation or outside the image is recorded as invisible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from analyzers import phantoms

from .constants import CERVICAL, LEVELS, LUMBAR
from .mensuration import measure

REGION_BODY_PART = {"cervical": "CSPINE", "lumbar": "LSPINE"}


@dataclass
class Vertebra:
    label: str
    points: np.ndarray
    """(5, 2) mm in the sagittal frame: AS, PS, PI, AI, spinous tip."""
    labelled: bool
    density: float
    pedicle: np.ndarray = field(default_factory=lambda: np.zeros((4, 2)))
    process: np.ndarray = field(default_factory=lambda: np.zeros((4, 2)))


@dataclass
class PhantomImage:
    """A rendered phantom: stored pixels plus ground truth in pixel coordinates."""

    region: str
    pixels: np.ndarray
    spacing: tuple[float, float]
    photometric: str
    points: dict[str, np.ndarray]
    visible: dict[str, np.ndarray]
    view: str
    window: tuple[float, float] | None
    occluders: list[str]


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _vertebra(rng: np.random.Generator, label: str, base_p: np.ndarray, phi: float, depth: float, ha: float, hp: float, sp_len: float, sp_angle: float, labelled: bool, density: float) -> Vertebra:
    """Vertebra whose posterior-inferior corner is ``base_p`` and inferior endplate has angle ``phi``."""
    e = np.array([math.cos(phi), math.sin(phi)])
    n = np.array([-math.sin(phi), math.cos(phi)])
    pi = base_p
    ai = pi + depth * e
    ps = pi + hp * n + rng.normal(0, 0.03 * depth) * e
    as_ = ai + ha * n + rng.normal(0, 0.03 * depth) * e
    wall_dir = _unit(ps - pi)
    back = _unit(-e + 0.0 * n)
    mid = pi + 0.5 * (ps - pi)
    # the spinous process points posteriorly and caudally from the posterior wall
    tip_dir = np.array([math.cos(math.pi + phi + sp_angle), math.sin(math.pi + phi + sp_angle)])
    tip = mid + sp_len * tip_dir
    p_len = 0.35 * sp_len
    top = pi + 0.8 * (ps - pi)
    bot = pi + 0.3 * (ps - pi)
    pedicle = np.array([top, top + p_len * back, bot + p_len * back, bot])
    base_top = top + p_len * back + 0.15 * hp * wall_dir
    base_bot = bot + p_len * back - 0.25 * hp * wall_dir
    half = 0.07 * hp * wall_dir
    process = np.array([base_top, tip + half, tip - half, base_bot])
    pts = np.array([as_, ps, pi, ai, tip])
    return Vertebra(label, pts, labelled, density, pedicle, process)


def build_spine(rng: np.random.Generator, region: str) -> tuple[list[Vertebra], dict[str, Any]]:
    """Vertebrae bottom-up in the sagittal mm frame, with the parameters drawn."""
    cervical = region == "cervical"
    if cervical:
        labels = ["T1", *reversed(CERVICAL), "C2"]
        scale = rng.uniform(0.85, 1.15)
        depth0, height0 = 16.0 * scale, 13.5 * scale * rng.uniform(0.9, 1.1)
        disc0 = rng.uniform(3.5, 6.0) * scale
        lordosis = rng.normal(14.0, 12.0)
        sp0 = rng.uniform(20, 28) * scale
        slip_mm = (1.5, 4.0)
    else:
        labels = ["S1", *reversed(LUMBAR), "T12"]
        scale = rng.uniform(0.85, 1.15)
        depth0, height0 = 44.0 * scale, 27.0 * scale * rng.uniform(0.9, 1.1)
        disc0 = rng.uniform(7.0, 12.0) * scale
        lordosis = rng.normal(38.0, 12.0)
        sp0 = rng.uniform(38, 50) * scale
        slip_mm = (3.0, 10.0)
    n_levels = 4
    weights = np.linspace(0.8, 1.2, n_levels) if not cervical else np.ones(n_levels)
    weights = weights * rng.uniform(0.6, 1.4, n_levels)
    # part of the lordosis lives in the discs, a little in the vertebral wedges
    disc_angles = (0.85 * lordosis) * weights / weights.sum()
    vertebrae: list[Vertebra] = []
    density_base = rng.uniform(0.55, 0.9)
    phi = math.radians(rng.uniform(-8, 8)) if cervical else math.radians(rng.uniform(15, 35))
    base = np.zeros(2)
    params: dict[str, Any] = {"lordosis_target": lordosis, "listhesis": {}, "wedged": []}
    prev: Vertebra | None = None
    label_order = list(LEVELS[region])
    for k, label in enumerate(labels):
        labelled = label in label_order
        f = 1.0 + (0.03 if cervical else 0.02) * (len(labels) - 1 - k)
        depth = depth0 * f * rng.uniform(0.93, 1.07)
        h = height0 * rng.uniform(0.92, 1.08) * (1.15 if label in ("C2", "T1", "S1") else 1.0)
        ha, hp = h, h * rng.uniform(0.97, 1.07) if cervical else h * rng.uniform(0.9, 1.02)
        if label == "S1":
            ha, hp = h * 1.1, h * 0.8
        wedge = (0.15 * lordosis / 5.0) * math.pi / 180 * depth
        ha += 0.5 * wedge
        hp -= 0.5 * wedge
        if labelled and rng.random() < 0.1:
            ha *= rng.uniform(0.6, 0.85)
            params["wedged"].append(label)
        sp_len = sp0 * rng.uniform(0.9, 1.1) * (1.3 if label in ("C7", "T1") else 1.0)
        sp_angle = math.radians(rng.uniform(15, 35) if cervical else rng.uniform(5, 20))
        if prev is not None:
            up_i = labels.index(label) - 1
            # disc above `prev`: angle from the lordosis budget (labelled levels) or small
            a_deg = disc_angles[up_i - 1] if 1 <= up_i <= n_levels else rng.uniform(0, 6)
            a = math.radians(a_deg)
            mean_h = disc0 * rng.uniform(0.75, 1.2)
            if label in ("S1",) or (labelled and rng.random() < 0.15):
                mean_h *= rng.uniform(0.35, 0.7)
            d_e = prev.points[0] - prev.points[1]
            phi_s = math.atan2(d_e[1], d_e[0])
            pdepth = float(np.linalg.norm(d_e))
            dp = max(mean_h - 0.5 * pdepth * math.tan(a), 0.6)
            n_s = np.array([-math.sin(phi_s), math.cos(phi_s)])
            e_s = np.array([math.cos(phi_s), math.sin(phi_s)])
            shift = 0.0
            if labelled and prev.labelled and rng.random() < 0.15:
                shift = rng.uniform(*slip_mm) * rng.choice([-1.0, 1.0])
                params["listhesis"][f"{label}-{prev.label}"] = shift
            base = prev.points[1] + dp * n_s + shift * e_s
            phi = phi_s + a
        v = _vertebra(rng, label, base, phi, depth, ha, hp, sp_len, sp_angle, labelled, density_base * rng.uniform(0.9, 1.1))
        vertebrae.append(v)
        prev = v
    # stand the labelled span upright; the renderer adds the patient's own tilt
    ends = [v.points[:4].mean(0) for v in vertebrae if v.labelled]
    axis = ends[-1] - ends[0]
    turn = math.pi / 2 - math.atan2(axis[1], axis[0])
    rot = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    for v in vertebrae:
        v.points = v.points @ rot.T
        v.pedicle = v.pedicle @ rot.T
        v.process = v.process @ rot.T
    return vertebrae, params


# ---------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------


def _convex_sdf(shape: tuple[int, int], poly: np.ndarray, pad: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Signed distance (pixels, negative inside) to a convex polygon over its bounding box."""
    lo = np.floor(poly.min(0) - pad).astype(int)
    hi = np.ceil(poly.max(0) + pad).astype(int)
    c0, r0 = max(lo[0], 0), max(lo[1], 0)
    c1, r1 = min(hi[0], shape[1]), min(hi[1], shape[0])
    if c1 <= c0 or r1 <= r0:
        return None
    cc, rr = np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5)
    area = 0.0
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        area += a[0] * b[1] - b[0] * a[1]
    sign = 1.0 if area > 0 else -1.0
    d = np.full(cc.shape, -np.inf)
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        t = b - a
        normal = sign * np.array([t[1], -t[0]]) / max(float(np.hypot(*t)), 1e-9)
        d = np.maximum(d, (cc - a[0]) * normal[0] + (rr - a[1]) * normal[1])
    return (slice(r0, r1), slice(c0, c1)), d


def _fill(canvas: np.ndarray, poly: np.ndarray, value: float, soft: float = 0.6, rim: float = 0.0, rim_width: float = 2.0, texture: np.ndarray | None = None) -> None:
    got = _convex_sdf(canvas.shape, poly, pad=3 * soft + rim_width + 2)
    if got is None:
        return
    sl, d = got
    inside = 1.0 / (1.0 + np.exp(np.clip(d / soft, -30, 30)))
    add = value * inside
    if texture is not None:
        add = add * texture[sl]
    if rim:
        add = add + rim * np.exp(-((d + 0.5 * rim_width) / rim_width) ** 2) * inside
    canvas[sl] += add


def _ellipse(canvas: np.ndarray, centre: np.ndarray, axes: tuple[float, float], angle: float, value: float, soft: float = 1.5) -> None:
    r = max(axes) + 4 * soft
    c0, c1 = int(max(centre[0] - r, 0)), int(min(centre[0] + r, canvas.shape[1]))
    r0, r1 = int(max(centre[1] - r, 0)), int(min(centre[1] + r, canvas.shape[0]))
    if c1 <= c0 or r1 <= r0:
        return
    cc, rr = np.meshgrid(np.arange(c0, c1) + 0.5 - centre[0], np.arange(r0, r1) + 0.5 - centre[1])
    ca, sa = math.cos(angle), math.sin(angle)
    u = (cc * ca + rr * sa) / max(axes[0], 1e-3)
    v = (-cc * sa + rr * ca) / max(axes[1], 1e-3)
    d = (np.sqrt(u * u + v * v) - 1.0) * min(axes)
    canvas[r0:r1, c0:c1] += value / (1.0 + np.exp(np.clip(d / soft, -30, 30)))


def _arc(canvas: np.ndarray, centre: np.ndarray, radius: float, a0: float, a1: float, width: float, value: float) -> None:
    for a in np.linspace(a0, a1, 40):
        p = centre + radius * np.array([math.cos(a), math.sin(a)])
        _ellipse(canvas, p, (width, width), 0.0, value / 3.0, soft=width / 2)


def render(rng: np.random.Generator, region: str) -> PhantomImage:
    """Draw one phantom lateral radiograph of ``region`` (``"cervical"`` or ``"lumbar"``)."""
    cervical = region == "cervical"
    vertebrae, params = build_spine(rng, region)
    # pixel spacing a few times coarser than a detector's (0.1-0.2 mm) to keep phantoms small, yet
    # alike for both regions: a lumbar field of view (about 230-380 mm) takes more pixels
    spacing = round(float(rng.uniform(0.24, 0.34) if cervical else rng.uniform(0.3, 0.4)), 5)
    scale = 1.0 if cervical else 1.6
    rows = int(rng.integers(480, 640) * scale)
    cols = int(rng.integers(440, 600) * scale)
    face = float(rng.choice([-1.0, 1.0]))
    tilt = math.radians(rng.uniform(-10, 10))
    labelled = [v for v in vertebrae if v.labelled]
    centre_mm = np.mean([v.points[:4].mean(0) for v in labelled], axis=0)
    shift_mm = rng.normal(0, 8.0 if cervical else 15.0, 2)
    cut = None
    if rng.random() < 0.1:
        cut = str(rng.choice(["top", "bottom"]))
    rot = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
    span = max(float(np.ptp(np.concatenate([v.points for v in labelled])[:, 1])), 1.0)

    def to_px(p: np.ndarray) -> np.ndarray:
        q = (np.asarray(p) - centre_mm) @ rot.T + shift_mm
        col = cols / 2 + face * q[..., 0] / spacing
        row = rows / 2 - q[..., 1] / spacing
        return np.stack([col, row], axis=-1)

    # keep every labelled vertebra (with its process) inside the image
    allp = to_px(np.concatenate([v.points for v in labelled]))
    lo, hi = allp.min(0), allp.max(0)
    dx = max(0.0, 8 - lo[0]) - max(0.0, hi[0] - (cols - 8))
    dy = max(0.0, 8 - lo[1]) - max(0.0, hi[1] - (rows - 8))
    if cut is not None:
        # move the spine so the field edge falls through the end vertebra's body
        end = labelled[-1] if cut == "top" else labelled[0]
        end_px = to_px(end.points[:4])
        frac = rng.uniform(0.15, 0.45) * float(np.ptp(end_px[:, 1]))
        dy = (frac - end_px[:, 1].min()) if cut == "top" else (rows + frac - end_px[:, 1].max())
    shift_mm = shift_mm + np.array([face * dx * spacing, -dy * spacing]) @ rot

    mm_px = 1.0 / spacing
    soft_tissue = np.zeros((rows, cols), np.float32)
    bone = np.zeros((rows, cols), np.float32)
    metal = np.zeros((rows, cols), np.float32)
    grain = ndimage.gaussian_filter(rng.normal(0, 1, (rows, cols)).astype(np.float32), rng.uniform(1.0, 2.5))
    grain = 1.0 + rng.uniform(0.1, 0.3) * grain / (grain.std() + 1e-6)

    # soft tissue: a body band along the spine, anterior structures, context bones
    anterior = np.array([1.0, 0.0])
    up = np.array([0.0, 1.0])
    body_c = centre_mm + anterior * (rng.uniform(10, 30) if cervical else rng.uniform(40, 80))
    width = (rng.uniform(110, 150) if cervical else rng.uniform(260, 360)) * mm_px
    _ellipse(soft_tissue, to_px(body_c), (width / 2, 600 * mm_px), tilt * -face, rng.uniform(0.25, 0.45), soft=6 * mm_px)
    if cervical:
        airway_c = centre_mm + anterior * (float(np.mean([v.points[0, 0] for v in labelled]) - centre_mm[0] + rng.uniform(12, 22)))
        _ellipse(soft_tissue, to_px(airway_c), (rng.uniform(5, 9) * mm_px, 120 * mm_px), -face * tilt + rng.normal(0, 0.05), -rng.uniform(0.1, 0.2), soft=2 * mm_px)
        top = max(v.points[:, 1].max() for v in vertebrae)
        _ellipse(bone, to_px(np.array([centre_mm[0] - 10, top + rng.uniform(25, 40)])), (70 * mm_px, 30 * mm_px), rng.normal(0, 0.2), rng.uniform(0.3, 0.6), soft=5 * mm_px)
        _ellipse(bone, to_px(np.array([centre_mm[0] + 45, top + rng.uniform(0, 15)])), (35 * mm_px, 12 * mm_px), rng.normal(0.4, 0.2), rng.uniform(0.25, 0.5), soft=3 * mm_px)
        if rng.random() < 0.8:
            bottom = min(v.points[:, 1].min() for v in vertebrae)
            _ellipse(soft_tissue, to_px(np.array([centre_mm[0] - rng.uniform(0, 30), bottom - rng.uniform(-15, 25)])), (120 * mm_px, 45 * mm_px), 0.0, rng.uniform(0.2, 0.7), soft=10 * mm_px)
    else:
        for _ in range(int(rng.integers(2, 7))):
            c = centre_mm + anterior * rng.uniform(30, 120) + up * rng.uniform(-120, 120)
            _ellipse(soft_tissue, to_px(c), (rng.uniform(8, 30) * mm_px, rng.uniform(6, 18) * mm_px), rng.uniform(0, math.pi), -rng.uniform(0.1, 0.25), soft=3 * mm_px)
        top_y = max(v.points[:, 1].max() for v in vertebrae)
        for k in range(int(rng.integers(1, 4))):
            c = np.array([centre_mm[0] + rng.uniform(-40, 60), top_y - k * 30 - rng.uniform(0, 20)])
            _arc(bone, to_px(c), 160 * mm_px, math.radians(200), math.radians(260), 3 * mm_px, rng.uniform(0.3, 0.5))
        if rng.random() < 0.8:
            l4 = next(v for v in vertebrae if v.label == "L4")
            c = l4.points[:4].mean(0) + np.array([rng.uniform(-30, 10), rng.uniform(-120, -90)])
            _arc(bone, to_px(c), rng.uniform(90, 120) * mm_px, math.radians(-30), math.radians(50) if face > 0 else math.radians(50), 4 * mm_px, rng.uniform(0.3, 0.6))

    for v in vertebrae:
        px = to_px(v.points)
        tex = 1.0 + 0.25 * (grain - 1.0)
        _fill(bone, px[:4], v.density, soft=0.6, rim=rng.uniform(0.2, 0.45), rim_width=max(1.2 * mm_px, 1.5), texture=tex)
        _fill(bone, to_px(v.pedicle), 0.4 * v.density, soft=0.8, rim=0.1, rim_width=1.5)
        _fill(bone, to_px(v.process), 0.5 * v.density, soft=0.8, rim=0.15, rim_width=1.5)
        facet = v.points[1] + 0.35 * (v.pedicle[1] - v.pedicle[0]) + 0.1 * (v.points[1] - v.points[2])
        _ellipse(bone, to_px(facet), (4 * mm_px * (2.0 if not cervical else 1.0), 2.5 * mm_px * (2.0 if not cervical else 1.0)), rng.uniform(0, math.pi), 0.25 * v.density, soft=1.0)
        if v.labelled and rng.random() < 0.15:
            # anterior osteophyte next to a corner
            k = int(rng.choice([0, 3]))
            c = v.points[k] + np.array([rng.uniform(0.5, 2.0), (1 if k == 0 else -1) * rng.uniform(0.5, 2.0)]) * (mm_px / mm_px)
            _ellipse(bone, to_px(c), (rng.uniform(1, 2.5) * mm_px, rng.uniform(0.8, 1.5) * mm_px), rng.uniform(0, math.pi), 0.4 * v.density, soft=0.8)
        if v.label == "C2":
            dens = np.array([v.points[0] * 0.3 + v.points[1] * 0.7, v.points[0] * 0.3 + v.points[1] * 0.7 + up * 14, v.points[0] * 0.55 + v.points[1] * 0.45 + up * 14, v.points[0] * 0.55 + v.points[1] * 0.45])
            _fill(bone, to_px(dens), 0.8 * v.density, soft=1.0)

    occluders: list[str] = []
    if rng.random() < 0.15:
        occluders.append("implant")
        targets = [v for v in labelled]
        i0 = int(rng.integers(0, len(targets) - 1))
        b, a = targets[i0], targets[i0 + 1]
        if cervical or rng.random() < 0.4:
            # anterior plate on two bodies' anterior walls (upper a, lower b)
            top = a.points[0] + up * 3 - anterior * 1.0
            bottom = b.points[3] - up * 3 - anterior * 1.0
            thick = rng.uniform(2.0, 3.5)
            plate = np.array([top, top + anterior * thick, bottom + anterior * thick, bottom])
            _fill(metal, to_px(plate), 3.0, soft=0.6)
            for v in (a, b):
                m = v.points[[0, 3]].mean(0)
                screw = np.array([m + up * 1.2 + anterior * 2, m + up * 1.2 - anterior * 0.6 * np.linalg.norm(v.points[0] - v.points[1]), m - up * 1.2 - anterior * 0.6 * np.linalg.norm(v.points[0] - v.points[1]), m - up * 1.2 + anterior * 2])
                _fill(metal, to_px(screw), 3.0, soft=0.6)
        else:
            for v in (a, b):
                m = v.points[[1, 2]].mean(0)
                screw = np.array([m + up * 3 - anterior * 25, m + up * 3 + anterior * 25, m - up * 3 + anterior * 25, m - up * 3 - anterior * 25])
                _fill(metal, to_px(screw), 3.0, soft=0.6)
            rod_top, rod_bot = a.points[1] - anterior * 20 + up * 5, b.points[2] - anterior * 20 - up * 5
            rod = np.array([rod_top, rod_top - anterior * 5, rod_bot - anterior * 5, rod_bot])
            _fill(metal, to_px(rod), 3.0, soft=0.6)
    if cervical and rng.random() < 0.1:
        occluders.append("collar")
        c = centre_mm + anterior * rng.uniform(0, 20)
        _ellipse(soft_tissue, to_px(c), (80 * mm_px, 50 * mm_px), -face * tilt, rng.uniform(0.1, 0.2), soft=4 * mm_px)
        _ellipse(soft_tissue, to_px(c), (76 * mm_px, 46 * mm_px), -face * tilt, -rng.uniform(0.05, 0.1), soft=2 * mm_px)

    density = soft_tissue + bone * grain.astype(np.float32) + metal
    k_att = rng.uniform(0.8, 1.5)
    img = 1.0 - np.exp(-k_att * np.clip(density, 0, None))
    # exposure gradient (heel effect) and scatter
    g = np.linspace(-1, 1, rows)[:, None] * rng.uniform(-0.15, 0.15) + np.linspace(-1, 1, cols)[None, :] * rng.uniform(-0.15, 0.15)
    img = img * (1.0 + g) + rng.uniform(0.0, 0.15)
    collimated = np.zeros((rows, cols), bool)
    if rng.random() < 0.15:
        occluders.append("collimation")
        side = str(rng.choice(["top", "bottom", "left", "right"]))
        depth = int(rng.uniform(0.04, 0.15) * (rows if side in ("top", "bottom") else cols))
        sl = {"top": np.s_[:depth, :], "bottom": np.s_[rows - depth :, :], "left": np.s_[:, :depth], "right": np.s_[:, cols - depth :]}[side]
        collimated[sl] = True
        img[collimated] = rng.uniform(0.9, 1.1)
    img = ndimage.gaussian_filter(img, rng.uniform(0.5, 1.4))
    noise = rng.uniform(0.01, 0.05)
    img = img + rng.normal(0, 1, img.shape) * noise * np.sqrt(np.clip(1.05 - img, 0.05, None))
    img = np.clip(img, 0, None) ** rng.uniform(0.7, 1.4)
    lo_v, hi_v = rng.uniform(0, 300), rng.uniform(2500, 4095)
    stored = lo_v + (hi_v - lo_v) * np.clip(img / max(float(np.percentile(img, 99.9)), 1e-6), 0, 1)
    photometric = "MONOCHROME2"
    if rng.random() < 0.2:
        photometric = "MONOCHROME1"
        stored = 4095 - stored
    stored = np.clip(np.round(stored), 0, 4095).astype(np.uint16)
    window = None
    if rng.random() < 0.3:
        centre = float(np.percentile(stored, 50))
        width = float(np.percentile(stored, 99.5) - np.percentile(stored, 0.5)) * rng.uniform(0.9, 1.3)
        window = (centre, max(width, 10.0))

    points: dict[str, np.ndarray] = {}
    visible: dict[str, np.ndarray] = {}
    metal_mask = ndimage.maximum_filter(metal, size=max(3, int(round(3 * mm_px)) | 1)) > 0.5
    for v in labelled:
        px = to_px(v.points)
        vis = np.ones(5, bool)
        for i, (c, r) in enumerate(px):
            ci, ri = int(math.floor(c)), int(math.floor(r))
            if not (0 <= ci < cols and 0 <= ri < rows):
                vis[i] = False
            elif collimated[ri, ci] or metal_mask[ri, ci]:
                vis[i] = False
        points[v.label] = px
        visible[v.label] = vis
    view = str(rng.choice(["LL", "RL", "LAT"]))
    if cut is not None:
        occluders.append("cut_off")
    return PhantomImage(region, stored, (spacing, spacing), photometric, points, visible, view, window, occluders)


# ---------------------------------------------------------------------------
# DICOM studies
# ---------------------------------------------------------------------------


def phantom_dataset(ph: PhantomImage, patient: phantoms.PhantomPatient, rng: np.random.Generator):
    """The phantom as a CR or DX dataset with lateral-spine tags."""
    modality = str(rng.choice(["CR", "DX"]))
    sop = phantoms.CR_IMAGE if modality == "CR" else phantoms.DX_IMAGE_PRESENTATION
    desc = {"cervical": "C-SPINE LAT", "lumbar": "L-SPINE LAT"}[ph.region]
    attrs: dict[str, Any] = {"BodyPartExamined": REGION_BODY_PART[ph.region], "ViewPosition": ph.view}
    if ph.window is not None:
        attrs["WindowCenter"] = f"{ph.window[0]:.1f}"
        attrs["WindowWidth"] = f"{ph.window[1]:.1f}"
    if modality == "DX":
        attrs["PresentationIntentType"] = "FOR PRESENTATION"
    return phantoms.image_dataset(
        ph.pixels,
        patient=patient,
        modality=modality,
        sop_class_uid=sop,
        series_description=desc,
        pixel_spacing=ph.spacing,
        photometric=ph.photometric,
        bits_stored=12,
        attributes=attrs,
    )


def truth_of(ph: PhantomImage) -> dict[str, Any]:
    vals = measure(ph.points, ph.spacing, ph.region)
    return {
        "region": ph.region,
        "pixel_spacing": list(ph.spacing),
        "occluders": ph.occluders,
        "vertebrae": {k: {"points": ph.points[k].round(3).tolist(), "visible": ph.visible[k].tolist()} for k in ph.points},
        "measurements": [{"key": m.key, "group": m.group, "value": round(m.value, 4), "unit": m.unit} for m in vals],
    }


def write_phantoms(out_dir: Path, n: int, seed: int, region: str | None = None) -> list[Path]:
    """Write ``n`` phantom studies (cervical and lumbar alternately unless ``region`` is given)."""
    out_dir = Path(out_dir)
    folders = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        reg = region or ("cervical" if i % 2 == 0 else "lumbar")
        ph = render(rng, reg)
        patient = phantoms.PhantomPatient.make(rng, "sxr", seed * 100000 + i, study_description=f"XR {'CERVICAL' if reg == 'cervical' else 'LUMBAR'} SPINE")
        ds = phantom_dataset(ph, patient, rng)
        folder = out_dir / f"study_{i:04d}"
        phantoms.save(ds, folder)
        truth = truth_of(ph)
        truth.update({"study_instance_uid": str(ds.StudyInstanceUID), "sop_instance_uid": str(ds.SOPInstanceUID), "seed": [seed, i]})
        phantoms.write_truth(folder, truth)
        folders.append(folder)
    return folders
