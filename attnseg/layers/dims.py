"""Dimension switches (a small version of MONAI's ``networks/layers/factories.py``).

One block definition serves 1D, 2D and 3D: it asks these lookups for its conv, transposed conv, norm, pooling
and dropout types by ``spatial_dims`` instead of naming ``nn.Conv2d`` itself. Names are validated: an unknown
name raises ``ValueError`` listing the valid ones and the closest match.

Example::

    >>> conv_type(3)
    <class 'torch.nn.modules.conv.Conv3d'>
    >>> n = norm_layer("instance", 2, 16)
    >>> isinstance(n, nn.InstanceNorm2d), n.affine
    (True, False)
    >>> norm_layer(("group", {"num_groups": 4}), 3, 16).num_groups
    4
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from attnseg.registry import suggest

__all__ = [
    "NORM_NAMES",
    "POOL_NAMES",
    "NormSpec",
    "conv_type",
    "conv_transpose_type",
    "dropout_type",
    "interp_mode",
    "norm_layer",
    "pool_type",
]

NORM_NAMES = ("instance", "instance_affine", "batch", "group", "layer")
POOL_NAMES = ("max", "avg", "adaptive_max", "adaptive_avg")

# A norm given by name, or MONAI's ``(name, {kwargs})`` form (a list of two in YAML), e.g. ("group", {"num_groups": 4}).
NormSpec = str | tuple[str, dict[str, Any]]


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return spatial_dims - 1


def _lookup(kind: str, name: str, choices: tuple[str, ...]) -> str:
    if name not in choices:
        raise ValueError(f"unknown {kind} '{name}'{suggest(name, choices)} (choose from {', '.join(choices)})")
    return name


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[_check_dims(spatial_dims)]


def conv_transpose_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose1d`` / ``2d`` / ``3d``."""
    return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[_check_dims(spatial_dims)]


def pool_type(name: str, spatial_dims: int) -> type[nn.Module]:
    """Pooling by name: ``max``, ``avg``, ``adaptive_max`` or ``adaptive_avg`` (e.g. ``nn.AdaptiveAvgPool3d``)."""
    i = _check_dims(spatial_dims)
    table = {
        "max": (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d),
        "avg": (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
        "adaptive_max": (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
        "adaptive_avg": (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    }
    return table[_lookup("pooling", name, POOL_NAMES)][i]


def dropout_type(spatial_dims: int) -> type[nn.Module]:
    """Channel dropout (whole maps): ``nn.Dropout1d`` / ``2d`` / ``3d``. Element dropout is plain ``nn.Dropout``."""
    return (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)[_check_dims(spatial_dims)]


def interp_mode(spatial_dims: int) -> str:
    """The (multi)linear ``F.interpolate`` mode for the rank: ``linear`` / ``bilinear`` / ``trilinear``."""
    return ("linear", "bilinear", "trilinear")[_check_dims(spatial_dims)]


class _SingleElementSafe:
    """InstanceNorm that accepts maps with one spatial element (the deepest level of a small crop).

    PyTorch (and so MONAI) raises "Expected more than 1 spatial element" there, in training and in eval
    (research-contributions#66). The normalised value of a single element is 0 (then the affine bias, if any),
    which is what this returns; every other input goes through the stock layer unchanged.
    """

    affine: bool
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[1:] if x.dim() == self._get_no_batch_dim() else x.shape[2:]  # type: ignore[attr-defined]
        if math.prod(spatial) == 1:
            out = x - x  # keeps dtype, device and the autograd graph
            if self.affine and self.bias is not None:
                out = out + self.bias.view(-1, *([1] * len(spatial)))
            return out
        return super().forward(x)  # type: ignore[misc]


class InstanceNorm1d(_SingleElementSafe, nn.InstanceNorm1d):
    pass


class InstanceNorm2d(_SingleElementSafe, nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_SingleElementSafe, nn.InstanceNorm3d):
    pass


def _split_norm(name: NormSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(name, str):
        return name, {}
    if isinstance(name, (tuple, list)) and len(name) == 2 and isinstance(name[0], str) and isinstance(name[1], Mapping):
        return name[0], dict(name[1])
    raise ValueError(f"norm must be a name or a (name, {{kwargs}}) pair, got {name!r}")


def norm_layer(name: NormSpec, spatial_dims: int, channels: int) -> nn.Module:
    """A normalisation layer for channels-first maps ``[B, C, *spatial]``.

    Args:
        name: ``instance`` (affine-free InstanceNorm, MONAI's default in UNETR blocks), ``instance_affine``,
            ``batch``, ``group`` (8 groups unless given) or ``layer`` (LayerNorm over channels at every
            position), or MONAI's ``(name, {kwargs})`` pair, e.g. ``("group", {"num_groups": 4})`` or
            ``("instance", {"affine": True})``; the kwargs go to the layer's constructor.
        spatial_dims: 1, 2 or 3.
        channels: ``C``.

    InstanceNorm here also accepts a single spatial element (returns 0, see ``_SingleElementSafe``).
    """
    i = _check_dims(spatial_dims)
    kind, kwargs = _split_norm(name)
    _lookup("norm", kind, NORM_NAMES)
    try:
        if kind in ("instance", "instance_affine"):
            if kind == "instance_affine":
                kwargs.setdefault("affine", True)
            return (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)[i](channels, **kwargs)
        if kind == "batch":
            return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[i](channels, **kwargs)
        if kind == "group":
            groups = kwargs.pop("num_groups", 8)
            if not isinstance(groups, int) or groups < 1 or channels % groups:
                raise ValueError(
                    f"group norm needs num_groups dividing the channels, got num_groups={groups!r} for {channels} "
                    f"channels; pass e.g. ('group', {{'num_groups': {math.gcd(channels, 8)}}})"
                )
            return nn.GroupNorm(groups, channels, **kwargs)
        from attnseg.layers.norm import LayerNorm2d  # works on any channels-first rank

        return LayerNorm2d(channels, **kwargs)
    except TypeError as e:  # an unknown keyword in the (name, kwargs) pair
        raise ValueError(f"bad arguments for norm '{kind}': {e}") from None
