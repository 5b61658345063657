"""Volume assembly from series: sorting, spacing, orientation, several stacks, photometry, real series."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers import phantoms
from analyzers.volume import assemble, plane_of_normal, resample, series_plane, stacks, study_volumes
from dicomnode.analysis import NotApplicable, Study


def _rotation(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    # rotation about the patient x axis (a sagittal stack tilted in its own plane)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def _series(
    volume: np.ndarray,
    spacing=(4.0, 0.8, 0.9),
    row_dir=(0.0, 1.0, 0.0),
    col_dir=(0.0, 0.0, -1.0),
    origin=(-20.0, -100.0, 80.0),
    tilt: float = 0.0,
    positions: list[float] | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    photometric: str = "MONOCHROME2",
    shuffle: bool = True,
    series_uid: str = "1.2.826.0.1.3680043.10.1137.99.1",
) -> list[pydicom.Dataset]:
    patient = phantoms.PhantomPatient("PH-VOL", "PHANTOM^VOL", "19700101", "F", study_uid="1.2.826.0.1.3680043.10.1137.99")
    rot = _rotation(tilt)
    r, c = rot @ np.array(row_dir), rot @ np.array(col_dir)
    n = np.cross(r, c)
    out = []
    for k in range(volume.shape[0]):
        depth = positions[k] if positions is not None else k * spacing[0]
        ipp = np.array(origin) + depth * n
        stored = np.round((volume[k] - intercept) / slope).astype(np.uint16)
        ds = phantoms.image_dataset(
            stored, patient=patient, modality="MR", sop_class_uid=phantoms.MR_IMAGE, series_uid=series_uid,
            instance_number=k + 1, pixel_spacing=spacing[1:], photometric=photometric,
            attributes={
                "ImageOrientationPatient": [f"{v:.8f}" for v in (*r, *c)],
                "ImagePositionPatient": [f"{v:.6f}" for v in ipp],
                "RescaleSlope": slope, "RescaleIntercept": intercept, "SliceThickness": spacing[0],
            },
        )
        out.append(ds)
    if shuffle:
        random.Random(7).shuffle(out)
    return out


def _volume(shape=(12, 40, 30), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, size=shape).astype(np.float32)


def test_sorted_by_position_with_spacing_and_orientation_from_headers():
    vol = _volume()
    study = Study.from_datasets(_series(vol, tilt=12.0))
    v = assemble(study.series[0])
    np.testing.assert_array_equal(v.array, vol)
    assert v.spacing == pytest.approx((4.0, 0.8, 0.9))
    assert v.plane == "sagittal" and series_plane(study.series[0]) == "sagittal"
    assert not v.irregular_spacing
    # the voxel -> patient mapping reproduces every slice's ImagePositionPatient
    for k, src in enumerate(v.sources):
        ds = study.instance(src.sop_instance_uid).dataset
        ipp = np.array([float(x) for x in ds.ImagePositionPatient])
        np.testing.assert_allclose(v.index_to_patient(np.array([k, 0, 0])), ipp, atol=1e-4)
        assert int(ds.InstanceNumber) == k + 1
    idx = np.array([[3.0, 10.5, 7.25], [0.0, 39.0, 29.0]])
    np.testing.assert_allclose(v.patient_to_index(v.index_to_patient(idx)), idx, atol=1e-9)


def test_slices_in_reverse_order_along_the_normal_are_reordered():
    vol = _volume()
    positions = [-k * 3.0 for k in range(vol.shape[0])]
    v = assemble(Study.from_datasets(_series(vol, positions=positions)).series[0])
    np.testing.assert_array_equal(v.array, vol[::-1])
    assert v.spacing[0] == pytest.approx(3.0)


def test_rescale_and_monochrome1_give_modality_values_bright_high():
    vol = _volume(seed=1) * 0.5 - 1000.0
    v = assemble(Study.from_datasets(_series(vol, slope=0.5, intercept=-1000.0)).series[0])
    np.testing.assert_allclose(v.array, vol, atol=1e-3)
    raw = _volume(seed=2)
    inverted = assemble(Study.from_datasets(_series(raw, photometric="MONOCHROME1")).series[0])
    for k in range(raw.shape[0]):
        np.testing.assert_allclose(inverted.array[k], raw[k].max() + raw[k].min() - raw[k])


def test_several_stacks_in_one_series_are_split_by_orientation():
    sag = _series(_volume((9, 32, 32), seed=3), shuffle=False)
    ax = _series(_volume((5, 32, 32), seed=4), row_dir=(1, 0, 0), col_dir=(0, 1, 0), shuffle=False)
    for i, ds in enumerate(ax):
        ds.InstanceNumber = 100 + i
    study = Study.from_datasets(sag + ax)
    found = stacks(study.series[0])
    assert [(v.plane, v.array.shape[0]) for v in found] == [("sagittal", 9), ("axial", 5)]
    assert [v.plane for v in study_volumes(study.series, plane="axial")] == ["axial"]


def test_repeated_positions_and_irregular_gaps():
    vol = _volume((6, 16, 16), seed=5)
    data = _series(vol, positions=[0, 4, 4, 8, 12, 20], shuffle=False)
    v = assemble(Study.from_datasets(data).series[0])
    assert v.array.shape[0] == 5
    np.testing.assert_array_equal(v.array[1], vol[1])  # the lower InstanceNumber wins
    assert v.irregular_spacing and v.spacing[0] == pytest.approx(4.0)


def test_series_without_geometry_is_not_applicable():
    data = _series(_volume((3, 8, 8), seed=6))
    for ds in data:
        del ds.ImageOrientationPatient
    with pytest.raises(NotApplicable, match="ImageOrientationPatient"):
        assemble(Study.from_datasets(data).series[0])


def test_resample_keeps_extent_and_patient_geometry():
    vol = np.zeros((10, 40, 40), np.float32)
    vol[4, 20, 20] = 1000.0
    v = assemble(Study.from_datasets(_series(vol, spacing=(4.0, 1.0, 1.0), tilt=20.0)).series[0])
    iso = resample(v, (1.0, 1.0, 1.0))
    assert iso.array.shape == (40, 40, 40)
    k, r, c = np.unravel_index(np.argmax(iso.array), iso.array.shape)
    np.testing.assert_allclose(iso.index_to_patient(np.array([k, r, c])), v.index_to_patient(np.array([4, 20, 20])), atol=1e-6)
    assert iso.sources[k] == v.sources[4]


def test_plane_of_normal():
    assert plane_of_normal([0.9, 0.1, 0.4]) == "sagittal"
    assert plane_of_normal([0.1, -0.95, 0.2]) == "coronal"
    assert plane_of_normal([0, 0, -1]) == "axial"


# -- real series -----------------------------------------------------------


def test_real_ct_series_is_sorted_with_spacing_from_positions(realdata: Path):
    folder = realdata / "totalsegmentator" / "tests" / "reference_files" / "example_ct_dicom"
    if not folder.is_dir():
        pytest.skip("TotalSegmentator CT series not present")
    paths = sorted(folder.iterdir())
    random.Random(1).shuffle(paths)
    datasets = [pydicom.dcmread(p) for p in paths]
    for i, ds in enumerate(datasets):  # the anonymised files carry empty UIDs; the node never stores such
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1137.98.{i + 1}"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1137.98"
    study = Study.from_datasets(datasets, paths)
    v = assemble(study.series[0])
    assert v.array.shape == (20, 512, 512) and v.plane == "axial"
    assert v.spacing[0] == pytest.approx(2.0, abs=1e-3) and v.spacing[1] == pytest.approx(0.977, abs=1e-3)
    z = [float(study.instance(s.sop_instance_uid).header().ImagePositionPatient[2]) for s in v.sources]
    assert z == sorted(z) and z[0] == pytest.approx(-804.5)
    # CT numbers in HU: air near -1000, soft tissue around 0-100
    assert v.array.min() <= -900 and 0 < float(np.median(v.array[v.array > -500])) < 200


def test_real_enhanced_mr_without_functional_groups_is_not_applicable(realdata: Path):
    path = realdata / "pydicom-data" / "data_store" / "data" / "emri_small.dcm"
    if not path.is_file():
        pytest.skip("emri_small.dcm not present")
    ds = pydicom.dcmread(path)  # its per-frame geometry was stripped: no position, no orientation
    with pytest.raises(NotApplicable, match="ImagePositionPatient"):
        assemble(Study.from_datasets([ds], [path]).series[0])


def test_enhanced_multiframe_geometry_from_functional_groups():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    vol = _volume((4, 16, 16), seed=8)
    slices = _series(vol, spacing=(5.0, 0.7, 0.7), shuffle=False)
    ds = slices[0]
    ds.NumberOfFrames = 4
    ds.PixelData = np.ascontiguousarray(vol[::-1].astype(np.uint16)).tobytes()
    shared, measures = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.7, 0.7], 5.0
    orient = Dataset()
    orient.ImageOrientationPatient = ds.ImageOrientationPatient
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orient])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(4):  # frames stored from the last slice to the first
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = slices[3 - k].ImagePositionPatient
        item.PlanePositionSequence = Sequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    for kw in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        delattr(ds, kw)
    v = assemble(Study.from_datasets([ds]).series[0])
    np.testing.assert_array_equal(v.array, vol)
    assert [s.frame for s in v.sources] == [4, 3, 2, 1] and v.spacing == pytest.approx((5.0, 0.7, 0.7))


def test_real_lumbar_mr_wrapped_as_a_sagittal_series(realdata: Path):
    mat = realdata / "fastcleverseg" / "ImageDatasets" / "VBs" / "VB2" / "Isotropic" / "Matlab" / "02.mat"
    if not mat.is_file():
        pytest.skip("fastcleverseg volume not present")
    from scipy.io import loadmat

    image = loadmat(mat)["I"].astype(np.float32)
    vol = np.moveaxis(image, 2, 0)[::4]  # every fourth 1 mm slice: a 4 mm sagittal stack
    v = assemble(Study.from_datasets(_series(vol, spacing=(4.0, 1.0, 1.0), tilt=-8.0)).series[0])
    np.testing.assert_array_equal(v.array, vol)
    assert v.plane == "sagittal" and v.spacing == pytest.approx((4.0, 1.0, 1.0))
