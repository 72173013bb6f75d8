"""attnseg: attention-era vision backbones paired with dense-prediction heads, for (medical) segmentation.

Public API::

    import attnseg
    cfg = attnseg.load_config("configs/mambaout/mambaout_femto_unetr_synthetic2d.yaml",
                              ["model.head.feature_size=24"])
    model = attnseg.build_model(cfg)
    attnseg.list_models("mambaout*")            # registered backbones
    attnseg.load_pretrained(model.backbone, "mambaout_femto.pth")   # official or attnseg checkpoints
    attnseg.save_model(model, "my_model/", cfg)  # model.safetensors + config.json (no pickle)
    model, info = attnseg.load_model("my_model/")
"""

from __future__ import annotations

import fnmatch
from typing import Any

__version__ = "0.1.0"

__all__ = ["build_model", "load_config", "list_models", "load_pretrained", "save_model", "load_model", "__version__"]


def load_config(path: Any, overrides: Any = None) -> Any:
    """Load, merge (``_base_``), override (``["a.b=1"]``) and validate a config; see :mod:`attnseg.config`."""
    from attnseg.config import load_config as _load

    return _load(path, overrides)


def build_model(cfg: Any, task: str | None = None) -> Any:
    """Build a Segmentor or Classifier from a config; see :func:`attnseg.models.builder.build_model`."""
    from attnseg.models.builder import build_model as _build

    return _build(cfg, task)


def list_models(pattern: str | None = None, kind: str = "backbone") -> list[str]:
    """Registered names of ``kind`` ('backbone', 'head', 'model', 'dataset', 'loss'), filtered by a glob."""
    from attnseg import registry

    table = {"backbone": registry.BACKBONES, "head": registry.HEADS, "model": registry.MODELS,
             "dataset": registry.DATASETS, "loss": registry.LOSSES}
    if kind not in table:
        raise ValueError(f"kind must be one of {sorted(table)}, got {kind!r}")
    names = table[kind].names()
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def load_pretrained(model: Any, path: Any, **kwargs: Any) -> Any:
    """Load an official or attnseg checkpoint into ``model``; see :func:`attnseg.checkpoint.load_pretrained`."""
    from attnseg.checkpoint import load_pretrained as _load

    return _load(model, path, **kwargs)


def save_model(model: Any, path: Any, config: Any = None, **kwargs: Any) -> Any:
    """Write attnseg's own format (safetensors weights + JSON config); see :func:`attnseg.model_files.save_model`."""
    from attnseg.model_files import save_model as _save

    return _save(model, path, config, **kwargs)


def load_model(path: Any, **kwargs: Any) -> Any:
    """Rebuild a model saved by :func:`save_model`, without unpickling; see :func:`attnseg.model_files.load_model`."""
    from attnseg.model_files import load_model as _load

    return _load(path, **kwargs)


def _register_with_timm() -> None:
    # timm.create_model("attnseg_<backbone>") works once attnseg is imported (attnseg.integrations.timm)
    from attnseg.integrations.timm import register_timm_models

    register_timm_models()


_register_with_timm()
