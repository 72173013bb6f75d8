import math

import pytest
import torch
import torch.nn.functional as F

from attnseg.backbones.transnext import TransNeXt, cpb_coordinates, window_counts
from attnseg.convert import from_official
from attnseg.errors import InputSizeError
from attnseg.models.pyramid import FeaturePyramid
from attnseg.registry import BACKBONES
from tests.conftest import load_fixture

CLS = "transnext_cls_tiny_cfg.pt"
FIXED = "transnext_cls_fixedpool_cfg.pt"
DENSE = "transnext_dense_tiny_cfg.pt"


def _build(name, **kwargs):
    return BACKBONES.get(name)(**kwargs)


def _tokens(maps):  # NCHW -> the official token layout [B, H*W, C]
    return [m.flatten(2).transpose(1, 2) for m in maps]


# -- parity with the official code (fixtures) ---------------------------------------------------------------------

@pytest.mark.parametrize("fixture", [CLS, FIXED])
def test_classifier_parity_with_official_fixture(fixture):
    fx = load_fixture(fixture)
    model = from_official("transnext", fx["constructor"], fx["state_dict"])
    assert isinstance(model, TransNeXt) and not model.training
    tol = fx["tolerance"]
    with torch.no_grad():
        out = model(fx["input"])
        feats = _tokens(model.forward_intermediates(fx["input"]))
    assert out.shape == fx["output"].shape == (1, 10)
    assert torch.allclose(out, fx["output"], **tol)
    assert len(feats) == len(fx["features"]) == 4
    for ours, ref in zip(feats, fx["features"]):
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, **tol)


@pytest.mark.parametrize("mode", ["", "_extrapolation"])
def test_dense_parity_with_official_fixture_in_both_bias_modes(mode):
    fx = load_fixture(DENSE)
    model = from_official("transnext", fx["constructor" + mode], fx["state_dict"])
    assert isinstance(model, FeaturePyramid)
    assert model.backbone.bias_mode == ("extrapolate" if mode else "interpolate")
    with torch.no_grad():
        outs = model(fx["input"])
    assert [tuple(o.shape) for o in outs] == [tuple(r.shape) for r in fx["output" + mode]]
    for ours, ref in zip(outs, fx["output" + mode]):
        assert torch.allclose(ours, ref, **fx["tolerance"])


def test_the_classifier_class_runs_the_dense_geometry_at_any_size():
    # the official classifier only runs at img_size; attnseg's, given the dense weights and img_size, is the dense net
    fx = load_fixture(DENSE)
    kwargs = {k: v for k, v in fx["constructor"]["kwargs"].items()
              if k in ("img_size", "pretrain_size", "embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios")}
    model = TransNeXt(num_classes=3, **kwargs).eval()
    missing = model.load_state_dict(fx["state_dict"], strict=False).missing_keys
    assert missing == ["head.weight", "head.bias"]
    with torch.no_grad():
        for ours, ref in zip(model.forward_pyramid(fx["input"]), fx["output"]):
            assert torch.allclose(ours, ref, **fx["tolerance"])
        assert model(fx["input"]).shape == (1, 3)


def test_bias_modes_agree_at_img_size_and_differ_elsewhere():
    model = _build("test_transnext", num_classes=0, img_size=64).eval()
    _randomize(model)
    extra = _build("test_transnext", num_classes=0, img_size=64, bias_mode="extrapolate").eval()
    extra.load_state_dict(model.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert all(torch.equal(a, b) for a, b in zip(model.forward_pyramid(x), extra.forward_pyramid(x)))
        x = torch.randn(1, 3, 96, 80)
        assert not torch.allclose(model.forward_pyramid(x)[0], extra.forward_pyramid(x)[0])


# -- the geometry against the official formulation ----------------------------------------------------------------

def test_window_counts_and_the_zero_padded_window_match_unfold():
    for size in [(7, 9), (1, 4), (2, 2)]:
        ones = F.unfold(torch.ones(1, 1, *size), 3, padding=1)  # [1, 9, N]
        assert torch.equal(window_counts(size, 3), ones.sum(1)[0])


def test_cpb_coordinates_follow_the_official_recipe():
    index, table = cpb_coordinates((4, 6), (2, 3), (7, 7))
    q = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1).view(-1, 2)
    k = torch.stack(torch.meshgrid(torch.tensor([0.5, 2.5]), torch.tensor([0.5, 2.5, 4.5]), indexing="ij"), -1)
    rel = (q[:, None] - k.view(-1, 2)[None]) / 6 * 8
    expected = torch.sign(rel) * torch.log2(rel.abs() + 1) / 3
    assert index.shape == (24 * 6,)
    assert torch.allclose(table[index].view(24, 6, 2), expected, atol=1e-6)


