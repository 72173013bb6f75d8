"""Segmentation heads; importing this package registers them in ``HEADS``."""

from attnseg.heads import att_swin_unet, connectivity, hybridgnet, msga, unetr  # noqa: F401
