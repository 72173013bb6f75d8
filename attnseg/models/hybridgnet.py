"""HybridGNet as published: its residual CNN encoder + the 2-IGSC graph decoder (:mod:`attnseg.heads.hybridgnet`).

Paper: Gaggion et al., IEEE TMI 2022 (arXiv 2203.10977). Reference code: ngaggion/HybridGNet @ 7c39944
(``models/hybridDoubleSkip.py:EncoderConv`` and ``Hybrid``, ``models/modelutils.py:residualBlock``), written anew.

The encoder (:class:`HybridGNetEncoder`, the official ``EncoderConv`` without its ``fc_mu``/``fc_logvar``, which
are the head's latent layers here): six pre-activation residual blocks ``[BN -> ReLU -> conv3x3 -> BN -> ReLU ->
conv3x3] + identity (or conv1x1 + BN)``, then ReLU, with 2x2 max pooling between them; widths 8, 16, 32, 64, 128,
128 at strides 1, 2, 4, 8, 16, 32 (from scratch, one input channel). **Every BatchNorm has
``track_running_stats=False``**: batch statistics also in eval mode (as published; outputs depend on the batch, so
evaluate with the batch you mean; the parity fixture uses batch 1). ``norm_running_stats=True`` gives ordinary
BatchNorm (a deviation for users who want batch-independent inference). As a backbone it publishes strides 4..32
(``out_indices`` 2..5, the levels the head uses); any input size works (max pooling in ceil mode: level ``i`` is
``ceil(H / 2**i)``, the official floor pooling on the even sizes it was used with).

The model (:class:`HybridGNet`, factory ``hybridgnet_2igsc``) is a :class:`~attnseg.models.Segmentor` of the two,
its forward a dict (``landmarks``, ``pos1``, ``pos2``, ``mu``, ``logvar``, ...). ``official_output=True`` makes it
return the official tuple ``(landmarks, pos1, pos2)`` (what :func:`attnseg.convert.hybridgnet.from_official` builds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.backbones._common import pretrained_cfg_factory
from attnseg.errors import InputSizeError
from attnseg.heads.hybridgnet import HybridGNetHead
from attnseg.models.segmentor import Segmentor
from attnseg.registry import BACKBONES, MODELS

__all__ = ["ResidualBlock", "HybridGNetEncoder", "HybridGNet", "hybridgnet_2igsc", "test_hybridgnet_2igsc"]


class ResidualBlock(nn.Module):
    """HybridGNet's ``residualBlock``: ``ReLU(block(x) + skip(x))``, ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, running_stats: bool = False) -> None:
        super().__init__()

        def bn(c: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(c, track_running_stats=running_stats)

        self.skip = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), bn(out_channels))
                     if in_channels != out_channels else None)
        self.block = nn.Sequential(bn(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                   bn(out_channels), nn.ReLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.skip(x) if self.skip is not None else x
        return F.relu(self.block(x) + identity)


class HybridGNetEncoder(nn.Module):
    """HybridGNet's CNN encoder as a backbone (see the module docstring).

    Args:
        in_chans: input channels (1 for X-rays).
        widths: channels of the six residual blocks (strides 1, 2, 4, 8, 16, 32).
        out_indices: blocks whose outputs ``forward_pyramid`` returns (default 2..5: strides 4..32).
        norm_running_stats: BatchNorm with running statistics (False: as published, batch statistics always).
        num_classes: must be 0 (no classifier; accepted for the backbone contract).

    Example::

        >>> enc = HybridGNetEncoder()
        >>> [tuple(f.shape[1:]) for f in enc.forward_pyramid(torch.randn(2, 1, 64, 97))]
        [(32, 16, 25), (64, 8, 13), (128, 4, 7), (128, 2, 4)]
    """

    family = "hybridgnet"
    input_conv_keys = ("layers.0.block.2.weight", "layers.0.skip.0.weight")

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (8, 16, 32, 64, 128, 128),
                 out_indices: Sequence[int] = (2, 3, 4, 5), norm_running_stats: bool = False,
                 num_classes: int = 0) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1 or in_chans < 1:
            raise ValueError(f"widths and in_chans must be >= 1, got {widths=}, {in_chans=}")
        out_indices = [int(i) for i in out_indices]
        if not out_indices or sorted(set(out_indices)) != out_indices or not all(0 <= i < len(widths)
                                                                                for i in out_indices):
            raise ValueError(f"out_indices must be increasing indices of the {len(widths)} blocks, got {out_indices}")
        if num_classes != 0:
            raise ValueError(f"HybridGNetEncoder has no classifier; num_classes must be 0, got {num_classes}")
        self.in_chans, self.num_classes, self.spatial_dims = in_chans, 0, 2
        self.widths, self.out_indices = widths, out_indices
        chans = [in_chans, *widths]
        self.layers = nn.ModuleList(ResidualBlock(chans[i], chans[i + 1], norm_running_stats)
                                    for i in range(len(widths)))
        self.feature_info = [{"num_chs": widths[i], "reduction": 2**i, "module": f"layers.{i}"} for i in out_indices]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, in_chans, H, W]`` -> the outputs of the ``out_indices`` blocks, ``[B, widths[i], ceil(H / 2**i),
        ceil(W / 2**i)]``."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise InputSizeError(f"HybridGNetEncoder expects [B, {self.in_chans}, H, W], got {list(x.shape)}")
        outs = []
        for i, layer in enumerate(self.layers[:self.out_indices[-1] + 1]):
            if i > 0:
                x = F.max_pool2d(x, 2, ceil_mode=True)  # = the official MaxPool2d(2) on even sizes; odd: ceil
            x = layer(x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    forward = forward_pyramid


class HybridGNet(Segmentor):
    """The published HybridGNet (2-IGSC): :class:`HybridGNetEncoder` + :class:`~attnseg.heads.hybridgnet.
    HybridGNetHead`; forward -> the head's dict, or ``(landmarks, pos1, pos2)`` with ``official_output=True``."""

    family = "hybridgnet"

    def __init__(self, backbone: nn.Module, head: nn.Module, official_output: bool = False) -> None:
        super().__init__(backbone, head)
        self.official_output = official_output

    def forward(self, x: torch.Tensor) -> Any:
        out = super().forward(x)
        if self.official_output:
            return out["landmarks"], out["pos1"], out["pos2"]
        return out


_HEAD_KEYS = ("template", "latent", "input_size", "latent_dim", "skip_levels", "filters", "K", "window", "lookup")


def _create_hybridgnet(in_chans: int, num_classes: int | None, kwargs: dict[str, Any]) -> HybridGNet:
    args = {"template": "chest_xray:LH", "input_size": 1024, "latent_dim": 64, "filters": (2, 32, 32, 32, 16, 16, 16),
            "K": 6, "window": (3, 3), **kwargs}
    official_output = bool(args.pop("official_output", False))
    enc_keys = ("widths", "norm_running_stats")
    unknown = sorted(set(args) - {*_HEAD_KEYS, *enc_keys})
    if unknown:
        raise TypeError(f"hybridgnet_2igsc got unexpected arguments {unknown} (accepted: "
                        f"{', '.join((*_HEAD_KEYS, *enc_keys, 'official_output'))})")
    encoder = HybridGNetEncoder(in_chans=in_chans, **{k: args[k] for k in enc_keys if k in args})
    head_args = {k: args[k] for k in _HEAD_KEYS if k in args}
    if num_classes is None:
        from attnseg.datasets.landmark_template import load_template

        num_classes = load_template(head_args["template"]).num_classes
    head = HybridGNetHead([f["num_chs"] for f in encoder.feature_info], [f["reduction"] for f in encoder.feature_info],
                          num_classes=num_classes, in_chans=in_chans, **head_args)
    return HybridGNet(encoder, head, official_output=official_output)


@MODELS.register()
def hybridgnet_2igsc(in_chans: int = 1, num_classes: int | None = None, **kwargs: Any) -> HybridGNet:
    """HybridGNet 2-IGSC "6-5" as published (hybridDoubleSkip.Hybrid): 1024x1024 single-channel input, the chest X-ray
    lungs + heart template (120 nodes, 3 classes), latent 64 (flatten of the stride-32 map), K 6, filters
    [2, 32, 32, 32, 16, 16, 16], skips at strides 32 and 16; 17.51 M parameters (16.78 M in fc_mu/fc_logvar).

    ``kwargs``: the head's ``template``, ``latent`` (``"avgpool"`` for any size), ``input_size``, ``latent_dim``,
    ``skip_levels``, ``filters``, ``K``, ``window``, ``lookup``; the encoder's ``widths``, ``norm_running_stats``;
    ``official_output``. ``num_classes`` defaults to the template's.

    Example::

        >>> model = hybridgnet_2igsc(input_size=128).eval()
        >>> model(torch.randn(1, 1, 128, 128))["landmarks"].shape
        torch.Size([1, 120, 2])
    """
    return _create_hybridgnet(in_chans, num_classes, kwargs)


@MODELS.register()
def test_hybridgnet_2igsc(in_chans: int = 1, num_classes: int | None = None, **kwargs: Any) -> HybridGNet:
    """The parity fixture's configuration for CI: the published model at a 128x128 input."""
    return _create_hybridgnet(in_chans, num_classes, {"input_size": 128, **kwargs})


# -- the encoder as a backbone (configs pair it with the hybridgnet head) -----------------------------------------

@BACKBONES.register(cls=HybridGNetEncoder)
def hybridgnet_encoder(**kwargs: Any) -> HybridGNetEncoder:
    """HybridGNet's residual encoder (widths 8..128, BatchNorm with batch statistics), strides 4..32 by default."""
    return HybridGNetEncoder(**kwargs)


# -- pretrained configurations (ngaggion/HybridGNet) -------------------------------------------------------------------
# Licence unknown: the official repository has no LICENSE file in our sources. Chest X-rays at 1024 x 1024, one
# channel in [0, 1]; the official checkpoints are whole HybridGNets (they load into the ``hybridgnet`` model).
_cfg = pretrained_cfg_factory(paper="2203.10977", origin="https://github.com/ngaggion/HybridGNet", license="unknown",
                              first_conv="layers.0.block.2", classifier=None, num_classes=0, mean=(0.0,), std=(1.0,),
                              input_size=(1, 1024, 1024), crop_pct=1.0, interpolation="bilinear")

default_cfgs: dict[str, dict[str, Any]] = {"hybridgnet_encoder": _cfg()}
