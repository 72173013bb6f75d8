#!/usr/bin/env python
"""Benchmarks, side by side in one run, written to docs/benchmarks.md.

``python tools/benchmark.py ops [--quick] [--out docs/benchmarks.md]``: neighborhood attention on the
CPU: attnseg's ``cpu`` and ``reference`` backends against a naive unfold/gather implementation, natten
(when installed) and full self-attention through SDPA, for 2D 1x56x56x4x32 k7 and 3D 1x32^3x4x32
k3/k5/k7, forward and forward+backward: median milliseconds and peak memory (RSS growth of a fresh
process running one forward+backward). Methods whose memory would exceed the machine are skipped and
say why.

``python tools/benchmark.py models [--families halonet,biformer,nat] [--biformer-repo PATH] [--nat-repo PATH]``:
CPU inference of every backbone variant against its reference implementation (tools/bench_models.py). With
``--families`` only those families are measured; the section keeps the other families' rows from the previous run
(stored in it as JSON) and says which run each family comes from.

``python tools/benchmark.py models-ii [--transnext-repo PATH] [--overlock-repo PATH]``: TransNeXt and OverLoCK
against their official code, and ContMix's aggregation against the official unfold fallback
(tools/bench_backbones_ii.py).

``python tools/benchmark.py swin-unetr``: Swin UNETR 3D (feature_size 48) forward on 96³ and sliding-window
inference on 128³ against MONAI's SwinUNETR carrying the same weights (tools/bench_swin_unetr.py).

``python tools/benchmark.py sparsifiner [--families tiny,small,base]``: Sparsifiner against dense DeiT of the same
size at 50 of 197 keys: FLOPs, one layer's attention and the whole model at batch 32 (tools/bench_sparsifiner.py).

``python tools/benchmark.py karat [--families ViT-T,ViT-S] [--reps 3]``: KArAt (Fourier G3B) against timm's softmax
ViT of the same size: CPU training step time and peak tensor memory, KArAt's memory-efficient path, its plain-autograd
path and grad checkpointing (tools/bench_karat.py).

``python tools/benchmark.py ops-gpu``: the same shapes on a CUDA GPU (batch 1 and 32, fp16 and fp32): the
``triton`` backend against natten (when installed) and full attention through SDPA, plus each case's
memory-bandwidth floor: the bytes an ideal fused kernel moves (q, k, v read once, the output written once,
plus the logsumexp) over the device bandwidth measured in the same run with a large copy. Each suite rewrites
only its own section of the output file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
HEADER = "# Benchmarks\n\nWritten by `tools/benchmark.py`; each section is one suite, rewritten by its own run.\n"


def naive_gather(q, k, v, kernel):
    """Unfold-style NA: materialise every query's window keys/values ([N, K, H, D]), then attend."""
    from attnseg.ops.windows import window_table

    b, *spatial, h, d = q.shape
    n = math.prod(spatial)
    key, _ = window_table(tuple(spatial), (kernel,) * len(spatial), (1,) * len(spatial), (1,) * len(spatial),
                          (False,) * len(spatial))
    kf, vf = k.reshape(b, n, h, d), v.reshape(b, n, h, d)
    kw, vw = kf[:, key], vf[:, key]  # [B, N, K, H, D]
    logits = torch.einsum("bnhd,bnkhd->bnhk", q.reshape(b, n, h, d), kw) * d**-0.5
    return torch.einsum("bnhk,bnkhd->bnhd", logits.softmax(-1), vw).reshape(q.shape)


def sdpa_full(q, k, v, kernel):
    b, *spatial, h, d = q.shape
    n = math.prod(spatial)
    t = [x.reshape(b, n, h, d).transpose(1, 2) for x in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*t).transpose(1, 2).reshape(q.shape)


def _na(backend):
    def run(q, k, v, kernel):
        from attnseg import ops

        fn = getattr(ops, f"na{q.ndim - 3}d")
        return fn(q, k, v, kernel, backend=backend)

    return run


def _natten(q, k, v, kernel):
    import natten

    return getattr(natten, f"na{q.ndim - 3}d")(q, k, v, kernel)


METHODS = {"attnseg cpu": _na("cpu"), "attnseg reference": _na("reference"), "naive gather": naive_gather,
           "natten": _natten, "SDPA full attention": sdpa_full}


def _bytes_needed(method: str, shape: tuple[int, ...], kernel: int) -> float:
    """Rough working set, used to skip what cannot fit (bytes, fp32, forward+backward)."""
    b, *spatial, h, d = shape
    n, kk = math.prod(spatial), kernel ** len(spatial)
    if method == "attnseg reference":
        return 4 * b * h * n * n * 4  # dense mask, bias, logits, probs
    if method == "naive gather":
        return 4 * b * n * kk * h * d * 4  # K/V windows and their gradients
    if method == "SDPA full attention":
        return 3 * b * h * n * n * 4 if n > 8192 else 0  # the math path keeps N^2 weights for backward
    return 0


