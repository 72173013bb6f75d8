"""Sparsifiner: DeiT with instance-dependent sparse attention from a per-layer connectivity predictor.

Paper: Cong Wei, Brendan Duke, Ruowei Jiang, Parham Aarabi, Graham W. Taylor and Florian Shkurti, "Sparsifiner:
Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers", CVPR 2023 (arXiv 2303.13755).
Official code: lim142857/Sparsifiner @ 9a11e26, ``src/models/sparsifiner.py`` (class ``Sparsifiner``; its
``MaskPredictor`` is the connectivity predictor). No Sparsifiner checkpoints are published; training starts from
DeiT weights (timm ``deit_*_patch16_224``), which load here with only the predictor keys new.

The model is a DeiT (cls token, learned absolute position embedding, pre-norm blocks, LayerNorm eps 1e-6, head on
the cls token). Each attention layer owns a :class:`ConnectivityPredictor` (keys ``blocks.{i}.attn.mask_predictor.*``
as the official ones) that, per head, from the layer's own ``q`` and ``k``:

1. projects them to ``c = head_dim / reduce_c_factor`` channels (``proj_c_q``, ``proj_c_k``, shared by the heads)
   and the keys to ``K = N // reduce_n_factor`` tokens (``proj_n [N, K]``, Linformer-style);
2. takes ``coef = softmax(q' k'^T * num_heads**-0.5)`` over K for every non-cls query (the scale is the number of
   heads, not the head dim: an official quirk kept for parity);
3. reconstructs a low-rank attention ``approx_attn = coef @ U [N-1, N]`` with the basis ``U = proj_back_n^T``;
4. keeps, for every non-cls query, the ``ceil(keep_rate * N)`` keys of largest ``approx_attn``; the cls query keeps
   every key. The mask is computed without gradient.

Modes (the official ones, chosen by arguments rather than a mutated config):

- sparse (default, also the official training phase 2 and inference): basis ``Threshold(|U|, 0.02)``, only the
  ``coef_topk`` (8) largest coefficients kept, top-budget mask, attention restricted to the kept keys;
- attention reconstruction (``attn_recon=True`` and training; the official phase 1, predictor distillation):
  signed basis, full coefficients, dense softmax attention (``approx_attn`` is what the loss fits to the teacher).

Faithfulness and additions:

- Attention is computed on the kept keys only (``O(N * budget * d)`` per head): in inference by PyTorch's sparse CSR
  kernels (sampled dense-dense product for the logits, sparse-dense product with ``v``; ``attn_impl="csr"``), with
  autograd by gathering each query's keys and values (``"gather"``); ``"auto"`` (default) picks csr in eager CPU
  inference and the masked formulation with gradient (the fastest to train, see below), when traced (compile,
  export) or on other devices (the CSR path has not been run on a GPU yet). The official code builds the dense ``N x N`` logits and masks them (``"masked"``, kept
  as the reference); all agree to float rounding (tested). Candidly, on a CPU this saves FLOPs, not time
  (``python tools/benchmark.py sparsifiner``, docs/benchmarks.md; DeiT-S, batch 32, 2 threads): the kept keys
  cost 0.26x the dense core's FLOPs, but csr takes 45 ms per layer against dense SDPA's 19 ms, and the predictor
  itself takes 77 ms (47 of them in ``torch.topk``'s top-50-of-197 selection per query); the whole model runs at
  0.64x dense DeiT's images/s. No kernel can change the verdict there: the dense core is 11% of DeiT-S's time, so
  even free sparse attention would give at most 1.12x. With token pruning (keep 0.7 after blocks 3, 6, 9) as
  well, the model reaches 1.00x dense DeiT, where the same pruning on dense DeiT alone gives 1.59x.
- :meth:`Sparsifiner.forward_official` returns the official ``forward``'s dict (logits ``'x'``, ``'features'`` and
  the per-layer ``basis_coef``, ``approx_attn``, ``attn_mask``, ``masked_attn``, ``unmasked_attn`` lists);
  ``attn_mask`` is boolean here (the official one is a 0/1 float tensor).
- Any input size: the official model asserts ``img_size`` and bakes the token count into ``pos_embed`` and the
  predictor's ``proj_n``/``proj_back_n`` ``[N, K]``. Here an input that is not a whole number of patches is
  zero-padded on the right/bottom, and on another patch grid the patch rows of ``pos_embed`` (bicubic, as timm's
  dynamic-size ViT) and of ``proj_n``/``proj_back_n`` (bilinear; ``proj_n`` also scaled by ``old/new`` patch
  count so that its token sum keeps its size) are resampled, the cls row kept. The budget becomes
  ``ceil(keep_rate * N_new)``. At ``img_size`` this is the official model exactly; elsewhere it is an attnseg
  extension without published evidence of accuracy. :func:`attnseg.load_pretrained` applies the same resampling to
  a checkpoint of another size (:meth:`Sparsifiner.adapt_pretrained`), e.g. DeiT's 224 weights into a 384 model.
- Token pruning (the official option, off in every released config; ``token_keep_rate``, ``token_pruning_loc``):
  after the chosen blocks only the patches the cls token attends to most stay. The official code zeroes the
  others' tokens, queries, keys and values and masks them out of the predictor's scores, but still computes every
  row; here they are removed, so later blocks run on fewer tokens, with the same outputs: the predictor reads its
  token tables at the present tokens' rows, the key budget is capped at the patches present, and the cls query
  keeps the official quirk of attending to each pruned token as a key of logit 0 (:func:`cls_attention`). The
  final tokens are put back on the grid with zeros for the pruned ones (the official final features).
- :meth:`Sparsifiner.forward_pyramid` gives strides 4/8/16/32 from the last stride-16 token map through ViTDet's
  simple feature pyramid (``pyramid.*``, new parameters; the official code is classification-only).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnseg.backbones._common import (
    adapt_vit_embedding,
    check_image_input,
    check_isotropic_args,
    cls_token_head,
    init_linear_layernorm,
    is_traced,
    pretrained_cfg_factory,
    reset_norm_linear_head,
    square_token_grid,
    token_pyramid,
)
from attnseg.layers import DropPath, Mlp, SimpleFeaturePyramid, drop_path_rates, plain_feature_info
from attnseg.layers.swin import PatchEmbed
from attnseg.registry import BACKBONES

__all__ = ["Sparsifiner", "ConnectivityPredictor", "SparseAttention", "sparse_attention_gather",
           "sparse_attention_csr", "sparse_attention_masked", "resample_token_table", "cls_attention"]

ATTN_IMPLS = ("auto", "csr", "gather", "masked")


def resample_token_table(table: torch.Tensor, grid: Sequence[int], new_grid: Sequence[int], mode: str = "bilinear",
                         scale_sum: bool = False) -> torch.Tensor:
    """Resample the patch rows of a per-token table ``[1 + gh*gw, K]`` to ``[1 + h*w, K]`` (row 0, cls, kept).

    ``scale_sum`` multiplies the patch rows by ``gh*gw / (h*w)``, so a table summed over tokens keeps its size.
    """
    if tuple(grid) == tuple(new_grid):
        return table
    out = resample_abs_pos_embed(table[None], list(new_grid), list(grid), num_prefix_tokens=1, interpolation=mode,
                                 antialias=False)[0]  # [1 + h*w, K]
    if scale_sum:
        ratio = (grid[0] * grid[1]) / (new_grid[0] * new_grid[1])
        out = torch.cat([out[:1], out[1:] * ratio], dim=0)
    return out


class ConnectivityPredictor(nn.Module):
    """The official ``MaskPredictor``: a low-rank attention estimate and the top-k connectivity mask it implies.

    Args:
        head_dim: channels per head of ``q`` and ``k``.
        num_heads: heads (sets the official logit scale ``num_heads**-0.5`` unless ``qk_scale``).
        num_tokens: tokens ``N`` at the training resolution (cls included); sizes ``proj_n``/``proj_back_n``.
        grid: the patch grid ``(gh, gw)`` of those tokens (for resampling at other sizes).
        keep_rate: fraction of keys each non-cls query keeps (budget ``ceil(keep_rate * N)``).
        reduce_n_factor: ``K = num_tokens // reduce_n_factor`` basis vectors.
        reduce_c_factor: ``c = head_dim // reduce_c_factor`` predictor channels.
        share_inout_proj: one table for ``proj_n`` and ``proj_back_n``.
        basis_threshold: ``|U|`` entries at or below it are zeroed (sparse mode).
        coef_topk: coefficients kept per query (sparse mode); None thresholds at ``coef_threshold`` instead.
        coef_threshold: with ``coef_topk=None``, coefficients at or below it are zeroed (0: keep all).
        score_topk: mask = top budget keys of ``approx_attn``; False: ``approx_attn > score_threshold``.
        score_threshold: the threshold of ``score_topk=False``.
    """

    def __init__(self, head_dim: int, num_heads: int, num_tokens: int, grid: Sequence[int], keep_rate: float = 0.25,
                 reduce_n_factor: int = 6, reduce_c_factor: int = 2, share_inout_proj: bool = False,
                 qk_scale: float | None = None, basis_threshold: float = 0.02, coef_topk: int | None = 8,
                 coef_threshold: float = 0.05, score_topk: bool = True, score_threshold: float = 1e-4) -> None:
        super().__init__()
        reduced_n, reduced_c = num_tokens // reduce_n_factor, head_dim // reduce_c_factor
        if reduced_n < 1 or reduced_c < 1:
            raise ValueError(f"the predictor needs K = num_tokens // reduce_n_factor >= 1 and c = head_dim // "
                             f"reduce_c_factor >= 1, got {num_tokens=}, {reduce_n_factor=}, {head_dim=}, "
                             f"{reduce_c_factor=}")
        if coef_topk is not None and not 1 <= coef_topk <= reduced_n:
            raise ValueError(f"coef_topk must be in 1..K={reduced_n} (K = {num_tokens} // {reduce_n_factor}), "
                             f"got {coef_topk}")
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        self.num_tokens, self.grid, self.keep_rate = num_tokens, tuple(grid), keep_rate
        self.scale = qk_scale or num_heads**-0.5
        self.basis_threshold, self.coef_topk, self.coef_threshold = basis_threshold, coef_topk, coef_threshold
        self.score_topk, self.score_threshold = score_topk, score_threshold
        self.proj_c_q = nn.Linear(head_dim, reduced_c)
        self.proj_c_k = nn.Linear(head_dim, reduced_c)
        self.proj_n = nn.Parameter(torch.zeros(num_tokens, reduced_n))
        nn.init.trunc_normal_(self.proj_n, std=0.02)
        if share_inout_proj:
            self.proj_back_n = self.proj_n
        else:
            self.proj_back_n = nn.Parameter(torch.zeros(num_tokens, reduced_n))
            nn.init.trunc_normal_(self.proj_back_n, std=0.02)

    def budget(self, num_tokens: int) -> int:
        """Keys kept per non-cls query for ``num_tokens`` tokens: ``ceil(keep_rate * N)``."""
        return min(num_tokens, math.ceil(self.keep_rate * num_tokens))

    def forward(self, q: torch.Tensor, k: torch.Tensor, grid: Sequence[int], recon: bool = False,
                mask: bool = True, token_index: torch.Tensor | None = None) -> dict[str, Any]:
        """``q, k [B, heads, N, head_dim]`` -> ``basis_coef [B, heads, N-1, K]``, ``approx_attn [B, heads, N-1, N]``,
        ``attn_mask [B, heads, N, N]`` (bool, row 0 all True; only with ``mask``, or without ``score_topk``) and,
        with ``score_topk``, ``indices [B, heads, N-1, budget]`` (the kept keys of each non-cls query, unsorted).
        The attention on kept keys needs only ``indices``: ``mask=False`` skips the dense boolean mask.

        After token pruning the ``N`` tokens are the cls token and the patches ``token_index [B, N-1]`` (positions in
        the ``grid``): the token tables are read at those rows, and the budget, still ``ceil(keep_rate * (1 + gh*gw))``,
        is capped at the ``N-1`` patches present (the official ``attn_budget = min(attn_budget, token_budget)``)."""
        N = q.shape[2]
        proj_n = resample_token_table(self.proj_n, self.grid, grid, scale_sum=True)  # [1 + gh*gw, K]
        basis = resample_token_table(self.proj_back_n, self.grid, grid)  # [1 + gh*gw, K]
        budget = self.budget(proj_n.shape[0])
        if token_index is not None:  # pruned: the present tokens' rows; absent tokens add nothing to k's token sum
            rows = torch.cat([token_index.new_zeros(token_index.shape[0], 1), token_index + 1], dim=1)  # [B, N]
            proj_n, basis = proj_n[rows][:, None], basis[rows][:, None]  # [B, 1, N, K]
            budget = min(budget, N - 1)
        basis = basis.transpose(-2, -1)  # [.., K, N]
        if not recon:
            basis = F.threshold(basis.abs(), self.basis_threshold, 0.0)
        q, k = self.proj_c_q(q), self.proj_c_k(k)  # [B, heads, N, c]
        k = k.transpose(-2, -1) @ proj_n  # [B, heads, c, K]
        coef = ((q @ k) * self.scale)[..., 1:, :].softmax(dim=-1)  # [B, heads, N-1, K], cls row dropped
        if not recon:
            if self.coef_topk is not None:
                values, idx = coef.topk(self.coef_topk, sorted=False)
                coef = torch.zeros_like(coef).scatter_(-1, idx, values)
            elif self.coef_threshold > 0:
                coef = F.threshold(coef, self.coef_threshold, 0.0)
        approx_attn = coef @ basis  # [B, heads, N-1, N]
        out: dict[str, Any] = {"basis_coef": coef, "approx_attn": approx_attn}
        with torch.no_grad():  # the mask carries no gradient
            if self.score_topk:
                out["indices"] = approx_attn.topk(budget, sorted=False)[1]  # [B, heads, N-1, budget]
                if not mask:
                    return out
                # a tensor source, not the scalar True: jit.trace has no alias info for scatter_(.., bool)
                keep = torch.zeros_like(approx_attn, dtype=torch.bool).scatter_(
                    -1, out["indices"], torch.ones_like(out["indices"], dtype=torch.bool))
            else:
                keep = approx_attn > self.score_threshold
            cls_row = keep.new_ones(*keep.shape[:2], 1, N)
            out["attn_mask"] = torch.cat([cls_row, keep], dim=2)  # [B, heads, N, N]
        return out


def sparse_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official formulation: dense logits, masked keys at ``-inf``, softmax, NaN -> 0.

    ``q, k, v [B, heads, N, d]``, ``attn_mask [B, heads, N, N]`` (True = kept) -> ``(out [B, heads, N, d],
    masked_attn [B, heads, N, N], unmasked_attn [B, heads, N, N])``.
    """
    logits = (q @ k.transpose(-2, -1)) * scale  # [B, heads, N, N]
    unmasked = logits.softmax(dim=-1)
    attn = torch.nan_to_num(logits.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1))
    return attn @ v, attn, unmasked


