"""The ``karat`` suite of tools/benchmark.py on tiny models (CI-safe: seconds, CPU)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_karat  # noqa: E402
import benchmark  # noqa: E402

# test_karat at 128 px (N = 65 tokens, so that activations outweigh the weights) and a timm ViT of its size
TINY = {"tiny": ("test_karat", "vit_tiny_patch16_224", 8, 128, dict(embed_dim=32, depth=2, num_heads=2,
                                                                     mlp_ratio=2.0))}


def test_peak_step_bytes_follows_allocations_and_frees():
    def step():
        a = torch.ones(2**20)  # 4 MiB
        b = a * 2  # 8 MiB live
        del a
        c = b + 1  # 8 MiB live again, not 12
        return c.sum()

    assert abs(bench_karat.peak_step_bytes(step) - 8 * 2**20) < 1024


def test_karat_suite_rows_and_rendered_table():
    rows = bench_karat.bench_karat(TINY, reps=1)
    by = {r["setting"]: r for r in rows}
    assert list(by) == list(bench_karat.SETTINGS)
    vit, karat, plain, ckpt = by["ViT"], by["KArAt"], by["KArAt, plain autograd"], by["KArAt + grad checkpointing"]
    assert vit["params_m"] == by["ViT, explicit softmax"]["params_m"]  # the same timm model
    assert karat["params_m"] > vit["params_m"] and karat["held_mib"] == plain["held_mib"] == ckpt["held_mib"]
    # same weights, same logits; the memory-efficient path stores less than plain autograd, checkpointing less still
    assert karat["max_abs_diff_vs_plain"] < 1e-5 and plain["max_abs_diff_vs_plain"] == 0.0
    assert karat["loss0"] == plain["loss0"] or abs(karat["loss0"] - plain["loss0"]) < 1e-5
    assert ckpt["step_peak_mib"] <= karat["step_peak_mib"] < plain["step_peak_mib"]
    assert karat["memory_efficient"] and not plain["memory_efficient"] and ckpt["grad_checkpointing"]
    assert (karat["rank"], karat["order"], karat["mode"]) == (4, 2, "blockwise")
    text = bench_karat.render_karat(rows)
    assert text.startswith("## KArAt vs ViT (CPU training, fp32)")
    assert "| size | setting | batch | params M | step s | time ratio | held MiB | peak MiB | memory ratio |" in text
    table = [line for line in text.splitlines() if line.startswith("| tiny |")]
    assert len(table) == 5 and table[0].startswith("| tiny | ViT | 8 |")
    cells = [line.split(" | ") for line in table]
    assert cells[0][5] == "1.00x" and cells[0][8] == "1.00x"  # ratios to the ViT row
    mem_ratio = float(cells[3][8].rstrip("x"))  # plain autograd
    assert abs(mem_ratio - plain["peak_mib"] / vit["peak_mib"]) < 0.01
    assert "2.5-3x" in text and "memory_efficient=False" in text
    summary = next(line for line in text.splitlines() if line.startswith("- tiny: "))
    assert f"plain autograd {plain['peak_mib'] / vit['peak_mib']:.2f}x;" in summary
    doc = benchmark.replace_section(benchmark.HEADER, "karat", text)
    assert "<!-- begin karat -->" in doc and benchmark.section_of(doc, "karat").strip() == text.strip()
