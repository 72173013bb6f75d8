import sys
from pathlib import Path

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
