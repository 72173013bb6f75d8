"""Shared building blocks used by more than one model family."""

from attnseg.layers.norm import LayerNorm2d

__all__ = ["LayerNorm2d"]