def sparse_attention_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                            scale: float, chunk: int | None = None) -> torch.Tensor:
    """Attention computed on the kept keys only: the cls query (row 0) attends to every key, every other query
    to the ``budget`` keys ``indices [B, heads, N-1, budget]`` names.

    ``q, k, v [B, heads, N, d]`` -> ``[B, heads, N, d]``. Cost ``O(N * budget * d)`` per head instead of
    ``O(N^2 * d)``; the gathered keys and values take ``2 * B * heads * (N-1) * budget * d`` elements, processed
    ``chunk`` queries at a time when given.
    """
    B, H, N, d = k.shape
    cls = F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=scale)  # [B, heads, 1, d]
    budget = indices.shape[-1]
    step = N - 1 if chunk is None else max(1, chunk)
    outs = [cls]
    for start in range(0, N - 1, step):
        idx = indices[:, :, start:start + step]  # [B, heads, n, budget]
        n = idx.shape[2]
        flat = idx.reshape(B, H, n * budget, 1).expand(-1, -1, -1, d)
        k_sel = k.gather(2, flat).view(B, H, n, budget, d)
        v_sel = v.gather(2, flat).view(B, H, n, budget, d)
        q_sel = q[:, :, 1 + start:1 + start + n, None]  # [B, heads, n, 1, d]
        outs.append(F.scaled_dot_product_attention(q_sel, k_sel, v_sel, scale=scale).squeeze(-2))  # [B, heads, n, d]
    return torch.cat(outs, dim=2)


