"""attnseg backbones for mmsegmentation, mmdetection and any mmengine project (the ``mm`` extra).

Importing this module registers every attnseg backbone in an mmengine registry of scope ``attnseg``, so that
OpenMMLab configs name them ``type='attnseg.<name>'`` (``attnseg.list_models()`` gives the names)::

    custom_imports = dict(imports=['attnseg.integrations.mm'], allow_failed_imports=False)
    model = dict(
        type='EncoderDecoder',
        backbone=dict(type='attnseg.nat_mini', out_indices=(0, 1, 2, 3),
                      init_cfg=dict(type='Pretrained', checkpoint='nat_mini_in1k.pth')),
        decode_head=dict(type='UPerHead', in_channels=[64, 128, 256, 512], ...))

How mmseg and mmdet find them. :data:`ATTNSEG_MODELS` is ``Registry('model', parent=mmengine.registry.MODELS,
scope='attnseg')``: a sibling of ``mmseg.registry.MODELS`` and ``mmdet.registry.MODELS``, which are children of
the same root. mmengine resolves a scoped key (``'attnseg.nat_mini'``) asked of any registry in the tree through
the root's children (``Registry.get``: a scope other than the registry's own goes to the child of that scope, else
to the root), which is how mmdet configs name ``'mmpretrain.TIMMBackbone'``. An unscoped name would only be looked
up in the asking registry and its ancestors, never in a sibling; so this module imports neither mmseg nor mmdet
(importing them asserts on the mmcv version and, without mmcv's compiled ops, fails) and works for both, and for
any other mmengine-based project.

The mm backbone contract (:class:`MMBackbone`, one subclass per name):

- ``__init__(out_indices=None, init_cfg=None, norm_eval=False, **backbone_kwargs)``: the keyword arguments of the
  attnseg factory (``attnseg.registry.BACKBONES.parameters(name)``); ``num_classes`` defaults to 0 (no classifier).
  ``out_indices`` are indices into the backbone's own pyramid (``feature_info``), default the backbone's default:
  stages at strides 4-32 are ``(0, 1, 2, 3)`` for most families, ``(1, 2, 3, 4)`` for ResNet and HaloNet, whose
  index 0 is the stride-2 stem, and ``(0, ..., 4)`` for Swin UNETR's ``swinvit_*``.
- ``forward(x)`` returns a tuple of NCHW tensors, one per ``out_indices``, in increasing stride
  (``swinvit_*`` are 3D unless built with ``spatial_dims=2``). ``feature_info`` gives their channels and strides
  (for ``decode_head.in_channels`` / the neck's ``in_channels``).
- ``init_cfg=dict(type='Pretrained', checkpoint=PATH, prefix=None, strict=True)`` is loaded by
  ``init_weights()`` (called by mmengine's ``Runner``) through :func:`attnseg.load_pretrained`: official
  checkpoints go through the family's converter, files are read with ``weights_only=True``, a classification
  checkpoint's classifier is dropped, mm-style ``backbone.`` prefixes are stripped, and the
  :class:`~attnseg.checkpoint.LoadReport` is logged and kept as ``pretrained_report``. ``prefix`` keeps only the
  keys under it (mm's meaning; ``'backbone.'`` for a checkpoint of a whole mmseg/mmdet model trained with this
  backbone). ``checkpoint`` must be a local file: attnseg never downloads. Other ``init_cfg`` types
  (``Kaiming``, ``Normal`` ...) go to mmengine's initialisers.
- ``norm_eval=True`` keeps the backbone's batch-norm layers in eval mode while training (mm's flag).

attnseg heads as mmseg decode heads (:func:`mm_decode_head`, ``type='attnseg.DecodeHead'``): the heads that fit
mmseg's contract, i.e. that compute per-pixel class logits from the feature maps alone (Att-SwinU-Net's decoder).
The others do not fit and are refused by name: UNETR convolves the image itself (a decode head never sees it),
ConnNet/DconnNet, MSGA and HybridGNet have their own outputs and losses (connectivity maps, deep supervision,
landmarks). The class is made on first build, as a subclass of mmseg's ``BaseDecodeHead`` (so mmseg is imported
then, not when this module is)::

    decode_head=dict(type='attnseg.DecodeHead', head='att_swin_unet', in_channels=[96, 192, 384, 768],
                     in_index=[0, 1, 2, 3], strides=[4, 8, 16, 32], num_classes=150,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from mmengine.logging import print_log
    from mmengine.model import BaseModule
    from mmengine.registry import MODELS as MMENGINE_MODELS
    from mmengine.registry import Registry
except ImportError as e:  # pragma: no cover - exercised only without mmengine
    raise ImportError('attnseg.integrations.mm needs mmengine: pip install "attnseg[mm]"') from e

import torch
from torch import nn

from attnseg.registry import BACKBONES, HEADS

__all__ = ["SCOPE", "ATTNSEG_MODELS", "MMBackbone", "mm_backbone_class", "mm_decode_head", "register_mm_models"]

SCOPE = "attnseg"

#: mmengine registry of scope ``attnseg`` under mmengine's root ``MODELS`` (configs: ``type='attnseg.<name>'``).
ATTNSEG_MODELS = Registry("model", parent=MMENGINE_MODELS, scope=SCOPE, locations=["attnseg.integrations.mm"])

_REMOTE = ("http://", "https://", "open-mmlab://", "torchvision://", "mmcls://", "mmpretrain://", "pavi://", "s3://")
# map_location is accepted for mm configs that set it, and ignored: attnseg always reads checkpoints to the CPU
_PRETRAINED_KEYS = {"type", "checkpoint", "prefix", "strict", "map_location"}


class MMBackbone(BaseModule):
    """An attnseg backbone with the mm backbone contract; :func:`mm_backbone_class` makes one subclass per name.

    Args:
        out_indices: pyramid levels to return (indices into the backbone's ``feature_info``); None: the
            backbone's default.
        init_cfg: mmengine init config; ``dict(type='Pretrained', checkpoint=PATH, prefix=None, strict=True)`` loads
            a local checkpoint through :func:`attnseg.load_pretrained` in :meth:`init_weights`.
        norm_eval: keep batch-norm layers in eval mode (frozen statistics) while training.
        **kwargs: hyper-parameters of the attnseg factory (``in_chans``, ``drop_path_rate``, ...).

    Attributes:
        backbone: the attnseg backbone (parameters live under ``backbone.``).
        out_indices: the levels returned, as the backbone counts them.
        pretrained_report: the :class:`~attnseg.checkpoint.LoadReport` of the last pretrained load (or None).
    """

    attnseg_name: str = ""

    def __init__(self, out_indices: Sequence[int] | None = None, init_cfg: dict | list[dict] | None = None,
                 norm_eval: bool = False, **kwargs: Any) -> None:
        super().__init__(init_cfg=init_cfg)
        if not self.attnseg_name:
            raise TypeError("MMBackbone is abstract: build a registered subclass, e.g. "
                            "ATTNSEG_MODELS.build(dict(type='attnseg.nat_mini'))")
        _check_init_cfg(self.attnseg_name, init_cfg)
        params = BACKBONES.parameters(self.attnseg_name)
        if "num_classes" in params:
            kwargs.setdefault("num_classes", 0)
        self._select: tuple[int, ...] | None = None
        if out_indices is not None:
            out_indices = tuple(int(i) for i in out_indices)
            if "out_indices" in params:
                kwargs["out_indices"] = out_indices
            else:  # the backbone always gives its whole pyramid: pick the levels here
                self._select = out_indices
        self.backbone: nn.Module = BACKBONES.get(self.attnseg_name)(**kwargs)
        levels = [dict(f) for f in self.backbone.feature_info]
        if self._select is not None:
            bad = [i for i in self._select if not -len(levels) <= i < len(levels)]
            if bad:
                raise ValueError(f"{self.attnseg_name}: out_indices {bad} out of range; the backbone gives "
                                 f"{len(levels)} levels (strides {[f['reduction'] for f in levels]})")
            levels = [levels[i] for i in self._select]
        self.out_indices = out_indices if out_indices is not None else tuple(
            getattr(self.backbone, "out_indices", range(len(levels))))
        self._feature_info = levels
        self.norm_eval = norm_eval
        self.pretrained_report: Any = None

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """``num_chs`` and ``reduction`` (stride) of each returned map, in order."""
        return [dict(f) for f in self._feature_info]

    @property
    def out_channels(self) -> list[int]:
        """Channels of the returned maps (a decode head's or neck's ``in_channels``)."""
        return [int(f["num_chs"]) for f in self._feature_info]

    @property
    def strides(self) -> list[int]:
        """Strides of the returned maps."""
        return [int(f["reduction"]) for f in self._feature_info]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` [B, C, H, W] -> one NCHW map per ``out_indices``, in increasing stride."""
        feats = self.backbone.forward_pyramid(x)
        if self._select is not None:
            feats = [feats[i] for i in self._select]
        return tuple(feats)

    def train(self, mode: bool = True) -> MMBackbone:
        """Set train/eval mode; with ``norm_eval`` the batch-norm layers stay in eval mode."""
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def init_weights(self) -> None:
        """mmengine's ``init_weights`` (other ``init_cfg`` types), then a ``Pretrained`` checkpoint through
        :func:`attnseg.load_pretrained`."""
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg] if self.init_cfg else []
        pretrained = [c for c in cfgs if c.get("type") == "Pretrained"]
        first_call = not self._is_init
        original = self.init_cfg
        self.init_cfg = [c for c in cfgs if c.get("type") != "Pretrained"] or None
        try:
            super().init_weights()
        finally:
            self.init_cfg = original
        if first_call:
            for cfg in pretrained:
                self.load_checkpoint(cfg["checkpoint"], prefix=cfg.get("prefix"), strict=cfg.get("strict", True))

    def load_checkpoint(self, checkpoint: str | os.PathLike, prefix: str | None = None, strict: bool = True) -> Any:
        """Load a local checkpoint into the backbone through :func:`attnseg.load_pretrained`; returns its report.

        Args:
            checkpoint: a local file (official, attnseg, timm or mm layout; ``.pth``/``.safetensors``).
            prefix: keep only the keys under this prefix, with the prefix removed (mm's ``Pretrained`` meaning); the
                others are listed in the report's ``ignored``.
            strict: raise on missing or unexpected keys (otherwise they are only reported).
        """
        from attnseg.checkpoint import load_pretrained, read_state_dict
        from attnseg.errors import CheckpointError

        path = os.fspath(checkpoint)
        if path.startswith(_REMOTE):
            raise ValueError(f"{self.attnseg_name}: init_cfg checkpoint {path!r} is remote; attnseg never downloads "
                             "weights. Download it yourself and give the local path")
        if prefix:
            sd = read_state_dict(path)
            kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if not kept:
                raise CheckpointError(f"{path}: no key starts with prefix {prefix!r} (keys: {sorted(sd)[:5]} ...)")
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = Path(tmp) / "state_dict.pth"
                torch.save(kept, tmp_path)
                report = load_pretrained(self.backbone, tmp_path, strict=strict)
            report.ignored = sorted(k for k in sd if not k.startswith(prefix)) + list(report.ignored)
        else:
            report = load_pretrained(self.backbone, path, strict=strict)
        self.pretrained_report = report
        print_log(f"{type(self).__name__}: loaded {path}" + (f" (prefix {prefix!r})" if prefix else "")
                  + f": {report}", logger="current", level=logging.INFO)
        return report


