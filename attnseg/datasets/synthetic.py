"""Synthetic segmentation data: textured shapes on a noisy, unevenly lit background, in 2D and 3D.

The embedded default of attnseg (no files needed). Each sample is generated on the fly from
``(seed, split, index)`` alone: it is deterministic, the three splits draw from disjoint seed streams, and
nothing is held in memory.

Foreground class ``k`` (1..7) has its own shape and its own texture:

====  ==================  ===========================================
k     shape (2D / 3D)     texture (in the H-W plane, period in pixels)
====  ==================  ===========================================
1     disc / ball         horizontal stripes, period 4
2     rectangle / box     vertical stripes, period 4
3     triangle / shell    diagonal stripes, period 4
4     disc / ball         checkerboard, period 4
5     rectangle / box     horizontal stripes, period 6
6     triangle / shell    vertical stripes, period 6
7     disc / ball         diagonal stripes, period 6
====  ==================  ===========================================

Every shape draws its base brightness from the same range as the background, a smooth illumination ramp
multiplies the whole image, and Gaussian noise is added per channel: the classes overlap in intensity, so no
per-pixel threshold separates them (tests/datasets/test_synthetic.py measures this), while texture and
shape make them easy for a small CNN. Shapes may overlap; later ones overwrite earlier ones. Class 0 is the
background.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attnseg.errors import ConfigError
from attnseg.registry import DATASETS

__all__ = ["SyntheticSegmentation", "synthetic2d", "synthetic3d", "SHAPES", "TEXTURES"]

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MAX_CLASSES = 8
SHAPES = (("disc", "ball"), ("rect", "box"), ("triangle", "shell"))
TEXTURES = ("hstripes", "vstripes", "dstripes", "checker")


def _class_style(k: int) -> tuple[int, int, int]:
    """``(shape id, texture id, period)`` of foreground class ``k`` (1-based)."""
    return (k - 1) % len(SHAPES), (k - 1) % len(TEXTURES), 4 + 2 * ((k - 1) // len(TEXTURES))


def class_names(num_classes: int, spatial_dims: int) -> list[str]:
    """``["background", "disc_hstripes", ...]``: shape and texture of each class (period when not 4)."""
    names = ["background"]
    for k in range(1, num_classes):
        shape, texture, period = _class_style(k)
        names.append(f"{SHAPES[shape][spatial_dims - 2]}_{TEXTURES[texture]}" + (f"{period}" if period != 4 else ""))
    return names


def _texture(k: int, grids: list[np.ndarray]) -> np.ndarray:
    """A +-1 texture of foreground class ``k`` over coordinate grids (one per axis; the last two are H, W)."""
    _, texture, period = _class_style(k)
    rows, cols = grids[-2], grids[-1]
    half = period / 2
    if texture == 0:
        bands = np.floor(rows / half)
    elif texture == 1:
        bands = np.floor(cols / half)
    elif texture == 2:
        bands = np.floor((rows + cols) / half)
    else:
        bands = np.floor(rows / half) + np.floor(cols / half)
    return np.where(bands % 2 == 0, 1.0, -1.0).astype(np.float32)


def _shape_mask(k: int, grids: list[np.ndarray], rng: np.random.Generator, size: tuple[int, ...]) -> np.ndarray:
    """Boolean ``[*size]`` inside of one random shape of class ``k``."""
    dims = len(size)
    center = [rng.uniform(0.15, 0.85) * s for s in size]
    radius = rng.uniform(0.1, 0.22) * min(size)
    rel = [g - c for g, c in zip(grids, center)]
    shape = _class_style(k)[0]
    if shape == 0:  # disc / ball
        return sum(r**2 for r in rel) <= radius**2
    if shape == 1:  # rectangle / box with independent half-widths
        half = [radius * rng.uniform(0.6, 1.2) for _ in range(dims)]
        return np.logical_and.reduce([np.abs(r) <= h for r, h in zip(rel, half)])
    if dims == 2:  # triangle: intersection of three half-planes at 120 degrees
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        inside = np.ones(size, dtype=bool)
        for a in angles:
            inside &= rel[0] * np.cos(a) + rel[1] * np.sin(a) <= radius * 0.6
        return inside
    dist = np.sqrt(sum(r**2 for r in rel))  # 3D: spherical shell
    return (dist <= radius) & (dist >= radius * 0.55)


class SyntheticSegmentation(Dataset):
    """Textured random shapes (see the module docstring); use :func:`synthetic2d` / :func:`synthetic3d`.

    Samples: ``{"image": [C, *spatial] float32 in 0..1, "mask": [*spatial] int64, "meta": {"id", "path": None,
    "orig_size"}}`` with spatial ``(H, W)`` or ``(D, H, W)``.
    """

    task = "segmentation"
    ignore_index = None

    def __init__(
        self,
        split: str,
        spatial_dims: int,
        transform: Callable[[dict], dict] | None = None,
        num_classes: int = 4,
        image_size: tuple[int, ...] = (96, 96),
        num_samples: int = 64,
        in_chans: int = 3,
        seed: int = 0,
        max_shapes: int = 5,
        noise: float = 0.06,
    ) -> None:
        name = f"synthetic{spatial_dims}d"
        if split not in _SPLIT_IDS:
            raise ConfigError(f"{name}: split must be one of {list(_SPLIT_IDS)}, got {split!r}")
        if not 2 <= num_classes <= MAX_CLASSES:
            raise ConfigError(f"{name}: num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
        if len(image_size) != spatial_dims or min(image_size) < 8:
            raise ConfigError(f"{name}: image_size must have {spatial_dims} sizes >= 8, got {list(image_size)}")
        if num_samples < 0 or in_chans < 1 or max_shapes < 1 or not 0 <= noise <= 1:
            raise ConfigError(f"{name}: need num_samples >= 0, in_chans >= 1, max_shapes >= 1 and 0 <= noise <= 1, "
                              f"got {num_samples=}, {in_chans=}, {max_shapes=}, {noise=}")
        self.split = split
        self.spatial_dims = spatial_dims
        self.transform = transform
        self.num_classes = num_classes
        self.class_names = class_names(num_classes, spatial_dims)
        self.image_size = tuple(int(s) for s in image_size)
        self.num_samples = num_samples
        self.in_chans = in_chans
        self.seed = seed
        self.max_shapes = max_shapes
        self.noise = noise

    def __len__(self) -> int:
        return self.num_samples

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image [C, *size] float32 in 0..1, mask [*size] int64)`` of sample ``index``."""
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        size = self.image_size
        grids = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in size), indexing="ij")
        image = np.full(size, rng.uniform(0.25, 0.75), dtype=np.float32)
        mask = np.zeros(size, dtype=np.int64)
        for _ in range(rng.integers(1, self.max_shapes + 1)):
            k = int(rng.integers(1, self.num_classes))
            inside = _shape_mask(k, grids, rng, size)
            base = rng.uniform(0.25, 0.75)
            image = np.where(inside, base + 0.18 * _texture(k, grids), image)
            mask[inside] = k
        # Smooth illumination: a random linear ramp (gain 0.7..1.3 across the image) over everything.
        gain = 1 + sum(rng.uniform(-0.3, 0.3) * (g / (s - 1) - 0.5) for g, s in zip(grids, size))
        tint = rng.uniform(0.85, 1.15, size=self.in_chans).astype(np.float32).reshape(-1, *([1] * len(size)))
        image = (image * gain)[None] * tint + rng.normal(0, self.noise, size=(self.in_chans, *size))
        return np.clip(image, 0, 1).astype(np.float32), mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        image, mask = self.generate(index)
        sample = {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask),
            "meta": {"id": f"{self.split}_{index:05d}", "path": None, "orig_size": self.image_size},
        }
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (f"synthetic{self.spatial_dims}d(split={self.split!r}, n={self.num_samples}, "
                f"num_classes={self.num_classes}, image_size={list(self.image_size)}, in_chans={self.in_chans})")


