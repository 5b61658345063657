"""dxa_scoliosis selection: the whole-body bone image by headers and content, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers import phantoms as ph
from dicomnode import imaging
from dicomnode.analysis import NotApplicable, Study
from analyzers.dxa_scoliosis import preprocess as pp
from analyzers.dxa_scoliosis.analyzer import DxaScoliosis
from analyzers.dxa_scoliosis.phantom import make_case, write_study

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


def _study(folder: Path, skip: tuple[str, ...] = ()) -> Study:
    paths = sorted(folder.glob("*.dcm"))
    import json

    truth = json.loads((folder / "truth.json").read_text())
    drop = {truth["instances"][v] for v in skip if v in truth["instances"]}
    dss = [pydicom.dcmread(p) for p in paths]
    keep = [(d, p) for d, p in zip(dss, paths) if d.SOPInstanceUID not in drop]
    return Study.from_datasets([d for d, _ in keep], [p for _, p in keep])


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("dxa_select")
    rng = np.random.default_rng(90_101)
    out = {}
    for i, style in enumerate(("bmd", "dx", "idxa", "idxa")):
        folder = root / f"{style}{i}"
        truth = write_study(folder, make_case(rng), rng, i, style=style)
        out[f"{style}{i}"] = (folder, truth)
    return out


def test_select_picks_the_whole_body_bone_image_for_every_header_style(studies):
    a = DxaScoliosis()
    for name, (folder, truth) in studies.items():
        selected = a.select(_study(folder))
        assert len(selected) == 1 and len(selected[0].instances) == 1, name
        assert selected[0].instances[0].sop_instance_uid == truth["wb_bone_sop_uid"], name


def test_idxa_headers_are_as_the_issue_describes(studies):
    folder, truth = studies["idxa2"]
    dss = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    assert len(dss) == 6 and len({d.SeriesInstanceUID for d in dss}) == 1
    for d in dss:
        assert d.Modality == "CR" and d.SeriesDescription == "DXA Images" and d.BitsStored == 8
        assert "BodyPartExamined" not in d and "PixelSpacing" not in d and "ImagerPixelSpacing" not in d
    bmd = [pydicom.dcmread(p) for p in studies["bmd0"][0].glob("*.dcm")]
    assert all(d.Modality == "BMD" and "NominalScannedPixelSpacing" in d for d in bmd)


def test_soft_tissue_only_is_declined(studies):
    folder, _ = studies["idxa3"]
    with pytest.raises(NotApplicable, match="soft-tissue"):
        DxaScoliosis().select(_study(folder, skip=("wb_bone",)))


def test_regional_views_only_are_declined(studies):
    folder, _ = studies["idxa2"]
    with pytest.raises(NotApplicable, match="whole-body"):
        DxaScoliosis().select(_study(folder, skip=("wb_bone", "wb_soft")))


def test_other_modalities_are_declined(tmp_path):
    rng = np.random.default_rng(3)
    pat = ph.PhantomPatient.make(rng, "ct", 1)
    ds = ph.image_dataset((rng.random((64, 64)) * 1000).astype(np.uint16), patient=pat, modality="CT", sop_class_uid=ph.CT_IMAGE, pixel_spacing=(1.0, 1.0))
    with pytest.raises(NotApplicable, match="no DXA or radiograph series"):
        DxaScoliosis().select(Study.from_datasets([ds]))


def test_chest_radiograph_without_body_part_is_declined_by_content(tmp_path):
    rng = np.random.default_rng(4)
    pat = ph.PhantomPatient.make(rng, "cr", 1)
    ds = ph.image_dataset((rng.random((300, 250)) * 4000).astype(np.uint16), patient=pat, modality="CR", series_description="DXA Images")
    with pytest.raises(NotApplicable, match="tall whole-body"):
        DxaScoliosis().select(Study.from_datasets([ds]))


@pytest.mark.parametrize("rel", ["realdata/pydicom-data/data_store/data/RG1_J2KI.dcm", "realdata/highdicom/data/test_files/dx_image.dcm"])
def test_real_radiographs_are_declined(rel):
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"{rel} is not present (no ../shared)")
    ds = pydicom.dcmread(path)
    with pytest.raises(NotApplicable):
        DxaScoliosis().select(Study.from_datasets([ds], [path]))


def test_normalisation_keeps_the_body_and_its_aspect():
    rng = np.random.default_rng(5)
    case = make_case(rng, kind="single")
    x, norm = pp.normalise(case["bone"])
    assert x.shape == (pp.ROWS, pp.COLS)
    assert norm.sx == pytest.approx(norm.sy)  # isotropic crop: square source pixels stay square
    head = norm.sample(case["masks"][0].astype(np.float32)) > 0.5
    legs = norm.sample(case["masks"][4].astype(np.float32)) > 0.5
    rows = np.flatnonzero(head.any(1))
    assert rows[0] < 20  # empty space above the head removed
    assert np.flatnonzero(legs.any(1))[-1] > pp.ROWS - 25  # and below the feet
    # anisotropic spacing (rows 2x taller than columns): twice as many source columns per output column
    norm2 = pp.normalisation(case["bone"], spacing=(2.0, 1.0))
    assert norm2.sx == pytest.approx(2 * norm2.sy)
    cols, rows_ = norm.to_source(*norm.to_norm(np.array([10.0]), np.array([20.0])))
    assert cols[0] == pytest.approx(10.0) and rows_[0] == pytest.approx(20.0)


def test_default_rules_route_every_phantom_header_style_here(studies):
    from dicomnode.router import RuleSet, view_of_dataset

    rules = RuleSet.load(Path(__file__).resolve().parents[2] / "config" / "rules.yaml")
    for name, (folder, truth) in studies.items():
        ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
        matched = [a for r in rules.match(view_of_dataset(ds, "PACS")) for a in r.analyzers]
        assert "dxa_scoliosis" in matched, name


def _relabel_ot(ds: pydicom.Dataset, pixels: np.ndarray | None = None) -> pydicom.Dataset:
    """A real image exported as a secondary capture with Modality OT and no body part, as some PACS forward it."""
    rng = np.random.default_rng(7)
    img = imaging.display_image(ds, 0) if pixels is None else pixels
    out = ph.image_dataset(np.round(np.clip(img, 0, 1) * 4095).astype(np.uint16), patient=ph.PhantomPatient.make(rng, "ot", 1), modality="OT", series_description="Images", bits_stored=12)
    return out


def _declined(ds: pydicom.Dataset) -> str:
    a = DxaScoliosis()
    with pytest.raises(NotApplicable) as info:
        a.analyze(a.select(Study.from_datasets([ds])))
    return str(info.value)


REAL_NON_DXA = [
    "realdata/pydicom-data/data_store/data/RG1_J2KI.dcm",  # frontal chest CR
    "realdata/highdicom/data/test_files/dx_image.dcm",  # lateral radiograph
    "realdata/highdicom/data/test_files/ct_image.dcm",  # CT slice
    "realdata/pydicom-data/data_store/data/MR2_J2KI.dcm",  # MR slice
]


@pytest.mark.parametrize("rel", REAL_NON_DXA)
def test_real_non_dxa_images_relabelled_ot_are_declined(rel):
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"{rel} is not present (no ../shared)")
    assert "whole-body" in _declined(_relabel_ot(pydicom.dcmread(path)))


@pytest.mark.parametrize("rel", REAL_NON_DXA[:2])
def test_real_radiographs_stretched_to_the_dxa_geometry_are_declined(rel):
    """A real radiograph resampled to the scanner's portrait geometry (790 x 270) passes the shape checks; its content must not."""
    from scipy import ndimage

    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"{rel} is not present (no ../shared)")
    img = imaging.display_image(pydicom.dcmread(path), 0)
    tall = ndimage.zoom(img, (790 / img.shape[0], 270 / img.shape[1]), order=1)
    _declined(_relabel_ot(pydicom.dcmread(path), tall))


