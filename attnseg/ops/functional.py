"""Neighborhood attention: the public functional API and backend dispatch.

Fused ops take the NATTEN >= 0.20 layout ``[B, *spatial, heads, head_dim]`` (keys/values may have fewer
heads: grouped-query attention); unfused ops take the NATTEN <= 0.17 heads-first layout
``[B, heads, *spatial, head_dim]`` that NAT/DiNAT checkpoints and OverLoCK's ContMix were written for.
``kernel_size``, ``dilation``, ``stride`` and ``is_causal`` are an int/bool or one value per spatial axis.

Constraints (checked per axis, errors name the axis): ``kernel_size >= 1``, ``kernel_size * dilation <=
length``, ``1 <= stride <= kernel_size``; relative position bias ``[heads, 2k_0 - 1, ...]``.

Backends are chosen per call: ``backend=`` wins, then :func:`use_backend`, then the first backend whose
``can_run`` accepts the inputs (``available_backends()`` lists them in order). The reference backend can
run everything and is the oracle of the tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnseg.ops import cpu, natten_backend, reference, triton_kernels
from attnseg.registry import suggest

__all__ = [
    "na1d", "na2d", "na3d", "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
    "use_backend", "available_backends", "NAParams",
]

IntOrSeq = int | Sequence[int]
BoolOrSeq = bool | Sequence[bool]


@dataclass(frozen=True)
class NAParams:
    """Per-axis parameters of one call, normalised and checked."""

    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]
    mode: str


def _per_axis(name: str, value: Any, ndim: int, kind: type) -> tuple:
    if isinstance(value, (bool, int)):
        if kind is int and isinstance(value, bool):
            raise TypeError(f"{name} must be an int or {ndim} ints, got {value!r}")
        return (kind(value),) * ndim
    values = tuple(value)
    if len(values) != ndim:
        raise ValueError(f"{name} needs {ndim} values (one per spatial axis), got {list(values)}")
    return tuple(kind(v) for v in values)


def normalize_params(
    spatial: Sequence[int], kernel_size: IntOrSeq, dilation: IntOrSeq, stride: IntOrSeq, is_causal: BoolOrSeq,
    mode: str = "natten",
) -> NAParams:
    """Per-axis tuples, checked against the map size; ``ValueError`` names the axis and values."""
    ndim = len(spatial)
    if mode not in ("natten", "zeropad"):
        raise ValueError(f"mode must be 'natten' or 'zeropad', got {mode!r}{suggest(mode, ['natten', 'zeropad'])}")
    kernel = _per_axis("kernel_size", kernel_size, ndim, int)
    dil = _per_axis("dilation", dilation, ndim, int)
    strd = _per_axis("stride", stride, ndim, int)
    causal = _per_axis("is_causal", is_causal, ndim, bool)
    for axis, (n, k, d, s) in enumerate(zip(spatial, kernel, dil, strd)):
        if k < 1 or d < 1:
            raise ValueError(f"axis {axis}: kernel_size and dilation must be >= 1, got {k=}, {d=}")
        if not 1 <= s <= k:
            raise ValueError(f"axis {axis}: stride must be in [1, kernel_size], got stride={s}, kernel_size={k}")
        if mode == "natten" and k * d > n:
            raise ValueError(f"axis {axis}: kernel_size * dilation must be <= the map size, got kernel_size={k}, "
                             f"dilation={d}, size={n}")
    return NAParams(kernel, dil, strd, causal, mode)


# -- backends -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    can_run: Callable[..., str | None]  # returns None when it can run, else the reason it cannot
    fused: Callable[..., Any] | None
    qk: Callable[..., Any] | None
    av: Callable[..., Any] | None


def _reference_can_run(*tensors: torch.Tensor, **_: Any) -> str | None:
    return None


BACKENDS: dict[str, Backend] = {
    "cpu": Backend("cpu", cpu.can_run_cpu, cpu.na_fused_cpu, cpu.na_qk_cpu, cpu.na_av_cpu),
    "natten": Backend("natten", natten_backend.can_run_natten, natten_backend.na_fused_natten, None, None),
    "triton": Backend("triton", triton_kernels.can_run_triton, triton_kernels.na_fused_triton, None, None),
    "reference": Backend("reference", _reference_can_run, reference.na_fused_reference, reference.na_qk_reference,
                         reference.na_av_reference),
}

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnseg_na_backend", default=None)


def available_backends() -> list[str]:
    """Backend names in the order automatic selection tries them."""
    return list(BACKENDS)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Scope in which every neighborhood-attention call without ``backend=`` uses ``name``."""
    _check_backend_name(name)
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}{suggest(name, list(BACKENDS))} "
                         f"(available: {', '.join(BACKENDS)})")


