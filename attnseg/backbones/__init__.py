"""Backbone families; importing this package registers every variant in ``BACKBONES``."""

from attnseg.backbones import biformer, halonet, karat, mambaout, nat, overlock, resnet, sparsifiner, transnext  # noqa: F401
