"""Reading a DICOM series (a folder of slice files, or one multi-frame file) as a 3D volume, for inference.

:func:`read_dicom_series` returns a :class:`DicomVolume` laid out like the NIfTI reader of
:mod:`attnseg.datasets.nifti`: ``array [X, Y, Z]`` float32 where axis 0 runs along a row of the image (the
column index ``i``, direction cosine ``ImageOrientationPatient[:3]``), axis 1 down a column (the row index
``j``, direction ``ImageOrientationPatient[3:]``) and axis 2 through the slices, sorted along the slice normal
``row x column``. ``affine`` maps voxel indices to world millimetres in **RAS** like a NIfTI affine: DICOM
patient coordinates are LPS, so the first two rows of the DICOM affine are negated.

Geometry is taken from the headers, never from file names, file order, ``InstanceNumber`` or ``SliceThickness``:

- orientation from ``ImageOrientationPatient`` (identical on every slice, within :data:`ORIENTATION_ATOL`);
- slice order and spacing from ``ImagePositionPatient`` projected on the slice normal; the gaps must be equal
  (within :data:`SLICE_GAP_RTOL` of the median gap) and the positions on one line. The slice axis of the affine
  is the step between neighbouring positions, so a gantry tilt stays exact (the affine is then sheared: a NIfTI
  sform holds it, a qform cannot);
- ``PixelSpacing`` is ``[row spacing, column spacing]``: the column spacing (between columns) scales axis 0;
- ``RescaleSlope``/``RescaleIntercept`` are applied per slice (CT in Hounsfield units).

Enhanced (multi-frame) CT/MR files carry the same attributes per frame in ``PerFrameFunctionalGroupsSequence``
(or once in ``SharedFunctionalGroupsSequence``). A single 2D image is a one-slice volume whose slice spacing is
``SliceThickness`` (or 1 mm).

Every failure is a :class:`~attnseg.errors.DataError` naming the file or folder and the problem. Not supported:
colour images (``SamplesPerPixel`` > 1), series with several echoes/time points at one position (they show as
duplicate positions), and files without the 128-byte preamble and ``DICM`` marker when a folder is scanned.

Command line: ``python -m attnseg.datasets.dicom IN_FOLDER_OR_FILE OUT.nii.gz [--series-uid UID]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from attnseg.errors import DataError

__all__ = ["DicomVolume", "read_dicom_series", "dicom_to_nifti", "is_dicom_input", "ORIENTATION_ATOL",
           "SLICE_GAP_RTOL", "POSITION_ATOL", "main"]

ORIENTATION_ATOL = 1e-3  # direction cosines of one series may differ by rounding in the text field, not more
SLICE_GAP_RTOL = 0.01  # slice gaps may differ from the median gap by 1% (rounded positions), not more
POSITION_ATOL = 1e-3  # mm: slices closer than this along the normal are at the same position
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient (LPS) -> NIfTI world (RAS)
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFER_SIZE = "64 KB"  # the header pass keeps large values (pixel data) on disk until they are used


@dataclass(frozen=True, eq=False)
class DicomVolume:
    """One DICOM series as a volume.

    Attributes:
        array: ``[X, Y, Z]`` float32, rescale slope/intercept applied (see the module docstring for the axes).
        affine: ``[4, 4]`` float64, voxel index ``(i, j, k, 1)`` -> RAS world mm (a NIfTI affine).
        spacing: voxel size in mm along the three axes (the column norms of ``affine``).
        series_uid: ``SeriesInstanceUID``.
        description: ``SeriesDescription`` ('' when absent).
        modality: ``Modality`` ('' when absent).
        files: the files read, in slice order (one file for a multi-frame series).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    series_uid: str
    description: str
    modality: str
    files: tuple[Path, ...]


