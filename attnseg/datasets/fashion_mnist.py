"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv 1708.07747) from its IDX files: ``fashion_mnist``.

70,000 grey 28x28 images of 10 clothing classes (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
Sneaker, Bag, Ankle boot), 6,000 training and 1,000 test images per class. Debian's ``dataset-fashion-mnist``
package installs the four files under ``/usr/share/datasets/fashion-mnist`` (the default ``root``)::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz  t10k-images-idx3-ubyte.gz  t10k-labels-idx1-ubyte.gz

(the same names without ``.gz`` are read too). Any folder holding them works as ``root``.

Splits: ``test`` is the 10,000 t10k images. ``train`` and ``val`` share the 60,000 training images: ``val`` is a
seeded ``val_ratio`` of them, drawn per class (stratified: every class gives the same share, 600 images each at the
default 0.1), ``train`` the rest; the two never overlap and depend only on ``seed`` and ``val_ratio``. ``limit``
keeps at most that many items of the chosen split, a seeded subset (the same ``seed``) in file order, for quick runs.

Samples: ``{"image": [in_chans, H, W] float32 in 0..1, "label": int64, "meta": {"id", "index", "source",
"orig_size"}}``; ``in_chans: 3`` repeats the grey channel (for ImageNet-pretrained backbones) and ``image_size``
resizes (bilinear, antialiased) after that. ``id`` is ``"<train|t10k>/<index in that file>"``.

