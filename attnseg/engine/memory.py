"""Training memory: an estimate before the first step, checked against what the device has.

The estimate adds, for the trainable parameters, their weights, gradients and optimizer state (AdamW: two moments;
SGD with momentum: one), and for the activations, what autograd saves for the backward pass, measured on one sample
of the training crop (a forward pass under ``torch.autograd.graph.saved_tensors_hooks``) times the batch
size (measured on two copies of the sample and halved: batch norm needs two values per channel). Tensors saved
twice are counted once; the frozen parts (a teacher, a frozen backbone) add their weights only.
It leaves out the allocator's fragmentation, the data loader and the framework itself, so it is a lower bound: the
warning fires when even that does not fit. Mixed precision (``16-mixed``/``bf16-mixed``) halves the activations, as
autocast stores most of them in 16 bits.

``train`` logs the estimate and warns when it exceeds the available memory: on CUDA the free device memory
(``torch.cuda.mem_get_info``), on the CPU ``MemAvailable`` of ``/proc/meminfo`` and the cgroup limit (a container's
``memory.max``), whichever is lower.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["MemoryEstimate", "estimate_training_memory", "available_memory", "check_training_memory"]

_logger = logging.getLogger(__name__)

_OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class MemoryEstimate:
    """Bytes of one training step's persistent and transient tensors (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    activations_per_sample: int
    batch_size: int

    @property
    def activations(self) -> int:
        return self.activations_per_sample * self.batch_size

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def __str__(self) -> str:
        return (f"{_gib(self.total)} (weights {_gib(self.weights)}, gradients {_gib(self.gradients)}, optimizer state "
                f"{_gib(self.optimizer)}, activations {_gib(self.activations)} = {self.batch_size} x "
                f"{_gib(self.activations_per_sample)} per sample)")


def _saved_bytes(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves in one forward pass of ``sample`` (the storage of each counted
    once: views of a saved tensor share it), parameters left out."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, meta)
            seen[(id(t), -1)] = t.numel() * t.element_size()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(sample)
    return sum(n for (ptr, _), n in seen.items() if ptr not in params)  # the weights are counted apart


def estimate_training_memory(model: nn.Module, sample: torch.Tensor, batch_size: int, optimizer: str = "adamw",
                             precision: str = "32-true") -> MemoryEstimate:
    """Estimate the memory of training ``model`` on batches of ``batch_size`` samples shaped like ``sample``
    (``[1, C, *spatial]``, on the device training will use).

    Args:
        model: the trained module (its trainable parameters get gradients and optimizer state).
        sample: one input at the training crop.
        batch_size: samples per step.
        optimizer: ``"adamw"`` (two moments per parameter) or ``"sgd"`` (momentum).
        precision: Lightning's precision string; mixed precision halves the activations.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    states = _OPTIMIZER_STATES.get(optimizer, 2)
    # the pass must leave no trace: batch-norm statistics, the mode and the RNG stream are restored
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            # two copies of the sample: batch norm in training mode needs more than one value per channel (a
            # stride-32 map of a small crop is 1x1); the few batch-independent saved tensors are halved with it
            per_sample = _saved_bytes(model, sample.expand(2, *sample.shape[1:]).contiguous()) // 2
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    if precision in ("16-mixed", "bf16-mixed"):
        per_sample //= 2
    return MemoryEstimate(weights, gradients, states * gradients, per_sample, int(batch_size))


def _cgroup_free() -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2), or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for training on ``device``: CUDA's free memory, or on the CPU the lower of ``MemAvailable`` and
    the cgroup's remaining limit; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_free()
    if cgroup is not None:
        found.append(cgroup)
    return min(found) if found else None


def check_training_memory(estimate: MemoryEstimate, available: int | None, where: str) -> bool:
    """Log ``estimate``; warn (and return False) when it exceeds ``available`` bytes on ``where``."""
    if available is None or estimate.total <= available:
        _logger.info("training memory estimate: %s; available on %s: %s", estimate, where,
                     _gib(available) if available is not None else "unknown")
        return True
    _logger.warning(
        "training needs at least %s, more than the %s available on %s: lower data.batch_size, the crop "
        "(data.augment.crop_size / data.volume.crop), use trainer.precision: bf16-mixed or 16-mixed, or "
        "gradient checkpointing where the backbone has it; set trainer.memory_check: false to silence this",
        estimate, _gib(available), where)
    return False
