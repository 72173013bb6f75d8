"""HybridGNet: official checkpoints -> attnseg (:mod:`attnseg.models.hybridgnet`).

Layouts recognised by :func:`convert_state_dict` (ngaggion/HybridGNet @ 7c39944; checkpoints are plain
state_dicts, e.g. ``Skip/double_L65/best.pt``); the model is a :class:`~attnseg.models.hybridgnet.HybridGNet`
Segmentor (``backbone.*`` = :class:`~attnseg.models.hybridgnet.HybridGNetEncoder`, ``head.*`` =
:class:`~attnseg.heads.hybridgnet.HybridGNetHead`):

=====================================================================  ===========================================
official                                                               attnseg
=====================================================================  ===========================================
``encoder.dconv_down{i}.{skip,block}.*`` (i = 1..6)                    ``backbone.layers.{i-1}.{skip,block}.*``
``encoder.fc_mu.*``, ``encoder.fc_logvar.*``, ``dec_lin.*``            ``head.fc_mu.*``, ``head.fc_logvar.*``, ``head.dec_lin.*``
``graphConv_up{k}.*`` (k = 6..2), ``graphConv_up1.*``                  ``head.conv{k}.*``, ``head.out_conv.*``
``graphConv_pre{1,2}.*`` (hybridDoubleSkip.py)                         ``head.pos_conv{1,2}.*``
``SC_{1,2}.graphConv_pre.*`` (HybridGNet_2_IGSC.py's ``SkipBlock``)     ``head.pos_conv{1,2}.*``
=====================================================================  ===========================================

ChebConv weights come in two layouts: PyG 2.x ``lins.{k}.weight`` ``[out, in]`` (+ ``bias``), kept as they are, and
PyG 1.x (the MICCAI 2021 code, torch_geometric 1.7) one ``weight`` ``[K, in, out]`` per layer, split into
``lins.{k}.weight = weight[k].T``. BatchNorm running statistics do not exist in official checkpoints (every BN has
``track_running_stats=False``); a checkpoint that has them (``running_mean``, ``running_var``,
``num_batches_tracked``) is refused unless the model is built with ``norm_running_stats=True``, so it cannot silently
mean something else. Only the 2-IGSC model (``hybridDoubleSkip.py``, ``HybridGNet_2_IGSC.py``) is supported; the
no-skip and 1-IGSC models have other layer widths.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError

__all__ = ["convert_state_dict", "from_official", "is_official"]

_OFFICIAL = re.compile(r"^(encoder\.dconv_down\d|graphConv_|SC_\d\.graphConv_pre|dec_lin\.)")
_RUNNING = re.compile(r"\.(running_mean|running_var|num_batches_tracked)$")


def is_official(state_dict: dict[str, Any]) -> bool:
    """Whether the keys are HybridGNet's official layout (attnseg's have ``backbone.``/``head.`` prefixes)."""
    return any(_OFFICIAL.match(k) for k in state_dict)


def _key(key: str) -> str | None:
    m = re.fullmatch(r"encoder\.dconv_down(\d)\.((skip|block)\.\d+\.\w+)", key)
    if m and 1 <= int(m.group(1)) <= 6:
        return f"backbone.layers.{int(m.group(1)) - 1}.{m.group(2)}"
    m = re.fullmatch(r"encoder\.(fc_mu|fc_logvar)\.(weight|bias)", key)
    if m:
        return f"head.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"dec_lin\.(weight|bias)", key)
    if m:
        return f"head.dec_lin.{m.group(1)}"
    m = re.fullmatch(r"graphConv_up([1-6])\.(lins\.\d+\.weight|weight|bias)", key)
    if m:
        name = "out_conv" if m.group(1) == "1" else f"conv{m.group(1)}"
        return f"head.{name}.{m.group(2)}"
    m = re.fullmatch(r"(?:graphConv_pre([12])|SC_([12])\.graphConv_pre)\.(lins\.\d+\.weight|weight|bias)", key)
    if m:
        return f"head.pos_conv{m.group(1) or m.group(2)}.{m.group(3)}"
    return None


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Rename an official HybridGNet 2-IGSC state_dict to attnseg's layout (see the module docstring).

    Raises:
        CheckpointError: listing the keys that have no place, or a PyG 1.x ``weight`` that is not ``[K, in, out]``.
    """
    out: dict[str, Any] = {}
    unplaced = []
    for key, value in state_dict.items():
        name = _key(key)
        if name is None:
            unplaced.append(key)
            continue
        if name.endswith(".weight") and name.startswith("head.") and ".lins." not in name and \
                re.search(r"\.(conv\d|out_conv|pos_conv\d)\.weight$", name):
            if not isinstance(value, torch.Tensor) or value.dim() != 3:
                raise CheckpointError(f"{key}: a PyG 1.x ChebConv weight must be [K, in, out], got "
                                      f"{list(getattr(value, 'shape', []))}")
            prefix = name[: -len("weight")]
            for k in range(value.shape[0]):
                out[f"{prefix}lins.{k}.weight"] = value[k].t().contiguous()  # [in, out] -> Linear's [out, in]
            continue
        out[name] = value
    if unplaced:
        raise CheckpointError(f"{len(unplaced)} key(s) are not HybridGNet 2-IGSC keys: {', '.join(unplaced[:10])}")
    return out


