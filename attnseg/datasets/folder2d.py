"""Your own 2D data: image/mask folders for segmentation (``folder2d``), class folders for classification
(``imagefolder``).

``folder2d`` reads ``<root>/<images_dir>/<stem>.<ext>`` and its mask ``<root>/<masks_dir>/<stem><mask_suffix>.<ext>``
(the mask may have another extension than its image). Formats: PNG, JPEG, TIFF, BMP; 8/16-bit, grey, RGB
or RGBA (see :mod:`attnseg.datasets.io`). Images become ``in_chans`` channels in 0..1; masks become class
indices through ``mask_values`` (stored pixel value of each class: ``[0, 255]`` maps 0 to class 0 and 255
to class 1) or, without it, are class indices already. Pixels equal to ``ignore_index`` stay as they are.

Splits (``split`` is 'train', 'val' or 'test'):

- ``split_file: path/to/split.json``: a JSON object ``{"train": [stems], "val": [stems], "test": [stems]}``
  (a missing key is an empty split; entries are stems or image file names; splits must not share stems).
- ``split_file: path/to/{split}.txt``: a path holding the literal ``{split}``, replaced by the requested
  split, naming a text file with one stem per line (blank lines and lines starting with ``#`` skipped).
- no split file: a seeded shuffle of the sorted stems, cut into ``val_ratio`` (first), ``test_ratio`` (next)
  and train (the rest); a ratio above 0 gets at least one image while train keeps one.

A relative ``split_file`` is looked up under ``root`` first, then the working directory.

Every problem is a :class:`~attnseg.errors.DataError` naming the file and the values involved. Built eagerly
(the dataset constructor): missing folders, no images, duplicate stems, an image without a mask, split file
problems, an empty split. Per item (``dataset[i]``), and for all items at once by ``check()``: unreadable or
truncated files, image/mask size mismatch, channel counts that cannot become ``in_chans``, mask values outside
the class map.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attnseg.datasets.io import IMAGE_SUFFIXES, convert_channels, list_images, read_image, read_mask
from attnseg.errors import ConfigError, DataError
from attnseg.registry import DATASETS

__all__ = ["Folder2D", "ImageFolder", "ratio_split"]

SPLITS = ("train", "val", "test")


# -- helpers shared by both datasets ------------------------------------------------------------------


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"{name}: split must be one of {list(SPLITS)}, got {split!r}")


def _check_ratios(name: str, val_ratio: float, test_ratio: float) -> None:
    if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
        raise ConfigError(f"{name}: val_ratio and test_ratio must be >= 0 and sum to < 1, got {val_ratio=}, "
                          f"{test_ratio=}")


def _require_dir(name: str, folder: Path, what: str) -> None:
    if folder.is_dir():
        return
    parent = folder.parent
    hint = ""
    if parent.is_dir():
        subdirs = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        hint = f"; {parent} holds the folders {subdirs}" if subdirs else f"; {parent} holds no folders"
    raise DataError(f"{name}: {what} not found: {folder}{hint}")


def _images_by_stem(name: str, folder: Path, suffix: str = "") -> dict[str, Path]:
    """``{stem: path}`` of the images in ``folder`` (``suffix`` removed from stems); duplicate stems refused."""
    out: dict[str, Path] = {}
    for p in list_images(folder):
        stem = p.stem[: len(p.stem) - len(suffix)] if suffix and p.stem.endswith(suffix) else p.stem
        if stem in out:
            raise DataError(f"{name}: two files in {folder} have the stem '{stem}': {out[stem].name} and {p.name} "
                            f"(files are matched by stem; keep one)")
        out[stem] = p
    return out


def _no_images_error(name: str, folder: Path) -> DataError:
    others = sorted(p.name for p in folder.iterdir() if p.is_file())
    extra = f"; it holds {len(others)} other files, e.g. {others[:3]}" if others else "; it is empty"
    return DataError(f"{name}: no images found in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}, any case){extra}")


def _ratio_counts(n: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """``(n_val, n_test)`` of ``n`` items: rounded, at least 1 for a ratio > 0 while train keeps one."""
    n_val, n_test = round(val_ratio * n), round(test_ratio * n)
    if val_ratio > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    if test_ratio > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    return n_val, n_test


def ratio_split(n: int, split: str, val_ratio: float, test_ratio: float, seed: int) -> list[int]:
    """Sorted indices of ``split`` among ``n`` items: a seeded permutation cut into val, test, then train."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val, n_test = _ratio_counts(n, val_ratio, test_ratio)
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return sorted(parts[split])


