"""Multi-scale self-guided attention head (the ``DAF_stack`` decoder), over any backbone pyramid.

Paper: Ashish Sinha, Jose Dolz, "Multi-scale self-guided attention for medical image segmentation", IEEE JBHI 2020
(arXiv 1906.02849). Reference code: sinAshish/Multi-Scale-Attention @ 96d76f2 (``src/models/my_stacked_danet.py``
``DAF_stack``, ``src/models/attention.py``), written anew here; the position/channel attention modules are DANet's
(:mod:`attnseg.layers.danet`). The published pairing with a 1-channel ResNeXt-101 is :mod:`attnseg.models.msga`.

The head, for ``N`` pyramid levels (default 4, strides 4/8/16/32, any widths), all maps at the finest stride ``s_1``
and ``c = 64`` channels (``channels``):

1. ``down.{k}``: 1x1 conv + BN + PReLU of level ``k`` to ``c`` channels, bilinearly upsampled (align_corners=False)
   to level 0's size;
2. ``side_predict.{k}``: first-level (deep-supervision) logits ``p1_k = conv1x1(down_k)``;
3. ``fuse``: :class:`MultiConv` of the concatenation ``[down_{N-1}, ..., down_0]`` (deepest first, as the
   official ``cat(down4, down3, down2, down1)``) -> ``F`` (``c`` channels);
4. ``guide1`` (:class:`GuidedAttention`), per level ``k``: ``I1_k = [down_k, F]`` (``2c``);
   ``(v1_k, r1_k) = semantic(I1_k)`` (one :class:`SemanticModule` shared by all levels);
   ``A_k = out_k((pam_k(I1_k) + cam_k(I1_k)) * conv_sem_k(r1_k))``;
5. ``guide2``, the same with ``I2_k = [down_k, A_k * F]`` -> ``R_k``, its own shared semantic module;
6. ``predict.{k}``: refined logits ``p2_k = conv1x1(R_k)``.

**Outputs.** Eval mode: the mean of the ``N`` refined logits, bilinearly upsampled to the image size, a Tensor
``[B, num_classes, *S]`` (the official code upsamples each and then averages; averaging first is the same linear map,
equal to 1e-7). Training mode: a dict for :class:`~attnseg.engine.losses.MSGALoss` (keys in :data:`TRAIN_KEYS`):

- ``logits``: the eval-mode output (for training-time metrics);
- ``predictions``: the ``2N`` logits at image size, ``[p1_0 .. p1_{N-1}, p2_0 .. p2_{N-1}]``;
- ``semantic_pairs``: ``N`` pairs ``(v1_k, v2_k)``, each ``[B, D]`` (the semantic encoder's output flattened per
  sample; the official ``enc2.view(-1)`` flattens over the batch: ``v.reshape(-1)``, same MSE);
- ``reconstruction_pairs``: ``2N`` pairs ``(I, r)`` (level 1 for every ``k``, then level 2), ``[B, 2c, *S/s_1]``.

:meth:`MSGAHead.crop_output` crops ``logits`` and ``predictions`` back to the unpadded size (the others live at the
finest stride of the padded image and are compared with each other only, so they are left as they are).

**Input sizes.** The semantic module pools twice and upsamples back, so the finest map must be divisible by 4; the
image size must be divisible by :meth:`MSGAHead.required_divisor` = ``lcm(s_N, 4 * s_1, attention_stride)`` (32 for
strides 4..32); :class:`~attnseg.models.Segmentor` pads any size to it and crops back.

**Memory guard (a deviation when used).** PAM's attention matrix is ``[B, n, n]`` with ``n`` = positions at
``s_1``: a 256x256 image at stride 4 gives 4096^2 (64 MiB per sample in fp32, eight PAMs per forward, each kept
for backward); 512x512 gives 16384^2 (1 GiB per sample each). Two options:

- ``attention_stride`` (default ``None`` = ``s_1``, the original): PAM runs on the input average-pooled to this
  stride and its update (``PAM(x) - x``, i.e. ``gamma * attention``) is upsampled bilinearly and added to the
  full-resolution ``x``; the residual path, the convolutions and CAM (whose ``[B, c, c]`` matrix is small) stay at
  ``s_1``. Memory falls by ``(attention_stride / s_1)**4``. Not the published model: use it for large inputs.
- ``max_attention_bytes`` (default 4 GiB): a PAM whose matrix would be larger raises :class:`MemoryError` naming
  ``attention_stride`` instead of exhausting memory; :meth:`MSGAHead.attention_bytes` gives the estimate for an
  image size and batch. ``None`` disables the check.

**Initialisation**: the official ``weights_init`` (:func:`official_init`: xavier-normal conv weights, BatchNorm
weight N(1, 0.02), bias 0); PAM/CAM ``gamma`` start at 0.

**Deviations from the official code.** ``num_classes`` and the pyramid are configurable (official: 5 classes,
ResNeXt-101 at strides 4..32); the widths of the hard-coded ``BatchNorm2d(64)`` follow ``channels``. The modules the
official model builds but never uses (``attention1-4``, ``refine1-4``, ``conv6_*``, ``conv7_*``) are not built: the
converter (:mod:`attnseg.convert.msga`) drops their keys. Only 2D (the semantic module and the quadratic PAM make
3D impractical).

Forward contract: ``forward(features, image)``; ``image`` is only used for its size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.heads._common import check_head_inputs, class_probabilities, label_map
from attnseg.layers.danet import ChannelAttention, PositionAttention, position_attention_bytes
from attnseg.registry import HEADS

__all__ = ["official_init", "ConvBNPReLU", "MultiConv", "AttentionBranch", "SemanticModule", "GuidedAttention", "MSGAHead",
           "TRAIN_KEYS"]

TRAIN_KEYS = ("logits", "predictions", "semantic_pairs", "reconstruction_pairs")
DEFAULT_MAX_ATTENTION_BYTES = 4 * 2**30


def official_init(module: nn.Module) -> None:
    """The official ``weights_init`` (``src/main.py``), for ``module.apply``: xavier-normal weights of every
    (transposed) convolution, BatchNorm weight ~ N(1, 0.02) and bias 0. Conv biases keep PyTorch's init."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize, align_corners=False (the official ``F.upsample(..., mode='bilinear')``); no-op at ``size``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNPReLU(nn.Sequential):
    """``conv (k x k, 'same' padding) -> BatchNorm -> PReLU`` (one PReLU slope): ``[B, in, H, W] -> [B, out, H, W]``.

    Keys ``conv``, ``bn``, ``act``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.PReLU()


class MultiConv(nn.Module):
    """The official ``MultiConv``: ``conv3x3 -> BN -> PReLU -> conv3x3 -> BN -> PReLU -> conv1x1 -> BN -> last``,
    ``last`` = PReLU (``attn=False``, the fusion) or a softmax over channels (``attn=True``, the official
    ``Softmax2d``). ``[B, in, H, W] -> [B, out, H, W]``.

    Keys: ``block1``, ``block2`` (:class:`ConvBNPReLU`), ``conv3``, ``bn3``, ``act3`` (a PReLU; absent with ``attn``).
    The official BatchNorms are hard-coded to 64 channels (so ``out`` had to be 64); here they have ``out`` channels.
    """

    def __init__(self, in_channels: int, out_channels: int, attn: bool = False) -> None:
        super().__init__()
        self.attn = attn
        self.block1 = ConvBNPReLU(in_channels, out_channels, 3)
        self.block2 = ConvBNPReLU(out_channels, out_channels, 3)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act3 = None if attn else nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn3(self.conv3(self.block2(self.block1(x))))
        return torch.softmax(x, dim=1) if self.act3 is None else self.act3(x)


class AttentionBranch(nn.Module):
    """The official ``PAM_CAM_Layer``: ``proj`` (conv3x3 ``2c -> c`` + BN + PReLU), DANet position or channel
    attention, ``refine`` (conv3x3 ``c -> c`` + BN + PReLU). ``[B, 2c, H, W] -> [B, c, H, W]``.

    Args:
        channels: ``c``; the input has ``2 * c`` channels.
        kind: ``"pam"`` (:class:`~attnseg.layers.danet.PositionAttention`) or ``"cam"``
            (:class:`~attnseg.layers.danet.ChannelAttention`).
        pool: PAM only: run the attention on the map average-pooled by this factor and add its upsampled update
            ``PAM(x) - x`` to ``x`` (the head's ``attention_stride``; 1 = the original).
        max_attention_bytes: PAM's guard, see :class:`~attnseg.layers.danet.PositionAttention`.
    """

    def __init__(self, channels: int, kind: str = "pam", pool: int = 1,
                 max_attention_bytes: int | None = DEFAULT_MAX_ATTENTION_BYTES) -> None:
        super().__init__()
        if kind not in ("pam", "cam"):
            raise ValueError(f"AttentionBranch kind must be 'pam' or 'cam', got {kind!r}")
        self.kind = kind
        self.pool = int(pool) if kind == "pam" else 1
        self.proj = ConvBNPReLU(2 * channels, channels, 3)
        self.attention = (PositionAttention(channels, max_attention_bytes=max_attention_bytes) if kind == "pam"
                          else ChannelAttention(channels))
        self.refine = ConvBNPReLU(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.pool == 1:
            x = self.attention(x)
        else:
            small = F.avg_pool2d(x, self.pool)  # [B, c, H/pool, W/pool]
            x = x + _upsample(self.attention(small) - small, x.shape[2:])
        return self.refine(x)


class _EncoderBlock(nn.Sequential):
    """``(conv3x3 -> BN -> ReLU) x 2 -> maxpool 2``: ``[B, in, H, W] -> [B, out, H/2, W/2]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2))


