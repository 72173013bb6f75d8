"""Neighborhood attention (NATTEN semantics) with no natten install: window tables, functional ops, modules;
and BiFormer's region-routed attention (:func:`region_routed_attention`).

See :mod:`attnseg.ops.functional` for the API and :mod:`attnseg.ops.windows` for the rules.
"""

from attnseg.ops.functional import (
    available_backends,
    na1d,
    na1d_av,
    na1d_qk,
    na2d,
    na2d_av,
    na2d_qk,
    na3d,
    na3d_av,
    na3d_qk,
    use_backend,
)
from attnseg.ops.modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from attnseg.ops.routing import region_masked_attention, region_routed_attention

__all__ = ["na1d", "na2d", "na3d", "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
           "use_backend", "available_backends", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
           "NeighborhoodAttention3D", "region_routed_attention",
           "region_masked_attention"]
