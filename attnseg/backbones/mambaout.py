"""MambaOut: a MetaFormer of Gated CNN blocks (Mamba without the SSM).

Paper: Weihao Yu and Xinchao Wang, "MambaOut: Do We Really Need Mamba for Vision?", arXiv 2405.07992.
Official code: yuweihao/MambaOut @ 9f2f234, ``models/mambaout.py`` (Apache-2.0). timm 1.0.31 ships the
same network as ``timm/models/mambaout.py``; this port is written from both, and its state_dict layout is
timm's.

Faithfulness: with converted official or timm weights, logits and stage outputs equal the official
model's (``tests/backbones/test_mambaout.py`` checks the ``mambaout_tiny_cfg.pt`` parity fixture and
timm's ``mambaout_femto`` with weights copied both ways). Deviations, all additive:

- State-dict layout is timm's: ``stem.*``, ``stages.{i}.downsample.*`` (i >= 1),
  ``stages.{i}.blocks.{j}.*``, ``head.norm.*`` (the official final ``norm``), ``head.pre_logits.{fc,norm}.*``
  and ``head.fc.*`` (the official ``head.fc1/norm/fc2``), plus ``pyramid_norms.{i}.*`` below.
  :mod:`attnseg.convert.mambaout` maps the official layout onto it; timm's loads unchanged.
- :meth:`MambaOut.forward_pyramid` returns the stage outputs of ``out_indices`` as NCHW maps, each through
  its own LayerNorm (``pyramid_norms.{i}``, keyed by stage index): the author's dense-prediction recipe
  (yuweihao/MambaOut#251, "a LayerNorm added on each stage's output"; the repo has no dense code). Those
  norms are new parameters, absent from ImageNet checkpoints; ``pyramid_norm=False`` leaves them out.
- ``num_classes=0`` removes the whole MLP head (official and timm keep parts of it); ``forward`` then
  raises and the model is used through ``forward_pyramid``.
- Inputs are checked: a wrong channel count or a side below ``min_input_size`` raises
  :class:`~attnseg.errors.InputSizeError`. Any size at or above it works as in the official code, with no
  padding: every conv zero-pads and each stride-2 conv gives ``ceil(H / 2)``, so 225x231 gives 57x58,
  29x29, 15x15 and 8x8 maps. The network itself runs down to 1x1 inputs, but below 32 pixels the stride-32
  map is still one pixel wide and ``feature_info``'s reductions no longer hold, hence ``min_input_size = 32``.

The model runs channels-last (``[B, H, W, C]``) between modules, as the official code does; the depthwise
conv, the downsampling convs and the pyramid outputs are the only channels-first tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnseg.backbones._common import check_image_input, pretrained_cfg_factory
from attnseg.layers import DropPath, drop_path_rates
from attnseg.registry import BACKBONES

__all__ = ["MambaOut", "GatedCNNBlock", "mambaout_femto", "mambaout_kobe", "mambaout_tiny", "mambaout_small",
           "mambaout_base"]

_EPS = 1e-6  # every LayerNorm of the official model


class Stem(nn.Module):
    """Two stride-2 3x3 convs, stride 4 overall: conv -> LN -> GELU -> conv -> LN.

    The first LayerNorm comes before the GELU, as in the official ``StemLayer``.
    ``[B, C_in, H, W] -> [B, ceil(H/4), ceil(W/4), C_out]`` (channels-last out).
    """

    def __init__(self, in_chans: int, out_chans: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1, **dd)
        self.norm1 = nn.LayerNorm(out_chans // 2, eps=_EPS, **dd)
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1, **dd)
        self.norm2 = nn.LayerNorm(out_chans, eps=_EPS, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.conv1(x).permute(0, 2, 3, 1))  # [B, C/2, H/2, W/2] -> [B, H/2, W/2, C/2]
        # GELU after permuting back, as the official code: on the permuted view torch takes another
        # elementwise path, and GELU-then-permute differs in the last bit (4e-7 at the logits).
        x = F.gelu(x.permute(0, 3, 1, 2))  # -> [B, C/2, H/2, W/2]
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1))  # -> [B, H/4, W/4, C]


class Downsample(nn.Module):
    """Stride-2 3x3 conv, then LayerNorm (norm after the conv): ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C']``."""

    def __init__(self, in_chans: int, out_chans: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1, **dd)
        self.norm = nn.LayerNorm(out_chans, eps=_EPS, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B, H, W, C] -> [B, H/2, W/2, C']
        return self.norm(x)


class GatedCNNBlock(nn.Module):
    """The Gated CNN token mixer: ``x + drop_path(fc2(GELU(g) * [i, dwconv(c)]))`` with ``g, i, c = fc1(LN(x))``.

    ``fc1`` maps ``C`` to ``2 * hidden`` channels, split in this order into ``g`` (``hidden``),
    ``i`` (``hidden - conv_channels``, passed through) and ``c`` (``conv_channels``, depthwise
    ``kernel_size`` conv with bias). ``hidden = int(expansion_ratio * C)`` truncates exactly as the official
    code does (341 for C = 128) and ``conv_channels = int(conv_ratio * C)``. There is no second MLP
    sub-block and no layer scale. Channels-last ``[B, H, W, C]`` in and out.
    """

    def __init__(self, dim: int, expansion_ratio: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0,
                 drop_path: float = 0.0, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)  # g, i, c
        self.norm = nn.LayerNorm(dim, eps=_EPS, **dd)
        self.fc1 = nn.Linear(dim, 2 * hidden, **dd)
        self.conv = nn.Conv2d(conv_channels, conv_channels, kernel_size, padding=kernel_size // 2,
                              groups=conv_channels, **dd)
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split_sizes, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # depthwise conv runs on [B, C, H, W]
        x = self.fc2(F.gelu(g) * torch.cat((i, c), dim=-1))  # [B, H, W, hidden] -> [B, H, W, C]
        return shortcut + self.drop_path(x)


class MambaOutStage(nn.Module):
    """Optional :class:`Downsample` (``[B, H, W, C_in] -> [B, H/2, W/2, C]``), then ``depth`` Gated CNN blocks."""

    def __init__(self, in_dim: int, dim: int, drop_path_rates: Sequence[float], downsample: bool,
                 expansion_ratio: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.downsample = Downsample(in_dim, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(
            GatedCNNBlock(dim, expansion_ratio, kernel_size, conv_ratio, drop_path=rate, **dd)
            for rate in drop_path_rates
        ))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class MlpHead(nn.Module):
    """The official classifier: mean over H, W -> LN -> fc (``mlp_ratio`` x) -> GELU -> LN -> dropout -> fc.

    ``[B, H, W, C] -> [B, num_classes]`` (or ``[B, mlp_ratio * C]`` with ``pre_logits=True``).
    """

    def __init__(self, dim: int, num_classes: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = int(mlp_ratio * dim)
        self.norm = nn.LayerNorm(dim, eps=_EPS, **dd)
        self.pre_logits = nn.Sequential(OrderedDict(
            fc=nn.Linear(dim, hidden, **dd), act=nn.GELU(), norm=nn.LayerNorm(hidden, eps=_EPS, **dd),
        ))
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(hidden, num_classes, **dd)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.norm(x.mean((1, 2))))  # [B, H, W, C] -> [B, C] -> [B, hidden]
        return x if pre_logits else self.fc(self.drop(x))


class MambaOut(nn.Module):
    """MambaOut backbone and classifier.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs; 0 removes the classifier (dense use).
        depths: Gated CNN blocks per stage.
        dims: channels per stage (stage ``i`` has stride ``2 ** (i + 2)``).
        expansion_ratio: hidden width of a Gated CNN block over its ``dim`` (truncated to an int).
        kernel_size: depthwise kernel of the token mixer (odd).
        conv_ratio: fraction of the channels that go through the depthwise conv.
        drop_path_rate: stochastic depth of the last block; rates rise linearly from 0 over all blocks.
        head_dropout: dropout before the last classifier layer.
        head_mlp_ratio: hidden width of the MLP head over ``dims[-1]``.
        out_indices: stages returned by :meth:`forward_pyramid` (and listed in ``feature_info``).
        pyramid_norm: a LayerNorm on each pyramid output (the author's dense recipe; new parameters).
        device, dtype: where and in which dtype to create the parameters.

    The defaults are the official class's (the Tiny widths); the registered factories ``mambaout_femto``,
    ``mambaout_kobe``, ``mambaout_tiny``, ``mambaout_small`` and ``mambaout_base`` fix depths and dims.

    Example::

        >>> m = mambaout_femto(num_classes=0)
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 3, 225, 231))]
        [(48, 57, 58), (96, 29, 29), (192, 15, 15), (288, 8, 8)]
        >>> [(f["num_chs"], f["reduction"]) for f in m.feature_info]
        [(48, 4), (96, 8), (192, 16), (288, 32)]
        >>> test_mambaout(num_classes=5)(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5])
    """

    family = "mambaout"
    min_input_size = 32
    output_fmt = "NHWC"  # of forward_features / forward_intermediates; forward_pyramid gives NCHW
    # attnseg.checkpoint contract: own keys that published checkpoints lack, and checkpoint keys that
    # belong to the classification head (dropped when this model has none).
    new_key_prefixes = ("pyramid_norms.",)
    head_key_prefixes = ("head.",)

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
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        depths, dims, out_indices = list(depths), list(dims), tuple(out_indices)
        if in_chans < 1 or num_classes < 0:
            raise ValueError(f"in_chans must be >= 1 and num_classes >= 0, got {in_chans=}, {num_classes=}")
        if not depths or len(depths) != len(dims):
            raise ValueError(f"depths and dims must be non-empty and of one length, got {depths=}, {dims=}")
        if min(depths) < 1 or min(dims) < 2:
            raise ValueError(f"every depth must be >= 1 and every dim >= 2, got {depths=}, {dims=}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive (the conv pads kernel_size // 2), got {kernel_size}")
        if not 0.0 < conv_ratio <= expansion_ratio:
            raise ValueError(f"conv_ratio must be in (0, expansion_ratio={expansion_ratio:.4g}], got {conv_ratio}")
        if not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout}")
        if not out_indices or len(set(out_indices)) != len(out_indices) or sorted(out_indices) != list(out_indices) \
                or not all(0 <= i < len(dims) for i in out_indices):
            raise ValueError(f"out_indices must be increasing stage indices in 0..{len(dims) - 1}, got {out_indices}")
        rates = drop_path_rates(depths, drop_path_rate)  # checks drop_path_rate
        dd = {"device": device, "dtype": dtype}

        self.in_chans = in_chans
        self.num_classes = num_classes
        self.dims = dims
        self.out_indices = out_indices
        self.num_features = dims[-1]
        self.head_mlp_ratio = head_mlp_ratio
        self.head_dropout = head_dropout

        self.stem = Stem(in_chans, dims[0], **dd)
        self.stages = nn.Sequential(*(
            MambaOutStage(dims[i - 1] if i else dims[0], dims[i], rates[i], downsample=i > 0,
                          expansion_ratio=expansion_ratio, kernel_size=kernel_size, conv_ratio=conv_ratio, **dd)
            for i in range(len(dims))
        ))
        self.pyramid_norms = nn.ModuleDict(
            {str(i): nn.LayerNorm(dims[i], eps=_EPS, **dd) for i in out_indices}
        ) if pyramid_norm else None
        self.head = MlpHead(dims[-1], num_classes, head_mlp_ratio, head_dropout, **dd) if num_classes else None
        self.feature_info = [
            {"num_chs": dims[i], "reduction": 2 ** (i + 2), "module": f"stages.{i}"} for i in out_indices
        ]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The official init: trunc_normal(0.02) on every conv and linear weight, zero biases.
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- timm-style utilities -----------------------------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules grouping the stem and each stage (or each block when not ``coarse``)."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (same outputs, less memory)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the usual rule: the official ``{'norm'}`` names 1-D parameters, never decayed anyway."""
        return set()

    def get_classifier(self) -> nn.Module | None:
        """The last classifier layer (``head.fc``), or None without a head."""
        return self.head.fc if self.head is not None else None

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last classifier layer (``num_classes > 0``) or remove the whole head (``0``).

        A new layer is created on the device and in the dtype of the current parameters; the rest of
        the MLP head (norm, pre-logits) keeps its weights.
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.stem.conv1.weight
        dd = {"device": ref.device, "dtype": ref.dtype}
        self.num_classes = num_classes
        if num_classes == 0:
            self.head = None
        elif self.head is None:
            self.head = MlpHead(self.num_features, num_classes, self.head_mlp_ratio, self.head_dropout, **dd)
            self.head.apply(self._init_weights)
        else:
            self.head.fc = nn.Linear(self.head.fc.in_features, num_classes, **dd)
            self._init_weights(self.head.fc)

    # -- forward ------------------------------------------------------------------------------------

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage output, channels-last ``[B, H_i, W_i, C_i]`` (the official ``stages[i]`` outputs).

        ``x``: ``[B, in_chans, H, W]``; ``H_i = ceil(H / 2 ** (i + 2))``. No pyramid norm is applied.
        """
        check_image_input(self, x)
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage output, channels-last ``[B, ceil(H/32), ceil(W/32), dims[-1]]`` (before the head)."""
        check_image_input(self, x)
        return self.stages(self.stem(x))

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps ``[B, dims[i], ceil(H / 2**(i+2)), ceil(W / 2**(i+2))]`` for ``i`` in ``out_indices``.

        Each map goes through its pyramid LayerNorm (over channels) when ``pyramid_norm`` is on.
        """
        feats = self.forward_intermediates(x)
        outs = []
        for i in self.out_indices:
            f = feats[i] if self.pyramid_norms is None else self.pyramid_norms[str(i)](feats[i])
            outs.append(f.permute(0, 3, 1, 2).contiguous())  # [B, H, W, C] -> [B, C, H, W]
        return outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, H, W, C]`` (from :meth:`forward_features`) -> logits ``[B, num_classes]``."""
        if self.head is None:
            raise RuntimeError("this MambaOut has no classifier (num_classes=0); use forward_pyramid")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]``, as the official model's ``forward``."""
        return self.forward_head(self.forward_features(x))


