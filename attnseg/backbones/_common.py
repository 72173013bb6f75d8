"""What the 2D backbone families share: the input check of ``forward_*``, the norm + linear classifier reset, and the
cls-token head, token-map pyramid and pretrained-embedding resampling of the plain (ViT-style) backbones."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from attnseg.errors import InputSizeError

__all__ = ["check_image_input", "reset_norm_linear_head", "init_linear_layernorm", "token_pyramid", "cls_token_head",
           "check_isotropic_args", "square_token_grid", "adapt_vit_embedding", "IMAGENET_MEAN", "IMAGENET_STD",
           "PRETRAINED_CFG_KEYS", "pretrained_cfg_factory", "is_traced"]


def is_traced() -> bool:
    """Whether the forward pass is being traced (``torch.compile``, ``torch.export`` or ``torch.jit.trace``): paths
    that do not trace (sparse CSR tensors, custom autograd functions, size-dependent chunking) step aside then."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def check_image_input(model: nn.Module, x: torch.Tensor) -> None:
    """Raise :class:`InputSizeError` naming the rule unless ``x`` is ``[B, model.in_chans, H, W]`` with
    ``H, W >= model.min_input_size``."""
    name = type(model).__name__
    if x.ndim != 4 or x.shape[1] != model.in_chans:
        raise InputSizeError(f"{name} expects input [B, {model.in_chans}, H, W], got {list(x.shape)}")
    if min(x.shape[-2:]) < model.min_input_size:
        raise InputSizeError(f"{name} needs H and W >= {model.min_input_size}, got {x.shape[-2]}x{x.shape[-1]}")


