"""The ``sparsifiner`` suite of ``tools/benchmark.py``: Sparsifiner against dense DeiT of the same size (CPU, fp32).

Issue 9 asks for MHSA FLOPs and measured CPU images/s at batch 32 with 50 of 197 keys kept per query, and for a
real wall-clock speedup (>= 1.2x). Everything below comes from one run, side by side:

- FLOPs, counted by ``torch.utils.flop_counter`` on the code that runs (one layer, one image; matmuls and SDPA,
  a multiply-add = 2 FLOPs): the attention core (``QK^T`` and ``AV``) of dense DeiT against Sparsifiner's core on
  the kept keys (the ``gather`` formulation, which counts exactly the kept pairs), the connectivity predictor
  (including its dense ``coef @ U`` reconstruction), and the projections every variant shares (``qkv``, ``proj``).
- Wall clock of one layer's attention at batch 32 (tensors of DeiT's shapes): dense SDPA, the sparse core through
  each ``attn_impl``, the predictor alone, and the whole MHSA module (dense timm ``Attention`` against
  :class:`~attnseg.backbones.sparsifiner.SparseAttention`).
- Whole-model images/s at batch 32: timm's ``deit_*_patch16_224`` against ``sparsifiner_deit_*`` carrying the same
  weights (its predictors random, as before phase 1; the mask pattern does not change the cost).
- Amdahl's bound: the share of dense DeiT's time spent in the attention core, and the model speedup if that core
  cost nothing at all.
- Token pruning (the official option, off in the released config; the paper combines it with attention sparsity):
  Sparsifiner with ``token_keep_rate`` 0.7 after blocks 3, 6 and 9 (DynamicViT's DeiT-S schedule), against the same
  pruning on dense DeiT (:func:`dense_token_pruned`: timm's blocks, cls-attention scores), which separates what
  pruning saves from what the sparse attention saves.

Callables take turns (one call each per repetition) so that a change in machine speed affects all of them alike.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

BATCH = 32
TOKEN_KEEP_RATE, TOKEN_PRUNING_LOC = 0.7, (3, 6, 9)  # DynamicViT's DeiT-S schedule
TIMM_OF = {"sparsifiner_deit_tiny": "deit_tiny_patch16_224", "sparsifiner_deit_small": "deit_small_patch16_224",
           "sparsifiner_deit_base": "deit_base_patch16_224"}


def take_turns(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of each callable, called in turn ``warmup + reps`` times."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs ``fn`` performs in matmuls, linear layers and SDPA (``torch.utils.flop_counter``; SDPA through its
    math backend, whose matmuls the counter sees: the fused CPU kernel is not counted)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def build_pair(variant: str, **sparse_kwargs: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(dense timm DeiT, Sparsifiner)`` of the same size and weights, in eval mode (random init, no download);
    ``sparse_kwargs`` go to the Sparsifiner factory (e.g. ``token_keep_rate``)."""
    import timm

    from attnseg.registry import BACKBONES

    torch.manual_seed(0)
    dense = timm.create_model(TIMM_OF[variant], pretrained=False).eval()
    sparse = BACKBONES.get(variant)(num_classes=1000, pyramid=False, **sparse_kwargs).eval()
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or any(".mask_predictor." not in k for k in missing):
        raise RuntimeError(f"timm {TIMM_OF[variant]} and {variant} disagree: {missing=} {unexpected=}")
    return dense, sparse


