"""Shifted-window blocks against MONAI's Swin (same weights) and against their own definitions."""

import math

import pytest
import torch
from monai.networks.nets import swin_unetr as monai_swin
from torch import nn

from attnseg.layers.swin import (
    MERGE_ORDERS,
    PatchEmbed,
    PatchMerging,
    SwinBlock,
    WindowAttention,
    clip_window,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _from_monai(state_dict: dict) -> dict:
    return {k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
            for k, v in state_dict.items() if not k.endswith("relative_position_index")}


@pytest.mark.parametrize("size, window", [((14, 21), (7, 7)), ((12, 9, 20), (4, 3, 5)), ((8, 8, 8), (4, 2, 8))])
def test_window_partition_round_trip_and_order(size, window):
    x = torch.randn(2, *size, 5)
    windows = window_partition(x, window)
    assert windows.shape == (2 * math.prod(n // w for n, w in zip(size, window)), math.prod(window), 5)
    assert torch.equal(windows, monai_swin.window_partition(x, window))
    assert torch.equal(window_reverse(windows, window, size), x)
    assert torch.equal(windows[0, 1], x[(0, *([0] * (len(size) - 1)), 1)])  # row-major inside the first window


@pytest.mark.parametrize("size, window, shift", [((14, 14), (7, 7), (3, 3)), ((14, 21, 7), (7, 7, 7), (3, 3, 0)),
                                                 ((8, 8, 8), (4, 4, 4), (2, 2, 2)), ((12, 6), (6, 3), (3, 1))])
def test_shifted_window_mask_equals_monai(size, window, shift):
    mask = shifted_window_mask(size, window, shift)
    assert torch.equal(mask, monai_swin.compute_mask(list(size), window, shift, "cpu"))
    assert set(mask.unique().tolist()) == {0.0, -100.0}


def test_relative_position_index_is_query_minus_key():
    index = relative_position_index((3, 4))
    assert torch.equal(index, monai_swin.WindowAttention(8, 2, (3, 4)).relative_position_index)
    # query (1, 2) vs key (0, 3): offsets (+1, -1) -> row (1 + 2) * 7 + (-1 + 3)
    assert index[1 * 4 + 2, 0 * 4 + 3] == 3 * 7 + 2


def test_clip_window_unshifts_short_axes():
    assert clip_window((6, 20, 7), (7, 7, 7), (3, 3, 3)) == ((6, 7, 7), (0, 3, 0))


@pytest.mark.parametrize("n", [343, 100])
def test_window_attention_equals_monai_with_and_without_mask(n):
    torch.manual_seed(0)
    ref = monai_swin.WindowAttention(12, 3, (7, 7, 7), qkv_bias=True).eval()
    _perturb(ref)
    ours = WindowAttention(12, 3, (7, 7, 7)).eval()
    ours.load_state_dict(_from_monai(ref.state_dict()))
    x = torch.randn(16, n, 12)
    mask = monai_swin.compute_mask([14, 14, 14], (7, 7, 7), (3, 3, 3), "cpu")[:, :n, :n]
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x, None), atol=2e-6)
        assert torch.allclose(ours(x, mask), ref(x, mask), atol=2e-6)


@pytest.mark.parametrize("size", [(14, 14, 14), (10, 13, 9), (6, 20, 15), (16, 23)])
def test_swin_block_equals_monai_at_any_size(size):
    dims = len(size)
    torch.manual_seed(1)
    ref = monai_swin.SwinTransformerBlock(12, 3, (7,) * dims, (3,) * dims, qkv_bias=True).eval()
    _perturb(ref)
    ours = SwinBlock(12, 3, (7,) * dims, (3,) * dims).eval()
    ours.load_state_dict(_from_monai(ref.state_dict()))
    x = torch.randn(2, *size, 12)
    window, shift = monai_swin.get_window_size(size, (7,) * dims, (3,) * dims)
    padded = [-(-n // w) * w for n, w in zip(size, window)]
    mask = monai_swin.compute_mask(padded, window, shift, "cpu")
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x, mask), atol=5e-6)


def test_swin_block_mask_buffer_is_used_at_its_size_only():
    block = SwinBlock(8, 2, (4, 4), (2, 2), mask_size=(8, 8)).eval()
    plain = SwinBlock(8, 2, (4, 4), (2, 2)).eval()
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if k != "attn_mask"})
    assert block.attn_mask.shape == (4, 16, 16) and "attn_mask" in block.state_dict()
    x, y = torch.randn(1, 8, 8, 8), torch.randn(1, 12, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), plain(x))  # the stored mask is the computed one
        block.attn_mask.zero_()  # a checkpoint's mask is what the block uses at that size ...
        assert not torch.allclose(block(x), plain(x))
        assert torch.equal(block(y), plain(y))  # ... and other sizes compute their own