def _resolve_split_path(name: str, root: Path, split_file: str, split: str) -> Path:
    text = split_file.replace("{split}", split)
    path = Path(text).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [root / path, Path.cwd() / path]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"{name}: split file not found: {text} (looked in {', '.join(str(c.parent) for c in candidates)})")


def _as_stem(entry: str, known: set[str]) -> str:
    """A split-file entry as a stem: ``'a'`` stays, ``'a.png'`` becomes ``'a'`` when ``'a'`` is an image stem."""
    if entry in known:
        return entry
    stem = Path(entry).stem
    return stem if Path(entry).suffix.lower() in IMAGE_SUFFIXES and stem in known else entry


def _read_split_file(name: str, root: Path, split_file: str, split: str, known: Iterable[str]) -> list[str]:
    """The stems listed for ``split`` by ``split_file`` (see the module docstring for the formats)."""
    per_split: dict[str, list[str]] = {}
    if "{split}" in split_file:
        for s in SPLITS:  # read every split's file that exists, to refuse stems shared between splits
            try:
                path = _resolve_split_path(name, root, split_file, s)
            except DataError:
                if s == split:
                    raise
                continue
            lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
            per_split[s] = [line for line in lines if line and not line.startswith("#")]
        source = split_file
    else:
        path = _resolve_split_path(name, root, split_file, split)
        source = str(path)
        if path.suffix.lower() != ".json":
            raise DataError(f"{name}: split file {path}: use a JSON file {{'train': [...], 'val': [...], "
                            f"'test': [...]}} or a text path with a '{{split}}' placeholder (splits/{{split}}.txt)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{name}: split file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or set(data) - set(SPLITS) or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in data.values()):
            raise DataError(f"{name}: split file {path} must be a JSON object {{'train': [stems], 'val': [stems], "
                            f"'test': [stems]}} (keys among {list(SPLITS)}, values lists of strings); got keys "
                            f"{list(data) if isinstance(data, dict) else type(data).__name__}")
        per_split = data
    known = set(known)
    by_name = {}
    for s, entries in per_split.items():
        stems = [_as_stem(e, known) for e in entries]
        unknown = [e for e in stems if e not in known]
        if unknown:
            raise DataError(f"{name}: split file {source}: '{s}' lists {len(unknown)} stems without an image, e.g. "
                            f"{unknown[:5]}")
        dupes = sorted({x for x in stems if stems.count(x) > 1})
        if dupes:
            raise DataError(f"{name}: split file {source}: '{s}' lists some stems twice, e.g. {dupes[:5]}")
        by_name[s] = stems
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            shared = sorted(set(by_name.get(a, ())) & set(by_name.get(b, ())))
            if shared:
                raise DataError(f"{name}: split file {source}: '{a}' and '{b}' share {len(shared)} stems, e.g. "
                                f"{shared[:5]}")
    return by_name.get(split, [])


def _check_items(name: str, n: int, load: Callable[[int], Any], max_errors: int) -> None:
    problems: list[str] = []
    failed = 0
    for i in range(n):
        try:
            load(i)
        except DataError as e:
            failed += 1
            if len(problems) < max_errors:
                problems.append(str(e))
    if failed:
        more = f"\n  ... and {failed - len(problems)} more" if failed > len(problems) else ""
        raise DataError(f"{name}: {failed} of {n} items cannot be used:\n  " + "\n  ".join(problems) + more)


def _to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # [H, W, C] -> [C, H, W]


# -- segmentation -------------------------------------------------------------------------------------


class Folder2D(Dataset):
    """Segmentation pairs from an image folder and a mask folder; see the module docstring.

    Attributes: ``pairs`` (``[(image_path, mask_path)]`` of this split, in stem order), ``num_classes``,
    ``class_names``, ``in_chans``, ``spatial_dims`` (2), ``task`` ('segmentation'), ``ignore_index``.
    """

    task = "segmentation"
    spatial_dims = 2

    def __init__(
        self,
        split: str,
        transform: Callable[[dict], dict] | None,
        root: str,
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
        mask_suffix: str = "",
    ) -> None:
        name = "folder2d"
        _check_split(name, split)
        _check_ratios(name, val_ratio, test_ratio)
        if in_chans < 1:
            raise ConfigError(f"{name}: in_chans must be >= 1, got {in_chans}")
        counts = {k: v for k, v in (("num_classes", num_classes), ("len(classes)", len(classes or []) or None),
                                    ("len(mask_values)", len(mask_values or []) or None)) if v is not None}
        if not counts:
            raise ConfigError(f"{name}: give num_classes, classes or mask_values (the number of classes is unknown)")
        if len(set(counts.values())) > 1:
            raise ConfigError(f"{name}: the class counts disagree: {counts}")
        self.num_classes = next(iter(counts.values()))
        if self.num_classes < 1:
            raise ConfigError(f"{name}: num_classes must be >= 1, got {self.num_classes}")
        if mask_values is not None:
            if len(set(mask_values)) != len(mask_values) or min(mask_values) < 0:
                raise ConfigError(f"{name}: mask_values must be distinct values >= 0, got {mask_values}")
            if ignore_index is not None and ignore_index in mask_values:
                raise ConfigError(f"{name}: ignore_index {ignore_index} is also in mask_values {mask_values}")
        elif ignore_index is not None and 0 <= ignore_index < self.num_classes:
            raise ConfigError(f"{name}: ignore_index {ignore_index} is a class index (0..{self.num_classes - 1})")

        self.split = split
        self.root = Path(root).expanduser()
        self.transform = transform
        self.in_chans = in_chans
        self.ignore_index = ignore_index
        self.mask_values = list(mask_values) if mask_values is not None else None
        self.class_names = list(classes) if classes else [f"class{i}" for i in range(self.num_classes)]

        _require_dir(name, self.root, "root folder")
        images_path, masks_path = self.root / images_dir, self.root / masks_dir
        _require_dir(name, images_path, f"images folder (images_dir={images_dir!r})")
        _require_dir(name, masks_path, f"masks folder (masks_dir={masks_dir!r})")
        images = _images_by_stem(name, images_path)
        if not images:
            raise _no_images_error(name, images_path)
        masks = _images_by_stem(name, masks_path, mask_suffix)
        missing = [p.name for s, p in images.items() if s not in masks]
        if missing:
            raise DataError(f"{name}: {len(missing)} of {len(images)} images have no mask in {masks_path}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (the mask of "
                            f"<stem>.<ext> is <stem>{mask_suffix}.<png|jpg|tif|bmp>)")

        stems = sorted(images)
        if split_file is not None:
            chosen = _read_split_file(name, self.root, split_file, split, stems)
            if not chosen:
                raise DataError(f"{name}: the '{split}' split is empty: split file {split_file} lists no stems for "
                                f"it ({len(stems)} images in {images_path})")
        else:
            chosen = [stems[i] for i in ratio_split(len(stems), split, val_ratio, test_ratio, seed)]
            if not chosen:
                raise DataError(f"{name}: the '{split}' split is empty: 0 of {len(stems)} images in {images_path} "
                                f"with {val_ratio=}, {test_ratio=} (set a ratio above 0 or add images)")
        self.pairs: list[tuple[Path, Path]] = [(images[s], masks[s]) for s in chosen]

        allowed = set(self.mask_values) if self.mask_values is not None else set(range(self.num_classes))
        if ignore_index is not None:
            allowed.add(ignore_index)
        self._allowed = np.array(sorted(allowed), dtype=np.int64)
        self._lut: np.ndarray | None = None
        if self.mask_values is not None:  # stored value -> class index; ignore_index maps to itself
            lut = np.zeros(max(allowed) + 1, dtype=np.int64)
            lut[self.mask_values] = np.arange(len(self.mask_values))
            if ignore_index is not None and ignore_index >= 0:
                lut[ignore_index] = ignore_index
            self._lut = lut

    def __len__(self) -> int:
        return len(self.pairs)

    def _labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        values = np.unique(raw)
        outside = values[~np.isin(values, self._allowed)]
        if outside.size:
            hint = ""
            if self.mask_values is None and values.size == self.num_classes:
                hint = f"; if these are the stored values of the classes, set mask_values: {values.tolist()}"
            raise DataError(f"mask {path} has values {outside[:10].tolist()}{' ...' if outside.size > 10 else ''} "
                            f"outside the class map (allowed: {self._allowed.tolist()}){hint}")
        if self._lut is None:
            return raw
        if self.ignore_index is not None and self.ignore_index < 0:
            return np.where(raw == self.ignore_index, raw, self._lut[np.maximum(raw, 0)])
        return self._lut[raw]

    def load(self, index: int) -> dict[str, Any]:
        """Sample ``index`` before the transform: ``{"image": [C, H, W] float32, "mask": [H, W] int64, "meta"}``."""
        img_path, mask_path = self.pairs[index]
        image = convert_channels(read_image(img_path), self.in_chans, img_path)
        raw = read_mask(mask_path)
        if raw.shape != image.shape[:2]:
            raise DataError(f"image {img_path} is {image.shape[0]}x{image.shape[1]} but its mask {mask_path} is "
                            f"{raw.shape[0]}x{raw.shape[1]} (H x W)")
        return {
            "image": _to_chw(image),
            "mask": torch.from_numpy(self._labels(raw, mask_path)),
            "meta": {"id": img_path.stem, "path": str(img_path), "orig_size": tuple(raw.shape)},
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample

    def check(self, max_errors: int = 20) -> None:
        """Read every pair of this split once; one :class:`DataError` lists every bad item (up to ``max_errors``)."""
        _check_items(f"folder2d ({self.root}, split '{self.split}')", len(self), self.load, max_errors)

    def __repr__(self) -> str:
        return (f"folder2d(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, in_chans={self.in_chans})")


DATASETS.register("folder2d", cls=Folder2D)(Folder2D)


# -- classification -----------------------------------------------------------------------------------


class ImageFolder(Dataset):
    """Classification images in class folders; samples ``{"image": [C, H, W], "label": int64, "meta"}``.

    Attributes: ``items`` (``[(path, label)]`` of this split), ``num_classes``, ``class_names``, ``in_chans``,
    ``spatial_dims`` (2), ``task`` ('classification'), ``ignore_index`` (None).
    """

    task = "classification"
    spatial_dims = 2
    ignore_index = None

    def __init__(
        self,
        split: str,
        transform: Callable[[dict], dict] | None,
        root: str,
        split_dirs: bool = True,
        classes: list[str] | None = None,
        val_ratio: float = 0.2,
        test_ratio: float = 0.0,
        seed: int = 0,
        in_chans: int = 3,
        image_size: tuple[int, int] | None = (224, 224),
    ) -> None:
        name = "imagefolder"
        _check_split(name, split)
        _check_ratios(name, val_ratio, test_ratio)
        if in_chans < 1:
            raise ConfigError(f"{name}: in_chans must be >= 1, got {in_chans}")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ConfigError(f"{name}: image_size must be two sizes >= 1 or null, got {list(image_size)}")
        self.root = Path(root).expanduser()
        _require_dir(name, self.root, "root folder")
        if split_dirs:
            base = self.root / split
            _require_dir(name, base, f"'{split}' folder (split_dirs=True reads <root>/<split>/<class>/<image>)")
            # One class list for every split: the union of the class folders of all split folders.
            found = sorted({p.name for s in SPLITS if (self.root / s).is_dir()
                            for p in (self.root / s).iterdir() if p.is_dir() and not p.name.startswith(".")})
        else:
            base = self.root
            found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is not None:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise DataError(f"{name}: class folders {extra} under {self.root} are not in classes {classes}")
            self.class_names = list(classes)
        else:
            self.class_names = found
        if not self.class_names:
            raise DataError(f"{name}: no class folders in {base} (expected {base}/<class>/<image>)")
        per_class = {c: list_images(base / c) if (base / c).is_dir() else [] for c in self.class_names}
        total = sum(len(v) for v in per_class.values())
        if total == 0:
            raise DataError(f"{name}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {base}")
        if split_dirs:
            items = [(p, i) for i, c in enumerate(self.class_names) for p in per_class[c]]
        else:  # stratified: every class is cut by the ratios on its own
            items = [(files[j], i) for i, c in enumerate(self.class_names) for files in [per_class[c]]
                     for j in ratio_split(len(files), split, val_ratio, test_ratio, seed + i)]
        if not items:
            raise DataError(f"{name}: the '{split}' split is empty: 0 of {total} images under {base} with "
                            f"{val_ratio=}, {test_ratio=} (per class)")
        self.items: list[tuple[Path, int]] = items
        self.split = split
        self.transform = transform
        self.num_classes = len(self.class_names)
        self.in_chans = in_chans
        self.image_size = tuple(image_size) if image_size is not None else None

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict[str, Any]:
        """Sample ``index`` before the transform (resized to ``image_size`` when it is set)."""
        path, label = self.items[index]
        array = convert_channels(read_image(path), self.in_chans, path)
        image = _to_chw(array)
        if self.image_size is not None and tuple(image.shape[1:]) != self.image_size:
            image = torch.nn.functional.interpolate(image[None], size=self.image_size, mode="bilinear",
                                                    antialias=True, align_corners=False)[0].clamp(0, 1)
        meta = {"id": f"{self.class_names[label]}/{path.stem}", "path": str(path), "orig_size": tuple(array.shape[:2])}
        return {"image": image, "label": torch.tensor(label, dtype=torch.int64), "meta": meta}

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample

    def check(self, max_errors: int = 20) -> None:
        """Read every image of this split once; one :class:`DataError` lists every bad file."""
        _check_items(f"imagefolder ({self.root}, split '{self.split}')", len(self), self.load, max_errors)

    def __repr__(self) -> str:
        return (f"imagefolder(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.class_names})")


DATASETS.register("imagefolder", cls=ImageFolder)(ImageFolder)
