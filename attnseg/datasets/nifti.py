"""Reading 3D cases (image files plus an optional label file) from NIfTI with nibabel, for MONAI pipelines.

Every failure is a :class:`~attnseg.errors.DataError` naming the case and the file: a missing or unreadable
file, a layout that is not a volume, image/label shape or affine mismatch, label values outside the class map.

Layouts (numpy, voxel axes of the file, never transposed):

- image ``[C, X, Y, Z]`` float32, scaling slope/intercept applied: a 3D file is one channel; a 4D file
  ``[X, Y, Z, C]`` (Decathlon's multi-modal BraTS and prostate images) is moved channels-first; a 5D file
  ``[X, Y, Z, 1, C]`` (NIfTI's vector intent) likewise; several files (one per modality) are stacked.
- label ``[X, Y, Z]``, whole numbers, mapped to class indices (a trailing axis of size 1 is dropped).

This module imports MONAI (its loader is a ``monai.transforms.Transform``, which ``CacheDataset`` needs to
cache it); datasets import it when they are built, so ``import attnseg`` stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform

from attnseg.errors import DataError

__all__ = ["Case", "CaseLoader", "AFFINE_ATOL", "read_channels", "read_image", "read_label", "volume_layout"]

AFFINE_ATOL = 1e-3  # mm: affines of one case's files may differ by float noise, not by more


@dataclass(frozen=True)
class Case:
    """One case: ``id``, its image file(s) (one per modality, or one multi-channel file), its label or None."""

    id: str
    images: tuple[Path, ...]
    label: Path | None = None
    fold: int | None = None


def _open(path: Path, what: str) -> Any:
    """The nibabel image of ``path`` (header read, data not yet)."""
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            near = sorted(p.name for p in path.parent.iterdir() if p.name.split(".")[0] == path.name.split(".")[0])
            hint = f" (the folder has {near})" if near else ""
        else:
            hint = f" (folder {path.parent} does not exist)"
        raise DataError(f"{what} file not found: {path}{hint}")
    try:
        return nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises ImageFileError, OSError, EOFError, ... for bad files
        raise DataError(f"cannot read {what} {path} (not a NIfTI file, or damaged): {type(e).__name__}: {e}") from None


def volume_layout(shape: Sequence[int], path: Path, what: str) -> tuple[tuple[int, int, int], int]:
    """``(spatial shape, channels)`` of a stored array shape (see the module docstring for the layouts)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        return shape, 1  # type: ignore[return-value]
    if len(shape) == 4:
        return shape[:3], shape[3]  # type: ignore[return-value]
    if len(shape) == 5 and shape[3] == 1:
        return shape[:3], shape[4]  # type: ignore[return-value]
    raise DataError(f"{what} {path} has shape {list(shape)}; expected a volume [X, Y, Z] or [X, Y, Z, C]")


def _data(img: Any, path: Path, what: str, dtype: Any = None) -> np.ndarray:
    try:
        return img.get_fdata(dtype=dtype) if dtype is not None else np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - truncated gzip streams raise EOFError, zlib.error, OSError, ...
        raise DataError(f"cannot read the voxels of {what} {path} (truncated or damaged file): "
                        f"{type(e).__name__}: {e}") from None


def _geometry(paths: Sequence[Path], label: Path | None, in_chans: int | None,
              ) -> tuple[list[Any], Any, tuple[int, int, int], np.ndarray]:
    """Open every file of a case and check shapes, channel count and affines; returns the images, the label
    image (or None), the spatial shape and the affine."""
    images = [_open(p, "image") for p in paths]
    spatial, _ = volume_layout(images[0].shape, paths[0], "image")
    affine = np.asarray(images[0].affine, dtype=np.float64)
    channels = 0
    for img, p in zip(images, paths):
        s, c = volume_layout(img.shape, p, "image")
        if s != spatial:
            raise DataError(f"image {p} has spatial shape {list(s)} but {paths[0].name} has {list(spatial)}")
        if not np.allclose(img.affine, affine, atol=AFFINE_ATOL):
            raise DataError(f"image {p} has another affine than {paths[0].name} (one grid per case)")
        channels += c
    if in_chans is not None and channels != in_chans:
        where = paths[0] if len(paths) == 1 else f"{len(paths)} files from {paths[0]}"
        raise DataError(f"image {where} has {channels} channels but the dataset has {in_chans} modalities")
    lab = None
    if label is not None:
        lab = _open(label, "label")
        s, c = volume_layout(lab.shape, label, "label")
        if c != 1:
            raise DataError(f"label {label} has {c} channels (shape {list(lab.shape)}); a label is one volume")
        if s != spatial:
            raise DataError(f"label {label} has shape {list(s)} but its image {paths[0].name} has spatial shape "
                            f"{list(spatial)}")
        if not np.allclose(lab.affine, affine, atol=AFFINE_ATOL):
            raise DataError(f"label {label} and its image {paths[0].name} have different affines (they are not "
                            f"on the same grid):\n{np.round(lab.affine, 4)}\nvs\n{np.round(affine, 4)}")
    return images, lab, spatial, affine


def _image_voxels(images: Sequence[Any], paths: Sequence[Path]) -> np.ndarray:
    """Voxels ``[C, X, Y, Z]`` float32 of opened image files (checked by :func:`_geometry`), stacked."""
    arrays = []
    for img, p in zip(images, paths):
        a = _data(img, p, "image", np.float32)
        spatial, c = volume_layout(a.shape, p, "image")
        arrays.append(np.moveaxis(a.reshape(*spatial, c), -1, 0))  # [X, Y, Z, C] -> [C, X, Y, Z]
    image = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if not np.isfinite(image).all():
        raise DataError(f"image {paths[0]} holds NaN or infinite values")
    return np.ascontiguousarray(image)