@pytest.mark.parametrize("order, monai_cls", [("current", monai_swin.PatchMerging), ("v2", monai_swin.PatchMergingV2)])
def test_patch_merging_3d_orders_equal_monai(order, monai_cls):
    ref = monai_cls(6, spatial_dims=3)
    _perturb(ref)
    ours = PatchMerging(6, spatial_dims=3, order=order)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 6, 7, 6)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-6)


def test_patch_merging_legacy_order_is_monai_1_4():
    ours = PatchMerging(3, spatial_dims=3, order="legacy")
    _perturb(ours)
    x = torch.randn(1, 4, 6, 2, 3)
    # MONAI 0.9-1.4 PatchMerging.forward, sub-grid by sub-grid: 010 and 001 twice, 110 and 011 never
    parts = [x[:, 0::2, 0::2, 0::2], x[:, 1::2, 0::2, 0::2], x[:, 0::2, 1::2, 0::2], x[:, 0::2, 0::2, 1::2],
             x[:, 1::2, 0::2, 1::2], x[:, 0::2, 1::2, 0::2], x[:, 0::2, 0::2, 1::2], x[:, 1::2, 1::2, 1::2]]
    with torch.no_grad():
        assert torch.equal(ours(x), ours.reduction(ours.norm(torch.cat(parts, -1))))
    assert {(1, 1, 0), (0, 1, 1)}.isdisjoint(MERGE_ORDERS["legacy"])


def test_patch_merging_2d_equals_monai_and_pads_odd_sizes():
    ref = monai_swin.PatchMergingV2(6, spatial_dims=2)
    _perturb(ref)
    ours = PatchMerging(6, spatial_dims=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 10, 6)
    with torch.no_grad():
        out = ours(x)
    assert out.shape == (2, 4, 5, 12)
    assert torch.allclose(out, ref(x), atol=1e-6)


@pytest.mark.parametrize("spatial_dims, size, norm", [(2, (10, 17), True), (3, (5, 8, 7), True), (2, (8, 8), False)])
def test_patch_embed_equals_monai_and_pads_the_far_side(spatial_dims, size, norm):
    from monai.networks.blocks.patchembedding import PatchEmbed as MonaiPatchEmbed

    ref = MonaiPatchEmbed(4, 3, 8, nn.LayerNorm if norm else None, spatial_dims)
    _perturb(ref)
    ours = PatchEmbed(3, 8, patch_size=4, spatial_dims=spatial_dims, norm=norm)
    ours.load_state_dict(ref.state_dict())  # same keys: proj.*, norm.*
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = ours(x)
    assert out.shape == (2, *(-(-n // 4) for n in size), 8)  # channels-last, ceil(S / 4)
    assert torch.allclose(out, ref(x).movedim(1, -1), atol=1e-6)
    # the last patch of each axis sees zeros beyond the input: it equals the embedding of the zero-padded image
    padded = torch.nn.functional.pad(x, [v for n in reversed(size) for v in (0, -n % 4)])
    assert torch.allclose(out, ours(padded), atol=1e-6)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        PatchEmbed(3, 8, 4, spatial_dims=1)
