"""TransNeXt: a PVT-style hierarchical ViT with aggregated (foveal) attention and a convolutional GLU.

Paper: Dai Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", CVPR 2024, arXiv 2311.17132.
Official code: DaiShiResearch/TransNeXt @ c8a9974 (Apache-2.0): ``classification/transnext.py`` with
``attention_native.py`` (the classifier), ``segmentation/*/transnext_native.py`` and ``detection/*/transnext_native.py``
(the mm-style dense backbones). This port is written from the paper and those files; its state_dict keys are the
official ones, so official classification and dense checkpoints load unchanged (:mod:`attnseg.convert.transnext`
unwraps them and checks every key).

Per stage: an overlapping patch embedding (conv 7x7 stride 4, then 3x3 stride 2; LayerNorm eps 1e-5), blocks
``x + attn(LN(x))``, ``x + ConvGLU(LN(x))`` (eps 1e-6), and a stage LayerNorm. Stages with ``sr_ratio > 1`` use
:class:`AggregatedAttention`: each query attends, in one softmax, to its centred ``window_size`` x ``window_size``
neighbourhood (zero-padded at the borders: out-of-image slots are masked) and to a pooled grid of tokens; stages with
``sr_ratio == 1`` use full :class:`Attention`. Both use L2-normalised queries and keys, a learned query embedding, a
softplus temperature and the length scale ``ln(#keys)``, and a continuous position bias (CPB) from a small MLP over
log-spaced relative coordinates.

Faithfulness: with the official weights, logits and stage outputs equal the official classifier's at its ``img_size``
and the dense backbones' at any size, in both bias modes (``tests/backbones/test_transnext.py`` checks the
``transnext_cls_tiny_cfg``, ``transnext_cls_fixedpool_cfg`` and ``transnext_dense_tiny_cfg`` parity fixtures).
Deviations, all additive:

- **Any input size for the classifier too.** The official classifier bakes ``img_size`` into buffers and only runs at
  exactly that size (its most reported issue). Here one class serves both uses: the geometry (pool grid, length
  scale, border mask, CPB coordinates) is derived per forward from the actual map size, as the dense backbones do.
  At ``img_size`` this is the official classifier; at other sizes it is the official dense backbone with the same
  weights. ``bias_mode="interpolate"`` (default, the official dense default) evaluates the CPB on the ``img_size``
  grid and resizes it bilinearly, first over the keys then over the queries; ``"extrapolate"`` evaluates it on the
  actual grid (the ``*_ms_extrapolation`` configs). ``fixed_pool_size`` ("linear inference mode") keeps the pooled
  grid at that size whatever the input. Nothing depends on buffers, so nothing is missing from checkpoints.
- **The sliding window runs on** :mod:`attnseg.ops` (``na2d_qk`` / ``na2d_av`` in ``mode="zeropad"``: a centred,
  zero-padded window, the unfold semantics) instead of unfolding full-size copies of keys and values.
- Stage 4 full attention runs through ``scaled_dot_product_attention`` (the CPB as its additive mask).
- Inputs are checked: wrong channels or a side below ``min_input_size`` (``max_i 2^(i+2) * sr_ratios[i]``: 32 for
  the released models, 64 for micro_AAAA; the pooled grid needs one cell) raise
  :class:`~attnseg.errors.InputSizeError`. Every conv zero-pads, so stage ``i`` is ``ceil(H / 2^(i+2))`` high.
- ``num_classes=0`` removes the classifier; ``forward`` then raises. ``set_grad_checkpointing`` takes the stages.

Tokens are ``[B, N, C]`` inside a stage, as in the official code; pyramid outputs are NCHW.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnseg.backbones._common import check_image_input, init_linear_layernorm, pretrained_cfg_factory
from attnseg.layers import DropPath, drop_path_rates
from attnseg.ops import na2d_av, na2d_qk
from attnseg.registry import BACKBONES

__all__ = ["TransNeXt", "AggregatedAttention", "Attention", "ConvolutionalGLU", "transnext_micro", "transnext_tiny",
           "transnext_small", "transnext_base", "transnext_micro_aaaa", "transnext_small_384", "transnext_base_384"]

_EPS = 1e-6  # block and stage norms; the patch-embed norms and the pooled-token norm keep nn.LayerNorm's 1e-5
BIAS_MODES = ("interpolate", "extrapolate")


# -- continuous position bias (CPB) geometry -------------------------------------------------------------------------

@functools.lru_cache(maxsize=128)
def cpb_coordinates(query_size: tuple[int, int], key_size: tuple[int, int],
                    pretrain_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative coordinates of every (query, key) pair, deduplicated: ``(index [Nq * Nk], table [U, 2])``.

    Query coordinates are the cell indices ``0..H-1`` per axis; key coordinates are those indices average-pooled to
    the key grid (the centres of the pooled cells). Offsets are scaled by ``8 / (pretrain_len - 1)`` and mapped to
    ``sign(r) * log2(1 + |r|) / 3``. ``table[index]`` gives the pairs row-major over queries, then keys. CPU,
    float32 (the official dtype); cached per geometry.
    """
    axes = []
    for q_len, k_len, p_len in zip(query_size, key_size, pretrain_size):
        q = torch.arange(q_len, dtype=torch.float32)
        k = F.adaptive_avg_pool1d(q[None], k_len)[0]  # [k_len]: centres of the pooled cells
        axes.append((q, k, max(p_len - 1, 1)))
    (qh, kh, ph), (qw, kw, pw) = axes
    qh, qw = (t.reshape(-1) for t in torch.meshgrid(qh, qw, indexing="ij"))  # [Nq]
    kh, kw = (t.reshape(-1) for t in torch.meshgrid(kh, kw, indexing="ij"))  # [Nk]
    rel = torch.stack([(qh[:, None] - kh[None]) / ph * 8, (qw[:, None] - kw[None]) / pw * 8], dim=-1)
    table, index = torch.unique(rel.view(-1, 2), return_inverse=True, dim=0)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return index, table


