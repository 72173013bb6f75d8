"""attnseg backbones in timm's registry: ``timm.create_model("attnseg_<name>", ...)`` after ``import attnseg``.

Every registered backbone (except the ``test_*`` CI variants) becomes the timm model ``attnseg_<name>``; the
prefix keeps timm's own names untouched, and a name timm already knows is never re-registered.

- **pretrained_cfg.** Each name carries its family's ``default_cfgs`` entry (:func:`attnseg.backbones.pretrained_cfg`)
  as a timm :class:`PretrainedCfg` (``mean``, ``std``, ``input_size``, ``crop_pct``, ``interpolation``,
  ``num_classes``, ``first_conv``, ``classifier``, ``license``, ``paper_ids``, ``origin_url``) plus ``checkpoints``,
  the official file names the converter reads. ``model.pretrained_cfg`` holds it, so
  ``timm.data.resolve_data_config({}, model=model)`` gives the right preprocessing, and
  ``timm.models.get_pretrained_cfg("attnseg_<name>")`` finds it without building the model. No entry has a URL or a
  hub id: ``timm.list_models(pretrained=True)`` lists none of them.
- **features_only=True** returns a :class:`~attnseg.models.pyramid.FeaturePyramid`: ``forward`` gives the backbone's
  NCHW pyramid, ``feature_info`` is a timm ``FeatureInfo``; ``out_indices`` selects the levels.
- **pretrained=True** loads a *local* file, named as timm users name one:
  ``pretrained_cfg_overlay=dict(file=PATH)`` (or ``pretrained_cfg=dict(file=PATH)``, which attnseg also applies
  over the registered configuration, so the data settings stay). The file goes through
  :func:`attnseg.load_pretrained`: official layouts are converted, the classifier of a checkpoint with another
  class count (or of a ``features_only`` model) is dropped, the ``first_conv`` weight is adapted to another
  ``in_chans`` (summed or repeated and scaled, as timm does), and the :class:`~attnseg.checkpoint.LoadReport` is
  kept as ``model.pretrained_report`` and logged. ``pretrained_strict=False`` reports missing or unexpected keys
  instead of raising. ``pretrained=True`` without a file raises :class:`ValueError`: attnseg never downloads.

Example::

    >>> import attnseg, timm
    >>> m = timm.create_model("attnseg_nat_mini", features_only=True)
    >>> timm.data.resolve_data_config({}, model=m)["crop_pct"]
    0.875
    >>> m = timm.create_model("attnseg_nat_mini", pretrained=True,
    ...                       pretrained_cfg_overlay=dict(file="nat_mini.pth"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from timm.models import DefaultCfg, PretrainedCfg
from torch import nn

from attnseg.models.pyramid import FeaturePyramid

__all__ = ["PREFIX", "AttnsegPretrainedCfg", "register_timm_models", "timm_pretrained_cfg", "default_cfgs"]

_logger = logging.getLogger(__name__)

PREFIX = "attnseg_"

#: timm's ``register_model`` reads the registering module's ``default_cfgs``; filled by :func:`register_timm_models`.
default_cfgs: dict[str, DefaultCfg] = {}

# attnseg key -> timm PretrainedCfg field, where the names differ
_TIMM_NAMES = {"paper": "paper_ids", "origin": "origin_url"}


@dataclasses.dataclass
class AttnsegPretrainedCfg(PretrainedCfg):
    """timm's :class:`PretrainedCfg` plus ``checkpoints``: the official file names attnseg's converter reads."""

    checkpoints: tuple[str, ...] = ()


def timm_pretrained_cfg(name: str) -> AttnsegPretrainedCfg:
    """The timm configuration of the attnseg backbone ``name`` (without the prefix), from its ``default_cfgs``."""
    from attnseg.backbones import pretrained_cfg

    cfg = pretrained_cfg(name)
    return AttnsegPretrainedCfg(**{_TIMM_NAMES.get(k, k): v for k, v in cfg.items()})


def _resolve_cfg(timm_name: str, pretrained_cfg: Any, overlay: Mapping[str, Any] | None) -> dict[str, Any]:
    """timm's ``resolve_pretrained_cfg`` (registered cfg, then the overlay), with a dict ``pretrained_cfg`` applied over
    the registered configuration instead of replacing it, and pretrained tags refused (attnseg registers none)."""
    from timm.models._builder import resolve_pretrained_cfg

    if isinstance(pretrained_cfg, str):
        raise ValueError(f"{timm_name} has no pretrained tag {pretrained_cfg!r}: attnseg registers one configuration "
                         "per model; give a local file with pretrained_cfg_overlay=dict(file=PATH)")
    if isinstance(pretrained_cfg, Mapping):
        overlay = {**pretrained_cfg, **(overlay or {})}
        pretrained_cfg = None
    return resolve_pretrained_cfg(timm_name, pretrained_cfg=pretrained_cfg,
                                  pretrained_cfg_overlay=dict(overlay or {})).to_dict()


def _load_local(model: nn.Module, timm_name: str, cfg: Mapping[str, Any], strict: bool) -> None:
    """Load ``cfg['file']`` into ``model`` through :func:`attnseg.load_pretrained`; refuse every other source."""
    from attnseg.checkpoint import load_pretrained

    path = cfg.get("file")
    if not path:
        remote = [k for k in ("url", "hf_hub_id", "state_dict") if cfg.get(k)]
        known = ", ".join(cfg.get("checkpoints") or ()) or "none published"
        reason = f"it has a {' / '.join(remote)} but no local file" if remote else "no local file was given"
        raise ValueError(
            f"{timm_name}: pretrained=True but {reason}; attnseg never downloads weights. Pass the path of a "
            f"checkpoint: timm.create_model({timm_name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) "
            f"(official files: {known}), or build the model and call attnseg.load_pretrained(model, PATH)")
    report = load_pretrained(model, path, strict=strict)
    model.pretrained_report = report
    _logger.info("%s: loaded %s (%s)", timm_name, path, report)


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    from attnseg.registry import BACKBONES

    timm_name = PREFIX + name

    def create(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
               cache_dir: Any = None, features_only: bool = False, out_indices: Sequence[int] | None = None,
               pretrained_strict: bool = True, **kwargs: Any) -> nn.Module:
        cfg = _resolve_cfg(timm_name, pretrained_cfg, pretrained_cfg_overlay)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if features_only:
            kwargs.setdefault("num_classes", 0)
        model = BACKBONES.get(name)(**kwargs)
        model.pretrained_cfg = model.default_cfg = cfg  # default_cfg: timm's alias of the same object
        if pretrained:  # before wrapping: the checkpoint's keys are the backbone's
            if not getattr(model, "input_conv_keys", None) and cfg.get("first_conv"):
                # as timm does: the cfg's first conv may come from a checkpoint with another in_chans
                model.input_conv_keys = (f"{cfg['first_conv']}.weight",)
            _load_local(model, timm_name, cfg, pretrained_strict)
        if not features_only:
            return model
        from timm.models._builder import pretrained_cfg_for_features

        pyramid = FeaturePyramid(model)
        pyramid.pretrained_cfg = pyramid.default_cfg = pretrained_cfg_for_features(cfg)
        return pyramid

    create.__name__ = create.__qualname__ = timm_name
    create.__module__ = __name__
    create.__doc__ = f"attnseg backbone ``{name}`` (see attnseg.list_models() and attnseg.backbones.pretrained_cfg)."
    return create


def register_timm_models() -> list[str]:
    """Register every attnseg backbone into timm as ``attnseg_<name>`` with its pretrained configuration; returns
    the names added now."""
    from timm.models import is_model, register_model

    from attnseg.registry import BACKBONES

    added = []
    for name in BACKBONES.names():
        timm_name = PREFIX + name
        if name.startswith("test_") or is_model(timm_name):  # never override a name timm (or we) registered
            continue
        default_cfgs[timm_name] = DefaultCfg(tags=deque([""]), cfgs={"": timm_pretrained_cfg(name)})
        register_model(_entrypoint(name))
        added.append(timm_name)
    return added
