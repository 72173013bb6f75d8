"""The ``reference`` backend: the oracle every other backend is tested against.

Fused attention builds a dense ``[N, N]`` boolean mask (and additive bias) from the window tables and
runs an explicit softmax attention, so it is O(N^2) in memory: meant for tests and small maps. The unfused
ops gather each query's window keys/values by the tables (O(N * K * D) memory). Both are plain autograd.
"""

from __future__ import annotations

import math

import torch

from attnseg.ops.windows import rpb_table, window_table

__all__ = ["na_fused_reference", "na_qk_reference", "na_av_reference"]


def _dense_mask_and_bias(
    shape: tuple[int, ...], kernel, dilation, stride, causal, mode: str, rpb: torch.Tensor | None,
    device: torch.device, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    key, valid = window_table(shape, kernel, dilation, stride, causal, mode, device=device)
    n = key.shape[0]
    hits = torch.zeros(n, n, dtype=torch.int32, device=device)
    hits.scatter_add_(1, key, valid.int())
    mask = hits > 0
    bias = None
    if rpb is not None:
        heads = rpb.shape[0]
        idx = rpb_table(shape, kernel, dilation, stride, causal, mode).to(device)  # [N, K]
        values = rpb.reshape(heads, -1)[:, idx] * valid  # [H, N, K]
        bias = torch.zeros(heads, n, n, device=device, dtype=dtype)
        bias = bias.scatter_add(2, key.expand(heads, -1, -1), values.to(dtype))
    return mask, bias


def na_fused_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
    stride: tuple[int, ...], causal: tuple[bool, ...], rpb: torch.Tensor | None, scale: float,
    additional_keys: torch.Tensor | None, additional_values: torch.Tensor | None, return_lse: bool,
    mode: str = "natten",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Heads-last fused neighborhood attention; see :func:`attnseg.ops.na2d` for the arguments."""
    batch, *spatial, heads, dim = q.shape
    kv_heads, dim_v = k.shape[-2], v.shape[-1]
    n = math.prod(spatial)
    rep = heads // kv_heads
    qf = q.reshape(batch, n, heads, dim).transpose(1, 2)  # [B, H, N, D]
    kf = k.reshape(batch, n, kv_heads, dim).transpose(1, 2).repeat_interleave(rep, dim=1)
    vf = v.reshape(batch, n, kv_heads, dim_v).transpose(1, 2).repeat_interleave(rep, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32, fp64 stays fp64
    mask, bias = _dense_mask_and_bias(tuple(spatial), kernel, dilation, stride, causal, mode, rpb, q.device, acc)
    logits = (qf @ kf.transpose(-1, -2)).to(acc) * scale  # [B, H, N, N]
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~mask, float("-inf"))
    if additional_keys is not None:
        ak = additional_keys.transpose(1, 2).repeat_interleave(rep, dim=1)  # [B, H, E, D]
        av = additional_values.transpose(1, 2).repeat_interleave(rep, dim=1)
        logits = torch.cat([logits, (qf @ ak.transpose(-1, -2)).to(acc) * scale], dim=-1)
        vf = torch.cat([vf, av], dim=2)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, H, N, 1]
    probs = torch.exp(logits - lse).to(v.dtype)
    out = (probs @ vf).transpose(1, 2).reshape(batch, *spatial, heads, dim_v)
    if return_lse:
        return out, lse.squeeze(-1).transpose(1, 2).reshape(batch, *spatial, heads).to(q.dtype)
    return out


def na_qk_reference(
    q: torch.Tensor, k: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
    causal: tuple[bool, ...], rpb: torch.Tensor | None, mode: str = "natten",
) -> torch.Tensor:
    """Heads-first ``[B, H, *S, D]`` -> logits ``[B, H, *S, prod(kernel)]`` (invalid slots ``-inf``)."""
    batch, heads, *spatial, dim = q.shape
    n = math.prod(spatial)
    ones = (1,) * len(spatial)
    key, valid = window_table(tuple(spatial), kernel, dilation, ones, causal, mode, device=q.device)
    kw = k.reshape(batch, heads, n, dim)[:, :, key]  # [B, H, N, K, D]
    logits = (q.reshape(batch, heads, n, 1, dim) * kw).sum(-1)  # [B, H, N, K]
    if rpb is not None:
        idx = rpb_table(tuple(spatial), kernel, dilation, ones, causal, mode).to(q.device)
        logits = logits + rpb.reshape(heads, -1)[:, idx].to(logits.dtype)
    logits = logits.masked_fill(~valid, float("-inf"))
    return logits.reshape(batch, heads, *spatial, key.shape[1])


def na_av_reference(
    attn: torch.Tensor, v: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
    causal: tuple[bool, ...], mode: str = "natten",
) -> torch.Tensor:
    """Weights ``[B, H, *S, K]`` and values ``[B, H, *S, D]`` -> ``[B, H, *S, D]`` (invalid slots skipped)."""
    batch, heads, *spatial, dim = v.shape
    n = math.prod(spatial)
    key, valid = window_table(tuple(spatial), kernel, dilation, (1,) * len(spatial), causal, mode,
                              device=v.device)
    vw = v.reshape(batch, heads, n, dim)[:, :, key]  # [B, H, N, K, D]
    weights = attn.reshape(batch, heads, n, key.shape[1]).masked_fill(~valid, 0)
    return (weights.unsqueeze(-1) * vw).sum(-2).reshape(batch, heads, *spatial, dim)
