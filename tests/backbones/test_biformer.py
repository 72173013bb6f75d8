import pytest
import torch

from attnseg import load_pretrained
from attnseg.backbones import biformer
from attnseg.backbones.biformer import BiFormer, BiLevelRoutingAttention
from attnseg.convert import from_official
from attnseg.errors import CheckpointError
from attnseg.ops import routing
from attnseg.registry import BACKBONES
from tests.conftest import load_fixture


def _routing_indices(model, x):
    """Top-k region indices of every routing layer, in forward order (inputs captured, then re-run)."""
    captured = []
    layers = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    hooks = [m.register_forward_pre_hook(lambda mod, inp: captured.append((mod, inp[0]))) for m in layers]
    with torch.no_grad():
        model.forward_intermediates(x)
        for h in hooks:
            h.remove()
        return [mod(inp, return_routing=True)[1] for mod, inp in captured]


def test_classifier_parity_and_routing_with_official_fixture():
    fx = load_fixture("biformer_cls_tiny_cfg.pt")
    model = from_official("biformer", fx["constructor"], fx["state_dict"])
    tol = fx["tolerance"]
    routes = _routing_indices(model, fx["input"])
    assert len(routes) == len(fx["routing_topk_indices"])
    for ours, ref in zip(routes, fx["routing_topk_indices"]):
        assert torch.equal(ours.sort(-1).values, ref.sort(-1).values)  # same regions (order is irrelevant)
    with torch.no_grad():
        assert torch.allclose(model(fx["input"]), fx["output"], **tol)
        for ours, ref in zip(model.forward_intermediates(fx["input"]), fx["features"], strict=True):
            assert torch.allclose(ours, ref, **tol)


def test_dense_autopad_parity_on_an_odd_input():
    fx = load_fixture("biformer_mm_autopad_odd.pt")
    model = from_official("biformer", fx["constructor"], fx["state_dict"])
    with torch.no_grad():
        outs = model(fx["input"])
    assert [o.shape for o in outs] == [o.shape for o in fx["output"]]
    for ours, ref in zip(outs, fx["output"]):
        assert torch.allclose(ours, ref, **fx["tolerance"])
    assert model.feature_info.channels() == [16, 32, 64, 128]


def test_routed_attention_matches_the_official_k_fold_gather_with_gradients(monkeypatch):
    torch.manual_seed(0)
    b, p, m, w, c, t = 2, 9, 2, 5, 4, 3
    q, k, v = (torch.randn(b, p, m, w, c, dtype=torch.float64, requires_grad=True) for _ in range(3))
    index = torch.stack([torch.randperm(p)[:t] for _ in range(b * p)]).view(b, p, t)

    def gathered(q, k, v):  # the official formulation: copy the routed regions, then dense attention
        batch = torch.arange(b)[:, None, None]
        kk = k[batch, index].permute(0, 1, 3, 2, 4, 5).reshape(b, p, m, t * w, c)
        vv = v[batch, index].permute(0, 1, 3, 2, 4, 5).reshape(b, p, m, t * w, c)
        return torch.softmax(0.7 * q @ kk.transpose(-1, -2), -1) @ vv

    for chunk_bytes in (1, 2**25):  # one routed slot per step, and all at once
        monkeypatch.setattr(routing, "_CHUNK_BYTES", chunk_bytes)
        out = routing.region_routed_attention(q, k, v, index, 0.7)
        assert torch.allclose(out, gathered(q, k, v), atol=1e-12)
        assert torch.autograd.gradcheck(lambda q, k, v: routing.region_routed_attention(q, k, v, index, 0.7),
                                        (q, k, v))


def test_gradients_reach_every_parameter_and_channels_last_agrees():
    model = BACKBONES.get("test_biformer")(num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    (model(x).sum() + sum(f.sum() for f in model.forward_pyramid(x))).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.contiguous(memory_format=torch.channels_last)), atol=1e-5)


def test_variants_match_the_official_parameter_counts():
    for name, want in {"biformer_tiny": 13.14e6, "biformer_small": 25.54e6, "biformer_base": 56.80e6}.items():
        with torch.device("meta"):
            model = BACKBONES.get(name)(pyramid_norm=False)
        got = sum(p.numel() for p in model.parameters())
        assert abs(got - want) / want < 0.005, (name, got)