def _config(constructor: dict[str, Any]) -> dict[str, Any]:
    cfg = constructor.get("config") or constructor.get("kwargs", {}).get("config")
    if not isinstance(cfg, dict):
        raise ValueError("constructor must carry the official 'config' dict (n_nodes, latents, inputsize, filters, "
                         "K, window, l1, l2)")
    return cfg


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> nn.Module:
    """The attnseg model for an official ``Hybrid(config, ...)`` of ``models/hybridDoubleSkip.py`` (or
    ``HybridGNet_2_IGSC.py``), weights loaded strictly, in eval mode; its forward returns the official
    ``(landmarks, pos1, pos2)``.

    ``constructor["config"]``: the official config (``inputsize``, ``latents``, ``filters``, ``K``, ``window``,
    ``l1``/``l2`` (6-5, 5-4 or 4-3: the encoder blocks the two skips read), ``n_nodes`` (120 -> the chest
    ``LH`` template, 166 -> ``all``, 94 -> ``lungs``)). The lookup runs in the official mode (both axes scaled by
    the map width).
    """
    from attnseg.models.hybridgnet import _create_hybridgnet

    name = constructor.get("name", "Hybrid")
    if name not in ("Hybrid", "HybridGNet"):
        raise ValueError(f"unknown HybridGNet constructor {name!r} (expected the 2-IGSC 'Hybrid')")
    cfg = _config(constructor)
    nodes = int(cfg["n_nodes"][0])
    variants = {120: "LH", 166: "all", 94: "lungs"}
    if nodes not in variants:
        raise ValueError(f"n_nodes {nodes} is not a chest X-ray template (120 LH, 166 all organs, 94 lungs)")
    levels = {(6, 5): (-1, -2), (5, 4): (-2, -3), (4, 3): (-3, -4)}
    l1, l2 = int(cfg.get("l1", 6)), int(cfg.get("l2", 5))
    if (l1, l2) not in levels:
        raise ValueError(f"l1, l2 = {l1}, {l2}: the official code knows 6-5, 5-4 and 4-3")
    converted = convert_state_dict(state_dict)
    running = any(_RUNNING.search(k) for k in converted)
    kwargs = {"template": f"chest_xray:{variants[nodes]}", "input_size": int(cfg["inputsize"]),
              "latent_dim": int(cfg["latents"]), "filters": list(cfg["filters"]), "K": int(cfg["K"]),
              "window": list(cfg.get("window", (3, 3))), "skip_levels": levels[(l1, l2)], "lookup": "official",
              "norm_running_stats": running, "official_output": True}
    model = _create_hybridgnet(1, None, kwargs)
    return load_strict(model, converted, f"HybridGNet ({name}, {nodes} nodes, {l1}-{l2})")
