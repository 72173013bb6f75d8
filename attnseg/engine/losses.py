"""Segmentation and classification losses, registered in ``LOSSES`` and built from the ``loss:`` config.

Every segmentation loss takes logits ``[B, C, *spatial]`` and an integer target ``[B, *spatial]`` (2D or
3D alike). ``num_classes == 1`` means a binary task with a single sigmoid channel (target values 0/1).
Pixels equal to ``ignore_index`` contribute nothing to any term.

Heads with a structured output (MSGA, connectivity, HybridGNet landmarks) have their own losses here. Every loss
declares ``accepts``, the head ``output_kind`` values it takes (config validation refuses other pairings), and
``target_key``, the batch entry the task passes as ``target`` (``"mask"``, or ``"landmarks"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.layers import connectivity as conn
from attnseg.registry import LOSSES

__all__ = ["SegmentationLoss", "CrossEntropyLoss", "DiceLoss", "DiceCELoss", "FocalLoss", "MSGALoss", "HybridGNetLoss"]


class SegmentationLoss(nn.Module):
    """Base of the losses on plain logits ``[B, C, *S]`` against an integer mask ``[B, *S]``."""

    accepts: tuple[str, ...] = ("logits",)
    target_key: str = "mask"


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


class CrossEntropyLoss(SegmentationLoss):
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


class DiceLoss(SegmentationLoss):
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


class DiceCELoss(SegmentationLoss):
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

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted terms ``{"dice", "ce"}`` (they sum to the loss)."""
        return {"dice": self.lambda_dice * self.dice(logits, target), "ce": self.lambda_ce * self.ce(logits, target)}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(logits, target).values())


class FocalLoss(SegmentationLoss):
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


# -- connectivity (ConnNet / BiconNet / DconnNet) ---------------------------------------------------------------

