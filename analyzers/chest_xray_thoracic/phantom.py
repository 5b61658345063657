"""Synthetic frontal chest radiographs with known lungs, heart and findings.

A phantom is drawn as an attenuation map (dense is high) at the detector's
resolution: body outline, mediastinum and spine, ribs and clavicles, two lung
fields with branching vascular markings, the heart and the diaphragm domes.
Findings that have a visible shape are synthesised on top:

- cardiomegaly: a heart wide enough for a cardiothoracic ratio above 0.5;
- effusion: fluid at a lung base with a meniscus that blunts the costophrenic angle;
- nodule (8-20 mm) and mass (30-60 mm): round or lobulated opacities in a lung;
- pneumothorax: a lucent rim at the lateral and apical edge of a lung without
  markings, bounded by the visceral pleural line;
- consolidation: a patchy opacity with air bronchograms.

Studies vary in anatomy size, position, tilt, exposure, noise, collimation, side
markers, photometric interpretation and bit depth, so a model has to learn the
findings rather than the generator. The ground truth (masks as PNG-free arrays
in ``truth.json`` polygons, labels, cardiothoracic ratio) is written beside the
DICOM file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from analyzers import phantoms

from .constants import LABELS, SEGMENTS, SYNTHESISED
from .inference import cardiothoracic_ratio, outline


@dataclass
class ChestPhantom:
    """One rendered radiograph: display-oriented attenuation and its ground truth."""

    attenuation: np.ndarray
    """float32 (rows, columns), dense is high, roughly in [0, 1]."""
    masks: np.ndarray
    """bool (3, rows, columns): right lung, left lung, heart."""
    labels: dict[str, bool]
    ctr: float
    spacing_mm: float
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------


def _poly_mask(shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    img = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in pts], fill=1)
    return np.asarray(img, dtype=bool)


def _ellipse_mask(shape: tuple[int, int], cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def _lung_outline(rng: np.random.Generator, side: int, cx: float, half_w: float, top: float, cp_y: float,
                  dome_y: float, medial_x: float, n: int = 40) -> np.ndarray:
    """Polygon of one lung field; ``side`` -1 for the image-left (patient right) lung."""
    lat_x = cx + side * half_w
    apex_x = cx + side * half_w * rng.uniform(0.45, 0.6)
    pts = []
    # lateral border: apex to costophrenic angle, bulging outward
    for t in np.linspace(0, 1, n):
        y = top + (cp_y - top) * t
        bulge = math.sin(min(1.0, t * 1.25) * math.pi / 2)
        x = apex_x + (lat_x - apex_x) * bulge
        pts.append((x, y))
    # diaphragm dome: costophrenic angle up over the dome to the cardiophrenic corner
    for t in np.linspace(0, 1, n)[1:]:
        x = lat_x + (medial_x - lat_x) * t
        y = cp_y + (dome_y - cp_y) * math.sin(t * math.pi * 0.6) / math.sin(math.pi * 0.6)
        pts.append((x, y))
    # medial border back up to the apex
    for t in np.linspace(0, 1, n // 2)[1:-1]:
        y = dome_y + (top + 0.04 * (cp_y - top) - dome_y) * t
        x = medial_x + side * 0.15 * half_w * math.sin(t * math.pi) * 0.3
        pts.append((x, y))
    return np.asarray(pts, dtype=np.float64)


def _markings(rng: np.random.Generator, shape: tuple[int, int], hila: list[tuple[float, float]], scale: float) -> np.ndarray:
    """Branching vessel tree from each hilum, thinning and fading toward the periphery."""
    img = Image.new("F", (shape[1], shape[0]), 0.0)
    draw = ImageDraw.Draw(img)
    for hx, hy in hila:
        stack = []
        for _ in range(int(rng.integers(7, 11))):
            ang = rng.uniform(-math.pi, math.pi)
            stack.append((hx, hy, ang, 4.0 * scale, 1.0, 0))
        while stack:
            x, y, ang, width, inten, depth = stack.pop()
            length = rng.uniform(25, 55) * scale
            x2, y2 = x + length * math.cos(ang), y + length * math.sin(ang)
            draw.line([(x, y), (x2, y2)], fill=float(inten), width=max(1, int(round(width))))
            if depth < 5 and width > 0.6:
                for _ in range(2):
                    stack.append((x2, y2, ang + rng.uniform(-0.6, 0.6), width * 0.7, inten * 0.8, depth + 1))
    return ndimage.gaussian_filter(np.asarray(img, dtype=np.float32), 0.8 * scale)


def _ribs(rng: np.random.Generator, shape: tuple[int, int], cx: float, half_w: float, top: float, bottom: float, scale: float) -> np.ndarray:
    img = Image.new("F", (shape[1], shape[0]), 0.0)
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(9, 11))
    gap = (bottom - top) / n
    for side in (-1, 1):
        for i in range(n):
            y0 = top + i * gap * 0.95 + rng.normal(0, 1.5 * scale)
            pts = []
            for t in np.linspace(0, 1, 24):
                x = cx + side * (0.05 + 1.02 * t) * half_w
                # posterior ribs: arch up from the spine, then run down laterally
                y = y0 - 0.35 * gap * math.sin(min(t, 0.5) * math.pi) + (t ** 2) * gap * 1.6
                pts.append((x, y))
            draw.line(pts, fill=1.0, width=max(2, int(round(gap * rng.uniform(0.35, 0.45)))))
        # clavicle
        cy = top + rng.uniform(-0.5, 0.3) * gap
        draw.line([(cx + side * 0.08 * half_w, cy), (cx + side * 0.95 * half_w, cy - 0.6 * gap)], fill=1.3, width=max(3, int(gap * 0.5)))
    out = np.asarray(img, dtype=np.float32)
    # cortical rims are denser than the medulla: a ring from the difference of blurs
    return ndimage.gaussian_filter(out, 1.0 * scale)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def render(rng: np.random.Generator, labels: dict[str, bool] | None = None) -> ChestPhantom:
    """Draw one frontal chest radiograph; ``labels`` fixes findings, else each is drawn with p≈0.3."""
    if labels is None:
        labels = {k: bool(rng.random() < 0.3) for k in SYNTHESISED}
    rows = int(rng.integers(400, 560))
    cols = int(rows * rng.uniform(0.88, 1.08))
    shape = (rows, cols)
    scale = rows / 480.0
    spacing = float(rng.uniform(0.65, 0.9)) * 480.0 / rows

    cx = cols * rng.uniform(0.46, 0.54)
    half_w = cols * rng.uniform(0.30, 0.38)
    top = rows * rng.uniform(0.08, 0.16)
    cp_y = rows * rng.uniform(0.70, 0.80)
    dome_r = cp_y - rows * rng.uniform(0.06, 0.11)
    dome_l = dome_r + rows * rng.uniform(0.005, 0.03)
    thorax_w = 2 * half_w

    # heart: the cardiothoracic ratio drives its width
    ctr_goal = rng.uniform(0.53, 0.64) if labels.get("Cardiomegaly") else rng.uniform(0.36, 0.47)
    heart_w = ctr_goal * thorax_w
    h_right = heart_w * rng.uniform(0.32, 0.40)  # extends to the image left of the midline
    h_cx = cx - h_right + heart_w / 2
    h_ry = rows * rng.uniform(0.11, 0.15) * (1.0 + 0.4 * (ctr_goal - 0.45))
    h_cy = (dome_r + dome_l) / 2 - h_ry * rng.uniform(0.45, 0.7)
    heart = _ellipse_mask(shape, h_cx, h_cy, heart_w / 2, h_ry)
    # the heart sits on the diaphragm: nothing of it below the domes
    yy = np.arange(rows)[:, None]
    heart &= yy < (dome_r + dome_l) / 2 + rows * 0.01

    med_half = thorax_w * rng.uniform(0.07, 0.10)
    rl = _poly_mask(shape, _lung_outline(rng, -1, cx, half_w, top, cp_y + rng.normal(0, 4 * scale), dome_r, cx - med_half))
    ll = _poly_mask(shape, _lung_outline(rng, +1, cx, half_w, top + rng.normal(0, 3 * scale), cp_y + rng.normal(0, 4 * scale), dome_l, cx + med_half))
    rl &= ~heart
    ll &= ~heart
    lungs = rl | ll

    # --- attenuation layers -------------------------------------------------
    body = _ellipse_mask(shape, cx, rows * 0.55, half_w * rng.uniform(1.12, 1.25), rows * 0.62)
    att = np.where(body, 0.55, 0.05).astype(np.float32)
    att += 0.05 * _smooth_noise(rng, shape, 20 * scale) * body
    # abdomen below the domes is denser
    abdomen = body & (yy > min(dome_r, dome_l) - rows * 0.02) & ~ndimage.binary_dilation(rl | ll | heart, iterations=2)
    att += 0.1 * ndimage.gaussian_filter(abdomen.astype(np.float32), 2 * scale)
    # spine and mediastinum
    xx = np.arange(cols)[None, :]
    spine = body & (np.abs(xx - cx) < thorax_w * 0.06)
    att += 0.12 * ndimage.gaussian_filter(spine.astype(np.float32), 3 * scale)
    att -= 0.38 * ndimage.gaussian_filter(lungs.astype(np.float32), 2.0 * scale)
    att += 0.22 * ndimage.gaussian_filter(heart.astype(np.float32), 1.5 * scale)
    hila = [(cx - med_half * 1.6, h_cy - rows * 0.12), (cx + med_half * 1.6, h_cy - rows * 0.13)]
    marks = _markings(rng, shape, hila, scale) * lungs
    marking_gain = rng.uniform(0.06, 0.12)

    # --- findings -------------------------------------------------------------
    lesion = np.zeros(shape, dtype=np.float32)
    meta: dict[str, Any] = {}
    lung_masks = [rl, ll]

    def lung_point(mask: np.ndarray, margin: float) -> tuple[float, float]:
        inner = ndimage.binary_erosion(mask, iterations=max(1, int(margin)))
        ys, xs = np.nonzero(inner if inner.any() else mask)
        i = int(rng.integers(len(ys)))
        return float(xs[i]), float(ys[i])

    if labels.get("Effusion"):
        side = int(rng.integers(2)) if rng.random() < 0.75 else 2
        for s in ([side] if side < 2 else [0, 1]):
            m = lung_masks[s]
            ys, xs = np.nonzero(m)
            base = ys.max()
            height = (base - ys.min()) * rng.uniform(0.18, 0.32)
            lat = xs.min() if s == 0 else xs.max()
            med = xs.max() if s == 0 else xs.min()
            # meniscus: fluid climbs higher at the lateral chest wall
            frac = np.clip((xx - med) / (lat - med), 0, 1)
            level = base - height * (0.45 + 0.55 * frac ** 2)
            fluid = m & (yy >= level)
            lesion += 0.42 * ndimage.gaussian_filter(fluid.astype(np.float32), 2.0 * scale)
            marks *= ~fluid
            meta.setdefault("effusion_sides", []).append(SEGMENTS[s])

    pneumo = np.zeros(shape, dtype=bool)
    if labels.get("Pneumothorax"):
        s = int(rng.integers(2))
        m = lung_masks[s]
        ys, xs = np.nonzero(m)
        # collapsed lung: the lung field shrunk toward its hilum
        hx, hy = hila[s]
        k = rng.uniform(0.62, 0.82)
        yi, xi = np.indices(shape)
        src_y = hy + (yi - hy) / k
        src_x = hx + (xi - hx) / k
        collapsed = ndimage.map_coordinates(m.astype(np.float32), [src_y, src_x], order=0) > 0.5
        collapsed &= m
        pneumo = m & ~collapsed
        rim = collapsed & ~ndimage.binary_erosion(collapsed, iterations=max(1, int(1.5 * scale)))
        rim &= ndimage.binary_dilation(pneumo, iterations=2)
        marks *= ~pneumo
        lesion -= 0.14 * ndimage.gaussian_filter(pneumo.astype(np.float32), 1.5 * scale)
        lesion += 0.16 * ndimage.gaussian_filter(rim.astype(np.float32), 0.7 * scale)
        meta["pneumothorax_side"] = SEGMENTS[s]

    air_lung = lungs & ~pneumo

    def blob(diam_mm: float, lobulated: bool, gain: float) -> None:
        s = int(rng.integers(2))
        r = diam_mm / 2 / spacing
        x, y = lung_point(lung_masks[s] & air_lung, r * 0.6)
        yy_, xx_ = np.ogrid[: rows, : cols]
        ang = np.arctan2(yy_ - y, xx_ - x)
        rr = r * (1 + (0.15 * np.sin(3 * ang + rng.uniform(0, 6)) + 0.1 * np.sin(5 * ang) if lobulated else 0))
        d = np.sqrt((xx_ - x) ** 2 + (yy_ - y) ** 2)
        nonlocal lesion
        lesion += gain * np.clip((rr - d) / (0.25 * r + 1), 0, 1).astype(np.float32)

    if labels.get("Nodule"):
        for _ in range(int(rng.integers(1, 3))):
            blob(rng.uniform(8, 20), False, rng.uniform(0.18, 0.3))
    if labels.get("Mass"):
        blob(rng.uniform(30, 60), True, rng.uniform(0.22, 0.34))
    if labels.get("Consolidation"):
        s = int(rng.integers(2))
        x, y = lung_point(lung_masks[s] & air_lung, 20 * scale)
        region = _ellipse_mask(shape, x, y, cols * rng.uniform(0.07, 0.12), rows * rng.uniform(0.07, 0.12))
        patch = (_smooth_noise(rng, shape, 6 * scale) > -0.3) & region & air_lung
        patch = ndimage.binary_closing(patch, iterations=2)
        cons = ndimage.gaussian_filter(patch.astype(np.float32), 3 * scale)
        bronch = _markings(rng, shape, [(x, y)], 0.6 * scale) * patch
        lesion += 0.28 * cons - 0.12 * np.clip(bronch, 0, 1)
        marks *= ~patch

    att += marking_gain * np.clip(marks, 0, 1.5)
    att += lesion * lungs
    ribs = _ribs(rng, shape, cx, half_w, top - rows * 0.02, cp_y, scale)
    att += rng.uniform(0.05, 0.10) * ribs * body

    # --- acquisition: tilt, exposure, noise, collimation, side marker ---------
    # the "heart" truth is the cardiomediastinal silhouette, as in the real reference masks:
    # the heart and the mediastinum above it, between the lungs' medial edges
    mediastinum = body & (np.abs(xx - cx) < med_half * 1.15) & (yy >= top) & (yy <= h_cy)
    masks = np.stack([rl, ll, heart | mediastinum])
    angle = rng.uniform(-4, 4)
    if abs(angle) > 0.3:
        att = ndimage.rotate(att, angle, reshape=False, order=1, mode="nearest")
        masks = ndimage.rotate(masks.astype(np.float32), angle, axes=(2, 1), reshape=False, order=1) > 0.5
    att = np.clip(att, 0, None) ** rng.uniform(0.85, 1.2)
    att += rng.uniform(0.005, 0.02) * rng.standard_normal(shape).astype(np.float32)
    att += 0.03 * _smooth_noise(rng, shape, 40 * scale)
    if rng.random() < 0.5:
        edge = int(rng.integers(4, 20))
        side = rng.integers(4)
        sl = [np.s_[:edge, :], np.s_[-edge:, :], np.s_[:, :edge], np.s_[:, -edge:]][side]
        att[sl] = 0.9
    if rng.random() < 0.7:
        r0, c0 = int(rows * rng.uniform(0.03, 0.1)), int(cols * rng.uniform(0.03, 0.85))
        att[r0 : r0 + int(14 * scale), c0 : c0 + int(10 * scale)] = 1.2
    ctr = cardiothoracic_ratio(masks)
    truth_labels = dict(labels)
    truth_labels["Cardiomegaly"] = bool(ctr > 0.5)
    return ChestPhantom(att.astype(np.float32), masks, truth_labels, ctr, spacing, meta)


def to_dataset(ph: ChestPhantom, rng: np.random.Generator, patient: phantoms.PhantomPatient, **attributes: Any):
    """Encode a phantom as a CR or DX image with realistic photometry and bit depth."""
    bits = int(rng.choice([10, 12, 14]))
    top = (1 << bits) - 1
    lo, hi = np.percentile(ph.attenuation, [0.2, 99.8])
    norm = np.clip((ph.attenuation - lo) / (hi - lo), 0, 1)
    mono1 = bool(rng.random() < 0.35)
    stored = (1.0 - norm if mono1 else norm) * top * rng.uniform(0.7, 1.0)
    stored = np.round(stored + rng.uniform(0, 0.05) * top).clip(0, top).astype(np.uint16)
    modality = str(rng.choice(["CR", "DX"]))
    sop = phantoms.CR_IMAGE if modality == "CR" else phantoms.DX_IMAGE_PRESENTATION
    attrs: dict[str, Any] = {"BodyPartExamined": "CHEST", "ViewPosition": str(rng.choice(["PA", "AP"]))}
    if modality == "DX":
        attrs["PresentationIntentType"] = "FOR PRESENTATION"
        attrs["ImageLaterality"] = "U"
    if rng.random() < 0.5:
        s = stored.astype(np.float32)
        attrs["WindowCenter"] = f"{float(np.percentile(s, 50)):.1f}"
        attrs["WindowWidth"] = f"{float(np.percentile(s, 99.5) - np.percentile(s, 0.5)):.1f}"
    attrs.update(attributes)
    return phantoms.image_dataset(
        stored,
        patient=patient,
        modality=modality,
        sop_class_uid=sop,
        series_description="Chest PA" if attrs["ViewPosition"] == "PA" else "Chest AP",
        pixel_spacing=(ph.spacing_mm, ph.spacing_mm),
        photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
        bits_stored=bits,
        attributes=attrs,
    )


def mask_polygons(masks: np.ndarray) -> dict[str, list[list[float]]]:
    """Largest outline of each truth mask as (column, row) points, for truth.json."""
    out = {}
    for name, m in zip(SEGMENTS, masks):
        pts = outline(m)
        out[name] = [] if pts is None else np.round(pts, 1).tolist()
    return out


def write_phantoms(out_dir: Path, n: int, seed: int) -> list[Path]:
    """Write ``n`` studies (one CR/DX image each) with ``truth.json``; returns the study folders."""
    out_dir = Path(out_dir)
    folders = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        ph = render(rng)
        patient = phantoms.PhantomPatient.make(rng, "cxr", seed * 100000 + i, study_description="XR CHEST")
        ds = to_dataset(ph, rng, patient)
        folder = out_dir / f"study_{seed}_{i:04d}"
        path = phantoms.save(ds, folder, "image.dcm")
        np.savez_compressed(folder / "masks.npz", masks=ph.masks)
        phantoms.write_truth(
            folder,
            {
                "analyzer": "chest_xray_thoracic",
                "seed": [seed, i],
                "study_instance_uid": patient.study_uid,
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "file": path.name,
                "labels": {k: (ph.labels[k] if k in SYNTHESISED else None) for k in LABELS},
                "ctr": ph.ctr,
                "segments": list(SEGMENTS),
                "masks_file": "masks.npz",
                "outlines": mask_polygons(ph.masks),
                "details": ph.meta,
            },
        )
        folders.append(folder)
    return folders
