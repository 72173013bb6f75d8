"""From a validated config to a running Lightning fit or test: data, task, callbacks, loggers, trainer.

``train(cfg)`` and ``evaluate(cfg, checkpoint)`` are what ``tools/train.py`` and ``tools/test.py`` call.
Checkpoints are written atomically (temporary file in the same folder, fsync, rename), so a run killed at
any moment leaves ``last.ckpt`` either the previous complete checkpoint or the new complete one, and
``resume=True`` continues from it with the same step count, optimizer and scheduler states, plus the EMA weights
(Lightning's callback state) and the RNG states (saved by the task), and removes the temporary file of a write the
kill interrupted. tests/engine/test_kill_resume.py kills training processes with SIGKILL mid-step, mid-write,
before the rename and at random moments, and checks that the resumed runs end with checkpoints equal to an
uninterrupted run's (CPU, deterministic, ``num_workers: 0``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, Sampler

from attnseg.checkpoint import safe_torch_load, save_state_dict_atomic
from attnseg.config import ExperimentConfig, dump_config
from attnseg.datasets import collate
from attnseg.errors import CheckpointError, ConfigError, DataError
from attnseg.registry import DATASETS, LOSSES

__all__ = ["build_dataset", "build_dataloader", "build_task", "build_trainer", "train", "evaluate", "work_dir_for"]

# -- data ---------------------------------------------------------------------------------------------


def build_dataset(cfg: ExperimentConfig, split: str) -> Dataset:
    """The ``split`` ('train' | 'val' | 'test') dataset of ``cfg`` with its transform."""
    from attnseg.datasets.transforms import build_transform
    from attnseg.datasets.volume_transforms import build_volume_transform

    spec = cfg.data.val_dataset if split != "train" and cfg.data.val_dataset is not None else cfg.data.dataset
    ignore_index = spec.kwargs.get("ignore_index")  # padding and rotations fill masks with it, not class 0
    if cfg.data.volume is not None:  # MONAI dictionary transforms (3D)
        transform = build_volume_transform(cfg.data.volume, cfg.data.normalize, train=split == "train",
                                           ignore_index=ignore_index)
    else:
        transform = build_transform(
            cfg.data.augment if split == "train" else None, cfg.data.normalize, train=split == "train",
            spatial_dims=cfg.model.spatial_dims, task=cfg.task, ignore_index=ignore_index,
        )
    try:
        dataset = DATASETS.get(spec.name)(split=split, transform=transform, **spec.kwargs)
    except TypeError as e:
        raise ConfigError(f"data.dataset ({spec.name}): {e}") from None
    if len(dataset) == 0:
        raise DataError(f"the '{split}' split of dataset '{spec.name}' is empty")
    _check_dataset_matches_model(cfg, dataset, split)
    return dataset


def _check_dataset_matches_model(cfg: ExperimentConfig, dataset: Any, split: str) -> None:
    m = cfg.model
    ds_classes = getattr(dataset, "num_classes", None)
    if ds_classes is not None:
        expected = {ds_classes} if cfg.task == "classification" else {ds_classes, 1 if ds_classes == 2 else -1}
        if m.num_classes not in expected:
            raise ConfigError(
                f"model.num_classes is {m.num_classes} but the {split} dataset has {ds_classes} classes"
                + (" (use 1 or 2 for a binary task)" if ds_classes == 2 else "")
            )
    ds_chans = getattr(dataset, "in_chans", None)
    if ds_chans is not None and ds_chans != m.in_chans:
        raise ConfigError(f"model.in_chans is {m.in_chans} but the {split} dataset gives {ds_chans}-channel images")
    ds_dims = getattr(dataset, "spatial_dims", None)
    if ds_dims is not None and ds_dims != m.spatial_dims:
        raise ConfigError(f"model.spatial_dims is {m.spatial_dims} but the {split} dataset is {ds_dims}D")


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``(seed, epoch)`` alone.

    Lightning calls ``set_epoch`` before every epoch, so the order of epoch ``e`` is the same in an
    uninterrupted run and in one resumed from a checkpoint (a sampler with a running generator would
    replay epoch 0's order after a resume).
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


def build_dataloader(cfg: ExperimentConfig, dataset: Dataset, split: str) -> DataLoader:
    train = split == "train"
    batch = cfg.data.batch_size if train else (cfg.data.val_batch_size or cfg.data.batch_size)
    return DataLoader(
        dataset, batch_size=batch, sampler=EpochSeededSampler(len(dataset), cfg.seed) if train else None,
        drop_last=train and len(dataset) > batch, num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0, collate_fn=collate,
    )


# -- task ---------------------------------------------------------------------------------------------


def build_task(cfg: ExperimentConfig, dataset: Any | None = None) -> pl.LightningModule:
    """The Lightning task for ``cfg`` with a freshly built model (and its pretrained weights)."""
    from attnseg.engine.tasks import ClassificationTask, SegmentationTask
    from attnseg.models.builder import build_model

    model = build_model(cfg)
    config = cfg.model_dump(mode="json")
    class_names = getattr(dataset, "class_names", None)
    if cfg.task == "classification" and cfg.distillation is not None:
        from attnseg.engine.distill import DistillationTask

        # the teacher is built from cfg.distillation when fitting starts (evaluation never needs its file)
        return DistillationTask(model, config, class_names=class_names)
    if cfg.task == "classification":
        return ClassificationTask(model, config, class_names=class_names)
    ignore_index = getattr(dataset, "ignore_index", None)
    try:
        loss = LOSSES.get(cfg.loss.name)(num_classes=cfg.model.num_classes, ignore_index=ignore_index,
                                         **cfg.loss.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss ({cfg.loss.name}): {e}") from None
    return SegmentationTask(model, loss, config, ignore_index=ignore_index, class_names=class_names,
                            label_values=getattr(dataset, "label_values", None))


# -- trainer ------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside the target, fsyncs it, then renames it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        save_state_dict_atomic(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        # Our own checkpoints hold only tensors and plain data, so the safe loader suffices for resume too.
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint not found: {path}") from None
        except Exception as e:  # noqa: BLE001 - any unpickling failure is reported with the file name
            raise CheckpointError(f"cannot load checkpoint {path}: {e}") from None


class EveryEpochLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows every epoch.

    Lightning 2.6 writes ``last.ckpt`` only in a step that also wrote a top-k checkpoint, so an epoch whose
    monitored metric did not improve left ``last.ckpt`` at an older epoch, and ``--resume`` repeated epochs.
    """

    def _save_missed_last(self, trainer: pl.Trainer, at_train_epoch_end: bool) -> None:
        # Only in the hook the parent saves in (train epoch end, or validation end when validation runs later),
        # and not when the parent already saved at this step (nor in sanity checks or outside fit).
        if not self._should_skip_saving_checkpoint(trainer) and \
                self._should_save_on_train_epoch_end(trainer) == at_train_epoch_end:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_missed_last(trainer, True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_missed_last(trainer, False)


def work_dir_for(cfg: ExperimentConfig) -> Path:
    if cfg.work_dir:
        return Path(cfg.work_dir)
    name = Path(cfg.source).stem if cfg.source else "experiment"
    return Path("work_dirs") / name


def _monitor(cfg: ExperimentConfig) -> str:
    if cfg.trainer.checkpoint.monitor:
        return cfg.trainer.checkpoint.monitor
    return "val/top1" if cfg.task == "classification" else "val/mDice"


def build_trainer(cfg: ExperimentConfig, work_dir: Path, *, for_test: bool = False,
                  callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    """A Lightning ``Trainer`` from ``cfg.trainer`` writing checkpoints and logs under ``work_dir``."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.trainer
    callbacks = list(callbacks or [])
    if not for_test:
        callbacks.append(EveryEpochLastCheckpoint(
            dirpath=work_dir / "checkpoints", filename="best-{epoch:03d}", monitor=_monitor(cfg),
            mode=t.checkpoint.mode, save_top_k=t.checkpoint.save_top_k, save_last=True,
            every_n_epochs=t.checkpoint.every_n_epochs, auto_insert_metric_name=False,
        ))
    loggers: list[Any] = []
    # Evaluation writes its metrics as JSON; a logger there would overwrite the training logs.
    if "csv" in t.loggers and not for_test:
        loggers.append(CSVLogger(work_dir, name="logs", version=""))
    if "tensorboard" in t.loggers and not for_test:
        loggers.append(TensorBoardLogger(work_dir, name="tensorboard", version=""))
    if loggers and not for_test:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if t.ema.enabled and not for_test:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=t.ema.decay))
    if t.progress_bar == "rich":
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    return pl.Trainer(
        default_root_dir=work_dir,
        max_epochs=t.max_epochs if t.max_epochs is not None else -1,
        max_steps=t.max_steps,
        precision=t.precision,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        gradient_clip_algorithm=t.gradient_clip_algorithm,
        deterministic=t.deterministic,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=t.progress_bar != "none",
        enable_model_summary=not for_test,
        plugins=[AtomicCheckpointIO()],
    )


# -- entry points -------------------------------------------------------------------------------------


def _check_memory(cfg: ExperimentConfig, model: torch.nn.Module, train_set: Any) -> None:
    """Estimate the training memory from one training sample (a forward pass at batch 1 on the CPU: the saved
    tensors' sizes do not depend on the device) and warn when it exceeds the training device's free memory."""
    from attnseg.engine.memory import available_memory, check_training_memory, estimate_training_memory

    python_rng, numpy_rng, torch_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:  # the sample's random augmentation must not shift the training's random streams
        item = train_set[0]
    finally:
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch.set_rng_state(torch_rng)
    samples = item if isinstance(item, list) else [item]  # several crops of one volume per item
    t = cfg.trainer
    gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    try:
        estimate = estimate_training_memory(model, samples[0]["image"][None].float(),
                                            cfg.data.batch_size * len(samples), cfg.optimizer.name, t.precision)
    except Exception as e:  # noqa: BLE001 - the estimate is advice; a model that cannot run fails in training itself
        logging.getLogger(__name__).warning("no training memory estimate (%s: %s)", type(e).__name__, e)
        return
    check_training_memory(estimate, available_memory(device), str(device))


def train(cfg: ExperimentConfig, *, resume: bool = False, work_dir: Path | None = None,
          callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Fit ``cfg``; with ``resume`` continue from ``<work_dir>/checkpoints/last.ckpt``.

    ``callbacks`` are added to the ones the config asks for.

    When the run logs to CSV, ``<work_dir>/curves.png`` plots its loss and metric curves at the end.

    Returns:
        ``{"work_dir", "best_checkpoint", "last_checkpoint", "model", "metrics", "global_step", "curves"}``
        (model: the folder holding ``model.safetensors`` + ``config.json`` of the best checkpoint, else the last,
        in attnseg's own format (:mod:`attnseg.model_files`), or None; metrics: last logged values; curves: the
        PNG's path or None).
    """
    work_dir = Path(work_dir) if work_dir is not None else work_dir_for(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    train_set = build_dataset(cfg, "train")
    val_set = build_dataset(cfg, "val")
    if cfg.data.check_files:
        for ds in (train_set, val_set):
            check = getattr(ds, "check", None)
            if check is not None:
                check()
    ckpt_path = None
    ckpt_dir = work_dir / "checkpoints"
    if resume:
        last = ckpt_dir / "last.ckpt"
        if not last.is_file():
            others = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
            hint = (f"; {ckpt_dir} holds only {', '.join(others)} (a run stopped before its first last.ckpt): start "
                    "afresh in another --work-dir, or remove them") if others else ""
            raise CheckpointError(f"--resume: no checkpoint to resume from at {last}{hint}")
        ckpt_path = str(last)
        safe_torch_load(last, mmap=True)  # a file needing code execution is refused with its name before Lightning
        for partial in sorted(ckpt_dir.glob(".*.ckpt.*.tmp")):  # save_state_dict_atomic's unfinished writes
            logging.getLogger(__name__).warning("removing %s: a checkpoint write the previous run did not finish",
                                                partial)
            partial.unlink()
    elif ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
        # A new run would write beside (and be confused with) the old run's last.ckpt; never overwrite it.
        raise ConfigError(
            f"{ckpt_dir} already holds checkpoints of an earlier run; continue it with --resume, or choose "
            f"another --work-dir (or remove that folder)"
        )
    task = build_task(cfg, train_set)
    if cfg.trainer.memory_check:
        _check_memory(cfg, task.model, train_set)
    trainer = build_trainer(cfg, work_dir, callbacks=callbacks)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.yaml").write_text(dump_config(cfg))
    trainer.fit(task, build_dataloader(cfg, train_set, "train"), build_dataloader(cfg, val_set, "val"),
                ckpt_path=ckpt_path, weights_only=True)
    curves = _plot_curves(work_dir)
    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", None)
    last = getattr(ckpt_cb, "last_model_path", None) or str(ckpt_dir / "last.ckpt")
    exported = _export_model(best or last, ckpt_dir) if trainer.is_global_zero else None
    return {
        "work_dir": str(work_dir),
        "best_checkpoint": best,
        "last_checkpoint": last,
        "model": str(exported) if exported else None,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "global_step": trainer.global_step,
        "curves": str(curves) if curves else None,
    }


def _export_model(checkpoint: str, folder: Path) -> Path | None:
    """``model.safetensors`` + ``config.json`` (attnseg's own format) of ``checkpoint`` in ``folder``.

    Like the curves, a failure is logged, not raised: the training checkpoints stay, and
    ``tools/convert.py CKPT --out DIR`` exports them later.
    """

    from attnseg.model_files import export_checkpoint

    if not checkpoint or not Path(checkpoint).is_file():
        return None
    try:
        return export_checkpoint(checkpoint, folder)
    except Exception as e:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).warning("could not export %s to %s: %s: %s", checkpoint, folder,
                                            type(e).__name__, e)
        return None


def _plot_curves(work_dir: Path) -> Path | None:
    """``<work_dir>/curves.png`` from the CSV log (loss, scores, learning rate against the step), when there is one.

    A failure to plot is logged, never raised: the checkpoints of a finished run matter more than its picture.
    """

    log = work_dir / "logs" / "metrics.csv"
    if not log.is_file():
        return None
    from attnseg.visualize import plot_training_curves

    out = work_dir / "curves.png"
    try:
        return out if plot_training_curves(log, out) else None
    except Exception as e:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).warning("could not plot %s: %s: %s", log, type(e).__name__, e)
        return None


def evaluate(cfg: ExperimentConfig, checkpoint: str | Path, *, split: str = "test") -> dict[str, Any]:
    """Evaluate ``checkpoint`` (a training checkpoint or model weights) on ``split`` of ``cfg``'s data."""
    from attnseg.checkpoint import load_pretrained

    dataset = build_dataset(cfg, split)
    task = build_task(cfg, dataset)
    load_pretrained(task.model, checkpoint)
    trainer = build_trainer(cfg, work_dir_for(cfg), for_test=True)
    trainer.test(task, build_dataloader(cfg, dataset, split), verbose=False)
    return dict(task.test_results)
