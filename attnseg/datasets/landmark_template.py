"""Landmark templates: which closed contours (organs) a landmark file holds, and the graph HybridGNet decodes on.

A template is data (JSON or YAML), not architecture, so other anatomies plug in without code (reference
heads.md §6.5). The file lists the organs **in node order** (the order of the points in a landmark file):

.. code-block:: json

    {"name": "chest_xray",
     "organs": [{"name": "right_lung", "num_points": 44, "label": 1, "draw_order": 0}, ...],
     "labels": {"0": "background", "1": "lungs", "2": "heart", "3": "clavicles"},
     "variants": {"all": ["right_lung", ...], "LH": ["right_lung", "left_lung", "heart"]},
     "default_variant": "all"}

- ``num_points`` (>= 3): contour points of the organ; each organ is a closed contour (a ring).
- ``label`` (>= 1): value of the organ in rasterized label maps (organs may share a label: both lungs are 1);
  ``labels`` names each value (0 is the background).
- ``draw_order``: rasterization order (ties: node order); a later organ overwrites an earlier one where they
  overlap (HybridGNet's ``getSeg`` draws lungs, then the heart, then the clavicles).
- ``variants`` (optional): named subsets of the organs, kept in file order. A landmark file may hold every organ
  of the template (the full layout) and a model may use a variant: :meth:`LandmarkTemplate.select` takes the
  variant's points out of a full-layout array (HybridGNet's LH model reads the first 120 of JSRT's 166 points).

Shipped templates (``attnseg/datasets/templates``): ``chest_xray`` with variants ``all`` (166 nodes: right lung 44,
left lung 50, heart 26, right and left clavicle 23 each; labels lungs 1, heart 2, clavicles 3), ``LH`` (120: lungs
and heart, the published 2-IGSC model) and ``lungs`` (94). Name one as ``"chest_xray"`` (its default variant) or
``"chest_xray:LH"``, or give a path (``"path/to/hand.json"``, ``"path/to/hand.yaml:fingers"``).

Graph (exactly HybridGNet's ``utils/utils.py``, ``genMatrixes*``), per organ of ``N`` nodes and ``M = ceil(N/2)``:

- ``A`` (``N x N`` blocks): ring adjacency, node ``i`` linked to ``i - 1`` and ``i + 1 (mod N)``;
- ``AD`` (``M x M`` blocks): the ring of the pooled organ;
- ``D`` (``M x N``): pooled node ``i`` is the mean of nodes ``2i`` and ``2i + 1`` (a copy of ``2i`` when ``2i + 1 = N``);
- ``U`` (``N x M``): node ``i`` copies pooled node ``i // 2`` when ``i`` is even or ``i // 2`` is the last pooled
  node, else it is the mean of pooled nodes ``i // 2`` and ``i // 2 + 1`` (no wrap-around).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnseg.errors import ConfigError
from attnseg.registry import suggest

__all__ = ["Organ", "LandmarkTemplate", "load_template", "shipped_templates"]

_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class Organ:
    """One closed contour of a template: nodes ``start .. start + num_points - 1`` of the template's graph."""

    name: str
    num_points: int
    label: int
    draw_order: int
    start: int

    @property
    def nodes(self) -> slice:
        """The organ's node slice in the template's node order."""
        return slice(self.start, self.start + self.num_points)

    @property
    def pooled_points(self) -> int:
        """Nodes of the organ on the pooled graph, ``ceil(num_points / 2)``."""
        return math.ceil(self.num_points / 2)


