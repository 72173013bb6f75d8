"""KArAt: ViTs whose attention replaces the row softmax by a learnable Kolmogorov-Arnold operator (Fourier-KArAt).

Paper: Subhajit Maity et al., "Kolmogorov-Arnold Attention: Is Learnable Attention Better For Vision
Transformers?", arXiv 2503.10632v3 (Oct 2025). Official code: MaitySubhajit/KArAt, which held no code in any store
reachable here (../shared/fixtures/parity/KARAT_NOTE.md). **This is an implementation from the paper, not a port**:
module names, state-dict keys, initialisation and checkpoints are attnseg's own, nothing is checkpoint-compatible,
and there is no parity fixture. Re-check the official code before claiming compatibility.

The model is a timm-style ViT (patch 16, cls token, learned absolute position embedding, pre-norm blocks with
LayerNorm eps 1e-6, final norm, classifier on the cls token). In every block, with ``A = Q K^T / sqrt(d_h)``
``[B, heads, N, N]``, the softmax is replaced by the low-rank operator "W Phi(A)" (configuration (i) of the paper):

- ``Phi_p(A[k, :]) = sum_q sum_f c[q, f, p] * psi_f(A[k, q])`` for ``p = 1..r``: every key position ``q`` and
  output unit ``p`` carries its own learned function, a combination of the basis functions ``psi_f``;
- ``sigma(A)[k, :] = W @ Phi(A[k, :])`` with ``W [N, r]``; no normalisation (rows may be negative and need not sum
  to 1); ``out = sigma(A) @ V`` then the usual output projection.

The basis is pluggable (:class:`KANBasis`): :class:`FourierBasis` gives Fourier-KArAt, ``psi = [cos(m x), sin(m x)]``
for ``m = 1..G`` (``G`` = ``order``, the paper's grid size). Another basis (B-spline, wavelet, ...) is a subclass
mapping ``[...] -> [..., num_functions]``; the attention does not change.

Variants (the paper's "GnB"/"GnU"): ``mode="blockwise"`` gives every (block, head) its own ``(c, W)``;
``mode="universal"`` gives one ``(c, W)`` per head, owned by the model (``shared_operator.*``) and used by every
block. The paper's best settings: G3 for ViT-T/S, G1 for ViT-B, rank ``r = 12``.

Choices where the paper is silent or ambiguous (all attnseg's; see KARAT_NOTE.md):

- Frequencies. The paper's equation sums ``m = 1..G`` (``2 G r N`` coefficients per head); its parameter counts
  (Table 13) fit ``m = 0..G`` instead. Default: the equation. ``basis_kwargs={"zero_frequency": True}`` adds the
  ``m = 0`` slot (a learnable constant per unit, and a sine coefficient that is identically unused) and reproduces the
  published parameter counts.
- Initialisation. The paper lists the coefficients as N(0, 1) without a fan-in scale and gives no init for ``W``.
  Default here: coefficients N(0, 1/(N * num_functions)) (FourierKAN's scaling, so ``Phi`` starts O(1)) and ``W``
  trunc-normal(0.02) like the other linear weights; ``coeff_std=1.0`` gives the literal N(0, 1).
- Logits, basis features and the operator run in at least float32 (cos(m A) loses phase in half precision).
- Attention dropout (``attn_drop_rate``, default 0) applies to ``sigma(A)``, as timm applies it after the softmax.
- Options the paper ablates and turns off: ``base_activation`` (``b(x)`` added to every unit: ``"identity"``,
  ``"silu"``, ``"gelu"``; default none) and ``simplex_projection`` (each ``Phi(A[k, :])`` projected onto the
  probability simplex, Condat's sort-based algorithm, between ``Phi`` and ``W``; default off, it hurts accuracy).

**The fixed token count.** ``c`` and ``W`` are indexed by key position, so they are sized by the ``N = 1 + (img_size /
patch_size)^2`` tokens the model is built for (197 at 224 px). The paper trains and evaluates only at that size (its
ViTDet runs fixed 224 x 224 inputs). What attnseg does for other sizes (not from the paper): the input is zero-padded
on the right/bottom to whole patches; the position embedding and, in every operator, the patch part of ``c`` and
``W`` are resized bicubically over the patch grid (the cls slot is kept), and both resized operator tensors are scaled
by ``N_built_patches / N_new_patches`` so that the sums over keys in ``Phi`` and in ``sigma(A) @ V`` keep their
magnitude. This lets the backbone contract (any input size, dense heads, the simple feature pyramid) hold; accuracy
away from the built size is untested. ``dynamic_size=False`` refuses other sizes with :class:`InputSizeError`.

Cost: stored for the backward pass by plain autograd, the basis features ``[B, heads, N, N, num_functions]`` dominate
activation memory (the paper reports 2.5-3x the training memory of a softmax ViT; the same here with
``memory_efficient=False``). By default (a basis with an analytic derivative, as Fourier) :func:`kan_phi` computes
the logits and features of a chunk of query rows at a time from ``q`` and ``k``, stores neither and recomputes them
in the backward pass, and the attention forms ``Phi @ (W^T V)`` without storing ``sigma(A)``: nothing N x N is kept
for the backward pass, as in a fused softmax attention (docs/benchmarks.md, section "KArAt vs ViT", has the
measurements). Attention dropout and a base activation need the whole logits and keep them.
``set_grad_checkpointing`` (whole blocks recomputed) lowers the memory further.

Dense use: :meth:`KArAtViT.forward_pyramid` feeds the last stride-16 map to ViTDet's simple feature pyramid (strides
4, 8, 16, 32, cropped to ``ceil(size / stride)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.autograd.function import once_differentiable
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
from attnseg.errors import InputSizeError
from attnseg.layers import DropPath, Mlp, SimpleFeaturePyramid, drop_path_rates, plain_feature_info
from attnseg.layers.swin import PatchEmbed
from attnseg.registry import BACKBONES, suggest

__all__ = ["KANBasis", "FourierBasis", "BASES", "make_basis", "kan_phi", "KArAtOperator", "KArAtAttention",
           "KArAtBlock", "KArAtViT", "resize_token_grid", "simplex_projection"]

_LayerNorm = functools.partial(nn.LayerNorm, eps=1e-6)


# -- bases --------------------------------------------------------------------------------------------------------

class KANBasis(nn.Module):
    """A set of univariate basis functions: ``forward(x [...]) -> [..., num_functions]``.

    Subclasses set ``num_functions`` in ``__init__`` and implement ``forward``; they may hold parameters or buffers
    (a learnable grid, scales). The operator learns one coefficient per (key position, function, output unit).

    Optional, for the operator's memory-efficient path (:func:`kan_phi`): a basis without trainable parameters that
    sets ``analytic_derivative = True`` and implements :meth:`features_and_derivative` has its features recomputed
    in the backward pass instead of stored; when its derivatives are linear combinations of its own functions
    (``psi' = psi @ D``), :meth:`derivative_matrix` returning ``D`` saves computing them. Other bases run through
    plain autograd.
    """

    num_functions: int
    analytic_derivative: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features_and_derivative(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [...]`` -> ``(psi(x), psi'(x))``, both ``[..., num_functions]`` (only with ``analytic_derivative``)."""
        raise NotImplementedError(f"{type(self).__name__} has no analytic derivative")

    def derivative_matrix(self) -> torch.Tensor | None:
        """``D [num_functions, num_functions]`` with ``psi'(x) = psi(x) @ D`` for every ``x``, or None."""
        return None


class FourierBasis(KANBasis):
    """``[cos(m x) for m in freqs] + [sin(m x) for m in freqs]``, ``freqs = 1..order`` (``0..order`` with
    ``zero_frequency``, the slot that reproduces the paper's parameter counts).

    Example::

        >>> FourierBasis(3)(torch.zeros(2, 5)).shape
        torch.Size([2, 5, 6])
    """

    def __init__(self, order: int, zero_frequency: bool = False) -> None:
        super().__init__()
        if order < 1:
            raise ValueError(f"FourierBasis needs order >= 1, got {order=}")
        self.order, self.zero_frequency = order, zero_frequency
        self.register_buffer("freqs", torch.arange(0 if zero_frequency else 1, order + 1, dtype=torch.float32),
                             persistent=False)
        self.num_functions = 2 * len(self.freqs)

    analytic_derivative = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx = x.unsqueeze(-1) * self.freqs.to(x.dtype)  # [...] -> [..., n_freq]
        return torch.cat([torch.cos(mx), torch.sin(mx)], dim=-1)  # [..., 2 n_freq]

    def features_and_derivative(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(psi(x), psi'(x))`` ``[..., 2 n_freq]``: ``psi' = [-m sin(m x), m cos(m x)]`` from the same cos/sin."""
        freqs = self.freqs.to(x.dtype)
        mx = x.unsqueeze(-1) * freqs  # [...] -> [..., n_freq]
        cos, sin = torch.cos(mx), torch.sin(mx)
        return torch.cat([cos, sin], dim=-1), torch.cat([-sin * freqs, cos * freqs], dim=-1)  # [..., 2 n_freq] x 2

    def derivative_matrix(self) -> torch.Tensor:
        """``(cos m x)' = -m sin m x`` and ``(sin m x)' = m cos m x``: ``D[n + i, i] = -m_i``, ``D[i, n + i] = m_i``."""
        n = len(self.freqs)
        d = self.freqs.new_zeros(2 * n, 2 * n)
        i = torch.arange(n, device=d.device)
        d[n + i, i], d[i, n + i] = -self.freqs, self.freqs
        return d


BASES: dict[str, type[KANBasis]] = {"fourier": FourierBasis}


def make_basis(basis: str | Callable[..., KANBasis], order: int, **kwargs: Any) -> KANBasis:
    """A basis from a name in :data:`BASES` or a callable ``(order, **kwargs) -> KANBasis`` (e.g. the class)."""
    if isinstance(basis, str):
        if basis not in BASES:
            raise ValueError(f"unknown basis '{basis}'{suggest(basis, BASES)} (known: {', '.join(BASES)})")
        basis = BASES[basis]
    out = basis(order, **kwargs)
    if not isinstance(out, KANBasis) or getattr(out, "num_functions", 0) < 1:
        raise TypeError(f"basis {basis!r} must build a KANBasis with num_functions >= 1, got {type(out).__name__}")
    return out


# -- operator helpers ---------------------------------------------------------------------------------------------

# The operator's input: the scaled logits [B, heads, N, N], or (q, k, scale) of which they are scale * q @ k^T.
Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor, float]

_BASE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x, "silu": F.silu, "gelu": F.gelu}


def simplex_projection(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each last-axis vector onto the probability simplex (sort-based; Condat 2016)."""
    u = torch.sort(v, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    ind = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / ind) > 0).sum(-1, keepdim=True)  # >= 1: the largest entry always qualifies
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


def resize_token_grid(t: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix: int = 1,
                      dim: int = 1, scale_mass: bool = False) -> torch.Tensor:
    """Resize a per-token axis holding ``num_prefix`` tokens then a row-major ``old_grid`` of patches.

    The patch part of axis ``dim`` is resized to ``new_grid`` by timm's ``resample_abs_pos_embed`` (bicubic,
    antialiased); prefix tokens are kept. ``scale_mass`` multiplies the resized patch part by
    ``old_patches / new_patches`` (for weights that are summed over tokens).

    Example::

        >>> resize_token_grid(torch.randn(2, 1 + 4 * 4, 5), (4, 4), (3, 7)).shape
        torch.Size([2, 22, 5])
    """
    if tuple(old_grid) == tuple(new_grid):
        return t
    t = t.movedim(dim, 0)  # [N, *rest]
    rest = t.shape[1:]
    out = resample_abs_pos_embed(t.reshape(1, t.shape[0], -1), list(new_grid), list(old_grid),
                                 num_prefix_tokens=num_prefix)[0]  # [1, N, R] -> [N', R]
    if scale_mass:
        ratio = old_grid[0] * old_grid[1] / (new_grid[0] * new_grid[1])
        out = torch.cat([out[:num_prefix], out[num_prefix:] * ratio], dim=0)
    return out.reshape(-1, *rest).movedim(0, dim)


# Without a row_chunk, the memory-efficient path takes as many query rows at a time as keep one chunk's basis
# features under this many elements (4 MiB in float32). Measured on 2 cores (ViT-T, batch 8): 2^20 and above train as
# fast as plain autograd (smaller chunks up to 20% slower), and 2^20 peaks 15 MiB below 2^21. The result does not
# depend on the chunking.
_CHUNK_ELEMENTS = 2**20


class _KANPhi(torch.autograd.Function):
    """``Phi`` of :class:`KArAtOperator` saving only its inputs: the basis features (``num_functions`` values per
    logit) are computed chunk by chunk in the forward pass and again in the backward pass, never stored; given the
    keys, so are the logits."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: torch.Tensor | None, coeff: torch.Tensor, basis: KANBasis, rows: int,
                scale: float) -> torch.Tensor:
        # x: logits [B, h, N, M], or queries [B, h, N, d] with key [B, h, M, d]; coeff [h, M nf, r]
        ctx.basis, ctx.rows, ctx.scale = basis, rows, scale
        ctx.save_for_backward(x, key, coeff)
        with torch.autocast(x.device.type, enabled=False):
            phi = []
            for start in range(0, x.shape[2], rows):
                a = _KANPhi.logits(ctx, x, key, start)  # [B, h, n, M]
                phi.append(basis(a).flatten(3) @ coeff)  # [B, h, n, M nf] @ [h, M nf, r] -> [B, h, n, r]
        return torch.cat(phi, dim=2)  # [B, h, N, r]

    @staticmethod
    def logits(ctx: Any, x: torch.Tensor, key: torch.Tensor | None, start: int) -> torch.Tensor:
        rows = x[:, :, start:start + ctx.rows]
        return rows if key is None else (rows @ key.transpose(-1, -2)) * ctx.scale  # [B, h, n, M]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_phi: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, key, coeff = ctx.saved_tensors
        need_x, need_key, need_coeff = ctx.needs_input_grad[:3]
        need_a = need_x or need_key
        grad_phi = grad_phi.to(coeff.dtype)
        grad_x = torch.empty_like(x) if need_x else None
        grad_key = torch.zeros_like(key) if need_key else None
        grad_coeff = torch.zeros_like(coeff) if need_coeff else None
        with torch.autocast(x.device.type, enabled=False):
            d = ctx.basis.derivative_matrix()
            if d is not None:  # psi' = psi @ D: fold D into the coefficients, sum_f (g c^T)_f psi'_f = (g c_D^T) . psi
                H, r = coeff.shape[0], coeff.shape[-1]
                coeff_d = torch.einsum("gf,hmfr->hmgr", d.to(coeff), coeff.view(H, -1, len(d), r)).reshape(H, -1, r)
            for start in range(0, x.shape[2], ctx.rows):
                a = _KANPhi.logits(ctx, x, key, start)  # [B, h, n, M]
                g = grad_phi[:, :, start:start + ctx.rows]  # [B, h, n, r]
                end = start + a.shape[2]
                if need_a:
                    if d is not None:
                        feats = ctx.basis(a)  # [B, h, n, M, nf]
                        grad_a = ((g @ coeff_d.transpose(-1, -2)).view(feats.shape) * feats).sum(-1)  # [B, h, n, M]
                    else:
                        feats, dfeats = ctx.basis.features_and_derivative(a)  # [B, h, n, M, nf] x 2
                        grad_feats = (g @ coeff.transpose(-1, -2)).view(dfeats.shape)  # [B, h, n, M nf] -> 5-D
                        grad_a = (grad_feats * dfeats).sum(-1)  # [B, h, n, M]
                    if key is None:
                        grad_x[:, :, start:end] = grad_a
                    else:
                        if need_x:
                            grad_x[:, :, start:end] = (grad_a @ key) * ctx.scale  # [B, h, n, d]
                        if need_key:
                            grad_key += (grad_a.transpose(-1, -2) @ x[:, :, start:end]) * ctx.scale  # [B, h, M, d]
                else:
                    feats = ctx.basis(a)
                if need_coeff:  # sum over batch and rows of feats^T @ g: [B, h, M nf, r] -> [h, M nf, r]
                    grad_coeff += (feats.flatten(3).transpose(-1, -2) @ g).sum(0)
        return grad_x, grad_key, grad_coeff, None, None, None


def kan_phi(x: torch.Tensor, coeff: torch.Tensor, basis: KANBasis, row_chunk: int | None = None,
            key: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """``Phi_p(a[b, h, k, :]) = sum_{q, f} coeff[h, q nf + f, p] psi_f(a[b, h, k, q])``, memory-efficiently.

    ``x`` is the logits ``a [B, h, N, M]``, or with ``key [B, h, M, d]`` the queries ``[B, h, N, d]`` and
    ``a = scale * x @ key^T``; ``coeff [h, M * num_functions, r]``; returns ``[B, h, N, r]``. For a basis with
    ``analytic_derivative`` and no trainable parameters, a custom autograd function saves only its inputs and
    recomputes the features ``[B, h, n, M, num_functions]`` (and, given the keys, the logits) for ``n = row_chunk``
    query rows at a time in both passes (without a row_chunk, as many rows as keep a chunk under
    ``_CHUNK_ELEMENTS``). Otherwise, and when traced for export, plain autograd over all rows, which stores the
    features. The same values and
    gradients either way (up to rounding); the custom function gives first-order gradients only (double backward,
    e.g. a gradient penalty, needs ``memory_efficient=False`` on the operators).
    """
    B, H, N = x.shape[:3]
    M = x.shape[3] if key is None else key.shape[2]
    trainable = any(p.requires_grad for p in basis.parameters())
    # traced: plain ops; the custom Function and the size-dependent chunking do not trace
    if is_traced() or not basis.analytic_derivative or (trainable and torch.is_grad_enabled()):
        a = x if key is None else (x @ key.transpose(-1, -2)) * scale  # [B, h, N, M]
        return basis(a).reshape(B, H, N, -1) @ coeff  # [B, h, N, M nf] @ [h, M nf, r] -> [B, h, N, r]
    rows = row_chunk or max(1, _CHUNK_ELEMENTS // (B * H * M * basis.num_functions))
    return _KANPhi.apply(x, key, coeff, basis, rows, scale)


class KArAtOperator(nn.Module):
    """The learnable replacement of the row softmax, one per head: ``[B, heads, N, N] -> [B, heads, N, N]``.

    ``sigma(A)[b, h, k, :] = W[h] @ Phi_h(A[b, h, k, :])`` with ``Phi_h(a)_p = sum_{q, f} c[h, q, f, p] psi_f(a_q)``
    (plus ``sum_q b(a_q)`` with a base activation). Parameters ``coefficients [heads, N, num_functions, rank]`` and
    ``weight [heads, N, rank]`` (``W``), both indexed by key position.

    Args:
        num_heads: heads (each has its own coefficients and ``W``).
        grid_size: ``(gh, gw)`` patch grid the operator is built for; ``N = num_prefix_tokens + gh * gw``.
        rank: ``r``, the number of units of ``Phi`` (12 in the paper).
        order: the basis order (Fourier: the grid size ``G``).
        basis: a name in :data:`BASES` or a callable ``(order, **basis_kwargs) -> KANBasis``.
        basis_kwargs: extra arguments of the basis (Fourier: ``zero_frequency``).
        num_prefix_tokens: tokens before the grid (1: the cls token).
        coeff_std: std of the normal coefficient init (default ``1 / sqrt(N * num_functions)``).
        base_activation: ``b(x)`` added to every unit (``"identity"``, ``"silu"``, ``"gelu"``), default none.
        simplex_projection: project each ``Phi`` row onto the simplex before ``W`` (the paper's l1 option).
        dynamic_size: accept other grids by resizing ``c`` and ``W`` (see the module docstring); else raise.
        row_chunk: compute ``Phi`` for this many query rows at a time, so that the basis features exist for one
            chunk only (``[B, heads, row_chunk, N, num_functions]``). Same result; None: all rows at once (the
            memory-efficient path still bounds its chunks, see :func:`kan_phi`). Without the memory-efficient path,
            each chunk is checkpointed when gradients are on (its features recomputed in the backward pass).
        memory_efficient: for a basis with an analytic derivative (Fourier), compute ``Phi`` by :func:`kan_phi`,
            which stores only its inputs for the backward pass (the logits, or ``q`` and ``k``) instead of
            ``num_functions + n_freq`` values per logit, and, given ``value``, form ``Phi @ (W^T @ value)`` instead
            of storing ``sigma(A) [B, heads, N, N]``. Same values and gradients up to rounding; False: plain
            autograd, as before (kept for comparison and benchmarks).

    Example::

        >>> op = KArAtOperator(2, (3, 3), rank=4, order=2)
        >>> op(torch.randn(1, 2, 10, 10)).shape
        torch.Size([1, 2, 10, 10])
    """

    def __init__(self, num_heads: int, grid_size: Sequence[int], rank: int = 12, order: int = 3,
                 basis: str | Callable[..., KANBasis] = "fourier", basis_kwargs: dict[str, Any] | None = None,
                 num_prefix_tokens: int = 1, coeff_std: float | None = None, base_activation: str | None = None,
                 simplex_projection: bool = False, dynamic_size: bool = True, row_chunk: int | None = None,
                 memory_efficient: bool = True) -> None:
        super().__init__()
        grid_size = tuple(int(g) for g in grid_size)
        if row_chunk is not None and row_chunk < 1:
            raise ValueError(f"row_chunk must be >= 1 or None, got {row_chunk=}")
        self.row_chunk, self.memory_efficient = row_chunk, memory_efficient
        if num_heads < 1 or rank < 1 or num_prefix_tokens < 0 or len(grid_size) != 2 or min(grid_size) < 1:
            raise ValueError(f"KArAtOperator needs num_heads, rank >= 1, a 2-D grid_size of positive sides and "
                             f"num_prefix_tokens >= 0, got {num_heads=}, {rank=}, {grid_size=}, {num_prefix_tokens=}")
        if base_activation is not None and base_activation not in _BASE_ACTIVATIONS:
            raise ValueError(f"unknown base_activation '{base_activation}'{suggest(base_activation, _BASE_ACTIVATIONS)}"
                             f" (known: {', '.join(_BASE_ACTIVATIONS)} or None)")
        self.basis = make_basis(basis, order, **(basis_kwargs or {}))
        self.num_heads, self.rank, self.grid_size = num_heads, rank, grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.num_tokens = num_prefix_tokens + grid_size[0] * grid_size[1]
        self.base_activation, self.simplex_projection = base_activation, simplex_projection
        self.dynamic_size = dynamic_size
        nf = self.basis.num_functions
        self.coefficients = nn.Parameter(torch.empty(num_heads, self.num_tokens, nf, rank))
        self.weight = nn.Parameter(torch.empty(num_heads, self.num_tokens, rank))
        self.coeff_std = coeff_std if coeff_std is not None else (self.num_tokens * nf) ** -0.5
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.coefficients, std=self.coeff_std)
        nn.init.trunc_normal_(self.weight, std=0.02)

    def parameters_for(self, grid_size: Sequence[int] | None, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coefficients, weight)`` for ``num_tokens`` keys on ``grid_size``: as built, or resized."""
        if num_tokens == self.num_tokens and (grid_size is None or tuple(grid_size) == self.grid_size):
            return self.coefficients, self.weight
        if grid_size is None or not self.dynamic_size or \
                num_tokens != self.num_prefix_tokens + grid_size[0] * grid_size[1]:
            raise InputSizeError(
                f"this KArAt operator is sized for N={self.num_tokens} tokens ({self.num_prefix_tokens} + "
                f"{self.grid_size[0]}x{self.grid_size[1]} patches), got {num_tokens} tokens (grid {grid_size}); "
                f"resizing needs dynamic_size=True and the patch grid (now dynamic_size={self.dynamic_size})")
        resize = functools.partial(resize_token_grid, old_grid=self.grid_size, new_grid=grid_size,
                                   num_prefix=self.num_prefix_tokens, dim=1, scale_mass=True)
        return resize(self.coefficients), resize(self.weight)

    def forward(self, attn: Logits, grid_size: Sequence[int] | None = None,
                value: torch.Tensor | None = None) -> torch.Tensor:
        """``attn [B, heads, N, N]`` (scaled logits) -> ``sigma(attn) [B, heads, N, N]``, or with ``value [B, heads,
        N, d]`` the attention output ``sigma(attn) @ value [B, heads, N, d]``, formed as ``Phi @ (W^T @ value)`` on
        the memory-efficient path. ``attn`` may also be ``(q [B, heads, N, d], k [B, heads, N, d], scale)`` with
        logits ``scale * q @ k^T``, which the memory-efficient path then computes chunk by chunk and never stores."""
        dtype = (attn[0] if isinstance(attn, tuple) else attn).dtype
        phi, weight = self.phi(attn, grid_size)
        if value is None:
            return (phi @ weight.transpose(-1, -2)).to(dtype)  # [B, h, N, r] @ [h, r, N] -> [B, h, N, N]
        if not self.memory_efficient:
            return (phi @ weight.transpose(-1, -2)).to(dtype) @ value  # [B, h, N, N] @ [B, h, N, d]
        wv = weight.transpose(-1, -2) @ value.to(phi.dtype)  # [h, r, N] @ [B, h, N, d] -> [B, h, r, d]
        return (phi @ wv).to(value.dtype)  # [B, h, N, r] @ [B, h, r, d] -> [B, h, N, d]

    def phi(self, attn: Logits, grid_size: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``attn`` (as in :meth:`forward`) -> ``(Phi [B, heads, N, r], W [heads, N, r])``, both in at least
        float32, so that ``sigma(attn) = Phi @ W^T`` (with the row-wise options applied to ``Phi``)."""
        if isinstance(attn, tuple) and (not self.memory_efficient or self.base_activation is not None):
            q, k, scale = attn
            attn = (q @ k.transpose(-2, -1)) * scale  # [B, heads, N, N]
        B, H, N = (attn[0] if isinstance(attn, tuple) else attn).shape[:3]
        if H != self.num_heads:
            raise ValueError(f"operator built for {self.num_heads} heads, got logits with {H}")
        coeff, weight = self.parameters_for(grid_size, N)
        dtype = torch.promote_types((attn[0] if isinstance(attn, tuple) else attn).dtype, torch.float32)
        coeff = coeff.to(dtype).reshape(H, -1, self.rank)  # [h, N nf, r]
        if isinstance(attn, tuple):  # memory-efficient, no base activation: the logits are never stored
            q, k, scale = attn
            phi = self._options(None, kan_phi(q.to(dtype), coeff, self.basis, self.row_chunk, k.to(dtype), scale))
        elif self.memory_efficient:
            a = attn.to(dtype)
            phi = self._options(a, kan_phi(a, coeff, self.basis, self.row_chunk))
        elif self.row_chunk is None or self.row_chunk >= N:
            phi = self._phi(attn.to(dtype), coeff)
        else:
            a = attn.to(dtype)
            grad = torch.is_grad_enabled() and (a.requires_grad or coeff.requires_grad)
            phi = torch.cat([checkpoint(self._phi, rows, coeff, use_reentrant=False) if grad else self._phi(rows, coeff)
                             for rows in a.split(self.row_chunk, dim=2)], dim=2)
        return phi, weight.to(dtype)

    def _phi(self, a: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        """Logit rows ``[B, h, n, N]`` -> ``Phi`` ``[B, h, n, r]`` by plain autograd (then the row-wise options)."""
        B, H, n, N = a.shape
        feats = self.basis(a)  # [B, h, n, N, nf]
        phi = feats.reshape(B, H, n, -1) @ coeff  # [B, h, n, N nf] @ [h, N nf, r] -> [B, h, n, r]
        return self._options(a, phi)

    def _options(self, a: torch.Tensor | None, phi: torch.Tensor) -> torch.Tensor:
        """The row-wise options on ``Phi [B, h, n, r]`` of the logit rows ``a [B, h, n, N]`` (needed only with a
        base activation)."""
        if self.base_activation is not None:
            phi = phi + _BASE_ACTIVATIONS[self.base_activation](a).sum(-1, keepdim=True)
        if self.simplex_projection:
            phi = simplex_projection(phi)
        return phi


# -- blocks -------------------------------------------------------------------------------------------------------

class KArAtAttention(nn.Module):
    """Multi-head self-attention with the softmax replaced by a :class:`KArAtOperator`: ``[B, N, C] -> [B, N, C]``.

    ``operator`` is this module's own (blockwise) or None (universal: the caller passes the shared one to
    ``forward``). Keys ``qkv``, ``proj`` (timm's) and ``operator.*``.
    """

    def __init__(self, dim: int, num_heads: int, operator: KArAtOperator | None, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.operator = operator
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid_size: Sequence[int] | None = None,
                operator: KArAtOperator | None = None) -> torch.Tensor:
        if (self.operator is None) == (operator is None):
            raise ValueError("KArAtAttention needs exactly one operator: its own (blockwise) or one passed in "
                             "(universal)")
        op = self.operator if operator is None else operator
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        if self.training and self.attn_drop.p > 0:
            logits = (q @ k.transpose(-2, -1)) * self.scale  # [B, heads, N, N]
            x = self.attn_drop(op(logits, grid_size)) @ v  # [B, heads, N, N] @ [B, heads, N, hd]
        else:
            x = op((q, k, self.scale), grid_size, value=v)  # sigma(scale q k^T) @ v: [B, heads, N, hd]
        x = x.transpose(1, 2).reshape(B, N, C)  # [B, heads, N, hd] -> [B, N, C]
        return self.proj_drop(self.proj(x))


class KArAtBlock(nn.Module):
    """Pre-norm ViT block ``x + DropPath(attn(LN(x)))``, ``x + DropPath(MLP(LN(x)))`` on tokens ``[B, N, C]``."""

    def __init__(self, dim: int, num_heads: int, operator: KArAtOperator | None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(dim)
        self.attn = KArAtAttention(dim, num_heads, operator, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, grid_size: Sequence[int] | None = None,
                operator: KArAtOperator | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid_size, operator))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# -- model --------------------------------------------------------------------------------------------------------

MODES = ("blockwise", "universal")


class KArAtViT(nn.Module):
    """ViT with KArAt attention (see the module docstring for the operator, the variants and the size rule).

    Args:
        in_chans: input channels.
        num_classes: classifier outputs (0: no final norm and classifier).
        img_size: square input side the operators and position embedding are built for (multiple of the patch).
        patch_size: patch side (the stride of the token map).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT's.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after embeddings/MLP/projection, on ``sigma(A)``, and
            the stochastic-depth rate of the last block (linear from 0).
        rank: ``r``, units of each operator's ``Phi`` (12 in the paper).
        order: basis order ``G`` (Fourier grid size; the paper's G1/G3).
        mode: ``"blockwise"`` (one operator per block and head, "GnB") or ``"universal"`` (one per head shared by
            all blocks, "GnU").
        basis, basis_kwargs, coeff_std, base_activation, simplex_projection, row_chunk: see :class:`KArAtOperator`.
        dynamic_size: run other input sizes by resizing the position embedding and operators (else raise).
        out_indices: simple-feature-pyramid levels (0..3: strides 4, 8, 16, 32) of :meth:`forward_pyramid`.
        pyramid: build the simple feature pyramid (else ``forward_pyramid`` returns the stride-16 map).

    Example::

        >>> m = KArAtViT(img_size=64, embed_dim=32, depth=2, num_heads=2, rank=4, order=2, num_classes=0)
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 3, 97, 131))]
        [(8, 25, 33), (16, 13, 17), (32, 7, 9), (32, 4, 5)]
    """

    family = "karat"
    head_key_prefixes = ("head.", "norm.")

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, rank: int = 12, order: int = 3, mode: str = "blockwise",
                 basis: str | Callable[..., KANBasis] = "fourier", basis_kwargs: dict[str, Any] | None = None,
                 coeff_std: float | None = None, base_activation: str | None = None, simplex_projection: bool = False,
                 dynamic_size: bool = True, row_chunk: int | None = None, out_indices: Sequence[int] = (0, 1, 2, 3),
                 pyramid: bool = True) -> None:
        super().__init__()
        check_isotropic_args(in_chans, num_classes, depth, patch_size, embed_dim, num_heads, img_size)
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a positive multiple of patch_size ({patch_size}): the "
                             "operators are sized by its token count")
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}'{suggest(mode, MODES)} (known: {', '.join(MODES)})")
        self.in_chans, self.num_classes, self.num_features, self.embed_dim = in_chans, num_classes, embed_dim, embed_dim
        self.patch_size, self.min_input_size = patch_size, patch_size
        self.grid_size = (img_size // patch_size,) * 2
        self.num_prefix_tokens, self.mode, self.dynamic_size = 1, mode, dynamic_size
        self.num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        make_operator = functools.partial(
            KArAtOperator, num_heads, self.grid_size, rank=rank, order=order, basis=basis, basis_kwargs=basis_kwargs,
            coeff_std=coeff_std, base_activation=base_activation, simplex_projection=simplex_projection,
            dynamic_size=dynamic_size, row_chunk=row_chunk)
        rates = drop_path_rates([depth], drop_path_rate)[0]

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, norm=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.shared_operator = make_operator() if mode == "universal" else None
        self.blocks = nn.ModuleList(
            KArAtBlock(embed_dim, num_heads, make_operator() if mode == "blockwise" else None, mlp_ratio, qkv_bias,
                       drop_rate, attn_drop_rate, rates[i]) for i in range(depth))
        self.grad_checkpointing = False
        self.pyramid = SimpleFeaturePyramid(embed_dim, out_indices) if pyramid else None
        self.out_indices = tuple(out_indices) if pyramid else (2,)
        self.feature_info = plain_feature_info(self.pyramid, embed_dim, patch_size, "blocks")
        self.norm = _LayerNorm(embed_dim) if num_classes else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else None
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    _init_weights = staticmethod(init_linear_layernorm)  # timm ViT's linear/LayerNorm init

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules grouping the embeddings (and the shared operator) and each block."""
        return {"stem": r"^(cls_token|pos_embed|patch_embed|shared_operator)", "blocks": r"^blocks\.(\d+)"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations (the basis features above all) in the backward pass."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module | None:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier (``num_classes > 0``, the final norm kept or created) or none at all (``0``)."""
        reset_norm_linear_head(self, num_classes, _LayerNorm)

    def adapt_pretrained(self, key: str, value: torch.Tensor, target_shape: Sequence[int]) -> torch.Tensor | None:
        """A checkpoint tensor of another token grid, patch size or input-channel count made to fit this model;
        :func:`attnseg.load_pretrained` calls it for keys whose shape differs. None for keys it does not adapt.

        ``pos_embed`` and ``patch_embed.proj.weight`` by :func:`~attnseg.backbones._common.adapt_vit_embedding`; an
        operator's ``coefficients [heads, 1 + g*g, nf, r]`` and ``weight [heads, 1 + g*g, r]`` (blockwise
        ``blocks.{i}.attn.operator.*`` or universal ``shared_operator.*``) resized over the patch grid by
        :func:`resize_token_grid` with the token-mass scale, the rule the operators apply at run time to other
        inputs. So a model built at ``img_size`` X and loaded from a checkpoint of size Y computes, on X inputs, what
        the size-Y model computes on them. Only the token axis is adapted (another rank, order or head count is not).
        """
        if key.endswith((".coefficients", ".weight")) and key.rsplit(".", 1)[0].endswith("operator"):
            op = self.get_submodule(key.rsplit(".", 1)[0])
            target = tuple(target_shape)
            if not isinstance(op, KArAtOperator) or value.ndim != len(target) or value.ndim < 3 or \
                    value.shape[:1] + value.shape[2:] != target[:1] + target[2:]:
                return None
            old = square_token_grid(value.shape[1], op.num_prefix_tokens, f"checkpoint {key} {list(value.shape)}")
            return resize_token_grid(value, old, op.grid_size, op.num_prefix_tokens, dim=1, scale_mass=True)
        return adapt_vit_embedding(key, value, target_shape, self.num_prefix_tokens)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_image_input(self, x)
        x = self.patch_embed(x)  # [B, h, w, C] (input padded to whole patches)
        B, h, w, C = x.shape
        if (h, w) != self.grid_size and not self.dynamic_size:
            raise InputSizeError(f"{type(self).__name__} is built for {self.grid_size[0] * self.patch_size}x"
                                 f"{self.grid_size[1] * self.patch_size} inputs (N={self.num_tokens} tokens), got "
                                 f"a {h}x{w} patch grid; set dynamic_size=True to resize the operators")
        pos = resize_token_grid(self.pos_embed, self.grid_size, (h, w), self.num_prefix_tokens)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, h * w, C)], dim=1) + pos  # [B, 1 + hw, C]
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, (h, w), self.shared_operator, use_reentrant=False)
            else:
                x = block(x, (h, w), self.shared_operator)
        return x, (h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's tokens ``[B, 1 + ceil(H/p) * ceil(W/p), C]`` (cls first, before the final norm)."""
        return self._tokens(x)[0]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps at the strides of ``feature_info``: ``[B, C_i, ceil(H/s_i), ceil(W/s_i)]``."""
        tokens, grid = self._tokens(x)
        return token_pyramid(self.pyramid, tokens, grid, x.shape[-2:], self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, N, C]`` -> logits: final LayerNorm, cls token, linear."""
        return cls_token_head(self, x, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))


