"""Non-finite training losses: found at the step, explained, and handled as ``trainer.nonfinite_loss`` says.

A NaN or infinite loss is caught in the training step that produced it, before its backward pass. The message
says where (global step, epoch, batch index), which samples (their ``meta.id``, else their position in the batch),
which loss terms are non-finite (the terms a task or loss reports: distillation's ``ce``/``kl``/``tokens``, a loss
with a ``terms(output, target)`` method), and where the non-finite values start: in the input images (naming the
samples), in the model's output (the forward pass overflowed: weights, activations or the learning rate), or only
in the loss (e.g. a log of zero). Then, by ``action``:

- ``stop`` (default): raise :class:`NonFiniteLossError`; the last checkpoint is untouched, so a fixed run can
  ``--resume`` from it.
- ``skip``: log a warning and skip the batch (no backward pass, no optimizer step). Single-process runs only: under
  DDP one rank skipping its backward would leave the others waiting for its gradients.
- ``lower_scale`` (``precision: 16-mixed`` only): log a warning and let the step through; fp16's gradient scaler
  finds the non-finite gradients, skips the optimizer step and halves its scale (what it is for).

With ``skip`` and ``lower_scale``, more than ``max_consecutive`` non-finite steps in a row stop the run with the same
message: a model that no longer produces finite losses does not recover by skipping. ``train/nonfinite_steps``
counts them in the logs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from attnseg.errors import AttnsegError

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "describe_nonfinite_loss"]

_logger = logging.getLogger(__name__)


class NonFiniteLossError(AttnsegError, FloatingPointError):
    """A training loss was NaN or infinite; the message says where, which samples and which terms."""


def _finite(x: Any) -> bool:
    """Whether every floating-point tensor in ``x`` (a tensor, or dicts/lists/tuples of them) is finite."""
    return all(bool(torch.isfinite(t.detach()).all()) for t in pytree.tree_leaves(x)
               if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()))


def _sample_names(batch: dict[str, Any], n: int) -> list[str]:
    """``meta.id`` (else ``meta.path``) of each sample of the batch, else ``#i`` (its position in the batch)."""
    meta = batch.get("meta")
    if isinstance(meta, list) and len(meta) == n:
        return [str(m.get("id", m.get("path", f"#{i}"))) if isinstance(m, dict) else f"#{i}"
                for i, m in enumerate(meta)]
    return [f"#{i}" for i in range(n)]


def _fmt(value: torch.Tensor) -> str:
    v = float(value.detach().float().mean()) if value.numel() else math.nan
    return f"{v:.4g}"


def describe_nonfinite_loss(step: int, epoch: int, batch_idx: int, batch: dict[str, Any], output: Any = None,
                            terms: dict[str, torch.Tensor] | None = None) -> str:
    """The message for a non-finite loss at ``step``: where, which samples, which terms, where it starts.

    Args:
        step, epoch, batch_idx: the trainer's global step, epoch and batch index in the epoch.
        batch: the batch (``image`` ``[B, ...]``, optional ``meta`` list with ``id``/``path`` per sample).
        output: the model's output (a tensor or a dict of tensors), when the task has it.
        terms: the loss terms by name (the total when the loss is a single term).
    """
    images = batch.get("image")
    n = images.shape[0] if isinstance(images, torch.Tensor) else 0
    images = images if isinstance(images, torch.Tensor) else None
    names = _sample_names(batch, n)
    parts = [f"non-finite training loss at step {step} (epoch {epoch}, batch {batch_idx})"]
    if terms:
        bad = [k for k, v in terms.items() if not _finite(v)]
        listed = ", ".join(f"{k} = {_fmt(v)}" for k, v in terms.items())
        parts.append(f"loss terms: {listed}; non-finite: {', '.join(bad) or 'none alone (their sum overflows)'}")
    bad_inputs = [names[i] for i in range(n) if not _finite(images[i])]
    if bad_inputs:
        parts.append(f"the input images of samples {', '.join(bad_inputs)} hold NaN or infinite values: check "
                     "those files and the normalisation")
    elif output is not None and not _finite(output):
        parts.append("the inputs are finite but the model's output is not: the forward pass overflowed (weights or "
                     "activations; try a lower optimizer.lr, trainer.gradient_clip_val, or fp32 precision)")
    elif output is not None:
        parts.append("the inputs and the model's output are finite: the loss itself overflows on them (e.g. a log "
                     "of 0 or a division by an empty class)")
    parts.append(f"batch samples: {', '.join(names)}")
    return "; ".join(parts)


class NonFiniteLossGuard:
    """Checks each training loss and applies ``trainer.nonfinite_loss`` (see the module docstring).

    Args:
        action: ``"stop"``, ``"skip"`` or ``"lower_scale"``.
        max_consecutive: non-finite steps in a row tolerated by ``skip`` / ``lower_scale`` before stopping.
    """

    def __init__(self, action: str = "stop", max_consecutive: int = 20) -> None:
        if action not in ("stop", "skip", "lower_scale"):
            raise ValueError(f"action must be 'stop', 'skip' or 'lower_scale', got {action!r}")
        self.action = action
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.total = 0

    def check(self, loss: torch.Tensor, step: int, epoch: int, batch_idx: int, batch: dict[str, Any],
              output: Any = None,
              terms: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor] | None] | None = None,
              ) -> torch.Tensor | None:
        """``loss`` when it is finite (or ``lower_scale`` lets it through), None to skip the batch; raises
        :class:`NonFiniteLossError` for ``stop`` or after too many non-finite steps in a row. ``terms`` may be a
        callable, computed only for the message."""
        if bool(torch.isfinite(loss.detach()).all()):
            self.consecutive = 0
            return loss
        self.consecutive += 1
        self.total += 1
        if callable(terms):
            with torch.no_grad():
                terms = terms()
        message = describe_nonfinite_loss(step, epoch, batch_idx, batch, output, terms or {"loss": loss})
        if self.action == "stop":
            raise NonFiniteLossError(f"{message}. Stopped (trainer.nonfinite_loss.action: stop; 'skip' skips such "
                                     "batches)")
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(f"{message}. Stopped: {self.consecutive} non-finite steps in a row "
                                     f"(trainer.nonfinite_loss.max_consecutive: {self.max_consecutive})")
        if self.action == "skip":
            _logger.warning("%s. Batch skipped (%d non-finite so far)", message, self.total)
            return None
        _logger.warning("%s. The fp16 gradient scaler skips this step and lowers its scale (%d non-finite so far)",
                        message, self.total)
        return loss
