"""The ``cpu`` backend: neighborhood attention in eager PyTorch, fast on CPUs, with bounded memory.

The fused op runs query tiles against the box of keys their windows cover, as batched GEMMs with a window
mask (see the section comment below); memory is the inputs plus one bounded chunk of tiles, never ``N^2``.
The unfused ops gather each query's window keys/values through the window tables a chunk of slots at a time
(``[B*H, N, chunk, D]``, under ``_CHUNK_BYTES``), so their memory is the ``[B*H, N, K]`` weights plus one chunk;
their backward is written out (gathers for the weights, ``index_add_`` scatters for keys and values).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from attnseg.ops.merge import attend_extra_and_merge
from attnseg.ops.windows import axis_bounds, rpb_table, window_table

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


# -- fused: query tiles against their key boxes ------------------------------------------------------------------
#
# Queries are cut into boxes of ``tile`` per axis inside each dilation group; the keys every query of a box can
# see form one box too (window bounds are monotone), so a tile is two small GEMMs against its key box plus a
# mask, the CPU analogue of the Triton kernel. The mask (from the semantic core's ``[lo, hi)`` bounds) makes
# stride, causal windows, even kernels and the zero-padded mode the same code. Costs ``box / prod(kernel)``
# times the useful FLOPs (about 4x for 2D k7) but runs as batched GEMMs, several times faster than gathers.
# Backward recomputes the probabilities per chunk of tiles from the saved logsumexp (flash-style), so memory is
# the inputs plus one bounded chunk.

_TILE = {1: (16,), 2: (4, 8), 3: (4, 4, 4)}
_CHUNK_BYTES_TILED = 48 * 2**20  # scores of one chunk of tiles, all batch * heads
_LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class _AxisTiles:
    """Tiles of one axis (all dilation groups): which coordinates each tile's queries and key box hold."""

    query: torch.Tensor  # [tiles, T] real query coordinate, -1 for padding
    key: torch.Tensor  # [tiles, W] real key coordinate, -1 outside the map
    allowed: torch.Tensor  # [tiles, T, W] the query sees the key
    rel: torch.Tensor  # [tiles, T, W] relative-position-bias offset


