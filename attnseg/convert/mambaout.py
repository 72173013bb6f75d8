"""MambaOut: official (yuweihao/MambaOut @ 9f2f234) and timm 1.0.31 state_dicts -> attnseg's layout.

attnseg's layout is timm's, so timm checkpoints of the official variants load unchanged (their keys are
still checked); official ones are renamed by the table below, which is the mapping timm's
``checkpoint_filter_fn`` applies:

==============================================  ==============================================
official                                        attnseg / timm
==============================================  ==============================================
``downsample_layers.0.{conv1,norm1,conv2,norm2}``  ``stem.{conv1,norm1,conv2,norm2}``
``downsample_layers.{i}.{conv,norm}`` (i >= 1)  ``stages.{i}.downsample.{conv,norm}``
``stages.{i}.{j}.{norm,fc1,conv,fc2}``          ``stages.{i}.blocks.{j}.{norm,fc1,conv,fc2}``
``norm``                                        ``head.norm``
``head.fc1`` / ``head.norm`` / ``head.fc2``     ``head.pre_logits.fc`` / ``head.pre_logits.norm`` / ``head.fc``
==============================================  ==============================================

timm's ``*_rw`` variants (LayerScale ``ls.gamma``, norm-first downsampling, ``norm_mlp`` head) are other
networks and are refused. ``pyramid_norms.*`` (attnseg's dense-prediction norms) have no official
counterpart.
"""

from __future__ import annotations

import re
from typing import Any

from attnseg.backbones.mambaout import MambaOut
from attnseg.convert._strict import load_strict
from attnseg.errors import CheckpointError
from attnseg.registry import BACKBONES, suggest

__all__ = ["convert_state_dict", "to_official", "from_official", "is_official", "detect_layout"]

_P = r"(weight|bias)"
# (official key, attnseg key) as full-match regexes and replacements, one pair per row of the table above.
_OFFICIAL_TO_OURS: list[tuple[str, str]] = [
    (rf"downsample_layers\.0\.(conv1|norm1|conv2|norm2)\.{_P}", r"stem.\1.\2"),
    (rf"downsample_layers\.([1-9]\d*)\.(conv|norm)\.{_P}", r"stages.\1.downsample.\2.\3"),
    (rf"stages\.(\d+)\.(\d+)\.(norm|fc1|conv|fc2)\.{_P}", r"stages.\1.blocks.\2.\3.\4"),
    (rf"norm\.{_P}", r"head.norm.\1"),
    (rf"head\.fc1\.{_P}", r"head.pre_logits.fc.\1"),
    (rf"head\.norm\.{_P}", r"head.pre_logits.norm.\1"),
    (rf"head\.fc2\.{_P}", r"head.fc.\1"),
]
_OURS_TO_OFFICIAL: list[tuple[str, str]] = [
    (rf"stem\.(conv1|norm1|conv2|norm2)\.{_P}", r"downsample_layers.0.\1.\2"),
    (rf"stages\.([1-9]\d*)\.downsample\.(conv|norm)\.{_P}", r"downsample_layers.\1.\2.\3"),
    (rf"stages\.(\d+)\.blocks\.(\d+)\.(norm|fc1|conv|fc2)\.{_P}", r"stages.\1.\2.\3.\4"),
    (rf"head\.norm\.{_P}", r"norm.\1"),
    (rf"head\.pre_logits\.fc\.{_P}", r"head.fc1.\1"),
    (rf"head\.pre_logits\.norm\.{_P}", r"head.norm.\1"),
    (rf"head\.fc\.{_P}", r"head.fc2.\1"),
]
# Keys of attnseg's own layout that have no official counterpart.
_OURS_ONLY = [rf"pyramid_norms\.(\d+)\.{_P}"]

_OFFICIAL_MARK = re.compile(r"downsample_layers\.|stages\.\d+\.\d+\.")
_OURS_MARK = re.compile(r"stem\.|stages\.\d+\.(blocks|downsample)\.")


def detect_layout(state_dict: dict[str, Any]) -> str | None:
    """``"official"``, ``"attnseg"`` (which is timm's) or None when no key looks like a MambaOut key.

    Raises:
        CheckpointError: keys of both layouts in one state_dict.
    """
    official = any(_OFFICIAL_MARK.match(k) for k in state_dict)
    ours = any(_OURS_MARK.match(k) for k in state_dict)
    if official and ours:
        raise CheckpointError("the MambaOut state_dict mixes the official layout (downsample_layers.*, stages.i.j.*) "
                              "and timm's (stem.*, stages.i.blocks.j.*)")
    return "official" if official else "attnseg" if ours else None