# -- variants ----------------------------------------------------------------------------------------
# Parameter counts at num_classes=1000 without the pyramid norms; top-1 at 224 from the official README.

def _create_mambaout(variant: dict[str, Any], kwargs: dict[str, Any]) -> MambaOut:
    return MambaOut(**{**variant, **kwargs})


@BACKBONES.register(cls=MambaOut)
def mambaout_femto(**kwargs: Any) -> MambaOut:
    """MambaOut-Femto: 7.30M parameters, 78.9% ImageNet-1k top-1 (trained with drop_path_rate 0.025)."""
    return _create_mambaout(dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 288)), kwargs)


@BACKBONES.register(cls=MambaOut)
def mambaout_kobe(**kwargs: Any) -> MambaOut:
    """MambaOut-Kobe (24 blocks): 9.14M parameters, 80.0% ImageNet-1k top-1 (drop_path_rate 0.025)."""
    return _create_mambaout(dict(depths=(3, 3, 15, 3), dims=(48, 96, 192, 288)), kwargs)


@BACKBONES.register(cls=MambaOut)
def mambaout_tiny(**kwargs: Any) -> MambaOut:
    """MambaOut-Tiny: 26.55M parameters, 82.7% ImageNet-1k top-1 (drop_path_rate 0.2)."""
    return _create_mambaout(dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 576)), kwargs)