The IDX format (LeCun's MNIST page): a big-endian header ``0x00 0x00 <type> <ndim>`` (type 0x08: unsigned bytes),
``ndim`` big-endian int32 sizes, then the data row-major. Images are ``[count, rows, cols]`` (magic 0x00000803), labels
``[count]`` (magic 0x00000801). Each file is decoded once per process and kept in memory (the training images are 47
MB); a wrong magic number, a truncated or corrupt file, labels outside 0..9 or image and label files of different
counts are a :class:`~attnseg.errors.DataError` naming the file.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attnseg.datasets.folder2d import _check_split, ratio_split
from attnseg.errors import ConfigError, DataError
from attnseg.registry import DATASETS

__all__ = ["FashionMNIST", "read_idx", "CLASSES", "DEFAULT_ROOT"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_UBYTE = 0x08


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed when its name ends in ``.gz``) as a uint8 array of ``ndim``
    axes, e.g. ``[count, rows, cols]`` for images, ``[count]`` for labels.

    Raises:
        DataError: the file cannot be read or decompressed, its magic number is not ``0x000008<ndim>``, or its data
            is shorter or longer than the header's sizes say (each message names the file and the numbers).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
        raise DataError(f"cannot read IDX file {path}: {type(e).__name__}: {e or 'truncated gzip stream'}") from None
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte magic number")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise DataError(f"IDX file {path}: magic number 0x{magic:08X}, expected 0x{_UBYTE << 8 | ndim:08X} (unsigned "
                        f"bytes, {ndim} dimension{'s' if ndim > 1 else ''}); is it the right file?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DataError(f"IDX file {path} is {what}: the header gives sizes {list(dims)} ({expected} bytes of data), "
                        f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_count(path: Path) -> int | None:
    """The first size (item count) in an IDX file's header, or None when the header cannot be read (the full read
    then reports why)."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(8)
    except (OSError, EOFError, zlib.error):
        return None
    return int.from_bytes(head[4:8], "big") if len(head) == 8 else None


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, ndim: int, mtime_ns: int, size: int) -> np.ndarray:
    """:func:`read_idx` once per (file, modification time, size) in this process; the array is read-only."""
    array = read_idx(path, ndim)
    array.flags.writeable = False
    return array


def _load(path: Path, ndim: int) -> np.ndarray:
    stat = path.stat()
    return _read_cached(str(path), ndim, stat.st_mtime_ns, stat.st_size)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"fashion_mnist: {root} has no {stem}.gz (nor {stem}); the folder needs the four Fashion-MNIST "
                    f"IDX files ({', '.join(f'{s}.gz' for pair in _FILES.values() for s in pair)})")


class FashionMNIST(Dataset):
    """Fashion-MNIST classification from its IDX files (see the module docstring for splits and formats).

    Args:
        split: 'train', 'val' (both from the 60,000 training images) or 'test' (the 10,000 t10k images).
        transform: sample-dict transform (augmentation, normalisation) or None.
        root: folder of the four IDX files (default: where Debian's ``dataset-fashion-mnist`` installs them).
        val_ratio: share of each class of the training files held out as 'val' (0 <= val_ratio < 1).
        seed: seed of the val draw and of ``limit``'s subset.
        in_chans: 1 (grey) or 3 (grey repeated, for RGB-pretrained backbones).
        image_size: ``[H, W]`` to resize to (bilinear, antialiased), or None to keep 28x28.
        limit: at most this many items of the split (a seeded subset, for quick runs), or None for all.

    Attributes: ``indices`` (row of each item in its IDX file), ``labels`` (``[len]`` int64 numpy), ``num_classes``
    (10), ``class_names``, ``in_chans``, ``spatial_dims`` (2), ``task`` ('classification'), ``ignore_index`` (None).

    Example::

        >>> ds = FashionMNIST("test", None)  # doctest: +SKIP
        >>> ds[0]["image"].shape, ds.class_names[int(ds[0]["label"])]  # doctest: +SKIP
        (torch.Size([1, 28, 28]), 'Ankle boot')
    """

    task = "classification"
    spatial_dims = 2
    ignore_index = None

    def __init__(
        self,
        split: str,
        transform: Callable[[dict], dict] | None,
        root: str = DEFAULT_ROOT,
        val_ratio: float = 0.1,
        seed: int = 0,
        in_chans: int = 1,
        image_size: tuple[int, int] | None = None,
        limit: int | None = None,
    ) -> None:
        name = "fashion_mnist"
        _check_split(name, split)
        if not 0 <= val_ratio < 1:
            raise ConfigError(f"{name}: val_ratio must be in [0, 1), got {val_ratio}")
        if in_chans not in (1, 3):
            raise ConfigError(f"{name}: in_chans must be 1 (grey) or 3 (grey repeated), got {in_chans}")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ConfigError(f"{name}: image_size must be two sizes >= 1 or null, got {list(image_size)}")
        if limit is not None and limit < 1:
            raise ConfigError(f"{name}: limit must be >= 1 or null, got {limit}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{name}: root folder {self.root} not found; install Debian's dataset-fashion-mnist "
                            f"(apt-get install dataset-fashion-mnist, files in {DEFAULT_ROOT}) or set root to a "
                            "folder holding the four Fashion-MNIST IDX files")
        self.source = "t10k" if split == "test" else "train"
        image_stem, label_stem = _FILES[self.source]
        self.images_path, self.labels_path = _find(self.root, image_stem), _find(self.root, label_stem)
        all_labels = _load(self.labels_path, 1)
        n_images = _idx_count(self.images_path)
        if n_images is not None and n_images != all_labels.size:
            raise DataError(f"{name}: {self.images_path} holds {n_images} images but {self.labels_path} holds "
                            f"{all_labels.size} labels")
        if all_labels.size and int(all_labels.max()) >= len(CLASSES):
            bad = np.unique(all_labels[all_labels >= len(CLASSES)])
            raise DataError(f"{name}: labels file {self.labels_path} holds values {bad[:10].tolist()} outside the "
                            f"class indices 0..{len(CLASSES) - 1}")

        if split == "test" or val_ratio == 0:
            indices = np.arange(all_labels.size) if split != "val" else np.zeros(0, dtype=np.int64)
        else:  # stratified: every class is cut by the ratio on its own, with its own seed
            parts = []
            for c in range(len(CLASSES)):
                members = np.flatnonzero(all_labels == c)
                parts.append(members[ratio_split(members.size, split, val_ratio, 0.0, seed + c)])
            indices = np.sort(np.concatenate(parts))
        if limit is not None and limit < indices.size:
            chosen = np.random.default_rng(seed).choice(indices.size, size=limit, replace=False)
            indices = indices[np.sort(chosen)]
        if indices.size == 0:
            raise DataError(f"{name}: the '{split}' split is empty ({all_labels.size} items in {self.labels_path}, "
                            f"{val_ratio=})")
        self.split = split
        self.transform = transform
        self.indices = indices.astype(np.int64)
        self.labels = all_labels[self.indices].astype(np.int64)
        self.num_classes = len(CLASSES)
        self.class_names = list(CLASSES)
        self.in_chans = in_chans
        self.image_size = tuple(image_size) if image_size is not None else None
        self._images: np.ndarray | None = None  # decoded on first use (once per process)

    def images(self) -> np.ndarray:
        """All images of this split's IDX file, ``[count, H, W]`` uint8 (read-only, decoded once per process).

        Raises:
            DataError: a bad images file, or one whose count differs from its labels file's.
        """
        if self._images is None:
            images = _load(self.images_path, 3)
            n_labels = _load(self.labels_path, 1).shape[0]
            if images.shape[0] != n_labels:
                raise DataError(f"fashion_mnist: {self.images_path} holds {images.shape[0]} images but "
                                f"{self.labels_path} holds {n_labels} labels")
            self._images = images
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the decoded images (data-loader workers take them from the per-process cache: forked
        workers share the parent's copy, spawned ones decode the file once)."""
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return int(self.indices.size)

    def load(self, index: int) -> dict[str, Any]:
        """Sample ``index`` before the transform: ``{"image": [in_chans, H, W] float32 0..1, "label": int64, "meta"}``."""
        row = int(self.indices[index])
        pixels = self.images()[row]  # [H, W] uint8
        image = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]  # [1, H, W]
        if self.in_chans == 3:
            image = image.expand(3, -1, -1).contiguous()  # [3, H, W]
        if self.image_size is not None and tuple(image.shape[1:]) != self.image_size:
            image = torch.nn.functional.interpolate(image[None], size=self.image_size, mode="bilinear",
                                                    antialias=True, align_corners=False)[0].clamp(0, 1)
        meta = {"id": f"{self.source}/{row}", "index": row, "source": self.source, "orig_size": tuple(pixels.shape)}
        return {"image": image, "label": torch.tensor(int(self.labels[index]), dtype=torch.int64), "meta": meta}

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample

    def check(self, max_errors: int = 20) -> None:
        """Decode the images file once (a bad file raises :class:`DataError` here, before training starts, and the
        decoded array is then shared with data-loader workers started after this)."""
        self.images()

    def __repr__(self) -> str:
        return (f"fashion_mnist(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"in_chans={self.in_chans}, image_size={self.image_size})")


DATASETS.register("fashion_mnist", cls=FashionMNIST)(FashionMNIST)
