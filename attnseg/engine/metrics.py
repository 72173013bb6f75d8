"""Segmentation metrics: per-class and mean Dice and IoU, and HD95, for 2D and 3D label maps.

Dice and IoU are accumulated as per-class true-positive / false-positive / false-negative counts over the
whole evaluation set ("global" or micro-averaged per class, as mmseg does); the per-image mean is also
reported because medical papers quote it. HD95 (95th-percentile symmetric Hausdorff distance) is per
image and per class, via MONAI, and averaged over the images where both prediction and reference have
the class (empty-vs-empty is skipped, empty-vs-nonempty counts as NaN and is reported separately).
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["SegmentationMetrics", "hd95_per_class"]


class SegmentationMetrics:
    """Accumulates Dice/IoU (and optionally HD95) over batches of label maps.

    Args:
        num_classes: number of classes of the label maps (2 for a binary task with one sigmoid channel).
        ignore_index: reference value excluded from every count.
        include_background: include class 0 in the means.
        hd95: also compute HD95 per image (slower; evaluation only).
        spacing: voxel spacing for HD95 (default 1 per axis).

    Example::

        m = SegmentationMetrics(num_classes=3)
        m.update(pred=torch.randint(0, 3, (2, 64, 64)), target=torch.randint(0, 3, (2, 64, 64)))
        m.compute()["mDice"]
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        include_background: bool = False,
        hd95: bool = False,
        spacing: tuple[float, ...] | None = None,
    ) -> None:
        self.num_classes = max(num_classes, 2)
        self.ignore_index = ignore_index
        self.include_background = include_background
        self.hd95 = hd95
        self.spacing = spacing
        self.reset()

    def reset(self) -> None:
        n = self.num_classes
        self.tp = torch.zeros(n, dtype=torch.float64)
        self.fp = torch.zeros(n, dtype=torch.float64)
        self.fn = torch.zeros(n, dtype=torch.float64)
        self.image_dice: list[torch.Tensor] = []
        self.image_hd95: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer label maps ``[B, *spatial]``."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.detach().long().cpu()
        target = target.detach().long().cpu()
        n = self.num_classes
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        for b in range(pred.shape[0]):
            p, t, v = pred[b][valid[b]], target[b][valid[b]], valid[b]
            # One bincount over (target, pred) pairs gives the confusion matrix of this image.
            conf = torch.bincount(t.clamp(0, n - 1) * n + p.clamp(0, n - 1), minlength=n * n).reshape(n, n).double()
            tp = conf.diag()
            fp = conf.sum(0) - tp
            fn = conf.sum(1) - tp
            self.tp += tp
            self.fp += fp
            self.fn += fn
            denom = 2 * tp + fp + fn
            self.image_dice.append(torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(tp, math.nan)))
            if self.hd95:
                p_full = torch.where(v, pred[b], torch.zeros_like(pred[b]))
                t_full = torch.where(v, target[b], torch.zeros_like(target[b]))
                self.image_hd95.append(hd95_per_class(p_full, t_full, n, self.spacing))

    def _classes(self) -> slice:
        return slice(0 if self.include_background else 1, self.num_classes)

    def compute(self) -> dict[str, float | list[float]]:
        """Return ``{"mDice", "mIoU", "Dice", "IoU", "mDice_per_image", ["mHD95", "HD95"]}``.

        Per-class lists cover every class (background included); the ``m*`` means follow
        ``include_background``. Classes absent from both prediction and reference are NaN and left out
        of the means.
        """
        tp, fp, fn = self.tp, self.fp, self.fn
        dice_den = 2 * tp + fp + fn
        iou_den = tp + fp + fn
        dice = torch.where(dice_den > 0, 2 * tp / dice_den.clamp_min(1), torch.full_like(tp, math.nan))
        iou = torch.where(iou_den > 0, tp / iou_den.clamp_min(1), torch.full_like(tp, math.nan))
        sel = self._classes()
        out: dict[str, float | list[float]] = {
            "mDice": _nanmean(dice[sel]),
            "mIoU": _nanmean(iou[sel]),
            "Dice": dice.tolist(),
            "IoU": iou.tolist(),
        }
        if self.image_dice:
            per_image = torch.stack(self.image_dice)[:, sel]
            out["mDice_per_image"] = _nanmean(per_image)
        if self.hd95 and self.image_hd95:
            hd = torch.stack(self.image_hd95)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                per_class = [_nanmean(hd[:, c]) for c in range(self.num_classes)]
            out["HD95"] = per_class
            out["mHD95"] = _nanmean(torch.tensor(per_class[sel]))
        return out


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def hd95_per_class(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, spacing: tuple[float, ...] | None = None
) -> torch.Tensor:
    """HD95 of each class between two label maps ``[*spatial]`` (NaN where either side lacks the class).

    Returns:
        ``[num_classes]`` float tensor, class 0 included.
    """
    from monai.metrics import compute_hausdorff_distance

    out = torch.full((num_classes,), math.nan, dtype=torch.float64)
    for c in range(num_classes):
        p = pred == c
        t = target == c
        if not p.any() or not t.any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = compute_hausdorff_distance(
                p[None, None].float(), t[None, None].float(), include_background=True, percentile=95,
                spacing=list(spacing) if spacing is not None else None,
            )
        out[c] = float(d.reshape(-1)[0])
    return out
