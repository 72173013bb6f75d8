"""Segmentation heads; importing this package registers them in ``HEADS``."""

from attnseg.heads import unetr  # noqa: F401