def dense_token_pruned(dense: torch.nn.Module, images: torch.Tensor, keep_rate: float = TOKEN_KEEP_RATE,
                       loc: tuple[int, ...] = TOKEN_PRUNING_LOC) -> torch.Tensor:
    """Logits ``[B, classes]`` of timm's dense DeiT with Sparsifiner's token pruning: after block ``loc[j]`` the
    ``ceil(keep_rate**(j+1) * patches)`` patches with the largest cls attention (mean over heads) stay, the others are
    dropped (:class:`~attnseg.backbones.sparsifiner.Sparsifiner` with ``token_keep_rate``, minus its sparse
    attention). The attention itself is timm's (SDPA); only the cls row's probabilities are computed again, for the
    scores. With ``keep_rate`` 1 it is timm's forward."""
    x = dense.norm_pre(dense._pos_embed(dense.patch_embed(images)))
    patches = x.shape[1] - 1
    rates = {i: keep_rate ** (j + 1) for j, i in enumerate(loc)} if keep_rate < 1 else {}
    for i, block in enumerate(dense.blocks):
        attn, y = block.attn, block.norm1(x)
        B, N, C = y.shape
        q, k, v = attn.qkv(y).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + block.drop_path1(block.ls1(attn.proj(out)))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        if i in rates:
            score = ((q[:, :, :1] @ k.transpose(-2, -1)) * attn.scale).softmax(-1)[:, :, 0, 1:].mean(1)  # [B, N-1]
            keep = score.topk(min(math.ceil(rates[i] * patches), N - 1), dim=-1)[1].sort(dim=-1)[0] + 1
            x = torch.cat([x[:, :1], x.gather(1, keep[..., None].expand(-1, -1, C))], dim=1)
    return dense.forward_head(dense.norm(x))


