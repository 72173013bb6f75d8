"""Fuzzed configs: random mutations of every shipped config (wrong types, missing and unknown keys, out-of-range
values, bad ``--set`` overrides) are either valid or refused with a ``ConfigError`` naming a key, never another
exception (which the command-line tools would show as a traceback)."""

from __future__ import annotations

import copy
import math
import os
import random
from pathlib import Path
from typing import Any

import pytest

from attnseg.config import apply_overrides, load_yaml_with_bases, validate_config
from attnseg.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))
MUTATIONS = int(os.environ.get("ATTNSEG_FUZZ_MUTATIONS", "30"))  # per config; more with the variable

ODD_VALUES = [None, True, False, 0, -1, -1e9, 1e18, 0.5, -0.0, math.nan, math.inf, -math.inf, "", "x", "-1",
              "null", "1e400", [], [1, "a"], [[]], {}, {"name": 3}, {"": None}, "../../etc/passwd", "a" * 300]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (dict keys and list indices) in ``node``."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _parent(data: Any, path: tuple) -> Any:
    for p in path[:-1]:
        data = data[p]
    return data


def _mutate(data: dict, rng: random.Random) -> str:
    """Apply one random mutation to ``data`` in place; returns what it did."""
    paths = _paths(data)
    path = rng.choice(paths)
    parent, key = _parent(data, path), path[-1]
    kind = rng.choice(["type", "delete", "unknown", "range", "swap"])
    if kind == "delete" and isinstance(parent, dict):
        del parent[key]
        return f"deleted {path}"
    if kind == "unknown":
        target = parent if isinstance(parent, dict) else data
        target[rng.choice(["colour", "lr_", "Name", "_base_", "num_classes ", "trainer"])] = copy.deepcopy(
            rng.choice(ODD_VALUES))
        return f"added a key beside {path}"
    old = parent[key]
    if kind == "range" and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = rng.choice([-old - 1, old * 1e6, 0, -1, math.nan, math.inf, 10**30])
    elif kind == "swap" and isinstance(parent, dict) and len(parent) > 1:
        other = rng.choice([k for k in parent if k != key])
        parent[key], parent[other] = parent[other], parent[key]
        return f"swapped {path} and {other!r}"
    else:
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    return f"set {path} to {parent[key]!r:.60}"


def _check(data: dict, what: str) -> None:
    try:
        validate_config(data)
    except ConfigError as e:
        assert str(e).strip(), what
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{what}: {type(e).__name__}: {e}")


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_mutated_configs_are_valid_or_refused_with_a_config_error(config):
    base = load_yaml_with_bases(config)
    validate_config(copy.deepcopy(base))  # the shipped config itself is valid
    rng = random.Random(f"{config.parent.name}/{config.stem}")
    for i in range(MUTATIONS):
        data = copy.deepcopy(base)
        done = [_mutate(data, rng) for _ in range(rng.choice([1, 1, 2, 3]))]
        _check(data, f"{config.name}, mutation {i}: {'; '.join(done)}")


OVERRIDES = ["trainer.max_epochs=abc", "model=3", "model.backbone=[1, 2]", "data.batch_size={a: 1}",
             "optimizer.lr=-1", "a.b.c.d=1", "data.dataset.image_size=[0, -3]", "trainer.devices=null",
             "model.backbone.name=", "=1", "noequals", "data..batch_size=2", "trainer.precision=15",
             "loss.name=[]", "model.head.feature_size=1e99", "data.augment.crop_size=[1, 2, 3, 4]",
             "evaluation.roi_size='a'", "trainer.checkpoint.save_top_k=-5", "data.batch_size=: :",
             "model.num_classes=0", "model.backbone.pretrained=/nonexistent/file.pth", "task=detection"]


@pytest.mark.parametrize("override", OVERRIDES)
def test_bad_overrides_are_config_errors(override):
    base = load_yaml_with_bases(CONFIGS[0])
    try:
        data = apply_overrides(base, [override])
    except ConfigError:
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"--set {override}: {type(e).__name__}: {e}")
    _check(data, f"--set {override}")


@pytest.mark.parametrize("text, message", [
    ("a: &x\n  b: *x\n", "'a.b' contains itself through a YAML alias"),
    ("l: &x [1, *x]\n", "'l.1' contains itself through a YAML alias"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     "more than 100000 entries once its YAML aliases are expanded"),
])
def test_yaml_aliases_that_recurse_or_explode_are_refused(tmp_path, text, message):
    from attnseg.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
