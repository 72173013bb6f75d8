"""Model assemblies: Segmentor (backbone + adapter + head) and Classifier."""

from attnseg.models.classifier import Classifier
from attnseg.models.segmentor import Adapter, Segmentor

__all__ = ["Adapter", "Classifier", "Segmentor"]
