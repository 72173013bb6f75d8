"""Whole-image and sliding-window prediction for 2D images and 3D volumes.

Models in attnseg accept any input size at or above their minimum (a Segmentor pads and crops back), so a
whole-image forward is always possible; the sliding window (MONAI's ``sliding_window_inference`` with
Gaussian or constant blending) bounds memory on large images and volumes and matches how 3D models
are trained on patches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["predict_logits", "flip_tta", "blends_probabilities", "probability_predictor"]


def predict_logits(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    blend_mode: str = "gaussian",
    sw_batch_size: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """Logits ``[B, C, *spatial]`` for ``image`` ``[B, in_chans, *spatial]``.

    With ``roi_size`` the image is tiled into windows of that size (smaller images are padded by MONAI
    and cropped back) with ``overlap`` and blended; without it the whole image goes through the model.
    ``progress`` shows a bar over the windows.
    """
    if roi_size is None:
        return model(image)
    from monai.inferers import sliding_window_inference

    spatial = image.shape[2:]
    if len(roi_size) != len(spatial):
        raise ValueError(f"roi_size {list(roi_size)} has {len(roi_size)} axes; the input has {len(spatial)}")
    return sliding_window_inference(
        image, roi_size=list(roi_size), sw_batch_size=sw_batch_size, predictor=model, overlap=overlap,
        mode=blend_mode, progress=progress,
    )


def flip_tta(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """Mean of ``predict``'s outputs (softmax-free logits, or the class probabilities of
    :func:`probability_predictor`) over the identity and each single-axis spatial flip, flipped back."""
    axes = range(2, image.ndim)
    out = predict(image)
    for ax in axes:
        out = out + predict(image.flip(ax)).flip(ax)
    return out / (1 + len(axes))


def blends_probabilities(model: nn.Module) -> bool:
    """Whether windows and flips of ``model`` are averaged as class probabilities rather than logits: when its head
    has its own ``class_probabilities`` rule (a connectivity head votes with products of its logits, so averaged
    logits are not the logits of an averaged prediction)."""
    head = getattr(model, "head", None)
    return callable(getattr(head, "class_probabilities", None)) and callable(getattr(model, "class_probabilities", None))


def probability_predictor(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> model.class_probabilities(model(x))``: a predictor for :func:`predict_logits` / :func:`flip_tta` whose
    windows and flips are then blended as probabilities."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        return model.class_probabilities(model(x))

    return predict