def sparse_attention_csr(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """:func:`sparse_attention_gather` with PyTorch's sparse CSR kernels, for inference (no autograd).

    The kept (query, key) pairs of all ``B * heads`` blocks form one block-diagonal CSR matrix with ``budget``
    entries a row: the logits are a sampled dense-dense product (``torch.sparse.sampled_addmm``, only the kept
    pairs), the softmax runs on the ``[.., budget]`` values, and the output is a sparse-dense product with ``v``.
    Nothing of size ``budget * d`` per query is materialized.
    """
    B, H, N, d = k.shape
    budget = indices.shape[-1]
    rows = B * H * (N - 1)
    offsets = (torch.arange(B * H, device=k.device) * N).view(B, H, 1, 1)
    cols = (indices.sort(dim=-1)[0] + offsets).reshape(-1)  # column of every kept pair, rows in order
    crow = torch.arange(0, rows * budget + 1, budget, device=k.device)
    # zeros, not empty: sampled_addmm adds beta * values even at beta=0, and uninitialised memory may hold NaN
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(rows * budget, dtype=q.dtype, device=q.device),
                                          size=(rows, B * H * N), check_invariants=False)
    logits = torch.sparse.sampled_addmm(pattern, q[:, :, 1:].reshape(rows, d), k.reshape(B * H * N, d).T,
                                        beta=0.0, alpha=scale)
    probs = logits.values().view(rows, budget).softmax(dim=-1).reshape(-1)
    attn = torch.sparse_csr_tensor(crow, cols, probs, size=(rows, B * H * N), check_invariants=False)
    out = (attn @ v.reshape(B * H * N, d)).view(B, H, N - 1, d)
    cls = F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=scale)  # [B, heads, 1, d]
    return torch.cat([cls, out], dim=2)


