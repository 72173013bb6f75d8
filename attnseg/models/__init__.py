"""Model assemblies: Segmentor (backbone + adapter + head), Classifier, and the published pairings (registered in
``MODELS``: ``swin_unetr``, ``swin_unetr_v2``)."""

from attnseg.models import swin_unetr  # noqa: F401  (registers the Swin UNETR models and encoders)
from attnseg.models.classifier import Classifier
from attnseg.models.segmentor import Adapter, Segmentor

__all__ = ["Adapter", "Classifier", "Segmentor"]
