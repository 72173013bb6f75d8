"""Lightning tasks: the training, evaluation and optimisation logic around a plain ``nn.Module``.

The model (a Segmentor or Classifier) knows nothing of Lightning; a task owns the loss, the metrics and
``configure_optimizers``, and stores the validated config in its hyper-parameters so a checkpoint can
rebuild its model without the YAML files. Nothing here assumes 2D: segmentation batches are
``{"image": [B, C, *spatial], "mask": [B, *spatial]}`` with 2 or 3 spatial axes.
"""

from __future__ import annotations

import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnseg.config import EvaluationConfig, ExperimentConfig, OptimizerConfig, SchedulerConfig
from attnseg.engine.inference import predict_logits
from attnseg.engine.metrics import SegmentationMetrics
from attnseg.engine.nonfinite import NonFiniteLossGuard
from attnseg.engine.optim import build_optimizer, build_scheduler
from attnseg.errors import ConfigError
from attnseg.heads._common import label_map

__all__ = ["SegmentationTask", "ClassificationTask"]


class _Task(pl.LightningModule):
    """Shared optimiser set-up and config bookkeeping."""

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        # The config (plain data) travels in every checkpoint; the model itself is in state_dict.
        self.save_hyperparameters({"config": config})
        self._cfg = ExperimentConfig.model_validate(config)
        guard = self._cfg.trainer.nonfinite_loss
        self.nonfinite = NonFiniteLossGuard(guard.action, guard.max_consecutive)

    def on_fit_start(self) -> None:
        if self.nonfinite.action == "skip" and self.trainer.world_size > 1:
            raise ConfigError(f"trainer.nonfinite_loss.action: 'skip' works in one process only (a rank skipping "
                              f"its backward pass leaves the other {self.trainer.world_size - 1} waiting for its "
                              "gradients); use 'stop', or 'lower_scale' with precision 16-mixed")

    def _guard(self, loss: torch.Tensor, batch: dict[str, Any], batch_idx: int, output: Any = None,
               terms: Any = None) -> torch.Tensor | None:
        """``loss``, or None to skip the batch, as ``trainer.nonfinite_loss`` says (attnseg.engine.nonfinite)."""
        checked = self.nonfinite.check(loss, self.global_step, self.current_epoch, batch_idx, batch, output, terms)
        if self.nonfinite.total:
            self.log("train/nonfinite_steps", float(self.nonfinite.total), on_step=True, on_epoch=False)
        return checked

    @property
    def cfg(self) -> ExperimentConfig:
        return self._cfg

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # RNG states (as tensors and plain data, so the checkpoint stays loadable with weights_only=True):
        # a resumed run draws the same augmentations and dropout masks as an uninterrupted one.
        np_state = np.random.get_state()
        checkpoint["attnseg_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("attnseg_rng")
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))

    def configure_optimizers(self) -> dict[str, Any]:
        opt_cfg: OptimizerConfig = self.cfg.optimizer
        sched_cfg: SchedulerConfig = self.cfg.scheduler
        optimizer = build_optimizer(self.model, opt_cfg)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        if not math.isfinite(total) or total <= 0:
            total = 1
        scheduler = build_scheduler(optimizer, sched_cfg, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SegmentationTask(_Task):
    """Segmentation training and evaluation (2D or 3D).

    Args:
        model: a module mapping ``[B, in_chans, *spatial]`` to logits ``[B, C, *spatial]`` (or a head's structured
            output) with a ``postprocess(output) -> labels`` method (Segmentor).
        loss: module ``loss(output, target) -> scalar``; ``target`` is ``batch[loss.target_key]`` (default
            ``"mask"``; HybridGNet's loss takes ``"landmarks"``). Metrics always compare ``postprocess(output)``
            with ``batch["mask"]``.
        config: the validated experiment config as plain data (``ExperimentConfig.model_dump()``).
        ignore_index: reference value excluded from loss and metrics.
        class_names: names for per-class metric keys.
        label_values: the value each class has in the dataset's label files (``decathlon``: 0, 1, 2, 4 for
            classes 0..3); saved in checkpoints so inference writes label maps in the same values.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        config: dict[str, Any],
        ignore_index: int | None = None,
        class_names: list[str] | None = None,
        label_values: list[int] | None = None,
    ) -> None:
        super().__init__(model, config)
        self.loss_fn = loss
        self.label_values = [int(v) for v in label_values] if label_values is not None else None
        self.num_classes = self.cfg.model.num_classes
        self.ignore_index = ignore_index
        n_labels = max(self.num_classes, 2)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(n_labels)]
        ev: EvaluationConfig = self.cfg.evaluation
        self.val_metrics = SegmentationMetrics(self.num_classes, ignore_index, ev.include_background)
        self.test_metrics = SegmentationMetrics(self.num_classes, ignore_index, ev.include_background, hd95=ev.hd95,
                                                surface_dice=ev.surface_dice, surface_tolerance=ev.surface_tolerance)
        self.test_results: dict[str, Any] = {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["attnseg_classes"] = {"class_names": self.class_names, "label_values": self.label_values}

    # -- helpers -------------------------------------------------------------------------------------
    def _predict(self, image: torch.Tensor) -> Any:
        ev = self.cfg.evaluation
        if not ev.sliding_window:
            return self.model(image)
        roi = ev.roi_size or self.cfg.data.training_crop
        return predict_logits(self.model, image, roi_size=roi, overlap=ev.overlap, blend_mode=ev.blend_mode,
                              sw_batch_size=ev.sw_batch_size)

    def _postprocess(self, output: Any) -> torch.Tensor:
        post = getattr(self.model, "postprocess", None)
        return post(output) if post is not None else label_map(output)

    def _target(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the loss compares the output with: ``batch[loss.target_key]`` (the mask, or HybridGNet's landmarks)."""
        key = getattr(self.loss_fn, "target_key", "mask")
        if key not in batch:
            raise KeyError(f"the loss {type(self.loss_fn).__name__} needs '{key}' in every batch; the dataset gives "
                           f"{sorted(batch)}")
        return batch[key]

    def _landmark_error(self, output: Any, batch: dict[str, Any]) -> torch.Tensor | None:
        """Mean point-to-point distance in pixels ``[B]`` of a landmark output against the batch's landmarks."""
        if not (isinstance(output, dict) and "landmarks" in output and "landmarks" in batch):
            return None
        h, w = batch["image"].shape[-2:]
        scale = torch.tensor([w, h], dtype=torch.float32, device=batch["landmarks"].device)
        diff = (output["landmarks"].float() - batch["landmarks"].float()) * scale  # normalised (x, y) -> pixels
        return diff.norm(dim=-1).mean(-1)

    # -- steps ---------------------------------------------------------------------------------------
    def _loss_terms(self, output: Any, target: torch.Tensor) -> dict[str, torch.Tensor] | None:
        terms = getattr(self.loss_fn, "terms", None)
        return terms(output, target) if callable(terms) else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        output = self.model(batch["image"])
        target = self._target(batch)
        loss = self._guard(self.loss_fn(output, target), batch, batch_idx, output,
                           lambda: self._loss_terms(output, target))
        if loss is None:
            return None
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["image"].shape[0],
                 sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        output = self._predict(batch["image"])
        n = batch["image"].shape[0]
        self.log("val/loss", self.loss_fn(output, self._target(batch)), on_epoch=True, batch_size=n, sync_dist=True)
        error = self._landmark_error(output, batch)
        if error is not None:
            self.log("val/landmark_error_px", error.mean(), on_epoch=True, batch_size=n, sync_dist=True)
        self.val_metrics.update(self._postprocess(output), batch["mask"])

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics.compute())

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        self._test_landmark_errors: list[torch.Tensor] = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        output = self._predict(batch["image"])
        metas = batch.get("meta") or [{}] * batch["image"].shape[0]
        ids = [m.get("id", f"{batch_idx}_{i}") for i, m in enumerate(metas)]
        spacings = [m.get("spacing") for m in metas]  # mm per axis for volumes; None: voxels
        self.test_metrics.update(self._postprocess(output), batch["mask"], ids=ids, spacings=spacings)
        error = self._landmark_error(output, batch)
        if error is not None:
            self._test_landmark_errors.append(error.cpu())

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute()
        errors = getattr(self, "_test_landmark_errors", [])
        if errors:
            results["landmark_error_px"] = float(torch.cat(errors).mean())
        self.test_results = {"class_names": self.class_names, **results,
                             "cases": self.test_metrics.per_case(self.class_names)}
        self._log_metrics("test", results)

    def _log_metrics(self, split: str, results: dict[str, Any]) -> None:
        scalars: dict[str, float] = {}
        for key, value in results.items():
            if isinstance(value, list):
                for name, v in zip(self.class_names, value):
                    if not math.isnan(v):
                        scalars[f"{split}/{key}_{name}"] = v
            elif not math.isnan(value):
                scalars[f"{split}/{key}"] = value
        # Keys are always present so checkpoint monitoring never misses its metric.
        main = scalars.pop(f"{split}/mDice", 0.0)
        self.log_dict(scalars, prog_bar=False, sync_dist=True)
        self.log(f"{split}/mDice", main, prog_bar=True, sync_dist=True)


