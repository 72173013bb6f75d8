"""Backbone families; importing this package registers every variant in ``BACKBONES``.

Each family file ends with ``default_cfgs``: per published variant, timm-style data and provenance settings (see
:data:`~attnseg.backbones._common.PRETRAINED_CFG_KEYS`), read through :func:`pretrained_cfg`.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from attnseg.backbones import biformer, halonet, karat, mambaout, nat, overlock, resnet, sparsifiner, transnext  # noqa: F401
from attnseg.backbones._common import PRETRAINED_CFG_KEYS

__all__ = ["PRETRAINED_CFG_KEYS", "pretrained_cfg", "pretrained_cfgs"]


def pretrained_cfg(name: str) -> dict[str, Any]:
    """The pretrained configuration of the registered backbone ``name`` (a copy): mean, std, input_size, crop_pct,
    interpolation, num_classes, first_conv, classifier, license, paper (arXiv id), origin (official code URL) and
    checkpoints (official file names the family's converter reads).

    Raises:
        KeyError: ``name`` is not a registered backbone (with suggestions), or has no configuration (the ``test_*``
            CI variants).

    Example::

        >>> pretrained_cfg("nat_mini")["checkpoints"]
        ('nat_mini.pth',)
    """
    from attnseg.registry import BACKBONES

    factory = BACKBONES.get(name)  # KeyError with suggestions for an unknown name
    cfgs = getattr(sys.modules[factory.__module__], "default_cfgs", {})
    if name not in cfgs:
        raise KeyError(f"backbone {name!r} has no pretrained configuration (test_* variants have none)")
    return copy.deepcopy(cfgs[name])


def pretrained_cfgs() -> dict[str, dict[str, Any]]:
    """``{name: pretrained_cfg(name)}`` for every registered backbone that has one (all but ``test_*``)."""
    from attnseg.registry import BACKBONES

    out = {}
    for name in BACKBONES.names():
        cfgs = getattr(sys.modules[BACKBONES.get(name).__module__], "default_cfgs", {})
        if name in cfgs:
            out[name] = copy.deepcopy(cfgs[name])
    return out