def _check_init_cfg(name: str, init_cfg: Any) -> None:
    """Refuse a malformed ``Pretrained`` entry when the model is built, not when the runner initialises it."""
    cfgs = init_cfg if isinstance(init_cfg, list) else [init_cfg] if init_cfg else []
    for cfg in cfgs:
        if not isinstance(cfg, dict) or "type" not in cfg:
            raise TypeError(f"attnseg.{name}: init_cfg entries must be dicts with a 'type', got {cfg!r}")
        if cfg["type"] != "Pretrained":
            continue
        unknown = set(cfg) - _PRETRAINED_KEYS
        if unknown:
            raise ValueError(f"attnseg.{name}: init_cfg Pretrained got unknown keys {sorted(unknown)} "
                             f"(accepted: {sorted(_PRETRAINED_KEYS)})")
        if not cfg.get("checkpoint"):
            raise ValueError(f"attnseg.{name}: init_cfg Pretrained needs a checkpoint path")


def mm_backbone_class(name: str) -> type[MMBackbone]:
    """The :class:`MMBackbone` subclass for the attnseg backbone ``name`` (KeyError with a suggestion if unknown)."""
    BACKBONES.get(name)
    cls_name = "AttnSeg_" + name
    doc = (f"attnseg backbone ``{name}`` with the mm backbone contract (mm configs: ``type='{SCOPE}.{name}'``).\n\n"
           + (MMBackbone.__doc__ or "").split("\n\n", 1)[1])
    return type(cls_name, (MMBackbone,), {"attnseg_name": name, "__doc__": doc, "__module__": __name__})


