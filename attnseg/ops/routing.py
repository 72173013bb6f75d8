"""Region-routed attention: each query region attends the union of its top-k routed key regions.

The operator of BiFormer's bi-level routing attention. The official code gathers the keys and values of the
``k`` routed regions for every query region (``torch.gather`` on an expanded view), a ``k``-fold copy of
K and V whose backward is a scatter of the same size (rayleizhu/BiFormer issues #21 and #50: ~100 GB for a
600x500 map). Here the routed regions are visited a chunk of slots at a time, so the extra memory is one
bounded chunk: with autograd, an online softmax whose backward recomputes the probabilities from the saved
logsumexp and scatters key/value gradients region by region (``index_add_``); without it, PyTorch's fused CPU
attention kernel per chunk, merged by logsumexp. Same math, so the same outputs up to float rounding.
"""

from __future__ import annotations

import torch

__all__ = ["region_routed_attention", "region_masked_attention", "prefers_masked_dense"]

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


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _routed_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """No-grad path: gather routed regions chunk by chunk into fused attention, merging chunks by logsumexp.

    ``q, k``: ``[BP, M, W, C]``, ``v``: ``[BP, M, W, Cv]``, ``rows``: ``[BP, topk]``. Heads go first so that
    gathering regions along dim 1 yields ``[M, BP, c*W, C]`` with no transpose copy; the logits are never
    materialised beyond one chunk (the fused CPU kernel works blockwise).
    """
    bp, heads, width, dim = q.shape
    q_h, k_h, v_h = q.transpose(0, 1), k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    per_slot = max(bp * heads * width * (dim + v.shape[-1]) * q.element_size(), 1)
    step = max(1, min(rows.shape[1], _CHUNK_BYTES // per_slot))

    def gather(t: torch.Tensor, t0: int, t1: int) -> torch.Tensor:  # [M, BP, c*W, C]
        return t.index_select(1, rows[:, t0:t1].reshape(-1)).view(heads, bp, -1, t.shape[-1])

    if step >= rows.shape[1]:  # one chunk: plain attention (the fused kernel pays off from ~32 queries per region)
        keys, values = gather(k_h, 0, rows.shape[1]), gather(v_h, 0, rows.shape[1])
        if width >= 32:
            return torch.nn.functional.scaled_dot_product_attention(q_h, keys, values, scale=scale).transpose(0, 1)
        return (torch.softmax((q_h @ keys.transpose(-1, -2)).mul_(scale), dim=-1) @ values).transpose(0, 1)
    if _FLASH_CPU is None or q.device.type != "cpu":
        return _RoutedAttention.apply(q, k, v, rows, scale)
    out = lse = None
    for t0 in range(0, rows.shape[1], step):
        t1 = min(t0 + step, rows.shape[1])
        out_c, lse_c = _FLASH_CPU(q_h, gather(k_h, t0, t1), gather(v_h, t0, t1), 0.0, False, scale=scale)
        if out is None:
            out, lse = out_c, lse_c
            continue
        merged = torch.logaddexp(lse, lse_c)
        out = out * torch.exp(lse - merged)[..., None] + out_c * torch.exp(lse_c - merged)[..., None]
        lse = merged
    return out.transpose(0, 1)


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
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = _RoutedAttention.apply(*flat, rows, float(scale))
    else:
        out = _routed_inference(*flat, rows, float(scale))
    return out.view(*v.shape)


# The masked dense form pays off once the routed keys are a large share of all keys (BiFormer's stage 3: 16 of 49
# regions); measured on 2 CPU threads: 4x faster at 16/49, 1.5x at 16/64, 3x slower at 4/49.
DENSE_MIN_FRACTION = 0.25
_DENSE_MASK_BYTES = 64 * 2**20


def prefers_masked_dense(regions: int, topk: int, batch: int, tokens: int) -> bool:
    """Whether :func:`region_masked_attention` is the faster way to compute a no-grad routed attention: routed
    keys at least :data:`DENSE_MIN_FRACTION` of all keys and the ``[B, N, N]`` mask within 64 MiB."""
    return topk >= DENSE_MIN_FRACTION * regions and batch * tokens * tokens <= _DENSE_MASK_BYTES


def region_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                            grid: tuple[int, int], region: tuple[int, int], scale: float) -> torch.Tensor:
    """:func:`region_routed_attention` computed as attention over all keys with a region mask, on token layout.

    Every query attends exactly the keys of its region's routed regions (the others are masked out before the
    softmax), so the result equals the routed computation up to float rounding, with no gathered copies and no
    region re-layout of the maps. It computes every query/key logit, so it is the faster form only when the
    routed regions are a large share of all (:func:`prefers_masked_dense`); meant for inference (its backward
    would go through the dense mask).

    Args:
        q, k: ``[B, heads, N, C]``, v: ``[B, heads, N, Cv]``: tokens of an ``(S_y * h) x (S_x * w)`` map,
            row-major (``N = S_y h S_x w``).
        index: ``[B, S_y S_x, topk]`` routed key regions of each query region (regions row-major).
        grid: ``(S_y, S_x)`` regions per side; region: ``(h, w)`` pixels per region.
        scale: logit scale.

    Returns:
        ``[B, heads, N, Cv]``.

    Example::

        >>> q = k = v = torch.randn(1, 2, 16, 8)  # a 4x4 map of 2x2 regions
        >>> region_masked_attention(q, k, v, torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]]), (2, 2), (2, 2), 0.3).shape
        torch.Size([1, 2, 16, 8])
    """
    (sy, sx), (h, w) = grid, region
    batch, _, tokens, _ = q.shape
    if tokens != sy * h * sx * w or index.shape[:2] != (batch, sy * sx):
        raise ValueError(f"q has {tokens} tokens and index {list(index.shape)}; a {sy}x{sx} grid of {h}x{w} regions "
                         f"needs {sy * h * sx * w} tokens and index [{batch}, {sy * sx}, topk]")
    # a tensor source, not the scalar True: jit.trace has no alias info for scatter_(.., bool)
    routed = torch.zeros(batch, sy * sx, sy * sx, dtype=torch.bool, device=q.device).scatter_(
        2, index, torch.ones_like(index, dtype=torch.bool))
    ys, xs = torch.arange(sy * h, device=q.device), torch.arange(sx * w, device=q.device)
    region_of = ((ys // h)[:, None] * sx + (xs // w)[None, :]).reshape(-1)  # [N] region of each token
    mask = routed[:, region_of][:, :, region_of]  # [B, N, N]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
