"""``build_model``: a validated ``model:`` config section -> Segmentor or Classifier."""

from __future__ import annotations

from typing import Any

from torch import nn

from attnseg.config import ExperimentConfig, ModelConfig
from attnseg.errors import ConfigError
from attnseg.registry import BACKBONES, HEADS

__all__ = ["build_backbone", "build_model"]


def _accepts(backbone_name: str, param: str) -> bool:
    return param in BACKBONES.parameters(backbone_name)


def build_backbone(cfg: ModelConfig, *, classification: bool) -> nn.Module:
    """Build the backbone of ``cfg`` (and load ``cfg.backbone.pretrained`` into it)."""
    from attnseg.checkpoint import load_pretrained

    name = cfg.backbone.name
    kwargs: dict[str, Any] = dict(cfg.backbone.kwargs)
    if _accepts(name, "in_chans"):
        kwargs["in_chans"] = cfg.in_chans
    if cfg.backbone.out_indices is not None:
        kwargs["out_indices"] = tuple(cfg.backbone.out_indices)
    if classification and _accepts(name, "num_classes"):
        kwargs["num_classes"] = cfg.num_classes
    try:
        backbone = BACKBONES.get(name)(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.backbone ({name}): {e}") from None
    if not classification and hasattr(backbone, "reset_classifier"):
        # A segmentor never uses the classifier (unused params upset DDP). Removed before loading, so that dense
        # (mm-style) checkpoints, which have no classifier keys, load strictly; a classification checkpoint's
        # head keys are dropped by load_pretrained (the family's head_key_prefixes).
        backbone.reset_classifier(0)
    if cfg.backbone.pretrained:
        load_pretrained(backbone, cfg.backbone.pretrained)
    if cfg.backbone.freeze:
        for p in backbone.parameters():
            p.requires_grad_(False)
    return backbone


def build_model(cfg: ExperimentConfig | ModelConfig | dict, task: str | None = None) -> nn.Module:
    """Build the model an experiment config describes.

    Args:
        cfg: a validated :class:`ExperimentConfig`, its ``model`` section, or a plain dict of either.
        task: ``"segmentation"`` or ``"classification"`` when ``cfg`` is only the model section
            (default: segmentation when a head is given).

    Returns:
        A :class:`~attnseg.models.Segmentor` (backbone + adapter + head) or a
        :class:`~attnseg.models.Classifier`, in train mode.
    """
    from attnseg.models.classifier import Classifier
    from attnseg.models.segmentor import Adapter, Segmentor

    if isinstance(cfg, dict):
        cfg = ExperimentConfig.model_validate(cfg) if "model" in cfg else ModelConfig.model_validate(cfg)
    if isinstance(cfg, ExperimentConfig):
        task = cfg.task
        model_cfg = cfg.model
    else:
        model_cfg = cfg
        task = task or ("segmentation" if model_cfg.head is not None else "classification")

    if task == "classification":
        model: nn.Module = Classifier(build_backbone(model_cfg, classification=True), model_cfg.num_classes)
    else:
        if model_cfg.head is None:
            raise ConfigError("model.head: a segmentation model needs a head")
        backbone = build_backbone(model_cfg, classification=False)
        channels = [int(f["num_chs"]) for f in backbone.feature_info]
        strides = [int(f["reduction"]) for f in backbone.feature_info]
        adapter = None
        if model_cfg.adapter_channels is not None:
            if len(model_cfg.adapter_channels) != len(channels):
                raise ConfigError(
                    f"model.adapter_channels has {len(model_cfg.adapter_channels)} values; the backbone gives "
                    f"{len(channels)} pyramid levels (channels {channels})"
                )
            adapter = Adapter(channels, strides, list(model_cfg.adapter_channels), spatial_dims=model_cfg.spatial_dims)
            channels = list(model_cfg.adapter_channels)
        head_kwargs = dict(model_cfg.head.kwargs)
        try:
            head = HEADS.get(model_cfg.head.name)(
                in_channels=channels, strides=strides, num_classes=model_cfg.num_classes,
                spatial_dims=model_cfg.spatial_dims, in_chans=model_cfg.in_chans, **head_kwargs,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.head ({model_cfg.head.name}): {e}") from None
        model = Segmentor(backbone, head, adapter)
    if model_cfg.checkpoint:
        from attnseg.checkpoint import load_pretrained

        load_pretrained(model, model_cfg.checkpoint)
    return model
