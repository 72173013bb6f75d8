import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import attnseg
from attnseg.backbones.sparsifiner import (
    ConnectivityPredictor,
    Sparsifiner,
    sparse_attention_csr,
    sparse_attention_gather,
    sparse_attention_masked,
)
from attnseg.errors import InputSizeError
from attnseg.registry import BACKBONES


def _randomize(model, seed=0):
    """Weights far from the official init (near-uniform attention would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.05 if name.endswith("proj_back_n") else 0.5 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model


def _random_indices(B, H, N, budget, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, N - 1, N, generator=g).argsort(-1)[..., :budget]


@pytest.mark.parametrize("chunk", [None, 7])
def test_gather_attention_equals_masked_dense(chunk):
    torch.manual_seed(0)
    B, H, N, d, budget = 2, 3, 29, 8, 9
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    idx = _random_indices(B, H, N, budget)
    keep = torch.zeros(B, H, N - 1, N, dtype=torch.bool).scatter_(-1, idx, True)
    mask = torch.cat([torch.ones(B, H, 1, N, dtype=torch.bool), keep], dim=2)
    ref, attn, unmasked = sparse_attention_masked(q, k, v, mask, d**-0.5)
    out = sparse_attention_gather(q, k, v, idx, d**-0.5, chunk=chunk)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sparse_attention_csr(q, k, v, idx, d**-0.5), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(attn > 0, mask) and torch.allclose(unmasked.sum(-1), torch.ones(B, H, N))


@pytest.mark.parametrize("impl", ["csr", "gather"])
@pytest.mark.parametrize("size", [(64, 64), (97, 131)])
def test_model_sparse_and_masked_give_the_same_outputs(size, impl):
    model = _randomize(BACKBONES.get("test_sparsifiner")(num_classes=7)).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        model.attn_impl = impl
        logits, maps = model(x), model.forward_pyramid(x)
        model.attn_impl = "masked"
        logits_ref, maps_ref = model(x), model.forward_pyramid(x)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(maps, maps_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_attention_is_traceable_for_export():
    """Sparse CSR tensors cannot be traced: under torch.export (and jit.trace) ``auto`` takes the masked path,
    whose program gives the eager csr outputs."""
    model = _randomize(BACKBONES.get("test_sparsifiner")(num_classes=7)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)  # auto: csr in eager CPU inference
        program = torch.export.export(model, (x,))
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.testing.assert_close(program.module()(x), eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traced(x), eager, atol=1e-5, rtol=1e-5)
    assert not any("sparse" in str(node.target) for node in program.graph.nodes)


def test_mask_rows_budget_and_no_gradient():
    model = _randomize(BACKBONES.get("test_sparsifiner")(num_classes=3, keep_rate=[0.25, 0.5], pyramid=False))
    out = model.forward_official(torch.randn(2, 3, 64, 64))
    N = 17
    for mask, rate in zip(out["attn_mask_list"], (0.25, 0.5)):
        assert mask.dtype == torch.bool and mask.shape == (2, 2, N, N) and not mask.requires_grad
        assert mask[:, :, 0].all()  # the cls query keeps every key
        assert (mask[:, :, 1:].sum(-1) == math.ceil(rate * N)).all()
    # in the sparse mode the logits do not depend on the predictor: the mask carries no gradient
    out["x"].sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (".mask_predictor." in name), name


def test_predictor_without_mask_gives_the_same_kept_keys():
    predictor = _randomize(ConnectivityPredictor(8, 2, 17, (4, 4), keep_rate=0.25, reduce_n_factor=4, coef_topk=2))
    q, k = torch.randn(2, 2, 17, 8), torch.randn(2, 2, 17, 8)
    full, lean = predictor(q, k, (4, 4)), predictor(q, k, (4, 4), mask=False)
    assert "attn_mask" not in lean and torch.equal(lean["indices"], full["indices"])
    rebuilt = torch.zeros(2, 2, 16, 17, dtype=torch.bool).scatter_(-1, lean["indices"], True)
    assert torch.equal(rebuilt, full["attn_mask"][:, :, 1:]) and (rebuilt.sum(-1) == 5).all()


def test_attention_reconstruction_mode_is_dense_with_a_trainable_estimate():
    model = _randomize(BACKBONES.get("test_sparsifiner")(num_classes=3, attn_recon=True)).train()
    out = model.forward_official(torch.randn(2, 3, 64, 64))
    for attn, unmasked, coef in zip(out["masked_attn_list"], out["unmasked_attn_list"], out["basis_coef_list"]):
        assert torch.equal(attn, unmasked) and (attn > 0).all()
        assert (coef > 0).all()  # full coefficients (no top-k) in this phase
    sum(a.sum() for a in out["approx_attn_list"]).backward()
    assert all(p.grad is not None for p in model.predictor_parameters())
    model.eval()  # attn_recon only acts in training
    with torch.no_grad():
        assert (model.forward_official(torch.randn(1, 3, 64, 64))["basis_coef_list"][0] == 0).any()


def test_full_keep_rate_is_deit_and_deit_weights_load(tmp_path):
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                            num_classes=5).eval()
    _randomize(vit, seed=1)
    path = tmp_path / "deit.pth"
    torch.save({"model": vit.state_dict()}, path)  # the DeiT release wraps its weights in 'model'
    model = BACKBONES.get("test_sparsifiner")(num_classes=5, keep_rate=1.0).eval()
    report = attnseg.load_pretrained(model, path)
    assert not report.missing and not report.unexpected
    assert {k.split(".mask_predictor.")[0] for k in report.initialized if "mask_predictor" in k} == \
        {"blocks.0.attn", "blocks.1.attn"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), atol=1e-5, rtol=1e-5)


def test_other_input_sizes_resample_the_token_tables():
    model = _randomize(BACKBONES.get("test_sparsifiner")(num_classes=3)).eval()
    with torch.no_grad():
        out = model.forward_official(torch.randn(1, 3, 97, 131))  # padded to 112 x 144: 7 x 9 patches
    N = 7 * 9 + 1
    mask = out["attn_mask_list"][0]
    assert mask.shape == (1, 2, N, N) and (mask[:, :, 1:].sum(-1) == math.ceil(0.25 * N)).all()
    assert out["approx_attn_list"][0].shape == (1, 2, N - 1, N) and out["x"].shape == (1, 3)
    pred = model.blocks[0].attn.mask_predictor
    from attnseg.backbones.sparsifiner import resample_token_table
    assert resample_token_table(pred.proj_n, pred.grid, pred.grid) is pred.proj_n  # exact at the training size
    resized = resample_token_table(pred.proj_n, (4, 4), (8, 8), scale_sum=True)
    assert resized.shape == (65, pred.proj_n.shape[1]) and torch.equal(resized[0], pred.proj_n[0])
    torch.testing.assert_close(resized[1:].sum(0), pred.proj_n[1:].sum(0), atol=0.05, rtol=0.2)


def test_factories_and_parameter_count():
    small = BACKBONES.get("sparsifiner_deit_small")(pyramid=False)
    n = sum(p.numel() for p in small.parameters())
    assert abs(n - 22.25e6) < 0.01e6  # reference/backbones_b.md §2.2 (22.05M DeiT-S + 0.201M predictors)
    pred = small.blocks[0].attn.mask_predictor
    assert pred.proj_n.shape == (197, 32) and pred.proj_c_q.weight.shape == (32, 64) and pred.budget(197) == 50
    tiny = BACKBONES.get("sparsifiner_deit_tiny")(pyramid=False)
    assert tiny.blocks[0].attn.num_heads == 3 and tiny.embed_dim == 192


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"embed_dim \(30\) is not divisible by num_heads \(4\)"):
        Sparsifiner(img_size=64, embed_dim=30, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="must be at least one patch"):
        Sparsifiner(img_size=8, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        Sparsifiner(img_size=32, embed_dim=16, depth=1, num_heads=2, attn_impl="flash")
    with pytest.raises(ValueError, match="coef_topk must be in 1..K=1"):
        Sparsifiner(img_size=32, embed_dim=16, depth=1, num_heads=2, reduce_n_factor=4)
    with pytest.raises(ValueError, match="keep_rate needs one value or one per layer"):
        Sparsifiner(img_size=64, embed_dim=16, depth=2, num_heads=2, keep_rate=[0.5])
    with pytest.raises(ValueError, match="keep_rate must be in"):
        ConnectivityPredictor(8, 2, 17, (4, 4), keep_rate=0.0, reduce_n_factor=4, coef_topk=2)
    model = BACKBONES.get("test_sparsifiner")()
    with pytest.raises(InputSizeError, match="needs H and W >= 16"):
        model(torch.randn(1, 3, 8, 64))


@pytest.mark.parametrize("fn", [sparse_attention_csr, sparse_attention_gather])
def test_sparse_attention_gradients_equal_the_masked_ones(fn):
    torch.manual_seed(1)
    B, H, N, d, budget = 1, 2, 13, 4, 5
    idx = _random_indices(B, H, N, budget, seed=1)
    keep = torch.zeros(B, H, N - 1, N, dtype=torch.bool).scatter_(-1, idx, True)
    mask = torch.cat([torch.ones(B, H, 1, N, dtype=torch.bool), keep], dim=2)
    qkv = [torch.randn(B, H, N, d, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = torch.randn(B, H, N, d, dtype=torch.float64)
    ref = torch.autograd.grad((sparse_attention_masked(*qkv, mask, 0.5)[0] * w).sum(), qkv)
    ours = torch.autograd.grad((fn(*qkv, idx, 0.5) * w).sum(), qkv)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model = _randomize(BACKBONES.get("test_sparsifiner")(num_classes=3, pyramid=False)).train()
    x = torch.randn(2, 3, 64, 80)
    outs = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        y = model(x)
        y.sum().backward()
        outs.append((y.detach(), model.blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
