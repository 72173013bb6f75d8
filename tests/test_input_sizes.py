"""Every model family at random input sizes (issue 11): from below its minimum to twice its standard size, a
backbone runs (the right pyramid shapes) or raises an ``InputSizeError`` that names the size; a Segmentor runs at
any size (it pads) and returns logits of the input's size. The ``test_*`` variants run each family's code at a
fraction of the cost; the published variants differ in widths and depths only."""

from __future__ import annotations

import random

import pytest
import torch

from attnseg.backbones import pretrained_cfg
from attnseg.errors import InputSizeError
from attnseg.models.segmentor import Segmentor
from attnseg.registry import BACKBONES, HEADS, MODELS

TEST_BACKBONES = [n for n in BACKBONES.names() if n.startswith("test_")]
TEST_MODELS = [n for n in MODELS.names() if n.startswith("test_")]


def _standard_side(name: str) -> int:
    """The standard input side of ``name``'s family: a published variant's ``input_size`` from the same module."""
    module = BACKBONES.get(name).__module__
    for other in BACKBONES.names():
        if not other.startswith("test_") and BACKBONES.get(other).__module__ == module:
            try:
                return int(pretrained_cfg(other)["input_size"][-1])
            except KeyError:
                continue
    return 224


def _backbone(name: str) -> torch.nn.Module:
    kwargs = {"num_classes": 0} if "num_classes" in BACKBONES.parameters(name) else {}
    torch.manual_seed(0)
    return BACKBONES.get(name)(**kwargs).eval()


def _sizes(name: str, low: int, high: int, dims: int, n: int = 3) -> list[tuple[int, ...]]:
    rng = random.Random(name)
    return [tuple(rng.randint(low, high) for _ in range(dims)) for _ in range(n)]


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_backbone_runs_or_names_the_size(name):
    model = _backbone(name)
    dims = int(getattr(model, "spatial_dims", 2))
    chans = int(getattr(model, "in_chans", 3) or 3)
    std = _standard_side(name) if dims == 2 else 48  # 3D: Swin UNETR's 96^3 halved for CI time
    low = int(getattr(model, "min_input_size", None) or 1)
    strides = [int(f["reduction"]) for f in model.feature_info]
    ran = 0
    for size in [(max(low - 1, 1),) * dims, *_sizes(name, low, 2 * std, dims)]:
        x = torch.randn(1, chans, *size)
        try:
            with torch.no_grad():
                maps = model.forward_pyramid(x)
        except InputSizeError as e:
            message = str(e)
            assert any(str(s) in message for s in size) or "x".join(map(str, size)) in message, (size, message)
            continue
        ran += 1
        assert len(maps) == len(strides)
        for m, s in zip(maps, strides):
            # each level covers the input: ceil(side / stride) (backbones pad), or floor for unpadded convs
            assert all(abs(got - side / s) < 1 for got, side in zip(m.shape[2:], size)), (size, s, m.shape)
            assert torch.isfinite(m).all()
    assert ran >= 1, f"{name} ran at none of the sizes"


@pytest.mark.parametrize("name", TEST_BACKBONES)
def test_segmentor_runs_at_any_size(name):
    model = _backbone(name)
    dims = int(getattr(model, "spatial_dims", 2))
    chans = int(getattr(model, "in_chans", 3) or 3)
    info = model.feature_info
    head = HEADS.get("unetr")([f["num_chs"] for f in info], [f["reduction"] for f in info], num_classes=2,
                              feature_size=8, spatial_dims=dims, in_chans=chans)
    seg = Segmentor(model, head).eval()
    std = _standard_side(name) if dims == 2 else 48
    for size in [(1,) * dims, *_sizes(name + "/seg", 1, 2 * std, dims, n=2)]:
        try:
            with torch.no_grad():
                logits = seg(torch.randn(1, chans, *size))
        except InputSizeError as e:  # only the fixed-token families may refuse a size, and they say which
            assert "tokens" in str(e) or "built for" in str(e), (size, str(e))
            continue
        assert logits.shape == (1, 2, *size)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_published_model_runs_or_names_the_size(name):
    torch.manual_seed(0)
    model = MODELS.get(name)().eval()
    chans = int(getattr(model, "in_chans", None) or 3)
    for size in [(1, 1), (37, 53), *_sizes(name, 1, 256, 2, n=2)]:
        try:
            with torch.no_grad():
                out = model(torch.randn(1, chans, *size))
        except InputSizeError as e:
            assert "x".join(map(str, size)) in str(e) or str(list(size)) in str(e), (size, str(e))
            continue
        logits = out if torch.is_tensor(out) else out.get("logits", next(iter(out.values())))
        if logits.dim() == 4:
            assert tuple(logits.shape[2:]) == size