def _count(split: str, num_train: int, num_val: int, num_test: int) -> int:
    return {"train": num_train, "val": num_val, "test": num_test}.get(split, 0)


@DATASETS.register()
def synthetic2d(
    split: str,
    transform: Callable[[dict], dict] | None = None,
    num_classes: int = 4,
    image_size: tuple[int, int] = (96, 96),
    num_train: int = 256,
    num_val: int = 32,
    num_test: int = 32,
    in_chans: int = 3,
    seed: int = 0,
    max_shapes: int = 5,
    noise: float = 0.06,
) -> SyntheticSegmentation:
    """Synthetic 2D segmentation: discs, rectangles and triangles with class textures (2..8 classes).

    Example::

        >>> ds = synthetic2d("train", image_size=(64, 64), num_train=8)
        >>> ds[0]["image"].shape, ds[0]["mask"].shape, ds.class_names[1]
        (torch.Size([3, 64, 64]), torch.Size([64, 64]), 'disc_hstripes')
    """
    return SyntheticSegmentation(split, 2, transform, num_classes, tuple(image_size),
                                 _count(split, num_train, num_val, num_test), in_chans, seed, max_shapes, noise)


@DATASETS.register()
def synthetic3d(
    split: str,
    transform: Callable[[dict], dict] | None = None,
    num_classes: int = 4,
    image_size: tuple[int, int, int] = (48, 48, 48),
    num_train: int = 32,
    num_val: int = 8,
    num_test: int = 8,
    in_chans: int = 1,
    seed: int = 0,
    max_shapes: int = 5,
    noise: float = 0.06,
) -> SyntheticSegmentation:
    """Synthetic 3D segmentation: balls, boxes and shells with class textures (2..8 classes).

    Example::

        >>> ds = synthetic3d("val", image_size=(32, 32, 32), num_val=2)
        >>> ds[0]["image"].shape, ds[0]["mask"].shape
        (torch.Size([1, 32, 32, 32]), torch.Size([32, 32, 32]))
    """
    return SyntheticSegmentation(split, 3, transform, num_classes, tuple(image_size),
                                 _count(split, num_train, num_val, num_test), in_chans, seed, max_shapes, noise)