def _time(fn, shape, kernel, backward: bool, reps: int, warmup: int = 1) -> float:
    q, k, v = (torch.randn(shape, requires_grad=backward) for _ in range(3))
    times = []
    for i in range(reps + warmup):
        t0 = time.perf_counter()
        out = fn(q, k, v, kernel)
        if backward:
            out.sum().backward()
        if i >= warmup:  # the first calls warm caches, the allocator and window tables
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def rss_kib(peak: bool = False, reset_peak: bool = False) -> int:
    """Current (or peak) resident set size of this process in KiB, from /proc (Linux).

    ``reset_peak`` first resets the kernel's high-water mark, so a later ``peak=True`` reading measures
    only what ran in between (not the import of torch, which dominates ``ru_maxrss`` for small cases).
    """
    if reset_peak:
        Path("/proc/self/clear_refs").write_text("5")
    field = "VmHWM" if peak else "VmRSS"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _peak_mib(method: str, shape, kernel) -> float | None:
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(REPO / 'tools')!r})\n"
        "from benchmark import METHODS, rss_kib\n"
        f"q, k, v = (torch.randn({tuple(shape)}, requires_grad=True) for _ in range(3))\n"
        "base = rss_kib(reset_peak=True)\n"
        f"METHODS[{method!r}](q, k, v, {kernel}).sum().backward()\n"
        "print((rss_kib(peak=True) - base) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    return float(proc.stdout.split()[-1]) if proc.returncode == 0 else None


def bench_ops(quick: bool) -> list[dict]:
    cases = [((1, 56, 56, 4, 32), 7), ((1, 32, 32, 32, 4, 32), 3), ((1, 32, 32, 32, 4, 32), 5),
             ((1, 32, 32, 32, 4, 32), 7)]
    if quick:
        cases = cases[:1]
    try:
        import natten  # noqa: F401
        have_natten = True
    except ImportError:
        have_natten = False
    rows = []
    limit = 8 * 2**30
    for shape, kernel in cases:
        for method, fn in METHODS.items():
            row = {"case": f"{'2D' if len(shape) == 5 else '3D'} {'x'.join(map(str, shape))} k{kernel}",
                   "method": method}
            if method == "natten" and not have_natten:
                row["note"] = "natten not installed"
            elif _bytes_needed(method, shape, kernel) > limit:
                row["note"] = f"skipped: needs ~{_bytes_needed(method, shape, kernel) / 2**30:.0f} GiB"
            elif method == "SDPA full attention" and len(shape) == 6:
                row["note"] = "skipped: N^2 = 1.1e9 logits per head"
            else:
                reps, warmup = (1, 1) if len(shape) == 6 else (20, 5)
                row["fwd_ms"] = _time(fn, shape, kernel, False, reps, warmup)
                row["fwd_bwd_ms"] = _time(fn, shape, kernel, True, reps, warmup)
                row["peak_mib"] = _peak_mib(method, shape, kernel)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# -- GPU ------------------------------------------------------------------------------------------------------

GPU_CASES = [((1, 56, 56, 4, 32), 7), ((32, 56, 56, 4, 32), 7), ((1, 32, 32, 32, 4, 32), 3),
             ((1, 32, 32, 32, 4, 32), 5), ((1, 32, 32, 32, 4, 32), 7)]


def ideal_bytes(shape: tuple[int, ...], element_size: int, backward: bool) -> int:
    """Bytes an ideal fused kernel moves: q, k, v read and the output written once, plus the fp32 logsumexp.

    The backward pass of such a kernel reads q, k, v, out, dO and the logsumexp and writes dq, dk, dv.
    """
    tokens = math.prod(shape[:-1])  # batch * spatial * heads
    forward = 4 * tokens * shape[-1] * element_size + 4 * tokens
    return forward + (8 * tokens * shape[-1] * element_size + 2 * 4 * tokens if backward else 0)


def _gpu_time(fn, reps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _gpu_fwd_bwd(fn, shape, kernel, dtype) -> tuple[float, float]:
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=dtype)
    return _gpu_time(lambda: fn(q, k, v, kernel)), _gpu_time(lambda: fn(q, k, v, kernel).backward(grad))