@dataclass
class _Slice:
    """Geometry and rescale of one 2D image: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    ds: Dataset
    frame: int | None  # frame index in a multi-frame file, None for a single-frame file
    orientation: np.ndarray  # [6]: row direction cosine (along a row, i), column direction cosine (j); LPS
    position: np.ndarray  # [3]: LPS mm of the first transmitted pixel
    pixel_spacing: np.ndarray  # [2]: (between rows, between columns) mm
    slope: float
    intercept: float
    thickness: float | None

    @property
    def label(self) -> str:
        return str(self.path) if self.frame is None else f"{self.path} (frame {self.frame + 1})"


def _has_dicom_marker(path: Path) -> bool:
    """Whether ``path`` starts with the DICOM preamble: 128 bytes, then ``DICM``."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder`` (recursively), sorted."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found


def is_dicom_input(path: str | os.PathLike) -> bool:
    """Whether ``path`` is DICOM input: a ``.dcm`` file, a file with the ``DICM`` marker at byte 128, or a folder
    holding at least one such file (searched recursively; file names and suffixes are not looked at)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".dcm" or _has_dicom_marker(path)
    if path.is_dir():
        return any(_has_dicom_marker(p) for p in _walk_files(path))
    return False


def _dcmread(path: Path, force: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=force)
    except Exception as e:  # noqa: BLE001 - pydicom raises InvalidDicomError, EOFError, OSError, ValueError, ...
        raise DataError(f"cannot read DICOM file {path}: {type(e).__name__}: {e}") from None


def _read_single_file(path: Path) -> Dataset:
    """The dataset of a file given as the whole input; a file without the ``DICM`` marker (old ACR-NEMA style) is
    read with pydicom's ``force`` and accepted only if it parses into a DICOM object (it has a SOP class or an
    image size)."""
    if _has_dicom_marker(path):
        return _dcmread(path)
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=True)
        is_dicom = "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)
    except Exception:  # noqa: BLE001 - forced parsing of a non-DICOM file fails in many ways
        is_dicom = False
    if not is_dicom:
        raise DataError(f"{path} is not a DICOM file (no 'DICM' marker at byte 128, and no DICOM object found when "
                        f"parsing it anyway)")
    return ds


def _floats(value: Any, count: int, path: str, name: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.shape != (count,) or not np.isfinite(out).all():
        raise DataError(f"{path}: {name} should be {count} numbers, got {value!r}")
    return out


def _functional(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` for ``frame``: the per-frame one, else the shared one."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is not None and len(items) > index and sequence in items[index]:
            inner = getattr(items[index], sequence)
            if len(inner):
                return inner[0]
    return None


def _rescale(source: Dataset | None) -> tuple[float, float]:
    if source is None:
        return 1.0, 0.0
    slope = source.get("RescaleSlope", None)
    intercept = source.get("RescaleIntercept", None)
    return (1.0 if slope is None else float(slope)), (0.0 if intercept is None else float(intercept))


def _optional_float(source: Dataset | None, name: str) -> float | None:
    value = None if source is None else source.get(name, None)
    if value is None or value == "":
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def _frame_count(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _slices_of_file(path: Path, ds: Dataset, lone_image: bool) -> list[_Slice]:
    """The 2D images of one file with their geometry. ``lone_image``: the file is the whole input, so a 2D image
    without geometry (a radiograph) is accepted with an identity orientation (with a warning)."""
    frames = _frame_count(ds)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        top_slope, top_intercept = _rescale(ds) if "RescaleSlope" in ds else (None, None)
        slices = []
        for f in range(frames):
            where = f"{path} (frame {f + 1})"
            plane_orientation = _functional(ds, f, "PlaneOrientationSequence")
            plane_position = _functional(ds, f, "PlanePositionSequence")
            measures = _functional(ds, f, "PixelMeasuresSequence")
            for name, item, attr in (("PlaneOrientationSequence", plane_orientation, "ImageOrientationPatient"),
                                     ("PlanePositionSequence", plane_position, "ImagePositionPatient"),
                                     ("PixelMeasuresSequence", measures, "PixelSpacing")):
                if item is None or attr not in item:
                    raise DataError(f"{where}: no {attr} in the functional groups ({name}); cannot place the frame")
            transform = _functional(ds, f, "PixelValueTransformationSequence")
            slope, intercept = _rescale(transform)
            if transform is None and top_slope is not None:
                slope, intercept = top_slope, top_intercept
            slices.append(_Slice(path, ds, f,
                                 _floats(plane_orientation.ImageOrientationPatient, 6, where, "ImageOrientationPatient"),
                                 _floats(plane_position.ImagePositionPatient, 3, where, "ImagePositionPatient"),
                                 _floats(measures.PixelSpacing, 2, where, "PixelSpacing"),
                                 slope, intercept, _optional_float(measures, "SliceThickness")))
        return slices
    if frames > 1:
        raise DataError(f"{path}: a multi-frame file ({frames} frames) without per-frame positions "
                        f"(PerFrameFunctionalGroupsSequence); cannot place its frames in space")
    slope, intercept = _rescale(ds)
    missing = [n for n in ("ImageOrientationPatient", "ImagePositionPatient") if n not in ds]
    if missing and not lone_image:
        raise DataError(f"{path}: no {' or '.join(missing)}; cannot place the slice in its series")
    if missing:
        # A projection radiograph (CR/DX) or a secondary capture has no patient geometry; as the only input it is
        # still usable for 2D inference, on an identity grid.
        warnings.warn(f"{path} has no {' or '.join(missing)}: read as one slice on an identity orientation at the "
                      f"origin", stacklevel=3)
        orientation = np.array([1.0, 0, 0, 0, 1, 0])
        position = np.zeros(3)
    else:
        orientation = _floats(ds.ImageOrientationPatient, 6, str(path), "ImageOrientationPatient")
        position = _floats(ds.ImagePositionPatient, 3, str(path), "ImagePositionPatient")
    spacing_name = next((n for n in ("PixelSpacing", "ImagerPixelSpacing") if n in ds), None)
    if spacing_name is None and not lone_image:
        raise DataError(f"{path}: no PixelSpacing")
    if spacing_name is None:
        warnings.warn(f"{path} has no PixelSpacing: 1 mm assumed", stacklevel=3)
        pixel_spacing = np.ones(2)
    else:
        pixel_spacing = _floats(ds[spacing_name].value, 2, str(path), spacing_name)
    return [_Slice(path, ds, None, orientation, position, pixel_spacing, slope, intercept,
                   _optional_float(ds, "SliceThickness"))]


def _geometry_checks(slices: Sequence[_Slice], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check that every slice shares the first one's orientation and pixel spacing; returns the row and column
    direction cosines and the unit slice normal (LPS)."""
    first = slices[0]
    row_cosine, column_cosine = first.orientation[:3], first.orientation[3:]
    for name, vector in (("row", row_cosine), ("column", column_cosine)):
        if abs(np.linalg.norm(vector) - 1) > 1e-2:
            raise DataError(f"{first.label}: ImageOrientationPatient {name} direction {vector.tolist()} is not a unit "
                            f"vector")
    if abs(row_cosine @ column_cosine) > 1e-2:
        raise DataError(f"{first.label}: ImageOrientationPatient directions {first.orientation.tolist()} are not "
                        f"perpendicular")
    for s in slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_ATOL):
            raise DataError(f"{where}: inconsistent orientation within the series: ImageOrientationPatient "
                            f"{np.round(s.orientation, 5).tolist()} in {s.label} but "
                            f"{np.round(first.orientation, 5).tolist()} in {first.label} (a localizer or several "
                            f"stacks in one series?)")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):
            raise DataError(f"{where}: different PixelSpacing within the series: {s.pixel_spacing.tolist()} in "
                            f"{s.label} but {first.pixel_spacing.tolist()} in {first.label}")
    row_cosine = row_cosine / np.linalg.norm(row_cosine)
    column_cosine = column_cosine / np.linalg.norm(column_cosine)
    normal = np.cross(row_cosine, column_cosine)
    return row_cosine, column_cosine, normal / np.linalg.norm(normal)


