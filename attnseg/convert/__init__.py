"""Official checkpoint -> attnseg converters, one module per family (``attnseg/convert/<family>.py``).

Every converter module exposes:

- ``convert_state_dict(state_dict) -> dict``: rename an official (or timm) state_dict to attnseg's layout.
  Strict: every source key maps to exactly one attnseg key or the call raises
  :class:`~attnseg.errors.CheckpointError` listing the keys it cannot place (STYLE.md item 12).
- ``from_official(constructor, state_dict) -> nn.Module``: build the attnseg model equivalent to the official
  one (``constructor`` as the parity fixtures record it: ``{"name": ..., "kwargs": {...}}``, the name being
  the official class or factory), load the converted weights strictly and return it in eval mode.
- optionally ``is_official(state_dict) -> bool``: whether the keys are in a layout the converter renames;
  :func:`attnseg.checkpoint.load_pretrained` converts a checkpoint whose keys do not fit the model only when
  this says yes (without it, it tries the converter).

A family is known as soon as its module exists in this package; modules are imported on first use.

Example::

    >>> "mambaout" in families()
    True
    >>> get_converter("mamba_out")
    Traceback (most recent call last):
    ...
    ValueError: no converter for family 'mamba_out'; did you mean 'mambaout'? (known: ...)
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from torch import nn

from attnseg.registry import suggest

__all__ = ["families", "get_converter", "from_official", "convert_state_dict"]


def families() -> list[str]:
    """Names of the families with a converter module, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_converter(family: str) -> ModuleType:
    """The converter module of ``family`` (imported lazily); ``ValueError`` naming the known families otherwise."""
    known = families()
    if family not in known:
        raise ValueError(f"no converter for family '{family}'{suggest(family, known)} (known: {', '.join(known)})")
    module = importlib.import_module(f"{__name__}.{family}")
    for attr in ("convert_state_dict", "from_official"):
        if not callable(getattr(module, attr, None)):  # a half-written converter must not pass silently
            raise TypeError(f"converter module {module.__name__} lacks {attr}()")
    return module


def from_official(family: str, constructor: dict[str, Any], state_dict: dict[str, Any]) -> nn.Module:
    """Build the attnseg model for an official ``constructor`` of ``family`` and load ``state_dict`` strictly.

    Args:
        family: converter family, e.g. ``"mambaout"`` (see :func:`families`).
        constructor: ``{"name": official class or factory name, "kwargs": {...}}`` (plain data).
        state_dict: the official model's state_dict.

    Returns:
        The attnseg model in eval mode; its ``forward`` returns what the official module's returns.
    """
    return get_converter(family).from_official(constructor, state_dict)


def convert_state_dict(family: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename an official (or timm) state_dict of ``family`` to attnseg's layout (no model is built)."""
    return get_converter(family).convert_state_dict(state_dict)
