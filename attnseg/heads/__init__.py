"""Segmentation heads; importing this package registers them in ``HEADS``."""

from attnseg.heads import att_swin_unet, connectivity, msga, unetr  # noqa: F401