class ClassificationTask(_Task):
    """Image classification: cross-entropy with label smoothing, optional mixup/cutmix, top-1/top-5."""

    def __init__(self, model: nn.Module, config: dict[str, Any], class_names: list[str] | None = None) -> None:
        super().__init__(model, config)
        self.num_classes = self.cfg.model.num_classes
        self.class_names = class_names
        self._val_correct = torch.zeros(2)
        self._val_count = 0
        self.test_results: dict[str, Any] = {}

    def _mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or cutmix (chosen at random when both are on); returns images and soft targets."""
        c = self.cfg.classification
        targets = F.one_hot(labels, self.num_classes).float()
        use_mixup, use_cutmix = c.mixup_alpha > 0, c.cutmix_alpha > 0
        if not (use_mixup or use_cutmix) or torch.rand(()) > c.mix_prob:
            return images, targets
        cutmix = use_cutmix and (not use_mixup or bool(torch.rand(()) < 0.5))
        alpha = c.cutmix_alpha if cutmix else c.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(images.shape[0], device=images.device)
        if cutmix:
            h, w = images.shape[-2:]
            cut = math.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            images = images.clone()
            images[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            images = lam * images + (1 - lam) * images[perm]
        return images, lam * targets + (1 - lam) * targets[perm]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        images, targets = self._mix(batch["image"], batch["label"])
        logits = self.model(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg.classification.label_smoothing)
        loss = self._guard(loss, batch, batch_idx, logits)  # the unmixed images: which samples hold NaN
        if loss is None:
            return None
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=images.shape[0],
                 sync_dist=True)
        return loss

    def _accumulate(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = self.model(batch["image"])
        labels = batch["label"]
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == labels[:, None]
        self._val_correct += torch.stack([hit[:, 0].sum(), hit.any(1).sum()]).float().cpu()
        self._val_count += labels.numel()
        return F.cross_entropy(logits, labels)

    def _reset(self) -> None:
        self._val_correct = torch.zeros(2)
        self._val_count = 0

    def _summary(self) -> dict[str, float]:
        n = max(self._val_count, 1)
        return {"top1": float(self._val_correct[0] / n), "top5": float(self._val_correct[1] / n)}

    def on_validation_epoch_start(self) -> None:
        self._reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self._accumulate(batch)
        self.log("val/loss", loss, on_epoch=True, batch_size=batch["image"].shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        s = self._summary()
        self.log_dict({"val/top1": s["top1"], "val/top5": s["top5"]}, prog_bar=True, sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._accumulate(batch)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._summary()
        self.log_dict({"test/top1": self.test_results["top1"], "test/top5": self.test_results["top5"]},
                      sync_dist=True)