@dataclass(frozen=True)
class StageGeometry:
    """What the attention of one stage needs to know about the map: sizes, length scale, CPB coordinates.

    ``length_scale`` is ``ln(#keys)`` per query (``[N, 1]``, aggregated attention: in-image window slots + pooled
    tokens) or a scalar (full attention). The CPB is evaluated on ``bias_query x bias_key`` and, when those differ
    from ``size x pool``, resized bilinearly to them.
    """

    size: tuple[int, int]
    pool: tuple[int, int]
    length_scale: torch.Tensor
    bias_index: torch.Tensor
    bias_table: torch.Tensor
    bias_query: tuple[int, int]
    bias_key: tuple[int, int]


def window_counts(size: tuple[int, int], window: int) -> torch.Tensor:
    """Number of in-image slots of the centred ``window`` x ``window`` neighbourhood of each position, ``[H * W]``."""
    r = window // 2
    per_axis = []
    for n in size:
        i = torch.arange(n)
        per_axis.append((torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).float())
    return (per_axis[0][:, None] * per_axis[1][None]).reshape(-1)


# -- blocks ----------------------------------------------------------------------------------------------------------

class ConvolutionalGLU(nn.Module):
    """``fc2(GELU(dwconv3x3(g)) * v)`` with ``g, v = fc1(x)`` (the gate is the **first** half).

    ``hidden = int(2 * hidden_features / 3)`` as in the official code. ``[B, N, C] -> [B, N, C]`` on an ``H x W`` map.
    Keys: ``fc1``, ``dwconv.dwconv`` (the official wrapper module), ``fc2``.
    """

    def __init__(self, dim: int, hidden_features: int, drop: float = 0.0, device: Any = None, dtype: Any = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = int(2 * hidden_features / 3)
        self.fc1 = nn.Linear(dim, 2 * hidden, **dd)
        self.dwconv = nn.Module()
        self.dwconv.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, **dd)
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, _ = x.shape
        g, v = self.fc1(x).chunk(2, dim=-1)
        g = self.dwconv.dwconv(g.transpose(1, 2).reshape(b, -1, *size))  # [B, N, hidden] -> [B, hidden, H, W]
        x = F.gelu(g.flatten(2).transpose(1, 2)) * v  # -> [B, N, hidden]
        return self.drop(self.fc2(self.drop(x)))


