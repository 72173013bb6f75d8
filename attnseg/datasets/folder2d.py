"""Your own 2D data: image/mask folders for segmentation, class folders for classification.

``folder2d``: ``<root>/<images_dir>/<stem>.<ext>`` with ``<root>/<masks_dir>/<stem>.<any ext>``
(PNG, JPG, TIFF, BMP; 8/16-bit; grey or RGB). The split comes from a JSON split file
``{"train": [stems], "val": [stems], "test": [stems]}`` or, without one, from a seeded shuffle cut by
``val_ratio``/``test_ratio``. ``mask_values`` maps stored pixel values to class indices (``[0, 255]``: 0
is class 0, 255 is class 1); without it, stored values are the class indices.

``imagefolder``: ``<root>/<split>/<class>/*.png`` (``split_dirs=True``) or ``<root>/<class>/*`` with a
seeded ratio split.

Every problem is a :class:`~attnseg.errors.DataError` naming the file: a missing folder, no images,
an image without a mask, an unreadable file, image/mask size mismatch, mask values outside the class map,
an empty split. Pairing and splits are checked when the dataset is built; ``check()`` also reads every file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attnseg.datasets.io import IMAGE_SUFFIXES, convert_channels, read_image, read_mask
from attnseg.errors import DataError
from attnseg.registry import DATASETS

__all__ = ["Folder2D", "ImageFolder", "folder2d", "imagefolder"]


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _ratio_split(items: list[Any], split: str, val_ratio: float, test_ratio: float, seed: int) -> list[Any]:
    if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
        raise DataError(f"val_ratio ({val_ratio}) and test_ratio ({test_ratio}) must be >= 0 and sum to < 1")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val, n_test = round(val_ratio * len(items)), round(test_ratio * len(items))
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return [items[i] for i in sorted(parts[split])]


class Folder2D(Dataset):
    """Segmentation pairs from image and mask folders (see the module docstring)."""

    task = "segmentation"
    spatial_dims = 2

    def __init__(self, split: str, transform: Callable[[dict], dict] | None, root: str, images_dir: str,
                 masks_dir: str, split_file: str | None, val_ratio: float, test_ratio: float, seed: int,
                 classes: list[str] | None, mask_values: list[int] | None, num_classes: int | None,
                 in_chans: int, ignore_index: int | None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.in_chans = in_chans
        self.ignore_index = ignore_index
        self.mask_values = list(mask_values) if mask_values is not None else None
        n = len(self.mask_values) if self.mask_values else (len(classes) if classes else num_classes)
        if n is None:
            raise DataError(f"folder2d ({self.root}): give num_classes, classes or mask_values")
        self.num_classes = int(n)
        self.class_names = list(classes) if classes else [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise DataError(f"folder2d: {len(self.class_names)} class names for {self.num_classes} classes")

        images = _images_in(self.root / images_dir)
        if not images:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {self.root / images_dir}")
        masks = {p.stem: p for p in _images_in(self.root / masks_dir)}
        pairs = []
        for img in images:
            if img.stem not in masks:
                raise DataError(f"image {img} has no mask in {self.root / masks_dir} (expected {img.stem}.<ext>)")
            pairs.append((img, masks[img.stem]))
        if split_file is not None:
            path = Path(split_file) if Path(split_file).is_absolute() else self.root / split_file
            try:
                stems = json.loads(path.read_text())[split]
            except FileNotFoundError:
                raise DataError(f"split file not found: {path}") from None
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"split file {path} must be JSON {{'train': [...], 'val': [...], 'test': [...]}} "
                                f"with a '{split}' list ({e})") from None
            by_stem = {img.stem: (img, m) for img, m in pairs}
            unknown = [s for s in stems if s not in by_stem]
            if unknown:
                raise DataError(f"split file {path}: '{split}' lists stems without image files: {unknown[:10]}")
            self.pairs = [by_stem[s] for s in stems]
        else:
            self.pairs = _ratio_split(pairs, split, val_ratio, test_ratio, seed)
        if not self.pairs:
            raise DataError(f"the '{split}' split of {self.root} is empty ({len(pairs)} pairs in all; "
                            f"val_ratio={val_ratio}, test_ratio={test_ratio}, split_file={split_file})")
        if self.mask_values is not None:
            lut = np.full(max(self.mask_values) + 1, -1, dtype=np.int64)
            lut[self.mask_values] = np.arange(len(self.mask_values))
            self._lut = lut
        else:
            self._lut = None

    def __len__(self) -> int:
        return len(self.pairs)

    def _labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        allowed = set(self.mask_values) if self.mask_values is not None else set(range(self.num_classes))
        if self.ignore_index is not None:
            allowed.add(self.ignore_index)
        values = np.unique(raw)
        outside = [int(v) for v in values if int(v) not in allowed]
        if outside:
            raise DataError(f"mask {path} has values {outside[:10]} outside the class map (allowed: {sorted(allowed)})")
        if self._lut is None:
            return raw
        ignore = raw == self.ignore_index if self.ignore_index is not None else None
        labels = self._lut[np.clip(raw, 0, len(self._lut) - 1)]
        if ignore is not None:
            labels[ignore] = self.ignore_index
        return labels

    def load(self, index: int) -> dict[str, Any]:
        img_path, mask_path = self.pairs[index]
        image = convert_channels(read_image(img_path), self.in_chans, img_path)
        raw = read_mask(mask_path)
        if raw.shape != image.shape[:2]:
            raise DataError(f"image {img_path} is {image.shape[0]}x{image.shape[1]} but its mask {mask_path} is "
                            f"{raw.shape[0]}x{raw.shape[1]} (H x W)")
        mask = self._labels(raw, mask_path)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(mask),
            "meta": {"id": img_path.stem, "path": str(img_path), "orig_size": tuple(raw.shape)},
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample

    def check(self) -> None:
        """Read every pair once; raises the first :class:`DataError` (which names the file)."""
        for i in range(len(self)):
            self.load(i)


@DATASETS.register()
def folder2d(
    split: str,
    transform: Callable[[dict], dict] | None = None,
    root: str = "data",
    images_dir: str = "images",
    masks_dir: str = "masks",
    split_file: str | None = None,
    val_ratio: float = 0.2,
    test_ratio: float = 0.0,
    seed: int = 0,
    classes: list[str] | None = None,
    mask_values: list[int] | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    ignore_index: int | None = None,
) -> Folder2D:
    """Image/mask folder pairs (see :mod:`attnseg.datasets.folder2d`)."""
    return Folder2D(split, transform, root, images_dir, masks_dir, split_file, val_ratio, test_ratio, seed,
                    classes, mask_values, num_classes, in_chans, ignore_index)


class ImageFolder(Dataset):
    """Classification images in class folders; samples ``{"image", "label", "meta"}``."""

    task = "classification"
    spatial_dims = 2
    ignore_index = None

    def __init__(self, split: str, transform: Callable[[dict], dict] | None, root: str, split_dirs: bool,
                 val_ratio: float, test_ratio: float, seed: int, in_chans: int, image_size: tuple[int, int] | None):
        base = Path(root) / split if split_dirs else Path(root)
        if not base.is_dir():
            raise DataError(f"folder not found: {base}")
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"no class folders in {base} (expected {base}/<class>/<image>)")
        items = [(p, i) for i, c in enumerate(classes) for p in _images_in(base / c)]
        if not items:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {base}")
        self.items = items if split_dirs else _ratio_split(items, split, val_ratio, test_ratio, seed)
        if not self.items:
            raise DataError(f"the '{split}' split of {root} is empty")
        self.transform = transform
        self.class_names = classes
        self.num_classes = len(classes)
        self.in_chans = in_chans
        self.image_size = tuple(image_size) if image_size else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.items[index]
        image = torch.from_numpy(np.ascontiguousarray(
            convert_channels(read_image(path), self.in_chans, path).transpose(2, 0, 1)))
        if self.image_size is not None and tuple(image.shape[1:]) != self.image_size:
            image = torch.nn.functional.interpolate(image[None], size=self.image_size, mode="bilinear",
                                                    antialias=True, align_corners=False)[0]
        sample = {"image": image, "label": torch.tensor(label), "meta": {"id": path.stem, "path": str(path)}}
        return self.transform(sample) if self.transform is not None else sample

    def check(self) -> None:
        for i in range(len(self)):
            self[i]


@DATASETS.register()
def imagefolder(
    split: str,
    transform: Callable[[dict], dict] | None = None,
    root: str = "data",
    split_dirs: bool = True,
    val_ratio: float = 0.2,
    test_ratio: float = 0.0,
    seed: int = 0,
    in_chans: int = 3,
    image_size: tuple[int, int] | None = (224, 224),
) -> ImageFolder:
    """Classification folders (see :mod:`attnseg.datasets.folder2d`); images resized to ``image_size``."""
    return ImageFolder(split, transform, root, split_dirs, val_ratio, test_ratio, seed, in_chans, image_size)
