"""The ``models-ii`` suite of ``tools/benchmark.py``: TransNeXt and OverLoCK against their official code, and
OverLoCK's ContMix aggregation against the official pure-PyTorch (unfold) fallback.

Backbones, side by side in one run (the timing and memory method of :mod:`bench_models`): attnseg's model and the
official model from a local checkout (``--transnext-repo``: DaiShiResearch/TransNeXt, its PyTorch-native aggregated
attention, the path it takes without the ``swattention`` CUDA extension; ``--overlock-repo``: LMMMEng/OverLoCK, whose
``models/overlock.py`` imports ``natten.functional.na2d_av``: that import is served here by the unfold formulation
of the repository's own fallback in ``models/contmix.py``, i.e. OverLoCK without natten). The checkouts are
imported, never copied. Modules the official code imports but inference never uses (``pkg_resources``,
``mmengine``'s checkpoint loader) are stubbed.

Aggregation rows: ``attnseg.backbones.overlock.aggregate`` (the op ContMix runs, NATTEN's clamped windows) against
:func:`unfold_na2d_av` at the two large-kernel sizes of the issue, forward only, batch x groups x channels of
OverLoCK-T's stage 3.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_models import BATCH, images_per_second, peak_mib  # noqa: F401  (BATCH: peak_mib's child imports it here)

VARIANTS = {
    "transnext": ["transnext_micro", "transnext_tiny", "transnext_small", "transnext_base"],
    "overlock": ["overlock_xt", "overlock_t", "overlock_s", "overlock_b"],
}
AGGREGATION_CASES = [(13, 14), (13, 28), (17, 18), (17, 36)]  # (kernel, map side): stage-3 maps at 224 and 448


def unfold_na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, **_: Any) -> torch.Tensor:
    """``na2d_av`` by unfold: the formulation of the OverLoCK repository's fallback (``models/contmix.py``).

    Valid windows are unfolded (``[B, G*D*K*K, H-K+1, W-K+1]``), then the window grid is replicate-padded by
    ``K // 2``, which gives every query NATTEN's clamped window; ``attn [B, G, H, W, K*K]``, ``value [B, G, H, W, D]``.
    """
    b, g, h, w, d = value.shape
    pad = kernel_size // 2
    v = value.permute(0, 1, 4, 2, 3).reshape(b, g * d, h, w)
    v = F.unfold(v, kernel_size=kernel_size).reshape(b, g * d * kernel_size**2, h - 2 * pad, w - 2 * pad)
    v = F.pad(v, (pad, pad, pad, pad), mode="replicate").reshape(b, g, d, kernel_size**2, h, w)
    return torch.einsum("bghwk,bgdkhw->bghwd", attn, v)


def _stub_official_imports() -> None:
    """Modules the official code imports at module level but never uses at inference."""
    pkg = types.ModuleType("pkg_resources")

    class DistributionNotFound(Exception):
        pass

    def get_distribution(name: str) -> None:
        raise DistributionNotFound(name)

    pkg.DistributionNotFound, pkg.get_distribution = DistributionNotFound, get_distribution
    mmengine = types.ModuleType("mmengine")
    mmengine.runner = types.ModuleType("mmengine.runner")
    mmengine.runner.load_checkpoint = lambda *a, **k: None
    natten = types.ModuleType("natten")
    natten.functional = types.ModuleType("natten.functional")
    natten.functional.na2d_av = unfold_na2d_av
    sys.modules.update({"pkg_resources": pkg, "mmengine": mmengine, "mmengine.runner": mmengine.runner,
                        "natten": natten, "natten.functional": natten.functional})


def build(kind: str, name: str, repo: str | None = None, **overrides: Any) -> torch.nn.Module:
    """``kind``: ``attnseg`` or ``official`` (TransNeXt or OverLoCK code at ``repo``)."""
    if kind == "attnseg":
        from attnseg.registry import BACKBONES

        return BACKBONES.get(name)(num_classes=1000, **overrides).eval()
    if repo is None:
        raise ValueError(f"the official {name} needs the path of a local checkout")
    _stub_official_imports()
    if name.startswith("transnext"):
        sys.path.insert(0, str(Path(repo) / "classification"))
        module = importlib.import_module("transnext")
    else:
        sys.path.insert(0, repo)
        module = importlib.import_module("models.overlock")
    return getattr(module, name)(pretrained=False, **overrides).eval()


def reference_of(name: str, transnext_repo: str | None, overlock_repo: str | None) -> tuple[str | None, str | None]:
    """``(repo, reason it cannot run)`` of the official code for ``name``."""
    if name.startswith("transnext"):
        return transnext_repo, None if transnext_repo else "pass --transnext-repo PATH (DaiShiResearch/TransNeXt)"
    for module in ("einops", "timm"):
        try:
            importlib.import_module(module)
        except ImportError:
            return overlock_repo, f"the official OverLoCK code needs {module}"
    return overlock_repo, None if overlock_repo else "pass --overlock-repo PATH (LMMMEng/OverLoCK)"


def _peak(kind: str, name: str, repo: str | None) -> float | None:
    return peak_mib(kind, name, repo, 224, None, builder="bench_backbones_ii")


def bench_backbones(families: list[str], transnext_repo: str | None, overlock_repo: str | None
                    ) -> list[dict[str, Any]]:
    import json

    rows = []
    for family in families:
        for name in VARIANTS[family]:
            row: dict[str, Any] = {"family": family, "model": name, "size": 224, "reference": "official code"}
            ours = build("attnseg", name)
            repo, reason = reference_of(name, transnext_repo, overlock_repo)
            reference = None
            if reason:
                row["note"] = reason
            else:
                try:
                    reference = build("official", name, repo)
                    with torch.inference_mode():  # fails early if the reference cannot run at all
                        reference(torch.randn(1, 3, 224, 224))
                except Exception as err:  # a reference that fails is reported, not fatal
                    row["note"] = f"reference failed: {type(err).__name__}: {str(err).splitlines()[0][:90]}"
                    reference = None
            ips, row["reps"] = images_per_second([ours] if reference is None else [ours, reference], 224)
            row["ours_ips"] = ips[0]
            row["ours_mib"] = _peak("attnseg", name, None)
            if reference is not None:
                row["ref_ips"] = ips[1]
                row["ref_mib"] = _peak("official", name, repo)
            del ours, reference
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_aggregation(reps: int = 30) -> list[dict[str, Any]]:
    """Forward time of ContMix's aggregation, attnseg vs the unfold fallback, taking turns call by call."""
    import json

    from attnseg.backbones.overlock import aggregate

    groups, dim = 8, 16  # OverLoCK-T stage 3: G = 8 groups of C/(2G) = 16 channels per kernel half
    rows = []
    for kernel, side in AGGREGATION_CASES:
        g = torch.Generator().manual_seed(0)
        attn = torch.randn(BATCH, groups, side, side, kernel**2, generator=g).softmax(-1)
        value = torch.randn(BATCH, groups, side, side, dim, generator=g)
        ours = aggregate(attn, value, kernel)
        ref = unfold_na2d_av(attn, value, kernel)
        error = float((ours - ref).abs().max())
        times: dict[str, list[float]] = {"ours": [], "unfold": []}
        with torch.inference_mode():
            for i in range(reps + 3):
                for key, fn in (("ours", aggregate), ("unfold", unfold_na2d_av)):
                    t0 = time.perf_counter()
                    fn(attn, value, kernel)
                    if i >= 3:
                        times[key].append(time.perf_counter() - t0)
        row = {"kernel": kernel, "side": side, "ours_ms": 1e3 * statistics.median(times["ours"]),
               "unfold_ms": 1e3 * statistics.median(times["unfold"]), "max_abs_diff": error}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def render_backbones_ii(rows: list[dict[str, Any]], aggregation: list[dict[str, Any]]) -> str:
    import platform

    lines = [
        "## Backbones II: TransNeXt and OverLoCK (CPU inference, fp32)",
        "",
        "Generated by `python tools/benchmark.py models-ii`; every row comes from the same run. "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Batch {BATCH} at 224, eval mode, images/s = median over the reps column's runs after warm-up, attnseg and "
        "the official code taking turns call by call; peak = RSS growth of a fresh process building the model and "
        "running one batch. The official TransNeXt runs its PyTorch-native aggregated attention (no `swattention`), "
        "the official OverLoCK its `na2d_av` by the repository's unfold fallback (no natten).",
        "",
        "| model | attnseg img/s | official img/s | speed ratio | attnseg peak MiB | official peak MiB | reps | note |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x: Any, spec: str = ".1f") -> str:
        return format(x, spec) if isinstance(x, float) else "–"

    for r in rows:
        ratio = f"{r['ours_ips'] / r['ref_ips']:.2f}x" if r.get("ref_ips") else "–"
        lines.append(f"| {r['model']} | {fmt(r['ours_ips'])} | {fmt(r.get('ref_ips'))} | {ratio} | "
                     f"{fmt(r.get('ours_mib'), '.0f')} | {fmt(r.get('ref_mib'), '.0f')} | {r.get('reps', '–')} | "
                     f"{r.get('note', '')} |")
    lines += ["", f"ContMix aggregation (forward, batch {BATCH}, 8 groups x 16 channels; median of 30 calls taking "
              "turns):", "", "| kernel | map | attnseg ms | unfold fallback ms | speed ratio | max abs diff |",
              "|---|---|---|---|---|---|"]
    for a in aggregation:
        lines.append(f"| {a['kernel']}x{a['kernel']} | {a['side']}x{a['side']} | {a['ours_ms']:.2f} | "
                     f"{a['unfold_ms']:.2f} | {a['unfold_ms'] / a['ours_ms']:.2f}x | {a['max_abs_diff']:.1e} |")
    lines += ["", "Targets from issue 7, checked against the rows above:", ""]
    for r in rows:
        if r.get("ref_ips"):
            ratio = r["ours_ips"] / r["ref_ips"]
            lines.append(f"- {r['model']}: {ratio:.2f}x (>= 1.0x required): {'met' if ratio >= 1.0 else 'NOT met'}")
    for a in aggregation:
        ratio = a["unfold_ms"] / a["ours_ms"]
        lines.append(f"- aggregation {a['kernel']}x{a['kernel']} on {a['side']}x{a['side']}: {ratio:.2f}x "
                     f"(>= 2x required): {'met' if ratio >= 2 else 'NOT met'}")
    lines.append("")
    return "\n".join(lines)