@functools.lru_cache(maxsize=256)
def _axis_tiles(length: int, kernel: int, dilation: int, stride: int, causal: bool, mode: str,
                tile: int) -> _AxisTiles:
    lo, hi = axis_bounds(length, kernel, dilation, stride, causal, mode)[:2].long()
    tile = min(tile, -(-length // dilation))
    firsts = [(g, t0) for g in range(dilation) for t0 in range(0, len(range(g, length, dilation)), tile)]
    group_len = torch.tensor([len(range(g, length, dilation)) for g, _ in firsts])
    group = torch.tensor([g for g, _ in firsts])
    i = torch.tensor([t0 for _, t0 in firsts])[:, None] + torch.arange(tile)  # [tiles, T] in-group query
    q_ok = i < group_len[:, None]
    last = torch.minimum(i[:, 0] + tile, group_len) - 1
    box_lo = lo[i[:, 0] * dilation + group]
    width = int((hi[last * dilation + group] - box_lo).max())
    j = box_lo[:, None] + torch.arange(width)  # [tiles, W] in-group key
    k_ok = j < group_len[:, None]
    real_q = torch.where(q_ok, i * dilation + group[:, None], 0)
    allowed = (q_ok[:, :, None] & k_ok[:, None, :] & (lo[real_q][:, :, None] <= j[:, None, :])
               & (j[:, None, :] < hi[real_q][:, :, None]))
    rel = (j[:, None, :] - i[:, :, None] + kernel - 1).clamp(0, 2 * kernel - 2)
    return _AxisTiles(torch.where(q_ok, real_q, -1), torch.where(k_ok, j * dilation + group[:, None], -1),
                      allowed, rel)


def _combine(per_axis: list[torch.Tensor], shape: tuple[int, ...], tiles: list[torch.Tensor]) -> torch.Tensor:
    """Flat indices ``[chunk, prod(T or W)]`` of the tiles ``tiles[a]`` (per-axis tile ids); ``-1`` stays out."""
    rank = len(shape)
    flat = None
    for axis, (table, ids) in enumerate(zip(per_axis, tiles)):
        view = [ids.shape[0]] + [1] * rank
        view[1 + axis] = table.shape[1]
        part = table[ids].view(view)
        step = math.prod(shape[axis + 1:])
        flat = part * step if flat is None else torch.where((flat < 0) | (part < 0), -1, flat + part * step)
    n = math.prod(shape)
    return torch.where(flat < 0, n, flat).reshape(ids.shape[0], -1)  # padding -> the zero row at index n


def _combine_pairs(per_axis: list[torch.Tensor], tiles: list[torch.Tensor], steps: list[int] | None) -> torch.Tensor:
    """``[chunk, prod(T), prod(W)]``: AND of per-axis masks (``steps`` None) or sum of scaled per-axis offsets."""
    rank = len(per_axis)
    out = None
    for axis, (table, ids) in enumerate(zip(per_axis, tiles)):
        view = [ids.shape[0]] + [1] * (2 * rank)
        view[1 + axis], view[1 + rank + axis] = table.shape[1], table.shape[2]
        part = table[ids].view(view)
        if steps is None:
            out = part if out is None else out & part
        else:
            out = part * steps[axis] if out is None else out + part * steps[axis]
    tq = math.prod(t.shape[1] for t in per_axis)
    return out.reshape(out.shape[0], tq, -1)


class _Tiling:
    """All tiles of one call: flat query/key indices and per-chunk masks and bias offsets."""

    def __init__(self, shape, kernel, dilation, stride, causal, mode):  # noqa: ANN001
        self.shape = shape
        self.axes = [_axis_tiles(n, k, d, s, c, mode, t)
                     for n, k, d, s, c, t in zip(shape, kernel, dilation, stride, causal, _TILE[len(shape)])]
        counts = [a.query.shape[0] for a in self.axes]
        self.n_tiles = math.prod(counts)
        self.tile_ids = torch.unravel_index(torch.arange(self.n_tiles), counts)
        self.queries = _combine([a.query for a in self.axes], shape, list(self.tile_ids))  # [tiles, Tq]
        self.keys = _combine([a.key for a in self.axes], shape, list(self.tile_ids))  # [tiles, W]
        self.rel_steps = [math.prod(2 * k - 1 for k in kernel[a + 1:]) for a in range(len(shape))]

    def chunks(self, bh: int) -> list[tuple[int, int]]:
        per_tile = bh * self.queries.shape[1] * self.keys.shape[1] * 4
        step = max(1, _CHUNK_BYTES_TILED // per_tile)
        return [(c, min(c + step, self.n_tiles)) for c in range(0, self.n_tiles, step)]

    def allowed(self, c0: int, c1: int) -> torch.Tensor:
        return _combine_pairs([a.allowed for a in self.axes], [t[c0:c1] for t in self.tile_ids], None)

    def rel(self, c0: int, c1: int) -> torch.Tensor:
        return _combine_pairs([a.rel for a in self.axes], [t[c0:c1] for t in self.tile_ids], self.rel_steps)


def _tile_scores(tiling: _Tiling, c0: int, c1: int, qs: torch.Tensor, kb: torch.Tensor,
                 rpb: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Masked logits in log2 units ``[BH, chunk, Tq, W]`` of a chunk of tiles (``qs`` scaled by scale * log2 e).

    Base 2 because ``exp2`` is several times faster than ``exp`` on CPUs, whose ``exp`` takes a slow path for the
    ``-inf`` of masked logits.
    """
    scores = qs @ kb.transpose(-1, -2)
    if rpb is not None:
        heads = rpb.shape[0]
        bias = rpb.reshape(heads, -1)[:, tiling.rel(c0, c1)].to(scores.dtype)  # [H, chunk, Tq, W]
        scores.view(batch, heads, *scores.shape[1:]).add_(bias, alpha=_LOG2E)
    return scores.masked_fill_(~tiling.allowed(c0, c1), float("-inf"))


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t [BH, N + 1, D]`` at ``index [chunk, M]`` -> ``[BH, chunk, M, D]``."""
    return t.index_select(1, index.reshape(-1)).view(t.shape[0], *index.shape, t.shape[-1])


def _scatter_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``target [N + 1, BH, D] += rows [BH, chunk, M, D]`` at ``index [chunk, M]``.

    Adding whole ``BH * D`` rows along dim 0 is several times faster than ``index_add_`` along dim 1.
    """
    target.index_add_(0, index.reshape(-1), rows.permute(1, 2, 0, 3).reshape(-1, *target.shape[1:]))


class _TiledNA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, tiling, scale, batch):  # noqa: ANN001 - autograd signature
        # q, k: [BH, N + 1, D], v: [BH, N + 1, Dv] with a zero row at index N (where padding points)
        bh, n1, dim_v = v.shape[0], v.shape[1], v.shape[-1]
        out = torch.empty(bh, n1, dim_v, dtype=q.dtype)
        lse = torch.empty(bh, n1, dtype=q.dtype)
        chunks = tiling.chunks(bh)
        kept = (None,) * 4
        for c0, c1 in chunks:
            qi, ki = tiling.queries[c0:c1], tiling.keys[c0:c1]
            qs, kb, vb = _rows(q, qi) * (scale * _LOG2E), _rows(k, ki), _rows(v, ki)
            probs = _tile_scores(tiling, c0, c1, qs, kb, rpb, batch)
            row_max = probs.amax(-1, keepdim=True).nan_to_num_(0.0, 0.0, 0.0)  # padding rows: all -inf
            probs.sub_(row_max).exp2_()
            denom = probs.sum(-1, keepdim=True)
            denom.masked_fill_(denom == 0, 1.0)
            probs.div_(denom)
            out.index_copy_(1, qi.reshape(-1), (probs @ vb).view(bh, -1, dim_v))
            lse.index_copy_(1, qi.reshape(-1), ((row_max + denom.log2()) / _LOG2E).view(bh, -1))
            if len(chunks) == 1:  # one chunk: keep the tiles and probabilities instead of recomputing them
                kept = (qs, kb, vb, probs)
        ctx.save_for_backward(q, k, v, out, lse, rpb, *kept)
        ctx.tiling, ctx.scale, ctx.batch = tiling, scale, batch
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # noqa: ANN001
        q, k, v, out, lse, rpb, *kept = ctx.saved_tensors
        tiling, scale, batch = ctx.tiling, ctx.scale, ctx.batch
        bh = q.shape[0]
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse  # d lse / d logit = p: folds into the softmax backward's row term
        # gradients accumulate key-major ([N + 1, BH, D]) for fast row scatters
        dq, dk, dv = (torch.zeros(t.shape[1], bh, t.shape[2], dtype=t.dtype) for t in (q, k, v))
        drpb = torch.zeros(rpb.shape[0], rpb[0].numel(), dtype=q.dtype) if ctx.needs_input_grad[3] else None
        for c0, c1 in tiling.chunks(bh):
            qi, ki = tiling.queries[c0:c1], tiling.keys[c0:c1]
            if kept[0] is not None:
                qs, kb, vb, probs = kept
            else:
                qs, kb, vb = _rows(q, qi) * (scale * _LOG2E), _rows(k, ki), _rows(v, ki)
                probs = _tile_scores(tiling, c0, c1, qs, kb, rpb, batch)
                probs.sub_(_rows(lse[..., None], qi), alpha=_LOG2E).exp2_()
            go = _rows(grad_out, qi)
            dlogits = (go @ vb.transpose(-1, -2)).sub_(_rows(delta[..., None], qi)).mul_(probs)  # natural units
            _scatter_rows(dq, qi, dlogits @ kb)
            _scatter_rows(dk, ki, dlogits.transpose(-1, -2) @ qs)
            _scatter_rows(dv, ki, probs.transpose(-1, -2) @ go)
            if drpb is not None:
                per_head = dlogits.view(batch, rpb.shape[0], -1).sum(0)
                drpb.index_add_(1, tiling.rel(c0, c1).reshape(-1), per_head)
        dq = dq.transpose(0, 1).mul_(scale)
        dk = dk.transpose(0, 1).div_(_LOG2E)  # qs carried log2 e
        return dq, dk, dv.transpose(0, 1), (drpb.view(rpb.shape) if drpb is not None else None), None, None, None


def na_fused_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
    stride: tuple[int, ...], causal: tuple[bool, ...], rpb: torch.Tensor | None, scale: float,
    additional_keys: torch.Tensor | None, additional_values: torch.Tensor | None, return_lse: bool,
    mode: str = "natten",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Heads-last fused neighborhood attention on the CPU; same contract as the reference backend."""
    batch, *spatial, heads, dim = q.shape
    dim_v = v.shape[-1]
    n = math.prod(spatial)
    acc = torch.promote_types(q.dtype, torch.float32)  # half precision computes in fp32 on the CPU
    tiling = _Tiling(tuple(spatial), kernel, dilation, stride, causal, mode)

    def flat(t: torch.Tensor) -> torch.Tensor:  # [B, *S, h, dd] -> [B*heads, N + 1, dd], zero row last
        h, dd = t.shape[-2:]
        t = t.reshape(batch, n, h, dd).transpose(1, 2)
        if h != heads:
            t = t.repeat_interleave(heads // h, dim=1)
        return torch.cat([t, t.new_zeros(batch, heads, 1, dd)], dim=2).reshape(batch * heads, n + 1, dd).to(acc)

    rpb_acc = rpb.to(acc) if rpb is not None else None
    out, lse = _TiledNA.apply(flat(q), flat(k), flat(v), rpb_acc, tiling, scale, batch)
    out = out[:, :n].reshape(batch, heads, n, dim_v).transpose(1, 2).reshape(batch, *spatial, heads, dim_v)
    lse = lse[:, :n].reshape(batch, heads, n).transpose(1, 2).reshape(batch, *spatial, heads)
    if additional_keys is not None:
        out, lse = attend_extra_and_merge(q, out, lse, additional_keys, additional_values, scale)
    out = out.to(v.dtype)
    if return_lse:
        return out, lse.to(q.dtype)
    return out
