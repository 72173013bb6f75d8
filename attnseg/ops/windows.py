"""Window tables: the one semantic core every neighborhood-attention backend reads.

For one axis of length ``L`` and a kernel ``k``, dilation ``d``, stride ``s`` and a causal flag, the table
gives, for every query coordinate and every window slot ``a in [0, k)``, the key coordinate of that slot
and whether the slot is valid. Multi-axis windows are the product of the per-axis tables (row-major slot
order), so a backend never re-derives the rules; it only gathers or range-checks against the tables.

Rules (NATTEN's, reference/kernels.md §1; ``left = k // 2``, ``right = k // 2 + k % 2 - 1``):

- dilation splits the axis into ``d`` interleaved groups ``g = x % d``; a query sees only keys of its
  group, and everything is computed on in-group indices ``i = x // d`` with group length ``Lg``;
- non-causal: the stride leader ``lead = min((i // s) * s + s // 2, Lg - 1)`` and the window
  ``[start, start + k)`` with ``start = clamp(lead - left, 0, Lg - k)`` — shifted inward at borders,
  never zero-padded, so every slot is valid;
- causal: ``lead = min((i // s) * s + s - 1, Lg - 1)``, ``start = max(lead - k + 1, 0)``, and slot ``a`` is
  valid while ``start + a <= i`` (fewer than ``k`` valid keys near the start);
- ``mode="zeropad"`` (TransNeXt / unfold style): the window is centred, ``start = i - left``, and slots
  that fall outside ``[0, Lg)`` are invalid (masked) instead of the window being shifted.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["axis_table", "axis_bounds", "window_table", "rpb_table", "rpb_onehot"]


@functools.lru_cache(maxsize=256)
def _axis_table_cached(length: int, kernel: int, dilation: int, stride: int, causal: bool,
                       mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(length)
    group = x % dilation
    i = x // dilation
    group_len = length // dilation + (group < length % dilation).long()
    slots = torch.arange(kernel)
    left = kernel // 2
    if mode == "zeropad":
        start = i - left
        pos = start[:, None] + slots[None, :]
        valid = (pos >= 0) & (pos < group_len[:, None])
    elif causal:
        lead = torch.minimum((i // stride) * stride + stride - 1, group_len - 1)
        start = torch.clamp(lead - kernel + 1, min=0)
        pos = start[:, None] + slots[None, :]
        valid = (pos <= i[:, None]) & (pos < group_len[:, None])
    else:
        lead = torch.minimum((i // stride) * stride + stride // 2, group_len - 1)
        start = torch.minimum(torch.clamp(lead - left, min=0), group_len - kernel)
        pos = start[:, None] + slots[None, :]
        valid = torch.ones_like(pos, dtype=torch.bool)
    key = pos.clamp(min=0) * dilation + group[:, None]
    key = torch.where(valid, key, x[:, None])  # invalid slots point at the query itself: safe to gather
    return key, valid


def axis_table(length: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False,
               mode: str = "natten") -> tuple[torch.Tensor, torch.Tensor]:
    """Key coordinate and validity of every (query, slot) on one axis.

    Returns:
        ``key [L, k]`` int64 (invalid slots hold the query's own coordinate) and ``valid [L, k]`` bool.
    """
    return _axis_table_cached(int(length), int(kernel), int(dilation), int(stride), bool(causal), mode)


def window_table(
    shape: tuple[int, ...],
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    causal: tuple[bool, ...],
    mode: str = "natten",
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened multi-axis table.

    Returns:
        ``key [N, K]`` int64 flat (row-major) key index of each query's slots, ``K = prod(kernel)`` in
        row-major slot order, and ``valid [N, K]`` bool.
    """
    keys, valids = [], []
    for n, k, d, s, c in zip(shape, kernel, dilation, stride, causal):
        key, valid = axis_table(n, k, d, s, c, mode)
        keys.append(key)
        valids.append(valid)
    flat_valid = torch.ones((), dtype=torch.bool)
    # Outer product over axes: query index is row-major over (x0, x1, ...), slot index row-major over (a0, a1, ...).
    ndim = len(shape)
    flat_key = torch.zeros([1] * (2 * ndim), dtype=torch.long)
    for axis, (key, valid) in enumerate(zip(keys, valids)):
        view = [1] * (2 * ndim)
        view[axis] = key.shape[0]
        view[ndim + axis] = key.shape[1]
        step = math.prod(shape[axis + 1:])
        flat_key = flat_key + key.view(view) * step
        flat_valid = flat_valid & valid.view(view)
    n = math.prod(shape)
    kk = math.prod(kernel)
    flat_key = flat_key.reshape(n, kk)
    flat_valid = flat_valid.expand([*shape, *kernel]).reshape(n, kk)
    if device is not None:
        flat_key, flat_valid = flat_key.to(device), flat_valid.to(device)
    return flat_key, flat_valid


def rpb_table(
    shape: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...],
    causal: tuple[bool, ...], mode: str = "natten",
) -> torch.Tensor:
    """``[N, K]`` flat index into a relative-position bias table of shape ``[2k_0 - 1, 2k_1 - 1, ...]``.

    Offset per axis is ``(key - query) / dilation + (k - 1)`` (in dilated steps), as in NATTEN <= 0.17.
    """
    ndim = len(shape)
    idx = torch.zeros([1] * (2 * ndim), dtype=torch.long)
    for axis, (n, k, d, s, c) in enumerate(zip(shape, kernel, dilation, stride, causal)):
        offset = _rpb_offsets(n, k, d, s, c, mode)
        view = [1] * (2 * ndim)
        view[axis] = n
        view[ndim + axis] = k
        step = math.prod(2 * kk - 1 for kk in kernel[axis + 1:])
        idx = idx + offset.view(view) * step
    return idx.expand([*shape, *kernel]).reshape(math.prod(shape), math.prod(kernel))