def test_released_checkpoint_layout_loads_through_load_pretrained(tmp_path):
    fx = load_fixture("biformer_cls_tiny_cfg.pt")
    torch.save({"model": fx["state_dict"]}, tmp_path / "biformer_tiny_in1k.pth")
    kwargs = {k: fx["constructor"]["kwargs"][k] for k in ("depth", "embed_dim", "qk_dims", "head_dim", "mlp_ratios")}
    model = BiFormer(**kwargs, num_classes=0)
    report = load_pretrained(model, tmp_path / "biformer_tiny_in1k.pth")
    assert sorted(report.initialized) == sorted(k for k in model.state_dict() if k.startswith("extra_norms."))
    assert {k.split(".")[0] for k in report.dropped} == {"head", "norm"}


def test_ablation_records_and_foreign_keys_are_refused():
    fx = load_fixture("biformer_cls_tiny_cfg.pt")
    record = {"name": "BiFormer", "kwargs": {**fx["constructor"]["kwargs"], "kv_downsample_mode": "ada_avgpool"}}
    with pytest.raises(ValueError, match="kv_downsample_mode='ada_avgpool' is an ablation"):
        from_official("biformer", record, fx["state_dict"])
    with pytest.raises(CheckpointError, match="biformer_stl_nchw"):
        from_official("biformer", fx["constructor"], {**fx["state_dict"], "stages.0.0.attn.qkv_linear.weight": 0})


@pytest.mark.slow
def test_torch_compile_gives_the_same_output():
    model = BACKBONES.get("test_biformer")(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(x), model(x), atol=1e-4)


@pytest.mark.parametrize("width", [5, 36])  # below and above the fused-kernel threshold
@pytest.mark.parametrize("chunk_bytes", [1, 2**25])
def test_routed_attention_inference_path_matches_the_gather(monkeypatch, width, chunk_bytes):
    monkeypatch.setattr(routing, "_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    b, p, m, c, t = 2, 9, 2, 8, 3
    q, k, v = (torch.randn(b, p, m, width, c) for _ in range(3))
    index = torch.stack([torch.randperm(p)[:t] for _ in range(b * p)]).view(b, p, t)
    batch = torch.arange(b)[:, None, None]
    kk = k[batch, index].permute(0, 1, 3, 2, 4, 5).reshape(b, p, m, t * width, c)
    vv = v[batch, index].permute(0, 1, 3, 2, 4, 5).reshape(b, p, m, t * width, c)
    want = torch.softmax(0.4 * q @ kk.transpose(-1, -2), -1) @ vv
    with torch.no_grad():
        got = routing.region_routed_attention(q, k, v, index, 0.4)
    assert torch.allclose(got, want, atol=1e-5)


def test_masked_dense_attention_equals_the_routed_one():
    torch.manual_seed(0)
    b, sy, sx, h, w, m, c, t = 2, 3, 4, 2, 3, 2, 8, 5
    p = sy * sx
    maps = [torch.randn(b, sy * h, sx * w, m, c, dtype=torch.float64) for _ in range(3)]
    index = torch.stack([torch.randperm(p)[:t] for _ in range(b * p)]).view(b, p, t)

    def regions(t):  # [B, H, W, m, c] -> [B, P, m, h*w, c]
        return t.view(b, sy, h, sx, w, m, c).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, p, m, h * w, c)

    routed = routing.region_routed_attention(*(regions(x) for x in maps), index, 0.4)
    tokens = [x.reshape(b, -1, m, c).transpose(1, 2) for x in maps]  # [B, m, N, c]
    dense = routing.region_masked_attention(*tokens, index, (sy, sx), (h, w), 0.4)
    assert torch.allclose(regions(dense.transpose(1, 2).reshape(b, sy * h, sx * w, m, c)), routed, atol=1e-12)
    with pytest.raises(ValueError, match="a 3x4 grid of 2x3 regions needs 72 tokens"):
        routing.region_masked_attention(*(x[:, :, :70] for x in tokens), index, (sy, sx), (h, w), 0.4)


def test_routing_attention_paths_agree_inside_the_block(monkeypatch):
    # stage-3-like routing (topk 16 of 49): inference takes the masked dense path; forcing the routed path must
    # give the same output and routing
    attn = BiLevelRoutingAttention(32, num_heads=2, n_win=7, topk=16).eval()
    x = torch.randn(2, 15, 13, 32)  # padded to 21x14: 3x2 regions
    assert routing.prefers_masked_dense(49, 16, 2, 21 * 14)
    with torch.no_grad():
        dense, dense_index = attn(x, return_routing=True)
        monkeypatch.setattr(biformer, "prefers_masked_dense", lambda *a: False)
        routed, routed_index = attn(x, return_routing=True)
    assert torch.equal(dense_index, routed_index)
    assert torch.allclose(dense, routed, atol=1e-5)
    assert not routing.prefers_masked_dense(49, 4, 2, 28 * 28)