class ConnectivityLoss(nn.Module):
    """The losses of the connectivity heads (BiconNets, BiconNet-Medical, DconnNet) on connectivity logits.

    The output is the ``[B, N * K, *S]`` connectivity logits of :mod:`attnseg.heads.connectivity` (``K`` =
    ``num_classes``, ``N`` = 8 or 4 neighbours in 2D, 26 or 6 in 3D, read from the channel count), or DconnNet's
    training dict ``{"logits", "aux"}``, scored as ``L(logits) + aux_weight * L(aux)`` (the official 0.3). The target
    is the integer mask ``[B, *S]``; the connectivity cube and edge maps are encoded from it on the fly
    (:mod:`attnseg.layers.connectivity`). With ``P = sigmoid(logits)``, ``(S, V)`` = bilateral voting, ``C`` the true
    cube, ``M`` the mask, ``E`` the edge map, and BCE on probabilities as the official code (``log`` clamped at -100):

    - ``variant="dconnnet"`` (DconnNet ``connect_loss``, ISIC recipe), one class:
      ``BCE(S, M) + BCE(P, C) + L_edge + bicon_weight * BCE(V, C) + Dice(S, M)``, ``bicon_weight`` 0.2; with
      ``K > 1`` (its multi-class form): ``CE(S_logits, y) + BCE(P, C) + L_edge(sigmoid(V_logits)) + 0.2 * BCE(V, C) +
      sum_{c >= 1} Dice(softmax(S_logits)_c, y == c)``, where ``S_logits, V_logits`` are votes on the raw logits.
      ``L_edge = sum BCE(min_k V_k * E, 0) / sum(min_k V_k * E)`` (0 when the denominator is 0; the official code
      gives NaN). Dice per image, smooth 1e-4, averaged over the batch. DconnNet's size-density loss (SDL, its
      RETOUCH recipe) weights the multi-class Dice term of each image and class by ``log(1 / (d + 1e-4))``, ``d`` the
      training-set density of that class's mask size: give ``sdl_pixel_counts``.
    - ``variant="dconnnet_chase"``: the CHASE-DB1 recipe, the same without the ``BCE(V, C)`` term.
    - ``variant="bicon"`` (BiconNets ``bicon_loss``, one class): ``0.8 * BCE(P, C) + L_edge + 0.2 * BCE(V, C) +
      BCE(S, M) + Dice(S, M)``, here ``L_edge = mean BCE(min_k V_k * E, 0)`` over all pixels and the Dice smooth
      1e-3. Its Dice sums over axes 1 and 2 of ``S [B, 1, H, W]``: one Dice per image column (per ``(B, W)``), then
      the mean; kept as the official code computes it.
    - ``variant="biconnet_medical"`` (BiconNet-Medical ``connect_loss``): ``bicon`` with weight 1 on ``BCE(P, C)``.

    Args:
        num_classes: ``K`` (1: binary mask with values 0/1).
        ignore_index: not supported (the connectivity of an unlabelled pixel is undefined): must be None.
        variant: one of :attr:`VARIANTS`.
        aux_weight: weight of the loss of the ``"aux"`` map when the output is DconnNet's training dict.
        bicon_weight: weight of ``BCE(V, C)`` in the ``dconnnet`` variant (``dconnnet_chase`` is 0).
        sdl_pixel_counts: SDL (``dconnnet``, ``K > 1``): for each foreground class ``1..K-1``, the foreground pixel
            count of that class in every training mask. As the official ``Solver.get_density``: zeros are left out,
            the counts are binned into ``sdl_bins`` bins of width ``(max + 50) / sdl_bins``, and ``d`` is the share
            of the bin a mask's size falls in (sizes beyond the last bin use the last bin; the official code fails).
        sdl_bins: number of SDL bins (official 50).

    Example::

        >>> loss = ConnectivityLoss(num_classes=1)
        >>> mask = torch.zeros(2, 16, 20, dtype=torch.long); mask[:, 4:12, 5:15] = 1
        >>> float(loss(torch.randn(2, 8, 16, 20), mask)) > 0
        True
    """

    accepts: tuple[str, ...] = ("connectivity",)
    target_key: str = "mask"
    VARIANTS = ("dconnnet", "dconnnet_chase", "bicon", "biconnet_medical")

    def __init__(self, num_classes: int, ignore_index: int | None = None, variant: str = "dconnnet",
                 aux_weight: float = 0.3, bicon_weight: float = 0.2, sdl_pixel_counts: list[list[float]] | None = None,
                 sdl_bins: int = 50) -> None:
        super().__init__()
        if ignore_index is not None:
            raise ValueError(f"the connectivity loss does not support ignore_index (got {ignore_index}): an ignored "
                             "pixel has no defined connectivity; map it to a class in the dataset")
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown connectivity loss variant {variant!r} (choose from {', '.join(self.VARIANTS)})")
        if variant in ("bicon", "biconnet_medical") and num_classes != 1:
            raise ValueError(f"variant {variant!r} is a single-class loss (BiconNets); with {num_classes=} use "
                             "variant='dconnnet' (DconnNet's multi-class loss)")
        if aux_weight < 0 or bicon_weight < 0:
            raise ValueError(f"aux_weight and bicon_weight must be >= 0, got {aux_weight=}, {bicon_weight=}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.variant = variant
        self.aux_weight = aux_weight
        self.bicon_weight = 0.0 if variant == "dconnnet_chase" else bicon_weight
        self.sdl = None
        if sdl_pixel_counts is not None:
            if variant != "dconnnet" or num_classes < 2 or len(sdl_pixel_counts) != num_classes - 1:
                raise ValueError(f"sdl_pixel_counts is DconnNet's multi-class SDL: variant 'dconnnet', num_classes "
                                 f">= 2 and one list of counts per foreground class ({num_classes - 1}); got "
                                 f"{variant=}, {num_classes=}, {len(sdl_pixel_counts)} lists")
            if not isinstance(sdl_bins, int) or sdl_bins < 1:
                raise ValueError(f"sdl_bins must be an int >= 1, got {sdl_bins!r}")
            self.sdl = [self._sdl_table(counts, sdl_bins, c + 1) for c, counts in enumerate(sdl_pixel_counts)]

    @staticmethod
    def _sdl_table(counts: Sequence[float], bins: int, cls: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bin width, density per bin)`` of one class, as the official ``Solver.get_density``."""
        nonzero = torch.tensor([v for v in counts if v != 0])
        if nonzero.numel() == 0:
            raise ValueError(f"sdl_pixel_counts of class {cls} has no non-zero count")
        width = (nonzero.max() + 50) / bins
        edges = torch.arange(bins + 1).float() * width
        hist = torch.tensor([int(((nonzero >= edges[i]) & (nonzero < edges[i + 1])).sum()) for i in range(bins)])
        return width, hist / hist.sum()

    def _sdl_weight(self, truth: torch.Tensor, cls: int) -> torch.Tensor:
        """Per-image weight ``log(1 / (d + 1e-4))`` of class ``cls`` (1..K-1) from its mask sizes ``[B]``."""
        width, density = self.sdl[cls - 1]
        index = (truth.sum(tuple(range(1, truth.dim()))).cpu() // width).long().clamp(max=density.numel() - 1)
        return torch.log(1 / (density[index] + 0.0001)).to(truth.device)

    def forward(self, output: torch.Tensor | dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, dict):
            loss = self._single(output["logits"], target)
            if "aux" in output and self.aux_weight:
                loss = loss + self.aux_weight * self._single(output["aux"], target)
            return loss
        return self._single(output, target)

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dims = logits.dim() - 2
        k = self.num_classes
        if logits.shape[1] % k or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"connectivity loss: expected logits [B, N * {k}, *S] and a mask [B, *S], got "
                             f"{list(logits.shape)} and {list(target.shape)}")
        n = conn.check_neighbours(logits.shape[1] // k, dims)
        device_type = logits.device.type
        with torch.autocast(device_type=device_type, enabled=False):  # BCE on probabilities is not autocast-safe
            logits = logits.float()
            if k > 1:
                return self._dconnnet_multi(logits, target, n)
            return self._single_class(logits, target, n)

    @staticmethod
    def _edge_ratio(vote_out: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
        """DconnNet's ``edge_loss``: ``sum BCE(min_k V_k * E, 0) / sum(min_k V_k * E)`` (0 if the sum is 0)."""
        weakest = vote_out.amin(2) * edge
        num = F.binary_cross_entropy(weakest, torch.zeros_like(weakest), reduction="sum")
        den = weakest.sum()
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))

    @staticmethod
    def _dice(pred: torch.Tensor, truth: torch.Tensor, dims: tuple[int, ...], smooth: float,
              weight: torch.Tensor | None = None) -> torch.Tensor:
        inter = (pred * truth).sum(dims)
        loss = 1 - (2 * inter + smooth) / (truth.sum(dims) + pred.sum(dims) + smooth)
        return (loss * weight if weight is not None else loss).mean()

    def _single_class(self, logits: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
        mask = target.unsqueeze(1).float()  # [B, 1, *S]
        cube = conn.encode(mask, n)  # [B, N, *S]
        edge = conn.edge_map(cube, n)  # [B, 1, *S]
        probs = torch.sigmoid(logits)
        pred, votes = conn.vote(probs, n)  # [B, 1, *S], [B, 1, N, *S]
        bce_mask = F.binary_cross_entropy(pred, mask)
        bce_cube = F.binary_cross_entropy(probs, cube)
        bce_votes = F.binary_cross_entropy(votes.squeeze(1), cube)
        if self.variant.startswith("dconnnet"):
            spatial = tuple(range(1, mask.dim() - 1))  # [B, *S] per image
            loss = bce_mask + bce_cube + self._edge_ratio(votes, edge) + self._dice(pred[:, 0], mask[:, 0], spatial,
                                                                                    1e-4)
            return loss + self.bicon_weight * bce_votes if self.bicon_weight else loss
        weakest = votes.squeeze(1).amin(1) * edge[:, 0]
        edge_l = F.binary_cross_entropy(weakest, torch.zeros_like(weakest))
        dice_l = self._dice(pred, mask, (1, 2), 1e-3)  # the official axes (1, 2) of [B, 1, H, W]
        conn_weight = 0.8 if self.variant == "bicon" else 1.0
        return conn_weight * bce_cube + edge_l + 0.2 * bce_votes + bce_mask + dice_l

    def _dconnnet_multi(self, logits: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
        k = self.num_classes
        onehot = F.one_hot(target.long(), k).movedim(-1, 1).float()  # [B, K, *S]
        cube = conn.encode(onehot, n)  # [B, N * K, *S]
        edge = conn.edge_map(cube, n)  # [B, K, *S]
        final, votes = conn.vote(logits, n)  # votes on the raw logits: [B, K, *S], [B, K, N, *S]
        bicon = conn.vote(torch.sigmoid(logits), n)[1].flatten(1, 2)  # [B, N * K, *S]
        edge_l = self._edge_ratio(torch.sigmoid(votes), edge)
        pred = torch.softmax(final, dim=1)
        spatial = tuple(range(1, target.dim()))
        dice_l = sum(self._dice(pred[:, j], onehot[:, j], spatial, 1e-4,
                                None if self.sdl is None else self._sdl_weight(onehot[:, j], j)) for j in range(1, k))
        ce = F.cross_entropy(final, target.long())
        conn_l = F.binary_cross_entropy(torch.sigmoid(logits), cube)
        bicon_l = F.binary_cross_entropy(bicon, cube)
        return ce + conn_l + edge_l + self.bicon_weight * bicon_l + dice_l


LOSSES.register("connectivity", cls=ConnectivityLoss)(ConnectivityLoss)


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


class HybridGNetLoss(nn.Module):
    """HybridGNet's loss (``trainerHybrid.py``, 2-IGSC): landmark MSE on the output and on both skip positions, plus
    the VAE's KL term, on normalised ``(x, y)`` coordinates:

        ``w_out MSE(landmarks, Y) + w_pos1 MSE(pos1, D Y) + w_pos2 MSE(pos2, Y) + kl_weight KL``,
        ``KL = -1/2 mean_batch mean_latent (1 + logvar - mu^2 - exp(logvar))``

    with ``D`` the template's pooling matrix (the head puts it in its output as ``downsample``). Published weights:
    1, 1, 1 and ``kl_weight = 1e-5``. Works on the eval output too (``mu``/``logvar`` are in it; z = mu there).

    Args:
        num_classes, ignore_index: accepted for the loss contract; unused (the target is landmarks).
        landmark_weight, pos1_weight, pos2_weight, kl_weight: term weights (>= 0).

    Target: ``batch["landmarks"]`` ``[B, N, 2]`` normalised like the output.
    """

    accepts: tuple[str, ...] = ("landmarks",)
    target_key: str = "landmarks"

    def __init__(self, num_classes: int = 1, ignore_index: int | None = None, landmark_weight: float = 1.0,
                 pos1_weight: float = 1.0, pos2_weight: float = 1.0, kl_weight: float = 1e-5) -> None:
        super().__init__()
        for name, value in (("landmark_weight", landmark_weight), ("pos1_weight", pos1_weight),
                            ("pos2_weight", pos2_weight), ("kl_weight", kl_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.landmark_weight, self.pos1_weight, self.pos2_weight = landmark_weight, pos1_weight, pos2_weight
        self.kl_weight = kl_weight

    def terms(self, output: dict, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms ``{"landmarks", "pos1", "pos2", "kl"}``."""
        if not isinstance(output, dict) or "landmarks" not in output:
            raise ValueError("HybridGNetLoss expects the hybridgnet head's output (a dict with landmarks, pos1, pos2, "
                             f"mu, logvar, downsample), got {type(output).__name__}")
        pred = output["landmarks"]
        if target.shape != pred.shape:
            raise ValueError(f"HybridGNetLoss: target landmarks {list(target.shape)} do not match the prediction "
                             f"{list(pred.shape)} (same template? [B, N, 2] normalised (x, y))")
        target = target.to(pred.dtype)
        out = {"landmarks": F.mse_loss(pred, target)}
        if "pos1" in output:
            out["pos1"] = F.mse_loss(output["pos1"], torch.matmul(output["downsample"].to(pred.dtype), target))
        if "pos2" in output:
            out["pos2"] = F.mse_loss(output["pos2"], target)
        if "mu" in output and "logvar" in output:
            mu, logvar = output["mu"], output["logvar"]
            out["kl"] = -0.5 * torch.mean(torch.mean(1 + logvar - mu.pow(2) - logvar.exp(), dim=1), dim=0)
        return out

    def forward(self, output: dict, target: torch.Tensor) -> torch.Tensor:
        t = self.terms(output, target)
        weights = {"landmarks": self.landmark_weight, "pos1": self.pos1_weight, "pos2": self.pos2_weight,
                   "kl": self.kl_weight}
        return sum(weights[k] * v for k, v in t.items())


LOSSES.register("hybridgnet", cls=HybridGNetLoss)(HybridGNetLoss)
