"""Additional keys/values: every query also attends a shared set of extra tokens (NATTEN's ``additional_kv``).

Backends compute neighborhood attention with its logsumexp, then merge it with full attention over the
extra tokens; the merge is one softmax over the union of keys (``o = sum_i exp(lse_i - lse) o_i``), and is
differentiable through both outputs and both logsumexps.
"""

from __future__ import annotations

import torch

__all__ = ["attend_extra_and_merge"]


def attend_extra_and_merge(
    q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, additional_keys: torch.Tensor,
    additional_values: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge neighborhood attention with attention over extra tokens.

    Args:
        q: ``[B, *S, heads, D]``; out: ``[B, *S, heads, Dv]`` and lse ``[B, *S, heads]`` of the neighborhood part.
        additional_keys, additional_values: ``[B, E, kv_heads, D]`` / ``[B, E, kv_heads, Dv]``.

    Returns:
        The merged output (``out``'s shape and dtype) and logsumexp (``lse``'s shape and dtype).
    """
    batch, *_, heads, dim = q.shape
    rep = heads // additional_keys.shape[2]
    ak = additional_keys.repeat_interleave(rep, dim=2)  # [B, E, H, D]
    av = additional_values.repeat_interleave(rep, dim=2)
    acc = torch.promote_types(lse.dtype, torch.float32)
    logits = torch.einsum("bnhd,behd->bnhe", q.reshape(batch, -1, heads, dim), ak).to(acc) * scale
    lse_extra = torch.logsumexp(logits, dim=-1)
    out_extra = torch.einsum("bnhe,behd->bnhd", torch.softmax(logits, dim=-1), av.to(acc))
    lse_na = lse.reshape(batch, -1, heads).to(acc)
    merged = torch.logaddexp(lse_na, lse_extra)
    out_flat = out.reshape(batch, -1, heads, out.shape[-1]).to(acc)
    combined = out_flat * torch.exp(lse_na - merged)[..., None] + out_extra * torch.exp(lse_extra - merged)[..., None]
    return combined.to(out.dtype).reshape(out.shape), merged.to(lse.dtype).reshape(lse.shape)
