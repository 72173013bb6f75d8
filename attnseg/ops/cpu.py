"""The ``cpu`` backend: fused and unfused neighborhood attention in eager PyTorch with O(N * K) memory.

Keys and values of each query's window are gathered through the window tables a chunk of slots at a time
(``[B*H, N, chunk, D]``, sized to stay under ``_CHUNK_BYTES``), so memory is the ``[B*H, N, K]`` attention
weights plus one bounded chunk, never the ``[N, K, D]`` window copies of an unfold and never ``N^2``.
Backward is written out (softmax backward, gathers for dQ and dP, ``index_add_`` scatters for dK and dV
and the position-bias gradient) and saves only q, k, v and the weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnseg.ops.windows import axis_table, rpb_table, window_table

__all__ = ["na_fused_cpu", "na_qk_cpu", "na_av_cpu", "can_run_cpu"]

_CHUNK_BYTES = 32 * 2**20


def can_run_cpu(*tensors: torch.Tensor, op: str = "fused", **_: Any) -> str | None:
    if any(t.device.type != "cpu" for t in tensors):
        return "inputs are not on the CPU"
    if any(t.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16) for t in tensors):
        return f"unsupported dtype {tensors[0].dtype}"
    return None


def _chunks(n: int, k: int, d: int, bh: int, itemsize: int) -> list[tuple[int, int]]:
    per_slot = max(n * d * bh * itemsize, 1)
    c = max(1, min(k, _CHUNK_BYTES // per_slot))
    return [(a, min(a + c, k)) for a in range(0, k, c)]


def _window(t: torch.Tensor, key: torch.Tensor, a0: int, a1: int) -> torch.Tensor:
    """Rows of ``t [BH, N, D]`` at the slots ``a0:a1`` of every query: ``[BH, N, a1 - a0, D]``.

    ``index_select`` on a flat index is several times faster on CPU than advanced indexing with a 2-D index.
    """
    idx = key[:, a0:a1].reshape(-1)
    return t.index_select(1, idx).view(t.shape[0], key.shape[0], a1 - a0, t.shape[-1])


# -- chunked primitives shared by the fused and the unfused ops ---------------------------------------------


def _window_logits(q: torch.Tensor, k: torch.Tensor, key: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``[BH, N, K]``: dot product of each query with each of its window keys."""
    bh, n, d = q.shape
    kk = key.shape[1]
    logits = torch.empty(bh, n, kk, dtype=acc)
    for a0, a1 in _chunks(n, kk, d, bh, q.element_size()):
        logits[..., a0:a1] = torch.einsum("bnd,bncd->bnc", q, _window(k, key, a0, a1)).to(acc)
    return logits


