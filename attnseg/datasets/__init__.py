"""Datasets and transforms; importing this package registers every dataset in ``DATASETS``.

Registered: ``synthetic2d``, ``synthetic3d`` (:mod:`.synthetic`), ``folder2d``, ``imagefolder``
(:mod:`.folder2d`), ``fashion_mnist`` (:mod:`.fashion_mnist`, Fashion-MNIST's IDX files), ``decathlon``
(:mod:`.decathlon`, 3D NIfTI), ``nifti_folder`` (:mod:`.nifti_folder`, 3D NIfTI image/label folders), ``slices2d``
(:mod:`.slices2d`, 2D slices of a 3D dataset), ``landmarks`` and ``synthetic_landmarks`` (:mod:`.landmarks`, images +
contour landmarks of a template). Each is called as ``factory(split=..., transform=..., **kwargs)`` and returns a
dataset with ``num_classes``, ``class_names``, ``in_chans``, ``spatial_dims``, ``task`` and ``ignore_index``. An item
is a sample dict, or a list of sample dicts when a 3D random crop draws several per volume
(``data.volume.crop.num_samples``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attnseg.datasets import (  # noqa: F401  (registers them)
    decathlon,
    fashion_mnist,
    folder2d,
    landmarks,
    nifti_folder,
    slices2d,
    synthetic,
)
from attnseg.errors import DataError
from attnseg.registry import DATASETS

__all__ = ["build_dataset", "collate"]


def build_dataset(name: str, split: str, transform: Callable[[dict], dict] | None = None, **kwargs: Any) -> Any:
    """The ``split`` ('train' | 'val' | 'test') of the registered dataset ``name``.

    Raises:
        KeyError: for an unknown ``name``, with the closest registered names.
    """
    return DATASETS.get(name)(split=split, transform=transform, **kwargs)


def collate(samples: list[dict[str, Any] | list[dict[str, Any]]]) -> dict[str, Any]:
    """Batch sample dicts: tensors are stacked (``image`` ``[B, C, *spatial]``, ``mask`` ``[B, *spatial]``,
    ``label`` ``[B]``), anything else (``meta``) becomes a list.

    Items that are lists of samples (several random crops of one volume) are flattened first, so a batch of
    ``batch_size`` such items holds ``batch_size * num_samples`` samples.

    Raises:
        DataError: when tensors differ in shape, naming the sample ids and shapes (set ``augment.crop_size``,
            or use batch size 1 for images of different sizes).
    """
    samples = [s for item in samples for s in (item if isinstance(item, list) else [item])]
    if not samples:
        raise DataError("collate: empty batch")
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                ids = [s.get("meta", {}).get("id", i) for i, s in enumerate(samples)]
                listed = ", ".join(f"{i}: {list(v.shape)}" for i, v in zip(ids, values))
                raise DataError(f"collate: '{key}' tensors differ in shape within a batch ({listed}); set "
                                f"augment.crop_size (training) or a batch size of 1 for images of different sizes")
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
