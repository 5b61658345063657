"""chest_xray_thoracic: ChestX-ray14 and JSRT readers, phantoms, mask maths, header checks."""

import gzip
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from analyzers.chest_xray_thoracic import data, phantom, preprocess
from analyzers.chest_xray_thoracic.constants import LABELS
from analyzers.chest_xray_thoracic.inference import cardiothoracic_ratio, ctr_geometry, outline
from dicomnode.analysis import NotApplicable

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
NIH = SHARED / "realdata" / "nih-chestxray14"


def test_parse_findings():
    v = data.parse_findings("Cardiomegaly|Pleural_Thickening")
    assert v.sum() == 2 and v[LABELS.index("Cardiomegaly")] == 1 and v[LABELS.index("Pleural_Thickening")] == 1
    assert data.parse_findings("No Finding").sum() == 0
    with pytest.raises(ValueError, match="unknown ChestX-ray14 label"):
        data.parse_findings("Fracture")


def test_chestxray14_reader_on_a_written_table(tmp_path):
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(tmp_path / "images_001" / "images" / "a.png")
    Image.fromarray(np.full((32, 32), 50, np.uint8)).save(tmp_path / "images_001" / "images" / "c.png")
    csv = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
           "a.png,Effusion|Mass,0,1,50,M,PA\nb.png,No Finding,0,2,40,F,PA\nc.png,Hernia,0,3,60,F,AP\n")
    path = tmp_path / "Data_Entry.csv.gz"
    path.write_bytes(gzip.compress(csv.encode()))
    recs = data.read_chestxray14(path, tmp_path)
    assert [r.image for r in recs] == ["a.png", "c.png"]  # b.png has no image
    assert recs[0].labels[LABELS.index("Effusion")] == 1 and recs[0].labels[LABELS.index("Mass")] == 1
    assert data.read_chestxray14(path, tmp_path, views=("PA",))[0].image == "a.png"
    assert len(data.read_chestxray14(path, None, only_existing=False)) == 3
    assert data.load_png(recs[0].path).max() == pytest.approx(200 / 255)
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="not a ChestX-ray14 Data_Entry table"):
        data.read_chestxray14(tmp_path / "bad.csv")


def test_chestxray14_reader_takes_lower_case_columns(tmp_path):
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "labels.csv").write_text("image,finding_labels,patient_id,age,sex,view\nx.png,Pneumonia|Edema,7,50,F,AP\n")
    (rec,) = data.read_chestxray14(tmp_path / "labels.csv", tmp_path)
    assert rec.patient_id == "7" and rec.view == "AP"
    assert rec.labels[LABELS.index("Pneumonia")] == 1 and rec.labels[LABELS.index("Edema")] == 1 and rec.labels.sum() == 2