def _window_sum(weights: torch.Tensor, v: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``[BH, N, Dv]``: each query's window values weighted by ``weights [BH, N, K]``."""
    bh, n, kk = weights.shape
    out = torch.zeros(bh, n, v.shape[-1], dtype=weights.dtype)
    for a0, a1 in _chunks(n, kk, v.shape[-1], bh, v.element_size()):
        out += torch.einsum("bnc,bncd->bnd", weights[..., a0:a1], _window(v, key, a0, a1).to(weights.dtype))
    return out


def _window_sum_backward(weights: torch.Tensor, v: torch.Tensor, key: torch.Tensor,
                         grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_window_sum` for ``weights`` and ``v`` (scatter with ``index_add_``)."""
    bh, n, kk = weights.shape
    dv_dim = v.shape[-1]
    dweights = torch.empty_like(weights)
    dv = torch.zeros(v.shape, dtype=weights.dtype)
    for a0, a1 in _chunks(n, kk, dv_dim, bh, 4):
        dweights[..., a0:a1] = torch.einsum("bnd,bncd->bnc", grad, _window(v, key, a0, a1).to(weights.dtype))
        contrib = weights[..., a0:a1, None] * grad[:, :, None, :]  # [BH, N, c, Dv]
        dv.index_add_(1, key[:, a0:a1].reshape(-1), contrib.reshape(bh, -1, dv_dim))
    return dweights, dv


def _window_logits_backward(dlogits: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_window_logits` for ``q`` and ``k``."""
    bh, n, d = q.shape
    acc = dlogits.dtype
    dq = torch.zeros(q.shape, dtype=acc)
    dk = torch.zeros(k.shape, dtype=acc)
    qa = q.to(acc)
    for a0, a1 in _chunks(n, key.shape[1], d, bh, 4):
        ds = dlogits[..., a0:a1]
        dq += torch.einsum("bnc,bncd->bnd", ds, _window(k, key, a0, a1).to(acc))
        dk.index_add_(1, key[:, a0:a1].reshape(-1), (ds[..., None] * qa[:, :, None, :]).reshape(bh, -1, d))
    return dq, dk


class _FusedNA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, key, valid, scale, ak, av):  # noqa: ANN001 - autograd signature
        # q, k: [BH, N, D]; v: [BH, N, Dv]; bias: [BH or 1, N, K] or None; key/valid: [N, K];
        # ak: [BH, E, D] / av: [BH, E, Dv] or None.
        acc = torch.promote_types(q.dtype, torch.float32)
        logits = _window_logits(q, k, key, acc).mul_(scale)
        if bias is not None:
            logits.add_(bias)
        logits.masked_fill_(~valid, float("-inf"))
        extra = (torch.einsum("bnd,bed->bne", q, ak).to(acc) * scale) if ak is not None else None
        row_max = logits.amax(-1, keepdim=True)
        if extra is not None:
            row_max = torch.maximum(row_max, extra.amax(-1, keepdim=True))
        probs = logits.sub_(row_max).exp_()  # in place: the logits buffer becomes the weights
        denom = probs.sum(-1, keepdim=True)
        if extra is not None:
            extra = torch.exp(extra - row_max)
            denom = denom + extra.sum(-1, keepdim=True)
            extra = extra / denom
        probs.div_(denom)
        lse = (row_max + denom.log()).squeeze(-1)
        out = _window_sum(probs, v, key)
        if extra is not None:
            out += torch.einsum("bne,bed->bnd", extra, av.to(acc))
        ctx.save_for_backward(q, k, v, key, probs, ak, av, extra)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.bias_batched = bias is not None and bias.shape[0] != 1
        return out.to(v.dtype), lse.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # noqa: ANN001
        q, k, v, key, probs, ak, av, extra = ctx.saved_tensors
        scale = ctx.scale
        acc = probs.dtype
        go = grad_out.to(acc)
        dprobs, dv = _window_sum_backward(probs, v, key, go)
        row = torch.einsum("bnk,bnk->bn", probs, dprobs).unsqueeze(-1)
        dextra = None
        if extra is not None:
            dextra_p = torch.einsum("bnd,bed->bne", go, av.to(acc))
            row = row + (extra * dextra_p).sum(-1, keepdim=True)
            dextra = extra * (dextra_p - row)
        dlogits = dprobs.sub_(row).mul_(probs)  # softmax backward in place; masked slots have probs 0
        if grad_lse is not None:
            dlogits.addcmul_(probs, grad_lse.to(acc)[..., None])
            if dextra is not None:
                dextra = dextra + extra * grad_lse.to(acc)[..., None]
        dq, dk = _window_logits_backward(dlogits, q, k, key)
        dak = dav = None
        if extra is not None:
            dq += torch.einsum("bne,bed->bnd", dextra, ak.to(acc))
            dak = (torch.einsum("bne,bnd->bed", dextra, q.to(acc)) * scale).to(ak.dtype)
            dav = torch.einsum("bne,bnd->bed", extra, go).to(av.dtype)
        dbias = None
        if ctx.has_bias:
            dbias = dlogits if ctx.bias_batched else dlogits.sum(0, keepdim=True)
        return ((dq * scale).to(q.dtype), (dk * scale).to(k.dtype), dv.to(v.dtype), dbias, None, None, None, dak,
                dav)


class _WindowLogits(torch.autograd.Function):
    """Unfused ``qk``: ``[BH, N, D] x [BH, N, D] -> [BH, N, K]`` (no mask, no bias; added outside)."""

    @staticmethod
    def forward(ctx, q, k, key):  # noqa: ANN001
        ctx.save_for_backward(q, k, key)
        return _window_logits(q, k, key, q.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        q, k, key = ctx.saved_tensors
        dq, dk = _window_logits_backward(grad, q, k, key)
        return dq.to(q.dtype), dk.to(k.dtype), None


class _WindowSum(torch.autograd.Function):
    """Unfused ``av``: ``[BH, N, K] x [BH, N, Dv] -> [BH, N, Dv]``."""

    @staticmethod
    def forward(ctx, weights, v, key):  # noqa: ANN001
        ctx.save_for_backward(weights, v, key)
        return _window_sum(weights, v, key).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        weights, v, key = ctx.saved_tensors
        dweights, dv = _window_sum_backward(weights, v, key, grad.to(weights.dtype))
        return dweights, dv.to(v.dtype), None


def na_qk_cpu(q: torch.Tensor, k: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
              causal: tuple[bool, ...], rpb: torch.Tensor | None, mode: str = "natten") -> torch.Tensor:
    """Heads-first unfused logits on the CPU; same contract as :func:`reference.na_qk_reference`."""
    batch, heads, *spatial, dim = q.shape
    n = math.prod(spatial)
    ones = (1,) * len(spatial)
    key, valid = window_table(tuple(spatial), kernel, dilation, ones, causal, mode)
    logits = _WindowLogits.apply(q.reshape(batch * heads, n, dim), k.reshape(batch * heads, n, dim), key)
    logits = logits.view(batch, heads, n, key.shape[1])
    if rpb is not None:
        idx = rpb_table(tuple(spatial), kernel, dilation, ones, causal, mode)
        logits = logits + rpb.reshape(heads, -1)[:, idx].to(logits.dtype)
    return logits.masked_fill(~valid, float("-inf")).reshape(batch, heads, *spatial, key.shape[1])


def na_av_cpu(attn: torch.Tensor, v: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
              causal: tuple[bool, ...], mode: str = "natten") -> torch.Tensor:
    """Heads-first unfused aggregation on the CPU; same contract as :func:`reference.na_av_reference`."""
    batch, heads, *spatial, dim = v.shape
    n = math.prod(spatial)
    key, valid = window_table(tuple(spatial), kernel, dilation, (1,) * len(spatial), causal, mode)
    weights = attn.reshape(batch * heads, n, key.shape[1]).masked_fill(~valid, 0)
    out = _WindowSum.apply(weights, v.reshape(batch * heads, n, dim), key)
    return out.reshape(batch, heads, *spatial, dim)


# -- 2D halo tiles: the fast path for NATTEN-style windows ---------------------------------------------------

_HALO_TILE = 8
_HALO_MAX_BYTES = 512 * 2**20


def _halo_axis(length: int, kernel: int, tile: int) -> tuple[torch.Tensor, ...]:
    """Tiles of one axis: key rows of each tile's box, (clamped) query coords, in-box slot offsets, RPB offsets.

    With NATTEN windows (stride 1, not causal) the windows of ``tile`` consecutive queries lie inside a box of
    ``min(tile + kernel - 1, length)`` keys starting at ``clamp(first - kernel // 2, 0, length - box)``.
    """
    key, _ = axis_table(length, kernel)
    n_tiles = math.ceil(length / tile)
    box = min(tile + kernel - 1, length)
    first = torch.arange(n_tiles) * tile
    box_start = torch.clamp(first - kernel // 2, min=0).clamp(max=length - box)
    rows = box_start[:, None] + torch.arange(box)  # [n_tiles, box]
    queries = (first[:, None] + torch.arange(tile)).clamp(max=length - 1)  # [n_tiles, tile]; padding repeats
    in_box = key[queries] - box_start[:, None, None]  # [n_tiles, tile, kernel]
    rel = key[queries] - queries[..., None] + kernel - 1  # RPB offsets
    return rows, queries, in_box, rel


def _halo_na2d(q, k, v, kernel, rpb, scale, ak, av, tile=_HALO_TILE):  # noqa: ANN001 - internal
    """Undilated 2D NATTEN attention by tiles: one GEMM per tile against its key box, then the K valid logits.

    ``q, k, v``: ``[B, heads, X, Y, D]``; ``ak, av``: ``[B, heads, E, D]`` or None. Returns ``(out, lse)``.
    Costs ``((tile + k - 1) / tile)^2`` times the useful FLOPs but runs as batched GEMMs (several times faster
    than gathers on CPU); autograd differentiates it.
    """
    batch, heads, size_x, size_y, dim = q.shape
    kx, ky = kernel
    rows_x, qx, inx, relx = _halo_axis(size_x, kx, tile)
    rows_y, qy, iny, rely = _halo_axis(size_y, ky, tile)
    tx, ty, bx, by = rows_x.shape[0], rows_y.shape[0], rows_x.shape[1], rows_y.shape[1]
    q_tiles = q[:, :, qx[:, None, :, None], qy[None, :, None, :]].reshape(batch, heads, tx, ty, tile * tile, dim)
    box = (rows_x[:, None, :, None], rows_y[None, :, None, :])
    k_box = k[:, :, box[0], box[1]].reshape(batch, heads, tx, ty, bx * by, dim)
    v_box = v[:, :, box[0], box[1]].reshape(batch, heads, tx, ty, bx * by, v.shape[-1])
    scores = (q_tiles @ k_box.transpose(-1, -2)) * scale  # [B, h, tx, ty, T*T, bx*by]
    idx = (inx[:, None, :, None, :, None] * by + iny[None, :, None, :, None, :]).reshape(tx, ty, tile * tile, kx * ky)
    idx = idx.expand(batch, heads, -1, -1, -1, -1)
    logits = scores.gather(-1, idx)  # [B, h, tx, ty, T*T, K]
    if rpb is not None:
        ridx = relx[:, None, :, None, :, None] * (2 * ky - 1) + rely[None, :, None, :, None, :]
        logits = logits + rpb.reshape(heads, -1)[:, ridx.reshape(tx, ty, tile * tile, kx * ky)].to(logits.dtype)
    if ak is not None:
        extra = (q_tiles @ ak[:, :, None, None].transpose(-1, -2)) * scale  # [B, h, tx, ty, T*T, E]
        logits = torch.cat([logits, extra], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None])
    kk = kx * ky
    weights = torch.zeros_like(scores).scatter_(-1, idx, probs[..., :kk])
    out = weights @ v_box  # [B, h, tx, ty, T*T, Dv]
    if ak is not None:
        out = out + probs[..., kk:] @ av[:, :, None, None]

    def untile(t: torch.Tensor) -> torch.Tensor:  # [B, h, tx, ty, T*T, ...] -> [B, h, X, Y, ...]
        rest = t.shape[5:]
        t = t.reshape(batch, heads, tx, ty, tile, tile, *rest).transpose(3, 4)
        return t.reshape(batch, heads, tx * tile, ty * tile, *rest)[:, :, :size_x, :size_y]

    return untile(out), untile(lse)


def _halo_applies(spatial, p_stride, causal, mode, q: torch.Tensor, kernel) -> bool:  # noqa: ANN001
    if len(spatial) != 2 or mode != "natten" or any(causal) or any(s != 1 for s in p_stride):
        return False
    box = [min(_HALO_TILE + k - 1, n) for k, n in zip(kernel, spatial)]
    scores_bytes = q.shape[0] * q.shape[-2] * math.prod(spatial) * math.prod(box) * 4 * 3  # scores, weights, grads
    return scores_bytes <= _HALO_MAX_BYTES and q.dtype in (torch.float32, torch.float64)


def na_fused_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
    stride: tuple[int, ...], causal: tuple[bool, ...], rpb: torch.Tensor | None, scale: float,
    additional_keys: torch.Tensor | None, additional_values: torch.Tensor | None, return_lse: bool,
    mode: str = "natten",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Heads-last fused neighborhood attention on the CPU; same contract as the reference backend."""
    batch, *spatial, heads, dim = q.shape
    kv_heads, dim_v = k.shape[-2], v.shape[-1]
    n = math.prod(spatial)
    rep = heads // kv_heads
    shape = tuple(spatial)

    def flat(t: torch.Tensor, h: int, dd: int) -> torch.Tensor:  # [B, *S, h, dd] -> [B*H, N, dd]
        t = t.reshape(batch, n, h, dd).transpose(1, 2)
        if h != heads:
            t = t.repeat_interleave(rep, dim=1)
        return t.reshape(batch * heads, n, dd).contiguous()

    if _halo_applies(shape, stride, causal, mode, q, kernel):
        return _halo_fused(q, k, v, kernel, dilation, rpb, scale, additional_keys, additional_values, return_lse)
    key, valid = window_table(shape, kernel, dilation, stride, causal, mode)
    bias = None
    if rpb is not None:
        idx = rpb_table(shape, kernel, dilation, stride, causal, mode)
        table = rpb.reshape(heads, -1).to(torch.promote_types(q.dtype, torch.float32))
        # [H, N, K] -> broadcast over the batch: [B*H, N, K]
        bias = table[:, idx].unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * heads, n, key.shape[1])
    ak = av = None
    if additional_keys is not None:
        e = additional_keys.shape[1]
        ak = additional_keys.transpose(1, 2).repeat_interleave(rep, dim=1).reshape(batch * heads, e, dim)
        av = additional_values.transpose(1, 2).repeat_interleave(rep, dim=1).reshape(batch * heads, e, dim_v)
    out, lse = _FusedNA.apply(flat(q, heads, dim), flat(k, kv_heads, dim), flat(v, kv_heads, dim_v), bias, key,
                              valid, scale, ak, av)
    out = out.reshape(batch, heads, n, dim_v).transpose(1, 2).reshape(batch, *spatial, heads, dim_v)
    if return_lse:
        return out, lse.reshape(batch, heads, n).transpose(1, 2).reshape(batch, *spatial, heads)
    return out


def _halo_fused(q, k, v, kernel, dilation, rpb, scale, additional_keys, additional_values, return_lse):  # noqa: ANN001
    """Heads-last 2D entry of the halo path; dilation runs each dilation sub-lattice as undilated NA."""
    batch, size_x, size_y, heads, dim = q.shape
    rep = heads // k.shape[-2]

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B, X, Y, h', D] -> [B, heads, X, Y, D]
        t = t.permute(0, 3, 1, 2, 4)
        return t.repeat_interleave(rep, dim=1) if t.shape[1] != heads else t

    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    ak = av = None
    if additional_keys is not None:
        ak = additional_keys.transpose(1, 2).repeat_interleave(rep, dim=1)
        av = additional_values.transpose(1, 2).repeat_interleave(rep, dim=1)
    dx, dy = dilation
    if dx == dy == 1:
        out, lse = _halo_na2d(qh, kh, vh, kernel, rpb, scale, ak, av)
    else:
        out = qh.new_zeros(*qh.shape[:-1], v.shape[-1])
        lse = qh.new_zeros(qh.shape[:-1])
        for gx in range(dx):
            for gy in range(dy):
                sub = (slice(None), slice(None), slice(gx, None, dx), slice(gy, None, dy))
                out[sub], lse[sub] = _halo_na2d(qh[sub], kh[sub], vh[sub], kernel, rpb, scale, ak, av)
    out = out.permute(0, 2, 3, 1, 4).to(v.dtype)
    if return_lse:
        return out, lse.permute(0, 2, 3, 1).to(q.dtype)
    return out
