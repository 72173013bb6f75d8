"""Shifted-window self-attention (Swin Transformer) for 2D and 3D maps, channels-last.

Paper: Ze Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021
(arXiv 2103.14030). Reference code: microsoft/Swin-Transformer (2D) and MONAI's 2D/3D port
(``monai/networks/nets/swin_unetr.py``), written anew here as one dimension-agnostic set of blocks. Swin UNETR
(:mod:`attnseg.models.swin_unetr`) and Att-SwinU-Net (:mod:`attnseg.heads.att_swin_unet`) build on them.

Conventions shared by both official codes, kept because checkpoints depend on them:

- Maps are channels-last ``[B, *S, C]`` (``S`` = ``(H, W)`` or ``(D, H, W)``); a window holds ``N = prod(w)``
  tokens in row-major order.
- An axis no longer than its window uses the whole axis as the window and is not shifted
  (:func:`clip_window`); MONAI applies this per forward, Microsoft's code once for its fixed resolution, and
  the two agree wherever both run.
- Block input is normalised first, then zero-padded on the far side to whole windows (padded tokens are
  attended to, not masked, as in MONAI), and cropped back after attention.
- Shifted windows roll the map by ``-shift`` and mask pairs of tokens from different roll regions with -100
  (not -inf) before the softmax (:func:`shifted_window_mask`).
- The relative position bias table has ``prod(2w - 1)`` rows, indexed by ``relative_position_index`` (query
  minus key, row-major). When a window is clipped to fewer than ``N`` tokens, MONAI gathers the bias with the
  top-left ``n x n`` corner of the index built for the configured window instead of an index for the smaller
  window; :class:`WindowAttention` does the same, so clipped stages (e.g. the 6³ stage of a 96³ Swin UNETR)
  reproduce MONAI exactly.

Attention runs through ``F.scaled_dot_product_attention`` with the bias (and, in shifted blocks, the mask)
as an additive float mask, so no ``[windows, heads, N, N]`` logits tensor is kept for the backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.layers.dims import conv_type
from attnseg.layers.drop import DropPath
from attnseg.layers.mlp import Mlp
from attnseg.registry import suggest

__all__ = ["check_swin_stages", "clip_window", "window_partition", "window_reverse", "relative_position_index", "shifted_window_mask",
           "PatchEmbed", "WindowAttention", "SwinBlock", "PatchMerging", "MERGE_ORDERS"]

MASK_VALUE = -100.0  # both official codes; -inf would change outputs where a padded window row is all masked


def check_swin_stages(width_name: str, width: int, num_heads: Sequence[int], **rates: float) -> None:
    """Constructor checks shared by the Swin encoders: stage ``i`` runs at ``width * 2**i`` channels, which its
    ``num_heads[i]`` must divide, and every dropout rate in ``rates`` lies in ``[0, 1)``.

    Raises:
        ValueError: naming each offending stage or rate.
    """
    bad = [f"stage {i}: {width * 2**i} channels, {h} heads" for i, h in enumerate(num_heads) if (width * 2**i) % h]
    if bad:
        raise ValueError(f"each stage width ({width_name} * 2**i) must be divisible by its num_heads: {bad}")
    for name, rate in rates.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {name}={rate}")


def _pad_far_side(x: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes of a channels-last ``[B, *S, C]`` map by ``pad[i]`` at their far end."""
    return F.pad(x, [0, 0, *(v for p in reversed(pad) for v in (0, p))])