# -- variants -----------------------------------------------------------------------------------------------------
# The paper's best settings (Table 1): G3 for ViT-T/S, G1 for ViT-B, rank 12, blockwise; pass mode="universal" for
# GnU and order=n for Gn. Extra parameters over the ViT per operator (one per block and head, or per head when
# universal): 2 * n_freq * r * N + N * r, n_freq = G (the paper's equation, the default) or G + 1 with
# basis_kwargs={"zero_frequency": True} (reproduces the paper's Table 13: +0.76M / +1.53M / +1.70M blockwise).

def _create(variant: dict[str, Any], kwargs: dict[str, Any]) -> KArAtViT:
    return KArAtViT(**{**variant, **kwargs})


@BACKBONES.register(cls=KArAtViT)
def karat_vit_tiny(**kwargs: Any) -> KArAtViT:
    """ViT-Tiny/16 at 224 with Fourier-KArAt G3B (order=3, blockwise, r=12)."""
    return _create(dict(embed_dim=192, depth=12, num_heads=3, order=3), kwargs)


@BACKBONES.register(cls=KArAtViT)
def karat_vit_small(**kwargs: Any) -> KArAtViT:
    """ViT-Small/16 at 224 with Fourier-KArAt G3B (order=3, blockwise, r=12)."""
    return _create(dict(embed_dim=384, depth=12, num_heads=6, order=3), kwargs)


@BACKBONES.register(cls=KArAtViT)
def karat_vit_base(**kwargs: Any) -> KArAtViT:
    """ViT-Base/16 at 224 with Fourier-KArAt G1B (order=1, blockwise, r=12)."""
    return _create(dict(embed_dim=768, depth=12, num_heads=12, order=1), kwargs)


@BACKBONES.register(cls=KArAtViT)
def test_karat(**kwargs: Any) -> KArAtViT:
    """A tiny KArAt ViT for CI (64 px, 4x4 patches of 16; no published weights)."""
    return _create(dict(img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, rank=4, order=2), kwargs)


# -- pretrained configurations (MaitySubhajit/KArAt: project page only) ------------------------------------------------
# No official code, weights or licence exist (the repository holds the project page); data settings are DeiT's.
_cfg = pretrained_cfg_factory(paper="2503.10632", origin="https://github.com/MaitySubhajit/KArAt", license="unknown",
                              first_conv="patch_embed.proj", classifier="head")

default_cfgs: dict[str, dict[str, Any]] = {
    name: _cfg() for name in ("karat_vit_tiny", "karat_vit_small", "karat_vit_base")
}
