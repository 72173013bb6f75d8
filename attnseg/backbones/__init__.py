"""Backbone families; importing this package registers every variant in ``BACKBONES``."""

from attnseg.backbones import biformer, mambaout, nat  # noqa: F401