class _CosineAttentionBase(nn.Module):
    """What both attentions share: temperature, query embedding, output projection and the CPB MLP."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float, dd: dict[str, Any]) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # softplus(temperature) starts at 1 / 0.24
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), math.log(math.exp(1 / 0.24) - 1), **dd))
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, 1, self.head_dim, **dd),
                                                                  std=0.02))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, 512, **dd)
        self.cpb_fc2 = nn.Linear(512, num_heads, **dd)

    def position_bias(self, geo: StageGeometry) -> torch.Tensor:
        """The CPB ``[heads, H * W, pool_h * pool_w]`` for this map, resized from the bias grid when it differs."""
        table = geo.bias_table.to(self.cpb_fc1.weight)
        bias = self.cpb_fc2(F.relu(self.cpb_fc1(table))).t()  # [U, 2] -> [heads, U]
        nq, nk = math.prod(geo.bias_query), math.prod(geo.bias_key)
        bias = bias[:, geo.bias_index.to(table.device)].view(self.num_heads, nq, nk)
        if geo.bias_key != geo.pool:  # resize over the keys: queries are channels, heads the batch
            bias = F.interpolate(bias.view(self.num_heads, nq, *geo.bias_key), geo.pool, mode="bilinear")
            nk = math.prod(geo.pool)
            bias = bias.view(self.num_heads, nq, nk)
        if geo.bias_query != geo.size:  # then over the queries
            bias = bias.transpose(1, 2).reshape(self.num_heads, nk, *geo.bias_query)
            bias = F.interpolate(bias, geo.size, mode="bilinear").flatten(2).transpose(1, 2)
        return bias  # [heads, N, P]

    def query(self, q: torch.Tensor, geo: StageGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """``q [B, heads, N, d]`` -> (``q_hat`` = L2-normalised, ``q_hat + embedding`` scaled by T and ln #keys)."""
        q_hat = F.normalize(q, dim=-1)
        return q_hat, (q_hat + self.query_embedding) * F.softplus(self.temperature) * geo.length_scale.to(q.dtype)


class AggregatedAttention(_CosineAttentionBase):
    """Pixel-focused attention: a centred sliding window and a pooled grid in one softmax (stages with sr > 1).

    Per head, for the query at ``i``: logits ``q_s . k_hat_j + rpb_local[j]`` over the ``window_size^2`` window slots
    (out-of-image slots masked) and ``q_s . k_hat_p + cpb[i, p]`` over the pooled tokens, where ``q_s = (q_hat +
    query_embedding) * softplus(T) * ln(n_i + P)``. Output ``sum_j (a_j + q_hat . learnable_tokens[:, j] +
    learnable_bias[j]) v_j + sum_p a_p v_p`` (the window sum runs on :func:`attnseg.ops.na2d_av`), then ``proj``.
    Pooled tokens: ``LN(AdaptiveAvgPool(GELU(sr(x))))`` through the **same** ``kv`` projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 3, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, device: Any = None, dtype: Any = None) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, num_heads, attn_drop, proj_drop, dd)
        if window_size < 1 or window_size % 2 == 0:
            raise ValueError(f"window_size must be odd and positive (the window is centred), got {window_size}")
        self.window_size = window_size
        local_len = window_size ** 2
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.sr = nn.Conv2d(dim, dim, 1, **dd)
        self.norm = nn.LayerNorm(dim, **dd)  # eps 1e-5, as the official code
        self.relative_pos_bias_local = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, local_len, **dd), std=0.0004))
        self.learnable_tokens = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, self.head_dim, local_len, **dd), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, local_len, **dd))

    def forward(self, x: torch.Tensor, geo: StageGeometry) -> torch.Tensor:
        b, n, c = x.shape
        h, d, ws = self.num_heads, self.head_dim, self.window_size
        q_hat, q_s = self.query(self.q(x).view(b, n, h, d).transpose(1, 2), geo)  # [B, h, N, d]

        k, v = self.kv(x).chunk(2, dim=-1)
        k = F.normalize(k.view(b, n, h, d), dim=-1).permute(0, 2, 1, 3).reshape(b, h, *geo.size, d)
        v = v.view(b, n, h, d).permute(0, 2, 1, 3).reshape(b, h, *geo.size, d)  # [B, h, H, W, d]
        logits_local = na2d_qk(q_s.reshape(b, h, *geo.size, d), k.to(q_s.dtype), ws, mode="zeropad")  # [B, h, H, W, ws^2]
        logits_local = logits_local.view(b, h, n, ws * ws) + self.relative_pos_bias_local.unsqueeze(1)

        pooled = x.transpose(1, 2).reshape(b, c, *geo.size)  # [B, C, H, W]
        pooled = F.adaptive_avg_pool2d(F.gelu(self.sr(pooled)), geo.pool).flatten(2).transpose(1, 2)  # [B, P, C]
        k_pool, v_pool = self.kv(self.norm(pooled)).view(b, -1, 2 * h, d).transpose(1, 2).chunk(2, dim=1)
        logits_pool = q_s @ F.normalize(k_pool, dim=-1).transpose(-2, -1) + self.position_bias(geo)  # [B, h, N, P]

        attn = torch.cat([logits_local, logits_pool], dim=-1).softmax(dim=-1)
        attn = F.dropout(attn, self.attn_drop, self.training)
        attn_local, attn_pool = attn.split([ws * ws, attn.shape[-1] - ws * ws], dim=-1)
        weights = attn_local + q_hat @ self.learnable_tokens + self.learnable_bias  # [B, h, N, ws^2]
        out = na2d_av(weights.reshape(b, h, *geo.size, ws * ws), v.to(weights.dtype), ws, mode="zeropad")
        out = out.view(b, h, n, d)
        out = out + attn_pool @ v_pool
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Attention(_CosineAttentionBase):
    """Full attention with the same cosine logits and CPB (stages with sr == 1); ``qkv`` rows are [q, k, v]."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, device: Any = None, dtype: Any = None) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, num_heads, attn_drop, proj_drop, dd)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)

    def forward(self, x: torch.Tensor, geo: StageGeometry) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3 * self.num_heads, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        _, q_s = self.query(q, geo)
        bias = self.position_bias(geo).unsqueeze(0).to(q_s.dtype)  # [1, h, N, N]
        k, v = F.normalize(k, dim=-1).to(q_s.dtype), v.to(q_s.dtype)  # one dtype under autocast
        out = F.scaled_dot_product_attention(q_s, k, v, attn_mask=bias,
                                             dropout_p=self.attn_drop if self.training else 0.0, scale=1.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """``x + drop_path(attn(LN(x)))``, then ``x + drop_path(ConvGLU(LN(x)))``; ``[B, N, C]`` in and out."""

    def __init__(self, dim: int, num_heads: int, window_size: int | None, mlp_ratio: float, sr_ratio: int,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=_EPS, **dd)
        if sr_ratio == 1:
            self.attn: nn.Module = Attention(dim, num_heads, qkv_bias, attn_drop, drop, **dd)
        else:
            if window_size is None:
                raise ValueError(f"a stage with sr_ratio {sr_ratio} > 1 uses aggregated attention and needs a "
                                 "window_size")
            self.attn = AggregatedAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=_EPS, **dd)
        self.mlp = ConvolutionalGLU(dim, int(dim * mlp_ratio), drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, geo: StageGeometry) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), geo))
        return x + self.drop_path(self.mlp(self.norm2(x), geo.size))


