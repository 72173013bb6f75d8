"""DconnNet as published: a ResNet-34 encoder + DconnNet's directional-connectivity decoder.

Paper: Ziyun Yang, Sina Farsiu, "Directional Connectivity-based Segmentation of Medical Images", CVPR 2023
(arXiv 2304.00145). Reference code: Zyun-Y/DconnNet @ e55ac71 (``model/DconnNet.py:DconnNet``, ``model/resnet.py``),
written anew on :mod:`attnseg.backbones.resnet` (torchvision's ResNet-34, which is the official encoder's layout) and
:mod:`attnseg.heads.connectivity` (whose docstring describes the decoder and its generalisations).

The encoder is tapped at five levels: the stem after its ReLU (64 channels, stride 2, before the max-pool) and
``layer1``-``layer4`` (64, 128, 256, 512 channels at strides 4-32), exactly the official ``c1``..``c5``. The official
model starts from ImageNet weights (``resnet34(pretrained=True)``); here ``model.backbone.pretrained`` loads them
(torchvision's ``resnet34-*.pth``). :class:`DconnNet` is a :class:`~attnseg.models.Segmentor`, so any input size is
padded to a multiple of 32 and cropped back (the official model needs H, W divisible by 32). Training mode returns
``{"logits", "aux"}`` for the ``connectivity`` loss, eval mode the connectivity logits ``[B, 8 * K, H, W]``;
``postprocess`` votes them into a label map.

Checkpoints: :mod:`attnseg.convert.dconnnet` maps official state_dicts onto this model.
"""

from __future__ import annotations

from typing import Any

from attnseg.backbones.resnet import ResNet
from attnseg.heads.connectivity import DconnNetHead
from attnseg.models.segmentor import Segmentor
from attnseg.registry import MODELS

__all__ = ["DconnNet", "dconnnet_resnet34", "test_dconnnet"]


class DconnNet(Segmentor):
    """DconnNet: a ResNet pyramid with its stride-2 stem level (strides 2-32) + :class:`DconnNetHead`."""

    family = "dconnnet"


def _create_dconnnet(arch: str, in_chans: int, num_classes: int, head_kwargs: dict[str, Any]) -> DconnNet:
    backbone = ResNet(arch, in_chans=in_chans, num_classes=0, out_indices=(0, 1, 2, 3, 4))
    info = backbone.feature_info
    head = DconnNetHead([f["num_chs"] for f in info], [f["reduction"] for f in info], num_classes=num_classes,
                        in_chans=in_chans, **head_kwargs)
    return DconnNet(backbone, head)


@MODELS.register()
def dconnnet_resnet34(in_chans: int = 3, num_classes: int = 1, **kwargs: Any) -> DconnNet:
    """The published DconnNet: ResNet-34 + DconnNet decoder, 8 directions per class; 25.49 M parameters with one
    class (the official 28.38 M less 2.89 M it builds but never uses: ``fb5.conv_3x3``, ``cls_pred_conv`` and the
    encoder's ImageNet classifier ``fc``).

    ``kwargs`` go to :class:`~attnseg.heads.connectivity.DconnNetHead`: ``decode`` (``"binarize"``, DconnNet's rule,
    or ``"soft"`` for one class; ``"multiclass"`` for several), ``dropout`` (0.1), ``max_attention_bytes``.

    Example::

        >>> model = test_dconnnet(decode="binarize").eval()
        >>> out = model(torch.randn(1, 3, 45, 40))
        >>> out.shape, model.postprocess(out).shape
        (torch.Size([1, 8, 45, 40]), torch.Size([1, 45, 40]))
    """
    return _create_dconnnet("resnet34", in_chans, num_classes, {"decode": "binarize" if num_classes == 1 else None,
                                                                   **kwargs})


@MODELS.register()
def test_dconnnet(in_chans: int = 3, num_classes: int = 1, **kwargs: Any) -> DconnNet:
    """A CI-sized DconnNet: the one-block-per-stage ``test_resnet`` encoder (same widths) + the full decoder."""
    return _create_dconnnet("test_resnet", in_chans, num_classes, kwargs)
