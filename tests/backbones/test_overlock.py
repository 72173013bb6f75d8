import pytest
import torch

from attnseg.backbones import overlock as ovl
from attnseg.backbones.overlock import DilatedReparamBlock, DynamicConvBlock, OverLoCK, _attention_size
from attnseg.convert import from_official
from attnseg.errors import InputSizeError
from attnseg.models.pyramid import FeaturePyramid
from attnseg.ops import na2d_av
from attnseg.registry import BACKBONES
from tests.conftest import load_fixture

CLS, REPARAM, SEG, DET = ("overlock_cls_tiny_cfg.pt", "overlock_cls_tiny_cfg_reparam.pt", "overlock_seg_tiny_cfg.pt",
                          "overlock_det_tiny_cfg.pt")


def _build(name, **kwargs):
    return BACKBONES.get(name)(**kwargs)


# -- parity with the official code (fixtures) ----------------------------------------------------------------------

@pytest.mark.parametrize("fixture", [CLS, REPARAM])
def test_classification_parity(fixture):
    fx = load_fixture(fixture)
    model = from_official("overlock", fx["constructor"], fx["state_dict"])
    assert isinstance(model, OverLoCK) and not model.training
    with torch.no_grad():
        out = model(fx["input"])
        feats = model.forward_intermediates(fx["input"])
    assert out.shape == fx["output"].shape == (1, 10)
    assert torch.allclose(out, fx["output"], **fx["tolerance"])
    for name, ref in fx["features"].items():
        assert feats[name].shape == ref.shape, name
        assert torch.allclose(feats[name], ref, **fx["tolerance"]), name


@pytest.mark.parametrize("fixture", [SEG, DET])
def test_dense_parity(fixture):
    fx = load_fixture(fixture)
    model = from_official("overlock", fx["constructor"], fx["state_dict"])
    assert isinstance(model, FeaturePyramid)
    assert model.backbone.pyramid_norm == ("seg" if fixture == SEG else "det")
    with torch.no_grad():
        outs = model(fx["input"])  # 120x150: both Focus stages take the upsample / pool path
    assert len(outs) == len(fx["output"]) == 4
    for ours, ref in zip(outs, fx["output"]):
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, **fx["tolerance"])
    assert [f["num_chs"] for f in model.feature_info] == [o.shape[1] for o in fx["output"]]


def test_reparam_equals_the_official_merged_model():
    fx, fused = load_fixture(CLS), load_fixture(REPARAM)
    model = from_official("overlock", fx["constructor"], fx["state_dict"])
    with torch.no_grad():
        before = model(fx["input"])
        model.reparam()
        after = model(fx["input"])
    assert not any(".origin_bn." in k or ".dil_" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(fused["state_dict"])
    for key, value in model.state_dict().items():
        assert torch.allclose(value, fused["state_dict"][key], atol=1e-5, rtol=1e-5), key
    assert torch.allclose(after, before, **fused["tolerance_vs_unfused_output"])
    assert torch.allclose(after, fused["output"], **fused["tolerance"])
    with torch.no_grad():  # idempotent
        assert torch.equal(model.reparam()(fx["input"]), after)


def test_dilated_reparam_block_merges_exactly_in_eval():
    torch.manual_seed(1)
    for k in (5, 7, 13, 17):
        block = DilatedReparamBlock(4, k).eval()
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_()
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 1.5)
            x = torch.randn(1, 4, 23, 19)
            ref = block(x)
            block.reparam()
            assert block.deploy and block.lk_origin.bias is not None
            assert torch.allclose(block(x), ref, atol=1e-5)


@pytest.mark.parametrize("kernel,size", [(13, (14, 14)), (5, (14, 15)), (7, (7, 9)), (13, (40, 29)), (5, (21, 20))])
def test_contmix_aggregation_equals_na2d_av_forward_and_backward(kernel, size, monkeypatch):
    # small maps take the dense scatter + matmul path, larger ones na2d_av; chunking over (batch, group) too
    monkeypatch.setattr(ovl, "_DENSE_CHUNK_ELEMENTS", 3 * size[0] * size[1] * size[0] * size[1])
    attn = torch.softmax(torch.randn(2, 4, *size, kernel * kernel, dtype=torch.float64), -1).requires_grad_()
    value = torch.randn(2, 4, *size, 3, dtype=torch.float64, requires_grad=True)
    ours = ovl.aggregate(attn, value, kernel)
    ref = na2d_av(attn, value, kernel, backend="reference")
    assert torch.allclose(ours, ref, atol=1e-12)
    grad = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, (attn, value), grad)
    g_ref = torch.autograd.grad(ref, (attn, value), grad)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


# -- shapes, sizes, ContMix's upsample rule -------------------------------------------------------------------------

def test_attention_size_follows_the_official_float_rule():
    assert _attention_size(14, 14, 13) == (14, 14)
    assert _attention_size(8, 10, 13) == (13, 16)
    assert _attention_size(10, 8, 13) == (16, 13)
    assert _attention_size(4, 5, 7) == (7, 8)
    assert _attention_size(3, 3, 7) == (int(7 / 3 * 3), 7)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (97, 131), (64, 95)])