class _DecoderBlock(nn.Sequential):
    """``(conv3x3 -> BN -> ReLU) x 2 -> ConvTranspose k2 s2``: ``[B, in, H, W] -> [B, out, 2H, 2W]``."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, 3, padding=1), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(mid_channels, out_channels, 2, stride=2))


class SemanticModule(nn.Module):
    """The official ``semanticModule``: a two-level encoder-decoder whose code is the "semantic vector" and whose
    output reconstructs its input.

    ``enc1`` (``d -> 2d``, /2), ``enc2`` (``2d -> 4d``, /2), ``dec2`` (``4d -> 2d -> 2d``, x2), bilinear resize to
    ``enc1``'s size, ``dec1`` (``2d -> d -> d``, x2). Keys ``enc1.{i}``, ``enc2.{i}``, ``dec2.{i}``, ``dec1.{i}``
    (the official ``enc1.encode.{i}`` / ``dec1.decode.{i}`` without the inner name).

    ``forward(x [B, d, H, W])`` -> ``(code [B, 4d, H/4, W/4], reconstruction [B, d, H, W])``; ``H, W`` divisible by
    4 (else the reconstruction is smaller than the input). The official module returns ``code.view(-1)``.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        d = in_channels
        self.enc1 = _EncoderBlock(d, 2 * d)
        self.enc2 = _EncoderBlock(2 * d, 4 * d)
        self.dec2 = _DecoderBlock(4 * d, 2 * d, 2 * d)
        self.dec1 = _DecoderBlock(2 * d, d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc1 = self.enc1(x)  # [B, 2d, H/2, W/2]
        code = self.enc2(enc1)  # [B, 4d, H/4, W/4]
        dec2 = self.dec2(code)  # [B, 2d, H/2, W/2] (for H, W divisible by 4)
        return code, self.dec1(_upsample(dec2, enc1.shape[2:]))  # reconstruction [B, d, H, W]


class GuidedAttention(nn.Module):
    """One guided-attention pass over ``n`` levels: a shared semantic module and, per level, PAM + CAM branches.

    For level ``k`` with input ``I_k [B, 2c, H, W]``: ``(v_k, r_k) = semantic(I_k)``,
    ``A_k = out_k((pam_k(I_k) + cam_k(I_k)) * conv_sem_k(r_k))`` ``[B, c, H, W]``.

    Keys: ``semantic``, ``pam.{k}``, ``cam.{k}`` (:class:`AttentionBranch`), ``conv_sem.{k}`` (conv3x3 ``2c -> c``),
    ``out.{k}`` (conv1x1 ``c -> c``; the official ``conv8_*``), ``k`` = pyramid level (0 = finest).
    """

    def __init__(self, num_levels: int, channels: int, pool: int = 1,
                 max_attention_bytes: int | None = DEFAULT_MAX_ATTENTION_BYTES) -> None:
        super().__init__()
        c = channels
        self.semantic = SemanticModule(2 * c)
        self.pam = nn.ModuleList(AttentionBranch(c, "pam", pool, max_attention_bytes) for _ in range(num_levels))
        self.cam = nn.ModuleList(AttentionBranch(c, "cam") for _ in range(num_levels))
        self.conv_sem = nn.ModuleList(nn.Conv2d(2 * c, c, 3, padding=1) for _ in range(num_levels))
        self.out = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(num_levels))

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                               list[torch.Tensor]]:
        """``inputs``: one ``[B, 2c, H, W]`` map per level -> (attended maps ``[B, c, H, W]``, semantic codes,
        reconstructions), each a list over levels."""
        attended, codes, recons = [], [], []
        for k, x in enumerate(inputs):
            code, recon = self.semantic(x)
            attended.append(self.out[k]((self.pam[k](x) + self.cam[k](x)) * self.conv_sem[k](recon)))
            codes.append(code)
            recons.append(recon)
        return attended, codes, recons


