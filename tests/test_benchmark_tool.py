import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_models  # noqa: E402
import benchmark  # noqa: E402


def test_replace_section_rewrites_only_its_own_block():
    doc = benchmark.HEADER
    doc = benchmark.replace_section(doc, "ops", "## CPU\nold cpu")
    doc = benchmark.replace_section(doc, "ops-gpu", "## GPU\ngpu rows")
    doc = benchmark.replace_section(doc, "ops", "## CPU\nnew cpu")
    assert "old cpu" not in doc and "new cpu" in doc and "gpu rows" in doc
    assert doc.index("new cpu") < doc.index("gpu rows")  # the block stays where it was
    assert doc.count("<!-- begin ops -->") == 1 and doc.startswith("# Benchmarks")


def test_ideal_bytes_counts_each_tensor_once():
    shape = (2, 8, 8, 4, 32)  # 512 query rows of 32 values per tensor
    rows = 2 * 8 * 8 * 4
    assert benchmark.ideal_bytes(shape, 2, backward=False) == 4 * rows * 32 * 2 + 4 * rows
    assert benchmark.ideal_bytes(shape, 2, backward=True) == 12 * rows * 32 * 2 + 12 * rows


def test_docs_benchmarks_has_the_cpu_section_and_its_targets():
    text = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    assert "<!-- begin ops -->" in text and "<!-- end ops -->" in text
    assert "2D k7 forward <= 10 ms" in text


def test_official_nat_modules_hold_each_variant():
    # classification/{nat,dinat,dinats,isotropic}.py of SHI-Labs/Neighborhood-Attention-Transformer
    expected = {"nat_mini": "nat", "nat_base": "nat", "dinat_small": "dinat", "dinat_s_small": "dinats",
                "dinat_large": "dinat", "dinat_s_large": "dinats", "nat_isotropic_small": "isotropic",
                "dinat_isotropic_base": "isotropic", "vitrpb_small": "isotropic"}
    assert {name: bench_models.official_nat_module(name) for name in expected} == expected
    assert set(expected) <= set(bench_models.VARIANTS["nat"])


def test_unfold_fallback_has_natten_clamped_window_semantics():
    """The official OverLoCK reference runs on this op: it must be na2d_av, not an approximation."""
    import bench_backbones_ii
    import torch

    from attnseg.ops import na2d_av

    g = torch.Generator().manual_seed(0)
    for kernel, (h, w) in ((5, (9, 7)), (13, (14, 15))):
        attn = torch.randn(2, 3, h, w, kernel**2, generator=g, dtype=torch.float64).softmax(-1)
        value = torch.randn(2, 3, h, w, 4, generator=g, dtype=torch.float64)
        expected = na2d_av(attn, value, kernel)
        torch.testing.assert_close(bench_backbones_ii.unfold_na2d_av(attn, value, kernel), expected)


def test_backbones_ii_report_checks_the_issue_targets():
    import bench_backbones_ii

    rows = [{"model": "transnext_micro", "ours_ips": 12.0, "ref_ips": 10.0, "ours_mib": 300.0, "ref_mib": 320.0,
             "reps": 10}, {"model": "overlock_xt", "ours_ips": 9.0, "ref_ips": 10.0, "reps": 10}]
    agg = [{"kernel": 13, "side": 14, "ours_ms": 1.0, "unfold_ms": 3.0, "max_abs_diff": 1e-7},
           {"kernel": 17, "side": 32, "ours_ms": 2.0, "unfold_ms": 3.0, "max_abs_diff": 1e-7}]
    text = bench_backbones_ii.render_backbones_ii(rows, agg)
    assert "- transnext_micro: 1.20x (>= 1.0x required): met" in text
    assert "- overlock_xt: 0.90x (>= 1.0x required): NOT met" in text
    assert "- aggregation 13x13 on 14x14: 3.00x (>= 2x required): met" in text
    assert "- aggregation 17x17 on 32x32: 1.50x (>= 2x required): NOT met" in text


