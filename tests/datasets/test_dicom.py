"""DICOM series reading, on series written here with pydicom from a known volume.

The ground truth is a volume with a distinct value in every voxel on a RAS grid. Acquisitions (axial, coronal,
sagittal, oblique, ascending or descending) are that volume re-sliced along other axes and written one file per
slice with the DICOM geometry tags, under random names, in shuffled order. The reader must place every value at
the same world point as the ground truth does.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from attnseg.datasets.dicom import dicom_to_nifti, is_dicom_input, main, read_dicom_series
from attnseg.errors import DataError
from tests.dicom_writer import LPS, new_dataset, slice_tags, write_slice, write_volume

ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"

# ground truth: [X, Y, Z] = [7, 6, 5] on a RAS grid with three different voxel sizes (0.7, 0.5, 2 mm)
GT_SHAPE = (7, 6, 5)
GT = (np.arange(np.prod(GT_SHAPE)).reshape(GT_SHAPE) * 3 + 11).astype(np.int16)
GT_AFFINE = np.array([[0.7, 0, 0, -10.0], [0, 0.5, 0, 20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])


def reslice(perm: tuple[int, int, int], flips: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth with its axes permuted and flipped, and the affine that keeps every voxel in place."""
    volume = GT.transpose(perm)
    to_gt = np.zeros((4, 4))  # acquisition index -> ground-truth index
    to_gt[3, 3] = 1
    for axis in range(3):
        flipped = axis in flips
        to_gt[perm[axis], axis] = -1 if flipped else 1
        to_gt[perm[axis], 3] = volume.shape[axis] - 1 if flipped else 0
    for axis in flips:
        volume = np.flip(volume, axis)
    return np.ascontiguousarray(volume), GT_AFFINE @ to_gt