def test_a_whole_body_bone_scan_relabelled_ot_is_declined():
    """Counts of a skeleton on a 1024 x 256 matrix (anterior whole-body bone scan geometry), hot bladder, Modality OT."""
    rng = np.random.default_rng(90_120)
    case = make_case(rng, kind="straight")
    from scipy import ndimage

    bone = ndimage.zoom(case["bone"], (1024 / case["bone"].shape[0], 256 / case["bone"].shape[1]), order=1)
    counts = rng.poisson(np.clip(bone - 0.15, 0, None) * 60).astype(np.float32)
    counts[560:600, 110:146] += 400
    reason = _declined(_relabel_ot(pydicom.Dataset(), counts / counts.max()))
    assert "too narrow" in reason or "whole-body" in reason


def test_part_order_and_areas_are_checked():
    from analyzers.dxa_scoliosis.inference import implausible_parts
    from analyzers.dxa_scoliosis.train import case_arrays

    rng = np.random.default_rng(90_130)
    case = make_case(rng)
    masks = case_arrays(case["bone"], case["masks"])["masks"]
    assert implausible_parts(masks) is None
    strips = masks.copy()
    strips[:, : pp.ROWS // 2], strips[:, pp.ROWS // 2 :] = masks[:, pp.ROWS // 2 :], masks[:, : pp.ROWS // 2]  # pelvis above the head
    assert "order" in implausible_parts(strips) or "legs" in implausible_parts(strips)
    scattered = masks.copy()
    scattered[0, 300:310] = True  # a strip of "head" over the legs
    assert implausible_parts(scattered) is not None
