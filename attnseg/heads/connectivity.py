"""Connectivity heads: ConnNet/BiconNet's connectivity output over any head, and DconnNet's decoder.

Papers: Kampffmeyer et al., "ConnNet" (arXiv 1804.07836; no official code); Yang et al., "BiconNet" (Pattern
Recognition 2022, arXiv 2103.00334; Zyun-Y/BiconNets @ 38215c0, Zyun-Y/BiconNet-Medical @ f772f78); Yang & Farsiu,
"Directional Connectivity-based Segmentation of Medical Images" (CVPR 2023, arXiv 2304.00145; Zyun-Y/DconnNet @
e55ac71, ``model/DconnNet.py``). Written anew; the encoding, voting and decode rules are the pure tensor ops of
:mod:`attnseg.layers.connectivity`, the losses are ``connectivity`` in :mod:`attnseg.engine.losses`.

A connectivity model predicts, for each class ``c`` and each of ``N`` neighbour directions ``k`` (8 or 4 in 2D, 26
or 6 in 3D), the logit that a pixel and its ``k``-th neighbour are both in ``c``: ``N * K`` channels, channel
``N * c + k``. Bilateral voting turns them into a mask (see :mod:`attnseg.layers.connectivity` for the three
``decode`` rules: ``soft``, ``binarize``, ``multiclass``).

- :class:`ConnectivityHead` (``connectivity``) wraps **any** registered logits head (``inner: {name: unetr, ...}``)
  built with ``N * K`` output channels: the connectivity output is an output parameterisation, not an architecture
  (reference/heads.md section 6.4). Output: the connectivity logits ``[B, N * K, *S]``.
- :class:`DconnNetHead` (``dconnnet``) is DconnNet's decoder over any pyramid at strides 2 (or 4)..32: directional
  prior, SDE module (DANet position/channel attention per direction group, :mod:`attnseg.layers.danet`), space
  blocks, feature blocks and the lightweight decoder. In training it returns ``{"logits", "aux"}`` (``aux`` = the
  directional-prior map the official loss also scores, weight 0.3); in eval the logits. Generalisations: each level
  is brought to DconnNet's widths (64, 64, 128, 256, 512) by a 1x1 convolution when it differs; a pyramid starting
  at stride 4 gets its stride-2 level from a stride-2 conv on the image (``stem2``); the prior's fixed x32
  upsampling becomes "to the image size" and every other upsampling "to the next level's size"; 2D and 3D. Dead
  official parts are not built: ``cls_pred_conv`` and ``fb5.conv_3x3`` (the converter drops their keys).

Both heads share ``output_kind = "connectivity"``, ``default_loss = "connectivity"``, and
``postprocess`` / ``class_probabilities`` / ``flip_output`` by their ``decode`` rule. For ``decode="binarize"`` the
class probability is ``max_k min(P_k, P_back)``, so ``postprocess`` equals thresholding it at 0.5 in every rule.

Example::

    >>> head = ConnectivityHead([16, 32], [4, 8], num_classes=1, inner={"name": "unetr", "feature_size": 8})
    >>> out = head([torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)], torch.randn(1, 3, 32, 32))
    >>> out.shape, head.postprocess(out).shape
    (torch.Size([1, 8, 32, 32]), torch.Size([1, 32, 32]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.heads._common import check_head_inputs
from attnseg.layers import connectivity as conn
from attnseg.layers.danet import ChannelAttention, PositionAttention
from attnseg.layers.dims import conv_type, dropout_type, interp_mode, norm_layer
from attnseg.registry import HEADS

__all__ = ["ConnectivityHead", "DconnNetHead", "DCONNNET_WIDTHS"]

DCONNNET_WIDTHS = (64, 64, 128, 256, 512)  # ResNet-34's stem, layer1..layer4 (strides 2..32)
_RESERVED_INNER = ("in_channels", "strides", "num_classes", "spatial_dims", "in_chans")


class _ConnectivityOutput:
    """``postprocess``, ``class_probabilities`` and ``flip_output`` of a connectivity head (needs ``num_classes``,
    ``neighbours`` and ``decode``)."""

    output_kind = "connectivity"
    default_loss = "connectivity"
    num_classes: int
    neighbours: int
    decode: str

    def _setup_output(self, num_classes: int, spatial_dims: int, neighbours: int | None, decode: str | None) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.neighbours = conn.check_neighbours(neighbours, spatial_dims)
        self.decode = conn.check_decode(decode, num_classes)
        self.out_channels = self.neighbours * num_classes

    @staticmethod
    def _logits(output: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        return output["logits"] if isinstance(output, dict) else output

    def postprocess(self, output: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Label map ``[B, *S]`` (int64) by the ``decode`` rule."""
        return conn.label_map(self._logits(output), self.num_classes, self.decode, self.neighbours)

    def class_probabilities(self, output: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Vote-derived probabilities ``[B, K, *S]`` (``K = num_classes``; for one class P(foreground))."""
        return conn.class_probabilities(self._logits(output), self.num_classes, self.decode, self.neighbours)

    def flip_output(self, output: torch.Tensor, axis: int) -> torch.Tensor:
        """Logits of a flipped image mapped back: flip ``axis`` and swap the mirrored directions' channels."""
        return conn.flip(self._logits(output), axis, self.neighbours)


class ConnectivityHead(_ConnectivityOutput, nn.Module):
    """Any registered logits head turned into a connectivity head (ConnNet / BiconNet output parameterisation).

    Args:
        in_channels, strides, num_classes, spatial_dims, in_chans: the head contract (``num_classes`` = ``K``).
        inner: the wrapped head as a config section, ``{"name": <registered head>, **its options}``; it is built with
            ``N * K`` output channels. Heads with a structured output (``output_kind`` other than ``"logits"``) are
            refused.
        decode: ``"soft"`` (default for one class), ``"binarize"`` (one class) or ``"multiclass"`` (default for
            ``K > 1``); see :mod:`attnseg.layers.connectivity`.
        neighbours: 8 (default) or 4 in 2D, 26 (default) or 6 in 3D.

    Forward: ``features`` and ``image`` as the inner head takes them -> connectivity logits ``[B, N * K, *S]``.

    Example::

        >>> head = ConnectivityHead([16, 32], [2, 4], num_classes=2, spatial_dims=3, in_chans=1,
        ...                         inner={"name": "unetr", "feature_size": 8}, neighbours=6)
        >>> out = head([torch.randn(1, 16, 8, 8, 8), torch.randn(1, 32, 4, 4, 4)], torch.randn(1, 1, 16, 16, 16))
        >>> out.shape, head.class_probabilities(out).shape
        (torch.Size([1, 12, 16, 16, 16]), torch.Size([1, 2, 16, 16, 16]))
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        spatial_dims: int = 2,
        in_chans: int = 3,
        inner: dict[str, Any] | None = None,
        decode: str | None = None,
        neighbours: int | None = None,
    ) -> None:
        super().__init__()
        self._setup_output(num_classes, spatial_dims, neighbours, decode)
        spec = dict(inner) if inner is not None else {"name": "unetr"}
        name = spec.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"inner must name the wrapped head, e.g. {{'name': 'unetr', 'feature_size': 24}}, got "
                             f"{inner!r}")
        if name in ("connectivity", "dconnnet"):
            raise ValueError(f"inner head '{name}' already has a connectivity output; wrap a logits head")
        bad = [k for k in spec if k in _RESERVED_INNER]
        if bad:
            raise ValueError(f"inner.{bad[0]}: set by the connectivity head (from the model), not here")
        try:
            factory = HEADS.get(name)
        except KeyError as e:
            raise ValueError(f"inner: {e.args[0]}") from None
        self.inner = factory(in_channels=list(in_channels), strides=list(strides), num_classes=self.out_channels,
                             spatial_dims=spatial_dims, in_chans=in_chans, **spec)
        kind = getattr(self.inner, "output_kind", "logits")
        if kind != "logits":
            raise ValueError(f"inner head '{name}' outputs '{kind}', not plain logits; wrap a logits head")
        self.inner_name = name
        self.in_channels = list(self.inner.in_channels) if hasattr(self.inner, "in_channels") else list(in_channels)
        self.strides = list(self.inner.strides) if hasattr(self.inner, "strides") else list(strides)
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.size_divisor = int(getattr(self.inner, "size_divisor", 1))

    def required_divisor(self, strides: list[int]) -> int:
        """The wrapped head's size divisor."""
        required = getattr(self.inner, "required_divisor", None)
        return int(required(strides)) if callable(required) else self.size_divisor

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        logits = self.inner(features, image)
        if logits.shape[1] != self.out_channels or logits.shape[2:] != image.shape[2:]:
            raise ValueError(f"inner head '{self.inner_name}' returned {list(logits.shape)}; a connectivity head "
                             f"needs [B, {self.out_channels}, {', '.join(map(str, image.shape[2:]))}]")
        return logits


# -- DconnNet -------------------------------------------------------------------------------------------------------

def _conv_bn_relu(spatial_dims: int, cin: int, cout: int, kernel_size: int, bias: bool = False,
                  stride: int = 1) -> nn.Sequential:
    """``conv (no bias by default) -> BatchNorm -> ReLU`` as ``Sequential`` indices 0, 1, 2 (the official layout)."""
    conv = conv_type(spatial_dims)(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
    return nn.Sequential(conv, norm_layer("batch", spatial_dims, cout), nn.ReLU(inplace=True))


def _gap(x: torch.Tensor) -> torch.Tensor:
    """Global average pool keeping the spatial axes: ``[B, C, *S] -> [B, C, 1, ...]``."""
    return x.mean(tuple(range(2, x.dim())), keepdim=True)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linear resize with ``align_corners=True``, DconnNet's interpolation everywhere."""
    return F.interpolate(x, size=tuple(size), mode=interp_mode(x.dim() - 2), align_corners=True)


class ConvBnRelu(nn.Module):
    """DconnNet's ``ConvBnRelu`` (no conv bias): ``conv``, ``bn``, ``relu`` by name."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = conv_type(spatial_dims)(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = norm_layer("batch", spatial_dims, cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class FeatureBlock(nn.Module):
    """DconnNet's ``FeatureBlock``: ``[conv3x3 BN ReLU] -> upsample to size -> conv1x1 BN ReLU``.

    ``first_conv=False`` is the official ``last=True`` (``fb5``), whose 3x3 conv is built there but never used.
    """

    def __init__(self, spatial_dims: int, cin: int, cout: int, first_conv: bool = True) -> None:
        super().__init__()
        self.conv_3x3 = ConvBnRelu(spatial_dims, cin, cin, 3) if first_conv else None
        self.conv_1x1 = ConvBnRelu(spatial_dims, cin, cout, 1)
        for m in self.modules():  # the official block's own initialisation
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_uniform_(m.weight)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.conv_3x3 is not None:
            x = self.conv_3x3(x)
        return self.conv_1x1(_resize(x, size))  # official: x2 upsampling


class SpaceBlock(nn.Module):
    """DconnNet's ``SpaceBlock``: ``sigmoid(sum_c scene_encoder(s) * content_encoders(f)) * feature_reencoders(f)``.

    ``scene`` is a pooled vector ``[B, C_s, 1, ...]``, ``features`` a map ``[B, C_f, *S]``; output ``[B, C_out, *S]``.
    """

    def __init__(self, spatial_dims: int, scene_channels: int, channels: int, out_channels: int) -> None:
        super().__init__()
        conv = conv_type(spatial_dims)
        self.scene_encoder = nn.Sequential(conv(scene_channels, out_channels, 1), nn.ReLU(inplace=True),
                                           conv(out_channels, out_channels, 1))
        self.content_encoders = _conv_bn_relu(spatial_dims, channels, out_channels, 1, bias=True)
        self.feature_reencoders = _conv_bn_relu(spatial_dims, channels, out_channels, 1, bias=True)

    def forward(self, scene: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        content = self.content_encoders(features)
        relations = torch.sigmoid((self.scene_encoder(scene) * content).sum(dim=1, keepdim=True))  # [B, 1, *S]
        return relations * self.feature_reencoders(features)


class DirectionAttention(nn.Module):
    """One direction group of the SDE module (the official ``DANetHead``): position and channel attention branches,
    summed, gated by ``sigmoid`` of the group's slice of the re-encoded directional prior, then dropout + 1x1 conv.

    ``x [B, C, *S]``, ``gate [B, C, 1, ...]`` -> ``[B, C, *S]``.
    """

    def __init__(self, spatial_dims: int, channels: int, dropout: float, max_attention_bytes: int | None) -> None:
        super().__init__()
        self.conv5a = _conv_bn_relu(spatial_dims, channels, channels, 3)
        self.conv5c = _conv_bn_relu(spatial_dims, channels, channels, 3)
        self.sa = PositionAttention(channels, spatial_dims=spatial_dims, max_attention_bytes=max_attention_bytes)
        self.sc = ChannelAttention(channels)
        self.conv51 = _conv_bn_relu(spatial_dims, channels, channels, 3)
        self.conv52 = _conv_bn_relu(spatial_dims, channels, channels, 3)
        self.conv8 = nn.Sequential(dropout_type(spatial_dims)(dropout), conv_type(spatial_dims)(channels, channels, 1))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        position = self.conv51(self.sa(self.conv5a(x)))
        channel = self.conv52(self.sc(self.conv5c(x)))
        return self.conv8((position + channel) * torch.sigmoid(gate))


class SDEModule(nn.Module):
    """DconnNet's spatial-directional embedding: the deepest map split into ``groups`` channel groups, one
    :class:`DirectionAttention` each (``att1``..), gated by the re-encoded directional prior, fused by dropout +
    1x1 conv (``final_conv``) and added to the input.

    ``x [B, C, *S]``, ``prior [B, N * K, 1, ...]`` -> ``[B, C, *S]``; ``C`` divisible by ``groups``.
    """

    def __init__(self, spatial_dims: int, channels: int, prior_channels: int, groups: int = 8, dropout: float = 0.1,
                 max_attention_bytes: int | None = None) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"the SDE module splits the deepest level into {groups} groups; its width {channels} is "
                             "not divisible by it")
        conv = conv_type(spatial_dims)
        self.groups = groups
        self.group_channels = channels // groups
        for g in range(groups):
            self.add_module(f"att{g + 1}", DirectionAttention(spatial_dims, self.group_channels, dropout,
                                                              max_attention_bytes))
        self.final_conv = nn.Sequential(dropout_type(spatial_dims)(dropout), conv(channels, channels, 1))
        hidden = prior_channels * 8 if prior_channels < 32 else channels  # the official rule
        self.reencoder = nn.Sequential(conv(prior_channels, hidden, 1), nn.ReLU(inplace=True),
                                       conv(hidden, channels, 1))

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        gates = self.reencoder(prior).split(self.group_channels, dim=1)  # groups x [B, C/g, 1, ...]
        parts = x.split(self.group_channels, dim=1)
        feats = [self.get_submodule(f"att{g + 1}")(p, e) for g, (p, e) in enumerate(zip(parts, gates))]
        return self.final_conv(torch.cat(feats, dim=1)) + x


class LWDecoder(nn.Module):
    """DconnNet's ``LWdecoder``: level ``i`` (stride ``2**(i+1)``) gets ``max(i, 1)`` blocks of conv3x3 -> BN ->
    ReLU -> x2 upsampling (none for level 0), all end at the first level's stride; summed and divided by 4 (the
    official constant). ``blocks.{i}.{j}.{0,1}`` are the conv and the BatchNorm, as in the official state_dict."""

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        conv = conv_type(spatial_dims)
        self.blocks = nn.ModuleList()
        for i, cin in enumerate(in_channels):
            layers = []
            for j in range(max(i, 1)):
                up = (nn.Upsample(scale_factor=2, mode=interp_mode(spatial_dims), align_corners=True) if i
                      else nn.Identity())
                layers.append(nn.Sequential(conv(cin if j == 0 else out_channels, out_channels, 3, padding=1,
                                                 bias=False),
                                            norm_layer("batch", spatial_dims, out_channels), nn.ReLU(inplace=True), up))
            self.blocks.append(nn.Sequential(*layers))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(block(f) for block, f in zip(self.blocks, features)) / 4.0


class DconnNetHead(_ConnectivityOutput, nn.Module):
    """DconnNet's decoder (Yang & Farsiu, CVPR 2023) over any pyramid, with a connectivity output.

    Args:
        in_channels: channels of each pyramid level.
        strides: ``[2, 4, 8, 16, 32]`` (ResNet with its stem level) or ``[4, 8, 16, 32]`` (the stride-2 level is then
            synthesized from the image by ``stem2``).
        num_classes: ``K``; the output has ``N * K`` channels.
        spatial_dims: 2 or 3.
        in_chans: image channels (input of ``stem2``).
        neighbours, decode: as :class:`ConnectivityHead`.
        widths: DconnNet's widths at strides 2..32 (official ``(64, 64, 128, 256, 512)``); levels of another width
            get a 1x1 conv adapter (``adapters.{i}``).
        decoder_channels: width of the lightweight decoder (official 32).
        sde_groups: channel groups of the SDE module (official 8, one per 2D direction); divides ``widths[-1]``.
        dropout: channel dropout in the SDE module (official 0.1).
        max_attention_bytes: limit of each position-attention matrix (see
            :class:`~attnseg.layers.danet.PositionAttention`); None: none.

    Forward: ``features``, ``image [B, in_chans, *S]`` with ``S`` divisible by 32 -> in training
    ``{"logits": [B, N * K, *S], "aux": [B, N * K, *S]}``, in eval the logits. ``forward_with_aux`` always returns
    ``(logits, aux)``, the official forward's pair.

    Example::

        >>> head = DconnNetHead([64, 64, 128, 256, 512], [2, 4, 8, 16, 32], num_classes=1).eval()
        >>> feats = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip([64, 64, 128, 256, 512], [2, 4, 8, 16, 32])]
        >>> head(feats, torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 8, 64, 64])
        >>> head3d = DconnNetHead([8, 16, 16, 32], [4, 8, 16, 32], num_classes=2, spatial_dims=3, in_chans=1,
        ...                       widths=(8, 8, 16, 16, 64), decoder_channels=8).eval()
        >>> feats = [torch.randn(1, c, 32 // s, 32 // s, 32 // s) for c, s in zip([8, 16, 16, 32], [4, 8, 16, 32])]
        >>> head3d(feats, torch.randn(1, 1, 32, 32, 32)).shape
        torch.Size([1, 52, 32, 32, 32])
    """

    family = "dconnnet"  # official DconnNet files load into any model with this head (attnseg.convert.dconnnet)

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        spatial_dims: int = 2,
        in_chans: int = 3,
        neighbours: int | None = None,
        decode: str | None = None,
        widths: Sequence[int] = DCONNNET_WIDTHS,
        decoder_channels: int = 32,
        sde_groups: int = 8,
        dropout: float = 0.1,
        max_attention_bytes: int | None = None,
    ) -> None:
        super().__init__()
        in_channels, strides, widths = [int(c) for c in in_channels], [int(s) for s in strides], [int(w) for w in
                                                                                                  widths]
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims=}")
        if strides not in ([2, 4, 8, 16, 32], [4, 8, 16, 32]) or len(in_channels) != len(strides):
            raise ValueError(f"DconnNetHead needs pyramid strides [2, 4, 8, 16, 32] or [4, 8, 16, 32] (one channel "
                             f"count each), got {strides=}, {in_channels=}")
        if len(widths) != 5 or min(widths) < 1 or decoder_channels < 1 or sde_groups < 1:
            raise ValueError(f"widths needs 5 positive values (strides 2..32), decoder_channels and sde_groups >= 1, "
                             f"got {widths=}, {decoder_channels=}, {sde_groups=}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout=}")
        self._setup_output(num_classes, spatial_dims, neighbours, decode)
        self.in_channels, self.strides = in_channels, strides
        self.num_classes, self.spatial_dims, self.in_chans = num_classes, spatial_dims, in_chans
        self.size_divisor = 32
        self.widths = widths
        conv = conv_type(spatial_dims)
        w1, w2, w3, w4, w5 = widths
        planned = widths[5 - len(strides):]
        self.stem2 = _conv_bn_relu(spatial_dims, in_chans, w1, 3, stride=2) if len(strides) == 4 else None
        self.adapters = nn.ModuleList(nn.Identity() if c == w else conv(c, w, 1) for c, w in zip(in_channels, planned))
        nk = self.out_channels
        # directional prior (official channel_mapping / direc_reencode)
        self.channel_mapping = _conv_bn_relu(spatial_dims, w5, nk, 3, bias=True)
        self.direc_reencode = nn.Sequential(conv(nk, nk, 1))
        self.sde_module = SDEModule(spatial_dims, w5, nk, sde_groups, dropout, max_attention_bytes)
        self.fb5 = FeatureBlock(spatial_dims, w5, w4, first_conv=False)
        self.fb4 = FeatureBlock(spatial_dims, w4, w3)
        self.fb3 = FeatureBlock(spatial_dims, w3, w2)
        self.fb2 = FeatureBlock(spatial_dims, w2, w1)
        self.sb1 = SpaceBlock(spatial_dims, w5, w5, w5)
        self.sb2 = SpaceBlock(spatial_dims, w5, w4, w4)
        self.sb3 = SpaceBlock(spatial_dims, w4, w3, w3)
        self.sb4 = SpaceBlock(spatial_dims, w3, w2, w2)
        self.final_decoder = LWDecoder(spatial_dims, [w1, w2, w3, w4], decoder_channels)
        self.classifier = conv(decoder_channels, nk, 1)  # official cls_pred_conv_2

    def forward_with_aux(self, features: Sequence[torch.Tensor], image: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, N * K, *S], aux [B, N * K, *S])``, the official forward's pair."""
        check_head_inputs(self, features, image, self.in_chans if self.stem2 is not None else None)
        feats = [adapt(f) for adapt, f in zip(self.adapters, features)]
        if self.stem2 is not None:
            feats.insert(0, self.stem2(image))
        c1, c2, c3, c4, c5 = feats  # strides 2, 4, 8, 16, 32
        size = image.shape[2:]
        aux = self.direc_reencode(_resize(self.channel_mapping(c5), size))  # directional prior, [B, N*K, *S]
        c5 = self.sde_module(c5, _gap(aux))
        r5 = self.sb1(_gap(c5), c5)
        d4 = F.relu(self.fb5(r5, c4.shape[2:]) + c4)
        r4 = self.sb2(_gap(r5), d4)
        d3 = F.relu(self.fb4(r4, c3.shape[2:]) + c3)
        r3 = self.sb3(_gap(r4), d3)
        d2 = F.relu(self.fb3(r3, c2.shape[2:]) + c2)
        r2 = self.sb4(_gap(r3), d2)
        d1 = self.fb2(r2, c1.shape[2:]) + c1
        decoded = self.final_decoder([d1, d2, d3, d4])  # [B, decoder_channels, *S/2]
        return _resize(self.classifier(decoded), size), aux

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor
                ) -> torch.Tensor | dict[str, torch.Tensor]:
        logits, aux = self.forward_with_aux(features, image)
        return {"logits": logits, "aux": aux} if self.training else logits

    def crop_output(self, output: dict[str, torch.Tensor], size: Sequence[int]) -> dict[str, torch.Tensor]:
        """Crop both maps of the training output to the unpadded ``size``."""
        index = (..., *(slice(0, n) for n in size))
        return {key: value[index] for key, value in output.items()}


HEADS.register("connectivity", cls=ConnectivityHead)(ConnectivityHead)
HEADS.register("dconnnet", cls=DconnNetHead)(DconnNetHead)
