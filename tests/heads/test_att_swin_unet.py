"""Att-SwinU-Net's CCA token decoder (attnseg.heads.att_swin_unet) and the published pairing (attnseg.models)."""

import doctest

import pytest
import torch

import attnseg.heads.att_swin_unet as head_module
import attnseg.models.att_swin_unet as model_module
from attnseg import build_model, load_config
from attnseg.convert.att_swin_unet import convert_cross_transformer
from attnseg.errors import InputSizeError
from attnseg.heads.att_swin_unet import AttSwinUNetHead, CrossContextAttention, PatchExpand
from attnseg.models import Segmentor
from attnseg.models.att_swin_unet import AttSwinUNet, SwinUnetEncoder
from attnseg.registry import BACKBONES, HEADS, MODELS
from tests.conftest import REPO_ROOT, load_fixture


def _perturbed(module, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def _small_head(**kw):
    args = dict(num_classes=3, num_heads=[1, 2, 4], window_size=4, cca_heads=2, cca_head_dim=8)
    return AttSwinUNetHead([16, 32, 64, 128], [4, 8, 16, 32], **{**args, **kw})


def _pyramid(size=(64, 96), channels=(16, 32, 64, 128), batch=2):
    return [torch.randn(batch, c, size[0] // s, size[1] // s) for c, s in zip(channels, (4, 8, 16, 32))]


# -- cross-contextual attention -----------------------------------------------------------------------------------

def test_cca_parity_with_the_official_crosstransformer_fixture():
    fx = load_fixture("att_swin_unet_cca_block.pt")
    (case,) = fx["cases"]
    kw = case["constructor"]["kwargs"]
    assert kw["sm_dim"] == kw["lg_dim"]  # the official decoder always pairs equal widths
    cca = CrossContextAttention(kw["sm_dim"], kw["depth"], kw["heads"], kw["dim_head"], kw["dropout"]).eval()
    cca.load_state_dict(convert_cross_transformer(case["state_dict"]))
    with torch.no_grad():
        x, s = cca(case["input"]["sm_tokens"], case["input"]["lg_tokens"])
    tol = {k: case["tolerance"][k] for k in ("atol", "rtol")}
    assert torch.allclose(x, case["output"]["sm_tokens"], **tol)
    assert torch.allclose(s, case["output"]["lg_tokens"], **tol)
    assert not torch.allclose(x[:, 0], case["input"]["sm_tokens"][:, 0], atol=1e-2)  # token 0 really moved


def test_faithful_cca_rewrites_only_token_0_and_never_reads_token_0_of_the_other_stream():
    cca = _perturbed(CrossContextAttention(16, depth=2, heads=2, head_dim=8)).eval()
    x, s = torch.randn(2, 30, 16), torch.randn(2, 20, 16)  # streams may differ in length
    with torch.no_grad():
        x2, s2 = cca(x, s)
        assert torch.equal(x2[:, 1:], x[:, 1:]) and torch.equal(s2[:, 1:], s[:, 1:])
        assert (x2[:, 0] - x[:, 0]).abs().min() > 1e-3 and (s2[:, 0] - s[:, 0]).abs().min() > 1e-3
        # the decoder summary attends to the skip tokens 1.. only (token 0 is dropped from the key set) ...
        s_moved = s.clone()
        s_moved[:, 0] += 5.0
        assert torch.equal(cca(x, s_moved)[0], x2)
        # ... and starts from the mean of all its own tokens, token 0 included
        x_moved = x.clone()
        x_moved[:, 0] += 5.0 * torch.randn(16)
        assert not torch.allclose(cca(x_moved, s)[0][:, 0], x2[:, 0], atol=1e-3)


def test_broadcast_cca_adds_one_update_to_every_token_and_differs_from_faithful():
    faithful = _perturbed(CrossContextAttention(16, depth=2, heads=2, head_dim=8)).eval()
    broadcast = CrossContextAttention(16, depth=2, heads=2, head_dim=8, mode="broadcast").eval()
    broadcast.load_state_dict(faithful.state_dict())  # same parameters in both modes
    x, s = torch.randn(2, 30, 16), torch.randn(2, 30, 16)
    with torch.no_grad():
        xb, sb = broadcast(x, s)
        xf, _ = faithful(x, s)
        delta = xb - x  # [B, L, C]: the same vector for every token, and not zero
        assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-6) and delta.abs().min() > 1e-4
        assert (sb - s).abs().amin(dim=(1, 2)).gt(1e-6).all()
        assert not torch.allclose(xb, xf, atol=1e-3)
        # the context is the whole other stream, token 0 included
        s_moved = s.clone()
        s_moved[:, 0] += 5.0
        assert not torch.allclose(broadcast(x, s_moved)[0], xb, atol=1e-4)


def test_patch_expand_layout_is_p1_p2_c():
    pe = PatchExpand(4, 2, scale=2)
    with torch.no_grad():
        pe.expand.weight.copy_(torch.eye(8, 4))  # output channels 0-3 = the input, 4-7 = 0
        pe.norm = torch.nn.Identity()
    x = torch.arange(4.0).view(1, 1, 1, 4)
    out = pe(x)  # channels (p1, p2, c) = (0,0,:) -> [0, 1], (0,1,:) -> [2, 3], (1,0,:) -> 0, (1,1,:) -> 0
    assert out.shape == (1, 2, 2, 2)
    assert out[0, 0, 0].tolist() == [0.0, 1.0] and out[0, 0, 1].tolist() == [2.0, 3.0]
    assert out[0, 1].abs().sum() == 0


# -- the head ------------------------------------------------------------------------------------------------------

def test_head_output_shape_levels_and_skip_level_selection():
    head = _small_head(skip_levels=2)
    assert [level.cca is not None for level in head.levels] == [False, True, True]  # the two deepest skips
    assert [level.upsample is not None for level in head.levels] == [False, True, True]
    assert all(isinstance(a, torch.nn.Identity) for a in head.adapters)  # widths already double from 16
    out = head(_pyramid(), torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 3, 64, 96) and torch.isfinite(out).all()
    assert [level.cca is not None for level in _small_head(skip_levels=0).levels] == [False] * 3
    assert HEADS.get("att_swin_unet") is AttSwinUNetHead


def test_cca_mode_changes_the_decoder_output():
    faithful = _perturbed(_small_head()).eval()
    broadcast = _small_head(cca_mode="broadcast").eval()
    broadcast.load_state_dict(faithful.state_dict())
    feats = _pyramid()
    with torch.no_grad():
        a, b = faithful(feats, torch.randn(2, 3, 64, 96)), broadcast(feats, torch.randn(2, 3, 64, 96))
    assert (a - b)[..., :16, :16].abs().max() > 1e-3 and (a - b)[..., 48:, 80:].abs().max() > 1e-3


def test_img_size_keeps_official_mask_buffers_for_shifted_levels_only():
    head = AttSwinUNetHead([8, 16, 32, 64], [4, 8, 16, 32], 9, num_heads=[1, 2, 4], img_size=224)
    masks = {k: v.shape for k, v in head.state_dict().items() if k.endswith("attn_mask")}
    assert masks == {"levels.0.blocks.1.attn_mask": (64, 49, 49), "levels.1.blocks.1.attn_mask": (16, 49, 49),
                     "levels.2.blocks.1.attn_mask": (4, 49, 49)}
    enc = SwinUnetEncoder(embed_dim=8, num_heads=(1, 2, 4, 8), img_size=224)
    enc_masks = sorted(k for k in enc.state_dict() if k.endswith("attn_mask"))
    assert enc_masks == [f"layers.{s}.blocks.1.attn_mask" for s in range(3)]  # stage 4 (7x7) is one window


@pytest.mark.parametrize("name", ["test_mambaout", "test_nat", "test_biformer"])
def test_head_over_other_backbones_trains(name):
    backbone = BACKBONES.get(name)(num_classes=0)
    channels = [f["num_chs"] for f in backbone.feature_info]
    strides = [f["reduction"] for f in backbone.feature_info]
    head = AttSwinUNetHead(channels, strides, num_classes=2, num_heads=[1, 2, 4], window_size=4, cca_heads=2,
                           cca_head_dim=8, cca_mode="broadcast" if name == "test_nat" else "faithful",
                           drop_path_rate=0.0)  # a dropped residual branch would get no gradient
    widths = [16, 32, 64, 128]
    assert [not isinstance(a, torch.nn.Identity) for a in head.adapters] == [c != w for c, w in zip(channels, widths)]
    model = Segmentor(backbone, head)
    x = torch.randn(2, 3, 70, 45)
    out = model(x)
    assert out.shape == (2, 2, 70, 45)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("size", [(97, 131), (300, 500)])
def test_any_input_size_through_the_segmentor(size):
    model = MODELS.get("test_att_swin_unet")(num_classes=4, img_size=None).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 4, *size) and torch.isfinite(out).all()
    assert model.size_divisor == 32 and model.padded_size(size) == tuple(-(-n // 32) * 32 for n in size)


def test_head_input_checks_name_the_problem():
    head = _small_head()
    with pytest.raises(InputSizeError, match="divisible by 32"):
        head(_pyramid(), torch.randn(2, 3, 64, 80))
    with pytest.raises(ValueError, match="expects 4 pyramid levels"):
        head(_pyramid()[:3], torch.randn(2, 3, 64, 96))
    with pytest.raises(ValueError, match=r"pyramid level 1 \(stride 8\) should be \[B, 32, 8, 12\]"):
        head([f if i != 1 else f[:, :, :4] for i, f in enumerate(_pyramid())], torch.randn(2, 3, 64, 96))


@pytest.mark.parametrize("kwargs, message", [
    ({"strides": [8, 16, 32, 64]}, "strides 4, 8, 16, ... doubling from 4"),
    ({"in_channels": [16, 32, 64]}, "one value per pyramid level"),
    ({"spatial_dims": 3}, "2D only"),
    ({"num_classes": 0}, "num_classes must be an int >= 1, got num_classes=0"),
    ({"cca_mode": "brodcast"}, "cca_mode must be one of faithful, broadcast, got 'brodcast'; did you mean 'broadcast'"),
    ({"skip_levels": 4}, r"skip_levels must be an int in \[0, 3\]"),
    ({"depths": [2, 2]}, "depths needs 3 values >= 1"),
    ({"num_heads": [1, 3, 4]}, "width 32, 3 heads"),
    ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
    ({"img_size": 100}, "img_size must be one or two sizes divisible by 32"),
    ({"window_size": 0}, "window_size must be an int >= 1"),
])
def test_bad_head_arguments(kwargs, message):
    args = dict(in_channels=[16, 32, 64, 128], strides=[4, 8, 16, 32], num_classes=2, num_heads=[1, 2, 4])
    with pytest.raises(ValueError, match=message):
        AttSwinUNetHead(**{**args, **kwargs})


def test_postprocess_binary_and_multiclass():
    head = _small_head()
    logits = torch.tensor([[[[0.3, -0.2]], [[0.1, 0.5]]]])  # [1, 2, 1, 2]
    assert head.postprocess(logits).tolist() == [[[0, 1]]]
    assert head.postprocess(logits[:, :1]).tolist() == [[[1, 0]]]


# -- the published pairing ------------------------------------------------------------------------------------------

def test_pairing_repeats_gray_images_and_honours_num_classes():
    model = _perturbed(MODELS.get("test_att_swin_unet")(num_classes=2), scale=0.05).eval()
    assert isinstance(model, AttSwinUNet) and model.in_chans == 3 and model.num_classes == 2
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x.repeat(1, 3, 1, 1)))
    assert model(x).shape == (1, 2, 64, 64)
    with pytest.raises(InputSizeError, match="expects 3 input channels"):
        model(torch.randn(1, 2, 64, 64))


def test_encoder_pyramid_is_stage_inputs_and_the_normed_bottleneck():
    enc = SwinUnetEncoder(embed_dim=8, num_heads=(1, 2, 4, 8), img_size=None).eval()
    x = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        pyramid = enc.forward_pyramid(x)
        embed = enc.patch_embed(x)
        stage0 = enc.layers[0](embed)
    assert [(f["num_chs"], f["reduction"]) for f in enc.feature_info] == [(8, 4), (16, 8), (32, 16), (64, 32)]
    assert [tuple(p.shape[1:]) for p in pyramid] == [(8, 18, 25), (16, 9, 13), (32, 5, 7), (64, 3, 4)]
    assert torch.equal(pyramid[0], embed.movedim(-1, 1)) and torch.equal(pyramid[1], stage0.movedim(-1, 1))
    with pytest.raises(InputSizeError, match=r"expects \[B, 3, H, W\]"):
        enc(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible by its num_heads"):
        SwinUnetEncoder(embed_dim=8, num_heads=(3, 6, 12, 24))
    with pytest.raises(ValueError, match="num_classes must be 0"):
        SwinUnetEncoder(num_classes=10)


def test_pairing_argument_errors():
    with pytest.raises(TypeError, match=r"unexpected arguments \['feature_size'\]"):
        MODELS.get("test_att_swin_unet")(feature_size=12)
    with pytest.raises(ValueError, match="skip_levels must be an int"):
        MODELS.get("test_att_swin_unet")(skip_levels=5)


@pytest.mark.slow  # full-size models: about 7 s each on 2 cores
@pytest.mark.parametrize("config, classes, adapted", [
    ("att_swin_unet_tiny_skin_binary.yaml", 1, [False] * 4),
    ("att_swin_unet_tiny_skin_multiclass.yaml", 3, [False] * 4),
    ("mambaout_tiny_att_swin_unet_skin_binary.yaml", 1, [False, False, False, True]),  # 576 -> 768 at stride 32
])
def test_shipped_configs_build_and_run_at_odd_sizes(config, classes, adapted):
    model = build_model(load_config(REPO_ROOT / "configs" / "att_swin_unet" / config)).eval()
    assert [not isinstance(a, torch.nn.Identity) for a in model.head.adapters] == adapted
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, classes, 97, 131)


@pytest.mark.parametrize("module", [head_module, model_module])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": torch},
                             optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