def cls_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  absent: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The cls query's (row 0's) attention over every present key: ``q, k, v [B, heads, N, d]`` -> ``(out
    [B, heads, 1, d], probs [B, heads, 1, N])``.

    ``absent`` pruned tokens enter the softmax as the official code leaves them: it zeroes their keys and values but
    never masks them out of the cls row, so each adds a logit of 0 (``exp(0)`` to the denominator, nothing to the
    output). ``absent`` such keys are one logit ``log(absent)``.
    """
    logits = (q[:, :, :1] @ k.transpose(-2, -1)) * scale  # [B, heads, 1, N]
    if absent:
        logits = torch.cat([logits, logits.new_full((*logits.shape[:-1], 1), math.log(absent))], dim=-1)
    probs = logits.softmax(dim=-1)[..., :k.shape[2]]
    return probs @ v, probs


class SparseAttention(nn.Module):
    """Multi-head self-attention with a connectivity predictor (the official ``Attention``), on tokens
    ``[B, N, C] -> [B, N, C]``; ``forward`` also returns the predictor's outputs (and, when asked, the dense
    ``masked_attn``/``unmasked_attn`` probabilities)."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, grid: Sequence[int], keep_rate: float,
                 reduce_n_factor: int, reduce_c_factor: int, share_inout_proj: bool = False, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 **predictor: Any) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mask_predictor = ConnectivityPredictor(self.head_dim, num_heads, num_tokens, grid, keep_rate,
                                                    reduce_n_factor, reduce_c_factor, share_inout_proj, **predictor)

    def forward(self, x: torch.Tensor, grid: Sequence[int], recon: bool = False, impl: str = "auto",
                return_attn: bool = False, token_index: torch.Tensor | None = None,
                cls_attn: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """``x [B, N, C]`` on the patch ``grid`` -> ``(out [B, N, C], aux)``; ``aux`` holds the predictor's outputs,
        with ``return_attn`` the dense ``masked_attn``/``unmasked_attn``, with ``cls_attn`` the cls query's attention
        probabilities ``cls_attn [B, heads, N]`` (token pruning scores with them). After token pruning ``x`` holds the
        cls token and the patches ``token_index [B, N-1]``."""
        B, N, C = x.shape
        absent = grid[0] * grid[1] + 1 - N  # pruned tokens
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        dropout = self.attn_drop.p > 0 and self.training
        # auto: the CSR kernels in CPU inference; with gradient, or on devices where they were never tested, the
        # masked formulation
        # sparse CSR tensors have no autograd and cannot be traced
        dense_auto = impl == "auto" and ((torch.is_grad_enabled() and x.requires_grad) or x.device.type != "cpu"
                                         or is_traced())
        masked = (recon or return_attn or dropout or impl == "masked" or dense_auto
                  or not self.mask_predictor.score_topk)
        aux = self.mask_predictor(q, k, grid, recon=recon, mask=masked, token_index=token_index)
        cls_out = None
        if absent or cls_attn:
            cls_out, cls_probs = cls_attention(q, k, v, self.scale, absent)  # [B, heads, 1, d], [B, heads, 1, N]
            aux["cls_attn"] = cls_probs[:, :, 0]
        if masked:
            if recon:  # attention reconstruction phase: dense attention, the mask unused
                attn = unmasked = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
                out = attn @ v
            else:
                out, attn, unmasked = sparse_attention_masked(q, k, v, aux["attn_mask"], self.scale)
                if absent:  # the cls row also counts the pruned tokens (cls_attention)
                    attn = torch.cat([cls_probs, attn[:, :, 1:]], dim=2)
                    out = torch.cat([cls_out, out[:, :, 1:]], dim=2)
            aux.update(masked_attn=attn, unmasked_attn=unmasked)
            x = self.attn_drop(attn) @ v if dropout else out
        else:
            sparse = sparse_attention_csr if impl in ("csr", "auto") else sparse_attention_gather
            x = sparse(q, k, v, aux["indices"], self.scale)
            if absent:
                x = torch.cat([cls_out, x[:, :, 1:]], dim=2)
        x = x.transpose(1, 2).reshape(B, N, C)  # [B, heads, N, d] -> [B, N, C]
        return self.proj_drop(self.proj(x)), aux


class SparsifinerBlock(nn.Module):
    """Pre-norm transformer block around :class:`SparseAttention` (the official ``Block``); tokens ``[B, N, C]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, drop_path: float,
                 **attn: Any) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SparseAttention(dim, num_heads, proj_drop=drop, **attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, grid: Sequence[int], recon: bool = False, impl: str = "auto",
                return_attn: bool = False, token_index: torch.Tensor | None = None,
                cls_attn: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        y, aux = self.attn(self.norm1(x), grid, recon, impl, return_attn, token_index, cls_attn)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), aux


class Sparsifiner(nn.Module):
    """DeiT with a connectivity predictor in every attention layer (the official ``Sparsifiner``).

    Args:
        in_chans: input channels.
        num_classes: classes of the cls-token head (0: none).
        img_size: training resolution; sets the token count ``N = (img_size // patch_size)**2 + 1`` of
            ``pos_embed`` and the predictor tables (other sizes resample them, see the module docstring).
        patch_size: patch side (stride of the token map).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale: the DeiT transformer.
        keep_rate: keys kept per query, one value or one per layer (official ``attn_keep_rate_list``).
        reduce_n_factor, reduce_c_factor, share_inout_proj: predictor sizes (:class:`ConnectivityPredictor`).
        basis_threshold, coef_topk, coef_threshold, score_topk, score_threshold: the official ``cfg.SPAR`` values
            (released defaults).
        attn_recon: in training, the official attention-reconstruction phase (signed basis, full coefficients, dense
            attention); no effect in eval.
        token_keep_rate: the official token pruning (``SPAR.TOKEN_KEEP_RATE_BASE``): below 1, after the attention of
            each block in ``token_pruning_loc`` the patch tokens with the largest cls attention (mean over heads)
            are kept, ``ceil(token_keep_rate**j * gh*gw)`` of them at the j-th location, and the others leave the
            model (not zeroed, as the official code does, but removed, so the later blocks really cost less). 1.0
            (released default): no pruning. Off in the attention-reconstruction phase, as officially.
        token_pruning_loc: block indices that prune (official ``SPAR.TOKEN_PRUNING_LOC``, default ``(3, 6, 9)``;
            the official keep-rate list ``[1]*3 + [r]*3 + [r**2]*3 + [r**3]*3`` gives these the rates r, r², r³).
        attn_impl: attention on the kept keys only by ``"csr"`` (sparse CSR kernels, no autograd) or ``"gather"``
            (gathered keys and values, autograd), ``"auto"`` (csr in eager CPU inference, else masked, e.g. when
            traced for export), or ``"masked"`` (dense logits masked, as the official code); same results to float
            rounding.
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth (linear).
        out_indices: simple-feature-pyramid levels (0..3: strides 4, 8, 16, 32) of :meth:`forward_pyramid`.
        pyramid: build the simple feature pyramid (else :meth:`forward_pyramid` returns the stride-16 map alone).

    Example::

        >>> m = Sparsifiner(img_size=64, embed_dim=32, depth=2, num_heads=2, reduce_n_factor=4, coef_topk=2, num_classes=0)
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 3, 97, 131))]
        [(8, 25, 33), (16, 13, 17), (32, 7, 9), (32, 4, 5)]
    """

    family = "sparsifiner"
    head_key_prefixes = ("head.", "norm.")  # num_classes=0 has neither (cls_token_head reads both)

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, keep_rate: float | Sequence[float] = 0.25,
                 reduce_n_factor: int = 6, reduce_c_factor: int = 2, share_inout_proj: bool = False,
                 basis_threshold: float = 0.02, coef_topk: int | None = 8, coef_threshold: float = 0.05,
                 score_topk: bool = True, score_threshold: float = 1e-4, attn_recon: bool = False,
                 token_keep_rate: float = 1.0, token_pruning_loc: Sequence[int] = (3, 6, 9), attn_impl: str = "auto",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, out_indices: Sequence[int] = (0, 1, 2, 3), pyramid: bool = True) -> None:
        super().__init__()
        check_isotropic_args(in_chans, num_classes, depth, patch_size, embed_dim, num_heads, img_size)
        keep = [float(keep_rate)] * depth if isinstance(keep_rate, (int, float)) else [float(r) for r in keep_rate]
        if len(keep) != depth:
            raise ValueError(f"keep_rate needs one value or one per layer ({depth}), got {len(keep)}")
        if not 0.0 < token_keep_rate <= 1.0:
            raise ValueError(f"token_keep_rate must be in (0, 1], got {token_keep_rate}")
        loc = [int(i) for i in token_pruning_loc]
        if token_keep_rate < 1.0 and (not loc or loc != sorted(set(loc)) or loc[0] < 0 or loc[-1] >= depth):
            raise ValueError(f"token_pruning_loc must be increasing block indices in 0..{depth - 1}, got {loc}")
        # block index -> fraction of the patch tokens left after it
        self.token_pruning = {i: token_keep_rate ** (j + 1) for j, i in enumerate(loc)} if token_keep_rate < 1 else {}
        self.attn_impl = attn_impl  # validated by the property setter
        self.in_chans, self.num_classes, self.num_features, self.embed_dim = in_chans, num_classes, embed_dim, embed_dim
        self.patch_size, self.min_input_size = patch_size, patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.attn_recon = attn_recon
        num_tokens = self.grid[0] * self.grid[1] + 1

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, norm=False)  # keys patch_embed.proj.*
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates([depth], drop_path_rate)[0]
        predictor = dict(basis_threshold=basis_threshold, coef_topk=coef_topk, coef_threshold=coef_threshold,
                         score_topk=score_topk, score_threshold=score_threshold)
        self.blocks = nn.ModuleList(
            SparsifinerBlock(embed_dim, num_heads, mlp_ratio, drop_rate, rates[i], num_tokens=num_tokens,
                             grid=self.grid, keep_rate=keep[i], reduce_n_factor=reduce_n_factor,
                             reduce_c_factor=reduce_c_factor, share_inout_proj=share_inout_proj, qkv_bias=qkv_bias,
                             qk_scale=qk_scale, attn_drop=attn_drop_rate, **predictor)
            for i in range(depth))
        self.grad_checkpointing = False
        self.pyramid = SimpleFeaturePyramid(embed_dim, out_indices) if pyramid else None
        self.out_indices = tuple(out_indices) if pyramid else (2,)
        self.feature_info = plain_feature_info(self.pyramid, embed_dim, patch_size, "blocks")
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if num_classes else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    _init_weights = staticmethod(init_linear_layernorm)  # the official (DeiT) init; the patch conv keeps PyTorch's

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, value: str) -> None:
        if value not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {value!r}")
        self._attn_impl = value

    @property
    def new_key_prefixes(self) -> tuple[str, ...]:
        """Own keys that DeiT/timm ViT checkpoints lack: the predictors and the simple feature pyramid."""
        own = tuple(f"blocks.{i}.attn.mask_predictor." for i in range(len(self.blocks)))
        return own + (("pyramid.",) if self.pyramid is not None else ())

    # -- timm-style utilities -----------------------------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules grouping the embeddings and each block."""
        return {"stem": r"^(cls_token|pos_embed|patch_embed)", "blocks": r"^blocks\.(\d+)"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (same outputs, less memory)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay (the official ``{'pos_embed', 'cls_token'}``)."""
        return {"pos_embed", "cls_token"}

    def adapt_pretrained(self, key: str, value: torch.Tensor, target_shape: Sequence[int]) -> torch.Tensor | None:
        """A checkpoint tensor of another token grid, patch size or input-channel count made to fit this model;
        :func:`attnseg.load_pretrained` calls it for keys whose shape differs. None for keys it does not adapt.

        - ``pos_embed``, ``patch_embed.proj.weight``: :func:`~attnseg.backbones._common.adapt_vit_embedding`.
        - ``blocks.{i}.attn.mask_predictor.proj_n`` / ``proj_back_n`` ``[1 + g*g, K] -> [1 + h*w, K]``: resampled over
          the patch grid by :func:`resample_token_table` exactly as :meth:`ConnectivityPredictor.forward` does for
          another input size (``proj_n`` with the token-sum scale). So a model built at ``img_size`` X and loaded from
          a checkpoint of size Y computes, on X inputs, what the size-Y model computes on them.

        Raises:
            ValueError: a predictor table of another rank ``K``: ``K = N // reduce_n_factor`` depends on the token
                count and a row resampling cannot change it; the message names the ``reduce_n_factor`` values that
                give this model the checkpoint's ``K``. Also for tables shared by ``share_inout_proj`` (the run-time
                rule scales the one table two ways, which no single stored table reproduces).
        """
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.mask_predictor\.(proj_n|proj_back_n)", key)
        if m is None:
            return adapt_vit_embedding(key, value, target_shape, num_prefix_tokens=1)
        predictor = self.blocks[int(m.group(1))].attn.mask_predictor
        n, k = tuple(target_shape)
        if value.ndim != 2:
            return None
        if predictor.proj_back_n is predictor.proj_n:
            raise ValueError(f"{key}: tables shared by share_inout_proj=True are not resampled (proj_n and "
                             "proj_back_n use one table at two scales at run time); build the model at the "
                             "checkpoint's img_size")
        if value.shape[1] != k:
            lo, hi = n // (value.shape[1] + 1) + 1, n // value.shape[1]
            fix = (f"reduce_n_factor={lo}" if lo == hi else f"reduce_n_factor in {lo}..{hi}") if lo <= hi else \
                "no reduce_n_factor does; build the model at the checkpoint's img_size"
            raise ValueError(f"{key}: the checkpoint's predictor rank K={value.shape[1]} differs from this model's "
                             f"K={k} (K = N // reduce_n_factor with N={n} tokens here); {fix} keeps K={value.shape[1]}")
        old = square_token_grid(value.shape[0], 1, f"checkpoint {key} {list(value.shape)}")
        return resample_token_table(value, old, predictor.grid, scale_sum=m.group(2) == "proj_n")

    def predictor_parameters(self) -> list[nn.Parameter]:
        """The connectivity predictors' parameters (the official mask-predictor optimizer's set)."""
        return [p for n, p in self.named_parameters() if ".mask_predictor." in n]

    def get_classifier(self) -> nn.Module | None:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier (``num_classes > 0``, the final norm kept or created) or none at all (``0``)."""
        reset_norm_linear_head(self, num_classes, lambda c, **dd: nn.LayerNorm(c, eps=1e-6, **dd))

    # -- forward ------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_image_input(self, x)
        x = self.patch_embed(x)  # [B, h, w, C] (input zero-padded to whole patches)
        grid = (x.shape[1], x.shape[2])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)
        pos = self.pos_embed
        if grid != self.grid:
            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=1)
        return self.pos_drop(x + pos), grid  # [B, 1 + h*w, C]

    def _blocks(self, x: torch.Tensor, grid: tuple[int, int],
                collect: bool = False) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Tokens ``[B, 1 + gh*gw, C]`` through the blocks -> the same shape and each block's ``aux`` (with
        ``token_index``: the patches present after it, None before any pruning). Pruned patches come back as zeros,
        which is what the official model carries for them to its final norm."""
        recon = self.attn_recon and self.training
        pruning = {} if recon else self.token_pruning
        token_index = None  # [B, n] positions of the patches still present (sorted); None: all of them
        auxes = []
        for i, block in enumerate(self.blocks):
            args = (x, grid, recon, self.attn_impl, collect, token_index, i in pruning)
            if self.grad_checkpointing and torch.is_grad_enabled() and not collect:
                x, aux = checkpoint(block, *args, use_reentrant=False)
            else:
                x, aux = block(*args)
            if i in pruning:
                x, token_index = self._prune_tokens(x, token_index, aux["cls_attn"],
                                                    math.ceil(pruning[i] * grid[0] * grid[1]))
            aux["token_index"] = token_index
            auxes.append(aux)
        if token_index is not None:  # back on the full grid, pruned patches zero
            index = token_index[..., None].expand(-1, -1, x.shape[-1])
            patches = x.new_zeros(x.shape[0], grid[0] * grid[1], x.shape[-1]).scatter(1, index, x[:, 1:])
            x = torch.cat([x[:, :1], patches], dim=1)
        return x, auxes

    @staticmethod
    def _prune_tokens(x: torch.Tensor, token_index: torch.Tensor | None, cls_attn: torch.Tensor,
                      keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the ``keep`` patches of ``x [B, 1+n, C]`` the cls query attends to most (``cls_attn [B, heads, 1+n]``
        averaged over heads; the official score) -> ``(x [B, 1+keep, C], token_index [B, keep])``, in grid order."""
        score = cls_attn[:, :, 1:].mean(dim=1)  # [B, n]
        order = score.topk(min(keep, score.shape[1]), dim=-1, sorted=False)[1].sort(dim=-1)[0]  # [B, keep]
        patches = x[:, 1:].gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        token_index = order if token_index is None else token_index.gather(1, order)
        return torch.cat([x[:, :1], patches], dim=1), token_index

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block, ``[B, 1 + ceil(H/p) * ceil(W/p), C]`` (cls first; before the final norm)."""
        x, grid = self._embed(x)
        return self._blocks(x, grid)[0]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps at the strides of ``feature_info``: ``[B, C_i, ceil(H/s_i), ceil(W/s_i)]``."""
        tokens, grid = self._embed(x)
        return token_pyramid(self.pyramid, self._blocks(tokens, grid)[0], grid, x.shape[-2:])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, N, C]`` -> logits: final LayerNorm, cls token, linear."""
        return cls_token_head(self, x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]`` (the official ``forward(x)['x']``)."""
        return self.forward_head(self.forward_features(x))

    def forward_official(self, x: torch.Tensor) -> dict[str, Any]:
        """What the official ``forward`` returns: ``'x'`` (logits), ``'features'`` (final-norm patch tokens
        ``[B, N-1, C]``) and per-layer lists ``basis_coef_list``, ``approx_attn_list``, ``attn_mask_list`` (bool),
        ``masked_attn_list``, ``unmasked_attn_list`` (dense ``[B, heads, N, N]`` probabilities, for the losses) and
        ``token_mask_list`` (with token pruning, the patches present after each block as a bool ``[B, N-1]``;
        None before the first pruning). In eval also the mean ``basis_sparsity``, ``basis_coef_sparsity`` and
        ``attn_mask_sparsity`` over layers. With token pruning, the per-layer tensors of a block are over the tokens
        present in it (the official ones keep every token, the pruned ones zeroed)."""
        tokens, grid = self._embed(x)
        tokens, auxes = self._blocks(tokens, grid, collect=True)
        normed = self.norm(tokens) if self.norm is not None else tokens
        out: dict[str, Any] = {
            "x": self.head(normed[:, 0]) if self.head is not None else normed[:, 0],
            "features": normed[:, 1:],
            **{f"{key}_list": [a[key] for a in auxes]
               for key in ("basis_coef", "approx_attn", "attn_mask", "masked_attn", "unmasked_attn")},
            "token_mask_list": [None if a["token_index"] is None else
                                torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool,
                                            device=tokens.device).scatter_(1, a["token_index"], True)
                                for a in auxes],
        }
        if not self.training:
            def sparsity(t: torch.Tensor) -> torch.Tensor:
                return 1 - torch.count_nonzero(t) / t.numel()

            bases = []
            for block in self.blocks:
                u = block.attn.mask_predictor.proj_back_n.transpose(0, 1)
                bases.append(F.threshold(u.abs(), block.attn.mask_predictor.basis_threshold, 0.0))
            out["basis_sparsity"] = torch.stack([sparsity(u) for u in bases]).mean()
            out["basis_coef_sparsity"] = torch.stack([sparsity(a["basis_coef"]) for a in auxes]).mean()
            out["attn_mask_sparsity"] = torch.stack([sparsity(a["attn_mask"]) for a in auxes]).mean()
        return out


