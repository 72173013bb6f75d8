"""HybridGNet's graph decoder over any backbone pyramid: landmarks of a contour template, not pixels.

Paper: Nicolás Gaggion, Lucas Mansilla, Candelaria Mosquera, Diego H. Milone, Enzo Ferrante, "Improving anatomical
plausibility in medical image segmentation via hybrid graph neural networks: applications to chest x-ray analysis",
IEEE TMI 2022 (arXiv 2203.10977; MICCAI 2021 version on the repo's tags). Reference code: ngaggion/HybridGNet @
7c39944 (``models/hybridDoubleSkip.py:Hybrid``, the paper's best "2-IGSC" model; ``models/chebConv.py``;
``utils/utils.py``), written anew (reference/heads.md §5 and §6.5).

The head decodes a landmark template (:mod:`attnseg.datasets.landmark_template`; default the chest X-ray lungs and
heart, 120 nodes pooled to 60) from a VAE latent with Chebyshev graph convolutions (:class:`~attnseg.layers.graph.
ChebConv`, K terms; each followed by a per-node normalisation over features, HybridGNet's ``InstanceNorm1d`` on
``[B, N, F]``, and ReLU), with two image-to-graph skip connections (IGSC):

1. ``mu, logvar = fc_mu(v), fc_logvar(v)`` from the deepest map ``v``; ``z = mu + exp(logvar / 2) * eps`` in
   training, ``z = mu`` in eval; ``x = ReLU(dec_lin(z))`` -> ``[B, M, f6]`` on the pooled graph (``M`` nodes).
2. ``conv6``, ``conv5`` on the pooled rings; ``pos1 = pos_conv1(x)`` ``[B, M, 2]`` (K = 1, no bias: predicted
   coarse landmarks); ``x = [x, lookup(pos1, skip map 1), pos1]``; ``conv4``; unpool ``x <- U x`` (``M -> N``).
3. ``conv3`` on the full rings; ``pos2 = pos_conv2(x)`` ``[B, N, 2]``; ``x = [x, lookup(pos2, skip map 2), pos2]``;
   ``conv2``; ``landmarks = out_conv(x)`` ``[B, N, 2]`` (K = 1, no bias).

Landmarks are normalised ``(x = column, y = row)`` in ``[0, 1]`` of the image. ``filters`` is the official list
``[f0 .. f6]`` (default ``[2, 32, 32, 32, 16, 16, 16]``: ``f6`` the decoder input width, ``f0 = 2`` the coordinates).

**Lookup.** For node ``(x, y)`` on a map of width ``w`` and height ``h``, the feature vector is torchvision's
``roi_align(map, box, output_size=1, aligned=True)`` over the box ``[w x - r, h y - r, w x + r + 1, h y + r + 1]``,
``r = window // 2`` (a ``window``-wide average of bilinear samples, centred half a map pixel right of and below the
node, as published). ``lookup="official"`` scales both axes by the map **width** (the official code; equal on
square inputs) and is the parity mode; the default scales ``y`` by the height. RoIAlign passes no gradient to the
boxes, so, as published, the skip positions learn only from their own loss terms and from being concatenated into
the node features. The default sampling (``sampling_ratio=-1``) is the official one: ``ceil(box size)`` samples per
axis, computed in float32, i.e. 3 or (by rounding) 4.

**Latent.** ``latent="flatten"`` (default, published): ``v`` is the deepest map flattened, so ``fc_mu`` has
``C * (H / s) * (W / s)`` inputs and the padded input must be exactly ``input_size`` (1024 for the paper). Deviation,
for any input size: ``latent="avgpool"`` takes the global average of the deepest map (``C`` inputs); with it the
model runs on odd sizes (the Segmentor pads to the deepest stride and :meth:`crop_output` rescales the coordinates).

Output (a dict, always): ``landmarks`` ``[B, N, 2]``, ``pos1`` ``[B, M, 2]``, ``pos2`` ``[B, N, 2]``, ``mu``,
``logvar`` ``[B, latent_dim]``, ``downsample`` (``D`` ``[M, N]``, what the loss pools the targets with) and
``input_size`` (the ``(H, W)`` the coordinates are normalised to). :meth:`postprocess` rasterizes the landmarks into
a label map at ``input_size`` (:func:`~attnseg.datasets.rasterize.landmarks_to_label_map`, HybridGNet's ``getSeg``
rule); :meth:`class_probabilities` is that map one-hot (a landmark model has no per-pixel probabilities).

The official encoder (residual blocks, BatchNorm without running statistics) is
:class:`attnseg.models.hybridgnet.HybridGNetEncoder`; the published pairing is ``hybridgnet_2igsc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from attnseg.datasets.landmark_template import LandmarkTemplate, load_template
from attnseg.datasets.rasterize import landmarks_to_label_map
from attnseg.errors import InputSizeError
from attnseg.heads._common import check_head_inputs
from attnseg.layers.graph import ChebConv, graph_pool
from attnseg.registry import HEADS

__all__ = ["HybridGNetHead", "roi_lookup"]

LATENTS = ("flatten", "avgpool")
LOOKUPS = ("roi_align", "official")
COORD_KEYS = ("landmarks", "pos1", "pos2")


def roi_lookup(pos: torch.Tensor, feature_map: torch.Tensor, window: Sequence[int] = (3, 3),
               mode: str = "roi_align") -> torch.Tensor:
    """Features of ``feature_map`` ``[B, C, h, w]`` at normalised positions ``pos`` ``[B, N, 2]`` -> ``[B, N, C]``.

    The RoIAlign lookup of HybridGNet (see the module docstring): box ``[w x - r, h y - r, w x + r + 1, h y + r + 1]``
    with ``r = window // 2`` per axis, ``aligned=True``, one output bin, default sampling. ``mode="official"``
    scales ``y`` by ``w`` too. No gradient reaches ``pos`` through the boxes.
    """
    b, n, _ = pos.shape
    h, w = feature_map.shape[-2:]
    scale_y = w if mode == "official" else h
    px, py = pos[..., 0] * w, pos[..., 1] * scale_y  # float32 like the official pos * h
    rx, ry = float(window[0] // 2), float(window[1] // 2)
    boxes = torch.stack([px - rx, py - ry, px + (rx + 1.0), py + (ry + 1.0)], dim=-1)  # [B, N, 4]
    index = torch.arange(b, device=pos.device, dtype=boxes.dtype).repeat_interleave(n)[:, None]
    rois = torch.cat([index, boxes.reshape(b * n, 4)], dim=1).detach()  # [B*N, 5]; RoIAlign has no box gradient
    out = roi_align(feature_map, rois.to(feature_map.dtype), output_size=(1, 1), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)  # [B*N, C, 1, 1]
    return out.view(b, n, -1)


def _node_norm(x: torch.Tensor) -> torch.Tensor:
    """HybridGNet's ``InstanceNorm1d`` on ``[B, N, F]``: nodes are the channels, so each node's features are
    normalised (an affine-free LayerNorm over features; computed by ``instance_norm`` for bit-equal outputs)."""
    return F.instance_norm(x, eps=1e-5)


class HybridGNetHead(nn.Module):
    """HybridGNet's 2-IGSC graph decoder over a backbone pyramid (see the module docstring).

    Args:
        in_channels: channels of each pyramid level, shallow to deep.
        strides: stride of each level.
        num_classes: classes of the rasterized label maps; must equal the template's (largest label + 1).
        spatial_dims: 2 (landmark contours are 2D).
        in_chans: image channels (unused by the head; part of the head contract).
        template: landmark template: shipped name (``"chest_xray:LH"``), path, or :class:`LandmarkTemplate`.
        latent: ``"flatten"`` (published; fixed ``input_size``) or ``"avgpool"`` (any size; deviation).
        input_size: the padded input size ``H`` or ``(H, W)`` for ``latent="flatten"``.
        latent_dim: size of ``z`` (64).
        latent_level: pyramid level the latent is computed from (default the deepest, -1).
        skip_levels: the pyramid levels of the two IGSC lookups, for the pooled and the full graph (default
            ``(-1, -2)``: strides 32 and 16 on a 4-level pyramid, the published "6-5").
        filters: the official ``[f0, ..., f6]`` widths (``f0`` must be 2).
        K: Chebyshev order of the graph convolutions (6).
        window: lookup box size ``(wx, wy)`` in map pixels (``(3, 3)``).
        lookup: ``"roi_align"`` (x by map width, y by map height) or ``"official"`` (both by width; parity).

    Example::

        >>> head = HybridGNetHead([32, 64, 128, 128], [4, 8, 16, 32], num_classes=3, latent="avgpool",
        ...                       filters=[2, 8, 8, 8, 4, 4, 4], K=3, latent_dim=8)
        >>> feats = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip([32, 64, 128, 128], [4, 8, 16, 32])]
        >>> out = head.eval()(feats, torch.randn(2, 1, 64, 96))
        >>> out["landmarks"].shape, out["pos1"].shape, head.postprocess(out).shape
        (torch.Size([2, 120, 2]), torch.Size([2, 60, 2]), torch.Size([2, 64, 96]))
    """

    output_kind = "landmarks"
    default_loss = "hybridgnet"

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        spatial_dims: int = 2,
        in_chans: int = 3,
        template: str | LandmarkTemplate = "chest_xray:LH",
        latent: str = "flatten",
        input_size: int | Sequence[int] | None = 1024,
        latent_dim: int = 64,
        latent_level: int = -1,
        skip_levels: Sequence[int] = (-1, -2),
        filters: Sequence[int] = (2, 32, 32, 32, 16, 16, 16),
        K: int = 6,
        window: Sequence[int] = (3, 3),
        lookup: str = "roi_align",
    ) -> None:
        super().__init__()
        in_channels, strides = [int(c) for c in in_channels], [int(s) for s in strides]
        if len(in_channels) != len(strides) or not strides:
            raise ValueError(f"in_channels and strides must be non-empty and of equal length, got {in_channels=}, "
                             f"{strides=}")
        if spatial_dims != 2:
            raise ValueError(f"HybridGNetHead decodes 2D contours; spatial_dims must be 2, got {spatial_dims=}")
        if latent not in LATENTS:
            raise ValueError(f"latent must be one of {LATENTS}, got {latent=}")
        if lookup not in LOOKUPS:
            raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup=}")
        filters = [int(f) for f in filters]
        if len(filters) != 7 or filters[0] != 2 or min(filters) < 1:
            raise ValueError(f"filters must be the official 7 widths [2, f1, ..., f6] (f0 = 2 coordinates), got "
                             f"{filters}")
        if K < 1 or latent_dim < 1:
            raise ValueError(f"K and latent_dim must be >= 1, got {K=}, {latent_dim=}")
        window = [int(w) for w in window]
        if len(window) != 2 or min(window) < 1:
            raise ValueError(f"window must be two sizes >= 1, got {window}")
        n = len(strides)
        levels = [latent_level, *skip_levels]
        if len(skip_levels) != 2 or any(not -n <= lv < n for lv in levels):
            raise ValueError(f"latent_level and the two skip_levels must index the {n} pyramid levels (-{n}..{n - 1}),"
                             f" got {latent_level=}, skip_levels={list(skip_levels)}")
        self.template = load_template(template)
        if num_classes != self.template.num_classes:
            raise ValueError(f"num_classes must be the template's {self.template.num_classes} (labels "
                             f"{self.template.class_names} of {self.template.name}), got {num_classes}")

        self.in_channels, self.strides = in_channels, strides
        self.num_classes, self.spatial_dims, self.in_chans = num_classes, spatial_dims, in_chans
        self.size_divisor = max(strides)
        self.latent, self.lookup_mode, self.window = latent, lookup, tuple(window)
        self.latent_level, self.skip_levels = latent_level % n, tuple(lv % n for lv in skip_levels)
        self.filters, self.K, self.latent_dim = filters, K, latent_dim
        self.input_size: tuple[int, int] | None = None

        deep_c, deep_s = in_channels[self.latent_level], strides[self.latent_level]
        if latent == "flatten":
            if input_size is None:
                raise ValueError("latent='flatten' needs input_size (the fixed padded input size); use "
                                 "latent='avgpool' for any size")
            size = (int(input_size), int(input_size)) if isinstance(input_size, int) else tuple(int(s) for s in
                                                                                             input_size)
            if len(size) != 2 or any(s < 1 or s % self.size_divisor for s in size):
                raise ValueError(f"input_size must be one or two sizes divisible by {self.size_divisor} (the deepest "
                                 f"stride), got {input_size=}")
            self.input_size = size  # type: ignore[assignment]
            flat = deep_c * (size[0] // deep_s) * (size[1] // deep_s)
        else:
            flat = deep_c
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)

        t = self.template
        a, ad = t.adjacency(), t.pooled_adjacency()
        self.register_buffer("upsample", t.upsample(), persistent=False)  # U [N, M]
        self.register_buffer("downsample", t.downsample(), persistent=False)  # D [M, N]
        f = filters
        c1, c2 = in_channels[self.skip_levels[0]], in_channels[self.skip_levels[1]]
        self.dec_lin = nn.Linear(latent_dim, f[6] * t.num_pooled_nodes)
        self.conv6 = ChebConv(f[6], f[5], ad, K)
        self.conv5 = ChebConv(f[5], f[4], ad, K)
        self.pos_conv1 = ChebConv(f[4], 2, ad, 1, bias=False)
        self.conv4 = ChebConv(f[4] + c1 + 2, f[3], ad, K)
        self.conv3 = ChebConv(f[3], f[2], a, K)
        self.pos_conv2 = ChebConv(f[2], 2, a, 1, bias=False)
        self.conv2 = ChebConv(f[2] + c2 + 2, f[1], a, K)
        self.out_conv = ChebConv(f[1], 2, a, 1, bias=False)
        nn.init.normal_(self.dec_lin.weight, 0.0, 0.1)

    # -- forward ----------------------------------------------------------------------------------------------------
    def encode(self, deep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` ``[B, latent_dim]`` from the deepest map ``[B, C, h, w]``."""
        v = deep.flatten(1) if self.latent == "flatten" else deep.mean(dim=(2, 3))
        return self.fc_mu(v), self.fc_logvar(v)

    def check_input_size(self, size: Sequence[int]) -> None:
        """Raise :class:`InputSizeError` unless a (padded) input of spatial ``size`` fits: exactly ``input_size`` with
        the flattening latent. A Segmentor asks before running its backbone."""
        if self.latent == "flatten" and tuple(int(s) for s in size) != tuple(self.input_size):
            raise InputSizeError(f"HybridGNetHead with latent='flatten' needs a (padded) input of exactly "
                                 f"{list(self.input_size)} (its fc_mu flattens the deepest map), got "
                                 f"{[int(s) for s in size]}; resize the images to input_size, or use "
                                 "latent='avgpool' for any size")

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> dict[str, Any]:
        check_head_inputs(self, features, image)
        size = tuple(int(s) for s in image.shape[2:])
        self.check_input_size(size)
        mu, logvar = self.encode(features[self.latent_level])
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        x = F.relu(self.dec_lin(z)).reshape(z.shape[0], -1, self.filters[6])  # [B, M, f6]
        x = F.relu(_node_norm(self.conv6(x)))
        x = F.relu(_node_norm(self.conv5(x)))  # [B, M, f4]
        pos1 = self.pos_conv1(x)  # [B, M, 2]
        skip1 = roi_lookup(pos1, features[self.skip_levels[0]], self.window, self.lookup_mode)  # [B, M, C1]
        x = F.relu(_node_norm(self.conv4(torch.cat([x, skip1, pos1], dim=-1))))  # [B, M, f3]
        x = graph_pool(x, self.upsample)  # [B, N, f3]
        x = F.relu(_node_norm(self.conv3(x)))  # [B, N, f2]
        pos2 = self.pos_conv2(x)  # [B, N, 2]
        skip2 = roi_lookup(pos2, features[self.skip_levels[1]], self.window, self.lookup_mode)  # [B, N, C2]
        x = F.relu(_node_norm(self.conv2(torch.cat([x, skip2, pos2], dim=-1))))  # [B, N, f1]
        landmarks = self.out_conv(x)  # [B, N, 2]
        return {"landmarks": landmarks, "pos1": pos1, "pos2": pos2, "mu": mu, "logvar": logvar,
                "downsample": self.downsample, "input_size": size}

    # -- structured-output contract ---------------------------------------------------------------------------------
    def crop_output(self, output: dict[str, Any], size: Sequence[int]) -> dict[str, Any]:
        """Coordinates normalised to the padded ``output["input_size"]`` -> normalised to the unpadded ``size``
        (the Segmentor pads on the far side, so pixel positions are unchanged: ``x' = x * W_padded / W``)."""
        padded = output["input_size"]
        h, w = int(size[0]), int(size[1])
        scale = torch.tensor([padded[1] / w, padded[0] / h])
        out = dict(output)
        for key in COORD_KEYS:
            if key in out:
                out[key] = out[key] * scale.to(out[key].device, out[key].dtype)
        out["input_size"] = (h, w)
        return out

    def postprocess(self, output: dict[str, Any]) -> torch.Tensor:
        """Label map ``[B, H, W]`` (int64) at ``output["input_size"]``: the landmarks rasterized by the template
        (coordinates truncated to pixels, organs filled in draw order, as HybridGNet's ``getSeg``)."""
        return landmarks_to_label_map(output["landmarks"], self.template, output["input_size"])

    def class_probabilities(self, output: dict[str, Any]) -> torch.Tensor:
        """One-hot ``[B, num_classes, H, W]`` of :meth:`postprocess` (a landmark model gives no per-pixel
        probabilities; blending these averages votes of rasterized masks)."""
        labels = self.postprocess(output)
        return F.one_hot(labels, self.num_classes).movedim(-1, 1).to(output["landmarks"].dtype)

    def flip_output(self, output: dict[str, Any], axis: int) -> dict[str, Any]:
        raise ValueError("HybridGNet landmarks cannot be flipped: the template's organs are anatomical left/right "
                         "contours (a flipped right lung is not a left lung); disable flip test-time augmentation")


HEADS.register("hybridgnet", cls=HybridGNetHead)(HybridGNetHead)