def reset_norm_linear_head(model: nn.Module, num_classes: int, make_norm: Callable[..., nn.Module]) -> None:
    """``reset_classifier`` of backbones whose head is ``model.norm`` then a linear ``model.head``.

    ``num_classes > 0``: a new linear layer (initialised by ``model._init_weights``), the final norm kept or created
    with ``make_norm(num_features, device=, dtype=)``; ``0``: neither norm nor head.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    ref = next(model.parameters())
    model.num_classes = num_classes
    if num_classes == 0:
        model.norm = model.head = None
        return
    if model.norm is None:
        model.norm = make_norm(model.num_features, device=ref.device, dtype=ref.dtype)
    model.head = nn.Linear(model.num_features, num_classes, device=ref.device, dtype=ref.dtype)
    model._init_weights(model.head)


def init_linear_layernorm(m: nn.Module) -> None:
    """The official NAT and BiFormer init: trunc-normal(0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def token_pyramid(pyramid: nn.Module | None, tokens: torch.Tensor, grid: tuple[int, int], size: Sequence[int],
                  num_prefix_tokens: int = 1) -> list[torch.Tensor]:
    """ViT tokens ``[B, prefix + h*w, C]`` -> the NCHW maps of ``pyramid`` (a simple feature pyramid, cropped to the
    input ``size``), or the stride-``patch`` map ``[B, C, h, w]`` alone when ``pyramid`` is None."""
    feats = tokens[:, num_prefix_tokens:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)  # [B, C, h, w]
    if pyramid is None:
        return [feats.contiguous()]
    return pyramid(feats, size=size)


def cls_token_head(model: nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """Tokens ``[B, N, C]`` -> logits of ``model.head`` on the cls token after ``model.norm`` (DeiT's head)."""
    if model.head is None:
        raise RuntimeError(f"this {type(model).__name__} has no classifier (num_classes=0); use forward_pyramid")
    x = model.norm(x)[:, 0]
    return x if pre_logits else model.head(x)


def check_isotropic_args(in_chans: int, num_classes: int, depth: int, patch_size: int, embed_dim: int, num_heads: int,
                         img_size: int) -> None:
    """``ValueError`` naming the argument unless a plain (ViT-style) backbone's sizes are consistent."""
    if num_classes < 0 or in_chans < 1 or depth < 1 or patch_size < 1:
        raise ValueError(f"need in_chans, depth, patch_size >= 1 and num_classes >= 0, got {in_chans=}, "
                         f"{depth=}, {patch_size=}, {num_classes=}")
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) is not divisible by num_heads ({num_heads})")
    if img_size < patch_size:
        raise ValueError(f"img_size ({img_size}) must be at least one patch ({patch_size})")


def square_token_grid(num_tokens: int, num_prefix_tokens: int, what: str) -> tuple[int, int]:
    """The square patch grid ``(g, g)`` of a per-token table with ``num_tokens`` rows (``num_prefix_tokens`` first).

    Checkpoints of the plain backbones are built for square inputs, so a table's grid is read from its length.

    Raises:
        ValueError: ``num_tokens - num_prefix_tokens`` is not a positive square (``what`` names the table).
    """
    side = math.isqrt(max(num_tokens - num_prefix_tokens, 0))
    if side < 1 or side * side != num_tokens - num_prefix_tokens:
        raise ValueError(f"{what} has {num_tokens} tokens, not {num_prefix_tokens} + a square grid of patches")
    return side, side


def adapt_vit_embedding(key: str, value: torch.Tensor, target_shape: Sequence[int],
                        num_prefix_tokens: int = 1) -> torch.Tensor | None:
    """A ViT checkpoint's ``pos_embed`` or ``patch_embed.proj.weight`` made to fit a model of another patch grid or
    patch size (the embedding part of a plain backbone's ``adapt_pretrained``); None for any other key or shape.

    - ``pos_embed [1, P + g*g, C] -> [1, P + h*w, C]``: the patch rows resampled by timm's ``resample_abs_pos_embed``
      (bicubic, antialiased; the ``P`` prefix rows kept), what the plain backbones do at run time for other inputs.
    - ``patch_embed.proj.weight [C, c, p, p] -> [C, c', q, q]``: another patch size by timm's
      ``resample_patch_embed`` (FlexiViT's pseudo-inverse resize: a ``p``-patch resized bicubically to ``q`` gives
      under the new weight the token it gave under the old one; exact for ``q >= p``, a least-squares fit for
      ``q < p``, where a smaller patch cannot carry all a larger one held), then another input-channel count by
      :func:`attnseg.checkpoint.adapt_input_conv`.

    Raises:
        ValueError: a ``pos_embed`` whose length is not a square grid.
    """
    target = tuple(target_shape)
    if key == "pos_embed" and value.ndim == 3 and len(target) == 3 and value.shape[0] == target[0] == 1 \
            and value.shape[2] == target[2]:
        from timm.layers import resample_abs_pos_embed

        old = square_token_grid(value.shape[1], num_prefix_tokens, f"checkpoint {key} {list(value.shape)}")
        new = square_token_grid(target[1], num_prefix_tokens, f"model {key} {list(target)}")
        return resample_abs_pos_embed(value, list(new), list(old), num_prefix_tokens=num_prefix_tokens)
    if key == "patch_embed.proj.weight" and value.ndim == 4 and len(target) == 4 and value.shape[0] == target[0] \
            and value.shape[2] == value.shape[3] and target[2] == target[3]:
        from timm.layers import resample_patch_embed

        from attnseg.checkpoint import adapt_input_conv  # here: attnseg.checkpoint is above the backbones

        out = resample_patch_embed(value, list(target[2:])) if value.shape[2:] != target[2:] else value
        return adapt_input_conv(out, target[1]) if out.shape[1] != target[1] else out
    return None


# -- pretrained configurations (``default_cfgs`` at the bottom of every family file) -----------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The keys every ``default_cfgs`` entry has. ``mean``/``std``/``input_size`` ``(C, H, W)`` (``(C, D, H, W)`` for 3D
#: encoders)/``crop_pct``/``interpolation``/``num_classes``/``first_conv``/``classifier`` mean what they mean in timm's
#: ``PretrainedCfg``; ``license`` is the licence of the official code and weights (``"unknown"`` when the official
#: repository has no licence we could read), ``paper`` the arXiv id, ``origin`` the official code URL, and
#: ``checkpoints`` the official file names attnseg's converter reads (proven on the parity fixtures, which have the
#: official layout with random weights; the real files are never downloaded here). There is no ``url`` or
#: ``hf_hub_id``: attnseg never downloads weights.
PRETRAINED_CFG_KEYS = ("mean", "std", "input_size", "crop_pct", "interpolation", "num_classes", "first_conv",
                       "classifier", "license", "paper", "origin", "checkpoints")


def pretrained_cfg_factory(*, paper: str, origin: str, license: str, first_conv: str | None,
                           classifier: str | None, **family_defaults: Any) -> Callable[..., dict[str, Any]]:
    """A family's ``_cfg(**overrides) -> dict`` (timm's ``_cfg`` idiom): the family's paper, code, licence and layer
    names, ImageNet-1k defaults (224 px, ``crop_pct`` 0.875, bicubic, ImageNet mean/std, 1000 classes, no
    checkpoints) overridden by ``family_defaults`` and then by each variant's ``overrides``.

    Raises:
        TypeError: an override that is not one of :data:`PRETRAINED_CFG_KEYS` (a typo must not pass silently).

    Example::

        >>> _cfg = pretrained_cfg_factory(paper="2204.07143", origin="https://github.com/x/y", license="mit",
        ...                               first_conv="stem", classifier="head")
        >>> _cfg(input_size=(3, 384, 384), checkpoints=("y_384.pth",))["input_size"]
        (3, 384, 384)
    """
    base: dict[str, Any] = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=(3, 224, 224), crop_pct=0.875,
                                interpolation="bicubic", num_classes=1000, first_conv=first_conv,
                                classifier=classifier, license=license, paper=paper, origin=origin, checkpoints=())

    def check(keys: Any) -> None:
        unknown = sorted(set(keys) - set(PRETRAINED_CFG_KEYS))
        if unknown:
            raise TypeError(f"unknown pretrained cfg keys {unknown}; known: {list(PRETRAINED_CFG_KEYS)}")

    check(family_defaults)
    base.update(family_defaults)

    def _cfg(**overrides: Any) -> dict[str, Any]:
        check(overrides)
        cfg = {**base, **overrides}
        cfg["checkpoints"] = tuple(cfg["checkpoints"])
        return cfg

    return _cfg