class OverlapPatchEmbed(nn.Module):
    """Conv (``kernel``, ``stride``, padding ``kernel // 2``) then LayerNorm (eps 1e-5): ``[B, C, H, W] -> [B, N, C']``."""

    def __init__(self, kernel: int, stride: int, in_chans: int, dim: int, device: Any = None, dtype: Any = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=kernel // 2, **dd)
        self.norm = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size  # [B, C, H, W] -> [B, H * W, C]


# -- the model -------------------------------------------------------------------------------------------------------

class TransNeXt(nn.Module):
    """TransNeXt backbone and classifier, at any input size.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs; 0 removes the classifier (dense use).
        depths, embed_dims, num_heads, mlp_ratios: per stage.
        window_size: sliding-window side per stage (odd), ``None`` where ``sr_ratio == 1`` (full attention).
        sr_ratios: pooled grid = map size // sr_ratio (``1``: full attention).
        img_size: the size the model is trained or fine-tuned at: the CPB grid of ``bias_mode="interpolate"``.
        pretrain_size: the pre-training size that scales the CPB coordinates (224 for every release except
            micro_AAAA, 256); defaults to ``img_size``.
        fixed_pool_size: pooled grid side in every aggregated stage ("linear inference mode"); None: size // sr.
        bias_mode: ``"interpolate"`` (CPB on the ``img_size`` grid, resized bilinearly) or ``"extrapolate"``
            (CPB on the actual grid). Identical at ``img_size``.
        qkv_bias: biases on the q/kv/qkv projections.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after projections, on attention weights, stochastic depth
            (rising linearly from 0 over all blocks).
        out_indices: stages returned by :meth:`forward_pyramid` (and listed in ``feature_info``).
        device, dtype: where and in which dtype to create the parameters.

    Example::

        >>> m = test_transnext(num_classes=0)
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 3, 97, 131))]
        [(16, 25, 33), (32, 13, 17), (48, 7, 9), (64, 4, 5)]
    """

    family = "transnext"
    output_fmt = "NCHW"
    head_key_prefixes = ("head.",)
    input_conv_keys = ("patch_embed1.proj.weight",)

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 15, 2),
        embed_dims: Sequence[int] = (72, 144, 288, 576),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        window_size: Sequence[int | None] = (3, 3, 3, None),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        img_size: int = 224,
        pretrain_size: int | None = None,
        fixed_pool_size: int | None = None,
        bias_mode: str = "interpolate",
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        depths, dims, heads = list(depths), list(embed_dims), list(num_heads)
        mlp_ratios, window_size, sr_ratios = list(mlp_ratios), list(window_size), list(sr_ratios)
        out_indices = tuple(out_indices)
        n_stages = len(depths)
        if in_chans < 1 or num_classes < 0:
            raise ValueError(f"in_chans must be >= 1 and num_classes >= 0, got {in_chans=}, {num_classes=}")
        if n_stages == 0 or any(len(v) != n_stages for v in (dims, heads, mlp_ratios, window_size, sr_ratios)):
            raise ValueError("depths, embed_dims, num_heads, mlp_ratios, window_size and sr_ratios need one value per "
                             f"stage, got {depths=}, {dims=}, {heads=}, {mlp_ratios=}, {window_size=}, {sr_ratios=}")
        if min(depths) < 1 or min(sr_ratios) < 1:
            raise ValueError(f"depths and sr_ratios must be >= 1, got {depths=}, {sr_ratios=}")
        if bias_mode not in BIAS_MODES:
            raise ValueError(f"bias_mode must be one of {BIAS_MODES}, got {bias_mode!r}")
        if img_size < 32 or (pretrain_size is not None and pretrain_size < 32):
            raise ValueError(f"img_size and pretrain_size must be >= 32, got {img_size=}, {pretrain_size=}")
        if fixed_pool_size is not None and fixed_pool_size < 1:
            raise ValueError(f"fixed_pool_size must be >= 1 or None, got {fixed_pool_size}")
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or \
                not all(0 <= i < n_stages for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..{n_stages - 1}, got {out_indices}")
        rates = drop_path_rates(depths, drop_path_rate)
        dd = {"device": device, "dtype": dtype}

        self.in_chans = in_chans
        self.num_classes = num_classes
        self.depths = depths
        self.dims = dims
        self.window_size = window_size
        self.sr_ratios = sr_ratios
        self.img_size = img_size
        self.pretrain_size = pretrain_size or img_size
        self.fixed_pool_size = fixed_pool_size
        self.bias_mode = bias_mode
        self.out_indices = out_indices
        self.num_features = dims[-1]
        self.num_stages = n_stages
        # the pooled grid of every stage needs one cell (and with a fixed pool, so does the map)
        self.min_input_size = max(2 ** (i + 2) * (1 if fixed_pool_size and sr > 1 else sr)
                                  for i, sr in enumerate(sr_ratios))
        self.grad_checkpointing = [False] * n_stages

        for i in range(n_stages):
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(
                7 if i == 0 else 3, 4 if i == 0 else 2, in_chans if i == 0 else dims[i - 1], dims[i], **dd))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(dims[i], heads[i], window_size[i], mlp_ratios[i], sr_ratios[i], qkv_bias, drop_rate,
                      attn_drop_rate, rate, **dd) for rate in rates[i]))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=_EPS, **dd))
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes else None
        self.feature_info = [{"num_chs": dims[i], "reduction": 2 ** (i + 2), "module": f"norm{i + 1}"}
                             for i in out_indices]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The official init: trunc-normal(0.02) linears, He-normal (fan-out) convs, unit norms, zero biases.
        init_linear_layernorm(m)
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- geometry ------------------------------------------------------------------------------------------------

    def stage_geometry(self, i: int, size: tuple[int, int], device: torch.device) -> StageGeometry:
        """Pool grid, length scale and CPB coordinates of stage ``i`` for an ``H x W`` map (see the module notes)."""
        stride, sr = 2 ** (i + 2), self.sr_ratios[i]
        aggregated = sr > 1
        fixed = self.fixed_pool_size if aggregated and self.fixed_pool_size else None

        def pool_of(hw: tuple[int, int]) -> tuple[int, int]:
            return (fixed, fixed) if fixed else (hw[0] // sr, hw[1] // sr)

        pool = pool_of(size)
        if min(pool) < 1:
            raise ValueError(f"stage {i}: a {size[0]}x{size[1]} map gives an empty pooled grid at sr_ratio {sr}")
        if aggregated:
            counts = window_counts(size, self.window_size[i])[:, None]  # [N, 1]
            length_scale = torch.log(counts + math.prod(pool))
        else:
            length_scale = torch.tensor(math.log(math.prod(size)), dtype=torch.float32)
        if self.bias_mode == "extrapolate":
            bias_query, bias_key = size, pool
        else:
            side = self.img_size // stride
            bias_query = (side, side)
            bias_key = pool_of(bias_query)
        pretrain = (self.pretrain_size // stride,) * 2
        index, table = cpb_coordinates(bias_query, bias_key, pretrain)
        return StageGeometry(size, pool, length_scale.to(device), index.to(device), table.to(device), bias_query,
                             bias_key)

    # -- timm-style utilities ------------------------------------------------------------------------------------

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules: the first patch embedding, then each stage (or each block when not ``coarse``)."""
        if coarse:
            return {"stem": r"^patch_embed1\.", "blocks": r"^(?:patch_embed|block|norm)(\d+)"}
        return {"stem": r"^patch_embed1\.", "blocks": [(r"^block(\d+)\.(\d+)", None),
                                                       (r"^(?:patch_embed|norm)(\d+)", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True, stages: Sequence[int] | None = None) -> None:
        """Recompute the blocks' activations in the backward pass, in ``stages`` (default: all)."""
        for i in range(self.num_stages) if stages is None else stages:
            if not 0 <= i < self.num_stages:
                raise ValueError(f"stage index {i} out of range 0..{self.num_stages - 1}")
            self.grad_checkpointing[i] = enable

    def no_weight_decay_keywords(self) -> set[str]:
        """The official exclusions: query embeddings, local position biases, the CPB MLPs and temperatures."""
        return {"query_embedding", "relative_pos_bias_local", "cpb", "temperature"}

    def get_classifier(self) -> nn.Module | None:
        """The linear classifier (``head``), or None without one."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier for ``num_classes`` (> 0), or none (0)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.patch_embed1.proj.weight
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes else None
        if self.head is not None:
            self._init_weights(self.head)

    # -- forward -------------------------------------------------------------------------------------------------

    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x, size = getattr(self, f"patch_embed{i + 1}")(x)  # [B, C, H, W] -> [B, N, C']
        geo = self.stage_geometry(i, size, x.device)
        use_ckpt = self.grad_checkpointing[i] and torch.is_grad_enabled()
        for block in getattr(self, f"block{i + 1}"):
            x = checkpoint(block, x, geo, use_reentrant=False) if use_ckpt else block(x, geo)
        x = getattr(self, f"norm{i + 1}")(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *size)  # -> [B, C', H, W]

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage output after its stage norm, NCHW ``[B, C_i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))]``.

        These are the official dense backbones' outputs (and, flattened, the classifier's ``norm{i}`` tokens).
        """
        check_image_input(self, x)
        outs = []
        for i in range(self.num_stages):
            x = self._run_stage(i, x)
            outs.append(x)
        return outs

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps of the stages in ``out_indices`` (channels ``embed_dims[i]``, stride ``2^(i+2)``)."""
        check_image_input(self, x)
        outs = []
        for i in range(max(self.out_indices) + 1):
            x = self._run_stage(i, x)
            if i in self.out_indices:
                outs.append(x.contiguous())
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage output after its norm, NCHW ``[B, embed_dims[-1], ceil(H/32), ceil(W/32)]``."""
        check_image_input(self, x)
        for i in range(self.num_stages):
            x = self._run_stage(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, C, h, w]`` -> mean over positions -> logits ``[B, num_classes]``."""
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        if self.head is None:
            raise RuntimeError("this TransNeXt has no classifier (num_classes=0); use forward_pyramid")
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]`` (the official classifier's, at any size)."""
        if self.head is None:
            raise RuntimeError("this TransNeXt has no classifier (num_classes=0); use forward_pyramid")
        return self.forward_head(self.forward_features(x))


# -- variants --------------------------------------------------------------------------------------------------------
# Parameter counts at num_classes=1000; top-1 on ImageNet-1k from the official README.

_MICRO = dict(depths=(2, 2, 15, 2), embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16))
_TINY = dict(depths=(2, 2, 15, 2), embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24))
_SMALL = dict(depths=(5, 5, 22, 5), embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24))
_BASE = dict(depths=(5, 5, 23, 5), embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32))