@dataclass(frozen=True)
class LandmarkTemplate:
    """Organs (closed contours) in node order, their labels, and the graph matrices built from them.

    Attributes:
        name: ``"<template>:<variant>"`` (e.g. ``"chest_xray:LH"``).
        organs: the organs of this variant in node order (``start`` counts within this variant).
        label_names: ``{label value: name}``, 0 the background.
        full_layout: ``(name, num_points)`` of every organ of the template file, in file order: the layout of a
            landmark file that holds all organs (see :meth:`select`).
    """

    name: str
    organs: tuple[Organ, ...]
    label_names: dict[int, str]
    full_layout: tuple[tuple[str, int], ...] = field(default=())

    # -- sizes and names --------------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return sum(o.num_points for o in self.organs)

    @property
    def num_pooled_nodes(self) -> int:
        return sum(o.pooled_points for o in self.organs)

    @property
    def num_classes(self) -> int:
        """Classes of the rasterized label maps: the largest label + 1 (background 0 included)."""
        return max(o.label for o in self.organs) + 1

    @property
    def class_names(self) -> list[str]:
        return [self.label_names.get(v, "background" if v == 0 else f"label{v}") for v in range(self.num_classes)]

    @property
    def full_num_nodes(self) -> int:
        return sum(n for _, n in self.full_layout) if self.full_layout else self.num_nodes

    def organ(self, name: str) -> Organ:
        for o in self.organs:
            if o.name == name:
                return o
        names = [o.name for o in self.organs]
        raise KeyError(f"template {self.name} has no organ {name!r}{suggest(name, names)} (organs: {names})")

    def draw_sequence(self) -> list[Organ]:
        """The organs in rasterization order (``draw_order``, then node order)."""
        return [o for _, o in sorted(enumerate(self.organs), key=lambda p: (p[1].draw_order, p[0]))]

    # -- graph matrices (dense float32; HybridGNet utils/utils.py) -------------------------------------------
    def _blocks(self, make, pooled_rows: bool, pooled_cols: bool) -> torch.Tensor:
        rows = [o.pooled_points if pooled_rows else o.num_points for o in self.organs]
        cols = [o.pooled_points if pooled_cols else o.num_points for o in self.organs]
        out = np.zeros((sum(rows), sum(cols)))
        r = c = 0
        for o, nr, nc in zip(self.organs, rows, cols):
            out[r:r + nr, c:c + nc] = make(o.num_points)
            r, c = r + nr, c + nc
        return torch.from_numpy(out).float()

    def adjacency(self) -> torch.Tensor:
        """``A`` ``[N, N]``: one ring per organ."""
        return self._blocks(_ring, False, False)

    def pooled_adjacency(self) -> torch.Tensor:
        """``AD`` ``[M, M]``: one ring per pooled organ."""
        return self._blocks(lambda n: _ring(math.ceil(n / 2)), True, True)

    def downsample(self) -> torch.Tensor:
        """``D`` ``[M, N]``: mean of node pairs (used by the loss on the first skip positions)."""
        return self._blocks(_down, True, False)

    def upsample(self) -> torch.Tensor:
        """``U`` ``[N, M]``: the decoder's unpooling."""
        return self._blocks(_up, False, True)

    # -- landmark arrays ---------------------------------------------------------------------------------------
    def select(self, points: np.ndarray | torch.Tensor, where: str = "landmarks") -> Any:
        """This variant's points from ``[P, 2]`` points in this variant's layout (returned as they are) or in the
        template file's full layout (the variant's organs are taken out).

        Raises:
            ValueError: naming ``where`` when ``P`` fits neither layout.
        """
        n = points.shape[0]
        if n == self.num_nodes:
            return points
        if self.full_layout and n == self.full_num_nodes:
            starts, s = {}, 0
            for name, k in self.full_layout:
                starts[name] = s
                s += k
            idx = np.concatenate([np.arange(starts[o.name], starts[o.name] + o.num_points) for o in self.organs])
            return points[torch.from_numpy(idx)] if isinstance(points, torch.Tensor) else points[idx]
        full = f" or {self.full_num_nodes} (all organs of the template)" if self.full_layout else ""
        raise ValueError(f"{where}: {n} points, but template {self.name} needs {self.num_nodes}{full} "
                         f"(organs {', '.join(f'{o.name} {o.num_points}' for o in self.organs)})")

    def describe(self) -> list[dict[str, Any]]:
        """Plain data for inference tools: ``[{"name", "nodes": [start, stop], "label", "label_name"}]``."""
        return [{"name": o.name, "nodes": [o.nodes.start, o.nodes.stop], "label": o.label,
                 "label_name": self.label_names.get(o.label, f"label{o.label}")} for o in self.organs]


