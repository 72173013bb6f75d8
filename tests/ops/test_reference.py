import pytest
import torch
import torch.nn.functional as F

from attnseg import ops
from tests.conftest import load_fixture

BACKENDS = ["cpu", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fixture", ["na1d_fused_natten.pt", "na2d_fused_natten.pt", "na3d_fused_natten.pt"])
def test_fused_matches_natten_fixtures(fixture, backend):
    fx = load_fixture(fixture)
    tol = fx["tolerance"]
    for case in fx["cases"]:
        fn = getattr(ops, case["op"])
        extra = {}
        if "additional_keys" in case:
            extra = {"additional_keys": case["additional_keys"], "additional_values": case["additional_values"]}
        if "lse" in case:
            out, lse = fn(case["q"], case["k"], case["v"], **case["kwargs"], **extra, return_lse=True,
                          backend=backend)
            assert torch.allclose(lse, case["lse"], **tol), case["name"]
        else:
            out = fn(case["q"], case["k"], case["v"], **case["kwargs"], **extra, backend=backend)
        assert torch.allclose(out, case["output"], **tol), case["name"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unfused_matches_natten_0_17_fixture(backend):
    fx = load_fixture("na_unfused_oldapi.pt")
    tol = fx["tolerance"]
    for case in fx["cases"]:
        kw = case["kwargs"]
        qk, av = getattr(ops, case["op_qk"]), getattr(ops, case["op_av"])
        logits = qk(case["query_scaled"], case["key"], kw["kernel_size"], kw["dilation"], rpb=case["rpb"],
                    is_causal=kw["is_causal"], backend=backend)
        finite = torch.isfinite(case["attn_logits"])
        assert torch.equal(torch.isfinite(logits), finite), case["name"]
        assert torch.allclose(logits[finite], case["attn_logits"][finite], **tol), case["name"]
        out = av(case["attn_softmax"], case["value"], kw["kernel_size"], kw["dilation"], is_causal=kw["is_causal"],
                 backend=backend)
        assert torch.allclose(out, case["output"], **tol), case["name"]
        out = av(case["av_weights_random"], case["value"], kw["kernel_size"], kw["dilation"],
                 is_causal=kw["is_causal"], backend=backend)
        assert torch.allclose(out, case["av_output_random"], **tol), case["name"]


@pytest.mark.parametrize("ndim,shape,kernel,dilation,causal", [
    (1, (17,), 5, 2, False), (2, (9, 11), (3, 5), (2, 1), (False, True)), (3, (5, 6, 7), 3, (1, 2, 1), False)])
def test_unfused_softmax_equals_fused(ndim, shape, kernel, dilation, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, *shape, 3, 8) for _ in range(3))
    heads_first = [t.movedim(-2, 1) for t in (q, k, v)]  # [B, heads, *S, D]
    rpb = torch.randn(3, *[2 * kk - 1 for kk in ((kernel,) * ndim if isinstance(kernel, int) else kernel)])
    qk = getattr(ops, f"na{ndim}d_qk")
    av = getattr(ops, f"na{ndim}d_av")
    fused = getattr(ops, f"na{ndim}d")
    logits = qk(heads_first[0] * 8**-0.5, heads_first[1], kernel, dilation, rpb=rpb, is_causal=causal)
    unfused = av(logits.softmax(-1), heads_first[2], kernel, dilation, is_causal=causal).movedim(1, -2)
    assert torch.allclose(unfused, fused(q, k, v, kernel, dilation, is_causal=causal, rpb=rpb), atol=1e-5)


def test_zeropad_mode_equals_unfold_formulation():
    """TransNeXt's sliding window: unfold with zero padding, padded positions masked."""
    torch.manual_seed(0)
    b, h, H, W, d, k = 1, 2, 6, 7, 4, 3
    q, key, v = (torch.randn(b, h, H, W, d) for _ in range(3))
    logits = ops.na2d_qk(q, key, k, mode="zeropad")
    unf = F.unfold(key.reshape(b * h, H, W, d).permute(0, 3, 1, 2), k, padding=k // 2)  # [bh, d*k*k, HW]
    unf = unf.reshape(b, h, d, k * k, H, W).permute(0, 1, 4, 5, 3, 2)  # [b, h, H, W, kk, d]
    ref = (q.unsqueeze(-2) * unf).sum(-1)
    inside = F.unfold(torch.ones(1, 1, H, W), k, padding=k // 2).reshape(k * k, H, W).permute(1, 2, 0) > 0
    ref = ref.masked_fill(~inside, float("-inf"))
    assert torch.equal(torch.isfinite(logits), torch.isfinite(ref))
    assert torch.allclose(logits[torch.isfinite(logits)], ref[torch.isfinite(ref)], atol=1e-6)
    # aggregation skips out-of-map slots
    w = torch.rand_like(logits).masked_fill(~inside, 0)
    unf_v = F.unfold(v.reshape(b * h, H, W, d).permute(0, 3, 1, 2), k, padding=k // 2)
    unf_v = unf_v.reshape(b, h, d, k * k, H, W).permute(0, 1, 4, 5, 3, 2)
    assert torch.allclose(ops.na2d_av(w, v, k, mode="zeropad"), (w.unsqueeze(-1) * unf_v).sum(-2), atol=1e-6)


def test_gradcheck_float64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 5, 6, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: ops.na2d(*t[:3], (3, 2), dilation=(1, 2), rpb=t[3], backend="reference"), (q, k, v, rpb))


def test_errors_name_the_axis_and_values():
    x = torch.randn(1, 8, 6, 2, 4)
    with pytest.raises(ValueError, match=r"axis 1: kernel_size \* dilation must be <= the map size, got "
                                         r"kernel_size=4, dilation=2, size=6"):
        ops.na2d(x, x, x, 4, dilation=2)
    with pytest.raises(ValueError, match=r"axis 0: stride must be in \[1, kernel_size\], got stride=4, kernel_size=3"):
        ops.na2d(x, x, x, 3, stride=4)
    with pytest.raises(ValueError, match="kernel_size needs 2 values"):
        ops.na2d(x, x, x, (3, 3, 3))
    with pytest.raises(ValueError, match="dtypes differ"):
        ops.na2d(x, x.double(), x, 3)
    with pytest.raises(ValueError, match=r"rpb must have shape \[heads, 2k-1 per axis\] = \[2, 5, 5\]"):
        ops.na2d(x, x, x, 3, rpb=torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="expects query"):
        ops.na2d(x[0], x[0], x[0], 3)
    with pytest.raises(ValueError, match="unknown backend 'refrence'; did you mean 'reference'"):
        ops.na2d(x, x, x, 3, backend="refrence")


def test_backend_selection_and_context_manager():
    x = torch.randn(1, 6, 6, 1, 4)
    assert "reference" in ops.available_backends()
    with ops.use_backend("reference"):
        a = ops.na2d(x, x, x, 3)
    assert torch.equal(a, ops.na2d(x, x, x, 3, backend="reference"))
    with pytest.raises(ValueError, match="unknown backend"), ops.use_backend("nope"):
        pass