def _create_transnext(variant: dict[str, Any], kwargs: dict[str, Any]) -> TransNeXt:
    return TransNeXt(**{**variant, **kwargs})


@BACKBONES.register(cls=TransNeXt)
def transnext_micro(**kwargs: Any) -> TransNeXt:
    """TransNeXt-Micro: 12.81M parameters, 82.5% top-1 at 224."""
    return _create_transnext(dict(_MICRO), kwargs)


@BACKBONES.register(cls=TransNeXt)
def transnext_tiny(**kwargs: Any) -> TransNeXt:
    """TransNeXt-Tiny: 28.26M parameters, 84.0% top-1 at 224 (trained with drop_path_rate 0.25)."""
    return _create_transnext(dict(_TINY), kwargs)


@BACKBONES.register(cls=TransNeXt)
def transnext_small(**kwargs: Any) -> TransNeXt:
    """TransNeXt-Small: 49.74M parameters, 84.7% top-1 at 224."""
    return _create_transnext(dict(_SMALL), kwargs)


@BACKBONES.register(cls=TransNeXt)
def transnext_base(**kwargs: Any) -> TransNeXt:
    """TransNeXt-Base: 89.72M parameters, 84.8% top-1 at 224."""
    return _create_transnext(dict(_BASE), kwargs)