def test_fixed_pool_size_keeps_the_pooled_grid():
    model = _build("test_transnext", num_classes=0, fixed_pool_size=3)
    for size in [(16, 16), (30, 21)]:
        geo = model.stage_geometry(0, size, torch.device("cpu"))
        assert geo.pool == (3, 3)
        assert torch.allclose(geo.length_scale, torch.log(window_counts(size, 3)[:, None] + 9))
    assert model.stage_geometry(3, (5, 7), torch.device("cpu")).pool == (5, 7)  # full attention stage


# -- variants --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,millions", [
    ("transnext_micro", 12.81), ("transnext_tiny", 28.26), ("transnext_small", 49.74), ("transnext_base", 89.72),
    ("transnext_micro_aaaa", 13.11), ("transnext_small_384", 49.74), ("transnext_base_384", 89.72),
])
def test_published_parameter_counts(name, millions):
    with torch.device("meta"):
        model = _build(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.006)


def test_variant_settings():
    with torch.device("meta"):
        aaaa = _build("transnext_micro_aaaa")
        ft = _build("transnext_base_384")
    assert aaaa.sr_ratios == [16, 8, 4, 2] and aaaa.img_size == aaaa.pretrain_size == 256
    assert aaaa.min_input_size == 64
    assert ft.img_size == 384 and ft.pretrain_size == 224
    for name in ("transnext_micro", "transnext_tiny", "transnext_small", "transnext_base", "transnext_micro_aaaa",
                 "transnext_small_384", "transnext_base_384", "test_transnext"):
        assert BACKBONES.owner_class(name) is TransNeXt


# -- sizes, gradients, checkpointing, errors ---------------------------------------------------------------------

@pytest.mark.parametrize("size", [(97, 131), (32, 33), (65, 40), (224, 100)])
def test_odd_sizes_give_ceil_stride_pyramids(size):
    model = _build("test_transnext", num_classes=4).eval()
    with torch.no_grad():
        maps = model.forward_pyramid(torch.randn(1, 3, *size))
        logits = model(torch.randn(2, 3, *size))
    h, w = size
    expected = []
    for i, info in enumerate(model.feature_info):
        h, w = -(-h // (4 if i == 0 else 2)), -(-w // (4 if i == 0 else 2))
        expected.append((info["num_chs"], h, w))
    assert [tuple(m.shape[1:]) for m in maps] == expected
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert logits.shape == (2, 4) and all(torch.isfinite(m).all() for m in maps)


def _randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kwargs", [{}, {"window_size": (3, 3, 5, 3), "sr_ratios": (4, 2, 2, 2)}])
def test_gradients_reach_every_parameter(kwargs):
    model = _build("test_transnext", num_classes=3, **kwargs).train()
    _randomize(model)
    x = torch.randn(2, 3, 70, 66)
    (model(x).square().sum() + sum(m.square().mean() for m in model.forward_pyramid(x))).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_grad_checkpointing_per_stage_gives_the_same_outputs_and_gradients():
    model = _build("test_transnext", num_classes=3)
    _randomize(model)
    x = torch.randn(1, 3, 48, 40)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True, stages=[0, 2])
    assert model.grad_checkpointing == [True, False, True, False]
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n
    with pytest.raises(ValueError, match="stage index 4"):
        model.set_grad_checkpointing(True, stages=[4])


def test_device_and_dtype_are_threaded_through():
    model = _build("test_transnext", dtype=torch.float64, num_classes=3)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.randn(1, 3, 40, 40, dtype=torch.float64)).dtype == torch.float64