def _select(backend: str | None, op: str, *tensors: torch.Tensor, **call: Any) -> Backend:
    """The backend for this call; ``call`` carries what a backend may not support (``rpb``, ``kernel``, ``mode``)."""
    name = backend or _FORCED.get()
    if name is not None:
        _check_backend_name(name)
        chosen = BACKENDS[name]
        reason = chosen.can_run(*tensors, op=op, **call)
        if reason is not None or getattr(chosen, op) is None:
            raise ValueError(f"backend {name!r} cannot run this {op} call: {reason or 'op not implemented'}")
        return chosen
    reasons = []
    for candidate in BACKENDS.values():
        reason = candidate.can_run(*tensors, op=op, **call)
        if reason is None and getattr(candidate, op) is not None:
            return candidate
        reasons.append(f"{candidate.name}: {reason or 'op not implemented'}")
    raise RuntimeError("no neighborhood-attention backend can run this call: " + "; ".join(reasons))


# -- fused --------------------------------------------------------------------------------------------


def _check_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int) -> None:
    if q.ndim != ndim + 3:
        raise ValueError(f"na{ndim}d expects query [B, {'X, Y, Z'[:3 * ndim - 2]}, heads, dim] "
                         f"({ndim + 3} dims), got shape {list(q.shape)}")
    if k.shape[:-1] != v.shape[:-1] or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"query {list(q.shape)}, key {list(k.shape)} and value {list(v.shape)} must share batch "
                         f"and spatial sizes (and key/value their heads)")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"query and key head_dim differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of key/value heads ({k.shape[-2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key and value dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key and value are on different devices: {q.device}, {k.device}, {v.device}")


def _check_rpb(rpb: torch.Tensor | None, heads: int, kernel: tuple[int, ...]) -> None:
    if rpb is None:
        return
    expected = (heads, *(2 * k - 1 for k in kernel))
    if tuple(rpb.shape) != expected:
        raise ValueError(f"rpb must have shape [heads, 2k-1 per axis] = {list(expected)}, got {list(rpb.shape)}")


