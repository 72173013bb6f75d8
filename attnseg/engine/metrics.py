"""Segmentation metrics: per-class and mean Dice and IoU, HD95 and surface Dice, for 2D and 3D label maps.

Dice and IoU are accumulated as per-class true-positive / false-positive / false-negative counts over the
whole evaluation set ("global" or micro-averaged per class, as mmseg does); the per-image mean is also
reported because medical papers quote it. Every image (case) also gets its own row of per-class Dice and,
when asked, HD95 (95th-percentile symmetric Hausdorff distance) and surface Dice (normalised surface
distance, NSD: the fraction of both surfaces within a tolerance of the other), both via MONAI and in the
units of the image's spacing (mm for volumes whose ``meta`` carries ``spacing``, else voxels).

Per class and case: a class absent from both prediction and reference is NaN everywhere (left out of the
means); present on one side only, Dice and NSD are 0 and HD95 is NaN (undefined; counted in
``HD95_undefined``). The surface metrics run on the bounding box of the class in prediction and reference
(plus one voxel), which gives MONAI's values at a fraction of the cost for small structures.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SegmentationMetrics", "hd95_per_class", "surface_metrics_per_class"]


class SegmentationMetrics:
    """Accumulates Dice/IoU (and optionally HD95 and surface Dice) over batches of label maps.

    Args:
        num_classes: number of classes of the label maps (2 for a binary task with one sigmoid channel).
        ignore_index: reference value excluded from every count.
        include_background: include class 0 in the means.
        hd95: also compute HD95 per image (slower; evaluation only).
        spacing: voxel spacing for the surface metrics when ``update`` gets none (default 1 per axis).
        surface_dice: also compute the surface Dice (NSD) per image.
        surface_tolerance: NSD tolerance, one value or one per class (class 0 first), in spacing units.

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
        surface_dice: bool = False,
        surface_tolerance: float | Sequence[float] = 1.0,
    ) -> None:
        self.num_classes = max(num_classes, 2)
        self.ignore_index = ignore_index
        self.include_background = include_background
        self.hd95 = hd95
        self.spacing = spacing
        self.surface_dice = surface_dice
        tol = [float(surface_tolerance)] * self.num_classes if isinstance(surface_tolerance, (int, float)) \
            else [float(t) for t in surface_tolerance]
        if len(tol) != self.num_classes or any(t < 0 for t in tol):
            raise ValueError(f"surface_tolerance needs one value >= 0, or one per class ({self.num_classes}), got "
                             f"{surface_tolerance}")
        self.surface_tolerance = tol
        self.reset()

    def reset(self) -> None:
        n = self.num_classes
        self.tp = torch.zeros(n, dtype=torch.float64)
        self.fp = torch.zeros(n, dtype=torch.float64)
        self.fn = torch.zeros(n, dtype=torch.float64)
        self.image_dice: list[torch.Tensor] = []
        self.image_hd95: list[torch.Tensor] = []
        self.image_nsd: list[torch.Tensor] = []
        self.case_ids: list[str] = []

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, ids: Sequence[Any] | None = None,
               spacings: Sequence[Sequence[float] | None] | None = None) -> None:
        """Add a batch: ``pred`` and ``target`` are integer label maps ``[B, *spatial]``.

        ``ids`` name the images in the per-case rows (default: their running number); ``spacings`` give each
        image's voxel size for HD95 and NSD (default: ``spacing``).
        """
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
            self.case_ids.append(str(ids[b]) if ids is not None else str(len(self.case_ids)))
            if self.hd95 or self.surface_dice:
                spacing = spacings[b] if spacings is not None and spacings[b] is not None else self.spacing
                p_full = torch.where(v, pred[b], torch.zeros_like(pred[b]))
                t_full = torch.where(v, target[b], torch.zeros_like(target[b]))
                hd, nsd = surface_metrics_per_class(
                    p_full, t_full, n, spacing, hd95=self.hd95,
                    surface_tolerance=self.surface_tolerance if self.surface_dice else None)
                if self.hd95:
                    self.image_hd95.append(hd)
                if self.surface_dice:
                    self.image_nsd.append(nsd)

    def _classes(self) -> slice:
        return slice(0 if self.include_background else 1, self.num_classes)

    def compute(self) -> dict[str, float | list[float]]:
        """Return ``{"mDice", "mIoU", "Dice", "IoU", "mDice_per_image", ["mHD95", "HD95", "HD95_undefined"],
        ["mNSD", "NSD"]}``.

        Per-class lists cover every class (background included); the ``m*`` means follow
        ``include_background``. Dice/IoU are global (summed counts); HD95 and NSD are means over the images
        where they are defined. Classes absent from both prediction and reference are NaN and left out
        of the means. ``HD95_undefined`` counts (image, class) pairs present on one side only.
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
        for key, values in (("HD95", self.image_hd95), ("NSD", self.image_nsd)):
            if not values:
                continue
            table = torch.stack(values)
            per_class = [_nanmean(table[:, c]) for c in range(self.num_classes)]
            out[key] = per_class
            out[f"m{key}"] = _nanmean(torch.tensor(per_class[sel]))
        if self.image_hd95:
            dice_table = torch.stack(self.image_dice)[:, sel]
            hd_table = torch.stack(self.image_hd95)[:, sel]
            # Present on one side only: Dice is 0 there (not NaN) while HD95 is NaN.
            out["HD95_undefined"] = int(((dice_table == 0) & hd_table.isnan()).sum())
        return out

    def per_case(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One row per image: ``{"case": id, "Dice_<class>": ..., "HD95_<class>": ..., "NSD_<class>": ...,
        "mDice": ..., "mHD95": ..., "mNSD": ...}`` (classes named by ``class_names``, else by index; the means
        follow ``include_background``; NaN where undefined)."""
        names = list(class_names) if class_names else [str(c) for c in range(self.num_classes)]
        sel = range(self.num_classes)[self._classes()]
        tables = [("Dice", self.image_dice), ("HD95", self.image_hd95), ("NSD", self.image_nsd)]
        rows = []
        for i, case in enumerate(self.case_ids):
            row: dict[str, Any] = {"case": case}
            for key, values in tables:
                if not values:
                    continue
                v = values[i]
                for c in sel:
                    row[f"{key}_{names[c]}"] = float(v[c])
                row[f"m{key}"] = _nanmean(v[list(sel)])
            rows.append(row)
        return rows


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def _bounding_box(mask: torch.Tensor, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` (non-empty), grown by ``margin`` voxels, clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = mask.any(dim=other) if other else mask
        idx = hits.nonzero().flatten()
        lo, hi = int(idx[0]) - margin, int(idx[-1]) + margin + 1
        box.append(slice(max(lo, 0), min(hi, mask.shape[axis])))
    return tuple(box)


def surface_metrics_per_class(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    *,
    hd95: bool = True,
    surface_tolerance: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HD95 and surface Dice (NSD) of each class between two label maps ``[*spatial]``, via MONAI.

    Args:
        spacing: voxel size per axis (default 1).
        hd95: compute HD95 (else it stays NaN).
        surface_tolerance: NSD tolerance per class (class 0 first); None skips NSD (NaN).

    Returns:
        ``(hd95 [num_classes], nsd [num_classes])`` float64 tensors, class 0 included. Absent from both: NaN,
        NaN; present on one side only: NaN, 0.
    """
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    hd = torch.full((num_classes,), math.nan, dtype=torch.float64)
    nsd = torch.full((num_classes,), math.nan, dtype=torch.float64)
    spacing = list(spacing) if spacing is not None else None
    for c in range(num_classes):
        p = pred == c
        t = target == c
        has_p, has_t = bool(p.any()), bool(t.any())
        if not (has_p and has_t):
            if (has_p or has_t) and surface_tolerance is not None:
                nsd[c] = 0.0
            continue
        # Every surface voxel of both masks lies in their joint box; one voxel of margin keeps the box edge off
        # the surfaces, so the distances found inside it are the whole-volume ones.
        box = _bounding_box(p | t, margin=1)
        p_box, t_box = p[box][None, None].float(), t[box][None, None].float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hd95:
                hd[c] = float(compute_hausdorff_distance(p_box, t_box, include_background=True, percentile=95,
                                                         spacing=spacing).reshape(-1)[0])
            if surface_tolerance is not None:
                nsd[c] = float(compute_surface_dice(p_box, t_box, [surface_tolerance[c]], include_background=True,
                                                    spacing=spacing).reshape(-1)[0])
    return hd, nsd


def hd95_per_class(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, spacing: tuple[float, ...] | None = None
) -> torch.Tensor:
    """HD95 of each class between two label maps ``[*spatial]`` (NaN where either side lacks the class).

    Returns:
        ``[num_classes]`` float tensor, class 0 included.
    """
    return surface_metrics_per_class(pred, target, num_classes, spacing, hd95=True)[0]
