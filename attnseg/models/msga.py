"""The published multi-scale self-guided attention network: a 1-channel ResNeXt-101 (32x8d) + the MSGA head.

Paper: Ashish Sinha, Jose Dolz, "Multi-scale self-guided attention for medical image segmentation", IEEE JBHI 2020
(arXiv 1906.02849). Reference code: sinAshish/Multi-Scale-Attention @ 96d76f2 (``src/models/my_stacked_danet.py``
``DAF_stack``, ``src/models/resnext101_regular.py``), written anew on :mod:`attnseg.backbones.resnet` and
:mod:`attnseg.heads.msga` (whose docstring describes the head, its outputs and the memory guard).

The encoder is torchvision's ``resnext101_32x8d`` with a one-channel 7x7 first conv, **randomly initialised** (the
paper trains from scratch on CHAOS MRI), tapped at ``layer1``-``layer4`` (strides 4-32, 256-2048 channels). The whole
network gets the official ``weights_init`` (:func:`~attnseg.heads.msga.official_init`: xavier-normal conv weights, BatchNorm weights
N(1, 0.02), zero BatchNorm biases). :class:`MSGA` is a :class:`~attnseg.models.Segmentor`: any input size is padded
to a multiple of 32 and cropped back; eval mode returns the mean of the four refined logits, training mode the dict
:class:`~attnseg.engine.losses.MSGALoss` takes.

Checkpoints: :mod:`attnseg.convert.msga` maps official ``DAF_stack`` state_dicts onto this model.
"""

from __future__ import annotations

from typing import Any

from attnseg.backbones.resnet import ResNet
from attnseg.heads.msga import MSGAHead, official_init
from attnseg.models.segmentor import Segmentor
from attnseg.registry import MODELS

__all__ = ["MSGA", "msga_resnext101", "test_msga"]


class MSGA(Segmentor):
    """Multi-scale self-guided attention network: a ResNet pyramid (strides 4-32) + :class:`MSGAHead`."""

    family = "msga"


def _create_msga(arch: str, in_chans: int, num_classes: int, head_kwargs: dict[str, Any]) -> MSGA:
    backbone = ResNet(arch, in_chans=in_chans, num_classes=0)
    info = backbone.feature_info
    head = MSGAHead([f["num_chs"] for f in info], [f["reduction"] for f in info], num_classes=num_classes,
                    in_chans=in_chans, **head_kwargs)
    model = MSGA(backbone, head)
    model.apply(official_init)
    return model


@MODELS.register()
def msga_resnext101(in_chans: int = 1, num_classes: int = 5, **kwargs: Any) -> MSGA:
    """The published ``DAF_stack``: 1-channel ResNeXt-101 32x8d + MSGA head, 5 classes (CHAOS MRI: background, liver,
    right kidney, left kidney, spleen); 103.55 M parameters (the official 104.51 M less 0.96 M in modules it builds
    but never uses).

    ``kwargs`` go to :class:`~attnseg.heads.msga.MSGAHead`: ``channels`` (64), ``attention_stride`` (None = 4, the
    original; e.g. 8 or 16 for inputs above 256x256), ``max_attention_bytes``.

    ``test_msga`` is the same wiring at CI size::

        >>> model = test_msga().eval()
        >>> model(torch.randn(1, 1, 97, 131)).shape
        torch.Size([1, 5, 97, 131])
    """
    return _create_msga("resnext101_32x8d", in_chans, num_classes, kwargs)


@MODELS.register()
def test_msga(in_chans: int = 1, num_classes: int = 5, **kwargs: Any) -> MSGA:
    """A CI-sized MSGA: one-block ResNet-18-like encoder (``test_resnet``) + MSGA head with 16 channels."""
    return _create_msga("test_resnet", in_chans, num_classes, {"channels": 16, **kwargs})

