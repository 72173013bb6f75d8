"""MambaOut: a MetaFormer of Gated CNN blocks (Mamba without the SSM).

Paper: Weihao Yu and Xinchao Wang, "MambaOut: Do We Really Need Mamba for Vision?", arXiv 2405.07992.
Official code: yuweihao/MambaOut @ 9f2f234, ``models/mambaout.py``. timm 1.0.31 ships the same model
(``timm/models/mambaout.py``) with the layout used here.

Faithfulness: with converted official or timm weights, logits and stage outputs equal the official
model's (parity test against ``mambaout_tiny_cfg.pt``). Differences, all additive:

- State-dict layout is timm's (``stem``, ``stages.i.downsample``, ``stages.i.blocks.j``, ``head.*``);
  :mod:`attnseg.convert.mambaout` maps the official layout onto it.
- ``forward_pyramid`` returns the four stage outputs as NCHW maps, each through its own LayerNorm
  (``pyramid_norms``), which is the author's dense-prediction recipe (yuweihao/MambaOut#251: "a LayerNorm
  added on each stage's output"). Those norms are new parameters, absent from ImageNet checkpoints.
- Any input size works as in the official code (every conv zero-pads; each stride-2 conv ceil-divides,
  225x231 -> 57x58, 29x29, 15x15, 8x8); the minimum is 1 pixel per axis, but inputs below 32 pixels
  collapse stage 4 to one pixel, so ``min_input_size`` is 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnseg.errors import InputSizeError
from attnseg.layers import LayerNorm2d
from attnseg.registry import BACKBONES

__all__ = ["MambaOut", "GatedCNNBlock"]


class Stem(nn.Module):
    """Two stride-2 3x3 convs (stride 4 overall): conv -> LN -> GELU -> conv -> LN.

    The first LayerNorm comes before the GELU, as in the official StemLayer.
    Input ``[B, C, H, W]``, output channels-last ``[B, H/4, W/4, C_out]``.
    """

    def __init__(self, in_chans: int, out_chans: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(out_chans // 2, eps=eps)
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(out_chans, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.conv1(x).permute(0, 2, 3, 1))  # [B, H/2, W/2, C/2]
        x = F.gelu(x).permute(0, 3, 1, 2)
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1))  # [B, H/4, W/4, C]


class Downsample(nn.Module):
    """Stride-2 3x3 conv then LayerNorm, channels-last in and out: ``[B, H, W, C] -> [B, H/2, W/2, C']``."""

    def __init__(self, in_chans: int, out_chans: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_chans, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class GatedCNNBlock(nn.Module):
    """The Gated CNN token mixer: ``x + fc2(GELU(g) * [i, dwconv(c)])`` with ``g, i, c = fc1(LN(x))``.

    ``hidden = int(expansion_ratio * dim)`` is truncated exactly as the official code does (341 for 128).
    Channels-last ``[B, H, W, C]`` in and out.
    """

    def __init__(
        self,
        dim: int,
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        drop_path: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)  # g, i, c
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2,
                              groups=conv_channels)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split_sizes, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # depthwise conv runs channels-first
        x = self.fc2(F.gelu(g) * torch.cat((i, c), dim=-1))
        return shortcut + self.drop_path(x)


class MambaOutStage(nn.Module):
    """Optional downsample, then ``depth`` Gated CNN blocks (channels-last)."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_path_rates: Sequence[float], downsample: bool,
                 **block_kwargs: float) -> None:
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(GatedCNNBlock(dim, drop_path=dpr, **block_kwargs) for dpr in drop_path_rates))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class MlpHead(nn.Module):
    """Official classifier: mean pool -> LN -> fc (4x) -> GELU -> LN -> dropout -> fc."""

    def __init__(self, dim: int, num_classes: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 eps: float = 1e-6) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pre_logits = nn.Module()
        self.pre_logits.fc = nn.Linear(dim, hidden)
        self.pre_logits.norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean((1, 2)))  # [B, H, W, C] -> [B, C]
        x = self.pre_logits.norm(F.gelu(self.pre_logits.fc(x)))
        return x if pre_logits else self.fc(self.drop(x))


class MambaOut(nn.Module):
    """MambaOut backbone and classifier.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs; 0 removes the classifier (dense use).
        depths: blocks per stage.
        dims: channels per stage.
        expansion_ratio: Gated CNN hidden width over ``dim``.
        kernel_size: depthwise kernel of the token mixer.
        conv_ratio: fraction of channels that go through the depthwise conv.
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        head_dropout: dropout before the last classifier layer.
        head_mlp_ratio: hidden width of the MLP head over ``dims[-1]``.
        out_indices: stages returned by :meth:`forward_pyramid`.
        pyramid_norm: LayerNorm on each pyramid output (the dense recipe; new parameters).

    Example::

        >>> m = mambaout_femto(num_classes=0)
        >>> [f.shape[1:] for f in m.forward_pyramid(torch.randn(1, 3, 225, 231))]
        [torch.Size([48, 57, 58]), torch.Size([96, 29, 29]), torch.Size([192, 15, 15]), torch.Size([288, 8, 8])]
    """

    family = "mambaout"
    min_input_size = 32

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 576),
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        drop_path_rate: float = 0.0,
        head_dropout: float = 0.0,
        head_mlp_ratio: float = 4.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pyramid_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths and dims must have the same length, got {len(depths)=} and {len(dims)=}")
        if any(d < 1 for d in depths) or any(c < 2 for c in dims):
            raise ValueError(f"depths must be >= 1 and dims >= 2, got {list(depths)=}, {list(dims)=}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        bad = [i for i in out_indices if not 0 <= i < len(dims)]
        if bad or not out_indices:
            raise ValueError(f"out_indices must be a non-empty subset of 0..{len(dims) - 1}, got {list(out_indices)}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.dims = list(dims)
        self.out_indices = tuple(out_indices)
        self.num_features = dims[-1]
        self.output_fmt = "NHWC"

        self.stem = Stem(in_chans, dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(MambaOutStage(
                dims[i - 1] if i else dim, dim, depth, rates[start:start + depth], downsample=i > 0,
                expansion_ratio=expansion_ratio, kernel_size=kernel_size, conv_ratio=conv_ratio,
            ))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.pyramid_norms = (
            nn.ModuleList(LayerNorm2d(dims[i], eps=1e-6) for i in self.out_indices) if pyramid_norm else None
        )
        self.head_mlp_ratio = head_mlp_ratio
        self.head_dropout = head_dropout
        self.head = MlpHead(dims[-1], num_classes, head_mlp_ratio, head_dropout) if num_classes > 0 else None
        self.feature_info = [
            {"num_chs": dims[i], "reduction": 2 ** (i + 2), "module": f"stages.{i}"} for i in self.out_indices
        ]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- timm-style utilities -----------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()

    def get_classifier(self) -> nn.Module | None:
        return self.head.fc if self.head is not None else None

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last classifier layer (``num_classes > 0``) or remove the whole head (``0``)."""
        self.num_classes = num_classes
        if num_classes == 0:
            self.head = None
        elif self.head is None:
            self.head = MlpHead(self.num_features, num_classes, self.head_mlp_ratio, self.head_dropout)
        else:
            self.head.fc = nn.Linear(self.head.fc.in_features, num_classes)

    # -- forward ------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InputSizeError(
                f"MambaOut expects input [B, {self.in_chans}, H, W], got {list(x.shape)}"
            )
        if min(x.shape[-2:]) < self.min_input_size:
            raise InputSizeError(
                f"MambaOut needs H and W >= {self.min_input_size}, got {x.shape[-2]}x{x.shape[-1]}"
            )

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage output, channels-last ``[B, H_i, W_i, C_i]`` (the official stage outputs)."""
        self._check_input(x)
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage output, channels-last ``[B, H/32, W/32, C]``."""
        return self.forward_intermediates(x)[-1]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps of ``out_indices`` at strides 4/8/16/32, through the pyramid norms when enabled."""
        feats = self.forward_intermediates(x)
        outs = []
        for j, i in enumerate(self.out_indices):
            f = feats[i].permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
            outs.append(self.pyramid_norms[j](f) if self.pyramid_norms is not None else f.contiguous())
        return outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("this MambaOut has no classifier (num_classes=0); use forward_pyramid")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -- variants ----------------------------------------------------------------------------------------

def _create(variant: dict, kwargs: dict) -> MambaOut:
    return MambaOut(**{**variant, **kwargs})


@BACKBONES.register(cls=MambaOut)
def mambaout_femto(**kwargs) -> MambaOut:
    """MambaOut-Femto, 7.3M parameters, 78.9% ImageNet top-1."""
    return _create(dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 288)), kwargs)


@BACKBONES.register(cls=MambaOut)
def mambaout_kobe(**kwargs) -> MambaOut:
    """MambaOut-Kobe, 9.1M parameters, 80.0% ImageNet top-1."""
    return _create(dict(depths=(3, 3, 15, 3), dims=(48, 96, 192, 288)), kwargs)


@BACKBONES.register(cls=MambaOut)
def mambaout_tiny(**kwargs) -> MambaOut:
    """MambaOut-Tiny, 26.5M parameters, 82.7% ImageNet top-1."""
    return _create(dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 576)), kwargs)


@BACKBONES.register(cls=MambaOut)
def mambaout_small(**kwargs) -> MambaOut:
    """MambaOut-Small, 48.5M parameters, 84.1% ImageNet top-1."""
    return _create(dict(depths=(3, 4, 27, 3), dims=(96, 192, 384, 576)), kwargs)


@BACKBONES.register(cls=MambaOut)
def mambaout_base(**kwargs) -> MambaOut:
    """MambaOut-Base, 84.8M parameters, 84.2% ImageNet top-1."""
    return _create(dict(depths=(3, 4, 27, 3), dims=(128, 256, 512, 768)), kwargs)


@BACKBONES.register(cls=MambaOut)
def test_mambaout(**kwargs) -> MambaOut:
    """A tiny MambaOut for CI (no published weights)."""
    return _create(dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48)), kwargs)
