import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnseg import ops

SWEEPS = int(os.environ.get("ATTNSEG_NA_SWEEPS", "40"))


def _random_case(rng: random.Random):
    ndim = rng.choice([1, 2, 3])
    while True:
        shape = [rng.randint(3, 9 if ndim == 3 else 14) for _ in range(ndim)]
        kernel = [rng.randint(2, 5) for _ in range(ndim)]
        dilation = [rng.randint(1, 2) for _ in range(ndim)]
        if all(k * d <= s for k, d, s in zip(kernel, dilation, shape)):
            break
    stride = [rng.randint(1, k) for k in kernel]
    causal = [rng.random() < 0.25 for _ in range(ndim)]
    return ndim, shape, dict(kernel_size=kernel, dilation=dilation, stride=stride, is_causal=causal)


def test_cpu_matches_reference_on_random_sweep():
    rng = random.Random(0)
    for i in range(SWEEPS):
        ndim, shape, kw = _random_case(rng)
        torch.manual_seed(i)
        heads, kv_heads = rng.choice([(2, 2), (4, 2), (1, 1)])
        q = torch.randn(2, *shape, heads, 8, requires_grad=True)
        k, v = (torch.randn(2, *shape, kv_heads, 8, requires_grad=True) for _ in range(2))
        rpb = torch.randn(heads, *[2 * kk - 1 for kk in kw["kernel_size"]], requires_grad=True) \
            if rng.random() < 0.5 else None
        extra = {}
        if rng.random() < 0.3:
            extra = {"additional_keys": torch.randn(2, 3, kv_heads, 8, requires_grad=True),
                     "additional_values": torch.randn(2, 3, kv_heads, 8, requires_grad=True)}
        fn = getattr(ops, f"na{ndim}d")
        leaves = [t for t in (q, k, v, rpb, *extra.values()) if t is not None]
        results = []
        for backend in ("cpu", "reference"):
            out, lse = fn(q, k, v, rpb=rpb, return_lse=True, backend=backend, **kw, **extra)
            grads = torch.autograd.grad((out.square() * 0.5).sum() + lse.sum(), leaves)
            results.append((out, lse, grads))
        (o1, l1, g1), (o2, l2, g2) = results
        case = (ndim, shape, kw, heads, kv_heads, rpb is not None, bool(extra))
        assert torch.allclose(o1, o2, atol=1e-5), case
        assert torch.allclose(l1, l2, atol=1e-5), case
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-4), case


def test_gradcheck_float64_with_rpb_and_extra_kv():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 5, 6, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    ak, av = (torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def fn(q, k, v, rpb, ak, av):
        out, lse = ops.na2d(q, k, v, (3, 2), dilation=(1, 2), is_causal=(False, True), rpb=rpb,
                            additional_keys=ak, additional_values=av, return_lse=True, backend="cpu")
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, rpb, ak, av))


def test_cpu_is_chosen_automatically_for_cpu_tensors():
    x = torch.randn(1, 8, 8, 2, 4)
    assert ops.available_backends()[0] == "cpu"
    with ops.use_backend("cpu"):
        a = ops.na2d(x, x, x, 3)
    assert torch.equal(a, ops.na2d(x, x, x, 3))
    with pytest.raises(ValueError, match="backend 'cpu' cannot run this fused call: unsupported dtype"):
        ops.na2d(x.long(), x.long(), x.long(), 3, backend="cpu")


@pytest.mark.parametrize("mode", ["natten", "zeropad"])
def test_unfused_cpu_matches_reference_with_gradients(mode):
    rng = random.Random(1)
    for i in range(SWEEPS // 2):
        ndim, shape, kw = _random_case(rng)
        kernel, dilation, causal = kw["kernel_size"], kw["dilation"], kw["is_causal"]
        if mode == "zeropad":
            dilation, causal = [1] * ndim, [False] * ndim
        torch.manual_seed(i)
        q, k, v = (torch.randn(2, 3, *shape, 8, requires_grad=True) for _ in range(3))
        rpb = torch.randn(3, *[2 * kk - 1 for kk in kernel], requires_grad=True) if mode == "natten" else None
        qk, av = getattr(ops, f"na{ndim}d_qk"), getattr(ops, f"na{ndim}d_av")
        leaves = [t for t in (q, k, v, rpb) if t is not None]
        results = []
        for backend in ("cpu", "reference"):
            logits = qk(q, k, kernel, dilation, rpb=rpb, is_causal=causal, backend=backend, mode=mode)
            out = av(logits.softmax(-1), v, kernel, dilation, is_causal=causal, backend=backend, mode=mode)
            grads = torch.autograd.grad(out.square().sum(), leaves)
            results.append((logits, out, grads))
        (l1, o1, g1), (l2, o2, g2) = results
        case = (ndim, shape, kernel, dilation, causal, mode)
        assert torch.equal(torch.isfinite(l1), torch.isfinite(l2)), case
        assert torch.allclose(l1[torch.isfinite(l1)], l2[torch.isfinite(l2)], atol=1e-5), case
        assert torch.allclose(o1, o2, atol=1e-5), case
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-4), case


