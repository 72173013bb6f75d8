"""ResNet and ResNeXt, as torchvision builds them: the published encoders of two attnseg heads.

Papers: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016); Xie et al., "Aggregated Residual
Transformations for Deep Neural Networks" (CVPR 2017, ResNeXt). They are not attention models; attnseg carries
them because the multi-scale guided attention head (Sinha & Dolz 2020) was published on torchvision's
``resnext101_32x8d`` with a one-channel first conv, and DconnNet (Yang & Farsiu 2023) on ``resnet34``, so their
parity and their checkpoints need exactly these networks.

The network is torchvision's ``ResNet`` class (a pinned dependency), subclassed rather than rewritten: the
state_dict layout is torchvision's (``conv1``, ``bn1``, ``layer1``-``layer4``, ``fc``), which is also timm's
layout for these models, so torchvision and timm ImageNet weights load as they are. What the subclass adds is
the backbone contract:

- ``in_chans``: the first conv takes any channel count (``load_pretrained`` adapts 3-channel weights);
- ``num_classes=0`` removes ``fc`` (``forward`` then raises; use ``forward_pyramid``);
- ``forward_pyramid``: NCHW maps of ``out_indices`` among five taps: the stem after its ReLU (stride 2, 64
  channels; before the max-pool, as DconnNet and MSGA's ``layer0`` take it) and ``layer1``-``layer4``
  (strides 4-32); default ``(1, 2, 3, 4)``;
- any input size: every stride-2 layer of a ResNet gives ``ceil(n / 2)``, so a 97x131 input gives 49x66,
  25x33, 13x17, 7x9, 4x5 maps with no padding; below 32 pixels the stride-32 map is one pixel and the
  reductions in ``feature_info`` no longer hold, hence ``min_input_size = 32``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import resnet as tv_resnet

from attnseg.backbones._common import check_image_input, pretrained_cfg_factory
from attnseg.registry import BACKBONES

__all__ = ["ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d"]

# torchvision's architectures: block, blocks per stage, groups, width per group.
_ARCHS: dict[str, tuple[type[nn.Module], tuple[int, ...], int, int]] = {
    "resnet18": (tv_resnet.BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (tv_resnet.BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (tv_resnet.Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (tv_resnet.Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnext50_32x4d": (tv_resnet.Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": (tv_resnet.Bottleneck, (3, 4, 23, 3), 32, 8),
    "test_resnet": (tv_resnet.BasicBlock, (1, 1, 1, 1), 1, 64),  # CI-sized
}


class ResNet(tv_resnet.ResNet):
    """torchvision's ResNet/ResNeXt with the attnseg backbone contract.

    Args:
        arch: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnext50_32x4d``,
            ``resnext101_32x8d`` (torchvision's definitions).
        in_chans: input channels of ``conv1``.
        num_classes: classifier outputs; 0 removes ``fc``.
        out_indices: taps returned by :meth:`forward_pyramid`: 0 = stem (stride 2), 1-4 = ``layer1``-``layer4``.
        drop_rate: dropout before ``fc``.
        zero_init_residual: torchvision's option: the last BatchNorm of each residual branch starts at zero.

    Example::

        >>> m = ResNet("test_resnet", in_chans=1, num_classes=0, out_indices=(0, 1, 2, 3, 4))
        >>> [tuple(f.shape[1:]) for f in m.forward_pyramid(torch.randn(1, 1, 97, 131))]
        [(64, 49, 66), (64, 25, 33), (128, 13, 17), (256, 7, 9), (512, 4, 5)]
    """

    family = "resnet"
    min_input_size = 32
    output_fmt = "NCHW"
    head_key_prefixes = ("fc.",)
    input_conv_keys = ("conv1.weight",)

    def __init__(self, arch: str = "resnet34", in_chans: int = 3, num_classes: int = 1000,
                 out_indices: Sequence[int] = (1, 2, 3, 4), drop_rate: float = 0.0,
                 zero_init_residual: bool = False) -> None:
        if arch not in _ARCHS:
            raise ValueError(f"unknown ResNet arch '{arch}' (known: {', '.join(_ARCHS)})")
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not all(0 <= i <= 4 for i in out_indices):
            raise ValueError(f"out_indices must be increasing tap indices in 0..4, got {out_indices}")
        if in_chans < 1 or num_classes < 0 or not 0 <= drop_rate < 1:
            raise ValueError(f"need in_chans >= 1, num_classes >= 0 and drop_rate in [0, 1), got {in_chans=}, "
                             f"{num_classes=}, {drop_rate=}")
        block, layers, groups, width = _ARCHS[arch]
        super().__init__(block, list(layers), num_classes=max(num_classes, 1), zero_init_residual=zero_init_residual,
                         groups=groups, width_per_group=width)
        if in_chans != 3:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.arch, self.in_chans, self.out_indices, self.drop_rate = arch, in_chans, out_indices, drop_rate
        self.num_features = self.fc.in_features
        self.num_classes = num_classes
        if num_classes == 0:
            self.fc = None
        self.grad_checkpointing = False
        expansion = block.expansion
        taps = [(64, 2, "relu")] + [(64 * 2**i * expansion, 4 * 2**i, f"layer{i + 1}") for i in range(4)]
        self.feature_info = [{"num_chs": c, "reduction": r, "module": m} for c, r, m in (taps[i] for i in out_indices)]

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name rules for layer-wise lr decay: the stem, then each block (or each stage if ``coarse``)."""
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module | None:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new linear classifier (``num_classes > 0``, torchvision's default init) or none (``0``)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.conv1.weight
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) if num_classes else None

    def _stage(self, layer: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return layer(x)
        for block in layer:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All five taps, NCHW: ``[stem (s2), layer1 (s4), layer2 (s8), layer3 (s16), layer4 (s32)]``."""
        check_image_input(self, x)
        stem = self.relu(self.bn1(self.conv1(x)))
        outs = [stem]
        x = self.maxpool(stem)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._stage(layer, x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``layer4`` map ``[B, num_features, ceil(H/32), ceil(W/32)]``."""
        return self.forward_intermediates(x)[-1]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NCHW maps of ``out_indices`` (default: strides 4/8/16/32)."""
        feats = self.forward_intermediates(x)
        return [feats[i] for i in self.out_indices]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.fc is None:
            raise RuntimeError("this ResNet has no classifier (num_classes=0); use forward_pyramid")
        x = torch.flatten(self.avgpool(x), 1)
        x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> logits ``[B, num_classes]`` (torchvision's outputs)."""
        return self.forward_head(self.forward_features(x))


# -- variants ----------------------------------------------------------------------------------------------------
# ImageNet-1k top-1 of torchvision's IMAGENET1K_V1 weights (its model tables).

@BACKBONES.register(cls=ResNet)
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18: 11.7M parameters, 69.8% top-1 (torchvision V1 weights)."""
    return ResNet("resnet18", **kwargs)


@BACKBONES.register(cls=ResNet)
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34, DconnNet's encoder: 21.8M parameters, 73.3% top-1 (torchvision V1 weights)."""
    return ResNet("resnet34", **kwargs)


@BACKBONES.register(cls=ResNet)
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50: 25.6M parameters, 76.1% top-1 (torchvision V1 weights)."""
    return ResNet("resnet50", **kwargs)


@BACKBONES.register(cls=ResNet)
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101: 44.5M parameters, 77.4% top-1 (torchvision V1 weights)."""
    return ResNet("resnet101", **kwargs)


@BACKBONES.register(cls=ResNet)
def resnext50_32x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d: 25.0M parameters, 77.6% top-1 (torchvision V1 weights)."""
    return ResNet("resnext50_32x4d", **kwargs)


@BACKBONES.register(cls=ResNet)
def resnext101_32x8d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d, the MSGA encoder (there with ``in_chans=1``, random init): 88.8M parameters, 79.3%
    top-1 (torchvision V1 weights)."""
    return ResNet("resnext101_32x8d", **kwargs)


@BACKBONES.register(cls=ResNet)
def test_resnet(**kwargs: Any) -> ResNet:
    """A one-block-per-stage ResNet for CI (no published weights)."""
    return ResNet("test_resnet", **kwargs)


# -- pretrained configurations (torchvision's ImageNet weights) --------------------------------------------------------
# torchvision's V1 files (BSD-3-Clause): resize 256, centre crop 224, bilinear.
_cfg = pretrained_cfg_factory(paper="1512.03385", origin="https://github.com/pytorch/vision", license="bsd-3-clause",
                              first_conv="conv1", classifier="fc", interpolation="bilinear")

default_cfgs: dict[str, dict[str, Any]] = {
    "resnet18": _cfg(checkpoints=("resnet18-f37072fd.pth",)),
    "resnet34": _cfg(checkpoints=("resnet34-b627a593.pth",)),
    "resnet50": _cfg(checkpoints=("resnet50-0676ba61.pth",)),
    "resnet101": _cfg(checkpoints=("resnet101-63fe2227.pth",)),
    "resnext50_32x4d": _cfg(paper="1611.05431", checkpoints=("resnext50_32x4d-7cdf4587.pth",)),
    "resnext101_32x8d": _cfg(paper="1611.05431", checkpoints=("resnext101_32x8d-8ba56ff5.pth",)),
}
