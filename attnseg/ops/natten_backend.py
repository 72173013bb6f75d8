"""The ``natten`` backend: hand fused calls to an installed CUDA build of NATTEN >= 0.20 when it can run them.

NATTEN's fused kernels (CUTLASS / Hopper / Blackwell FNA) are the fastest neighborhood attention on NVIDIA
GPUs, with the same layout (``[B, *spatial, heads, dim]``), window semantics, GQA and extra-key handling as
ours. It has no relative position bias (dropped in 0.20), no zero-padded window mode, no unfused ops, needs
``kernel_size >= 2`` and equal query/value head dims, and runs nothing on CPU without Flex; calls outside that
fall through to the next backend.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

__all__ = ["can_run_natten", "na_fused_natten", "natten_module"]

_MIN_VERSION = (0, 20)


@functools.lru_cache(maxsize=1)
def natten_module() -> Any | None:
    """The imported ``natten`` package if a usable version (>= 0.20, with CUDA kernels) is installed."""
    try:
        natten = importlib.import_module("natten")
    except ImportError:
        return None
    version = tuple(int(p) for p in str(getattr(natten, "__version__", "0.0")).split(".")[:2] if p.isdigit())
    if version < _MIN_VERSION or not hasattr(natten, "na2d"):
        return None
    return natten


def can_run_natten(*tensors: torch.Tensor, op: str = "fused", rpb: torch.Tensor | None = None,
                   kernel: tuple[int, ...] = (), mode: str = "natten", **_: Any) -> str | None:
    if natten_module() is None:
        return "natten >= 0.20 is not installed"
    if op != "fused":
        return "natten >= 0.20 has no unfused ops"
    if rpb is not None:
        return "natten >= 0.20 has no relative position bias"
    if mode != "natten":
        return f"natten has no {mode!r} window mode"
    if any(k < 2 for k in kernel):
        return f"natten needs kernel_size >= 2, got {list(kernel)}"
    if len(tensors) >= 3 and tensors[2].shape[-1] != tensors[0].shape[-1]:
        return "natten needs equal query and value head dims"
    if any(t.device.type != "cuda" for t in tensors):
        return "natten is only used for CUDA tensors"
    if any(t.dtype not in (torch.float16, torch.bfloat16, torch.float32) for t in tensors):
        return f"unsupported dtype {tensors[0].dtype}"
    return None


def na_fused_natten(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
    stride: tuple[int, ...], causal: tuple[bool, ...], rpb: torch.Tensor | None, scale: float,
    additional_keys: torch.Tensor | None, additional_values: torch.Tensor | None, return_lse: bool,
    mode: str = "natten",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Heads-last fused neighborhood attention through ``natten.na{1,2,3}d``; same contract as the reference."""
    if rpb is not None or mode != "natten":
        raise ValueError("the natten backend runs neither rpb nor the zeropad mode")
    natten = natten_module()
    fn = getattr(natten, f"na{q.ndim - 3}d")
    rep = q.shape[-2] // k.shape[-2]
    if rep > 1:  # not every NATTEN kernel takes fewer key/value heads; repeating is always correct
        k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)
        if additional_keys is not None:
            additional_keys = additional_keys.repeat_interleave(rep, dim=-2)
            additional_values = additional_values.repeat_interleave(rep, dim=-2)
    return fn(q, k, v, kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal, scale=scale,
              additional_keys=additional_keys, additional_values=additional_values, return_lse=return_lse)