class MSGAHead(nn.Module):
    """Multi-scale self-guided attention head (module docstring).

    Args:
        in_channels: channels of each pyramid level, shallow to deep (any widths).
        strides: stride of each level, increasing (e.g. ``[4, 8, 16, 32]``); each a multiple of the first.
        num_classes: output channels (1 = binary, sigmoid > 0.5 in :meth:`postprocess`).
        spatial_dims: must be 2.
        in_chans: image channels (not used by the head; kept for the head contract).
        channels: width ``c`` of every map after the projections (official 64).
        attention_stride: stride at which PAM attends (``None`` = the finest stride, the original); a multiple of
            the finest stride. See "Memory guard" in the module docstring.
        max_attention_bytes: largest PAM matrix allowed per call (bytes; default 4 GiB); ``None`` = no check.

    Forward: ``features`` (list of ``[B, C_i, *S / s_i]``) and ``image`` ``[B, C, *S]`` -> eval: logits
    ``[B, num_classes, *S]``; training: a dict (module docstring).

    Example::

        >>> head = MSGAHead([16, 32, 64, 128], [4, 8, 16, 32], num_classes=3, channels=16).eval()
        >>> feats = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip([16, 32, 64, 128], [4, 8, 16, 32])]
        >>> head(feats, torch.randn(1, 1, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
        >>> sorted(head.train()(feats + [], torch.randn(1, 1, 64, 64)))
        ['logits', 'predictions', 'reconstruction_pairs', 'semantic_pairs']
    """

    output_kind = "msga"
    default_loss = "msga"
    family = "msga"  # official DAF_stack files load into any model with this head (attnseg.convert.msga)

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        spatial_dims: int = 2,
        in_chans: int = 3,
        channels: int = 64,
        attention_stride: int | None = None,
        max_attention_bytes: int | None = DEFAULT_MAX_ATTENTION_BYTES,
    ) -> None:
        super().__init__()
        in_channels, strides = [int(c) for c in in_channels], [int(s) for s in strides]
        if len(in_channels) != len(strides) or not strides:
            raise ValueError(f"in_channels and strides must be non-empty and of equal length, got {in_channels=}, "
                             f"{strides=}")
        if any(c < 1 for c in in_channels):
            raise ValueError(f"in_channels must all be >= 1, got {in_channels=}")
        if any(b <= a for a, b in zip(strides, strides[1:])) or any(s % strides[0] for s in strides):
            raise ValueError(f"MSGAHead needs increasing strides, each a multiple of the first, got {strides=}")
        if spatial_dims != 2:
            raise ValueError(f"MSGAHead is 2D only (its semantic module and the quadratic position attention make 3D "
                             f"impractical), got {spatial_dims=}")
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("channels", channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
        if channels < 8:
            raise ValueError(f"channels must be >= 8 (PAM's query/key width is channels // 8), got {channels=}")
        if attention_stride is None:
            attention_stride = strides[0]
        if not isinstance(attention_stride, int) or attention_stride < strides[0] or attention_stride % strides[0]:
            raise ValueError(f"attention_stride must be a multiple of the finest stride {strides[0]}, got "
                             f"{attention_stride=}")
        if max_attention_bytes is not None and max_attention_bytes < 1:
            raise ValueError(f"max_attention_bytes must be positive or None, got {max_attention_bytes=}")

        self.in_channels = in_channels
        self.strides = strides
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.channels = channels
        self.attention_stride = attention_stride
        self.max_attention_bytes = max_attention_bytes
        self.size_divisor = self.required_divisor(strides)
        n, c, pool = len(strides), channels, attention_stride // strides[0]

        self.down = nn.ModuleList(ConvBNPReLU(ci, c, 1) for ci in in_channels)
        self.side_predict = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for _ in range(n))
        self.fuse = MultiConv(n * c, c, attn=False)
        self.guide1 = GuidedAttention(n, c, pool, max_attention_bytes)
        self.guide2 = GuidedAttention(n, c, pool, max_attention_bytes)
        self.predict = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for _ in range(n))
        self.apply(official_init)

    def required_divisor(self, strides: Sequence[int]) -> int:
        """Image sizes must be multiples of this: ``lcm(deepest stride, 4 * finest stride, attention_stride)``."""
        return math.lcm(int(strides[-1]), 4 * int(strides[0]), int(getattr(self, "attention_stride", strides[0])))

    def attention_bytes(self, image_size: Sequence[int], batch: int = 1,
                        dtype: torch.dtype = torch.float32) -> dict[str, int]:
        """Memory estimate of PAM for an (padded) image size: ``{"per_matrix": bytes of one [B, n, n] matrix,
        "forward": all 2N PAM matrices of one forward (roughly what training keeps for backward), "positions": n}``."""
        n = math.prod(-(-int(s) // self.attention_stride) for s in image_size)
        one = position_attention_bytes(batch, n, dtype)
        return {"positions": n, "per_matrix": one, "forward": 2 * len(self.strides) * one}

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        check_head_inputs(self, features, image)
        size = tuple(features[0].shape[2:])
        down = [_upsample(proj(f), size) for proj, f in zip(self.down, features)]  # N x [B, c, *S/s_1]
        fused = self.fuse(torch.cat(down[::-1], dim=1))  # [B, c, *S/s_1]
        inputs1 = [torch.cat([d, fused], dim=1) for d in down]  # [B, 2c, *S/s_1]
        attended, codes1, recons1 = self.guide1(inputs1)
        inputs2 = [torch.cat([d, a * fused], dim=1) for d, a in zip(down, attended)]
        refined, codes2, recons2 = self.guide2(inputs2)
        refined_logits = [p(r) for p, r in zip(self.predict, refined)]
        out_size = tuple(image.shape[2:])
        logits = _upsample(torch.stack(refined_logits).mean(0), out_size)  # [B, num_classes, *S]
        if not self.training:
            return logits
        side_logits = [p(d) for p, d in zip(self.side_predict, down)]
        return {
            "logits": logits,
            "predictions": [_upsample(p, out_size) for p in (*side_logits, *refined_logits)],
            "semantic_pairs": [(a.flatten(1), b.flatten(1)) for a, b in zip(codes1, codes2)],
            "reconstruction_pairs": list(zip(inputs1 + inputs2, recons1 + recons2)),
        }

    @staticmethod
    def crop_output(output: dict[str, Any], size: Sequence[int]) -> dict[str, Any]:
        """Undo the Segmentor's far-side padding of a training output: crop ``logits`` and ``predictions`` to
        ``size`` (the other entries are at the finest stride of the padded image and stay as they are)."""
        index = (..., *(slice(0, int(n)) for n in size))
        return {**output, "logits": output["logits"][index], "predictions": [p[index] for p in output["predictions"]]}

    @staticmethod
    def _logits(output: torch.Tensor | dict[str, Any]) -> torch.Tensor:
        return output["logits"] if isinstance(output, dict) else output

    def postprocess(self, output: torch.Tensor | dict[str, Any]) -> torch.Tensor:
        """Label map ``[B, *S]`` (int64) of the eval output (or of a training dict's ``logits``): argmax over
        classes, or sigmoid > 0.5 for one class."""
        return label_map(self._logits(output))

    def class_probabilities(self, output: torch.Tensor | dict[str, Any]) -> torch.Tensor:
        """``[B, C, *S]`` probabilities: softmax of the averaged logits (sigmoid = P(foreground) for one class)."""
        return class_probabilities(self._logits(output))


HEADS.register("msga", cls=MSGAHead)(MSGAHead)