def layer_inputs(sparse: torch.nn.Module, batch: int) -> dict[str, Any]:
    """One layer's tensors at DeiT's 197 tokens: tokens ``x [B, N, C]``, ``q, k, v [B, heads, N, d]``, the kept
    ``indices [B, heads, N-1, budget]`` from the first layer's (random) predictor."""
    attn = sparse.blocks[0].attn
    torch.manual_seed(1)
    x = torch.randn(batch, 197, sparse.embed_dim)
    with torch.inference_mode():
        q, k, v = attn.qkv(x).reshape(batch, 197, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        aux = attn.mask_predictor(q, k, sparse.grid)
    return {"x": x, "q": q, "k": k, "v": v, "indices": aux["indices"], "mask": aux["attn_mask"], "scale": attn.scale,
            "approx_attn": aux["approx_attn"]}


def layer_flops(dense: torch.nn.Module, sparse: torch.nn.Module, one: dict[str, torch.Tensor]) -> dict[str, int]:
    """FLOPs of one image's attention in one layer (``one``: :func:`layer_inputs` of batch 1): ``core_dense``,
    ``core_sparse`` (kept keys only), ``predictor``, ``projections`` (qkv and proj) and ``model_dense`` (all of
    dense DeiT at 224)."""
    from attnseg.backbones.sparsifiner import sparse_attention_gather

    attn = sparse.blocks[0].attn
    q, k, v = one["q"], one["k"], one["v"]
    with torch.inference_mode():
        return {
            "core_dense": count_flops(lambda: F.scaled_dot_product_attention(q, k, v)),
            "core_sparse": count_flops(lambda: sparse_attention_gather(q, k, v, one["indices"], attn.scale)),
            "predictor": count_flops(lambda: attn.mask_predictor(q, k, sparse.grid, mask=False)),
            "projections": count_flops(lambda: attn.proj(attn.qkv(one["x"])[..., :sparse.embed_dim])),
            "model_dense": count_flops(lambda: dense(torch.randn(1, 3, 224, 224))),
        }


def bench_variant(variant: str, batch: int = BATCH, layer_reps: int = 10, model_reps: int = 5) -> dict[str, Any]:
    """One variant's row: FLOPs, per-layer milliseconds and whole-model images/s (see the module docstring)."""
    from attnseg.backbones.sparsifiner import (
        sparse_attention_csr,
        sparse_attention_gather,
        sparse_attention_masked,
    )

    dense, sparse = build_pair(variant)
    pruned = build_pair(variant, token_keep_rate=TOKEN_KEEP_RATE, token_pruning_loc=TOKEN_PRUNING_LOC)[1]
    pruned.load_state_dict(sparse.state_dict())  # the same predictors too
    pruned.attn_impl = "csr"
    t = layer_inputs(sparse, batch)
    q, k, v, idx, scale = t["q"], t["k"], t["v"], t["indices"], t["scale"]
    attn, timm_attn = sparse.blocks[0].attn, dense.blocks[0].attn
    flops = layer_flops(dense, sparse, {name: t[name][:1] for name in ("x", "q", "k", "v", "indices")})
    images = torch.randn(batch, 3, 224, 224)
    sparse.attn_impl = "csr"
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
        layer_ms = take_turns({
            "dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
            "sparse csr": lambda: sparse_attention_csr(q, k, v, idx, scale),
            "sparse gather": lambda: sparse_attention_gather(q, k, v, idx, scale, chunk=28),
            "masked (official)": lambda: sparse_attention_masked(q, k, v, t["mask"], scale),
            "predictor": lambda: attn.mask_predictor(q, k, sparse.grid, mask=False),
            "predictor's top-k selection": lambda: t["approx_attn"].topk(idx.shape[-1], sorted=False),
            "MHSA dense (timm)": lambda: timm_attn(t["x"]),
            "MHSA Sparsifiner (csr)": lambda: attn(t["x"], sparse.grid, impl="csr"),
        }, layer_reps)
        model_ms = take_turns({
            "dense": lambda: dense(images),
            "sparse": lambda: sparse(images),
            "dense pruned": lambda: dense_token_pruned(dense, images),
            "sparse pruned": lambda: pruned(images),
        }, model_reps)
    depth = len(sparse.blocks)
    share = depth * layer_ms["dense SDPA"] / model_ms["dense"]
    return {
        "variant": variant, "dense": TIMM_OF[variant], "batch": batch, "tokens": 197, "budget": idx.shape[-1],
        "depth": depth, "flops": flops, "layer_ms": layer_ms,
        "images_per_s": {name: batch * 1e3 / ms for name, ms in model_ms.items()},
        "core_share": share, "amdahl_bound": 1 / (1 - share),
        "token_pruning": {"keep_rate": TOKEN_KEEP_RATE, "loc": TOKEN_PRUNING_LOC,
                          "token_share": token_share(depth, TOKEN_KEEP_RATE, TOKEN_PRUNING_LOC, 196)},
    }


def token_share(depth: int, keep_rate: float, loc: tuple[int, ...], patches: int) -> float:
    """Mean over blocks of the tokens a block sees (cls included) with the pruning schedule, as a fraction of
    ``1 + patches``."""
    present, total = patches, 0
    for i in range(depth):
        total += 1 + present
        if i in loc:
            present = math.ceil(keep_rate ** (loc.index(i) + 1) * patches)
    return total / (depth * (1 + patches))


def bench_sparsifiner(variants: tuple[str, ...] = ("sparsifiner_deit_small",), **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`bench_variant` for each variant."""
    return [bench_variant(variant, **kwargs) for variant in variants]


def render_sparsifiner(rows: list[dict[str, Any]]) -> str:
    """The markdown section of the ``sparsifiner`` suite."""
    lines = [
        "## Sparsifiner vs dense DeiT (CPU, fp32)",
        "",
        "Generated by `python tools/benchmark.py sparsifiner`; every number comes from the same run "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Machine: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        "Dense = timm's DeiT with the same weights; Sparsifiner keeps 50 of 197 keys for every non-cls query "
        "(keep 0.25), the cls query keeps all. FLOPs are counted by `torch.utils.flop_counter` on the code that runs "
        "(one image, one layer; SDPA through its math backend so that its matmuls are seen; 1 multiply-add = 2 FLOPs). Milliseconds are medians of calls taking turns.",
        "",
    ]
    for r in rows:
        f, ms, ips = r["flops"], r["layer_ms"], r["images_per_s"]
        mhsa_dense = f["projections"] + f["core_dense"]
        mhsa_sparse = f["projections"] + f["core_sparse"] + f["predictor"]
        lines += [
            f"### {r['variant']} against {r['dense']} (batch {r['batch']})",
            "",
            "| FLOPs per image, one layer | dense | Sparsifiner | Sparsifiner / dense |",
            "|---|---|---|---|",
            f"| attention core (QK^T, AV) | {f['core_dense'] / 1e6:.1f} M | {f['core_sparse'] / 1e6:.1f} M | "
            f"{f['core_sparse'] / f['core_dense']:.2f} |",
            f"| core + connectivity predictor | {f['core_dense'] / 1e6:.1f} M | "
            f"{(f['core_sparse'] + f['predictor']) / 1e6:.1f} M | "
            f"{(f['core_sparse'] + f['predictor']) / f['core_dense']:.2f} |",
            f"| MHSA (qkv, core, predictor, proj) | {mhsa_dense / 1e6:.1f} M | {mhsa_sparse / 1e6:.1f} M | "
            f"{mhsa_sparse / mhsa_dense:.2f} |",
            f"| whole model | {f['model_dense'] / 1e9:.2f} G | "
            f"{(f['model_dense'] + r['depth'] * (mhsa_sparse - mhsa_dense)) / 1e9:.2f} G | "
            f"{(f['model_dense'] + r['depth'] * (mhsa_sparse - mhsa_dense)) / f['model_dense']:.2f} |",
            "",
            f"| one layer, batch {r['batch']} | ms | speedup vs dense |",
            "|---|---|---|",
        ]
        for name, value in ms.items():
            ref = ms["MHSA dense (timm)"] if name.startswith("MHSA") else ms["dense SDPA"]
            lines.append(f"| {name} | {value:.1f} | {ref / value:.2f}x |")
        speedup = ips["sparse"] / ips["dense"]
        topk_ms = ms.get("predictor's top-k selection")
        lines += [
            "",
            f"| whole model, batch {r['batch']} | images/s |",
            "|---|---|",
            f"| {r['dense']} | {ips['dense']:.1f} |",
            f"| {r['variant']} (csr) | {ips['sparse']:.1f} |",
        ]
        tp = r.get("token_pruning")
        if tp:
            rates = ", ".join(f"{tp['keep_rate'] ** (j + 1):.2f} after block {i}" for j, i in enumerate(tp["loc"]))
            lines += [
                f"| {r['dense']} + token pruning | {ips['dense pruned']:.1f} |",
                f"| {r['variant']} (csr) + token pruning | {ips['sparse pruned']:.1f} |",
            ]
        lines += [
            "",
            f"- Whole-model speedup (attention sparsity, the released configuration): {speedup:.2f}x; target >= 1.2x: "
            f"{'met' if speedup >= 1.2 else 'NOT met'}.",
        ]
        if tp:
            both, pruning = ips["sparse pruned"] / ips["dense"], ips["dense pruned"] / ips["dense"]
            lines += [
                f"- With the official token pruning as well ({rates} of the patches kept; the blocks see "
                f"{100 * tp['token_share']:.0f}% of the tokens on average): {both:.2f}x dense DeiT "
                f"(target {'met' if both >= 1.2 else 'NOT met'}), while the same pruning on dense DeiT alone gives "
                f"{pruning:.2f}x: the attention sparsity's own share of the combined model is "
                f"{ips['sparse pruned'] / ips['dense pruned']:.2f}x.",
            ]
        lines += [
            f"- The dense attention core takes {100 * r['core_share']:.0f}% of dense DeiT's time here "
            f"({r['depth']} x {ms['dense SDPA']:.1f} ms per batch), so even a sparse attention that cost nothing "
            f"would make the model at most {r['amdahl_bound']:.2f}x faster (Amdahl's bound).",
            f"- The predictor alone takes {ms['predictor']:.1f} ms per layer against {ms['dense SDPA']:.1f} ms for "
            f"the dense core it is meant to thin out: its top-{r['budget']}-of-{r['tokens']} selection per query"
            + (f" ({topk_ms:.1f} ms, `torch.topk`)" if topk_ms is not None else "")
            + f" costs more on a CPU than the {r['tokens']} dense dot products it avoids.",
            "",
        ]
    return "\n".join(lines)
