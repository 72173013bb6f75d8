"""Segmentation and classification losses, registered in ``LOSSES`` and built from the ``loss:`` config.

Every segmentation loss takes logits ``[B, C, *spatial]`` and an integer target ``[B, *spatial]`` (2D or
3D alike). ``num_classes == 1`` means a binary task with a single sigmoid channel (target values 0/1).
Pixels equal to ``ignore_index`` contribute nothing to any term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.registry import LOSSES

__all__ = ["CrossEntropyLoss", "DiceLoss", "DiceCELoss", "FocalLoss", "MSGALoss"]


def _valid_mask(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _class_weights(weights: Sequence[float] | None, num_classes: int) -> torch.Tensor | None:
    if weights is None:
        return None
    expected = max(num_classes, 2) if num_classes == 1 else num_classes
    if len(weights) != expected and not (num_classes == 1 and len(weights) == 1):
        raise ValueError(f"class_weights has {len(weights)} values; expected one per class ({num_classes})")
    return torch.as_tensor(list(weights), dtype=torch.float32)


class CrossEntropyLoss(nn.Module):
    """Cross-entropy (softmax over classes), or binary cross-entropy when ``num_classes == 1``.

    Args:
        num_classes: output channels of the model.
        ignore_index: target value excluded from the loss.
        class_weights: one weight per class (for binary: the positive-class weight, ``pos_weight``).
        label_smoothing: label smoothing in [0, 1).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", _class_weights(class_weights, num_classes), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 1:
            valid = _valid_mask(target, self.ignore_index)
            t = (target * valid).to(logits.dtype)
            if self.label_smoothing:
                t = t * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
            pos_weight = self.weight[-1:] if self.weight is not None else None
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], t, pos_weight=pos_weight, reduction="none")
            return (loss * valid).sum() / valid.sum().clamp_min(1)
        ignore = -100 if self.ignore_index is None else self.ignore_index
        return F.cross_entropy(
            logits, target, weight=self.weight, ignore_index=ignore, label_smoothing=self.label_smoothing
        )


