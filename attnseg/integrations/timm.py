"""attnseg backbones in timm's registry: ``timm.create_model("attnseg_<name>", ...)`` after ``import attnseg``.

Every registered backbone (except the ``test_*`` CI variants) becomes the timm model ``attnseg_<name>``; the
prefix keeps timm's own names untouched, and a name timm already knows is never re-registered. The entry
points accept timm's usual arguments: ``features_only=True`` returns a :class:`~attnseg.models.pyramid.FeaturePyramid` (timm ``FeatureListNet``-like) whose
``forward`` gives the backbone's NCHW pyramid and whose ``feature_info`` is a timm ``FeatureInfo``;
``out_indices`` selects the levels. ``pretrained=True`` is refused: attnseg never downloads weights; build the
model and call :func:`attnseg.load_pretrained` with a local file.

Example::

    >>> import attnseg, timm
    >>> m = timm.create_model("attnseg_test_nat", features_only=True)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from attnseg.models.pyramid import FeaturePyramid

__all__ = ["PREFIX", "register_timm_models"]

PREFIX = "attnseg_"


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    from attnseg.registry import BACKBONES

    def create(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
               cache_dir: Any = None, features_only: bool = False, out_indices: Sequence[int] | None = None,
               **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(f"{PREFIX}{name}: attnseg never downloads weights; create the model with "
                             "pretrained=False and load a local file with attnseg.load_pretrained(model, path)")
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if features_only:
            kwargs.setdefault("num_classes", 0)
            return FeaturePyramid(BACKBONES.get(name)(**kwargs))
        return BACKBONES.get(name)(**kwargs)

    create.__name__ = create.__qualname__ = PREFIX + name
    create.__module__ = __name__
    create.__doc__ = f"attnseg backbone ``{name}`` (see attnseg.list_models())."
    return create


def register_timm_models() -> list[str]:
    """Register every attnseg backbone into timm as ``attnseg_<name>``; returns the names added now."""
    from timm.models import is_model, register_model

    from attnseg.registry import BACKBONES

    added = []
    for name in BACKBONES.names():
        timm_name = PREFIX + name
        if name.startswith("test_") or is_model(timm_name):  # never override a name timm (or we) registered
            continue
        register_model(_entrypoint(name))
        added.append(timm_name)
    return added
