"""Sparsifiner's two official training phases as a classification task: a frozen teacher, a phase's trainable set.

Official recipe: lim142857/Sparsifiner ``src/main.py`` (the ``SPAR.TRAIN_STRATEGY.INDICATOR`` loop:
``[['attn_recon', 0, 0, 5], ['cls_distill', 0, -5, 45]]``) and ``src/losses.py`` (``NewLoss``). Chosen by the
``distillation:`` config section (:class:`~attnseg.config.DistillationConfig`):

- ``phase: predictor`` (official ``attn_recon``, 5 epochs, lr 3e-4 -> 2e-4, 3 warm-up epochs): only the connectivity
  predictors (parameters named ``*mask_predictor*``, the student's ``predictor_parameters()``) train. The student runs
  in attention-reconstruction mode (``attn_recon: true``: signed basis, all coefficients, dense attention) and its
  low-rank ``approx_attn`` of every layer is fitted to the teacher's softmax attention without the cls row:
  ``loss = attention_weight * mean over layers of sum((approx_attn - teacher_attn[:, :, 1:, :])**2)``.
  The official loss also adds cross-entropy and token distillation with weight 0 (only so that DDP sees every
  parameter used); here they are not computed.
- ``phase: backbone`` (official ``cls_distill``, 45 epochs, lr 8e-5 -> 2e-6, 3 warm-up epochs): everything except the
  predictors trains, with the sparse mask applied (the student in its default sparse mode):
  ``loss = CE(logits, mixed and smoothed targets) + logit_weight * KL(student || teacher)
  + token_weight * MSE(student patch tokens, teacher patch tokens)`` (final-norm tokens, cls excluded). The official
  ``attn_self_distill`` term has weight 0 in this phase and is left out.

In both phases the teacher sees the same images as the student, after mixup/cutmix (the official ``criterion`` is
called with the mixed ``samples``), and mixup/cutmix and label smoothing follow ``classification:`` as in
:class:`~attnseg.engine.tasks.ClassificationTask`. Validation and test report the student's top-1/top-5 (in eval,
i.e. with the sparse mask, in both phases).

The teacher (``distillation.teacher``) is any registered backbone with ``forward_official``, built with the student's
``num_classes`` and ``in_chans``. For a Sparsifiner student it is the same factory with ``keep_rate: 1.0``: every
query then keeps every key, which is dense DeiT (logits equal timm's DeiT to about 1e-6), and DeiT weights load into
it with only the unused predictor keys new. The teacher is frozen (``requires_grad`` False, always in eval mode, run
without gradient) and is held outside the module tree on purpose: it is not in the task's ``state_dict``, so
checkpoints hold the student alone and load into a plain Classifier (``load_pretrained``, inference) exactly as
before; EMA copies do not duplicate it; it is rebuilt from the config (``setup('fit')``, so evaluation never needs
the teacher's file) and follows the student's device and dtype when it runs.

Both models run ``forward_official``, which keeps every layer's attention maps for the losses, so gradient
checkpointing (``set_grad_checkpointing``) does not apply in these phases.

Deviations: the official run keeps one process for both phases and resets the predictor/backbone optimizers by
mutating the config; here each phase is its own run (phase 2 starts from phase 1's ``last.ckpt`` through
``model.backbone.pretrained``). The official ``requires_grad`` is True on every parameter after the optimizers are
built (frozen parameters get gradients that no optimizer applies); here the frozen set has ``requires_grad`` False,
which gives the same updates with less work. Model EMA (official default on, decay 0.9999) is ``trainer.ema``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnseg.config import BackboneConfig, DistillationConfig, ExperimentConfig, ModelConfig
from attnseg.engine.tasks import ClassificationTask
from attnseg.errors import ConfigError

__all__ = ["attention_distillation_loss", "logit_distillation_loss", "token_distillation_loss", "FrozenTeacher",
           "build_teacher", "freeze_for_phase", "DistillationTask"]


# -- losses -----------------------------------------------------------------------------------------------


def attention_distillation_loss(student_attn: Sequence[torch.Tensor],
                                teacher_attn: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention reconstruction (official ``ATTN_RECON``, criterion MSE): the mean over layers of the summed squared
    difference between the student's low-rank attention and the teacher's softmax attention without its cls row.

    Args:
        student_attn: per layer ``approx_attn [B, heads, N-1, N]`` (rows of the non-cls queries).
        teacher_attn: per layer softmax attention ``[B, heads, N, N]`` (cls query first).

    Returns:
        A scalar: ``mean_l sum((student_attn[l] - teacher_attn[l][:, :, 1:, :])**2)`` (reduction sum over batch,
        heads, queries and keys, as the official ``F.mse_loss(..., reduction='sum')``).

    Raises:
        ValueError: the two models differ in depth, heads or tokens (the teacher must have the student's layout).

    Example::

        >>> teacher = [torch.full((1, 2, 5, 5), 0.2)] * 3  # uniform attention, 5 tokens, 2 heads, 3 layers
        >>> float(attention_distillation_loss([torch.zeros(1, 2, 4, 5)] * 3, teacher))  # 2 * 4 * 5 * 0.2**2
        1.6...
    """
    if len(student_attn) != len(teacher_attn) or not student_attn:
        raise ValueError(f"attention distillation pairs layers one to one: the student gives {len(student_attn)} "
                         f"attention maps, the teacher {len(teacher_attn)} (use a teacher of the student's depth)")
    total = student_attn[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student_attn, teacher_attn)):
        t = t[:, :, 1:, :]  # [B, heads, N-1, N]: the cls query's row is not reconstructed
        if s.shape != t.shape:
            raise ValueError(f"layer {i}: student approx_attn {list(s.shape)} vs teacher attention without the cls "
                             f"row {list(t.shape)}; the teacher needs the student's heads and input size")
        total = total + F.mse_loss(s, t.to(s.dtype), reduction="sum")
    return total / len(student_attn)


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL divergence of the teacher's class distribution from the student's (official ``CLS_DISTILL``).

    ``student_logits, teacher_logits [B, num_classes]`` -> scalar
    ``F.kl_div(log_softmax(student), log_softmax(teacher), reduction='batchmean', log_target=True)``, i.e.
    ``sum_b sum_c p_t (log p_t - log p_s) / B``.

    Example::

        >>> logits = torch.randn(4, 10)
        >>> float(logit_distillation_loss(logits, logits))
        0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {list(student_logits.shape)} vs teacher logits "
                         f"{list(teacher_logits.shape)}: the teacher needs the student's classes")
    teacher_log = F.log_softmax(teacher_logits.to(student_logits.dtype), dim=-1)
    return F.kl_div(F.log_softmax(student_logits, dim=-1), teacher_log, reduction="batchmean", log_target=True)