def _ring(n: int) -> np.ndarray:
    sub = np.zeros((n, n))
    for i in range(n):
        sub[i, i - 1] = 1
        sub[i, (i + 1) % n] = 1
    return sub


def _down(n: int) -> np.ndarray:
    m = math.ceil(n / 2)
    sub = np.zeros((m, n))
    for i in range(m):
        if 2 * i + 1 == n:
            sub[i, 2 * i] = 1
        else:
            sub[i, 2 * i] = sub[i, 2 * i + 1] = 0.5
    return sub


def _up(n: int) -> np.ndarray:
    m = math.ceil(n / 2)
    sub = np.zeros((n, m))
    for i in range(n):
        if i % 2 == 0 or i // 2 + 1 == m:
            sub[i, i // 2] = 1
        else:
            sub[i, i // 2] = sub[i, i // 2 + 1] = 0.5
    return sub


# -- loading ------------------------------------------------------------------------------------------------------


def shipped_templates() -> list[str]:
    """Names of the templates shipped with attnseg."""
    folder = resources.files("attnseg.datasets") / "templates"
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith(_SUFFIXES))


def _read(path: Path | Any, where: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read the template file: {e}") from None
    try:
        if str(path.name).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - json and yaml raise different types; both become one message
        raise ConfigError(f"{where}: not valid {'JSON' if str(path.name).endswith('.json') else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a template is a mapping with 'organs' (and optional 'labels', 'variants'), got "
                          f"{type(data).__name__}")
    return data


def _resolve(spec: str) -> tuple[Any, str, str | None]:
    """``(file, where, variant)`` of a template spec: a shipped name or a path, with an optional ``:variant``."""
    candidates = [(spec, None)]
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        candidates.append((head, tail))
    for name, variant in candidates:
        p = Path(name).expanduser()
        if p.suffix.lower() in _SUFFIXES:
            if p.is_file():
                return p, str(p), variant
            continue
        folder = resources.files("attnseg.datasets") / "templates"
        for suffix in _SUFFIXES:
            f = folder / f"{name}{suffix}"
            if f.is_file():
                return f, f"shipped template '{name}'", variant
    paths = [c for c, _ in candidates if Path(c).suffix.lower() in _SUFFIXES]
    if paths:
        raise ConfigError(f"landmark template file not found: {paths[0]}")
    names = shipped_templates()
    base = candidates[-1][0]
    raise ConfigError(f"unknown landmark template '{spec}'{suggest(base, names)}: give a shipped name ({', '.join(names)}"
                      f", optionally with ':variant') or a .json/.yaml path")


def load_template(spec: str | Path | LandmarkTemplate | dict[str, Any], variant: str | None = None) -> LandmarkTemplate:
    """A :class:`LandmarkTemplate` from a shipped name, a path or a mapping (see the module docstring).

    Args:
        spec: ``"chest_xray"``, ``"chest_xray:LH"``, ``"path/to/template.json[:variant]"``, a template mapping, or
            a template (returned as it is when no variant is asked).
        variant: a variant name; overrides one given in ``spec``.

    Raises:
        ConfigError: naming the file and the problem (unknown name or variant, bad organ entries).

    Example::

        >>> t = load_template("chest_xray:LH")
        >>> t.num_nodes, t.num_pooled_nodes, t.num_classes, [o.name for o in t.organs]
        (120, 60, 3, ['right_lung', 'left_lung', 'heart'])
    """
    if isinstance(spec, LandmarkTemplate):
        if variant is None:
            return spec
        spec = spec.name.split(":", 1)[0]
    if isinstance(spec, dict):
        data, where, named_variant = spec, "template mapping", None
    else:
        path, where, named_variant = _resolve(str(spec))
        data = _read(path, where)
    return _from_data(data, where, variant if variant is not None else named_variant)


def _from_data(data: dict[str, Any], where: str, variant: str | None) -> LandmarkTemplate:
    unknown = sorted(set(data) - {"name", "description", "source", "organs", "labels", "variants", "default_variant"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (allowed: name, description, source, organs, labels, "
                          "variants, default_variant)")
    organs = data.get("organs")
    if not isinstance(organs, list) or not organs:
        raise ConfigError(f"{where}: 'organs' must be a non-empty list of {{name, num_points, label, draw_order}}")
    parsed: list[dict[str, Any]] = []
    for i, o in enumerate(organs):
        if not isinstance(o, dict):
            raise ConfigError(f"{where}: organs[{i}] must be a mapping, got {o!r}")
        extra = sorted(set(o) - {"name", "num_points", "label", "draw_order"})
        if extra:
            raise ConfigError(f"{where}: organs[{i}] has unknown keys {extra} (allowed: name, num_points, label, "
                              "draw_order)")
        name, n, label = o.get("name"), o.get("num_points"), o.get("label", 1)
        order = o.get("draw_order", i)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: organs[{i}].name must be a non-empty string, got {name!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 3:
            raise ConfigError(f"{where}: organs[{i}] ({name}): num_points must be an int >= 3 (a closed contour), "
                              f"got {n!r}")
        if not isinstance(label, int) or isinstance(label, bool) or not 1 <= label <= 255:
            raise ConfigError(f"{where}: organs[{i}] ({name}): label must be an int in 1..255 (0 is the "
                              f"background), got {label!r}")
        if not isinstance(order, int) or isinstance(order, bool):
            raise ConfigError(f"{where}: organs[{i}] ({name}): draw_order must be an int, got {order!r}")
        parsed.append({"name": name, "num_points": n, "label": label, "draw_order": order})
    names = [o["name"] for o in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: organ names must be unique, {dupes} repeat")
    labels_raw = data.get("labels", {}) or {}
    if not isinstance(labels_raw, dict):
        raise ConfigError(f"{where}: 'labels' must map label values to names, got {labels_raw!r}")
    try:
        label_names = {int(k): str(v) for k, v in labels_raw.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: 'labels' keys must be label values (integers), got {list(labels_raw)}") from None
    variants = data.get("variants", {}) or {}
    if not isinstance(variants, dict) or not all(isinstance(v, list) for v in variants.values()):
        raise ConfigError(f"{where}: 'variants' must map names to lists of organ names")
    variant = variant if variant is not None else data.get("default_variant")
    chosen = names
    if variant is not None:
        if variant not in variants:
            known = sorted(variants)
            raise ConfigError(f"{where}: no variant '{variant}'{suggest(variant, known)} (variants: {known or 'none'})")
        chosen = variants[variant]
        bad = [n for n in chosen if n not in names]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise ConfigError(f"{where}: variant '{variant}' must list distinct organs of the template, got {chosen} "
                              f"(organs: {names})")
        chosen = [n for n in names if n in chosen]  # file (node) order
    base = str(data.get("name") or Path(where).stem)
    out, start = [], 0
    by_name = {o["name"]: o for o in parsed}
    for n in chosen:
        o = by_name[n]
        out.append(Organ(o["name"], o["num_points"], o["label"], o["draw_order"], start))
        start += o["num_points"]
    return LandmarkTemplate(name=f"{base}:{variant}" if variant is not None else base, organs=tuple(out),
                            label_names=label_names, full_layout=tuple((o["name"], o["num_points"]) for o in parsed))