@BACKBONES.register(cls=TransNeXt)
def transnext_micro_aaaa(**kwargs: Any) -> TransNeXt:
    """TransNeXt-Micro-AAAA (aggregated attention in all four stages, sr 16/8/4/2), trained at 256: 13.11M
    parameters, 82.6% top-1."""
    return _create_transnext(dict(_MICRO, window_size=(3, 3, 3, 3), sr_ratios=(16, 8, 4, 2), img_size=256), kwargs)


@BACKBONES.register(cls=TransNeXt)
def transnext_small_384(**kwargs: Any) -> TransNeXt:
    """TransNeXt-Small fine-tuned at 384 (pretrain size 224): 86.0% top-1 (fine-tuned with drop_path_rate 0.7)."""
    return _create_transnext(dict(_SMALL, img_size=384, pretrain_size=224), kwargs)


@BACKBONES.register(cls=TransNeXt)
def transnext_base_384(**kwargs: Any) -> TransNeXt:
    """TransNeXt-Base fine-tuned at 384 (pretrain size 224): 86.2% top-1."""
    return _create_transnext(dict(_BASE, img_size=384, pretrain_size=224), kwargs)


@BACKBONES.register(cls=TransNeXt)
def test_transnext(**kwargs: Any) -> TransNeXt:
    """A tiny TransNeXt for CI (no published weights)."""
    return _create_transnext(dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(2, 2, 2, 4),
                                  mlp_ratios=(4, 4, 4, 4), img_size=64), kwargs)


# -- pretrained configurations (DaiShiResearch/TransNeXt, MIT) ---------------------------------------------------------
# Evaluation as in the official classification/datasets.py: below 384 resize by 256/224 and centre-crop, at 384 warp
# (no crop), bicubic, ImageNet mean/std.
_cfg = pretrained_cfg_factory(paper="2311.17132", origin="https://github.com/DaiShiResearch/TransNeXt", license="mit",
                              first_conv="patch_embed1.proj", classifier="head")

default_cfgs: dict[str, dict[str, Any]] = {
    **{f"transnext_{size}": _cfg(checkpoints=(f"transnext_{size}_224_1k.pth",))
       for size in ("micro", "tiny", "small", "base")},
    "transnext_micro_aaaa": _cfg(input_size=(3, 256, 256), checkpoints=("transnext_micro_AAAA_256_1k.pth",)),
    "transnext_small_384": _cfg(input_size=(3, 384, 384), crop_pct=1.0,
                                checkpoints=("transnext_small_384_1k_ft_1k.pth",)),
    "transnext_base_384": _cfg(input_size=(3, 384, 384), crop_pct=1.0,
                               checkpoints=("transnext_base_384_1k_ft_1k.pth",)),
}
