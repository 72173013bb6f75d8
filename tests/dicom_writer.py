"""Writing DICOM series with pydicom for tests: one CT file per slice, geometry tags from a NIfTI-style affine."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def new_dataset(meta_sop_class: str, series_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta_sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "Phantom"
    return ds


def write_slice(path: Path, pixels: np.ndarray, orientation, position, pixel_spacing, series_uid: str,
                description: str = "test", slope: float | None = None, intercept: float | None = None,
                thickness: float | None = None, instance: int = 1) -> Path:
    """One CT slice file; ``pixels`` is ``[rows, columns]`` int16, geometry tags written as given."""
    ds = new_dataset(CT_IMAGE, series_uid)
    ds.Modality = "CT"
    ds.SeriesDescription = description
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
    ds.ImagePositionPatient = [round(float(v), 6) for v in position]
    ds.PixelSpacing = [round(float(v), 8) for v in pixel_spacing]
    if thickness is not None:
        ds.SliceThickness = thickness
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    ds.set_pixel_data(np.ascontiguousarray(pixels, dtype=np.int16), "MONOCHROME2", 16, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def slice_tags(affine_ras: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(ImageOrientationPatient, ImagePositionPatient, PixelSpacing) of slice ``k`` of a volume on ``affine_ras``
    whose axis 0 runs along image rows (columns index) and axis 1 down image columns (rows index)."""
    lps = LPS @ affine_ras
    column_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = np.concatenate([lps[:3, 0] / column_spacing, lps[:3, 1] / row_spacing])
    return orientation, (lps @ [0, 0, k, 1])[:3], [row_spacing, column_spacing]


def write_volume(folder: Path, volume: np.ndarray, affine_ras: np.ndarray, rng: np.random.Generator,
                 series_uid: str | None = None, **tags) -> tuple[str, list[Path]]:
    """Write ``volume [X, Y, Z]`` as one file per slice under random names, in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    paths = []
    for k in rng.permutation(volume.shape[2]):
        orientation, position, spacing = slice_tags(affine_ras, int(k))
        paths.append(write_slice(folder / uuid.UUID(int=int(rng.integers(2**62))).hex, volume[:, :, k].T,
                                 orientation, position, spacing, series_uid, instance=int(k) + 1, **tags))
    return series_uid, paths
