"""The ``models`` suite of ``tools/benchmark.py``: CPU inference of the backbones against their references.

For each variant, side by side in one run: attnseg's model and the reference implementation (timm for
HaloNet; the official code for BiFormer and NAT/DiNAT, from a local checkout given by ``--biformer-repo`` /
``--nat-repo``; it is imported, never copied), both in eval mode with the same random weights where the
layouts agree. Reported: images per second (median over repetitions, batch ``BATCH``) and the peak memory of a
fresh process running one inference (RSS growth). The official BiFormer code needs ``einops`` (and imports
``fairscale`` only for an unused wrapper, stubbed here); the official NAT code needs NATTEN 0.14.5-0.17.5.
"""

from __future__ import annotations

import importlib
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BATCH = 4
VARIANTS = {
    "halonet": ["halonet26t", "sehalonet33ts", "halonet50ts", "eca_halonext26ts", "haloregnetz_b", "halonet_h1"],
    "biformer": ["biformer_tiny", "biformer_small", "biformer_base"],
    "nat": ["nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base",
            "dinat_large", "dinat_s_tiny", "dinat_s_small", "dinat_s_base", "dinat_s_large", "nat_isotropic_small",
            "dinat_isotropic_small", "vitrpb_small", "nat_isotropic_base", "dinat_isotropic_base", "vitrpb_base"],
}


# Dense-prediction rows: (variant, input size, constructor overrides shared by both implementations). BiFormer at
# 512 with n_win 8 is the official segmentation setting, where the official gather copies keys/values top-k fold.
DENSE = {"biformer": [("biformer_small", 512, {"n_win": 8})]}


# rayleizhu/BiFormer models/biformer.py: biformer_small's arguments (for rows that override one of them)
_OFFICIAL_BIFORMER_ARGS = {"biformer_small": dict(
    depth=[4, 4, 18, 4], embed_dim=[64, 128, 256, 512], mlp_ratios=[3, 3, 3, 3], n_win=7,
    kv_downsample_mode="identity", kv_per_wins=[-1, -1, -1, -1], topks=[1, 4, 16, -2], side_dwconv=5,
    before_attn_dwconv=3, layer_scale_init_value=-1, qk_dims=[64, 128, 256, 512], head_dim=32, param_routing=False,
    diff_routing=False, soft_routing=False, pre_norm=True, pe=None)}


def input_size(name: str) -> int:
    """224, except timm's block-8 HaloNets, which only run at multiples of 256."""
    return 256 if name.startswith(("halo", "sehalo", "eca_halo")) and name != "haloregnetz_b" else 224


def build(kind: str, name: str, repo: str | None = None, **overrides: Any) -> torch.nn.Module:
    """``kind``: ``attnseg``, ``timm`` or ``official`` (BiFormer or NAT code at ``repo``); ``overrides`` go to both."""
    if kind == "attnseg":
        from attnseg.registry import BACKBONES

        return BACKBONES.get(name)(num_classes=1000, **overrides).eval()
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, img_size=input_size(name)).eval()
    if repo is None:
        raise ValueError(f"the official {name} needs the path of a local checkout")
    sys.path.insert(0, repo)
    if name.startswith("biformer"):
        fairscale = types.ModuleType("fairscale")  # only checkpoint_wrapper is imported, and unused at inference
        fairscale.nn = types.ModuleType("fairscale.nn")
        fairscale.nn.checkpoint = types.ModuleType("fairscale.nn.checkpoint")
        fairscale.nn.checkpoint.checkpoint_wrapper = lambda m, *a, **k: m
        sys.modules.update({"fairscale": fairscale, "fairscale.nn": fairscale.nn,
                            "fairscale.nn.checkpoint": fairscale.nn.checkpoint})
        module = importlib.import_module("models.biformer")
        if overrides:  # the official factories fix n_win; build the class with the factory's arguments instead
            return module.BiFormer(**{**_OFFICIAL_BIFORMER_ARGS[name], **overrides}).eval()
        return getattr(module, name)(pretrained=False).eval()
    sys.path.insert(0, str(Path(repo) / "classification"))
    module = importlib.import_module(official_nat_module(name))
    return getattr(module, name)(pretrained=False, **overrides).eval()