def token_distillation_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the final-norm patch tokens (official ``TOKEN_DISTILL``, criterion MSE).

    ``student_tokens, teacher_tokens [B, N-1, C]`` (cls excluded) -> scalar ``mean((student - teacher)**2)`` over
    every element.

    Example::

        >>> float(token_distillation_loss(torch.ones(2, 196, 384), torch.zeros(2, 196, 384)))
        1.0
    """
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student tokens {list(student_tokens.shape)} vs teacher tokens "
                         f"{list(teacher_tokens.shape)}: the teacher needs the student's width and token count")
    return F.mse_loss(student_tokens, teacher_tokens.to(student_tokens.dtype))


# -- teacher ----------------------------------------------------------------------------------------------


class FrozenTeacher:
    """Holds a frozen model outside any module tree and runs its ``forward_official`` without gradient.

    Not an ``nn.Module`` attribute of the task on purpose: not in ``state_dict`` (checkpoints stay the student's),
    not deep-copied (``copy.deepcopy`` returns the same holder, so an EMA copy of the task shares it), not switched to
    train mode. It follows the input's device and dtype when called.

    Args:
        module: a model with ``forward_official(x) -> dict`` (``'x'`` logits ``[B, classes]``, ``'features'``
            ``[B, N-1, C]``, ``'unmasked_attn_list'`` of ``[B, heads, N, N]``).
    """

    def __init__(self, module: nn.Module) -> None:
        if not callable(getattr(module, "forward_official", None)):
            raise TypeError(f"{type(module).__name__} has no forward_official; a teacher must give its attention maps, "
                            "logits and final-norm tokens")
        self.module = module.eval()
        for p in module.parameters():
            p.requires_grad_(False)

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenTeacher:
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, Any]:
        """``x [B, in_chans, H, W]`` -> the teacher's ``forward_official(x)`` (eval mode, no gradient)."""
        ref = next(self.module.parameters(), None)
        if ref is not None and (ref.device != x.device or (x.is_floating_point() and ref.dtype != x.dtype)):
            self.module.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
        if self.module.training:
            self.module.eval()
        return self.module.forward_official(x)


def build_teacher(cfg: ExperimentConfig) -> nn.Module:
    """The frozen teacher of ``cfg.distillation`` with its ``pretrained`` weights, in eval mode.

    Built like a classification backbone with ``model.num_classes`` and ``model.in_chans``.

    Raises:
        ConfigError: no distillation section, or the teacher's checkpoint has another number of classes (its
            classifier would be dropped and its logits random) while ``logit_weight`` is used.
    """
    from attnseg.checkpoint import load_pretrained
    from attnseg.models.builder import build_backbone

    dist = cfg.distillation
    if dist is None:
        raise ConfigError("build_teacher: the config has no distillation section")
    spec = BackboneConfig.model_validate({"name": dist.teacher.name, **dist.teacher.kwargs})
    model_cfg = ModelConfig(backbone=spec, num_classes=cfg.model.num_classes, in_chans=cfg.model.in_chans)
    teacher = build_backbone(model_cfg, classification=True)
    if dist.teacher.pretrained:
        report = load_pretrained(teacher, dist.teacher.pretrained)
        if report.dropped and dist.phase == "backbone" and dist.logit_weight > 0:
            raise ConfigError(
                f"distillation.teacher.pretrained: {dist.teacher.pretrained} was trained for another number of "
                f"classes (its classifier {report.dropped[0]}... was dropped), so the teacher's logits would be "
                f"random; use a teacher trained for model.num_classes={cfg.model.num_classes}, or logit_weight: 0")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


# -- trainable sets ---------------------------------------------------------------------------------------


def freeze_for_phase(backbone: nn.Module, phase: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for a phase and return the parameters that train.

    ``phase='predictor'``: only ``backbone.predictor_parameters()``; ``'backbone'``: every parameter except those.

    Raises:
        ValueError: an unknown phase, or a predictor phase for a backbone without ``predictor_parameters``.
    """
    if phase not in ("predictor", "backbone"):
        raise ValueError(f"phase must be 'predictor' or 'backbone', got {phase!r}")
    get = getattr(backbone, "predictor_parameters", None)
    if get is None and phase == "predictor":
        raise ValueError(f"{type(backbone).__name__} has no predictor_parameters() to train in phase 'predictor'")
    predictor = {id(p) for p in (get() if get is not None else [])}
    trainable = []
    for p in backbone.parameters():
        train = (id(p) in predictor) == (phase == "predictor")
        p.requires_grad_(train)
        if train:
            trainable.append(p)
    return trainable


# -- task -------------------------------------------------------------------------------------------------


class DistillationTask(ClassificationTask):
    """:class:`ClassificationTask` trained in one of Sparsifiner's distillation phases (``cfg.distillation``).

    Training logs ``train/loss`` and its weighted terms (``train/loss_attn`` in phase predictor; ``train/loss_ce``,
    ``train/loss_kl``, ``train/loss_tokens`` in phase backbone; they sum to ``train/loss``). Validation and test are
    the classification task's (the student's top-1/top-5).

    Args:
        model: a Classifier whose ``backbone`` (the student) has ``forward_official`` (and ``predictor_parameters``).
        config: the validated experiment config as plain data, with a ``distillation`` section.
        teacher: the frozen teacher; None builds it from the config when fitting starts (:func:`build_teacher`).
        class_names: names of the classes, as for :class:`ClassificationTask`.
    """

    def __init__(self, model: nn.Module, config: dict[str, Any], teacher: nn.Module | None = None,
                 class_names: list[str] | None = None) -> None:
        super().__init__(model, config, class_names=class_names)
        if self.cfg.distillation is None:
            raise ConfigError("DistillationTask needs a config with a distillation section")
        self.dist: DistillationConfig = self.cfg.distillation
        backbone = model.backbone
        if not callable(getattr(backbone, "forward_official", None)):
            raise ConfigError(f"distillation: the student {type(backbone).__name__} has no forward_official")
        freeze_for_phase(backbone, self.dist.phase)
        if self.dist.phase == "predictor" and not getattr(backbone, "attn_recon", True):
            raise ConfigError("distillation.phase predictor: the student must be built with attn_recon=True "
                              "(validate_config sets it)")
        self._teacher = FrozenTeacher(teacher) if teacher is not None else None

    @property
    def teacher(self) -> FrozenTeacher:
        """The frozen teacher (built from the config on first use when none was given)."""
        if self._teacher is None:
            self._teacher = FrozenTeacher(build_teacher(self.cfg))
        return self._teacher

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.teacher  # noqa: B018 - build it before the first step, so a bad teacher fails at once

    def distillation_losses(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted loss terms of the phase for a (mixed) batch.

        Args:
            images: ``[B, in_chans, H, W]``, given to student and teacher alike.
            targets: soft targets ``[B, num_classes]`` (mixup/cutmix applied; label smoothing is applied here).

        Returns:
            ``{'attn': ...}`` (phase predictor) or ``{'ce': ..., 'kl': ..., 'tokens': ...}`` (phase backbone), scalars
            already multiplied by their weights; the loss is their sum.
        """
        student = self.model.backbone.forward_official(images)
        teacher = self.teacher(images)
        if self.dist.phase == "predictor":
            attn = attention_distillation_loss(student["approx_attn_list"], teacher["unmasked_attn_list"])
            return {"attn": self.dist.attention_weight * attn}
        ce = F.cross_entropy(student["x"], targets, label_smoothing=self.cfg.classification.label_smoothing)
        return {
            "ce": ce,
            "kl": self.dist.logit_weight * logit_distillation_loss(student["x"], teacher["x"]),
            "tokens": self.dist.token_weight * token_distillation_loss(student["features"], teacher["features"]),
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        images, targets = self._mix(batch["image"], batch["label"])
        terms = self.distillation_losses(images, targets)
        loss = self._guard(sum(terms.values()), batch, batch_idx, terms=terms)
        if loss is None:
            return None
        n = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n, sync_dist=True)
        self.log_dict({f"train/loss_{k}": v.detach() for k, v in terms.items()}, on_step=True, on_epoch=True,
                      batch_size=n, sync_dist=True)
        return loss
