"""Stochastic depth: timm's ``DropPath`` and the per-block rate schedule the hierarchical backbones share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath

__all__ = ["DropPath", "drop_path_rates"]


def drop_path_rates(depths: Sequence[int], drop_path_rate: float) -> list[list[float]]:
    """Linearly rising stochastic-depth rates, 0 for the first block to ``drop_path_rate`` for the last.

    The rates run over all ``sum(depths)`` blocks (``torch.linspace``, as the official MetaFormer, ConvNeXt
    and MambaOut code computes them) and are returned split by stage: ``len(result[i]) == depths[i]``.
    Computed on the CPU so that building a model under ``torch.device('meta')`` still works.

    Example::

        >>> drop_path_rates([1, 2], 0.2)
        [[0.0], [0.10000000149011612, 0.20000000298023224]]
    """
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    flat = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    out, start = [], 0
    for depth in depths:
        out.append(flat[start:start + depth])
        start += depth
    return out
