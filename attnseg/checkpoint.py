"""Loading checkpoints safely, whatever their origin, and saving them atomically.

``load_pretrained(model, path)`` accepts attnseg and Lightning checkpoints, official research-repo files
and timm/mm-style files: it unwraps ``{'model'|'state_dict'|'state_dict_ema'|'module': ...}``, strips the
prefixes that wrappers add (``model.`` from a Lightning task, ``module.`` from DDP, ``backbone.`` from
mm-style dense checkpoints or from an attnseg Segmentor when loading a bare backbone), applies the model
family's converter to official key layouts, checks every shape, and returns a :class:`LoadReport`.
Pickles are read with ``weights_only=True``: a file that needs code execution to unpickle is refused.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnseg.errors import CheckpointError

__all__ = ["LoadReport", "load_pretrained", "read_state_dict", "save_atomic"]

_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
_PREFIXES = ("model.", "module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What a load did: keys missing from the checkpoint, keys it had that the model lacks, shape
    mismatches (key, checkpoint shape, model shape), classifier keys dropped for another class count, and
    keys set aside because they belong to another part of a wrapped model (e.g. a decoder)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = []
        for name in ("missing", "unexpected", "mismatched", "dropped", "ignored"):
            items = getattr(self, name)
            if items:
                parts.append(f"{name} ({len(items)}): {_abbrev(items)}")
        return "; ".join(parts) or "all keys matched"


def _abbrev(items: list[Any], n: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (no code execution, wrappers removed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains objects that need code execution to unpickle "
            f"({str(e).splitlines()[0][:200]}). attnseg loads checkpoints with weights_only=True; re-save the "
            "state_dict (torch.save(model.state_dict(), ...)) from a trusted environment."
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {'state_dict': {'model': {...}}}
        if isinstance(obj, dict) and not _is_state_dict(obj):
            key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if key is None:
                break
            obj = obj[key]
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise CheckpointError(f"{path} does not contain a state_dict (top-level keys: {_abbrev(list(obj)[:20])})"
                              if isinstance(obj, dict) else f"{path} does not contain a state_dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove wrapper prefixes the model does not have; keys outside the kept prefix are returned apart.

    E.g. a Lightning checkpoint (``model.backbone.*``, ``model.head.*``) loaded into a bare backbone keeps
    ``backbone.*`` renamed and sets the decoder keys aside; an mm-style file (``backbone.*``,
    ``decode_head.*``) likewise.
    """
    ignored: list[str] = []
    for prefix in (*_PREFIXES, "backbone."):
        if any(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in model_keys):
            ignored += [k for k in sd if not k.startswith(prefix)]
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd, ignored


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, family: str | None = None
) -> LoadReport:
    """Load a checkpoint into ``model`` and report what matched.

    Args:
        model: the module to load into (a backbone, a Segmentor or a Classifier).
        path: ``.pth``/``.pt``/``.ckpt``/``.bin`` (read with ``weights_only=True``) or ``.safetensors``.
        strict: raise on missing or unexpected keys (shape mismatches always raise, except classifier
            layers of another class count, which are dropped and reported).
        family: converter family to apply (default: ``model.family`` when the model has one).

    Returns:
        A :class:`LoadReport`.

    Raises:
        CheckpointError: missing or unreadable file, a pickle needing code execution, a checkpoint of
            another model (the message lists the mismatched keys).
    """
    sd = read_state_dict(path)
    model_sd = model.state_dict()
    model_keys = set(model_sd)
    sd, ignored = _strip_prefixes(sd, model_keys)
    own_family = getattr(model, "family", None)
    family = family or own_family or getattr(getattr(model, "backbone", None), "family", None)
    from attnseg.convert import FAMILIES, convert_state_dict

    if family in FAMILIES:
        if own_family == family or not hasattr(model, "backbone"):
            sd = convert_state_dict(family, sd)
        elif not model_keys.intersection(sd):  # a backbone checkpoint loaded into a Segmentor/Classifier
            sd = {f"backbone.{k}": v for k, v in convert_state_dict(family, sd).items()}
    report = LoadReport(ignored=ignored)
    filtered: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key not in model_sd:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(model_sd[key].shape):
            if _is_classifier(key):
                report.dropped.append(key)
            else:
                report.mismatched.append((key, tuple(value.shape), tuple(model_sd[key].shape)))
        else:
            filtered[key] = value
    report.missing = [k for k in model_sd if k not in filtered and k not in report.dropped]
    foreign = len(filtered) < max(1, len(model_sd) // 2)
    if report.mismatched or foreign:
        details = []
        if report.mismatched:
            details.append("shape mismatches (key: checkpoint vs model): "
                           + _abbrev([f"{k}: {list(a)} vs {list(b)}" for k, a, b in report.mismatched]))
        if foreign:
            details.append(f"only {len(filtered)} of the model's {len(model_sd)} keys are in the checkpoint; "
                           f"missing: {_abbrev(report.missing)}; unexpected: {_abbrev(report.unexpected)}")
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__} (a checkpoint of another model?): " + "; ".join(details)
        )
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{path} does not match {type(model).__name__}: {report}")
    model.load_state_dict(filtered, strict=False)
    return report


def _is_classifier(key: str) -> bool:
    return any(h in key for h in ("head.fc.", "classifier.", "fc.weight", "fc.bias")) and "pre_logits" not in key


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the target's folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