def official_nat_module(name: str) -> str:
    """The module of the official NAT code (``classification/<module>.py``) that defines the factory ``name``."""
    if "isotropic" in name or name.startswith("vitrpb"):
        return "isotropic"
    if name.startswith("dinat_s_"):  # not "dinat_s": dinat_small is a DiNAT
        return "dinats"
    return "dinat" if name.startswith("dinat") else "nat"


def reference_of(name: str, biformer_repo: str | None, nat_repo: str | None) -> tuple[str, str | None, str | None]:
    """``(kind, repo, reason it cannot run)`` of the reference for ``name``."""
    if name.startswith(("halo", "sehalo", "eca_halo")):
        return "timm", None, None
    if name.startswith("biformer"):
        if biformer_repo is None:
            return "official", None, "pass --biformer-repo PATH (a checkout of rayleizhu/BiFormer)"
        try:
            importlib.import_module("einops")
        except ImportError:
            return "official", biformer_repo, "the official BiFormer code needs einops"
        return "official", biformer_repo, None
    if nat_repo is None:
        return "official", None, "pass --nat-repo PATH (a checkout of SHI-Labs/Neighborhood-Attention-Transformer)"
    try:
        natten = importlib.import_module("natten")
    except ImportError:
        return "official", nat_repo, "the official NAT code needs NATTEN 0.14.5-0.17.5 (not installed)"
    if not hasattr(natten, "NeighborhoodAttention2D"):
        return "official", nat_repo, f"natten {getattr(natten, '__version__', '?')} lacks the 0.17 API the official code uses"
    return "official", nat_repo, None


def images_per_second(models: list[torch.nn.Module], size: int, reps: int = 10, warmup: int = 3,
                      budget_s: float = 240.0, min_s: float = 40.0) -> tuple[list[float], int]:
    """Batch ``BATCH`` inference throughput of each model: ``([median images/s per model], reps)``.

    The models take turns, one call each per repetition, so that a change in machine speed during the run (these
    are shared VMs) affects all of them alike and the ratios stay comparable. Fast models get more repetitions,
    enough for ``min_s`` seconds of rounds (10 calls of a 0.2 s model are at the mercy of one busy moment). When a
    round takes longer than ``budget_s / reps`` (the official NAT code on NATTEN's CPU kernels) there are fewer,
    at least 3.
    """
    x = torch.randn(BATCH, 3, size, size)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        round_s = 0.0
        for model in models:
            t0 = time.perf_counter()
            model(x)
            round_s += time.perf_counter() - t0
        if round_s * reps > budget_s:
            reps, warmup = max(3, int(budget_s / round_s)), 1
        elif round_s * reps < min_s:
            reps = int(min_s / round_s)
        for i in range(reps + warmup - 1):
            for j, model in enumerate(models):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup - 1:
                    times[j].append(time.perf_counter() - t0)
    return [BATCH / statistics.median(t) for t in times], reps


def peak_mib(kind: str, name: str, repo: str | None, size: int | None = None,
             overrides: dict[str, Any] | None = None, builder: str = "bench_models") -> float | None:
    """RSS growth of a fresh process building the model (by ``build`` of the module ``builder``) and running one
    inference (weights included)."""
    size = size or input_size(name)
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(REPO / 'tools')!r})\n"
        "from benchmark import rss_kib\n"
        f"from {builder} import build, BATCH\n"
        f"x = torch.randn(BATCH, 3, {size}, {size})\n"
        "base = rss_kib(reset_peak=True)\n"
        f"model = build({kind!r}, {name!r}, {repo!r}, **{overrides or {}!r})\n"
        "with torch.inference_mode():\n"
        "    model(x)\n"
        "print((rss_kib(peak=True) - base) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=REPO)
    return float(proc.stdout.split()[-1]) if proc.returncode == 0 else None


