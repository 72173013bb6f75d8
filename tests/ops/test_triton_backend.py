"""The Triton backend against the reference.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` in a subprocess (an out-of-bounds load in the
interpreter kills the process); with one, the same cases run compiled on CUDA.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnseg import ops
from attnseg.ops import triton_kernels
from attnseg.ops.windows import axis_bounds, axis_table, rpb_table, window_table
from tests.conftest import PARITY_DIR

pytestmark = pytest.mark.skipif(triton_kernels.triton is None, reason="triton is not installed")

CHECK = Path(__file__).with_name("triton_check.py")
CUDA = torch.cuda.is_available()
# max error relative to max(1, |reference|), per dtype
TOLERANCE = {"float64": 1e-9, "float32": 2e-5, "float16": 2e-2, "bfloat16": 1e-1}


def _run_cases(cases: list[dict], tmp_path: Path) -> list[dict]:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    env = dict(os.environ)
    cmd = [sys.executable, str(CHECK), str(path)]
    if CUDA:
        cmd += ["--device", "cuda"]
        # fp64 only exists for the interpreter's gradient checks; on a GPU check fp32 instead
        cases = [dict(c, dtype="float32") if "shape" in c and c.get("dtype", "float64") == "float64" else c
                 for c in cases]
        path.write_text(json.dumps(cases))
    else:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2], timeout=900)
    assert proc.returncode == 0, f"triton check exited with {proc.returncode} (negative: killed by a signal, e.g. " \
                                 f"an out-of-bounds load):\n{proc.stderr[-3000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), proc.stdout[-2000:]
    return results


def _assert_close(results: list[dict]) -> None:
    for item in results:
        case, result = item["case"], item["result"]
        tol = TOLERANCE[case.get("dtype", "float64")]
        for name, err in result.items():
            if isinstance(err, float):
                assert err <= tol, f"{name} error {err:.3g} > {tol:g} for {case}"
        if case.get("determinism"):
            assert result["bitwise_deterministic"], case
        if case.get("gradcheck"):
            assert result["gradcheck"], case


FAST_CASES = [
    {"shape": [12, 12], "kernel": 5},
    {"shape": [17, 22], "kernel": [5, 7], "dilation": [2, 3], "rpb": True},
    {"shape": [15, 13], "kernel": [3, 5], "stride": [3, 2], "dilation": [2, 1], "causal": [True, True]},
    {"shape": [40], "kernel": 9, "dilation": 2, "causal": True, "rpb": True},
]

CASES = [
    {"shape": [13, 10], "kernel": [7, 3], "heads": 4, "kv_heads": 2, "dim": 24, "dim_v": 20},
    {"shape": [11, 14], "kernel": [4, 6], "causal": [True, False]},
    {"shape": [16, 16], "kernel": [6, 4], "stride": [2, 3], "rpb": True},
    {"shape": [14, 14], "kernel": 7, "mode": "zeropad", "rpb": True},
    {"shape": [12, 12], "kernel": 5, "extra": 5, "heads": 2, "kv_heads": 1},
    {"shape": [10, 10], "kernel": 10, "batch": 2},  # kernel = map: self attention
    {"shape": [20, 9], "kernel": [5, 3], "stride": [5, 3]},  # stride = kernel: blocked windows
    {"shape": [33], "kernel": 4, "stride": 3, "rpb": True, "dim": 8, "dim_v": 40},
    {"shape": [7, 8, 9], "kernel": 3, "rpb": True},
    {"shape": [8, 9, 10], "kernel": [2, 3, 4], "dilation": [1, 2, 1], "stride": [2, 1, 3],
     "causal": [False, True, False]},
]


def test_triton_matches_reference_fast(tmp_path):
    _assert_close(_run_cases(FAST_CASES, tmp_path))


def test_triton_matches_natten_fixtures(tmp_path):
    names = ["na1d_fused_natten.pt", "na2d_fused_natten.pt", "na3d_fused_natten.pt"]
    if not all((PARITY_DIR / name).is_file() for name in names):
        pytest.skip(f"NATTEN parity fixtures not found in {PARITY_DIR}")
    results = _run_cases([{"fixture": name, "fixture_dir": str(PARITY_DIR)} for name in names], tmp_path)
    for item in results:
        result = item["result"]
        assert result["cases"] > 0
        assert result["max_abs_err"] <= result["atol"], item


@pytest.mark.slow
def test_triton_matches_reference_on_feature_cases(tmp_path):
    _assert_close(_run_cases(CASES, tmp_path))


def _random_cases(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        ndim = rng.choice([1, 2, 2, 3])
        shape = [rng.randint(3, 7 if ndim == 3 else 16) for _ in range(ndim)]
        kernel = [rng.randint(2, 5) for _ in range(ndim)]
        dilation = [rng.randint(1, 2) for _ in range(ndim)]
        if any(k * d > s for k, d, s in zip(kernel, dilation, shape)):
            continue
        heads, kv_heads = rng.choice([(1, 1), (2, 2), (2, 1)])
        cases.append({
            "shape": shape, "kernel": kernel, "dilation": dilation, "stride": [rng.randint(1, k) for k in kernel],
            "causal": [rng.random() < 0.3 for _ in range(ndim)], "heads": heads, "kv_heads": kv_heads,
            "dim": rng.choice([4, 16, 24]), "rpb": rng.random() < 0.5, "extra": rng.choice([0, 0, 3]),
            "mode": "zeropad" if rng.random() < 0.15 else "natten", "seed": len(cases),
        })
    return cases


@pytest.mark.slow
def test_triton_matches_reference_on_random_sweep(tmp_path):
    _assert_close(_run_cases(_random_cases(10, seed=0), tmp_path))


@pytest.mark.slow
def test_triton_half_precision_determinism_and_gradcheck(tmp_path):
    cases = [
        {"shape": [12, 12], "kernel": 5, "rpb": True, "dtype": "float32", "determinism": True},
        {"shape": [12, 12], "kernel": 5, "rpb": True, "dtype": "float16", "dim": 32},
        {"shape": [12, 12], "kernel": [3, 5], "dilation": 2, "dtype": "bfloat16", "dim": 32, "determinism": True},
    ]
    if not CUDA:  # numerical gradients need float64, which only the interpreter runs
        cases.append({"shape": [6], "kernel": 3, "heads": 1, "dim": 2, "rpb": True, "gradcheck": True})
    _assert_close(_run_cases(cases, tmp_path))


# -- host-side pieces that need no kernel launch --------------------------------------------------------------


@pytest.mark.parametrize("length,kernel,dilation,stride,causal,mode", [
    (13, 5, 1, 1, False, "natten"), (17, 4, 2, 3, False, "natten"), (15, 3, 3, 2, True, "natten"),
    (11, 5, 1, 1, False, "zeropad"), (9, 9, 1, 9, False, "natten"),
])
def test_axis_bounds_agree_with_the_window_table(length, kernel, dilation, stride, causal, mode):
    bounds = axis_bounds(length, kernel, dilation, stride, causal, mode).long()
    key, valid = axis_table(length, kernel, dilation, stride, causal, mode)
    lo, hi, start, q_first, q_end = bounds
    for x in range(length):
        seen = sorted(int(j) // dilation for j, ok in zip(key[x], valid[x]) if ok)
        assert seen == list(range(lo[x], hi[x])), x  # the valid keys are exactly the interval [lo, hi)
        first_valid = int(valid[x].nonzero()[0])
        assert int(key[x, first_valid]) // dilation - first_valid == start[x]
    for xk in range(length):  # the queries that see key xk lie in [q_first, q_end)
        viewers = [x // dilation for x in range(length) if x % dilation == xk % dilation
                   and lo[x] <= xk // dilation < hi[x]]
        if viewers:
            assert q_first[xk] <= min(viewers) and max(viewers) < q_end[xk]
        in_range = [x // dilation for x in range(length) if x % dilation == xk % dilation
                    and q_first[xk] <= x // dilation < q_end[xk]]
        assert all(lo[x * dilation + xk % dilation] <= xk // dilation < hi[x * dilation + xk % dilation]
                   for x in in_range), xk


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 8, 8, 2, 16)
    assert "CUDA" in triton_kernels.can_run_triton(q, q, q)
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):
        ops.na2d(q, q, q, 3, backend="triton")
    assert "fused" in triton_kernels.can_run_triton(q, q, op="qk")


def test_rpb_gradient_reduction_matches_index_add():
    # the one-hot contraction used for the Triton rpb gradient sums exactly what a scatter-add would
    geo = triton_kernels._Geometry((7, 9), (3, 5), (2, 1), (1, 2), (False, True), "natten", torch.device("cpu"))
    ds = torch.randn(2, 3, 63, 15, dtype=torch.float64)
    _, valid = window_table((7, 9), (3, 5), (2, 1), (1, 2), (False, True))
    ds = ds * valid
    idx = rpb_table((7, 9), (3, 5), (2, 1), (1, 2), (False, True))
    want = torch.zeros(3, 5 * 9, dtype=torch.float64).index_add_(1, idx.reshape(-1), ds.sum(0).reshape(3, -1))
    got = triton_kernels._rpb_grad(ds, geo)
    assert torch.allclose(got.reshape(3, -1), want)
