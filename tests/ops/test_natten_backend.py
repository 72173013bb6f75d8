"""The natten delegate: argument mapping and refusal reasons, checked with a stand-in ``natten`` module.

A real NATTEN >= 0.20 needs a CUDA build, which CI machines lack; the stand-in computes with our reference
backend and records what it was called with.
"""

import types

import pytest
import torch

from attnseg import ops
from attnseg.ops import natten_backend


@pytest.fixture
def fake_natten(monkeypatch):
    calls = []

    def make(rank):
        def na(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
               additional_keys=None, additional_values=None, return_lse=False):
            calls.append(dict(rank=rank, kernel_size=kernel_size, stride=stride, dilation=dilation,
                              is_causal=is_causal, scale=scale, heads=(query.shape[-2], key.shape[-2])))
            fn = getattr(ops, f"na{rank}d")
            return fn(query, key, value, kernel_size, dilation, stride, is_causal, scale=scale,
                      additional_keys=additional_keys, additional_values=additional_values, return_lse=return_lse,
                      backend="reference")
        return na

    module = types.SimpleNamespace(__version__="0.21.1", na1d=make(1), na2d=make(2), na3d=make(3))
    monkeypatch.setattr(natten_backend.importlib, "import_module",
                        lambda name: module if name == "natten" else __import__(name))
    natten_backend.natten_module.cache_clear()
    yield calls
    natten_backend.natten_module.cache_clear()


def test_without_natten_the_backend_declines():
    natten_backend.natten_module.cache_clear()
    try:
        import natten  # noqa: F401
        pytest.skip("natten is installed here")
    except ImportError:
        pass
    q = torch.randn(1, 8, 8, 2, 16)
    assert "not installed" in natten_backend.can_run_natten(q, q, q, kernel=(3, 3))
    with pytest.raises(ValueError, match="backend 'natten' cannot run"):
        ops.na2d(q, q, q, 3, backend="natten")


def test_old_natten_versions_are_not_used(monkeypatch):
    old = types.SimpleNamespace(__version__="0.17.5", na2d=None)
    monkeypatch.setattr(natten_backend.importlib, "import_module", lambda name: old)
    natten_backend.natten_module.cache_clear()
    assert natten_backend.natten_module() is None
    natten_backend.natten_module.cache_clear()


def test_refusal_reasons_name_the_unsupported_feature(fake_natten):
    q = torch.randn(1, 8, 8, 2, 16)
    rpb = torch.zeros(2, 5, 5)
    assert "relative position bias" in natten_backend.can_run_natten(q, q, q, rpb=rpb, kernel=(3, 3))
    assert "zeropad" in natten_backend.can_run_natten(q, q, q, kernel=(3, 3), mode="zeropad")
    assert "kernel_size >= 2" in natten_backend.can_run_natten(q, q, q, kernel=(1, 3))
    assert "unfused" in natten_backend.can_run_natten(q, q, op="qk", kernel=(3, 3))
    assert "value head dims" in natten_backend.can_run_natten(q, q, torch.randn(1, 8, 8, 2, 8), kernel=(3, 3))
    assert "CUDA" in natten_backend.can_run_natten(q, q, q, kernel=(3, 3))
    # automatic selection on CPU never reaches natten
    out = ops.na2d(q, q, q, 3)
    assert fake_natten == [] and out.shape == q.shape


def test_arguments_are_passed_through_per_axis(fake_natten):
    torch.manual_seed(0)
    q = torch.randn(2, 9, 10, 4, 8)
    k, v = torch.randn(2, 9, 10, 2, 8), torch.randn(2, 9, 10, 2, 8)
    ak, av = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    out, lse = natten_backend.na_fused_natten(q, k, v, (3, 4), (2, 1), (1, 2), (False, True), None, 0.3, ak, av,
                                              True)
    call = fake_natten[-1]
    assert call == dict(rank=2, kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True),
                        scale=0.3, heads=(4, 4))  # kv heads repeated for GQA
    want, want_lse = ops.na2d(q, k, v, (3, 4), (2, 1), (1, 2), (False, True), scale=0.3, additional_keys=ak,
                              additional_values=av, return_lse=True, backend="reference")
    assert torch.allclose(out, want, atol=1e-6) and torch.allclose(lse, want_lse, atol=1e-6)