# -- variants ----------------------------------------------------------------------------------------------------
# DeiT sizes (Touvron et al. 2021) with the released predictor settings (keep 0.25, K = 197 // 6 = 32, c = d / 2,
# top-8 coefficients). Parameter counts at num_classes=1000, without the pyramid. The paper trains the Small size.

def _create(variant: dict[str, Any], kwargs: dict[str, Any]) -> Sparsifiner:
    return Sparsifiner(**{**variant, **kwargs})


@BACKBONES.register(cls=Sparsifiner)
def sparsifiner_deit_tiny(**kwargs: Any) -> Sparsifiner:
    """Sparsifiner on DeiT-Tiny (192 wide, 3 heads): 5.8M parameters."""
    return _create(dict(embed_dim=192, depth=12, num_heads=3), kwargs)


@BACKBONES.register(cls=Sparsifiner)
def sparsifiner_deit_small(**kwargs: Any) -> Sparsifiner:
    """Sparsifiner on DeiT-Small (384 wide, 6 heads): 22.25M parameters (the paper's model)."""
    return _create(dict(embed_dim=384, depth=12, num_heads=6), kwargs)


@BACKBONES.register(cls=Sparsifiner)
def sparsifiner_deit_base(**kwargs: Any) -> Sparsifiner:
    """Sparsifiner on DeiT-Base (768 wide, 12 heads): 86.8M parameters."""
    return _create(dict(embed_dim=768, depth=12, num_heads=12), kwargs)