def _head_misfit(name: str) -> str | None:
    """Why the attnseg head ``name`` cannot be an mmseg decode head, or None if it can."""
    head_cls = HEADS.get(name)
    kind = getattr(head_cls, "output_kind", "logits")
    if kind != "logits":
        return (f"its output is {kind!r}, with its own loss (attnseg.engine.losses), not the per-pixel class logits "
                "mmseg's decode-head losses take")
    if getattr(head_cls, "reads_image", False):
        return "it convolves the input image itself, and an mmseg decode head is given the feature maps only"
    return None


_DECODE_HEAD_CLASS: type | None = None


def _decode_head_class() -> type:
    """The decode-head class: a subclass of mmseg's ``BaseDecodeHead``, made once (importing mmseg)."""
    global _DECODE_HEAD_CLASS
    if _DECODE_HEAD_CLASS is not None:
        return _DECODE_HEAD_CLASS
    try:
        from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    except ImportError as e:
        raise ImportError("attnseg.DecodeHead is an mmseg decode head and needs mmsegmentation (and mmcv): see "
                          f"docs/mm.md for installing them ({e})") from e

    class AttnsegDecodeHead(BaseDecodeHead):
        """An attnseg head as an mmseg decode head: the ``in_index`` levels of the backbone's tuple go to the attnseg
        head, whose logits ``[B, num_classes, H, W]`` are at ``strides[0]`` times the first selected level's size
        (the padded input size for a stride-4 pyramid). ``loss`` / ``predict`` are mmseg's (``loss_decode``,
        resizing to the labels or the image)."""

        def __init__(self, head: str, in_channels: Sequence[int], strides: Sequence[int], num_classes: int,
                     in_index: Sequence[int] | None = None, head_cfg: dict | None = None, **kwargs: Any) -> None:
            in_channels = [int(c) for c in in_channels]
            in_index = list(range(len(in_channels))) if in_index is None else [int(i) for i in in_index]
            if len(in_index) != len(in_channels) or len(strides) != len(in_channels):
                raise ValueError(f"attnseg.DecodeHead({head!r}): in_channels {in_channels}, in_index {in_index} and "
                                 f"strides {list(strides)} need one entry per level")
            # channels: mmseg's conv_seg width, unused here (the attnseg head has its own classifier)
            super().__init__(in_channels=in_channels, channels=in_channels[0], num_classes=num_classes,
                             in_index=in_index, input_transform="multiple_select", **kwargs)
            del self.conv_seg
            self.strides = [int(s) for s in strides]
            self.head_name = head
            self.head = HEADS.get(head)(in_channels, self.strides, num_classes=self.out_channels,
                                        **(head_cfg or {}))

        def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
            features = self._transform_inputs(inputs)
            size = [n * self.strides[0] for n in features[0].shape[2:]]
            # the head takes the image for its size only (a zero-channel stand-in; heads reading it are refused)
            image = features[0].new_empty((features[0].shape[0], 0, *size))
            return self.head(list(features), image)

    _DECODE_HEAD_CLASS = AttnsegDecodeHead
    return AttnsegDecodeHead