@pytest.mark.parametrize("pyramid_norm", ["seg", "det", None])
def test_odd_sizes_give_ceil_stride_pyramids(size, pyramid_norm):
    model = _build("test_overlock", num_classes=0, pyramid_norm=pyramid_norm).eval()
    with torch.no_grad():
        maps = model.forward_pyramid(torch.randn(1, 3, *size))
    assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [(16, 4), (24, 8), (48, 16), (80, 32)]
    for m, info in zip(maps, model.feature_info):
        r = info["reduction"]
        assert m.shape == (1, info["num_chs"], -(-size[0] // r), -(-size[1] // r))
        assert torch.isfinite(m).all()


def test_out_indices_and_forward_features():
    model = _build("test_overlock", num_classes=4, out_indices=(1, 3)).eval()
    assert [i["module"] for i in model.feature_info] == ["blocks2", "sub_blocks4"]
    x = torch.randn(1, 3, 70, 64)
    with torch.no_grad():
        assert [tuple(m.shape) for m in model.forward_pyramid(x)] == [(1, 24, 9, 8), (1, 80, 3, 2)]
        last = model.forward_features(x)
        assert last.shape == (1, 80, 3, 2)
        assert torch.equal(model.forward_head(last), model(x))
        assert model.forward_head(last, pre_logits=True).shape == (1, 64)


def test_dense_path_feeds_the_normed_stride8_map_onward():
    # the official mm backbones pass extra_norm[1](x) to patch_embed3; pyramid_norm=None keeps the cls path
    model = _build("test_overlock", num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        dense = model.forward_pyramid(x)
        model.extra_norm, norms = None, model.extra_norm
        plain = model.forward_pyramid(x)
    assert torch.allclose(norms[1](plain[1]), dense[1], atol=1e-5)
    assert not torch.allclose(norms[2](plain[2]), dense[2], atol=1e-3)


def test_bad_inputs_and_arguments():
    model = _build("test_overlock")
    with pytest.raises(InputSizeError, match=r"expects input \[B, 3, H, W\]"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(InputSizeError, match="H and W >= 32, got 31x64"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match="pyramid_norm"):
        OverLoCK(pyramid_norm="mask")
    with pytest.raises(ValueError, match="kernel_size must be one of"):
        DilatedReparamBlock(8, 6)
    with pytest.raises(ValueError, match="out_indices"):
        OverLoCK(out_indices=(4,))
    with pytest.raises(ValueError, match="divisible by 4"):
        DynamicConvBlock(dim=20, ctx_dim=64, num_heads=2)


# -- variants, registration -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,millions", [("overlock_xt_reparam", 16.45), ("overlock_t_reparam", 33.47),
                                           ("overlock_s_reparam", 56.16), ("overlock_b_reparam", 94.94)])
def test_published_parameter_counts(name, millions):
    with torch.device("meta"):
        model = _build(name, use_ds=False, pyramid_norm=None)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)


def test_dense_backbone_parameter_count_and_channels():
    with torch.device("meta"):
        model = _build("overlock_t", num_classes=0, pyramid_norm="det")
    assert [i["num_chs"] for i in model.feature_info] == [64, 128, 384, 640]
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(33.13, abs=0.6)


def test_registration_and_timm():
    names = ["overlock_xt", "overlock_t", "overlock_s", "overlock_b", "overlock_t_reparam", "test_overlock"]
    for name in names:
        assert BACKBONES.owner_class(name) is OverLoCK
    timm = pytest.importorskip("timm")
    import attnseg  # noqa: F401  (registers the timm entry points)
    from attnseg.integrations.timm import register_timm_models

    register_timm_models()
    assert timm.models.is_model("attnseg_overlock_t") and timm.models.is_model("attnseg_overlock_xt_reparam")
    with torch.device("meta"):
        assert timm.create_model("attnseg_overlock_xt", num_classes=7).get_classifier().out_channels == 7


# -- training ---------------------------------------------------------------------------------------------------

def test_gradients_reach_every_parameter_with_aux_head():
    model = _build("test_overlock", num_classes=5, drop_path_rate=0.1).train()
    out = model.forward_aux(torch.randn(2, 3, 64, 48))
    assert out["main"].shape == out["aux"].shape == (2, 5)
    (out["main"].square().mean() + 0.4 * out["aux"].square().mean()).backward()
    for n, p in model.named_parameters():
        if n.startswith("extra_norm"):
            continue  # dense-only, reached through forward_pyramid below
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_gradients_reach_every_dense_parameter():
    model = _build("test_overlock", num_classes=0, pyramid_norm="det").train()
    sum(f.square().mean() for f in model.forward_pyramid(torch.randn(1, 3, 48, 40))).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_grad_checkpointing_same_output_and_gradients():
    model = _build("test_overlock", num_classes=3).eval()  # eval: BN statistics fixed, no drop path
    x = torch.randn(1, 3, 40, 40)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True, stages=(2, 3))
    assert model.grad_checkpointing == [False, False, True, True]
    out = model(x)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-5), n
    with pytest.raises(ValueError, match="stages are 0..3"):
        model.set_grad_checkpointing(True, stages=(4,))


def test_reset_classifier_drops_and_recreates_both_heads():
    model = _build("test_overlock", num_classes=5).eval()
    assert model.get_classifier() is model.head[-1]
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3) and model.aux_head[-1].out_channels == 3
    model.reset_classifier(0)
    assert model.head is None and model.aux_head is None
    assert not any(k.startswith(("head.", "aux_head.")) for k in model.state_dict())
    with pytest.raises(RuntimeError, match="no classifier"):
        model(torch.randn(1, 3, 32, 32))
    model.reset_classifier(2)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    assert model.no_weight_decay() and all(n.endswith(("rpb1", "rpb2")) for n in model.no_weight_decay())