def test_input_checks_and_argument_errors():
    model = _build("test_transnext")
    with pytest.raises(InputSizeError, match="needs H and W >= 32"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(InputSizeError, match=r"expects input \[B, 3, H, W\]"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="bias_mode must be one of"):
        TransNeXt(bias_mode="extrapolation")
    with pytest.raises(ValueError, match="needs a window_size"):
        TransNeXt(window_size=(3, None, 3, None))
    with pytest.raises(ValueError, match="one value per stage"):
        TransNeXt(depths=(1, 1, 1))
    with pytest.raises(RuntimeError, match="no classifier"):
        _build("test_transnext", num_classes=0)(torch.randn(1, 3, 32, 32))


def test_reset_classifier_and_length_scale_of_full_attention():
    model = _build("test_transnext", num_classes=5).eval()
    model.reset_classifier(0)
    assert model.get_classifier() is None and not any(k.startswith("head.") for k in model.state_dict())
    model.reset_classifier(2)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    geo = model.stage_geometry(3, (3, 5), torch.device("cpu"))
    assert geo.length_scale.item() == pytest.approx(math.log(15))


def test_bf16_autocast_forward_and_backward():
    model = _build("test_transnext", num_classes=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(1, 3, 64, 72))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert model.block1[0].attn.learnable_tokens.grad is not None


def test_timm_registration():
    timm = pytest.importorskip("timm")
    import attnseg  # noqa: F401  (registers the attnseg_* names)

    names = set(timm.list_models("attnseg_transnext*"))
    assert {"attnseg_transnext_micro", "attnseg_transnext_tiny", "attnseg_transnext_small", "attnseg_transnext_base",
            "attnseg_transnext_micro_aaaa", "attnseg_transnext_small_384", "attnseg_transnext_base_384"} == names
    assert "attnseg_test_transnext" not in timm.list_models("attnseg_*")
    model = timm.create_model("attnseg_transnext_micro", features_only=True, out_indices=(1, 3),
                              depths=(1, 1, 1, 1)).eval()
    assert model.feature_info.channels() == [96, 384] and model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 70, 90))
    assert [tuple(m.shape) for m in maps] == [(1, 96, 9, 12), (1, 384, 3, 3)]


def test_docstring_examples():
    import doctest

    import attnseg.backbones.transnext as module

    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def _unfold_aggregated_attention(attn, x, geo):
    """The paper's aggregated attention written with a full-size unfold of keys and values (the official recipe)."""
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    (hh, ww), ws = geo.size, attn.window_size
    q_hat, q_s = attn.query(attn.q(x).view(b, n, h, d).transpose(1, 2), geo)
    k, v = attn.kv(x).chunk(2, dim=-1)
    k = F.normalize(k.view(b, n, h, d), dim=-1).reshape(b, n, c)
    unf = lambda t: F.unfold(t.transpose(1, 2).reshape(b, c, hh, ww), ws, padding=ws // 2)  # noqa: E731
    k_loc = unf(k).view(b, h, d, ws * ws, n).permute(0, 1, 4, 2, 3)  # [B, h, N, d, ws^2]
    v_loc = unf(v).view(b, h, d, ws * ws, n).permute(0, 1, 4, 2, 3)
    inside = F.unfold(torch.ones(1, 1, hh, ww, dtype=x.dtype), ws, padding=ws // 2)[0].t() > 0  # [N, ws^2]
    local = (q_s.unsqueeze(-2) @ k_loc).squeeze(-2) + attn.relative_pos_bias_local.unsqueeze(1)
    local = local.masked_fill(~inside, float("-inf"))
    pooled = F.adaptive_avg_pool2d(F.gelu(attn.sr(x.transpose(1, 2).reshape(b, c, hh, ww))), geo.pool)
    k_p, v_p = attn.kv(attn.norm(pooled.flatten(2).transpose(1, 2))).view(b, -1, 2 * h, d).transpose(1, 2).chunk(2, 1)
    logits = torch.cat([local, q_s @ F.normalize(k_p, dim=-1).transpose(-2, -1) + attn.position_bias(geo)], -1)
    a_loc, a_pool = logits.softmax(-1).split([ws * ws, logits.shape[-1] - ws * ws], -1)
    w = a_loc + q_hat @ attn.learnable_tokens + attn.learnable_bias
    out = (w.unsqueeze(-2) @ v_loc.transpose(-2, -1)).squeeze(-2) + a_pool @ v_p
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("window,size", [(3, (13, 11)), (5, (9, 17))])
def test_aggregated_attention_on_ops_equals_the_unfold_formulation_with_gradients(window, size):
    model = _build("test_transnext", num_classes=0, window_size=(window, 3, 3, None), dtype=torch.float64)
    _randomize(model)
    attn = model.block1[0].attn
    geo = model.stage_geometry(0, size, torch.device("cpu"))
    geo = type(geo)(**{**geo.__dict__, "length_scale": geo.length_scale.double()})
    x = torch.randn(2, size[0] * size[1], 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, size[0] * size[1], 16, dtype=torch.float64)
    results = []
    for fn in (lambda: attn(x, geo), lambda: _unfold_aggregated_attention(attn, x, geo)):
        x.grad = None
        attn.zero_grad()
        out = fn()
        (out * grad).sum().backward()
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in attn.parameters()]))
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    assert torch.allclose(o1, o2, atol=1e-10) and torch.allclose(gx1, gx2, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(gp1, gp2))