def _format_gaps(gaps: np.ndarray, distances: np.ndarray, median: float, tolerance: float) -> str:
    """A short account of unequal gaps: the distinct gaps with counts, and where the first odd ones are."""
    values, counts = np.unique(np.round(gaps, 3), return_counts=True)
    listed = ", ".join(f"{v:g} mm x{c}" for v, c in zip(values, counts))
    odd = np.flatnonzero(np.abs(gaps - median) > tolerance)
    places = "; ".join(f"{gaps[k]:.4g} mm between slices {k} and {k + 1} (at {distances[k]:.4g} and "
                       f"{distances[k + 1]:.4g} mm along the normal)" for k in odd[:3])
    more = f"; and {len(odd) - 3} more" if len(odd) > 3 else ""
    return f"gaps {listed}; median {median:.4g} mm; odd: {places}{more}"


def _sort_and_step(slices: list[_Slice], normal: np.ndarray, where: str) -> tuple[list[_Slice], np.ndarray]:
    """Slices sorted along the normal and the LPS step vector between neighbours (``[3]``), checked: no two at
    one position, equal gaps, positions on one line."""
    distances = np.array([s.position @ normal for s in slices])
    order = np.argsort(distances, kind="stable")
    slices = [slices[k] for k in order]
    distances = distances[order]
    gaps = np.diff(distances)
    same = np.flatnonzero(gaps < POSITION_ATOL)
    if len(same):
        a, b = slices[same[0]], slices[same[0] + 1]
        raise DataError(f"{where}: duplicate slice positions: {len(same)} slice(s) share a position with another, "
                        f"e.g. {a.label} and {b.label} both at {np.round(a.position, 3).tolist()} mm (copied files, "
                        f"or several echoes/time points/stacks in one series?)")
    median = float(np.median(gaps))
    tolerance = max(SLICE_GAP_RTOL * median, POSITION_ATOL)
    if np.abs(gaps - median).max() > tolerance:
        raise DataError(f"{where}: unequal slice gaps (missing slices, or a series of several stacks?): "
                        f"{_format_gaps(gaps, distances, median, tolerance)}; tolerance {tolerance:.3g} mm")
    positions = np.stack([s.position for s in slices])  # [Z, 3]
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    off_line = np.linalg.norm(positions - (positions[0] + np.arange(len(slices))[:, None] * step), axis=1)
    if off_line.max() > tolerance:
        k = int(off_line.argmax())
        raise DataError(f"{where}: slice positions are not on one line: {slices[k].label} at "
                        f"{np.round(slices[k].position, 3).tolist()} mm is {off_line[k]:.3g} mm off the line through "
                        f"the first and last slice (tolerance {tolerance:.3g} mm)")
    return slices, step