class DiceLoss(nn.Module):
    """Soft Dice loss, 1 - mean over classes of 2|P∩T| / (|P| + |T|), summed over the whole batch.

    Args:
        num_classes: output channels (1 = sigmoid).
        ignore_index: target value excluded from every term.
        include_background: count class 0 in the mean (ignored for binary).
        smooth: added to numerator and denominator (MONAI's ``smooth_nr``/``smooth_dr``).
        squared: use squared terms in the denominator (``squared_pred`` in MONAI).
        class_weights: weights of the per-class Dice terms.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        include_background: bool = True,
        smooth: float = 1e-5,
        squared: bool = False,
        class_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.include_background = include_background
        self.smooth = smooth
        self.squared = squared
        self.register_buffer("weight", _class_weights(class_weights, num_classes), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _valid_mask(target, self.ignore_index).unsqueeze(1)
        if self.num_classes == 1:
            probs = torch.sigmoid(logits.float())
            onehot = (target * valid.squeeze(1)).unsqueeze(1).float()
        else:
            probs = torch.softmax(logits.float(), dim=1)
            safe = torch.where(valid.squeeze(1), target, torch.zeros_like(target))
            onehot = F.one_hot(safe, self.num_classes).movedim(-1, 1).float()
        probs = probs * valid
        onehot = onehot * valid
        reduce = [0, *range(2, probs.ndim)]
        inter = (probs * onehot).sum(reduce)
        denom = (probs**2 if self.squared else probs).sum(reduce) + onehot.sum(reduce)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        loss = 1 - dice
        weight = self.weight
        if self.num_classes > 1 and not self.include_background:
            loss = loss[1:]
            weight = weight[1:] if weight is not None else None
        if weight is not None:
            return (loss * weight).sum() / weight.sum()
        return loss.mean()


class DiceCELoss(nn.Module):
    """``lambda_dice * Dice + lambda_ce * CE`` (MONAI's DiceCELoss with softmax / sigmoid)."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        include_background: bool = True,
        class_weights: list[float] | None = None,
        squared: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice}, {lambda_ce}")
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.dice = DiceLoss(num_classes, ignore_index, include_background, squared=squared,
                             class_weights=class_weights)
        self.ce = CrossEntropyLoss(num_classes, ignore_index, class_weights, label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * self.ce(logits, target)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log p_t``, averaged over valid pixels.

    Args:
        gamma: focusing exponent (0 gives cross-entropy).
        alpha: binary: weight of the positive class; multi-class: use ``class_weights`` instead.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        gamma: float = 2.0,
        alpha: float | None = None,
        class_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.gamma = gamma
        self.alpha = alpha
        self.register_buffer("weight", _class_weights(class_weights, num_classes), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _valid_mask(target, self.ignore_index)
        safe = torch.where(valid, target, torch.zeros_like(target))
        if self.num_classes == 1:
            t = safe.to(logits.dtype)
            logp = F.logsigmoid(logits[:, 0].float())
            lognp = F.logsigmoid(-logits[:, 0].float())
            logpt = t * logp + (1 - t) * lognp
            alpha_t = 1.0 if self.alpha is None else self.alpha * t + (1 - self.alpha) * (1 - t)
        else:
            logp_all = F.log_softmax(logits.float(), dim=1)
            logpt = logp_all.gather(1, safe.unsqueeze(1)).squeeze(1)
            alpha_t = 1.0 if self.weight is None else self.weight.to(logits.device)[safe]
        loss = -alpha_t * (1 - logpt.exp()).pow(self.gamma) * logpt
        return (loss * valid).sum() / valid.sum().clamp_min(1)


LOSSES.register("ce", cls=CrossEntropyLoss)(CrossEntropyLoss)
LOSSES.register("dice", cls=DiceLoss)(DiceLoss)
LOSSES.register("dice_ce", cls=DiceCELoss)(DiceCELoss)
LOSSES.register("focal", cls=FocalLoss)(FocalLoss)


class MSGALoss(nn.Module):
    """The multi-scale guided attention loss (Sinha & Dolz 2020, ``src/main.py`` of sinAshish/Multi-Scale-Attention):

    ``L = ce_weight * sum_p CE(p, y) + semantic_weight * sum_k MSE(v1_k, v2_k)
    + reconstruction_weight * sum_m MSE(I_m, r_m)``

    over the training output of :class:`~attnseg.heads.msga.MSGAHead`: the ``2N`` predictions (8 for four levels;
    first-level and refined logits at image size), the ``N`` semantic-vector pairs of the two guidance levels and the
    ``2N`` (module input, reconstruction) pairs. Defaults are the paper's 1, 0.25, 0.1. Neither MSE term is detached
    (as in the official code, the reconstruction target ``I`` receives gradients too). ``ignore_index`` and
    ``class_weights`` apply to the CE terms (binary CE when ``num_classes == 1``); the MSE terms do not use the
    target. The eval-mode output (a Tensor: the averaged logits) gets the CE term alone, so ``val/loss`` is one CE,
    not comparable with the training loss.
    """

    accepts: tuple[str, ...] = ("msga", "logits")
    target_key: str = "mask"

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        ce_weight: float = 1.0,
        semantic_weight: float = 0.25,
        reconstruction_weight: float = 0.1,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("ce_weight", ce_weight), ("semantic_weight", semantic_weight),
                            ("reconstruction_weight", reconstruction_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.semantic_weight = semantic_weight
        self.reconstruction_weight = reconstruction_weight
        self.ce = CrossEntropyLoss(num_classes, ignore_index, class_weights, label_smoothing)

    def forward(self, output: torch.Tensor | dict, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return self.ce(output, target)
        missing = [k for k in ("predictions", "semantic_pairs", "reconstruction_pairs") if k not in output]
        if missing:
            raise ValueError(f"MSGALoss expects the MSGA head's training output (a dict with predictions, "
                             f"semantic_pairs, reconstruction_pairs) or eval logits; the dict lacks {missing}")
        loss = self.ce_weight * sum(self.ce(p, target) for p in output["predictions"])
        if self.semantic_weight:
            loss = loss + self.semantic_weight * sum(F.mse_loss(a, b) for a, b in output["semantic_pairs"])
        if self.reconstruction_weight:
            loss = loss + self.reconstruction_weight * sum(F.mse_loss(x, r) for x, r in output["reconstruction_pairs"])
        return loss


LOSSES.register("msga", cls=MSGALoss)(MSGALoss)