def world_by_value(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``[N, 3]`` world points of the voxels, ordered by voxel value (values are distinct)."""
    index = np.indices(array.shape).reshape(3, -1)
    world = (affine @ np.vstack([index, np.ones(index.shape[1])]))[:3].T
    return world[np.argsort(array.ravel(), kind="stable")]


def assert_same_world(array: np.ndarray, affine: np.ndarray, truth: np.ndarray, truth_affine: np.ndarray) -> None:
    assert sorted(array.ravel().tolist()) == sorted(truth.ravel().astype(np.float32).tolist())
    np.testing.assert_allclose(world_by_value(array, affine), world_by_value(truth, truth_affine), atol=1e-4)


def test_axial_tags_read_by_hand(tmp_path):
    # Independent of the writer helpers: IOP rows along +x (L), columns along +y (P); 3 x 4 pixels, rows 0.5 mm
    # apart and columns 0.7 mm apart; slices 2 mm apart along +z (S), written top slice first.
    rng = np.random.default_rng(0)
    slices = {k: rng.integers(-1000, 1000, (3, 4)).astype(np.int16) for k in range(4)}
    uid = generate_uid()
    for k in (3, 1, 0, 2):
        write_slice(tmp_path / f"f{7 - k}", slices[k], [1, 0, 0, 0, 1, 0], [10, 20, 30 + 2 * k], [0.5, 0.7], uid)
    vol = read_dicom_series(tmp_path)
    assert vol.array.shape == (4, 3, 4) and vol.array.dtype == np.float32
    for k in range(4):
        np.testing.assert_array_equal(vol.array[:, :, k], slices[k].T)  # array[i, j] = pixel at row j, column i
    expected = np.array([[-0.7, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 2, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(vol.affine, expected, atol=1e-9)
    assert vol.affine.dtype == np.float64
    assert vol.spacing == pytest.approx((0.7, 0.5, 2.0))
    assert vol.series_uid == uid and vol.modality == "CT" and vol.description == "test"
    assert [p.name for p in vol.files] == ["f7", "f6", "f5", "f4"]


ACQUISITIONS = {  # name: (permutation of the ground-truth axes, flipped acquisition axes)
    "axial": ((0, 1, 2), (0, 1)),  # IOP [1,0,0, 0,1,0], slices inferior -> superior
    "axial_descending": ((0, 1, 2), (0, 1, 2)),  # slices superior -> inferior
    "coronal": ((0, 2, 1), (0, 1)),  # IOP [1,0,0, 0,0,-1]
    "sagittal": ((1, 2, 0), (0, 1)),  # IOP [0,1,0, 0,0,-1]
    "sagittal_descending": ((1, 2, 0), (0, 1, 2)),
}


@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_axis_aligned_acquisitions_match_ground_truth(tmp_path, name):
    volume, affine = reslice(*ACQUISITIONS[name])
    write_volume(tmp_path / "series", volume, affine, np.random.default_rng(1))
    vol = read_dicom_series(tmp_path / "series")
    assert_same_world(vol.array, vol.affine, GT, GT_AFFINE)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    np.testing.assert_array_equal(canonical.get_fdata(), GT)
    np.testing.assert_allclose(canonical.affine, GT_AFFINE, atol=1e-5)


def _oblique_affine() -> np.ndarray:
    def rotation(axis: int, degrees: float) -> np.ndarray:
        a, b = [d for d in range(3) if d != axis]
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        return r

    affine = GT_AFFINE.copy()
    affine[:3, :3] = rotation(0, 17) @ rotation(2, -28) @ rotation(1, 9) @ GT_AFFINE[:3, :3]
    return affine


@pytest.mark.parametrize("descending", [False, True])
def test_oblique_acquisition_keeps_world_positions(tmp_path, descending):
    volume, affine = reslice((0, 1, 2), (2,) if descending else ())
    affine = _oblique_affine() @ np.linalg.inv(GT_AFFINE) @ affine
    write_volume(tmp_path, volume, affine, np.random.default_rng(2))
    vol = read_dicom_series(tmp_path)
    assert_same_world(vol.array, vol.affine, volume, affine)
    assert vol.spacing == pytest.approx((0.7, 0.5, 2.0))
    # slices are stored along row x column whichever way they were written
    np.testing.assert_array_equal(vol.array, volume[:, :, ::-1] if descending else volume)


def test_world_convention_matches_nibabel_nicom(tmp_path):
    # nibabel's DICOM wrapper computes each file's affine on its own: (row index, column index, 0) -> LPS mm.
    wrappers = pytest.importorskip("nibabel.nicom.dicomwrappers")
    _, paths = write_volume(tmp_path, GT, _oblique_affine(), np.random.default_rng(3))
    vol = read_dicom_series(tmp_path)
    for k, path in enumerate(vol.files):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapper = wrappers.wrapper_from_data(pydicom.dcmread(path))
        for i, j in [(0, 0), (6, 0), (0, 5), (3, 4)]:
            theirs = LPS @ wrapper.affine @ [j, i, 0, 1]
            np.testing.assert_allclose(vol.affine @ [i, j, k, 1], theirs, atol=1e-4)
            assert vol.array[i, j, k] == wrapper.get_pixel_array()[j, i]


def test_world_convention_matches_monai(tmp_path):
    monai_data = pytest.importorskip("monai.data")
    volume, affine = reslice(*ACQUISITIONS["coronal"])
    affine = _oblique_affine() @ np.linalg.inv(GT_AFFINE) @ affine
    write_volume(tmp_path, volume, affine, np.random.default_rng(4))
    reader = monai_data.PydicomReader()  # RAS affine, array [columns, rows, slices]
    theirs, meta = reader.get_data(reader.read(str(tmp_path)))
    vol = read_dicom_series(tmp_path)
    assert_same_world(vol.array, vol.affine, np.asarray(theirs), np.asarray(meta["affine"], dtype=np.float64))


def test_rescale_slope_and_intercept_per_slice(tmp_path):
    rng = np.random.default_rng(5)
    uid = generate_uid()
    stored = rng.integers(0, 2000, (3, 4, 4)).astype(np.int16)  # [slice, rows, columns]
    for k in range(3):
        write_slice(tmp_path / f"s{k}", stored[k], [1, 0, 0, 0, 1, 0], [0, 0, 5.0 * k], [1, 1], uid,
                    slope=1 + 0.5 * k, intercept=-1024 + k)
    vol = read_dicom_series(tmp_path)
    for k in range(3):
        np.testing.assert_allclose(vol.array[:, :, k], stored[k].T * (1 + 0.5 * k) - 1024 + k)


def test_several_series_listed_and_selected_by_uid(tmp_path):
    rng = np.random.default_rng(6)
    first, _ = write_volume(tmp_path / "a", GT, GT_AFFINE, rng, description="AX T1")
    second, _ = write_volume(tmp_path / "b", GT[:, :, :3], GT_AFFINE, rng, description="COR T2")
    with pytest.raises(DataError) as info:
        read_dicom_series(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "2 image series" in message
    assert first in message and "'AX T1'" in message and "5 slice" in message
    assert second in message and "'COR T2'" in message and "3 slice" in message
    vol = read_dicom_series(tmp_path, series_uid=second)
    assert vol.series_uid == second and vol.description == "COR T2" and vol.array.shape == (7, 6, 3)
    np.testing.assert_array_equal(vol.array, GT[:, :, :3])
    with pytest.raises(DataError, match="no series with SeriesInstanceUID 1.2.3"):
        read_dicom_series(tmp_path, series_uid="1.2.3")


def test_unequal_gaps_name_the_folder_and_the_gaps(tmp_path):
    _, paths = write_volume(tmp_path, GT, GT_AFFINE, np.random.default_rng(7))
    vol_files = read_dicom_series(tmp_path).files
    vol_files[2].unlink()  # one slice missing in the middle: gaps 2, 4, 2 mm
    with pytest.raises(DataError, match="unequal slice gaps") as info:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(info.value) and "2 mm x2" in str(info.value) and "4 mm x1" in str(info.value)


def test_slightly_uneven_positions_within_tolerance(tmp_path):
    uid = generate_uid()
    for k, z in enumerate([0.0, 2.0005, 3.9998, 6.0]):  # rounded positions, well inside 1% of the gap
        write_slice(tmp_path / f"s{k}", np.full((2, 2), k, np.int16), [1, 0, 0, 0, 1, 0], [0, 0, z], [1, 1], uid)
    vol = read_dicom_series(tmp_path)
    assert vol.affine[2, 2] == pytest.approx(2.0) and vol.array[0, 0].tolist() == [0, 1, 2, 3]


def test_gantry_tilt_is_kept_in_the_affine_and_off_line_positions_refused(tmp_path):
    # tilted CT: each slice 2 mm up and 0.3 mm back (LPS +y); the slice axis follows the positions, not the normal
    uid = generate_uid()
    (tmp_path / "tilt").mkdir()
    for k in range(4):
        write_slice(tmp_path / "tilt" / f"s{k}", np.full((2, 3), k, np.int16), [1, 0, 0, 0, 1, 0],
                    [5, 0.3 * k, 2.0 * k], [1, 1], uid)
    vol = read_dicom_series(tmp_path / "tilt")
    np.testing.assert_allclose(vol.affine[:3, 2], [0, -0.3, 2.0], atol=1e-9)  # LPS (0, 0.3, 2) in RAS
    with pytest.warns(UserWarning, match="not perpendicular"):
        dicom_to_nifti(tmp_path / "tilt", tmp_path / "tilt.nii")
    np.testing.assert_allclose(nib.load(tmp_path / "tilt.nii").get_sform(), vol.affine, atol=1e-5)

    uid = generate_uid()
    (tmp_path / "zigzag").mkdir()
    for k in range(4):
        write_slice(tmp_path / "zigzag" / f"s{k}", np.full((2, 3), k, np.int16), [1, 0, 0, 0, 1, 0],
                    [5 + (k == 2), 0, 2.0 * k], [1, 1], uid)
    with pytest.raises(DataError, match="not on one line") as info:
        read_dicom_series(tmp_path / "zigzag")
    assert "s2" in str(info.value)


def test_non_image_series_beside_the_images_is_ignored(tmp_path):
    uid, _ = write_volume(tmp_path, GT, GT_AFFINE, np.random.default_rng(15))
    report = new_dataset("1.2.840.10008.5.1.4.1.1.88.11", generate_uid())  # a structured report: no pixels
    report.Modality = "SR"
    report.save_as(tmp_path / "report", enforce_file_format=True)
    assert read_dicom_series(tmp_path).series_uid == uid


def test_duplicate_positions(tmp_path):
    uid, _ = write_volume(tmp_path, GT, GT_AFFINE, np.random.default_rng(8))
    orientation, position, spacing = slice_tags(GT_AFFINE, 3)
    write_slice(tmp_path / "copy", GT[:, :, 3].T, orientation, position, spacing, uid)
    with pytest.raises(DataError, match="duplicate slice positions"):
        read_dicom_series(tmp_path)


def test_mismatched_sizes(tmp_path):
    uid, _ = write_volume(tmp_path, GT[:, :, :4], GT_AFFINE, np.random.default_rng(9))
    orientation, position, spacing = slice_tags(GT_AFFINE, 4)
    write_slice(tmp_path / "odd", np.zeros((6, 8), np.int16), orientation, position, spacing, uid)
    with pytest.raises(DataError, match=r"different sizes .*6x7.*6x8|different sizes .*6x8.*6x7"):
        read_dicom_series(tmp_path)


def test_inconsistent_orientation(tmp_path):
    uid, _ = write_volume(tmp_path, GT[:, :, :4], GT_AFFINE, np.random.default_rng(10))
    _, position, spacing = slice_tags(GT_AFFINE, 4)
    write_slice(tmp_path / "tilted", GT[:, :, 4].T, [-1, 0, 0, 0, 0.9962, -0.0872], position, spacing, uid)
    with pytest.raises(DataError, match="inconsistent orientation") as info:
        read_dicom_series(tmp_path)
    assert "tilted" in str(info.value)


def test_missing_pixel_data(tmp_path):
    _, paths = write_volume(tmp_path, GT, GT_AFFINE, np.random.default_rng(11))
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    ds.save_as(paths[0])
    with pytest.raises(DataError, match="missing pixel data") as info:
        read_dicom_series(tmp_path)
    assert paths[0].name in str(info.value)


def test_not_dicom_inputs(tmp_path):
    (tmp_path / "notes.dcm").write_text("not a DICOM file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("text")
    with pytest.raises(DataError, match="no DICOM files"):
        read_dicom_series(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        read_dicom_series(tmp_path / "missing")
    with pytest.raises(DataError, match="notes.dcm is not a DICOM file"):
        read_dicom_series(tmp_path / "notes.dcm")


def test_single_slice_spacing(tmp_path):
    orientation, position, spacing = slice_tags(GT_AFFINE, 0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_slice(tmp_path / "a" / "one", GT[:, :, 0].T, orientation, position, spacing, generate_uid(), thickness=3.0)
    write_slice(tmp_path / "b" / "one", GT[:, :, 0].T, orientation, position, spacing, generate_uid())
    thick = read_dicom_series(tmp_path / "a")
    assert thick.array.shape == (7, 6, 1) and thick.spacing == pytest.approx((0.7, 0.5, 3.0))
    np.testing.assert_allclose(thick.affine[:3, :2], GT_AFFINE[:3, :2], atol=1e-6)
    np.testing.assert_allclose(thick.affine[:3, 2], [0, 0, 3.0], atol=1e-6)
    assert read_dicom_series(tmp_path / "b" / "one").spacing == pytest.approx((0.7, 0.5, 1.0))


def test_enhanced_multiframe_file(tmp_path):
    volume, affine = reslice(*ACQUISITIONS["sagittal"])
    order = np.random.default_rng(12).permutation(volume.shape[2])  # frames stored out of order
    ds = new_dataset(ENHANCED_CT_IMAGE, generate_uid())
    ds.Modality, ds.SeriesDescription = "CT", "enhanced"
    orientation, _, spacing = slice_tags(affine, 0)
    measures, plane = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [round(float(v), 8) for v in spacing], 0.7
    plane.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        position, transform, frame = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [round(float(v), 6) for v in slice_tags(affine, int(k))[1]]
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -100, "HU"
        frame.PlanePositionSequence, frame.PixelValueTransformationSequence = Sequence([position]), Sequence([transform])
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    frames = np.stack([volume[:, :, k].T for k in order]).astype(np.int16)  # [frames, rows, columns]
    ds.set_pixel_data(frames, "MONOCHROME2", 16, generate_instance_uid=False)
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)

    vol = read_dicom_series(tmp_path / "enhanced.dcm")
    assert vol.files == (tmp_path / "enhanced.dcm",) and vol.description == "enhanced"
    assert_same_world((vol.array + 100) / 2, vol.affine, GT, GT_AFFINE)
    assert read_dicom_series(tmp_path).array.shape == vol.array.shape  # the folder holding it reads the same


def test_nifti_round_trip_and_cli(tmp_path, capsys):
    volume, affine = reslice(*ACQUISITIONS["coronal"])
    write_volume(tmp_path / "dicom", volume, affine, np.random.default_rng(13))
    vol = dicom_to_nifti(tmp_path / "dicom", tmp_path / "out" / "case.nii.gz")
    img = nib.load(tmp_path / "out" / "case.nii.gz")
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), vol.array)
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-5)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), vol.affine, atol=1e-5)
    np.testing.assert_allclose(img.header.get_zooms(), vol.spacing, atol=1e-6)

    assert main([str(tmp_path / "dicom"), str(tmp_path / "cli.nii")]) == 0
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_array_equal(nib.load(tmp_path / "cli.nii").get_fdata(), vol.array)
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "x.nii")]) == 2
    assert "error: DICOM input not found" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"\.nii or \.nii\.gz"):
        dicom_to_nifti(tmp_path / "dicom", tmp_path / "out.png")


def test_is_dicom_input(tmp_path):
    _, paths = write_volume(tmp_path / "series" / "nested", GT[:, :, :2], GT_AFFINE, np.random.default_rng(14))
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "a.png").write_bytes(b"\x89PNG" + bytes(200))
    (tmp_path / "x.dcm").write_bytes(b"")
    assert is_dicom_input(tmp_path / "series")  # names without suffix, found by the DICM marker
    assert is_dicom_input(paths[0])
    assert is_dicom_input(tmp_path / "x.dcm")
    assert not is_dicom_input(tmp_path / "pngs")
    assert not is_dicom_input(tmp_path / "pngs" / "a.png")
    assert not is_dicom_input(tmp_path / "missing")


def test_pydicom_ct_small_as_one_slice():
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file("CT_small.dcm", download=False)
    except Exception:  # noqa: BLE001 - any failure to locate the bundled file means it is not there
        path = None
    if path is None:
        pytest.skip("pydicom's CT_small.dcm is not available")
    ds = pydicom.dcmread(path)
    vol = read_dicom_series(path)
    assert vol.array.shape == (128, 128, 1) and vol.modality == "CT"
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(vol.array[:, :, 0], hu.T)
    assert -1100 < vol.array.min() < -800 and 1000 < vol.array.max() < 1300  # air to bone, in HU
    assert vol.spacing == pytest.approx((0.661468, 0.661468, float(ds.SliceThickness)), abs=1e-5)
    origin = LPS @ [*map(float, ds.ImagePositionPatient), 1]
    np.testing.assert_allclose(vol.affine[:, 3], origin, atol=1e-6)