def _rpb_offsets(length: int, kernel: int, dilation: int, stride: int, causal: bool, mode: str) -> torch.Tensor:
    """``[L, k]`` bias-table offset of each (query, slot) on one axis."""
    key, _ = axis_table(length, kernel, dilation, stride, causal, mode)
    offset = (key - torch.arange(length)[:, None]).div(dilation, rounding_mode="floor") + (kernel - 1)
    return offset.clamp(0, 2 * kernel - 2)


def rpb_onehot(length: int, kernel: int, dilation: int = 1, stride: int = 1, causal: bool = False,
               mode: str = "natten") -> torch.Tensor:
    """``[L, k, 2k - 1]`` float: one-hot bias-table offset of each valid (query, slot) on one axis.

    Contracting per-slot logit gradients with these per axis sums them into the bias table deterministically.
    """
    _, valid = axis_table(length, kernel, dilation, stride, causal, mode)
    onehot = torch.nn.functional.one_hot(_rpb_offsets(length, kernel, dilation, stride, causal, mode), 2 * kernel - 1)
    return (onehot * valid[..., None]).float()


@functools.lru_cache(maxsize=256)
def axis_bounds(length: int, kernel: int, dilation: int, stride: int, causal: bool, mode: str) -> torch.Tensor:
    """Per-axis window bounds in dilation-group coordinates, indexed by the real coordinate ``x``.

    Returns ``int32 [5, length]``: rows ``lo, hi`` (the keys query ``x`` sees are ``[lo, hi)``), ``start`` (its
    window start, slot 0; may be negative in zeropad mode), and ``q_first, q_end``: the queries of ``x``'s group
    whose windows reach past key ``x`` are ``>= q_first``, those whose windows start at or before it are
    ``< q_end``. ``lo`` and ``hi`` are non-decreasing within a group, so a box of queries sees a box of keys
    and a box of keys is seen by a box of queries; the kernels rely on that.
    """
    key, valid = axis_table(length, kernel, dilation, stride, causal, mode)
    x = torch.arange(length)
    group, member = x % dilation, key // dilation
    big = torch.iinfo(torch.long).max
    lo = torch.where(valid, member, big).amin(1)
    hi = torch.where(valid, member, -1).amax(1) + 1
    first_valid = valid.long().argmax(1)
    start = member.gather(1, first_valid[:, None]).squeeze(1) - first_valid
    same_group = group[:, None] == group[None, :]  # [key x, query x']
    j = (x // dilation)[:, None]
    q_first = (same_group & (hi[None, :] <= j)).sum(1)
    q_end = (same_group & (lo[None, :] <= j)).sum(1)
    return torch.stack([lo, hi, start, q_first, q_end]).to(torch.int32)