def measured_bandwidth_gbs() -> float:
    """Device memory bandwidth from a 1 GiB copy (read + write), in GB/s."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    ms = _gpu_time(lambda: x.clone())
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def bench_ops_gpu() -> list[dict]:
    from attnseg import ops

    if not torch.cuda.is_available():
        raise SystemExit("ops-gpu needs a CUDA device; none is visible")
    bandwidth = measured_bandwidth_gbs()
    methods = {"attnseg triton": lambda q, k, v, kern: getattr(ops, f"na{q.ndim - 3}d")(q, k, v, kern,
                                                                                         backend="triton"),
               "natten": _natten, "SDPA full attention": sdpa_full}
    try:
        import natten  # noqa: F401
    except ImportError:
        methods.pop("natten")
    rows = []
    for dtype in (torch.float16, torch.float32):
        for shape, kernel in GPU_CASES:
            case = f"{'2D' if len(shape) == 5 else '3D'} {'x'.join(map(str, shape))} k{kernel} {str(dtype)[6:]}"
            for method, fn in methods.items():
                row = {"case": case, "method": method, "bandwidth_gbs": bandwidth}
                n = math.prod(shape[1:-2])
                if method == "SDPA full attention" and n > 16384 and dtype == torch.float32:
                    row["note"] = "skipped: fp32 SDPA falls back to the O(N^2) math path"
                else:
                    try:
                        row["fwd_ms"], row["fwd_bwd_ms"] = _gpu_fwd_bwd(fn, shape, kernel, dtype)
                    except (RuntimeError, torch.OutOfMemoryError) as err:
                        row["note"] = f"failed: {str(err).splitlines()[0][:80]}"
                    torch.cuda.empty_cache()
                for key, backward in (("fwd_floor_ms", False), ("fwd_bwd_floor_ms", True)):
                    row[key] = ideal_bytes(shape, torch.finfo(dtype).bits // 8, backward) / (bandwidth * 1e9) * 1e3
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def render_gpu(rows: list[dict]) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "?"
    bandwidth = rows[0]["bandwidth_gbs"] if rows else float("nan")
    lines = [
        "## Neighborhood attention (GPU)",
        "",
        f"Device: {device}; measured copy bandwidth {bandwidth:.0f} GB/s. Median CUDA-event time of forward and "
        "forward+backward; floor = ideal fused bytes / measured bandwidth (the limit for these memory-bound "
        "shapes); % of floor = floor / time.",
        "",
        "| case | method | fwd ms | fwd+bwd ms | fwd floor ms | fwd % of floor | fwd+bwd % of floor | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fwd, fb = r.get("fwd_ms"), r.get("fwd_bwd_ms")
        pct_f = f"{100 * r['fwd_floor_ms'] / fwd:.0f}%" if fwd else "–"
        pct_b = f"{100 * r['fwd_bwd_floor_ms'] / fb:.0f}%" if fb else "–"
        lines.append(f"| {r['case']} | {r['method']} | {fwd and f'{fwd:.3f}' or '–'} | {fb and f'{fb:.3f}' or '–'} "
                     f"| {r['fwd_floor_ms']:.3f} | {pct_f} | {pct_b} | {r.get('note', '')} |")
    lines.append("")
    return "\n".join(lines)


def section_of(document: str, suite: str) -> str:
    """The body of ``suite``'s block in ``document`` (empty if absent)."""
    begin, end = f"<!-- begin {suite} -->", f"<!-- end {suite} -->"
    if begin not in document or end not in document:
        return ""
    return document.split(begin, 1)[1].split(end, 1)[0]


