"""Att-SwinU-Net's decoder: the Swin-Unet token decoder with cross-contextual attention (CCA) skips, over any pyramid.

Paper: Ehsan Khodapanah Aghdam, Reza Azad, Maral Zarvani, Dorit Merhof, "Attention Swin U-Net: Cross-Contextual
Attention Mechanism for Skin Lesion Segmentation", ISBI 2023 (arXiv 2210.16898). Reference code:
NITR098/AttSwinUNet @ 4b14f37 (``model/decoder.py``, ``model/skipconnection/crossvit.py``), itself Swin-Unet
(HuCaoFighting/Swin-Unet) with a modified skip path; written anew here on :mod:`attnseg.layers.swin`. The published
pairing with Swin-Unet's encoder is :mod:`attnseg.models.att_swin_unet`.

The decoder works on channels-last token maps with the channel plan ``C * 2**i`` at stride ``4 * 2**i``:

1. each pyramid level (NCHW) becomes a channels-last map; a level whose width is not its plan width gets a
   ``Linear`` + ``LayerNorm`` adapter (``adapters.{i}``; identity where the widths already match, as in the
   published pairing, whose skips are the encoder's stage inputs and whose deepest level is ``LN(stage 4)``);
2. ``expand``: PatchExpand of the deepest level (``Linear(8C -> 16C)`` without bias, each token's channels read as
   a 2x2 block ``(p1, p2, c)``, ``LayerNorm``) to stride 16 (the official ``layers_up.0``);
3. per skip level, deepest first (``levels.{i}``, official ``layers_up.{n-1-i}`` and ``concat_back_dim``): CCA
   between the decoder tokens ``X`` and the skip tokens ``S`` (``cca``, on the ``skip_levels`` deepest levels),
   ``Linear(2C_i -> C_i)`` of their channel concatenation (``fuse``), ``depths[i]`` Swin blocks (every second one
   shifted by half a window) and, above the finest level, a PatchExpand to the next level (``upsample``);
4. ``norm`` (official ``norm_up``), ``final_expand`` (``Linear(C -> 16C)`` without bias, 4x4 blocks, ``LayerNorm``;
   official ``up``) and a bias-free 1x1 conv to ``num_classes`` (``output``).

**Cross-contextual attention** (:class:`CrossContextAttention`, lucidrains' CrossViT ``CrossTransformer`` as the
official code uses it: ``cca_depth`` layers of two pre-norm attentions, ``cca_heads`` x ``cca_head_dim`` wide, the
same width for both streams). Each stream is summarised by the mean of its tokens ``g``; in each layer
``g_X += Attn(q = LN(g_X), kv = [LN(g_X); context_S])`` and ``g_S += Attn(q = LN(g_S), kv = [LN(g_S); context_X])``
(the context tokens are not normalised and not updated). Two modes:

- ``cca_mode="faithful"``: the official semantics exactly. The context is the other stream **without its token 0**
  (``context_S = S[1:]``), and the result replaces **token 0** of each stream: ``X' = [g_X; X[1:]]``,
  ``S' = [g_S; S[1:]]``. Every other token passes unchanged, so the attended context enters one token per level
  and spreads from there only as far as the following windows reach. This is what the published model and any
  official checkpoint compute.
- ``cca_mode="broadcast"``: a deliberate correction (not the paper's code). The context is the whole other stream
  (token 0 included) and the update the summary token received, ``g_final - g_initial``, is added to **every** token
  of its stream: ``X' = X + (g_X,final - mean(X))``, likewise for ``S``. So every position receives the
  cross-context meant for the level, the tokens keep their own content (a token is not replaced by the summary,
  which would erase it), and the parameters are those of the faithful mode: official weights load into either.

The official code also has a "spatial attention" switch (``spatial_attention='1'``, ``operationaddatten``): it adds
or multiplies the encoder's attention maps into the attention maps the decoder blocks *return*, which are discarded;
it changes nothing (max |diff| 0, recorded in the parity fixture), so this head has no such option.

**Input sizes.** The official model runs at 224x224 only (fixed-size attention masks). Here any size works: every
level must be exactly twice the next (a pyramid of an image whose sides are multiples of ``size_divisor`` = the
deepest stride; :class:`~attnseg.models.Segmentor` pads with zeros and crops back), and each Swin block pads its
map to whole windows after its first norm and crops back (MONAI's rule, :mod:`attnseg.layers.swin`); maps no
larger than a window use one unshifted window. Where the official model also runs (224x224 with window 7: maps of
56, 28, 14, 7) nothing is padded and the outputs are the official ones. Elsewhere three things differ from a
hypothetical official model at that size: padded tokens take part in window attention, the Segmentor's zero
padding enters the CCA means, and shifted-window masks are computed for the padded size. ``img_size`` (the
official fixed size) makes the shifted blocks keep the official ``attn_mask`` buffers, used at that size only.

**Other deviations.** ``num_classes`` is honoured (the official decoder never receives it and always has 9
outputs). Stochastic depth rises over the decoder's own blocks (the official code spreads 0.1 over the encoder's
four stages, so its decoder rates are slightly lower; training only). CCA levels that ``skip_levels`` leaves out
have no modules here (the official code builds all three).

Forward contract: ``forward(features, image)``; ``image`` is only used for its size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.backbones._common import init_linear_layernorm
from attnseg.heads._common import check_head_inputs, label_map
from attnseg.layers.drop import drop_path_rates
from attnseg.layers.swin import SwinBlock, clip_window
from attnseg.registry import HEADS, suggest

__all__ = ["CCA_MODES", "CrossAttention", "CrossContextAttention", "PatchExpand", "AttSwinUNetHead", "swin_layer"]

CCA_MODES = ("faithful", "broadcast")


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention of one summary token over ``[itself; context]`` (CrossViT's
    ``PreNorm(Attention)`` with ``kv_include_self=True``).

    ``query [B, 1, C]``, ``context [B, L, C]`` -> ``[B, 1, C]`` (the update, without the residual). Only the query
    is normalised (``norm``); ``to_q`` and ``to_kv`` have no bias, ``to_out`` has one; scale ``head_dim ** -0.5``.

    Args:
        dim: token width ``C``.
        heads, head_dim: attention heads and their width (inner width ``heads * head_dim``).
        dropout: on the attention weights and after ``to_out`` (training only).
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim)
        self.out_drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B = query.shape[0]
        h, d = self.heads, self.head_dim
        query = self.norm(query)
        kv_in = torch.cat([query, context], dim=1)  # [B, 1 + L, C]
        q = self.to_q(query).view(B, 1, h, d).transpose(1, 2)  # [B, h, 1, d]
        k, v = self.to_kv(kv_in).view(B, -1, 2, h, d).permute(2, 0, 3, 1, 4)  # each [B, h, 1 + L, d]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             scale=d**-0.5)
        return self.out_drop(self.to_out(out.transpose(1, 2).reshape(B, 1, h * d)))  # [B, 1, C]


class CrossContextAttention(nn.Module):
    """Cross-contextual attention between decoder tokens ``x [B, L, C]`` and skip tokens ``skip [B, L', C]``.

    Returns ``(x', skip')`` of the input shapes; ``mode`` is ``"faithful"`` (token 0 replaced) or ``"broadcast"``
    (the update added to every token), see the module docstring. Keys: ``layers.{k}.0`` (``x`` attends to ``skip``)
    and ``layers.{k}.1`` (``skip`` attends to ``x``), each a :class:`CrossAttention`.

    Example::

        >>> cca = CrossContextAttention(16, depth=2, heads=2, head_dim=8)
        >>> x, s = torch.randn(2, 49, 16), torch.randn(2, 49, 16)
        >>> x2, s2 = cca(x, s)
        >>> bool((x2[:, 1:] == x[:, 1:]).all()), bool((x2[:, 0] == x[:, 0]).all())
        (True, False)
    """

    def __init__(self, dim: int, depth: int = 2, heads: int = 8, head_dim: int = 64, dropout: float = 0.0,
                 mode: str = "faithful") -> None:
        super().__init__()
        if mode not in CCA_MODES:
            raise ValueError(f"cca_mode must be one of {', '.join(CCA_MODES)}, got {mode!r}{suggest(mode, CCA_MODES)}")
        self.mode = mode
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttention(dim, heads, head_dim, dropout), CrossAttention(dim, heads, head_dim, dropout)])
            for _ in range(depth))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g_x, g_s = x.mean(1, keepdim=True), skip.mean(1, keepdim=True)  # [B, 1, C] summaries
        faithful = self.mode == "faithful"
        ctx_x, ctx_s = (x[:, 1:], skip[:, 1:]) if faithful else (x, skip)  # the official code drops token 0
        g_x0, g_s0 = g_x, g_s
        for x_attends_skip, skip_attends_x in self.layers:
            g_x = x_attends_skip(g_x, ctx_s) + g_x
            g_s = skip_attends_x(g_s, ctx_x) + g_s
        if faithful:
            return torch.cat([g_x, ctx_x], dim=1), torch.cat([g_s, ctx_s], dim=1)
        return x + (g_x - g_x0), skip + (g_s - g_s0)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class PatchExpand(nn.Module):
    """Swin-Unet's patch expanding: ``[B, H, W, C] -> [B, sH, sW, out_dim]`` channels-last.

    ``expand`` (``Linear(C -> s*s*out_dim)``, no bias) then each token's channels read as an ``s x s`` block in the
    order ``(p1, p2, c)`` (einops ``'b h w (p1 p2 c) -> b (h p1) (w p2) c'``), then ``norm`` (``LayerNorm(out_dim)``).

    Example::

        >>> PatchExpand(16, 8, scale=2)(torch.randn(1, 3, 5, 16)).shape
        torch.Size([1, 6, 10, 8])
    """

    def __init__(self, dim: int, out_dim: int, scale: int = 2) -> None:
        super().__init__()
        self.scale, self.out_dim = scale, out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        s, c = self.scale, self.out_dim
        x = self.expand(x).view(B, H, W, s, s, c).permute(0, 1, 3, 2, 4, 5)  # [B, H, p1, W, p2, c]
        return self.norm(x.reshape(B, H * s, W * s, c))


def swin_layer(dim: int, depth: int, num_heads: int, window_size: int, drop_path: Sequence[float],
               mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0,
               attn_drop: float = 0.0, fixed_size: Sequence[int] | None = None) -> nn.ModuleList:
    """``depth`` 2D Swin blocks, every second one shifted by half a window (Swin's ``BasicLayer`` blocks).

    ``fixed_size``: the map size of a fixed-resolution official model; shifted blocks whose windows really shift at
    that size keep its mask as the persistent ``attn_mask`` buffer (official checkpoints hold them).
    """
    window, shift = (window_size,) * 2, (window_size // 2,) * 2
    mask_size = None
    if fixed_size is not None:
        use_window, use_shift = clip_window(fixed_size, window, shift)
        if any(use_shift):
            mask_size = tuple(-(-n // w) * w for n, w in zip(fixed_size, use_window))  # the padded size
    return nn.ModuleList(
        SwinBlock(dim, num_heads, window, shift if i % 2 else (0, 0), mlp_ratio, qkv_bias, qk_scale, drop, attn_drop,
                  drop_path[i], mask_size=mask_size if i % 2 else None) for i in range(depth))


class DecoderLevel(nn.Module):
    """One skip level: ``x, skip [B, H, W, C] -> [B, H, W, C]`` (finest level) or ``[B, 2H, 2W, C/2]``.

    Optional CCA (``cca``), ``fuse`` (``Linear(2C -> C)``) of the channel concatenation, Swin blocks (``blocks``),
    optional PatchExpand (``upsample``).
    """

    def __init__(self, dim: int, blocks: nn.ModuleList, cca: CrossContextAttention | None, upsample: bool) -> None:
        super().__init__()
        self.cca = cca
        self.fuse = nn.Linear(2 * dim, dim)
        self.blocks = blocks
        self.upsample = PatchExpand(dim, dim // 2, 2) if upsample else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.cca is not None:
            B, H, W, C = x.shape
            x_tok, skip_tok = self.cca(x.reshape(B, H * W, C), skip.reshape(B, H * W, C))  # [B, HW, C] each
            x = torch.cat([x_tok, skip_tok], dim=-1).view(B, H, W, 2 * C)
        else:
            x = torch.cat([x, skip], dim=-1)  # [B, H, W, 2C]
        x = self.fuse(x)  # [B, H, W, C]
        for block in self.blocks:
            x = block(x)
        return self.upsample(x) if self.upsample is not None else x


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")


class AttSwinUNetHead(nn.Module):
    """Swin-Unet token decoder with cross-contextual attention skips, over a pyramid at strides 4, 8, 16, ...

    Args:
        in_channels: channels of each pyramid level, shallow to deep (the deepest is the bottleneck).
        strides: ``[4, 8, ..., 4 * 2**(n-1)]`` with ``n >= 2`` levels (the published model: ``[4, 8, 16, 32]``).
        num_classes: output channels (1 = binary, sigmoid > 0.5 in :meth:`postprocess`).
        spatial_dims: 2 (the only rank implemented).
        in_chans: image channels (part of the head contract; unused, the decoder never sees the image).
        embed_dim: ``C`` of the channel plan ``C * 2**i`` (default: ``in_channels[0]``); levels of another width get
            a ``Linear`` + ``LayerNorm`` adapter.
        depths: Swin blocks per skip level, shallow to deep (``n - 1`` values).
        num_heads: heads per skip level (default: plan width // 32, at least 1; the published model: 3, 6, 12).
        window_size: Swin window side.
        mlp_ratio, qkv_bias, qk_scale: Swin block options.
        drop_rate: dropout in the Swin blocks and in CCA; ``attn_drop_rate`` on Swin attention weights.
        drop_path_rate: stochastic depth, rising linearly over the decoder's blocks.
        cca_mode: ``"faithful"`` (official: token 0 replaced) or ``"broadcast"`` (update added to every token).
        skip_levels: how many of the deepest skip levels use CCA (the official ``skip_num``; default all,
            the paper's model; 0 = plain Swin-Unet skips).
        cca_depth, cca_heads, cca_head_dim: CCA layers and attention shape (official: 2, 8, 64).
        img_size: the fixed input size of official checkpoints (int or ``(H, W)``): shifted blocks keep that size's
            attention masks as ``attn_mask`` buffers (used at that size only). None: no buffers.

    Forward: ``features`` (list of ``[B, C_i, H / s_i, W / s_i]``) and ``image`` ``[B, *, H, W]`` with ``H``, ``W``
    divisible by ``size_divisor`` -> logits ``[B, num_classes, H, W]``.

    Example::

        >>> head = AttSwinUNetHead([16, 32, 64, 128], [4, 8, 16, 32], num_classes=2, num_heads=[1, 2, 4], window_size=4)
        >>> feats = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip([16, 32, 64, 128], [4, 8, 16, 32])]
        >>> head(feats, torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 2, 64, 96])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        spatial_dims: int = 2,
        in_chans: int = 3,
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        cca_mode: str = "faithful",
        skip_levels: int | None = None,
        cca_depth: int = 2,
        cca_heads: int = 8,
        cca_head_dim: int = 64,
        img_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        in_channels, strides = [int(c) for c in in_channels], [int(s) for s in strides]
        if len(in_channels) != len(strides) or len(strides) < 2:
            raise ValueError(f"in_channels and strides need one value per pyramid level and at least 2 levels, got "
                             f"{in_channels=}, {strides=}")
        if strides != [4 * 2**i for i in range(len(strides))]:
            raise ValueError(f"AttSwinUNetHead needs pyramid strides 4, 8, 16, ... doubling from 4 (the final 4x patch "
                             f"expansion starts at stride 4), e.g. [4, 8, 16, 32]; got {strides=}")
        if any(c < 1 for c in in_channels):
            raise ValueError(f"in_channels must all be >= 1, got {in_channels=}")
        if spatial_dims != 2:
            raise ValueError(f"AttSwinUNetHead is 2D only (spatial_dims=2), got {spatial_dims=}")
        embed_dim = in_channels[0] if embed_dim is None else embed_dim
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("embed_dim", embed_dim),
                            ("window_size", window_size), ("cca_depth", cca_depth), ("cca_heads", cca_heads),
                            ("cca_head_dim", cca_head_dim)):
            _positive_int(name, value)
        n_skip = len(strides) - 1
        widths = [embed_dim * 2**i for i in range(len(strides))]
        depths = [2] * n_skip if depths is None else [int(d) for d in depths]
        num_heads = [max(1, w // 32) for w in widths[:-1]] if num_heads is None else [int(h) for h in num_heads]
        if len(depths) != n_skip or min(depths) < 1:
            raise ValueError(f"depths needs {n_skip} values >= 1 (one per skip level, strides {strides[:-1]}), got "
                             f"{depths=}")
        if len(num_heads) != n_skip or min(num_heads) < 1:
            raise ValueError(f"num_heads needs {n_skip} values >= 1 (one per skip level, strides {strides[:-1]}), got "
                             f"{num_heads=}")
        bad = [f"level {i}: width {w}, {h} heads" for i, (w, h) in enumerate(zip(widths, num_heads)) if w % h]
        if bad:
            raise ValueError(f"each level width (embed_dim * 2**i) must be divisible by its num_heads: {bad}")
        if cca_mode not in CCA_MODES:
            raise ValueError(f"cca_mode must be one of {', '.join(CCA_MODES)}, got {cca_mode!r}"
                             f"{suggest(str(cca_mode), CCA_MODES)}")
        skip_levels = n_skip if skip_levels is None else skip_levels
        if not isinstance(skip_levels, int) or isinstance(skip_levels, bool) or not 0 <= skip_levels <= n_skip:
            raise ValueError(f"skip_levels must be an int in [0, {n_skip}] (CCA on that many of the deepest skip "
                             f"levels), got {skip_levels=}")
        for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                           ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {name}={rate}")
        fixed = None
        if img_size is not None:
            fixed = (img_size, img_size) if isinstance(img_size, int) else tuple(int(n) for n in img_size)
            if len(fixed) != 2 or any(n < 1 or n % strides[-1] for n in fixed):
                raise ValueError(f"img_size must be one or two sizes divisible by {strides[-1]} (the deepest stride), "
                                 f"got {img_size=}")

        self.in_channels, self.strides, self.num_classes = in_channels, strides, num_classes
        self.spatial_dims, self.in_chans, self.embed_dim = 2, in_chans, embed_dim
        self.cca_mode, self.skip_levels = cca_mode, skip_levels
        self.size_divisor = strides[-1]
        self.adapters = nn.ModuleList(
            nn.Identity() if c == w else nn.Sequential(nn.Linear(c, w), nn.LayerNorm(w))
            for c, w in zip(in_channels, widths))
        self.expand = PatchExpand(widths[-1], widths[-2], 2)
        rates = drop_path_rates(depths, drop_path_rate)
        levels = []
        for i in range(n_skip):
            size = None if fixed is None else tuple(n // strides[i] for n in fixed)
            blocks = swin_layer(widths[i], depths[i], num_heads[i], window_size, rates[i], mlp_ratio, qkv_bias,
                                qk_scale, drop_rate, attn_drop_rate, size)
            cca = (CrossContextAttention(widths[i], cca_depth, cca_heads, cca_head_dim, drop_rate, cca_mode)
                   if i >= n_skip - skip_levels else None)
            levels.append(DecoderLevel(widths[i], blocks, cca, upsample=i > 0))
        self.levels = nn.ModuleList(levels)
        self.norm = nn.LayerNorm(embed_dim)
        self.final_expand = PatchExpand(embed_dim, embed_dim, 4)
        self.output = nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=False)
        self.apply(init_linear_layernorm)  # the official init (convs keep PyTorch's)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        check_head_inputs(self, features, image, None)
        maps = [adapter(f.movedim(1, -1)) for adapter, f in zip(self.adapters, features)]  # [B, H_i, W_i, C_i]
        x = self.expand(maps[-1])  # [B, H/16, W/16, 4C] for 4 levels
        for i in range(len(self.levels) - 1, -1, -1):
            x = self.levels[i](x, maps[i])  # [B, H_{i-1}, W_{i-1}, C_{i-1}]; the finest level stays at stride 4
        x = self.final_expand(self.norm(x))  # [B, H, W, C]
        return self.output(x.movedim(-1, 1))  # [B, num_classes, H, W]

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """Label map ``[B, *S]`` (int64): argmax over classes, or sigmoid > 0.5 when there is one channel."""
        return label_map(logits)


HEADS.register("att_swin_unet", cls=AttSwinUNetHead)(AttSwinUNetHead)