def _na_fused(
    ndim: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrSeq,
    dilation: IntOrSeq, stride: IntOrSeq, is_causal: BoolOrSeq, rpb: torch.Tensor | None, scale: float | None,
    additional_keys: torch.Tensor | None, additional_values: torch.Tensor | None, return_lse: bool,
    backend: str | None, mode: str,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    _check_fused(query, key, value, ndim)
    spatial = query.shape[1:-2]
    p = normalize_params(spatial, kernel_size, dilation, stride, is_causal, mode)
    _check_rpb(rpb, query.shape[-2], p.kernel)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is not None:
        b, kvh, d = key.shape[0], key.shape[-2], key.shape[-1]
        if additional_keys.ndim != 4 or additional_keys.shape[0] != b or additional_keys.shape[2:] != (kvh, d):
            raise ValueError(f"additional_keys must be [B, n_extra, {kvh}, {d}], got {list(additional_keys.shape)}")
        if additional_values.shape[:3] != additional_keys.shape[:3]:
            raise ValueError(f"additional_values {list(additional_values.shape)} does not match additional_keys "
                             f"{list(additional_keys.shape)}")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = _select(backend, "fused", query, key, value, rpb=rpb, kernel=p.kernel, mode=p.mode)
    return chosen.fused(query, key, value, p.kernel, p.dilation, p.stride, p.causal, rpb, scale, additional_keys,
                        additional_values, return_lse, p.mode)


def na1d(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, scale=None,
         additional_keys=None, additional_values=None, return_lse=False, backend=None, mode="natten"):
    """1D neighborhood attention; see :func:`na2d` (layout ``[B, L, heads, dim]``)."""
    return _na_fused(1, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale, additional_keys,
                     additional_values, return_lse, backend, mode)


def na2d(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrSeq, dilation: IntOrSeq = 1,
    stride: IntOrSeq = 1, is_causal: BoolOrSeq = False, rpb: torch.Tensor | None = None, scale: float | None = None,
    additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None,
    return_lse: bool = False, backend: str | None = None, mode: str = "natten",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused 2D neighborhood attention (NATTEN semantics).

    Args:
        query: ``[B, X, Y, heads, dim]``.
        key, value: ``[B, X, Y, kv_heads, dim]`` (``kv_heads`` divides ``heads``; value may have another dim).
        kernel_size, dilation, stride: int or one per axis; ``kernel_size * dilation <= size``,
            ``stride <= kernel_size``; even kernels allowed.
        is_causal: bool or one per axis.
        rpb: relative position bias ``[heads, 2k_x - 1, 2k_y - 1]`` (NATTEN <= 0.17 semantics).
        scale: logit scale (default ``dim ** -0.5``).
        additional_keys, additional_values: ``[B, n_extra, kv_heads, dim]`` tokens every query also attends.
        return_lse: also return the logsumexp ``[B, X, Y, heads]``.
        backend: ``None`` (automatic), or a name from :func:`available_backends`.
        mode: ``"natten"`` (windows shifted inward at borders) or ``"zeropad"`` (centred, out-of-map keys
            masked; TransNeXt's sliding window).

    Returns:
        ``[B, X, Y, heads, dim_v]`` (and the logsumexp when ``return_lse``).

    Example::

        >>> q = k = v = torch.randn(1, 14, 14, 2, 16)
        >>> na2d(q, k, v, kernel_size=7).shape
        torch.Size([1, 14, 14, 2, 16])
    """
    return _na_fused(2, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale, additional_keys,
                     additional_values, return_lse, backend, mode)


def na3d(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, scale=None,
         additional_keys=None, additional_values=None, return_lse=False, backend=None, mode="natten"):
    """3D neighborhood attention; see :func:`na2d` (layout ``[B, X, Y, Z, heads, dim]``)."""
    return _na_fused(3, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale, additional_keys,
                     additional_values, return_lse, backend, mode)


# -- unfused (NATTEN <= 0.17 layout) ----------------------------------------------------------------------


def _na_qk(ndim, query, key, kernel_size, dilation, rpb, is_causal, backend, mode):
    if query.ndim != ndim + 3 or query.shape != key.shape:
        raise ValueError(f"na{ndim}d_qk expects query and key [B, heads, *{ndim} spatial, dim] of equal shape, got "
                         f"{list(query.shape)} and {list(key.shape)}")
    if query.dtype != key.dtype:
        raise ValueError(f"query and key dtypes differ: {query.dtype}, {key.dtype}")
    p = normalize_params(query.shape[2:-1], kernel_size, dilation, 1, is_causal, mode)
    _check_rpb(rpb, query.shape[1], p.kernel)
    chosen = _select(backend, "qk", query, key, rpb=rpb, kernel=p.kernel, mode=p.mode)
    return chosen.qk(query, key, p.kernel, p.dilation, p.causal, rpb, p.mode)


def _na_av(ndim, attn, value, kernel_size, dilation, is_causal, backend, mode):
    if value.ndim != ndim + 3:
        raise ValueError(f"na{ndim}d_av expects value [B, heads, *{ndim} spatial, dim], got {list(value.shape)}")
    p = normalize_params(value.shape[2:-1], kernel_size, dilation, 1, is_causal, mode)
    expected = (*value.shape[:-1], math.prod(p.kernel))
    if tuple(attn.shape) != expected:
        raise ValueError(f"attention weights must be {list(expected)} for this value and kernel, "
                         f"got {list(attn.shape)}")
    chosen = _select(backend, "av", attn, value, kernel=p.kernel, mode=p.mode)
    return chosen.av(attn, value, p.kernel, p.dilation, p.causal, p.mode)


def na1d_qk(query, key, kernel_size, dilation=1, rpb=None, is_causal=False, backend=None, mode="natten"):
    """Unfused 1D logits ``[B, heads, L, k]``; see :func:`na2d_qk`."""
    return _na_qk(1, query, key, kernel_size, dilation, rpb, is_causal, backend, mode)


def na2d_qk(
    query: torch.Tensor, key: torch.Tensor, kernel_size: IntOrSeq, dilation: IntOrSeq = 1,
    rpb: torch.Tensor | None = None, is_causal: BoolOrSeq = False, backend: str | None = None, mode: str = "natten",
) -> torch.Tensor:
    """Unfused 2D logits, NATTEN <= 0.17 compatible.

    Args:
        query: ``[B, heads, X, Y, dim]`` (already scaled, as the old modules did); key likewise.
        rpb: ``[heads, 2k_x - 1, 2k_y - 1]`` added to each logit.

    Returns:
        ``[B, heads, X, Y, k_x * k_y]``; slot ``(a, b)`` (row-major) is the key at ``start + (a, b) * dilation``
        relative to the window start, so at borders a slot is not the same offset as in the interior.
        Causal (and, in ``zeropad`` mode, out-of-map) slots are ``-inf``.
    """
    return _na_qk(2, query, key, kernel_size, dilation, rpb, is_causal, backend, mode)


def na3d_qk(query, key, kernel_size, dilation=1, rpb=None, is_causal=False, backend=None, mode="natten"):
    """Unfused 3D logits ``[B, heads, X, Y, Z, prod(k)]``; see :func:`na2d_qk`."""
    return _na_qk(3, query, key, kernel_size, dilation, rpb, is_causal, backend, mode)


def na1d_av(attn, value, kernel_size, dilation=1, is_causal=False, backend=None, mode="natten"):
    """Unfused 1D aggregation; see :func:`na2d_av`."""
    return _na_av(1, attn, value, kernel_size, dilation, is_causal, backend, mode)


def na2d_av(
    attn: torch.Tensor, value: torch.Tensor, kernel_size: IntOrSeq, dilation: IntOrSeq = 1,
    is_causal: BoolOrSeq = False, backend: str | None = None, mode: str = "natten",
) -> torch.Tensor:
    """Unfused 2D aggregation: ``out[q] = sum_slot attn[q, slot] * value[key(q, slot)]``.

    Args:
        attn: ``[B, heads, X, Y, k_x * k_y]`` in :func:`na2d_qk`'s slot order (any weights, not only softmax).
        value: ``[B, heads, X, Y, dim]``.

    Returns:
        ``[B, heads, X, Y, dim]``.
    """
    return _na_av(2, attn, value, kernel_size, dilation, is_causal, backend, mode)


def na3d_av(attn, value, kernel_size, dilation=1, is_causal=False, backend=None, mode="natten"):
    """Unfused 3D aggregation; see :func:`na2d_av`."""
    return _na_av(3, attn, value, kernel_size, dilation, is_causal, backend, mode)
