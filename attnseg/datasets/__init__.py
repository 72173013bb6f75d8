"""Datasets and transforms; importing this package registers every dataset in ``DATASETS``."""

from __future__ import annotations

from typing import Any

from attnseg.datasets import folder2d, synthetic  # noqa: F401
from attnseg.registry import DATASETS

__all__ = ["build_dataset"]


def build_dataset(name: str, split: str, transform: Any = None, **kwargs: Any) -> Any:
    """The ``split`` of the registered dataset ``name`` (KeyError with a suggestion for unknown names)."""
    return DATASETS.get(name)(split=split, transform=transform, **kwargs)