def test_models_rows_survive_a_rerun_of_other_families():
    rows = [{"family": "halonet", "model": "halonet26t", "size": 256, "reference": "timm", "ours_ips": 2.0,
             "ref_ips": 1.0, "reps": 3, "run": "day 1"},
            {"family": "nat", "model": "nat_mini", "size": 224, "reference": "official code", "ours_ips": 1.0,
             "ref_ips": 2.0, "reps": 3, "run": "day 1"}]
    doc = benchmark.replace_section(benchmark.HEADER, "models", bench_models.render_models(rows))
    assert "- nat_mini: 0.50x (>= 1.0x required): NOT met" in doc
    stored = bench_models.stored_rows(benchmark.section_of(doc, "models"))
    assert stored == rows
    rerun = [{**rows[1], "ours_ips": 3.0, "run": "day 2"}]
    merged = bench_models.merge_rows(stored, rerun)
    assert [(r["model"], r["run"]) for r in merged] == [("halonet26t", "day 1"), ("nat_mini", "day 2")]
    text = bench_models.render_models(merged)
    assert "- nat_mini: 1.50x (>= 1.0x required): met" in text and "halonet: day 1; nat: day 2" in text


def test_sparsifiner_flops_count_the_kept_pairs_and_the_report_checks_the_target():
    import bench_sparsifiner

    dense, sparse = bench_sparsifiner.build_pair("sparsifiner_deit_tiny")
    one = bench_sparsifiner.layer_inputs(sparse, batch=1)
    flops = bench_sparsifiner.layer_flops(dense, sparse, one)
    H, N, d, C, budget = 3, 197, 64, 192, 50
    assert one["indices"].shape == (1, H, N - 1, budget)
    assert flops["core_dense"] == 2 * 2 * H * N * N * d  # QK^T and AV, 2 FLOPs a multiply-add
    assert flops["core_sparse"] == 2 * 2 * H * (N + (N - 1) * budget) * d  # the cls query keeps every key
    assert flops["projections"] == 2 * N * C * (3 * C + C)
    c, K = d // 2, N // 6  # the predictor: q, k to c channels, keys to K tokens, coefficients, coef @ U
    assert flops["predictor"] == 2 * H * (2 * N * d * c + c * N * K + N * c * K + (N - 1) * K * N)
    layer_ms = {"dense SDPA": 10.0, "sparse csr": 20.0, "predictor": 30.0, "predictor's top-k selection": 25.0,
                "MHSA dense (timm)": 40.0, "MHSA Sparsifiner (csr)": 80.0}
    share = bench_sparsifiner.token_share(12, 0.7, (3, 6, 9), 196)
    assert share == pytest.approx((4 * 197 + 3 * 139 + 3 * 98 + 2 * 69) / (12 * 197))  # ceil(0.7**j * 196) + cls
    row = {"variant": "sparsifiner_deit_tiny", "dense": "deit_tiny_patch16_224", "batch": 32, "depth": 12,
           "tokens": 197, "budget": 50, "flops": flops, "layer_ms": layer_ms,
           "images_per_s": {"dense": 100.0, "sparse": 50.0, "dense pruned": 150.0, "sparse pruned": 90.0},
           "core_share": 0.12, "amdahl_bound": 1 / 0.88,
           "token_pruning": {"keep_rate": 0.7, "loc": (3, 6, 9), "token_share": share}}
    text = bench_sparsifiner.render_sparsifiner([row])
    assert "| attention core (QK^T, AV) | 29.8 M | 7.7 M | 0.26 |" in text
    assert "| MHSA Sparsifiner (csr) | 80.0 | 0.50x |" in text and "| sparse csr | 20.0 | 0.50x |" in text
    assert "Whole-model speedup (attention sparsity, the released configuration): 0.50x; target >= 1.2x: NOT met." \
        in text and "at most 1.14x faster" in text
    assert "| sparsifiner_deit_tiny (csr) + token pruning | 90.0 |" in text
    assert "0.70 after block 3, 0.49 after block 6, 0.34 after block 9" in text
    assert "0.90x dense DeiT (target NOT met)" in text and "dense DeiT alone gives 1.50x" in text
    assert "the combined model is 0.60x" in text and "top-50-of-197 selection per query (25.0 ms" in text


def test_dense_token_pruning_reference_is_timms_deit_without_pruning_and_keeps_the_cls_attended_patches():
    import bench_sparsifiner

    dense, _ = bench_sparsifiner.build_pair("sparsifiner_deit_tiny")
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = dense(images)
        torch.testing.assert_close(bench_sparsifiner.dense_token_pruned(dense, images, keep_rate=1.0), reference,
                                   atol=1e-5, rtol=1e-5)
        # pruning after the last block drops patches the head never reads: the logits are unchanged
        torch.testing.assert_close(bench_sparsifiner.dense_token_pruned(dense, images, 0.5, (11,)), reference,
                                   atol=1e-5, rtol=1e-5)
        pruned = bench_sparsifiner.dense_token_pruned(dense, images, 0.5, (2,))
    assert pruned.shape == reference.shape and not torch.allclose(pruned, reference, atol=1e-3)