def _pixels_of_file(path: Path, ds: Dataset) -> np.ndarray:
    """Stored pixel values ``[frames, rows, columns]`` of one file."""
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DataError(f"{path}: missing pixel data (no PixelData element; not an image?)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise DataError(f"{path}: colour images (SamplesPerPixel={samples}, "
                        f"{ds.get('PhotometricInterpretation', '?')}) are not supported; only greyscale volumes")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - missing decoders raise RuntimeError/NotImplementedError, damage ValueError
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DataError(f"{path}: cannot decode the pixel data (transfer syntax {name}): {type(e).__name__}: "
                        f"{e}") from None
    return np.asarray(pixels).reshape(_frame_count(ds), int(ds.Rows), int(ds.Columns))


def _check_sizes(slices: Sequence[_Slice], where: str) -> tuple[int, int]:
    sizes: dict[tuple[int, int], _Slice] = {}
    for s in slices:
        try:
            size = (int(s.ds.Rows), int(s.ds.Columns))
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{s.label}: missing pixel data (no Rows/Columns; not an image?)") from None
        sizes.setdefault(size, s)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} (e.g. {s.label})" for (r, c), s in sizes.items())
        raise DataError(f"{where}: slices of different sizes (rows x columns) in one series: {listed}")
    return next(iter(sizes))