def is_official(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` is in the official layout (the one :func:`convert_state_dict` renames)."""
    return detect_layout(state_dict) == "official"


def _rename(state_dict: dict[str, Any], rules: list[tuple[str, str]], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    unplaced: list[str] = []
    for key, value in state_dict.items():
        for pattern, repl in rules:
            m = re.fullmatch(pattern, key)
            if m:
                out[m.expand(repl)] = value
                break
        else:
            unplaced.append(key)
    if unplaced:
        hint = ""
        if any(re.search(r"(^|\.)ls\.gamma$", k) for k in unplaced):
            hint = " (LayerScale keys: a timm *_rw variant, which attnseg's MambaOut does not implement)"
        shown = ", ".join(unplaced[:10]) + (f", ... ({len(unplaced) - 10} more)" if len(unplaced) > 10 else "")
        raise CheckpointError(f"{len(unplaced)} key(s) of a {what} MambaOut state_dict have no place in attnseg's "
                              f"layout{hint}: {shown}")
    return out


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Official or timm MambaOut keys -> attnseg keys; every key must be placed.

    The official layout is renamed (module docstring); timm's and attnseg's are returned as they are after
    a check that every key belongs to the layout.

    Raises:
        CheckpointError: a key with no place (listed), mixed layouts, or no MambaOut key at all.
    """
    layout = detect_layout(state_dict)
    if layout is None:
        raise CheckpointError(f"not a MambaOut state_dict (no official or timm key); first keys: {list(state_dict)[:5]}")
    if layout == "official":
        return _rename(state_dict, _OFFICIAL_TO_OURS, "official")
    identity = [(p, r"\g<0>") for p, _ in _OURS_TO_OFFICIAL] + [(p, r"\g<0>") for p in _OURS_ONLY]
    return _rename(state_dict, identity, "timm/attnseg")


def to_official(state_dict: dict[str, Any]) -> dict[str, Any]:
    """attnseg (timm) MambaOut keys -> official keys, for use with the official code.

    Raises:
        CheckpointError: keys with no official counterpart, such as ``pyramid_norms.*``.
    """
    return _rename(state_dict, _OURS_TO_OFFICIAL, "attnseg")


# Official constructor arguments that map one-to-one onto MambaOut's; the official class and factories take
# the rest (layer classes, norm/act factories, head_fn) as objects, which a data-only record cannot hold.
_OFFICIAL_KWARGS = ("in_chans", "num_classes", "depths", "dims", "conv_ratio", "kernel_size", "drop_path_rate",
                    "head_dropout")
_FACTORIES = ("mambaout_femto", "mambaout_kobe", "mambaout_tiny", "mambaout_small", "mambaout_base")


def from_official(constructor: dict[str, Any], state_dict: dict[str, Any]) -> MambaOut:
    """Build attnseg's MambaOut for an official constructor record and load ``state_dict`` strictly.

    Args:
        constructor: ``{"name": "MambaOut" | "mambaout_tiny" | ..., "kwargs": {...}}``; the name may carry
            a module path (``"models/mambaout.py:MambaOut"``). A ``pretrained`` kwarg is ignored (the
            weights are ``state_dict``); ``depths``/``dims`` may be ints (one stage) as in the official code.
        state_dict: official (or timm) weights.

    Returns:
        The model in eval mode, without pyramid norms; ``forward`` returns the official logits.

    Raises:
        ValueError: an unknown constructor name or argument.
        CheckpointError: weights that do not fit (a key with no place, a missing key or another shape).
    """
    name = re.split(r"[:./]", str(constructor.get("name", "MambaOut")))[-1]
    kwargs = dict(constructor.get("kwargs") or {})
    kwargs.pop("pretrained", None)
    unknown = sorted(set(kwargs) - set(_OFFICIAL_KWARGS))
    if unknown:
        raise ValueError(f"official MambaOut arguments {unknown} are not supported (supported: "
                         f"{', '.join(_OFFICIAL_KWARGS)}; the official defaults are used for layer classes, norms, "
                         "activation and head)")
    for key in ("depths", "dims"):
        if isinstance(kwargs.get(key), int):
            kwargs[key] = [kwargs[key]]
    if kwargs.get("num_classes", 1000) == 0:
        raise ValueError("official MambaOut with num_classes=0 keeps a zero-width classifier; attnseg drops the head "
                         "instead: build MambaOut(num_classes=0) and load with attnseg.load_pretrained")
    if "depths" in kwargs:  # the official class takes any number of stages
        kwargs["out_indices"] = tuple(range(len(kwargs["depths"])))
    kwargs["pyramid_norm"] = False  # attnseg additions, absent from official weights
    if name == "MambaOut":
        model = MambaOut(**kwargs)
    elif name in _FACTORIES:
        model = BACKBONES.get(name)(**kwargs)
    else:
        choices = ("MambaOut", *_FACTORIES)
        raise ValueError(f"unknown official MambaOut constructor '{name}'{suggest(name, choices)} "
                         f"(known: {', '.join(choices)})")
    return load_strict(model, convert_state_dict(state_dict), f"official MambaOut weights do not fit {name}({kwargs})")
