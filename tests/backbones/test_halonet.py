import pytest
import timm
import torch
import torch.nn.functional as F

from attnseg.backbones.halonet import MODEL_CFGS, HaloAttn, HaloNet, interleave
from attnseg.convert import from_official
from attnseg.errors import CheckpointError
from attnseg.registry import BACKBONES
from tests.conftest import load_fixture


def test_parity_with_the_timm_fixture():
    fx = load_fixture("halonet_tiny_cfg.pt")
    model = from_official("halonet", fx["constructor"], fx["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model(fx["input"]), fx["output"], **fx["tolerance"])
        feats = model.forward_intermediates(fx["input"])
    for ours, ref in zip(feats, fx["features"], strict=True):
        assert torch.allclose(ours, ref, **fx["tolerance"])
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == \
        [(f["num_chs"], f["reduction"]) for f in fx["feature_info"]]


def _perturbed_timm(name, size):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=7, img_size=size).eval()
    sd = {k: (v + 0.05 * torch.randn_like(v) if v.dtype.is_floating_point else v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd)
    return ref, sd


TIMM_NAMES = ["halonet26t", "sehalonet33ts", "eca_halonext26ts", "haloregnetz_b", "halonet50ts", "halonet_h1"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("halonet50ts", "halonet_h1")
                                  else n for n in TIMM_NAMES])
def test_every_variant_equals_timm_with_timm_weights(name):
    size = 224 if name == "haloregnetz_b" else 256
    ref, sd = _perturbed_timm(name, size)
    model = from_official("halonet", {"name": name, "kwargs": {"num_classes": 7}}, sd)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
        ours = model.forward_intermediates(x)
        theirs = ref.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_non_multiple_sizes_pad_with_zeros_like_the_halo_and_crop():
    # a layer on a 13x10 map equals the same layer on the zero-padded 16x16 map, cropped
    torch.manual_seed(0)
    attn = HaloAttn(32, stride=2, num_heads=4, block_size=8, halo_size=2).eval()
    x = torch.randn(2, 32, 13, 10)
    with torch.no_grad():
        out = attn(x)
        padded = attn(F.pad(x, (0, 6, 0, 3)))
    assert out.shape == (2, 32, 7, 5)
    assert torch.allclose(out, padded[:, :, :7, :5])


def test_gradients_and_channels_last():
    model = BACKBONES.get("test_halonet")(num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    # the last BN of each residual branch starts at zero (timm's zero_init_last), so check the rest got gradients
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.contiguous(memory_format=torch.channels_last)), atol=1e-5)


def test_interleave_and_errors():
    assert interleave(3, [2]) == ("bottle", "bottle", "self_attn")
    assert interleave(4, 4) == ("bottle", "bottle", "bottle", "self_attn")
    assert interleave(6) == ("bottle", "self_attn") * 3
    with pytest.raises(ValueError, match="unknown HaloNet cfg 'halonet26'.*did you mean 'halonet26t'"):
        HaloNet(cfg="halonet26")
    with pytest.raises(CheckpointError, match="not HaloNet keys"):
        from_official("halonet", {"name": "halonet26t", "kwargs": {}}, {"stages.0.0.lambda.qkv.weight": 0})
    with pytest.raises(ValueError, match="stem_type='quad'"):
        from_official("halonet", {"name": "ByobNet", "kwargs": {"cfg": {"blocks": [], "stem_chs": 8,
                                                                          "stem_type": "quad"}}}, {})


@pytest.mark.slow
def test_torch_compile_gives_the_same_output():
    model = BACKBONES.get("test_halonet")(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(x), model(x), atol=1e-4)


def test_paper_rows_h0_to_h7():
    from attnseg.backbones.halonet import PAPER_ROWS, paper_cfg

    # timm's halonet_h1 is the paper's H1 row in the same block design
    assert paper_cfg(b=8, h=3, rv=1.0, rb=1.0, l3=10) == MODEL_CFGS["halonet_h1"]
    assert set(PAPER_ROWS) == {f"halonet_h{i}" for i in (0, 2, 3, 4, 5, 6, 7)}
    h5 = MODEL_CFGS["halonet_h5"]
    assert [len(s.types) for s in h5.stages] == [3, 3, 23, 3] and h5.num_features == 1536
    assert [s.channels for s in h5.stages] == [128, 256, 512, 1024]  # widths x rb = 2.0
    model = BACKBONES.get("halonet_h0")(num_classes=0).eval()
    attn = model.stages[2][0].self_attn
    assert (attn.block_size, attn.halo_size, attn.dim_head_v * attn.num_heads) == (8, 3, 256)  # value width x rv
    with torch.no_grad():
        maps = model.forward_pyramid(torch.randn(1, 3, 96, 80))
    assert [m.shape[1] for m in maps] == [32, 64, 128, 256]