def _assemble(slices: list[_Slice], where: str) -> tuple[np.ndarray, np.ndarray, list[_Slice]]:
    """``(array [X, Y, Z] float32, LPS affine [4, 4], slices in order)`` of one series' slices."""
    rows, columns = _check_sizes(slices, where)
    row_cosine, column_cosine, normal = _geometry_checks(slices, where)
    if len(slices) > 1:
        slices, step = _sort_and_step(slices, normal, where)
    else:
        step = normal * (slices[0].thickness or 1.0)
    row_spacing, column_spacing = slices[0].pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * column_spacing  # i walks along a row: one column further
    affine[:3, 1] = column_cosine * row_spacing  # j walks down a column: one row further
    affine[:3, 2] = step
    affine[:3, 3] = slices[0].position

    array = np.empty((columns, rows, len(slices)), dtype=np.float32)  # [X, Y, Z]
    multiframe: dict[Path, np.ndarray] = {}  # decoded once per multi-frame file; single frames are not kept
    for k, s in enumerate(slices):
        if s.frame is None:
            stored = _pixels_of_file(s.path, s.ds)[0]  # [rows, columns]
        else:
            if s.path not in multiframe:
                multiframe[s.path] = _pixels_of_file(s.path, s.ds)
            stored = multiframe[s.path][s.frame]
        array[:, :, k] = (stored.astype(np.float64) * s.slope + s.intercept).T  # [rows, cols] -> [X, Y]
    return array, affine, slices


def _describe(ds: Dataset, key: str) -> str:
    value = ds.get(key, "")
    return "" if value is None else str(value)


def _series_listing(series: dict[str, list[tuple[Path, Dataset]]], root: Path) -> str:
    lines = []
    for uid, members in series.items():
        ds = members[0][1]
        slices = sum(_frame_count(d) for _, d in members)
        folder = members[0][0].parent
        shown = folder.relative_to(root) if folder.is_relative_to(root) else folder
        lines.append(f"  {uid}  '{_describe(ds, 'SeriesDescription')}'  {_describe(ds, 'Modality') or '?'}  "
                     f"{slices} slice(s)  in {shown}")
    return "\n".join(lines)


def _folder_series(folder: Path, series_uid: str | None) -> tuple[str, list[tuple[Path, Dataset]]]:
    """The files ``(path, header)`` of the chosen series in ``folder`` and its UID."""
    files = [p for p in _walk_files(folder) if _has_dicom_marker(p)]
    if not files:
        raise DataError(f"no DICOM files (files with the 'DICM' marker at byte 128) in folder {folder}")
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in files:
        ds = _dcmread(path)
        uid = ds.get("SeriesInstanceUID", None)
        if uid:  # a DICOMDIR index or other non-image object carries no series
            series.setdefault(str(uid), []).append((path, ds))
    if not series:
        raise DataError(f"folder {folder}: {len(files)} DICOM file(s) but none belongs to a series "
                        f"(no SeriesInstanceUID; a DICOMDIR only?)")
    if series_uid is not None:
        if series_uid not in series:
            raise DataError(f"folder {folder} has no series with SeriesInstanceUID {series_uid}; it holds:\n"
                            f"{_series_listing(series, folder)}")
        return series_uid, series[series_uid]
    with_pixels = {uid: m for uid, m in series.items() if any(any(t in d for t in _PIXEL_TAGS) for _, d in m)}
    if not with_pixels:
        raise DataError(f"folder {folder}: no series holds pixel data (no images):\n{_series_listing(series, folder)}")
    if len(with_pixels) > 1:
        raise DataError(f"folder {folder} holds {len(with_pixels)} image series; choose one by its "
                        f"SeriesInstanceUID (series_uid=..., --series-uid):\n{_series_listing(with_pixels, folder)}")
    uid, members = next(iter(with_pixels.items()))
    return uid, members