def bench_models(families: list[str], biformer_repo: str | None, nat_repo: str | None) -> list[dict[str, Any]]:
    import json

    rows = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # names the run in the report
    for family in families:
        cases = [(name, input_size(name), {}) for name in VARIANTS[family]] + DENSE.get(family, [])
        for name, size, overrides in cases:
            label = name + "".join(f" {k}={v}" for k, v in overrides.items())
            row: dict[str, Any] = {"family": family, "model": label, "size": size, "run": started}
            ours = build("attnseg", name, **overrides)
            kind, repo, reason = reference_of(name, biformer_repo, nat_repo)
            row["reference"] = "timm 1.0.31" if kind == "timm" else "official code"
            reference = None
            if reason:
                row["note"] = reason
            else:
                try:
                    reference = build(kind, name, repo, **overrides)
                    with torch.inference_mode():  # fails early if the reference cannot run at all
                        reference(torch.randn(1, 3, size, size))
                except Exception as err:  # a reference that fails is reported, not fatal
                    row["note"] = f"reference failed: {type(err).__name__}: {str(err).splitlines()[0][:90]}"
                    reference = None
            ips, row["reps"] = images_per_second([ours] if reference is None else [ours, reference], size)
            row["ours_ips"] = ips[0]
            row["ours_mib"] = peak_mib("attnseg", name, None, size, overrides)
            if reference is not None:
                row["ref_ips"] = ips[1]
                row["ref_mib"] = peak_mib(kind, name, repo, size, overrides)
            del ours, reference
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


ROWS_MARK = "<!-- models-rows: "


def stored_rows(section: str) -> list[dict[str, Any]]:
    """The raw rows a previous :func:`render_models` stored in its section (empty if none)."""
    import json

    for line in section.splitlines():
        if line.startswith(ROWS_MARK) and line.endswith(" -->"):
            return json.loads(line[len(ROWS_MARK):-4])
    return []


def merge_rows(previous: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``new`` rows replace the previous rows of their families; the others are kept; family order of VARIANTS."""
    rerun = {r["family"] for r in new}
    rows = [r for r in previous if r["family"] not in rerun] + new
    order = list(VARIANTS)
    return sorted(rows, key=lambda r: order.index(r["family"]) if r["family"] in order else len(order))


def render_models(rows: list[dict[str, Any]]) -> str:
    import json
    import platform

    lines = [
        "## Backbones (CPU inference, fp32)",
        "",
        "Generated by `python tools/benchmark.py models`; both sides of a row are measured in the same run, and "
        "`--families` reruns some families and keeps the others' rows (runs: "
        + "; ".join(f"{fam}: {', '.join(sorted({r.get('run', '?') for r in rows if r['family'] == fam}))}"
                    for fam in dict.fromkeys(r["family"] for r in rows)) + "). "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Batch {BATCH}, eval mode, images/s = median over the reps column's runs after warm-up, attnseg and the "
        "reference taking turns call by call (so a change in machine speed during the run affects both alike); "
        "peak = RSS growth of a fresh process building "
        "the model and running one batch. HaloNet runs at 256 (timm's block-8 models only accept multiples of 256); "
        "the 512 BiFormer row is the official segmentation setting (n_win 8).",
        "",
        "| model | input | attnseg img/s | reference | reference img/s | speed ratio | attnseg peak MiB | "
        "reference peak MiB | reps | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x: Any, spec: str = ".1f") -> str:
        return format(x, spec) if isinstance(x, float) else "–"

    for r in rows:
        ratio = f"{r['ours_ips'] / r['ref_ips']:.2f}x" if r.get("ref_ips") else "–"
        lines.append(f"| {r['model']} | {r['size']} | {fmt(r['ours_ips'])} | {r['reference']} | {fmt(r.get('ref_ips'))} "
                     f"| {ratio} | {fmt(r.get('ours_mib'), '.0f')} | {fmt(r.get('ref_mib'), '.0f')} | "
                     f"{r.get('reps', '–')} | {r.get('note', '')} |")
    lines += ["", "Targets from issue 4, checked against the rows above:", ""]
    for r in rows:
        if not r.get("ref_ips"):
            continue
        ratio = r["ours_ips"] / r["ref_ips"]
        want = 1.3 if r["family"] == "biformer" else 1.0
        ok = ratio >= want
        if r["family"] == "biformer" and r.get("ours_mib") and r.get("ref_mib"):
            ok = ok and r["ours_mib"] < r["ref_mib"]
            extra = f", peak {r['ours_mib']:.0f} vs {r['ref_mib']:.0f} MiB (lower required)"
        else:
            extra = ""
        lines.append(f"- {r['model']}: {ratio:.2f}x (>= {want}x required){extra}: {'met' if ok else 'NOT met'}")
    lines += ["", ROWS_MARK + json.dumps(rows) + " -->", ""]
    return "\n".join(lines)