def test_split_by_group_is_fixed_and_keeps_groups_together():
    groups = np.repeat(np.arange(50), 3).astype(str)
    a = data.split_by_group(groups, seed=14, val=0.2, test=0.2)
    assert np.array_equal(a, data.split_by_group(groups[::-1], seed=14, val=0.2, test=0.2)[::-1])  # order does not matter
    for g in np.unique(groups):
        assert len(set(a[groups == g])) == 1
    assert [int((a == s).sum()) // 3 for s in ("train", "val", "test")] == [30, 10, 10]
    assert not np.array_equal(a, data.split_by_group(groups, seed=15, val=0.2, test=0.2))


def test_mask_folder_reader_both_layouts(tmp_path):
    img = np.zeros((24, 30), np.uint8)
    (tmp_path / "a" / "images").mkdir(parents=True)
    (tmp_path / "a" / "masks").mkdir()
    Image.fromarray(img).save(tmp_path / "a" / "images" / "p1.png")
    for i, s in enumerate(("right_lung", "left_lung", "heart")):
        m = np.zeros_like(img)
        m[2 + i : 10 + i, 3:9] = 255
        Image.fromarray(m).save(tmp_path / "a" / "masks" / f"p1_{s}.png")
    Image.fromarray(img).save(tmp_path / "a" / "images" / "p2.png")  # no masks: left out
    (case,) = data.read_mask_folder(tmp_path / "a")
    image, masks = case.load()
    assert case.stem == "p1" and image.shape == (24, 30) and masks.shape == (3, 24, 30)
    assert masks[2, 4:12, 3:9].all() and not masks[2, 2:4].any()
    for folder in ("right lung", "left lung", "heart"):
        (tmp_path / "b" / folder).mkdir(parents=True)
        Image.fromarray(np.full((24, 30), 255, np.uint8)).save(tmp_path / "b" / folder / "JPCLN001.gif")
    Image.fromarray(img).save(tmp_path / "b" / "JPCLN001.png")
    (case,) = data.read_mask_folder(tmp_path / "b")
    assert case.stem == "JPCLN001" and case.load()[1].all()


def test_chestxray14_reader_on_the_public_table_and_images():
    if not NIH.is_dir():
        pytest.skip("shared real data not present")
    csv = next(NIH.glob("Data_Entry*.csv*"))
    recs = {r.image: r for r in data.read_chestxray14(csv, NIH)}
    assert set(recs) == {"00000001_000.png", "00027426_000.png"}
    assert recs["00000001_000.png"].labels[LABELS.index("Cardiomegaly")] == 1
    assert recs["00000001_000.png"].labels.sum() == 1
    assert recs["00027426_000.png"].labels.sum() == 0  # No Finding
    img = data.load_png(recs["00000001_000.png"].path)
    assert img.ndim == 2 and 0 <= img.min() < img.max() <= 1
    x = preprocess.to_net_input(img)
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()


def test_jsrt_mask_reader(tmp_path):
    for folder, box in (("right lung", (2, 2, 10, 20)), ("left lung", (14, 2, 22, 20)), ("heart", (8, 12, 16, 22))):
        (tmp_path / folder).mkdir()
        im = np.zeros((24, 24), np.uint8)
        im[box[1] : box[3], box[0] : box[2]] = 255
        Image.fromarray(im).save(tmp_path / folder / "JPCLN001.gif")
    masks = data.read_jsrt_masks(tmp_path, "JPCLN001")
    assert masks.shape == (3, 24, 24) and masks.dtype == bool
    assert masks[0, 5, 5] and masks[1, 5, 18] and masks[2, 15, 12] and not masks[2, 5, 5]
    with pytest.raises(FileNotFoundError, match="no right lung mask for JPCLN999"):
        data.read_jsrt_masks(tmp_path, "JPCLN999")


def test_ctr_and_outline_on_drawn_masks():
    masks = np.zeros((3, 100, 100), bool)
    masks[0, 20:80, 10:45] = True  # thorax from column 10 to 89: 80 px
    masks[1, 20:80, 55:90] = True
    masks[2, 50:80, 30:70] = True  # heart 40 px wide
    assert cardiothoracic_ratio(masks) == pytest.approx(0.5)
    # the cardiomediastinal silhouette: the mediastinum above, however wide, is not the heart
    masks[2, 20:50, 45:55] = True
    masks[2, 22:30, 20:80] = True
    g = ctr_geometry(masks)
    assert g.ctr == pytest.approx(0.5) and (g.heart_width_px, g.thorax_width_px) == (40, 80)
    assert g.heart_line[:, 0].tolist() == [30, 70] and g.thorax_line[:, 0].tolist() == [10, 90]
    assert g.heart_line[0, 1] == g.heart_line[1, 1] and 50 <= g.heart_line[0, 1] <= 80
    masks[2] = False
    assert np.isnan(cardiothoracic_ratio(masks))
    pts = outline(masks[0])
    assert pts is not None and pts.shape[1] == 2
    assert pts[:, 0].min() == pytest.approx(10.5) and pts[:, 0].max() == pytest.approx(44.5)
    assert pts[:, 1].min() == pytest.approx(20.5) and pts[:, 1].max() == pytest.approx(79.5)


def test_phantoms_are_real_dicom_with_truth(tmp_path):
    folders = phantom.write_phantoms(tmp_path, 3, seed=5001)
    assert len(folders) == 3
    uids = set()
    for f in folders:
        truth = json.loads((f / "truth.json").read_text())
        ds = pydicom.dcmread(f / truth["file"])
        uids.add(ds.StudyInstanceUID)
        assert ds.Modality in ("CR", "DX") and ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
        assert ds.PatientID.startswith("PH-") and float(ds.ImagerPixelSpacing[0]) > 0
        preprocess.check_header(ds)
        assert set(truth["labels"]) == set(LABELS)
        assert truth["labels"]["Hernia"] is None  # not synthesised
        with np.load(f / truth["masks_file"]) as z:
            masks = z["masks"]
        assert masks.shape == (3, ds.Rows, ds.Columns)
        assert cardiothoracic_ratio(masks) == pytest.approx(truth["ctr"])
        assert truth["labels"]["Cardiomegaly"] == (truth["ctr"] > 0.5)
        assert all(len(v) >= 3 for v in truth["outlines"].values())
    assert len(uids) == 3


def test_phantom_findings_change_the_image():
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
    none = {k: False for k in phantom.SYNTHESISED}
    clean = phantom.render(rng_a, none)
    sick = phantom.render(rng_b, {**none, "Effusion": True})
    assert clean.attenuation.shape == sick.attenuation.shape
    diff = np.abs(clean.attenuation - sick.attenuation)
    assert diff[clean.masks[0] | clean.masks[1]].max() > 0.1
    big = phantom.render(np.random.default_rng(12), {**none, "Cardiomegaly": True})
    small = phantom.render(np.random.default_rng(12), none)
    assert big.ctr > 0.5 > small.ctr


def _ds(**attrs):
    ds = pydicom.Dataset()
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"ViewPosition": "LL"}, "lateral view"),
        ({"ViewPosition": "", "SeriesDescription": "Thorax lat"}, "lateral view"),
        ({"AcquisitionDeviceProcessingDescription": "CANINE LATERAL THORAX"}, "lateral view"),
        ({"Modality": "CT"}, "modality CT is not a radiograph"),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "colour image"),
        ({"BodyPartExamined": "KNEE"}, "body part KNEE"),
    ],
)
def test_header_checks_decline(attrs, message):
    with pytest.raises(NotApplicable, match=message):
        preprocess.check_header(_ds(**attrs))