def clip_window(size: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[tuple[int, ...],
                                                                                             tuple[int, ...]]:
    """Window and shift actually used on a map of ``size``: an axis no longer than its window is one window,
    unshifted.

    Example::

        >>> clip_window((6, 20), (7, 7), (3, 3))
        ((6, 7), (0, 3))
    """
    use_window = tuple(n if n <= w else w for n, w in zip(size, window))
    use_shift = tuple(0 if n <= w else s for n, w, s in zip(size, window, shift))
    return use_window, use_shift


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``[B, *S, C] -> [B * nW, N, C]``: non-overlapping windows in row-major order (``S`` divisible by ``window``)."""
    B, *size, C = x.shape
    dims = len(size)
    grid = [n // w for n, w in zip(size, window)]
    x = x.view(B, *(v for g, w in zip(grid, window) for v in (g, w)), C)  # [B, g0, w0, g1, w1, (g2, w2,) C]
    order = (0, *range(1, 2 * dims, 2), *range(2, 2 * dims + 1, 2), 2 * dims + 1)
    return x.permute(order).reshape(-1, math.prod(window), C)  # [B, g0, g1, (g2,) w0, w1, (w2,) C] -> [B*nW, N, C]


def window_reverse(windows: torch.Tensor, window: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, N, C] -> [B, *S, C]``."""
    dims = len(size)
    grid = [n // w for n, w in zip(size, window)]
    C = windows.shape[-1]
    x = windows.view(-1, *grid, *window, C)  # [B, g0, g1, (g2,) w0, w1, (w2,) C]
    order = (0, *(v for i in range(dims) for v in (1 + i, 1 + dims + i)), 2 * dims + 1)
    return x.permute(order).reshape(-1, *size, C)  # [B, g0, w0, g1, w1, (g2, w2,) C] -> [B, *S, C]


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """``[N, N]`` int64: the bias-table row of each (query, key) pair of a window, ``N = prod(window)``.

    Row-major over the per-axis offsets ``query - key + w - 1`` in ``[0, 2w - 2]`` (Swin's rule, 2D and 3D).

    Example::

        >>> relative_position_index((2, 2))
        tensor([[4, 3, 1, 0],
                [5, 4, 2, 1],
                [7, 6, 4, 3],
                [8, 7, 5, 4]])
    """
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)  # [dims, N]
    offsets = coords[:, :, None] - coords[:, None, :]  # [dims, N, N]
    index = torch.zeros(offsets.shape[1:], dtype=torch.long)
    for axis, w in enumerate(window):
        index = index * (2 * w - 1) + offsets[axis] + w - 1
    return index


def shifted_window_mask(size: Sequence[int], window: Sequence[int], shift: Sequence[int],
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``[nW, N, N]`` additive mask of the shifted windows of a (padded) map of ``size``: 0 within a roll region,
    -100 across regions. Each axis splits into ``[0, n - w)``, ``[n - w, n - s)``, ``[n - s, n)``."""
    region = torch.zeros(*size, dtype=torch.float32, device=device)
    for axis, (n, w, s) in enumerate(zip(size, window, shift)):
        label = torch.zeros(n, device=device)
        if s > 0:  # an unshifted axis is one region (MONAI's slices give every index the same label there)
            label[n - w:n - s] = 1
            label[n - s:] = 2
        region = region * 3 + label.view(*([1] * axis), n, *([1] * (len(size) - axis - 1)))
    windows = window_partition(region[None, ..., None], window)[..., 0]  # [nW, N]
    same = windows[:, None, :] == windows[:, :, None]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, MASK_VALUE)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: ``[B, C_in, *S] -> [B, *ceil(S / p), C]`` channels-last.

    The input is zero-padded on the far side to whole patches (MONAI, and Microsoft's detection Swin), then a
    ``p``-strided conv with bias (``proj``) and an optional LayerNorm (``norm``). Keys are both official codes'.

    Example::

        >>> PatchEmbed(3, 8, patch_size=4)(torch.randn(1, 3, 10, 16)).shape
        torch.Size([1, 3, 4, 8])
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, spatial_dims: int = 2, norm: bool = True) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.patch_size = patch_size
        self.proj = conv_type(spatial_dims)(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = [-n % self.patch_size for n in x.shape[2:]]
        if any(pad):
            x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])
        x = self.proj(x).movedim(1, -1)  # [B, C, *S/p] -> [B, *S/p, C]
        return self.norm(x) if self.norm is not None else x


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a relative position bias.

    ``[B * nW, n, C] -> [B * nW, n, C]``, ``n <= N = prod(window_size)`` (see the module docstring for clipped
    windows). Keys ``qkv``, ``proj``, ``relative_position_bias_table [prod(2w - 1), heads]``; the index is a
    non-persistent buffer (a function of ``window_size``; converters drop the official copy).

    Args:
        dim: channels ``C``; ``num_heads`` must divide it.
        num_heads: attention heads.
        window_size: window per axis (2 or 3 values).
        qkv_bias: bias on the q/k/v projection.
        qk_scale: logit scale (default ``head_dim ** -0.5``).
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.window_size = tuple(int(w) for w in window_size)
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(math.prod(2 * w - 1 for w in self.window_size), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self, n: int) -> torch.Tensor:
        """``[heads, n, n]``: the bias of a window of ``n`` tokens (top-left corner of the full index, as MONAI)."""
        index = self.relative_position_index[:n, :n].reshape(-1)
        # contiguous, so that adding the shift mask gives a contiguous [nW, heads, n, n] (no copy before SDPA)
        return self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B * nW, n, C]``; ``mask [nW, n, n]`` (shifted windows) or None."""
        Bw, n, C = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(Bw, n, 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # each [B*nW, heads, n, d]
        bias = self.position_bias(n).to(q.dtype)  # [heads, n, n]
        dropout = self.attn_drop if self.training else 0.0
        if mask is None:
            # a 4D mask: with [heads, n, n] PyTorch's CPU dispatch falls back to the unfused math kernel (4x slower)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], dropout_p=dropout, scale=self.scale)
        else:
            nw = mask.shape[0]
            # One [B, nW * heads, n, n] problem whose mask [1, nW * heads, n, n] broadcasts over the batch.
            full = (bias[None] + mask.to(q.dtype)[:, None]).reshape(1, nw * heads, n, n)
            q, k, v = (t.reshape(Bw // nw, nw * heads, n, -1) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=dropout, scale=self.scale)
            out = out.view(Bw, heads, n, -1)
        out = out.transpose(1, 2).reshape(Bw, n, C)  # [B*nW, heads, n, d] -> [B*nW, n, C]
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on channels-last maps ``[B, *S, C] -> [B, *S, C]`` of any size.

    ``x + DropPath(W-MSA(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``; W-MSA pads to whole windows after the
    norm and rolls by ``-shift`` when shifted (module docstring). Keys ``norm1``, ``attn.*``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2`` (Microsoft's names; MONAI's ``mlp.linear1/2`` are renamed by its converter).

    Args:
        dim, num_heads, qkv_bias, qk_scale: as :class:`WindowAttention`.
        window_size: window per axis.
        shift_size: shift per axis (0 for a regular block, usually ``w // 2`` for a shifted one).
        mlp_ratio: MLP hidden width over ``dim``.
        drop, attn_drop, drop_path: dropout after the projections, on attention weights, and stochastic depth.
        norm_layer: norm over channels (default ``nn.LayerNorm``).
        mask_size: for a shifted block, the padded map size whose mask is kept as the persistent buffer
            ``attn_mask`` (Microsoft's fixed-resolution models store it in their checkpoints); maps of that size
            use the buffer, others compute their mask. None: no buffer.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], shift_size: Sequence[int] | None = None,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU, mask_size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.window_size = tuple(int(w) for w in window_size)
        self.shift_size = tuple(int(s) for s in shift_size) if shift_size is not None else (0,) * len(window_size)
        if len(self.shift_size) != len(self.window_size) or any(not 0 <= s < w for s, w in
                                                                 zip(self.shift_size, self.window_size)):
            raise ValueError(f"shift_size must have one value in [0, window) per axis, got {self.shift_size} for "
                             f"window_size {self.window_size}")
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.mask_size: tuple[int, ...] | None = None
        if mask_size is not None and any(self.shift_size):
            self.mask_size = tuple(int(n) for n in mask_size)
            window, shift = clip_window(self.mask_size, self.window_size, self.shift_size)
            self.register_buffer("attn_mask", shifted_window_mask(self.mask_size, window, shift))

    def window_mask(self, padded: Sequence[int], device: torch.device) -> torch.Tensor | None:
        """The mask this block uses on a map padded to ``padded`` (None when that map is not shifted)."""
        window, shift = clip_window(padded, self.window_size, self.shift_size)
        if not any(shift):
            return None
        if self.mask_size is not None and tuple(padded) == self.mask_size:
            return self.attn_mask
        return shifted_window_mask(padded, window, shift, device)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The W-MSA branch: ``[B, *S, C] -> [B, *S, C]``. ``mask``: a precomputed :meth:`window_mask` (a stage
        computes it once for all its blocks) or None to let the block decide."""
        size = x.shape[1:-1]
        window, shift = clip_window(size, self.window_size, self.shift_size)
        x = self.norm1(x)
        pad = [-n % w for n, w in zip(size, window)]
        if any(pad):
            x = _pad_far_side(x, pad)
        padded = x.shape[1:-1]
        axes = tuple(range(1, len(size) + 1))
        shifted = any(shift)
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=axes)
            if mask is None:
                mask = self.window_mask(padded, x.device)
        windows = self.attn(window_partition(x, window), mask if shifted else None)  # [B*nW, N, C]
        x = window_reverse(windows, window, padded)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=axes)
        if any(pad):
            x = x[(slice(None), *(slice(0, n) for n in size))]
        return x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attention(x, mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# Concatenation order of the 2^D stride-2 sub-grids before the norm, as per-axis offsets. Checkpoints depend on it.
MERGE_ORDERS: dict[str, list[tuple[int, ...]]] = {
    # Microsoft Swin and MONAI in 2D (both MONAI modes): (h, w) = (0,0), (1,0), (0,1), (1,1).
    "2d": [(0, 0), (1, 0), (0, 1), (1, 1)],
    # MONAI >= 1.5 downsample="merging" (#8285).
    "current": [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)],
    # MONAI 0.9-1.4 downsample="merging": 010 and 001 twice, 110 and 011 never; every published 3D checkpoint.
    "legacy": [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)],
    # MONAI downsample="mergingv2": lexicographic (d, h, w).
    "v2": [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)],
}


class PatchMerging(nn.Module):
    """Stride-2 downsampling of a channels-last map: ``[B, *S, C] -> [B, *ceil(S / 2), 2C]``.

    Odd sizes are zero-padded on the far side; the ``2^D`` sub-grids are concatenated on channels in ``order``
    (see ``MERGE_ORDERS``; 2D always uses ``"2d"``), then ``norm`` (``LayerNorm(2^D C)``) and ``reduction``
    (``Linear(2^D C -> 2C)``, no bias).

    Example::

        >>> m = PatchMerging(8, spatial_dims=3, order="legacy")
        >>> m(torch.randn(1, 5, 6, 7, 8)).shape
        torch.Size([1, 3, 3, 4, 16])
    """

    def __init__(self, dim: int, spatial_dims: int = 2, order: str = "current",
                 norm_layer: type[nn.Module] = nn.LayerNorm, out_dim: int | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        choices = ("current", "legacy", "v2")
        if order not in choices and order != "2d":
            raise ValueError(f"unknown merge order '{order}'{suggest(order, choices)} (choose from {', '.join(choices)})")
        self.order = "2d" if spatial_dims == 2 else order
        parts = 2**spatial_dims
        self.norm = norm_layer(parts * dim)
        self.reduction = nn.Linear(parts * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[1:-1]
        if any(n % 2 for n in size):
            x = _pad_far_side(x, [n % 2 for n in size])
        parts = [x[(slice(None), *(slice(o, None, 2) for o in offsets))] for offsets in MERGE_ORDERS[self.order]]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))

    def extra_repr(self) -> str:
        return f"order={self.order!r}"

