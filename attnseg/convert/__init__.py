"""Official checkpoint -> attnseg converters, one module per family.

``from_official(family, constructor, state_dict)`` builds the attnseg model equivalent to an official
one (``constructor`` as the parity fixtures record it: ``{"name": ..., "kwargs": {...}}``), loads the
converted weights strictly and returns it in eval mode. ``convert_state_dict(family, sd)`` only renames.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import nn

from attnseg.registry import suggest

__all__ = ["FAMILIES", "get_converter", "from_official", "convert_state_dict"]

# Families with a converter module in this package (grows with each family).
FAMILIES = ("mambaout",)


def get_converter(family: str) -> ModuleType:
    """The converter module of ``family``; ``ValueError`` naming the known families otherwise."""
    if family not in FAMILIES:
        raise ValueError(f"no converter for family '{family}'{suggest(family, FAMILIES)} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(f"attnseg.convert.{family}")


def from_official(family: str, constructor: dict[str, Any], state_dict: dict[str, Any]) -> nn.Module:
    """Build the attnseg model for an official ``constructor`` and load ``state_dict`` into it strictly."""
    return get_converter(family).from_official(constructor, state_dict)


def convert_state_dict(family: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename an official (or timm) state_dict of ``family`` to attnseg's layout."""
    return get_converter(family).convert_state_dict(state_dict)