def test_header_checks_accept_frontal_chest():
    preprocess.check_header(_ds(BodyPartExamined="CHEST", ViewPosition="PA", SeriesDescription="Chest PA"))
    preprocess.check_header(_ds(ViewPosition="AP"))
    preprocess.check_header(_ds(BodyPartExamined="KNEE", ViewPosition="PA"))  # routed by view position


def test_evaluation_metrics_and_a_nan_or_missing_metric_fails():
    from analyzers.chest_xray_thoracic.evaluate import REQUIRED, _missing_or_nan, auroc, bootstrap_ci

    y = np.array([0, 0, 1, 1, 0, 1, 0, 1] * 10, bool)
    p = np.where(y, 0.7, 0.3) + np.linspace(-0.25, 0.25, len(y))
    lo, hi = bootstrap_ci(y, p, n=200)
    assert lo <= auroc(y, p) <= hi and 0.5 < lo < hi <= 1.0
    assert np.isnan(auroc(np.ones(4, bool), np.arange(4.0)))
    assert _missing_or_nan({"a": {"b": float("nan"), "ok": 1.0}, "c": [0.5, float("inf")], "d": None}) == ["a.b", "c[1]"]
    assert "cxr14_test.pneumonia_vs_no_finding.auroc" in REQUIRED