@BACKBONES.register(cls=Sparsifiner)
def test_sparsifiner(**kwargs: Any) -> Sparsifiner:
    """A tiny Sparsifiner for CI (no published weights): 64 px training size (17 tokens, K=4, top-2)."""
    return _create(dict(img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, reduce_n_factor=4,
                        coef_topk=2), kwargs)


# -- pretrained configurations (lim142857/Sparsifiner) -----------------------------------------------------------------
# Licence unknown: the official repository has no LICENSE file in our sources. No Sparsifiner weights were published;
# the checkpoints listed are the DeiT files it starts from (facebookresearch/deit, Apache-2.0), which load with the
# mask predictors reported missing. DeiT's evaluation: resize 256, centre crop 224, bicubic.
_cfg = pretrained_cfg_factory(paper="2303.13755", origin="https://github.com/lim142857/Sparsifiner", license="unknown",
                              first_conv="patch_embed.proj", classifier="head")

default_cfgs: dict[str, dict[str, Any]] = {
    "sparsifiner_deit_tiny": _cfg(checkpoints=("deit_tiny_patch16_224-a1311bcf.pth",)),
    "sparsifiner_deit_small": _cfg(checkpoints=("deit_small_patch16_224-cd65a155.pth",)),
    "sparsifiner_deit_base": _cfg(checkpoints=("deit_base_patch16_224-b5f2ef4d.pth",)),
}
