"""2D slices cut from a 3D dataset: the ``slices2d`` dataset, so 2D models and ``data.augment`` train on volumes.

``source`` names a 3D case dataset and its arguments (``{name: decathlon, root: ...}`` or
``{name: nifti_folder, ...}``); ``slices2d`` builds the same ``split`` of it, so **splits are by case**: every
slice of a case lies in the split its case lies in. Each case is preprocessed once (``volume``: the
deterministic keys of ``data.volume``, i.e. ``orientation``, ``spacing``, ``intensity``, ``crop_foreground``; null
keeps the file's voxel grid as stored) and kept by the source's cache (``cache_rate``, ``cache_dir``); slices
are views of the cached volume.

A sample is slice ``k`` along ``axis`` (0, 1 or 2: the volume's voxel axes, after ``orientation`` RAS: 0 sagittal,
1 coronal, 2 axial)::

    {"image": [C, H, W] float32, "mask": [H, W] int64,
     "meta": {"id": "<case>_z042", "case_id", "axis", "index", "path", "spacing": (mm, mm), "volume_affine"}}

where ``(H, W)`` are the two remaining axes in order, and the id letter is ``x``/``y``/``z`` for axis 0/1/2.
``slice_size: [H, W]`` pads (image 0, mask ``ignore_index`` or 0) or crops every slice about its centre to one
size, so that slices of cases with different grids batch together.

Which slices: every one, or with ``labelled_only`` only those holding a foreground class (a class index other
than 0 and ``ignore_index``) plus ``empty_fraction`` of the others (a seeded choice per case, fixed for the run).
The filter applies to the ``train`` split; ``val`` and ``test`` keep every slice unless ``eval_all_slices`` is
false, so that evaluation counts false positives on empty slices too. The ``predict`` split keeps every slice.

The ``transform`` (``data.augment`` / ``data.normalize``, 2D) runs on each slice sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from attnseg.errors import ConfigError
from attnseg.registry import DATASETS

__all__ = ["Slices2D", "slice_id"]

_AXIS_LETTERS = "xyz"
_RANDOM_KEYS = ("crop", "rotate90", "scale_intensity", "shift_intensity")


def slice_id(case: str, axis: int, index: int, depth: int) -> str:
    """The id of slice ``index`` of ``depth`` along ``axis`` of ``case``: ``case_001_z042``."""
    return f"{case}_{_AXIS_LETTERS[axis]}{index:0{max(3, len(str(depth - 1)))}d}"


def _preprocessing(volume: dict[str, Any] | None) -> Any:
    """A preprocessing-only :class:`VolumeTransform` of ``volume``, or None."""
    if volume is None:
        return None
    from attnseg.datasets.volume_transforms import VolumeConfig, VolumeTransform

    cfg = VolumeConfig.model_validate(volume)
    random = [k for k in _RANDOM_KEYS if getattr(cfg, k) is not None] + (["flip_prob"] if any(cfg.flip_prob) else [])
    if random:
        raise ConfigError(f"slices2d: volume {random} are 3D training augmentation; slices take only the "
                          f"preprocessing keys (orientation, spacing, intensity, crop_foreground) and are augmented "
                          f"in 2D by data.augment")
    return VolumeTransform(cfg, train=False)


def _fit(t: torch.Tensor, size: tuple[int, int], fill: float) -> torch.Tensor:
    """``t`` ``[..., H, W]`` padded with ``fill`` or cropped, about its centre, to ``size``."""
    h, w = t.shape[-2:]
    pads = []
    for have, want in ((w, size[1]), (h, size[0])):  # F.pad takes the last axis first
        extra = want - have
        pads += [extra // 2, extra - extra // 2]  # negative pads crop
    return F.pad(t, pads, value=fill)


class Slices2D(Dataset):
    """2D slices of a 3D case dataset; see the module docstring.

    Args:
        split: 'train', 'val', 'test' or 'predict' (the source's split).
        transform: the 2D sample transform (``data.augment`` / ``data.normalize``), or None.
        source: ``{"name": <3D dataset>, **its arguments}``, e.g. ``{"name": "decathlon", "root": "data/x"}``.
        axis: the voxel axis the slices are cut along (0, 1 or 2).
        volume: the deterministic ``data.volume`` keys applied to each case before slicing, or None.
        labelled_only: keep only slices with a foreground class (plus ``empty_fraction`` of the others).
        empty_fraction: fraction (0..1) of the slices without foreground kept when ``labelled_only``.
        eval_all_slices: apply the slice filter to ``train`` only (val/test keep every slice).
        slice_size: ``[H, W]`` every slice is padded or cropped to about its centre, or None.
        seed: seed of the choice of empty slices.

    Attributes: ``source`` (the 3D dataset), ``slices`` (``[(case index, slice index)]``), ``cases``,
    ``num_classes``, ``class_names``, ``in_chans``, ``ignore_index``, ``spatial_dims`` (2), ``task``.

    Example::

        >>> ds = Slices2D("train", None, source={"name": "decathlon", "root": "data/brainmask"}, axis=2,
        ...               volume={"spacing": {"pixdim": [2, 2, 2]}}, labelled_only=True)  # doctest: +SKIP
        >>> ds[0]["image"].shape, ds[0]["meta"]["id"]  # doctest: +SKIP
        (torch.Size([1, 91, 109]), 'colin27_z012')
    """

    task = "segmentation"
    spatial_dims = 2

    def __init__(
        self,
        split: str,
        transform: Callable[[dict], Any] | None,
        source: dict[str, Any],
        axis: int = 2,
        volume: dict[str, Any] | None = None,
        labelled_only: bool = False,
        empty_fraction: float = 0.0,
        eval_all_slices: bool = True,
        slice_size: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        from attnseg.datasets.volume_cases import VolumeCaseDataset

        name = "slices2d"
        if axis not in (0, 1, 2):
            raise ConfigError(f"{name}: axis must be 0, 1 or 2 (a voxel axis of the volume), got {axis}")
        if not 0 <= empty_fraction <= 1:
            raise ConfigError(f"{name}: empty_fraction must be in 0..1, got {empty_fraction}")
        if slice_size is not None and (len(slice_size) != 2 or min(slice_size) < 1):
            raise ConfigError(f"{name}: slice_size must be [H, W] with sizes >= 1, got {slice_size}")
        if not isinstance(source, dict) or not isinstance(source.get("name"), str):
            raise ConfigError(f"{name}: source must be a mapping with a 'name' (a 3D dataset such as decathlon or "
                              f"nifti_folder) and its arguments, got {source!r}")
        kwargs = {k: v for k, v in source.items() if k != "name"}
        reserved = sorted(set(kwargs) & {"split", "transform"})
        if reserved:
            raise ConfigError(f"{name}: source.{reserved[0]} is set by slices2d, not in source")
        factory = DATASETS.get(source["name"])
        try:
            self.source = factory(split=split, transform=_preprocessing(volume), **kwargs)
        except TypeError as e:
            raise ConfigError(f"{name}: source ({source['name']}): {e}") from None
        if not isinstance(self.source, VolumeCaseDataset):
            raise ConfigError(f"{name}: source '{source['name']}' is not a 3D case dataset (use decathlon or "
                              f"nifti_folder)")
        self.split = split
        self.transform = transform
        self.axis = axis
        self.slice_size = tuple(slice_size) if slice_size is not None else None
        self.cases = self.source.cases
        self.num_classes = self.source.num_classes
        self.class_names = self.source.class_names
        self.in_chans = self.source.in_chans
        self.ignore_index = self.source.ignore_index
        filtered = labelled_only and (split == "train" or (split in ("val", "test") and not eval_all_slices))
        self.slices: list[tuple[int, int]] = []
        for i in range(len(self.cases)):
            self.slices += [(i, k) for k in self._chosen(i, filtered, empty_fraction, seed)]

    def _chosen(self, case_index: int, filtered: bool, empty_fraction: float, seed: int) -> list[int]:
        """Slice indices of case ``case_index`` (all, or the foreground ones plus a seeded share of the rest)."""
        volume = self.source.prepared(case_index)
        depth = volume["image"].shape[1 + self.axis]
        if not filtered or volume.get("mask") is None:
            return list(range(depth))
        mask = volume["mask"]
        foreground = mask != 0
        if self.ignore_index is not None:
            foreground &= mask != self.ignore_index
        others = tuple(a for a in range(3) if a != self.axis)
        has_label = foreground.any(dim=others[1]).any(dim=others[0]).numpy()  # [depth]
        empty = np.flatnonzero(~has_label)
        keep = round(empty_fraction * len(empty))
        picked = np.random.default_rng([seed, case_index]).choice(empty, size=keep, replace=False) if keep else []
        return sorted(np.flatnonzero(has_label).tolist() + [int(k) for k in picked])

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_index, k = self.slices[index]
        volume = self.source.prepared(case_index)
        image = volume["image"].select(1 + self.axis, k).to(torch.float32, copy=True)  # [C, X, Y, Z] -> [C, H, W]
        mask = volume["mask"].select(self.axis, k).long() if volume.get("mask") is not None else None  # [H, W]
        if self.slice_size is not None:
            image = _fit(image, self.slice_size, 0.0)
            if mask is not None:
                mask = _fit(mask, self.slice_size, 0 if self.ignore_index is None else self.ignore_index)
        vmeta = volume["meta"]
        spacing = vmeta.get("spacing")
        case = vmeta.get("id", self.cases[case_index].id)
        meta = {"id": slice_id(case, self.axis, k, volume["image"].shape[1 + self.axis]), "case_id": case,
                "axis": self.axis, "index": k, "path": vmeta.get("path"),
                "spacing": tuple(s for a, s in enumerate(spacing) if a != self.axis) if spacing else None,
                "volume_affine": vmeta.get("affine", vmeta.get("original_affine"))}
        sample: dict[str, Any] = {"image": image, "meta": meta}
        if mask is not None:
            sample["mask"] = mask
        return self.transform(sample) if self.transform is not None else sample

    def check(self, max_errors: int = 20) -> None:
        """The source's check: read every case not cached; one :class:`DataError` lists every bad case."""
        self.source.check(max_errors)

    def __repr__(self) -> str:
        return (f"slices2d(source={self.source!r}, axis={self.axis}, split={self.split!r}, n={len(self)}, "
                f"cases={len(self.cases)})")


DATASETS.register("slices2d", cls=Slices2D)(Slices2D)
