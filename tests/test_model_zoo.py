"""tools/gen_model_zoo.py: parameter and FLOP counts, rendering, merging, and that docs/model_zoo.md is current."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gen_model_zoo as zoo  # noqa: E402

from attnseg.registry import BACKBONES  # noqa: E402


def test_count_params_is_the_sum_of_numel_with_shared_tensors_once():
    model = BACKBONES.get("test_mambaout")(num_classes=10)
    assert zoo.count_params(model) == sum(p.numel() for p in model.parameters())
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert zoo.count_params(tied) == 16


def test_flops_of_conv_and_linear_equal_the_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    flops, info = zoo.count_flops(model, torch.randn(1, 3, 5, 5))
    conv = 2 * (3 * 3 * 3) * 8 * 5 * 5  # a multiply-add per kernel tap, per output channel and pixel
    linear = 2 * 200 * 10
    assert flops == conv + linear == 14800
    assert info["na_calls"] == 0


def test_sdpa_is_counted_on_the_math_kernel():
    class Attn(nn.Module):
        def forward(self, x):
            return nn.functional.scaled_dot_product_attention(x, x, x)

    flops, _ = zoo.count_flops(Attn(), torch.randn(1, 2, 64, 16))
    assert flops == 2 * (2 * 2 * 64 * 64 * 16)  # q k^T and attn v, each 2 * heads * N * N * d


def test_neighborhood_attention_is_counted_analytically_on_cpu_and_meta():
    from attnseg.ops import NeighborhoodAttention2D

    na = NeighborhoodAttention2D(dim=16, num_heads=2, kernel_size=3).eval()
    x = torch.randn(1, 6, 6, 16)
    flops, info = zoo.count_flops(na, x)
    linears = 2 * 36 * 16 * 48 + 2 * 36 * 16 * 16  # qkv and proj
    attention = 2 * 2 * 36 * 9 * (8 + 8)  # heads, queries, kernel^2 keys, d_qk + d_v
    assert (flops, info["na_calls"]) == (linears + attention, 1)
    with torch.device("meta"):
        meta = NeighborhoodAttention2D(dim=16, num_heads=2, kernel_size=3).eval()
    assert zoo.count_flops(meta, torch.empty(1, 6, 6, 16, device="meta"))[0] == flops


def test_test_vit_flops_on_meta_equal_cpu():
    build = lambda: BACKBONES.get("test_sparsifiner")(num_classes=10)  # noqa: E731
    meta_flops, meta_info = zoo.measure_flops(build, (3, 112, 112))
    cpu_flops, _ = zoo.count_flops(build().eval(), torch.randn(1, 3, 112, 112))
    assert meta_info["device"] == "meta" and meta_flops == cpu_flops > 0


def test_render_lists_rows_and_stores_them():
    rows = [
        {"family": "mambaout", "model": "mambaout_femto", "kind": "backbone", "input": [3, 224, 224], "classes": 1000,
         "params": 7_300_000, "params_no_head": 6_800_000, "flops": 2_200_000_000, "checkpoints": ["mambaout_femto.pth"],
         "license": "apache-2.0", "paper": "2405.07992", "na_calls": 0, "ips": 12.5, "reps": 3, "run": "r"},
        {"family": "heads", "model": "unetr", "kind": "head", "input": [3, 224, 224], "encoder": "mambaout_femto",
         "params": 10_000_000, "params_head": 3_000_000, "flops": 5_000_000_000, "flops_head": 1_000_000_000,
         "run": "r"},
    ]
    text = zoo.render(rows, machine="test machine")
    assert "| `mambaout_femto` | 3x224x224 | 7.30 | 6.80 | 2.20 | `mambaout_femto.pth` |" in text
    assert "| 12.50 (3) |" in text
    assert "| `unetr` | mambaout_femto | 10.00 | 3.00 | 5.00 | 1.00 | swin_unetr |" in text
    assert "test machine" in text
    assert zoo.stored_rows(text) == rows


def test_merge_replaces_families_and_keeps_throughput():
    old = [{"family": "nat", "model": "nat_mini", "ips": 3.0, "reps": 2},
           {"family": "resnet", "model": "resnet18", "ips": 9.0, "reps": 3}]
    new = [{"family": "nat", "model": "nat_mini", "flops": 1}]
    merged = zoo.merge(old, new)
    assert [r["model"] for r in merged] == ["resnet18", "nat_mini"]  # FAMILY_ORDER: resnet first
    assert merged[1] == {"family": "nat", "model": "nat_mini", "flops": 1, "ips": 3.0, "reps": 2}


def test_parity_cell_names_fixture_tolerance_and_tests():
    if zoo._fixture_path("nat_tiny_cfg.pt") is None:
        pytest.skip("parity fixtures not available")
    cell = zoo.parity_of("nat_mini", "nat")
    assert cell == "`nat_tiny_cfg.pt` (atol 5e-05, rtol 1e-05; `test_nat.py`)"
    assert zoo.parity_of("resnet18", "resnet").startswith("torchvision / timm")


def test_every_fixture_in_the_parity_table_is_used_by_a_test():
    assert all(zoo.tests_using(fixture) for _, fixture in zoo.PARITY)


def test_docs_model_zoo_lists_every_registered_backbone():
    doc = REPO / "docs" / "model_zoo.md"
    rows = {r["model"] for r in zoo.stored_rows(doc.read_text())}
    backbones = {n for n in BACKBONES.names() if not n.startswith("test_")}
    missing = sorted(backbones - rows)
    assert not missing, f"docs/model_zoo.md lacks {missing}: run python tools/gen_model_zoo.py --families <family>"
    for name in backbones:
        assert f"| `{name}` |" in doc.read_text()


def test_docs_model_zoo_lists_every_published_model_and_head():
    from attnseg.registry import HEADS, MODELS

    rows = {(r["kind"], r["model"]) for r in zoo.stored_rows((REPO / "docs" / "model_zoo.md").read_text())}
    expected = {("model", n) for n in MODELS.names() if not n.startswith("test_")} | {("head", n) for n in HEADS.names()}
    assert not sorted(expected - rows), "run python tools/gen_model_zoo.py --families models heads"


def test_gflops_limits_decide_what_is_timed(monkeypatch):
    monkeypatch.setattr(zoo, "MAX_GFLOPS", 10.0)
    big, small = {"flops": 20_000_000_000}, {"flops": 2_000_000_000}
    assert not zoo._wants_throughput(big, True) and big["ips_skipped"] == "> 10 GFLOPs, not timed"
    assert zoo._wants_throughput(small, True) and not zoo._wants_throughput(small, False)
    monkeypatch.setattr(zoo, "MIN_GFLOPS", 5.0)
    assert not zoo._wants_throughput(small, True) and "ips_skipped" not in small  # keeps its stored images/s