@BACKBONES.register(cls=MambaOut)
def mambaout_small(**kwargs: Any) -> MambaOut:
    """MambaOut-Small: 48.49M parameters, 84.1% ImageNet-1k top-1 (drop_path_rate 0.4)."""
    return _create_mambaout(dict(depths=(3, 4, 27, 3), dims=(96, 192, 384, 576)), kwargs)


@BACKBONES.register(cls=MambaOut)
def mambaout_base(**kwargs: Any) -> MambaOut:
    """MambaOut-Base: 84.81M parameters, 84.2% ImageNet-1k top-1 (drop_path_rate 0.6)."""
    return _create_mambaout(dict(depths=(3, 4, 27, 3), dims=(128, 256, 512, 768)), kwargs)


@BACKBONES.register(cls=MambaOut)
def test_mambaout(**kwargs: Any) -> MambaOut:
    """A tiny MambaOut for CI (no published weights)."""
    return _create_mambaout(dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48)), kwargs)


# -- pretrained configurations (yuweihao/MambaOut; settings as timm's) -------------------------------------------------
# Licence: Apache-2.0 as timm's pretrained_cfg for these same weights says (the official LICENSE file is not in our
# sources). crop_pct 1.0 (timm and the official _cfg; timm also evaluates at 288).
_cfg = pretrained_cfg_factory(paper="2405.07992", origin="https://github.com/yuweihao/MambaOut", license="apache-2.0",
                              first_conv="stem.conv1", classifier="head.fc", crop_pct=1.0)

default_cfgs: dict[str, dict[str, Any]] = {
    f"mambaout_{size}": _cfg(checkpoints=(f"mambaout_{size}.pth",))
    for size in ("femto", "kobe", "tiny", "small", "base")
}
