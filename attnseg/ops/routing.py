"""Region-routed attention: each query region attends the union of its top-k routed key regions.

The operator of BiFormer's bi-level routing attention. The official code gathers the keys and values of the
``k`` routed regions for every query region (``torch.gather`` on an expanded view), a ``k``-fold copy of
K and V whose backward is a scatter of the same size (rayleizhu/BiFormer issues #21 and #50: ~100 GB for a
600x500 map). Here the routed regions are visited a chunk of slots at a time with an online softmax, so the
extra memory is one bounded chunk; the backward recomputes the probabilities from the saved logsumexp and
scatters key/value gradients region by region (``index_add_``). Same math, so the same outputs up to float
rounding.
"""

from __future__ import annotations

import torch

__all__ = ["region_routed_attention"]

_CHUNK_BYTES = 32 * 2**20  # gathered keys + values + logits of one chunk of routed slots


def _slot_chunks(bp: int, heads: int, width: int, dim: int, dim_v: int, topk: int, itemsize: int) -> list[tuple[int, int]]:
    per_slot = bp * heads * width * (dim + dim_v + width) * itemsize
    step = max(1, min(topk, _CHUNK_BYTES // max(per_slot, 1)))
    return [(t, min(t + step, topk)) for t in range(0, topk, step)]


def _gather(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Regions ``t [BP, M, W, C]`` at ``slots [BP, c]`` -> keys of all c regions per row ``[BP, M, c*W, C]``."""
    bp, c = slots.shape
    g = t.index_select(0, slots.reshape(-1)).view(bp, c, *t.shape[1:])  # [BP, c, M, W, C]
    return g.transpose(1, 2).reshape(bp, t.shape[1], c * t.shape[2], t.shape[3])


def _scatter(target: torch.Tensor, slots: torch.Tensor, grad: torch.Tensor) -> None:
    """``target [BP, M, W, C] += grad [BP, M, c*W, C]`` split back to the regions ``slots [BP, c]``."""
    bp, c = slots.shape
    m, w, ch = target.shape[1:]
    per_region = grad.view(bp, m, c, w, ch).transpose(1, 2).reshape(bp * c, m, w, ch)
    target.index_add_(0, slots.reshape(-1), per_region)


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slots, scale):  # noqa: ANN001 - autograd signature
        # q, k: [BP, M, W, C]; v: [BP, M, W, Cv]; slots: [BP, topk] row indices into the BP regions
        bp, heads, width, dim = q.shape
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        qs = q.to(acc_dtype) * scale
        row_max = torch.full((bp, heads, width, 1), float("-inf"), dtype=acc_dtype, device=q.device)
        denom = torch.zeros_like(row_max)
        out = torch.zeros(bp, heads, width, v.shape[-1], dtype=acc_dtype, device=q.device)
        for t0, t1 in _slot_chunks(bp, heads, width, dim, v.shape[-1], slots.shape[1], 4):
            chunk = slots[:, t0:t1]
            logits = qs @ _gather(k, chunk).to(acc_dtype).transpose(-1, -2)  # [BP, M, W, c*W]
            new_max = torch.maximum(row_max, logits.amax(-1, keepdim=True))
            rescale = torch.exp(row_max - new_max)
            probs = torch.exp(logits - new_max)
            denom = denom * rescale + probs.sum(-1, keepdim=True)
            out = out * rescale + probs @ _gather(v, chunk).to(acc_dtype)
            row_max = new_max
        out = out / denom
        lse = row_max + denom.log()
        ctx.save_for_backward(q, k, v, slots, out, lse)
        ctx.scale = scale
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        q, k, v, slots, out, lse = ctx.saved_tensors
        scale = ctx.scale
        bp, heads, width, dim = q.shape
        acc_dtype = out.dtype
        go = grad_out.to(acc_dtype)
        delta = (go * out).sum(-1, keepdim=True)
        qs = q.to(acc_dtype) * scale
        dq = torch.zeros_like(qs)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        for t0, t1 in _slot_chunks(bp, heads, width, dim, v.shape[-1], slots.shape[1], 4):
            chunk = slots[:, t0:t1]
            kt, vt = _gather(k, chunk).to(acc_dtype), _gather(v, chunk).to(acc_dtype)
            probs = torch.exp(qs @ kt.transpose(-1, -2) - lse)
            _scatter(dv, chunk, probs.transpose(-1, -2) @ go)
            dlogits = probs * (go @ vt.transpose(-1, -2) - delta)
            dq += dlogits @ kt
            _scatter(dk, chunk, dlogits.transpose(-1, -2) @ qs)
        return (dq * scale).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def region_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Attention of every query region over the pixels of its routed key regions.

    Args:
        q, k: ``[B, P, heads, W, C]`` (``P`` regions of ``W`` pixels each); v: ``[B, P, heads, W, Cv]``.
        index: ``[B, P, topk]`` int64, the key regions (in ``0..P-1``) each query region attends.
        scale: logit scale.

    Returns:
        ``[B, P, heads, W, Cv]``: ``softmax(scale * q K^T) V`` over the ``topk * W`` routed keys.

    Example::

        >>> q = k = v = torch.randn(1, 4, 2, 9, 8)
        >>> region_routed_attention(q, k, v, torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]]), 0.3).shape
        torch.Size([1, 4, 2, 9, 8])
    """
    batch, regions = q.shape[:2]
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1] or q.ndim != 5:
        raise ValueError(f"q, k [B, P, heads, W, C] and v [B, P, heads, W, Cv] must agree, got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    if index.ndim != 3 or index.shape[:2] != (batch, regions):
        raise ValueError(f"index must be [B, P, topk] = [{batch}, {regions}, topk], got {list(index.shape)}")
    # one flat row per (batch, region); routed slots become row indices
    rows = (index + torch.arange(batch, device=index.device)[:, None, None] * regions).reshape(batch * regions, -1)
    flat = [t.reshape(batch * regions, *t.shape[2:]) for t in (q, k, v)]
    bp, heads, width, dim = flat[0].shape
    gathered_bytes = bp * heads * width * (dim + v.shape[-1] + width) * 4 * rows.shape[1]
    if gathered_bytes <= 4 * _CHUNK_BYTES and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        # inference with all routed regions fitting in a few chunks: plain attention on the gathered regions. Heads
        # go first so that gathering regions along dim 1 yields [heads, BP, c*W, C] with no transpose copy.
        q_h, k_h, v_h = (t.transpose(0, 1) for t in flat)
        keys, values = (t.contiguous().index_select(1, rows.reshape(-1)).view(heads, bp, -1, t.shape[-1])
                        for t in (k_h, v_h))
        if width >= 32:  # the fused SDPA kernel pays off from about 32 queries per region on CPUs
            out = torch.nn.functional.scaled_dot_product_attention(q_h, keys, values, scale=float(scale))
        else:
            out = torch.softmax((q_h @ keys.transpose(-1, -2)).mul_(scale), dim=-1) @ values
        out = out.transpose(0, 1)
    else:
        out = _RoutedAttention.apply(*flat, rows, float(scale))
    return out.view(*v.shape)