def test_unfused_gradcheck_float64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 6, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.rand(1, 2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: ops.na2d_qk(q, k, (3, 2), dilation=(1, 2), backend="cpu"), (q, k))
    assert torch.autograd.gradcheck(lambda w, v: ops.na2d_av(w, v, (3, 2), dilation=(1, 2), backend="cpu"), (w, v))


@pytest.mark.slow
def test_3d_32cubed_kernel7_forward_backward_stays_under_1gib():
    script = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tools')\n"
        "from benchmark import rss_kib\n"
        "from attnseg import ops\n"
        "q, k, v = (torch.randn(1, 32, 32, 32, 4, 32, requires_grad=True) for _ in range(3))\n"
        "base = rss_kib(reset_peak=True)\n"
        "ops.na3d(q, k, v, 7, backend='cpu').sum().backward()\n"
        "print((rss_kib(peak=True) - base) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mib = float(proc.stdout.strip().splitlines()[-1])
    assert peak_mib < 1024, f"peak memory {peak_mib:.0f} MiB over the inputs"


@pytest.mark.parametrize("chunk_bytes", [1, 48 * 2**20])  # one tile per chunk (recompute in backward) / one chunk
@pytest.mark.parametrize("shape,kernel,kw", [
    ((13, 17), (5, 3), {}),
    ((20, 11), (7, 4), {"dilation": (2, 2)}),                       # dilation groups, even kernel
    ((5, 6), (5, 6), {}),                                           # kernel == map: plain attention
    ((23, 30), 7, {"dilation": (3, 1), "stride": (2, 3)}),
    ((17, 19), (4, 5), {"is_causal": (True, False), "stride": (1, 2)}),
    ((15, 16), 5, {"mode": "zeropad"}),
    ((9, 10, 11), (3, 5, 2), {"dilation": (2, 1, 1), "is_causal": (False, False, True)}),
    ((70,), 9, {"dilation": 3, "stride": 4}),
])
def test_tiled_fused_path_matches_reference(monkeypatch, chunk_bytes, shape, kernel, kw):
    from attnseg.ops import cpu

    monkeypatch.setattr(cpu, "_CHUNK_BYTES_TILED", chunk_bytes)
    torch.manual_seed(0)
    ndim = len(shape)
    kern = (kernel,) * ndim if isinstance(kernel, int) else kernel
    q = torch.randn(2, *shape, 4, 8, requires_grad=True)
    k, v = (torch.randn(2, *shape, 2, 8, requires_grad=True) for _ in range(2))
    rpb = torch.randn(4, *[2 * kk - 1 for kk in kern], requires_grad=True)
    extra = {"additional_keys": torch.randn(2, 3, 2, 8, requires_grad=True),
             "additional_values": torch.randn(2, 3, 2, 8, requires_grad=True)}
    leaves = [q, k, v, rpb, *extra.values()]
    fn = getattr(ops, f"na{ndim}d")
    results = []
    for backend in ("cpu", "reference"):
        out, lse = fn(q, k, v, kernel, rpb=rpb, return_lse=True, backend=backend, **kw, **extra)
        grads = torch.autograd.grad(out.square().sum() + lse.sum(), leaves)
        results.append((out, lse, grads))
    (o1, l1, g1), (o2, l2, g2) = results
    assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(l1, l2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-4)


def test_tiles_cover_every_query_once_and_boxes_hold_every_window():
    from attnseg.ops.cpu import _Tiling
    from attnseg.ops.windows import window_table

    for shape, kernel, dil, stride, causal, mode in [
        ((13, 17), (5, 3), (2, 1), (1, 3), (False, True), "natten"),
        ((9, 10, 11), (3, 5, 2), (1, 2, 1), (3, 1, 2), (True, False, False), "natten"),
        ((15, 12), (5, 4), (1, 1), (1, 1), (False, False), "zeropad"),
    ]:
        tiling = _Tiling(shape, kernel, dil, stride, causal, mode)
        n = math.prod(shape)
        queries = tiling.queries[tiling.queries < n]
        assert sorted(queries.tolist()) == list(range(n))  # each query in exactly one tile
        key, valid = window_table(shape, kernel, dil, stride, causal, mode)
        allowed = tiling.allowed(0, tiling.n_tiles)
        for t in range(tiling.n_tiles):
            for slot, qi in enumerate(tiling.queries[t].tolist()):
                if qi == n:
                    assert not allowed[t, slot].any()  # padding sees nothing
                    continue
                seen = set(tiling.keys[t][allowed[t, slot]].tolist())
                assert seen == set(key[qi][valid[qi]].tolist()), (shape, qi)