def mm_decode_head(head: str, in_channels: Sequence[int], strides: Sequence[int], num_classes: int,
                   in_index: Sequence[int] | None = None, head_cfg: dict | None = None, **kwargs: Any) -> nn.Module:
    """The attnseg head ``head`` as an mmseg decode head (configs: ``type='attnseg.DecodeHead'``).

    Args:
        head: an attnseg head name (``attnseg.registry.HEADS``) that fits: per-pixel logits from the feature maps
            alone (``att_swin_unet``); the others raise a ``ValueError`` saying why.
        in_channels, strides: channels and strides of the levels it reads (the backbone's ``feature_info``).
        num_classes: classes (mmseg's rule: 2 classes with ``use_sigmoid`` losses give one output channel).
        in_index: which levels of the backbone's tuple (default: all, in order).
        head_cfg: keyword arguments of the attnseg head (e.g. ``dict(depths=(2, 2, 2, 2))``).
        **kwargs: ``BaseDecodeHead``'s (``loss_decode``, ``ignore_index``, ``align_corners``, ``init_cfg``, ...).

    Returns:
        an ``mmseg.models.decode_heads.BaseDecodeHead`` whose ``forward(tuple of [B, C_i, H_i, W_i])`` gives logits
        ``[B, out_channels, H, W]``.
    """
    misfit = _head_misfit(head)
    if misfit is not None:
        raise ValueError(f"attnseg.DecodeHead: the attnseg head {head!r} is not an mmseg decode head: {misfit}; "
                         "train it with attnseg's own configs (tools/train.py)")
    return _decode_head_class()(head, in_channels, strides, num_classes, in_index=in_index, head_cfg=head_cfg,
                                **kwargs)


def register_mm_models(registry: Registry = ATTNSEG_MODELS) -> list[str]:
    """Register every attnseg backbone (``test_*`` CI variants included) into ``registry`` under its attnseg name,
    and :func:`mm_decode_head` as ``DecodeHead``; names already there are kept. Returns the names added now."""
    added = []
    for name in BACKBONES.names():
        if name in registry.module_dict:
            continue
        registry.register_module(name=name, module=mm_backbone_class(name))
        added.append(name)
    if "DecodeHead" not in registry.module_dict:
        registry.register_module(name="DecodeHead", module=mm_decode_head)
        added.append("DecodeHead")
    return added


register_mm_models()
