"""Readers for the public data the paper uses: ChestX-ray14 labels and images, JSRT/SCR masks.

ChestX-ray14 (Wang et al. 2017) ships ``Data_Entry_2017*.csv`` (one row per
image: ``Image Index``, ``Finding Labels`` joined by ``|`` or ``No Finding``,
``View Position``, ``Patient ID`` ...), PNG images in ``images*/`` folders and
the official ``train_val_list.txt`` / ``test_list.txt`` splits.

The JSRT lung and heart masks (van Ginneken's SCR set) are one GIF or PNG per
image and structure in folders named ``left lung``, ``right lung`` and ``heart``
(255 foreground, 0 background); "left" is the patient's left, on the image's
right in a PA view.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .constants import LABELS

_ALIASES = {"Pleural Thickening": "Pleural_Thickening", "PleuralThickening": "Pleural_Thickening"}
_COLUMNS = {"image": "Image Index", "finding_labels": "Finding Labels", "view": "View Position", "patient_id": "Patient ID"}
"""Lower-case column names (the bundled set's ``labels.csv``) to the Data_Entry_2017 ones."""

SPLIT_SEED = 14
MASK_VAL, MASK_TEST = 0.12, 0.2
"""Fractions of the mask set's images held out for validation and for the test figures."""
CXR14_VAL, CXR14_TEST = 0.15, 0.2
"""Fractions of the ChestX-ray14 patients held out for validation (operating points) and for the test figures."""


@dataclass(frozen=True)
class Cxr14Record:
    image: str
    path: Path | None
    labels: np.ndarray
    """float32 (14,) in LABELS order."""
    view: str
    patient_id: str


def parse_findings(text: str) -> np.ndarray:
    """``"Cardiomegaly|Effusion"`` or ``"No Finding"`` to a 14-vector in LABELS order.

    Raises
    ------
    ValueError
        For a label that is not one of the 14 ChestX-ray14 findings.
    """
    vec = np.zeros(len(LABELS), np.float32)
    for raw in str(text).split("|"):
        name = _ALIASES.get(raw.strip(), raw.strip())
        if not name or name == "No Finding":
            continue
        if name not in LABELS:
            raise ValueError(f"unknown ChestX-ray14 label {raw!r}; expected one of {', '.join(LABELS)} or 'No Finding'")
        vec[LABELS.index(name)] = 1.0
    return vec


def _open_text(path: Path) -> io.TextIOBase:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return io.StringIO(raw.decode("utf-8-sig"))


def read_chestxray14(csv_path: Path, image_dir: Path | None = None, views: tuple[str, ...] = ("PA", "AP"),
                     only_existing: bool = True, names: set[str] | None = None) -> list[Cxr14Record]:
    """Rows of a ChestX-ray14 ``Data_Entry`` table (plain or gzipped CSV).

    ``image_dir`` is searched recursively for the PNGs (the release splits them
    over ``images_001/images`` ... folders); with ``only_existing`` rows whose
    image is not there are dropped. ``names`` keeps only those image names (a
    split list).
    """
    found: dict[str, Path] = {}
    if image_dir is not None:
        found = {p.name: p for p in Path(image_dir).rglob("*.png")}
    out = []
    with _open_text(csv_path) as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [_COLUMNS.get(c.strip(), c.strip()) for c in reader.fieldnames or ()]
        need = {"Image Index", "Finding Labels"}
        if not need <= set(reader.fieldnames or ()):
            raise ValueError(f"{csv_path} is not a ChestX-ray14 Data_Entry table: it lacks {sorted(need - set(reader.fieldnames or ()))}")
        for row in reader:
            name = row["Image Index"].strip()
            if names is not None and name not in names:
                continue
            view = (row.get("View Position") or "").strip().upper()
            if views and view and view not in views:
                continue
            path = found.get(name)
            if only_existing and path is None:
                continue
            out.append(Cxr14Record(name, path, parse_findings(row["Finding Labels"]), view, (row.get("Patient ID") or "").strip()))
    return out


def read_split(path: Path) -> set[str]:
    """Image names of an official split file (``train_val_list.txt`` / ``test_list.txt``)."""
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip()}


