"""Synthetic segmentation data: textured shapes on a noisy, shaded background, in 2D and 3D.

The embedded default of attnseg (no files needed). Each sample is generated on the fly from
``(seed, split, index)`` alone, so it is deterministic, splits never share samples, and nothing is held in
memory. Foreground class ``k`` has its own shape (disc / rectangle / triangle in 2D; ball / box / shell in
3D, by ``(k - 1) % 3``) and its own texture (stripes of a class-specific orientation and period, or a
checkerboard), while every shape draws its base brightness from the same range: classes overlap in mean
intensity, so a per-pixel threshold cannot separate them, but a small CNN learns them quickly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from attnseg.registry import DATASETS

__all__ = ["SyntheticSegmentation", "synthetic2d", "synthetic3d"]

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _texture(k: int, grids: list[np.ndarray]) -> np.ndarray:
    """A +-1 texture for foreground class ``k`` (1-based) over coordinate grids (one per axis)."""
    period = 4 + 2 * ((k - 1) // 4)
    kind = (k - 1) % 4
    if kind == 0:  # stripes along the first in-plane axis
        phase = grids[-2]
    elif kind == 1:  # stripes along the last axis
        phase = grids[-1]
    elif kind == 2:  # diagonal stripes
        phase = grids[-1] + grids[-2]
    else:  # checkerboard
        return np.where((np.floor(grids[-1] / (period / 2)) + np.floor(grids[-2] / (period / 2))) % 2 == 0, 1.0, -1.0)
    return np.where(np.floor(phase / (period / 2)) % 2 == 0, 1.0, -1.0)


def _shape_mask(k: int, grids: list[np.ndarray], rng: np.random.Generator, size: tuple[int, ...]) -> np.ndarray:
    dims = len(size)
    center = [rng.uniform(0.15, 0.85) * s for s in size]
    radius = rng.uniform(0.1, 0.22) * min(size)
    rel = [g - c for g, c in zip(grids, center)]
    kind = (k - 1) % 3
    if kind == 0:  # disc / ball
        return sum(r**2 for r in rel) <= radius**2
    if kind == 1:  # rectangle / box with independent half-widths
        half = [radius * rng.uniform(0.6, 1.2) for _ in range(dims)]
        return np.logical_and.reduce([np.abs(r) <= h for r, h in zip(rel, half)])
    if dims == 2:  # triangle: three half-planes
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        inside = np.ones(size, dtype=bool)
        for a in angles:
            inside &= rel[0] * np.cos(a) + rel[1] * np.sin(a) <= radius * 0.6
        return inside
    dist = np.sqrt(sum(r**2 for r in rel))  # 3D shell
    return (dist <= radius) & (dist >= radius * 0.55)


class SyntheticSegmentation(Dataset):
    """Textured random shapes; see the module docstring.

    Samples are ``{"image": [C, *size] float in 0..1, "mask": [*size] int64, "meta": {...}}``.
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
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {list(_SPLIT_IDS)}, got {split!r}")
        if not 2 <= num_classes <= 16:
            raise ValueError(f"num_classes must be in [2, 16], got {num_classes}")
        if len(image_size) != spatial_dims or min(image_size) < 8:
            raise ValueError(f"image_size must have {spatial_dims} sizes >= 8, got {list(image_size)}")
        if num_samples < 0 or in_chans < 1 or max_shapes < 1:
            raise ValueError(f"num_samples >= 0, in_chans >= 1 and max_shapes >= 1 required, got {num_samples=}, "
                             f"{in_chans=}, {max_shapes=}")
        self.split = split
        self.spatial_dims = spatial_dims
        self.transform = transform
        self.num_classes = num_classes
        self.class_names = ["background"] + [f"class{k}" for k in range(1, num_classes)]
        self.image_size = tuple(int(s) for s in image_size)
        self.num_samples = num_samples
        self.in_chans = in_chans
        self.seed = seed
        self.max_shapes = max_shapes
        self.noise = noise

    def __len__(self) -> int:
        return self.num_samples

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image [C, *size] float32, mask [*size] int64)`` of sample ``index``."""
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        size = self.image_size
        grids = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in size), indexing="ij")
        # Smooth shading: a random linear ramp over the volume.
        image = rng.uniform(0.3, 0.6) + sum(rng.uniform(-0.2, 0.2) * g / s for g, s in zip(grids, size))
        mask = np.zeros(size, dtype=np.int64)
        for _ in range(rng.integers(2, self.max_shapes + 1)):
            k = int(rng.integers(1, self.num_classes))
            inside = _shape_mask(k, grids, rng, size)
            base = rng.uniform(0.25, 0.75)
            image = np.where(inside, base + 0.18 * _texture(k, grids), image)
            mask[inside] = k
        tint = rng.uniform(0.85, 1.15, size=self.in_chans).reshape(-1, *([1] * len(size)))
        image = image[None] * tint + rng.normal(0, self.noise, size=(self.in_chans, *size))
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
    """Synthetic 2D segmentation: discs, rectangles and triangles with class textures."""
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
    """Synthetic 3D segmentation: balls, boxes and shells with class textures."""
    return SyntheticSegmentation(split, 3, transform, num_classes, tuple(image_size),
                                 _count(split, num_train, num_val, num_test), in_chans, seed, max_shapes, noise)