def replace_section(document: str, suite: str, body: str) -> str:
    """``document`` with the block of ``suite`` (between its markers) replaced by ``body``, or appended."""
    begin, end = f"<!-- begin {suite} -->", f"<!-- end {suite} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin in document and end in document:
        head, rest = document.split(begin, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return document.rstrip("\n") + ("\n\n" if document.strip() else "") + block


def render(rows: list[dict]) -> str:
    lines = [
        "## Neighborhood attention (CPU, fp32)",
        "",
        "Generated by `python tools/benchmark.py ops`; every row of the table comes from the same run.",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}.",
        "",
        "Median wall time of forward and forward+backward (glibc malloc thresholds raised, see STEADY_MALLOC in the "
        "tool); peak = RSS growth of a fresh process running one forward+backward.",
        "",
        "| case | method | fwd ms | fwd+bwd ms | peak MiB | ratio fwd+bwd vs attnseg cpu | note |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {r["case"]: r.get("fwd_bwd_ms") for r in rows if r["method"] == "attnseg cpu"}

    def fmt(x, spec=".1f"):
        return format(x, spec) if isinstance(x, float) else "–"

    for r in rows:
        ratio = (f"{r['fwd_bwd_ms'] / base[r['case']]:.2f}x" if r.get("fwd_bwd_ms") and base.get(r["case"])
                 else "–")
        lines.append(f"| {r['case']} | {r['method']} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms'))} | "
                     f"{fmt(r.get('peak_mib'), '.0f')} | {ratio} | {r.get('note', '')} |")
    lines += ["", "Targets from issue 3 (2-core CPU), checked against the rows above:", ""]
    by = {(r["case"], r["method"]): r for r in rows}
    cpu2d, naive2d = by.get(("2D 1x56x56x4x32 k7", "attnseg cpu"), {}), by.get(("2D 1x56x56x4x32 k7", "naive gather"), {})
    cpu3d = by.get(("3D 1x32x32x32x4x32 k7", "attnseg cpu"), {})

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if cpu2d.get("fwd_ms"):
        lines.append(f"- 2D k7 forward <= 10 ms: {cpu2d['fwd_ms']:.1f} ms, {verdict(cpu2d['fwd_ms'] <= 10)}")
        lines.append(f"- 2D k7 forward+backward <= 25 ms: {cpu2d['fwd_bwd_ms']:.1f} ms, "
                     f"{verdict(cpu2d['fwd_bwd_ms'] <= 25)}")
    if cpu2d.get("fwd_bwd_ms") and naive2d.get("fwd_bwd_ms"):
        speedup = naive2d["fwd_bwd_ms"] / cpu2d["fwd_bwd_ms"]
        lines.append(f"- >= 20x faster than the naive gather (fwd+bwd): {speedup:.1f}x, {verdict(speedup >= 20)}")
    if cpu3d.get("peak_mib"):
        lines.append(f"- 3D 32^3 k7 forward+backward under 1 GiB: {cpu3d['peak_mib']:.0f} MiB, "
                     f"{verdict(cpu3d['peak_mib'] < 1024)}")
    lines.append("")
    return "\n".join(lines)


# glibc hands large freed buffers back to the OS and page-faults them in again on the next call, which makes
# CPU timings of every method bimodal (e.g. 5 or 13 ms for the same op). Serving buffers up to 32 MiB (glibc's
# maximum mmap threshold) from the heap and trimming it only past 1 GiB measures the compute; the tool
# re-executes itself with these settings, and the same environment variables help CPU training loops.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * MIB), "MALLOC_TRIM_THRESHOLD_": str(1024 * MIB)}


def main(argv: list[str] | None = None) -> int:
    if argv is None and any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["ops", "ops-gpu", "models", "models-ii", "swin-unetr", "sparsifiner",
                                            "karat"])
    parser.add_argument("--quick", action="store_true", help="2D case only (ops)")
    parser.add_argument("--families", default=None, help="models: comma-separated families (default: "
                                                          "halonet,biformer,nat; models-ii: transnext,overlock; "
                                                          "sparsifiner: DeiT sizes, default small; karat: "
                                                          "ViT-T,ViT-S)")
    parser.add_argument("--biformer-repo", help="models: a local checkout of rayleizhu/BiFormer (the reference)")
    parser.add_argument("--nat-repo", help="models: a local checkout of SHI-Labs/Neighborhood-Attention-Transformer")
    parser.add_argument("--transnext-repo", help="models-ii: a local checkout of DaiShiResearch/TransNeXt")
    parser.add_argument("--overlock-repo", help="models-ii: a local checkout of LMMMEng/OverLoCK")
    parser.add_argument("--reps", type=int, default=3, help="karat: timed steps per model after the warm-up")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    if args.suite == "ops":
        body = render(bench_ops(args.quick))
    elif args.suite == "ops-gpu":
        body = render_gpu(bench_ops_gpu())
    elif args.suite == "sparsifiner":
        from bench_sparsifiner import bench_sparsifiner, render_sparsifiner

        variants = tuple(f"sparsifiner_deit_{v}" for v in (args.families or "small").split(","))
        body = render_sparsifiner(bench_sparsifiner(variants))
    elif args.suite == "karat":
        from bench_karat import PAIRS, bench_karat, render_karat

        sizes = (args.families or ",".join(PAIRS)).split(",")
        body = render_karat(bench_karat({k: PAIRS[k] for k in sizes}, reps=args.reps))
    elif args.suite == "swin-unetr":
        from bench_swin_unetr import bench_swin_unetr, render_swin_unetr

        body = render_swin_unetr(bench_swin_unetr())
    elif args.suite == "models-ii":
        from bench_backbones_ii import bench_aggregation, bench_backbones, render_backbones_ii

        families = (args.families or "transnext,overlock").split(",")
        body = render_backbones_ii(bench_backbones(families, args.transnext_repo, args.overlock_repo),
                                   bench_aggregation())
    else:
        from bench_models import bench_models, merge_rows, render_models, stored_rows

        families = (args.families or "halonet,biformer,nat").split(",")
        rows = bench_models(families, args.biformer_repo, args.nat_repo)
        out = Path(args.out)
        if args.families and out.is_file():  # rerun families replace theirs; the other families' rows stay
            rows = merge_rows(stored_rows(section_of(out.read_text(), "models")), rows)
        body = render_models(rows)
    out = Path(args.out)
    document = out.read_text() if out.is_file() else HEADER
    out.write_text(replace_section(document, args.suite, body))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