def load_png(path: Path) -> np.ndarray:
    """A PNG (8- or 16-bit, grey or RGB[A]) as float32 [0, 1] with dense bright (as stored)."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(im, dtype=np.float32)
            top = 65535.0 if arr.max() > 255 else 255.0
            return np.clip(arr / top, 0, 1)
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


_JSRT_FOLDERS = {
    "right_lung": ("right lung", "right_lung", "rightlung", "RightLung"),
    "left_lung": ("left lung", "left_lung", "leftlung", "LeftLung"),
    "heart": ("heart", "Heart"),
}


def read_jsrt_masks(root: Path, case: str) -> np.ndarray:
    """(3, rows, columns) bool masks right lung, left lung, heart of one JSRT case (e.g. ``JPCLN001``).

    Raises
    ------
    FileNotFoundError
        When a structure's mask for ``case`` is not under ``root``.
    """
    root = Path(root)
    masks = []
    for structure, folders in _JSRT_FOLDERS.items():
        path = None
        for folder in folders:
            for ext in (".gif", ".png", ".bmp"):
                for cand in (root / folder / f"{case}{ext}", root / "masks" / folder / f"{case}{ext}"):
                    if cand.is_file():
                        path = cand
                        break
                if path:
                    break
            if path:
                break
        if path is None:
            raise FileNotFoundError(f"no {structure.replace('_', ' ')} mask for {case} under {root} (looked for folders {', '.join(folders)})")
        with Image.open(path) as im:
            masks.append(np.asarray(im.convert("L")) > 127)
    shapes = {m.shape for m in masks}
    if len(shapes) != 1:
        raise ValueError(f"JSRT masks of {case} differ in size: {sorted(shapes)}")
    return np.stack(masks)


def load_jsrt_image(path: Path, size: int = 2048) -> np.ndarray:
    """A JSRT ``.IMG`` file (raw 12-bit big-endian, ``size`` x ``size``) as float32 [0, 1], dense bright.

    JSRT stores optical density style values where a high number is dark on film,
    so the values are inverted.
    """
    raw = np.fromfile(path, dtype=">u2")
    if raw.size != size * size:
        raise ValueError(f"{path} has {raw.size} pixels; a JSRT image has {size}x{size}")
    img = raw.reshape(size, size).astype(np.float32) / 4095.0
    return np.clip(1.0 - img, 0, 1)


def split_by_group(groups: np.ndarray, seed: int = SPLIT_SEED, val: float = 0.15, test: float = 0.2) -> np.ndarray:
    """``"train"``, ``"val"`` or ``"test"`` per row, whole groups (patients, images) to one split.

    The groups are sorted and shuffled with ``seed``, so the same table gives the same
    split on every machine; training and evaluation both call this.
    """
    keys = np.asarray(sorted({str(g) for g in groups}))
    order = np.random.default_rng(seed).permutation(len(keys))
    n_test, n_val = int(round(test * len(keys))), int(round(val * len(keys)))
    part = {}
    for rank, k in enumerate(order):
        part[keys[k]] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    return np.asarray([part[str(g)] for g in groups])


@dataclass(frozen=True)
class MaskCase:
    """One radiograph of a lung/heart mask set."""

    stem: str
    image: Path
    masks: tuple[Path, Path, Path] | None
    """right lung, left lung, heart files; None for the JSRT/SCR layout (see ``root``)."""
    root: Path | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """The image as float32 [0, 1] dense bright and (3, rows, cols) bool masks at its size."""
        img = load_jsrt_image(self.image) if self.image.suffix.upper() == ".IMG" else load_png(self.image)
        if self.masks is None:
            masks = read_jsrt_masks(self.root, self.stem)
        else:
            masks = []
            for path in self.masks:
                with Image.open(path) as im:
                    masks.append(np.asarray(im.convert("L")) > 127)
            masks = np.stack(masks)
        if masks.shape[1:] != img.shape:
            masks = np.stack([np.asarray(Image.fromarray(m).resize(img.shape[::-1], Image.NEAREST)) for m in masks])
        return img, masks


def read_mask_folder(root: Path) -> list[MaskCase]:
    """Radiographs with right lung, left lung and heart masks under ``root``, sorted by stem.

    Two layouts: ``images/<stem>.png`` with ``masks/<stem>_right_lung.png``, ``_left_lung.png``
    and ``_heart.png``; or JSRT/SCR (``<case>.png``/``.IMG`` images under ``root`` or
    ``root/images``, masks in ``right lung``/``left lung``/``heart`` folders). A case without
    all three masks is left out.
    """
    root = Path(root)
    cases = []
    masks_dir = root / "masks"
    for img in sorted((root / "images").glob("*.png")) if (root / "images").is_dir() else []:
        paths = tuple(masks_dir / f"{img.stem}_{s}.png" for s in ("right_lung", "left_lung", "heart"))
        if all(p.is_file() for p in paths):
            cases.append(MaskCase(img.stem, img, paths))
    if cases:
        return cases
    for folder in (root, root / "images"):
        for img in sorted(list(folder.glob("*.png")) + list(folder.glob("*.IMG"))) if folder.is_dir() else []:
            try:
                read_jsrt_masks(root, img.stem)
            except FileNotFoundError:
                continue
            cases.append(MaskCase(img.stem, img, None, root))
    return cases