def read_image(paths: Sequence[Path], in_chans: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image [C, X, Y, Z] float32, affine [4, 4] float64)`` of one or several files (stacked as channels).

    Raises:
        DataError: naming the file, for a missing or damaged file, another layout than a volume, files of one
            case on different grids, or a channel count other than ``in_chans``.
    """
    images, _, _, affine = _geometry(list(paths), None, in_chans)
    return _image_voxels(images, list(paths)), affine


def read_channels(paths: Sequence[Path]) -> int:
    """The channel count of an image stored as one or several files, from their headers (no voxels read).

    Raises:
        DataError: naming the file, for a missing or damaged file or another layout than a volume.
    """
    return sum(volume_layout(_open(p, "image").shape, p, "image")[1] for p in paths)


def read_label(path: Path, label_values: Sequence[int], ignore_index: int | None = None,
               img: Any = None) -> np.ndarray:
    """Label ``[X, Y, Z]`` of ``path`` as class indices: stored value ``label_values[k]`` becomes ``k``;
    ``ignore_index`` stays as it is.

    Raises:
        DataError: for values that are not whole numbers or not in ``label_values`` (naming the file).
    """
    img = img if img is not None else _open(path, "label")
    raw = _data(img, path, "label")
    raw = raw.reshape(volume_layout(raw.shape, path, "label")[0])
    if not np.issubdtype(raw.dtype, np.integer):
        if not np.isfinite(raw).all() or not np.array_equal(raw, np.round(raw)):
            raise DataError(f"label {path} holds values that are not whole numbers ({raw.dtype})")
        raw = raw.astype(np.int64)
    values = list(label_values)
    allowed = values + ([ignore_index] if ignore_index is not None else [])
    lo, hi = int(raw.min()), int(raw.max())
    identity = values == list(range(len(values)))
    if not (identity and lo >= 0 and hi < len(values)):  # the fast path reads min/max only
        found = np.unique(raw)
        unknown = sorted(set(found.tolist()) - set(allowed))
        if unknown:
            raise DataError(f"label {path} holds values {unknown[:10]} outside the class map (label values "
                            f"{values}{f', ignore_index {ignore_index}' if ignore_index is not None else ''})")
    if identity:
        return raw
    lut = {v: k for k, v in enumerate(values)}
    if ignore_index is not None:
        lut[ignore_index] = ignore_index
    out = np.empty(raw.shape, dtype=np.int64)
    for v, k in lut.items():
        out[raw == v] = k
    return out


class CaseLoader(Transform):
    """A MONAI transform reading a :class:`Case` into a dict of ``MetaTensor``s and passing it to ``prepare``.

    Output of the read: ``{"image": MetaTensor [C, X, Y, Z] float32, "label": MetaTensor [1, X, Y, Z] uint8/int32
    (when the case has one), "meta": {"id", "path", "label_path", "orig_size", "original_affine"}}``, both
    tensors carrying the file's affine. ``prepare`` (e.g. :meth:`VolumeTransform.prepare
    <attnseg.datasets.volume_transforms.VolumeTransform.prepare>`) turns it into an attnseg sample.

    Any failure, in reading or in ``prepare``, is a :class:`DataError` naming the case and its image file.
    """

    def __init__(self, prepare: Callable[[dict[str, Any]], dict[str, Any]], label_values: Sequence[int],
                 in_chans: int | None = None, ignore_index: int | None = None) -> None:
        self.prepare = prepare
        self.label_values = list(label_values)
        self.in_chans = in_chans
        self.ignore_index = ignore_index

    def inspect(self, case: Case) -> None:
        """Check the headers of ``case`` (files exist and open, shapes, channels, affines); no voxels are read."""
        try:
            _geometry(case.images, case.label, self.in_chans)
        except DataError as e:
            raise DataError(f"case '{case.id}': {e}") from None

    def read(self, case: Case) -> dict[str, Any]:
        """The case as a MONAI dict of ``MetaTensor``s (before ``prepare``)."""
        try:
            images, lab_img, _, affine = _geometry(case.images, case.label, self.in_chans)
            image = _image_voxels(images, case.images)
            label = None
            if case.label is not None:
                label = read_label(case.label, self.label_values, self.ignore_index, img=lab_img)
        except DataError as e:
            raise DataError(f"case '{case.id}': {e}") from None
        meta = {"id": case.id, "path": str(case.images[0]), "label_path": str(case.label) if case.label else None,
                "orig_size": tuple(image.shape[1:]), "original_affine": affine}
        affine_t = torch.from_numpy(affine)
        out: dict[str, Any] = {"image": MetaTensor(torch.from_numpy(image), affine=affine_t.clone()), "meta": meta}
        if label is not None:
            small = label.astype(np.uint8) if label.min() >= 0 and label.max() <= 255 else label.astype(np.int32)
            out["label"] = MetaTensor(torch.from_numpy(small)[None], affine=affine_t.clone())  # [1, X, Y, Z]
        return out

    def __call__(self, case: Case) -> dict[str, Any]:
        data = self.read(case)
        try:
            return self.prepare(data)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - any MONAI failure is reported with the case it happened on
            raise DataError(f"case '{case.id}' ({case.images[0]}): preprocessing failed: {type(e).__name__}: "
                            f"{e}") from e
