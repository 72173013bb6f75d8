"""Loading checkpoints safely, whatever their origin, and saving them atomically.

:func:`load_pretrained` accepts attnseg and Lightning checkpoints, official research-repo files and
timm/mm-style files:

1. Read: ``.safetensors`` with ``safetensors.torch.load_file`` (a folder in attnseg's own format,
   :mod:`attnseg.model_files`, is read through its ``model.safetensors``); anything else (``.pth``, ``.pt``,
   ``.ckpt``, ``.bin``) with ``torch.load(map_location='cpu', weights_only=True)``. A pickle that needs
   code execution is refused (:class:`~attnseg.errors.CheckpointError`), and nothing in it runs.
2. Unwrap ``{'state_dict_ema'|'model_ema'|'state_dict'|'model'|'module'|'model_weights': ...}`` (nested up to 3
   deep; the EMA weights win when a timm training checkpoint holds both, as in timm's ``load_checkpoint``;
   ``model_weights`` is Att-SwinU-Net's trainer). NumPy scalars saved beside the weights (a metric such as
   ``test_F1_score``) are read as data, not refused.
3. Strip wrapper prefixes the model lacks: ``model.`` (Lightning task), ``module.`` (DDP),
   ``_orig_mod.`` (``torch.compile``), ``backbone.`` (mm-style dense checkpoints, or an attnseg Segmentor
   loaded into a bare backbone). Keys outside the kept prefix (a decoder, a loss buffer) are set aside and
   listed in ``report.ignored``.
4. Convert: when the keys do not fit the model and the model (or its ``backbone``) has a ``family`` with a
   converter in :mod:`attnseg.convert`, the converter renames them (official layouts). A backbone-only
   checkpoint loaded into a Segmentor/Classifier gets the ``backbone.`` prefix.
5. Compare key by key and shape by shape, then load.

Models declare how they relate to published checkpoints with optional attributes (on the model or any
submodule, e.g. the backbone of a Segmentor):

- ``family``: the converter module's name;
- ``get_classifier()``: the last classification layer; its keys are dropped (``report.dropped``) when the
  checkpoint was trained for another number of classes;
- ``new_key_prefixes``: prefixes of the module's own keys that published checkpoints lack (parameters
  attnseg adds, e.g. MambaOut's ``pyramid_norms.``); they keep their initialisation and are listed in
  ``report.initialized``, never an error;
- ``head_key_prefixes``: prefixes of checkpoint keys that belong to a classification head; dropped and
  reported when the module has no such keys (built with ``num_classes=0``);
- ``input_conv_keys``: first-conv weights that may come from a model with another number of input channels;
  a weight that differs only there is adapted (:func:`adapt_input_conv`) and reported in ``report.adapted``;
- ``adapt_pretrained(key, value, target_shape) -> Tensor | None``: a method that makes a checkpoint tensor of
  another shape fit (``key`` relative to the module; e.g. ViT-style backbones resample ``pos_embed`` and other
  per-token tables to their own patch grid, the rule they apply at run time to other input sizes). It is asked,
  deepest module first, about every key whose shape differs and that the rules above do not cover; a tensor of
  ``target_shape`` is loaded and reported in ``report.adapted``, None leaves the key a mismatch, and a
  ``ValueError`` is a mismatch whose reason the error message gives.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnseg.errors import CheckpointError

_logger = logging.getLogger(__name__)

__all__ = ["LoadReport", "adapt_input_conv", "load_pretrained", "read_state_dict", "safe_torch_load",
           "save_state_dict_atomic"]

_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "model_weights")
_PREFIXES = ("model.", "module.", "_orig_mod.", "backbone.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        missing: model keys the checkpoint does not provide (left as they were).
        unexpected: checkpoint keys the model does not have (not loaded).
        mismatched: ``(key, checkpoint shape, model shape)`` for keys of another shape (only ever
            non-empty in a report attached to an error: any such key refuses the load).
        dropped: classifier keys skipped because the checkpoint has another class count, or a head the
            model does not have.
        initialized: model keys that published checkpoints lack by design (``new_key_prefixes``).
        ignored: checkpoint keys set aside with a wrapper prefix (e.g. a decoder's keys when a Segmentor
            checkpoint is loaded into a bare backbone).
        adapted: first-conv weights adapted to the model's input channels (``input_conv_keys``) and tensors adapted
            by a module's ``adapt_pretrained`` (``"key: [old shape] -> [new shape] (by Class)"``).
        converted: the converter family applied, if any.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    converted: str | None = None

    def __str__(self) -> str:
        parts = [f"converted from the {self.converted} layout"] if self.converted else []
        for name in ("missing", "unexpected", "mismatched", "dropped", "initialized", "ignored", "adapted"):
            items = getattr(self, name)
            if items:
                parts.append(f"{name} ({len(items)}): {_abbrev(items)}")
        return "; ".join(parts) or "all keys matched"


def _abbrev(items: list[Any], n: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict, without executing code, wrappers removed.

    Raises:
        CheckpointError: the file is missing, unreadable, needs code execution to unpickle, or holds no
            state_dict.
    """
    path = Path(path)
    if path.is_dir():  # attnseg's own format: a folder with model.safetensors + config.json (attnseg.model_files)
        from attnseg.model_files import resolve_model_files

        path = resolve_model_files(path)[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    return _unwrap(safe_torch_load(path), path)


def safe_torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` (tensors, containers, numbers, strings and numpy scalars only) with
    a :class:`CheckpointError` that names the file when it is not a PyTorch file, cannot be read, or holds objects
    whose unpickling would execute code (which never runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch file (neither a torch.save zip archive "
                              "nor a pickle) and not named .safetensors")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", str(e), flags=re.DOTALL)
        reason = (m.group(1) if m else str(e).splitlines()[0]).strip().split(". ")[0][:200]
        raise CheckpointError(
            f"refused to load {path}: the safe (weights_only=True) unpickler cannot read it ({reason}). Files "
            "whose objects need code execution to unpickle are refused; re-save the state_dict "
            "(torch.save(model.state_dict(), ...)) from a trusted environment."
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, corrupt records, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def _numpy_scalar_globals() -> list[Any]:
    """What unpickling a NumPy number needs (``multiarray.scalar`` from a numeric dtype and its bytes; NumPy 1 and 2
    names): research trainers save metrics such as an F1 score as ``np.float64`` beside the weights."""
    try:
        import numpy as np
    except ImportError:
        return []
    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar  # NumPy 2 / NumPy 1
    dtypes = {type(np.dtype(c)) for c in "?bhilqBHILQefdFD"}
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


def _looks_like_torch_file(path: Path) -> bool:
    """A ``torch.save`` zip archive, or a pickle (legacy ``torch.save`` files start with the PROTO opcode)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {'state_dict': {'model': {...}}}
        if isinstance(obj, dict) and not _is_state_dict(obj):
            key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if key is None:
                break
            obj = obj[key]
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        what = f"top-level keys: {_abbrev([str(k) for k in obj][:20])}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} does not contain a state_dict ({what})")
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
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in model_keys):
            ignored += [k for k in sd if not k.startswith(prefix)]
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd, ignored


def _declared(model: nn.Module, attr: str) -> tuple[str, ...]:
    """``attr`` prefixes declared by ``model`` and its submodules, qualified with the submodule's name."""
    out: list[str] = []
    for name, module in model.named_modules():
        for prefix in getattr(module, attr, ()) or ():  # instance level: a property may depend on arguments
            out.append(f"{name}.{prefix}" if name else prefix)
    return tuple(out)


def _classifier_keys(model: nn.Module) -> set[str]:
    keys: set[str] = set()
    for name, module in model.named_modules():
        get = getattr(module, "get_classifier", None)
        classifier = get() if callable(get) else None
        if isinstance(classifier, nn.Module):
            qual = next((n for n, m in module.named_modules() if m is classifier), None)
            if qual is not None:
                base = ".".join(p for p in (name, qual) if p)
                keys |= {f"{base}.{k}" for k in classifier.state_dict()}
    return keys


def _recognises(family: str, sd: dict[str, torch.Tensor]) -> bool:
    """Whether ``family``'s converter says ``sd`` is in its official layout."""
    from attnseg.convert import families, get_converter

    if family not in families():
        return False
    is_official = getattr(get_converter(family), "is_official", None)
    return bool(is_official is not None and is_official(sd))


def _family_scope(model: nn.Module, family: str | None, sd: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    """The converter family and the key prefix of the module it applies to (``""`` or ``"backbone."``).

    Without an explicit ``family``: the model's own, else its head's when the head's converter recognises ``sd`` as a
    whole published model (an official DconnNet or MSGA file into a config-built Segmentor), else the backbone's.
    """
    if family is not None:
        scope = "" if getattr(model, "family", None) == family or not hasattr(model, "backbone") else "backbone."
        return family, scope
    if getattr(model, "family", None):
        return model.family, ""
    head_family = getattr(getattr(model, "head", None), "family", None)
    if head_family and _recognises(head_family, sd):
        return head_family, ""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return getattr(backbone, "family", None), "backbone."
    return None, ""


def _fit(keys: set[str], model_keys: set[str]) -> float:
    return len(keys & model_keys) / max(1, len(keys))


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, family: str | None = None
) -> LoadReport:
    """Load a checkpoint into ``model`` and report what matched (see the module docstring for the steps).

    Args:
        model: the module to load into (a backbone, a Segmentor or a Classifier).
        path: ``.pth``/``.pt``/``.ckpt``/``.bin`` (read with ``weights_only=True``), ``.safetensors``, or a model
            folder in attnseg's own format (``model.safetensors`` + ``config.json``).
        strict: raise on missing or unexpected keys; with ``False`` they are only reported. Shape
            mismatches and checkpoints of another model always raise; classifier keys of another class
            count are dropped and reported either way.
        family: converter family to apply (default: ``model.family``, else ``model.head.family`` for a checkpoint
            its converter recognises as a whole published model, else ``model.backbone.family``).

    Returns:
        A :class:`LoadReport`, also logged (logger ``attnseg.checkpoint``): a warning when keys are missing or
        unexpected (``strict=False``), else at info level.

    Raises:
        CheckpointError: a missing or unreadable file, a pickle needing code execution, a shape mismatch
            or a checkpoint of another model (the message lists the keys), or, when ``strict``, missing or
            unexpected keys.
        ValueError: an explicit ``family`` without a converter.

    Example::

        >>> report = load_pretrained(mambaout_tiny(), "mambaout_tiny.pth")  # doctest: +SKIP
        >>> report.initialized  # the pyramid norms, new in attnseg  # doctest: +SKIP
        ['pyramid_norms.0.weight', ...]
    """
    sd = read_state_dict(path)
    model_sd = model.state_dict()
    model_keys = set(model_sd)
    sd, ignored = _strip_prefixes(sd, model_keys)
    report = LoadReport(ignored=ignored)

    explicit = family is not None
    family, scope = _family_scope(model, family, sd)
    scope_keys = {k[len(scope):] for k in model_keys if k.startswith(scope)}
    bare = bool(scope) and not any(k.startswith(scope) for k in sd)  # a backbone checkpoint, wrapped model
    view = sd if not scope or bare else {k[len(scope):]: v for k, v in sd.items() if k.startswith(scope)}
    if family is not None:
        from attnseg.convert import families, get_converter

        if explicit or family in families():
            converter = get_converter(family)  # ValueError for an explicit family without a converter
            is_official = getattr(converter, "is_official", None)
            # keys that do not fit are converted where the converter recognises them (or has no way to say);
            # keys that mostly fit only where it says they are an official layout (e.g. extra index buffers)
            official = is_official(view) if is_official is not None else None
            if official or (official is None and _fit(set(view), scope_keys) < 0.5):
                converted = converter.convert_state_dict(view)
                report.converted = family
                if bare:
                    sd = converted
                else:
                    sd = {**{k: v for k, v in sd.items() if not k.startswith(scope)},
                          **{scope + k: v for k, v in converted.items()}}
                # a converter may name a whole model (``backbone.*``/``head.*``) while loading into its backbone
                sd, set_aside = _strip_prefixes(sd, model_keys)
                report.ignored += set_aside
    if bare and _fit(set(sd), scope_keys) > _fit(set(sd), model_keys):
        sd = {scope + k: v for k, v in sd.items()}

    classifier = _classifier_keys(model)
    num_classes = getattr(model, "num_classes", None)
    new_prefixes = _declared(model, "new_key_prefixes")
    head_prefixes = _declared(model, "head_key_prefixes")
    input_convs = set(_declared(model, "input_conv_keys"))
    adapters = _adapters(model)
    reasons: dict[str, str] = {}
    loadable: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key not in model_sd:
            if key.startswith(head_prefixes) and not any(k.startswith(head_prefixes) for k in model_keys):
                report.dropped.append(key)
            else:
                report.unexpected.append(key)
        elif tuple(value.shape) != tuple(shape := model_sd[key].shape):
            if key in classifier:
                report.dropped.append(key)
            elif key in input_convs and _only_in_channels_differ(value.shape, shape):
                loadable[key] = adapt_input_conv(value, shape[1])
                report.adapted.append(f"{key}: {value.shape[1]} -> {shape[1]} input channels")
            elif (adapted := _adapt(adapters, key, value, shape, reasons)) is not None:
                loadable[key], by = adapted
                report.adapted.append(f"{key}: {list(value.shape)} -> {list(shape)} (by {by})")
            elif _is_class_layer(value.shape, shape, num_classes):  # after the hooks: a token table of N rows is
                report.dropped.append(key)                          # no classifier when num_classes == N
            else:
                report.mismatched.append((key, tuple(value.shape), tuple(shape)))
        else:
            loadable[key] = value
    for key in model_sd:
        if key not in loadable and key not in report.dropped:
            (report.initialized if key.startswith(new_prefixes) else report.missing).append(key)

    expected = [k for k in model_sd if k.startswith(scope) and not k.startswith(new_prefixes)]
    found = sum(k in loadable for k in expected)
    foreign = found < max(1, len(expected) // 2)
    if report.mismatched or foreign:
        details = []
        if report.mismatched:
            details.append("shape mismatches (key: checkpoint vs model): "
                           + _abbrev([f"{k}: {list(a)} vs {list(b)}" + (f" ({reasons[k]})" if k in reasons else "")
                                      for k, a, b in report.mismatched]))
        if foreign:
            details.append(f"only {found} of the {len(expected)} expected keys are in the checkpoint; "
                           f"missing: {_abbrev(report.missing)}; unexpected: {_abbrev(report.unexpected)}")
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__} (a checkpoint of another model?): " + "; ".join(details)
        )
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{path} does not match {type(model).__name__}: {report}")
    model.load_state_dict(loadable, strict=False)
    level = logging.WARNING if report.missing or report.unexpected else logging.INFO
    _logger.log(level, "loaded %s into %s: %s", path, type(model).__name__, report)
    return report


def _adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(key prefix, module)`` of the modules with an ``adapt_pretrained`` method, deepest first."""
    found = [(f"{name}." if name else "", m) for name, m in model.named_modules()
             if callable(getattr(m, "adapt_pretrained", None))]
    return sorted(found, key=lambda item: -len(item[0]))


def _adapt(adapters: list[tuple[str, nn.Module]], key: str, value: torch.Tensor, shape: torch.Size,
           reasons: dict[str, str]) -> tuple[torch.Tensor, str] | None:
    """``(value made to fit shape, adapter class name)`` by the deepest module owning ``key`` that adapts it, or None
    (a ``ValueError``'s message is kept in ``reasons[key]``)."""
    for prefix, module in adapters:
        if not key.startswith(prefix):
            continue
        try:
            out = module.adapt_pretrained(key[len(prefix):], value, tuple(shape))
        except ValueError as e:
            reasons[key] = str(e)
            return None
        if out is None:
            continue
        if tuple(out.shape) != tuple(shape):
            raise RuntimeError(f"{type(module).__name__}.adapt_pretrained returned {list(out.shape)} for {key}, "
                               f"expected {list(shape)}")
        return out.to(value.dtype), type(module).__name__
    return None


def _only_in_channels_differ(ckpt_shape: torch.Size, model_shape: torch.Size) -> bool:
    return len(ckpt_shape) == len(model_shape) >= 3 and ckpt_shape[0] == model_shape[0] and tuple(
        ckpt_shape[2:]) == tuple(model_shape[2:])


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first-conv weight ``[out, c, *k]`` for ``in_chans`` inputs (timm's ``adapt_input_conv`` rule).

    One input channel from several: their sum. Several from fewer: the channels repeated cyclically and scaled by
    ``c / in_chans``, so an input that repeats one image over every channel gives the response it gave before.

    Example::

        >>> w = torch.ones(2, 1, 3, 3)
        >>> adapt_input_conv(w, 4).shape, float(adapt_input_conv(w, 4).sum(1)[0, 0, 0])
        (torch.Size([2, 4, 3, 3]), 1.0)
    """
    c = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = -(-in_chans // c)
    return weight.repeat(1, repeat, *([1] * (weight.dim() - 2)))[:, :in_chans] * (c / in_chans)


def _is_class_layer(ckpt_shape: torch.Size, model_shape: torch.Size, num_classes: int | None) -> bool:
    """A final layer sized for another class count: only the first axis differs, and it is the model's."""
    return (num_classes is not None and len(ckpt_shape) == len(model_shape) and len(model_shape) >= 1
            and model_shape[0] == num_classes and tuple(ckpt_shape[1:]) == tuple(model_shape[1:]))


def save_state_dict_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to a temporary file in ``path``'s folder, fsync, then ``os.replace`` onto ``path``.

    A crash leaves either the old file or the new one, never a truncated checkpoint; the temporary file is
    removed on failure.
    """
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
