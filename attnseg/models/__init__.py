"""Model assemblies: Segmentor (backbone + adapter + head), Classifier, and the published pairings (registered in
``MODELS``: ``swin_unetr``, ``swin_unetr_v2``, ``att_swin_unet_tiny``, ``msga_resnext101``, ``dconnnet_resnet34``)."""

from attnseg.models import att_swin_unet, dconnnet, hybridgnet, msga, swin_unetr  # noqa: F401  (register the published pairings and encoders)
from attnseg.models.classifier import Classifier
from attnseg.models.segmentor import Adapter, Segmentor

__all__ = ["Adapter", "Classifier", "Segmentor"]
