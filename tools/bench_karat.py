"""The ``karat`` suite of ``tools/benchmark.py``: KArAt against a softmax ViT of the same size, CPU training.

For each size (ViT-T, ViT-S at 224 px, patch 16, N = 197 tokens) the same training step (forward, cross-entropy,
backward, AdamW step) runs on:

- ``ViT``: timm's ``vit_*_patch16_224`` (random init, nothing downloaded), its default attention
  (``F.scaled_dot_product_attention``, which keeps no N x N weights for the backward pass on the CPU);
- ``ViT, explicit softmax``: the same with ``fused_attn = False`` (stores the N x N probabilities, as the unfused
  attention of the paper's era does);
- ``KArAt``: attnseg's ``karat_vit_*`` (Fourier G3B, r = 12) on the memory-efficient path (:func:`kan_phi` and
  ``Phi @ (W^T V)``);
- ``KArAt, plain autograd``: ``memory_efficient=False`` on every operator (the implementation before the
  memory-efficient path: autograd stores the basis features);
- ``KArAt + grad checkpointing``: the memory-efficient path with ``set_grad_checkpointing()`` (whole blocks
  recomputed).

Time: median seconds of a step over ``reps`` steps after one warm-up, the models taking turns step by step (so
that a load on the machine falls on all of them). Memory: the peak of live tensor memory during one steady-state
step (after the warm-up step, so the AdamW state exists), from the allocation and free events of
``torch.profiler`` (``profile_memory=True``) in the order they happen, plus the memory held before the step
(weights and AdamW state); allocator caches, the interpreter and oneDNN scratch buffers are not counted.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

MIB = 2**20
PAPER_RATIO = "2.5-3x (ViT-T G3: 2.94 GB -> 7.48 GB at batch 32, 224 px, GPU)"
# size: (KArAt factory, timm ViT with the same embed dim, depth, heads and MLP ratio, batch, image side, extra timm
# kwargs making the ViT match the KArAt model)
PAIRS: dict[str, tuple[str, str, int, int, dict[str, Any]]] = {
    "ViT-T": ("karat_vit_tiny", "vit_tiny_patch16_224", 8, 224, {}),
    "ViT-S": ("karat_vit_small", "vit_small_patch16_224", 4, 224, {}),
}
SETTINGS = ("ViT", "ViT, explicit softmax", "KArAt", "KArAt, plain autograd", "KArAt + grad checkpointing")


def build(pair: tuple[str, str, int, int, dict[str, Any]], setting: str, num_classes: int = 1000,
          seed: int = 0) -> nn.Module:
    """The model of ``setting`` (one of :data:`SETTINGS`) for ``pair`` (a value of :data:`PAIRS`), seeded."""
    karat_name, vit_name, _, img_size, vit_kwargs = pair
    torch.manual_seed(seed)
    if setting.startswith("ViT"):
        import timm

        model = timm.create_model(vit_name, pretrained=False, num_classes=num_classes, img_size=img_size,
                                  **vit_kwargs)
        if setting == "ViT, explicit softmax":
            for module in model.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False
        return model
    from attnseg.backbones.karat import KArAtOperator
    from attnseg.registry import BACKBONES

    model = BACKBONES.get(karat_name)(num_classes=num_classes, img_size=img_size)
    if setting == "KArAt, plain autograd":
        for module in model.modules():
            if isinstance(module, KArAtOperator):
                module.memory_efficient = False
    if setting == "KArAt + grad checkpointing":
        model.set_grad_checkpointing()
    return model


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """A training step (forward, cross-entropy, backward, AdamW) on the fixed batch ``x [B, 3, H, W]``, ``y [B]``;
    it returns the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> float:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def held_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the weights, buffers and optimizer state (what a step starts from)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_step_bytes(step: Callable[[], Any]) -> int:
    """The largest growth of live tensor memory during one call of ``step`` over the memory at its start, from the
    profiler's allocation (+) and free (-) events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def bench_karat(pairs: dict[str, tuple[str, str, int, int, dict[str, Any]]] | None = None,
                settings: Sequence[str] = SETTINGS, reps: int = 3) -> list[dict[str, Any]]:
    """One row per (size, setting) of ``pairs`` (default :data:`PAIRS`): ``step_s`` (median), ``held_mib``,
    ``step_peak_mib``, ``peak_mib`` (their sum); KArAt rows also carry the operator settings and the largest logit
    difference to the plain-autograd KArAt."""
    rows = []
    for size, pair in (pairs or PAIRS).items():
        B, img_size = pair[2], pair[3]
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(B, 3, img_size, img_size, generator=gen), torch.randint(0, 10, (B,), generator=gen)
        models = {s: build(pair, s) for s in settings}
        steps = {s: make_step(m, x, y) for s, m in models.items()}
        out = {s: {"size": size, "setting": s, "batch": B, "img_size": img_size, "reps": reps,
                   "params_m": sum(p.numel() for p in models[s].parameters()) / 1e6} for s in settings}
        with torch.no_grad():  # the memory-efficient and plain KArAt paths: the same logits from the same weights
            logits = {s: models[s].eval()(x) for s in settings if s.startswith("KArAt")}
        for s in logits:
            models[s].train()
            if "KArAt, plain autograd" in logits:
                out[s]["max_abs_diff_vs_plain"] = float((logits[s] - logits["KArAt, plain autograd"]).abs().max())
        for s in settings:  # the warm-up step (it creates the AdamW state), then one profiled step
            out[s]["loss0"] = steps[s]()
            out[s]["held_mib"] = held_bytes(models[s], steps[s].optimizer) / MIB
            out[s]["step_peak_mib"] = peak_step_bytes(steps[s]) / MIB
            out[s]["peak_mib"] = out[s]["held_mib"] + out[s]["step_peak_mib"]
        times: dict[str, list[float]] = {s: [] for s in settings}
        for _ in range(reps):
            for s in settings:
                t0 = time.perf_counter()
                steps[s]()
                times[s].append(time.perf_counter() - t0)
        for s in settings:
            out[s]["step_s"] = statistics.median(times[s])
            if s.startswith("KArAt"):
                op = _first_operator(models[s])
                out[s].update(rank=op.rank, order=op.basis.order, row_chunk=op.row_chunk,
                              memory_efficient=op.memory_efficient, mode=models[s].mode,
                              grad_checkpointing=models[s].grad_checkpointing)
            rows.append(out[s])
            print(json.dumps(out[s]), flush=True)
        del models, steps
    return rows


def _first_operator(model: nn.Module) -> Any:
    from attnseg.backbones.karat import KArAtOperator

    return next(m for m in model.modules() if isinstance(m, KArAtOperator))


def _chunk_elements() -> str:
    from attnseg.backbones import karat

    return f"2^{karat._CHUNK_ELEMENTS.bit_length() - 1}"


def render_karat(rows: list[dict[str, Any]]) -> str:
    """The markdown section of ``rows`` (from :func:`bench_karat`): a table with the ratios to the ViT row of the
    same size, the settings, and what is measured."""
    karat = next((r for r in rows if r["setting"].startswith("KArAt")), {})
    lines = [
        "## KArAt vs ViT (CPU training, fp32)",
        "",
        "Generated by `python tools/benchmark.py karat` (tools/bench_karat.py); every row comes from the same run, "
        "which may be re-run on an idle machine (the times depend on the load). "
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"One training step = forward, cross-entropy, backward, AdamW step on a fixed batch at "
        f"{rows[0]['img_size'] if rows else '?'} px (N = 197 tokens at 224). KArAt: Fourier G{karat.get('order', '?')}"
        f"{'B' if karat.get('mode') == 'blockwise' else 'U'}, r = {karat.get('rank', '?')}, row_chunk = "
        f"{karat.get('row_chunk')} (None: the memory-efficient path takes as many query rows at a time as keep a "
        f"chunk's features under {_chunk_elements()} elements), random weights; the baseline is timm's ViT of the "
        "same embed dim, depth, heads and MLP ratio.",
        "",
        "Seconds: median over the reps column's steps after one warm-up step, the models taking turns step by step. "
        "Memory: peak of live tensor memory in one steady-state step (torch.profiler allocation/free events in time "
        "order) plus what the step starts from (weights and AdamW state, the \"held\" column); allocator caches, "
        "the interpreter and oneDNN scratch buffers are not counted. \"ViT\" is timm's default attention (SDPA, "
        "which stores no N x N weights); \"explicit softmax\" stores the probabilities. \"plain autograd\" is "
        "KArAt without the memory-efficient path (`memory_efficient=False`: the basis features are stored), i.e. "
        "the implementation before it. Ratios are to the \"ViT\" row of the same size.",
        "",
        "| size | setting | batch | params M | step s | time ratio | held MiB | peak MiB | memory ratio | "
        "step peak MiB (activations, grads) | activation ratio | reps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["size"]: r for r in rows if r["setting"] == "ViT"}

    def ratio(r: dict[str, Any], key: str) -> str:
        b = base.get(r["size"], {}).get(key)
        return f"{r[key] / b:.2f}x" if b else "–"

    for r in rows:
        lines.append(f"| {r['size']} | {r['setting']} | {r['batch']} | {r['params_m']:.2f} | {r['step_s']:.2f} | "
                     f"{ratio(r, 'step_s')} | {r['held_mib']:.0f} | {r['peak_mib']:.0f} | {ratio(r, 'peak_mib')} | "
                     f"{r['step_peak_mib']:.0f} | {ratio(r, 'step_peak_mib')} | {r['reps']} |")
    lines += ["", f"The paper reports KArAt at {PAPER_RATIO} the training memory of the softmax ViT. Here, "
              "KArAt / ViT (peak memory; step time):", ""]
    by = {(r["size"], r["setting"]): r for r in rows}
    for size, vit in base.items():
        parts = []
        for setting, label in (("KArAt", "memory-efficient (default)"), ("KArAt, plain autograd", "plain autograd"),
                               ("KArAt + grad checkpointing", "memory-efficient + grad checkpointing")):
            if (size, setting) in by:
                r = by[size, setting]
                parts.append(f"{label} {r['peak_mib'] / vit['peak_mib']:.2f}x; {r['step_s'] / vit['step_s']:.2f}x")
        lines.append(f"- {size}: " + " | ".join(parts))
    lines.append("")
    for r in rows:
        if "max_abs_diff_vs_plain" in r and r["setting"] != "KArAt, plain autograd":
            lines.append(f"- {r['size']} {r['setting']}: largest logit difference to the plain-autograd KArAt (same "
                         f"weights, eval mode): {r['max_abs_diff_vs_plain']:.1e}")
    lines.append("")
    return "\n".join(lines)