def read_dicom_series(path: str | os.PathLike, series_uid: str | None = None) -> DicomVolume:
    """Read one DICOM series as a volume.

    Args:
        path: a folder of DICOM files (searched recursively; any names, any order; files are recognised by the
            ``DICM`` marker at byte 128), or one DICOM file: an Enhanced (multi-frame) CT/MR volume or a single
            2D image (a one-slice volume).
        series_uid: the ``SeriesInstanceUID`` to read when the folder holds several series; without it, a folder
            with more than one image series is an error listing them.

    Returns:
        A :class:`DicomVolume`: ``array [X, Y, Z]`` float32 (X along image rows, Y down image columns, Z along the
        slice normal), ``affine [4, 4]`` voxel -> RAS mm, ``spacing`` (mm per axis), the series' UID, description
        and modality, and the files read in slice order.

    Raises:
        DataError: naming the file or folder, for: no DICOM files, unreadable files, several series without
            ``series_uid`` (listing them), an unknown ``series_uid``, inconsistent orientation or pixel spacing,
            duplicate positions, unequal slice gaps, slices of different sizes, missing pixel data, colour images
            or pixel data that cannot be decoded.
    """
    path = Path(path)
    if path.is_dir():
        uid, members = _folder_series(path, series_uid)
        slices = [s for p, ds in members for s in _slices_of_file(p, ds, lone_image=False)]
        where = f"series {uid} in folder {path}"
        first_ds = members[0][1]
    elif path.is_file():
        first_ds = _read_single_file(path)
        uid = _describe(first_ds, "SeriesInstanceUID")
        if series_uid is not None and uid != series_uid:
            raise DataError(f"{path} belongs to series {uid or '(none)'}, not to the requested {series_uid}")
        slices = _slices_of_file(path, first_ds, lone_image=True)
        where = str(path)
    else:
        raise DataError(f"DICOM input not found: {path}")
    array, affine_lps, ordered = _assemble(slices, where)
    affine = LPS_TO_RAS @ affine_lps
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    files = tuple(dict.fromkeys(s.path for s in ordered))
    return DicomVolume(array=array, affine=affine, spacing=spacing,  # type: ignore[arg-type]
                       series_uid=uid, description=_describe(first_ds, "SeriesDescription"),
                       modality=_describe(first_ds, "Modality"), files=files)


def dicom_to_nifti(path: str | os.PathLike, out_file: str | os.PathLike, series_uid: str | None = None,
                   ) -> DicomVolume:
    """Read a DICOM series (see :func:`read_dicom_series`) and write it as NIfTI-1 to ``out_file``
    (``.nii`` or ``.nii.gz``): float32 voxels ``[X, Y, Z]``, the RAS affine as both qform and sform with code 1
    (scanner), units mm. Returns the volume that was written.

    A sheared affine (gantry tilt) is exact in the sform; the qform, which cannot hold a shear, gets the closest
    rotation (nibabel's choice) and a warning says so.

    Raises:
        DataError: for the reasons of :func:`read_dicom_series`, another suffix than ``.nii``/``.nii.gz``, or
            when the file cannot be written.
    """
    out_file = Path(out_file)
    if not (out_file.name.endswith(".nii") or out_file.name.endswith(".nii.gz")):
        raise DataError(f"NIfTI output must end with .nii or .nii.gz, got {out_file}")
    volume = read_dicom_series(path, series_uid)
    image = nib.Nifti1Image(volume.array, volume.affine)
    image.header.set_xyzt_units("mm")
    directions = volume.affine[:3, :3] / np.asarray(volume.spacing)
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-6):
        warnings.warn(f"{path}: the voxel axes are not perpendicular (gantry tilt?); the sform of {out_file} is "
                      f"exact, its qform is the closest unsheared approximation", stacklevel=2)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, str(out_file))
    except OSError as e:
        raise DataError(f"cannot write {out_file}: {e}") from None
    return volume


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnseg.datasets.dicom",
                                     description="Convert a DICOM series (folder or multi-frame file) to NIfTI.")
    parser.add_argument("input", help="folder of DICOM files, or one DICOM file")
    parser.add_argument("output", help="NIfTI file to write (.nii or .nii.gz)")
    parser.add_argument("--series-uid", default=None, help="SeriesInstanceUID to convert when the folder holds "
                                                           "several series")
    args = parser.parse_args(argv)
    volume = dicom_to_nifti(args.input, args.output, args.series_uid)
    spacing = " x ".join(f"{s:.4g}" for s in volume.spacing)
    print(f"wrote {args.output}: {volume.modality or 'DICOM'} '{volume.description}', shape "
          f"{list(volume.array.shape)}, voxels {spacing} mm, from {len(volume.files)} file(s) of series "
          f"{volume.series_uid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m attnseg.datasets.dicom IN OUT [--series-uid UID]``; exit status 2 and
    the message alone on a data error."""
    from attnseg.cli.common import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
