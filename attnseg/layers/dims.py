"""Dimension switches (MONAI's factories, smaller): one block definition serves 2D and 3D."""

from __future__ import annotations

import functools

from torch import nn

from attnseg.registry import suggest

__all__ = ["conv_type", "conv_transpose_type", "norm_layer", "NORM_NAMES"]

NORM_NAMES = ("instance", "instance_affine", "batch", "group", "layer")


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")


def conv_type(spatial_dims: int) -> type[nn.Module]:
    _check_dims(spatial_dims)
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]


def conv_transpose_type(spatial_dims: int) -> type[nn.Module]:
    _check_dims(spatial_dims)
    return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial_dims - 1]


class _SingleElementSafe:
    """InstanceNorm that accepts maps with one spatial element (the deepest level of a small crop).

    PyTorch refuses those in training; the normalised value of a single element is 0 (then the affine
    bias), which is what this returns, so small inputs train instead of failing as in MONAI.
    """

    def forward(self, x):  # type: ignore[no-untyped-def]
        if x[0, 0].numel() == 1:
            out = x - x
            if self.affine:
                out = out + self.bias.view(1, -1, *([1] * (x.ndim - 2)))
            return out
        return super().forward(x)


@functools.cache
def _instance_norm(spatial_dims: int) -> type[nn.Module]:
    base = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 1]
    return type(base.__name__, (_SingleElementSafe, base), {})


def norm_layer(name: str, spatial_dims: int, channels: int, num_groups: int = 8) -> nn.Module:
    """A normalisation layer by name for channels-first maps.

    ``instance`` is affine-free InstanceNorm (MONAI's default in UNETR blocks); ``instance_affine`` has
    a learnable affine; ``batch``; ``group`` (``num_groups`` groups, reduced to divide ``channels``);
    ``layer`` normalises over channels only (LayerNorm2d).
    """
    _check_dims(spatial_dims)
    if name == "instance":
        return _instance_norm(spatial_dims)(channels)
    if name == "instance_affine":
        return _instance_norm(spatial_dims)(channels, affine=True)
    if name == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 1](channels)
    if name == "group":
        groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if name == "layer":
        from attnseg.layers.norm import LayerNorm2d

        return LayerNorm2d(channels)
    raise ValueError(f"unknown norm '{name}'{suggest(name, NORM_NAMES)} (choose from {', '.join(NORM_NAMES)})")
