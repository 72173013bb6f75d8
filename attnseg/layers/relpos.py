"""Relative position bias tables: resizing (Swin / timm rule) and the dense 2D bias of global attention."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["resize_rel_pos_table", "relative_position_bias_2d"]


def resize_rel_pos_table(table: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bicubically resize a 2D relative position table ``[heads, T_h, T_w] -> [heads, *size]``.

    This is how Swin, timm and the official NAT 11x11 checkpoints adapt tables to another window or map size
    (``align_corners=False``). The table is returned unchanged when it already has ``size``.

    Example::

        >>> resize_rel_pos_table(torch.zeros(2, 13, 13), (21, 21)).shape
        torch.Size([2, 21, 21])
    """
    size = tuple(int(s) for s in size)
    if tuple(table.shape[1:]) == size:
        return table
    return F.interpolate(table[None].float(), size=size, mode="bicubic", align_corners=False)[0].to(table.dtype)


def relative_position_bias_2d(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The bias of every query/key pair of an ``height x width`` map, ``[heads, H*W, H*W]`` (row-major tokens).

    ``bias[h, q, k] = table[h, k_y - q_y + R_y, k_x - q_x + R_x]`` with the table ``[heads, 2R_y+1, 2R_x+1]``
    centred on offset zero (the key-minus-query rule of NATTEN and of the official ViT-RPB). A map with offsets
    beyond the table (``H > R_y + 1``) uses the table resized to ``[heads, 2H-1, 2W-1]`` first
    (:func:`resize_rel_pos_table`), the usual adaptation to a larger input; smaller maps index it exactly.

    Example::

        >>> table = torch.arange(2 * 3 * 3, dtype=torch.float).reshape(2, 3, 3)
        >>> relative_position_bias_2d(table, 2, 2)[0]  # the centre (offset 0) is table[:, 1, 1]
        tensor([[4., 5., 7., 8.],
                [3., 4., 6., 7.],
                [1., 2., 4., 5.],
                [0., 1., 3., 4.]])
    """
    if table.ndim != 3 or table.shape[1] % 2 == 0 or table.shape[2] % 2 == 0:
        raise ValueError(f"a 2D relative position table is [heads, odd, odd], got {list(table.shape)}")
    if height > (table.shape[1] + 1) // 2 or width > (table.shape[2] + 1) // 2:
        table = resize_rel_pos_table(table, (max(2 * height - 1, table.shape[1]), max(2 * width - 1, table.shape[2])))
    # symbolic sizes (torch.export with dynamic shapes) are unhashable: computed, not cached
    offsets = _flat_offset_index if isinstance(height, int) and isinstance(width, int) else _flat_offset_index.__wrapped__
    index = offsets(height, width, table.shape[1], table.shape[2], str(table.device))
    return table.flatten(1)[:, index].view(table.shape[0], height * width, height * width)


@functools.lru_cache(maxsize=4)
def _flat_offset_index(height: int, width: int, rows: int, cols: int, device: str) -> torch.Tensor:
    """``[N * N]`` positions in a flattened ``[rows, cols]`` table of every key-minus-query offset of an
    ``height x width`` map (cached: a model calls it with the same few sizes in every block and forward)."""
    ry, rx = (rows - 1) // 2, (cols - 1) // 2
    y, x = torch.arange(height, device=device), torch.arange(width, device=device)
    dy = (y[None, :] - y[:, None] + ry).repeat_interleave(width, 0).repeat_interleave(width, 1)  # [N, N]
    dx = (x[None, :] - x[:, None] + rx).repeat(height, height)  # [N, N]
    return (dy * cols + dx).flatten()
