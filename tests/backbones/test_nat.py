from pathlib import Path

import pytest
import torch

from attnseg import load_pretrained
from attnseg.backbones.nat import NAT, DiNATs, GlobalAttentionRPB, NATIsotropic, resolve_dilations
from attnseg.convert import from_official
from attnseg.convert.nat import convert_state_dict, resize_rpb
from attnseg.errors import CheckpointError, InputSizeError
from attnseg.layers import relative_position_bias_2d, resize_rel_pos_table
from attnseg.registry import BACKBONES
from tests.conftest import load_fixture

FIXTURES = ["nat_tiny_cfg.pt", "dinat_tiny_cfg.pt", "dinat_s_tiny_cfg.pt"]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_parity_with_official_fixture(fixture):
    fx = load_fixture(fixture)
    model = from_official("nat", fx["constructor"], fx["state_dict"])
    assert not model.training and not model.pyramid_norm
    tol = fx["tolerance"]
    with torch.no_grad():
        out = model(fx["input"])
        feats = model.forward_intermediates(fx["input"])
        pyramid = model.forward_pyramid(fx["input"])
    assert out.shape == fx["output"].shape
    assert torch.allclose(out, fx["output"], **tol)
    for ours, nchw, ref in zip(feats, pyramid, fx["features"], strict=True):
        assert torch.allclose(ours, ref, **tol)  # NHWC level outputs before the downsampler
        assert torch.allclose(nchw, ref.permute(0, 3, 1, 2), **tol)


def test_dinat_family_name_and_factory_records_work_too():
    fx = load_fixture("dinat_tiny_cfg.pt")
    constructor = {"name": "dinat_tiny", "kwargs": {**fx["constructor"]["kwargs"], "pretrained": False}}
    model = from_official("dinat", constructor, fx["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model(fx["input"]), fx["output"], **fx["tolerance"])


def test_rpb_matters_and_is_oriented():
    # swapping the two rpb axes must change the output (the fixture records by how much)
    fx = load_fixture("nat_tiny_cfg.pt")
    sd = {k: (v.transpose(1, 2) if k.endswith("attn.rpb") else v) for k, v in fx["state_dict"].items()}
    model = from_official("nat", fx["constructor"], sd)
    with torch.no_grad():
        delta = (model(fx["input"]) - fx["output"]).abs().max()
    assert delta > 10 * fx["tolerance"]["atol"]


def test_small_maps_are_padded_like_natten_0_14():
    # level 1 is 8x8 at 32x32 input, below kernel 7 * dilation 2 = 14: the module pads LN(x) with zeros to 14x14
    # before the qkv projection and crops after, so the padded keys are the qkv bias
    model = NAT(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), dilations=[1, 2, 1, 1],
                num_classes=0, drop_path_rate=0.0).eval()
    attn = model.levels[1].blocks[0].attn
    x = torch.randn(1, 8, 8, 16)
    with torch.no_grad():
        out = attn(x)
        padded = torch.nn.functional.pad(x, (0, 0, 0, 6, 0, 6))
        from attnseg import ops

        q, k, v = attn.qkv(padded).reshape(1, 14, 14, 3, 1, 16).unbind(3)
        want = attn.proj(ops.na2d(q, k, v, 7, 2, rpb=attn.rpb, backend="reference").reshape(1, 14, 14, 16))
    assert torch.allclose(out, want[:, :8, :8], atol=1e-5)


def test_gradients_reach_every_parameter():
    model = BACKBONES.get("test_nat")(num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    loss = model(x).sum() + sum(m.sum() for m in model.forward_pyramid(x))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", ["test_nat", "test_nat_isotropic"])
def test_channels_last_input_gives_the_same_output(name):
    model = BACKBONES.get(name)(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.contiguous(memory_format=torch.channels_last)), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test_nat", "test_nat_isotropic"])
def test_torch_compile_gives_the_same_output(name):
    model = BACKBONES.get(name)(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(x), model(x), atol=1e-4)


def test_dilation_schedules_and_overrides():
    assert resolve_dilations("coco", [3, 4, 6, 2]) == [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3]]
    assert resolve_dilations([1, 2, [1, 3], 4], [1, 2, 2, 1]) == [[1], [2, 2], [1, 3], [4]]
    model = BACKBONES.get("dinat_tiny")(num_classes=0, dilations="ade20k_512", kernel_size=[7, 7, 7, 5])
    assert model.dilations[0] == [1, 16, 1] and model.levels[3].blocks[0].attn.kernel_size == (5, 5)
    assert model.levels[2].blocks[3].attn.dilation == (3, 3)
    with pytest.raises(ValueError, match="unknown dilation schedule 'coc'.*did you mean 'coco'"):
        resolve_dilations("coc", [1, 1, 1, 1])
    with pytest.raises(ValueError, match="level 1: dilations need 2 values"):
        resolve_dilations([[1], [1, 2, 3], [1], [1]], [1, 2, 1, 1])
    with pytest.raises(ValueError, match="level 2: 64 channels are not divisible by num_heads=3"):
        NAT(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 8))


def test_variants_match_the_official_parameter_counts():
    counts = {"nat_mini": 19.98e6, "nat_tiny": 27.90e6, "nat_small": 50.74e6, "dinat_small": 50.72e6}
    for name, want in counts.items():
        with torch.device("meta"):
            model = BACKBONES.get(name)(pyramid_norm=False)
        got = sum(p.numel() for p in model.parameters())
        assert abs(got - want) / want < 0.002, (name, got)
    assert isinstance(BACKBONES.get("dinat_s_tiny")(num_classes=0), DiNATs)


def test_input_checks_name_the_problem():
    model = BACKBONES.get("test_nat")(num_classes=0)
    with pytest.raises(InputSizeError, match="needs H and W >= 32, got 31x64"):
        model.forward_pyramid(torch.randn(1, 3, 31, 64))
    with pytest.raises(InputSizeError, match=r"expects input \[B, 3, H, W\]"):
        model.forward_pyramid(torch.randn(1, 4, 64, 64))


def test_mm_dense_checkpoint_loads_into_a_headless_backbone(tmp_path):
    # mm-style: backbone.* with backbone.norm{i}, plus decoder keys that are set aside
    src = BACKBONES.get("test_nat")(num_classes=0)
    sd = {f"backbone.{k}": v.clone() + 0.5 for k, v in src.state_dict().items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(4, 8, 1, 1)
    torch.save({"state_dict": sd, "meta": {"mmseg_version": "0.20.2"}}, tmp_path / "upernet_dinat.pth")
    model = BACKBONES.get("test_nat")(num_classes=0)
    report = load_pretrained(model, tmp_path / "upernet_dinat.pth")
    assert "decode_head.conv_seg.weight" in report.ignored and not report.missing
    assert torch.equal(model.norm2.weight, sd["backbone.norm2.weight"])


def test_classification_checkpoint_into_dense_backbone_initialises_only_the_pyramid_norms(tmp_path):
    fx = load_fixture("dinat_tiny_cfg.pt")
    torch.save(fx["state_dict"], tmp_path / "dinat.pth")
    kwargs = {k: v for k, v in fx["constructor"]["kwargs"].items() if k != "num_classes"}
    model = NAT(**kwargs, num_classes=0)
    report = load_pretrained(model, tmp_path / "dinat.pth")
    assert sorted(report.initialized) == sorted(k for k in model.state_dict() if k.startswith("norm"))
    assert {k.split(".")[0] for k in report.dropped} == {"head", "norm"}


def _to_hf(sd, prefix):
    """Official NAT keys -> the HF transformers layout (the inverse of the converter, written independently)."""
    parts = {"norm1": "layernorm_before", "attn.rpb": "attention.self.rpb", "attn.proj": "attention.output.dense",
             "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    out, scales = {}, {}
    for k, v in sd.items():
        if k.startswith("patch_embed.proj."):
            out[f"{prefix}.embeddings.patch_embeddings.projection." + k[len("patch_embed.proj."):]] = v
        elif k.startswith("patch_embed.norm."):
            out[f"{prefix}.embeddings.norm." + k[len("patch_embed.norm."):]] = v
        elif k.startswith("norm."):
            out[f"{prefix}.layernorm." + k[5:]] = v
        elif k.startswith("head."):
            out["classifier." + k[5:]] = v
        elif ".downsample." in k:
            out[f"{prefix}.encoder." + k] = v
        else:
            _, lvl, _, blk, rest = k.split(".", 4)
            base = f"{prefix}.encoder.levels.{lvl}.layers.{blk}"
            if rest.startswith("attn.qkv."):
                for name, chunk in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                    out[f"{base}.attention.self.{name}.{rest.split('.')[-1]}"] = chunk
            elif rest in ("gamma1", "gamma2"):
                scales.setdefault(base, {})[rest] = v
            else:
                name = next(hf + rest[len(ours):] for ours, hf in parts.items() if rest.startswith(ours))
                out[f"{base}.{name}"] = v
    for base, g in scales.items():
        out[f"{base}.layer_scale_parameters"] = torch.stack([g["gamma1"], g["gamma2"]])
    return out


@pytest.mark.parametrize("fixture,prefix", [("nat_tiny_cfg.pt", "nat"), ("dinat_tiny_cfg.pt", "dinat")])
def test_hf_transformers_checkpoints_convert(fixture, prefix, tmp_path):
    fx = load_fixture(fixture)
    hf = _to_hf(fx["state_dict"], prefix)
    assert not set(hf) & set(fx["state_dict"])
    model = from_official("nat", fx["constructor"], hf)
    with torch.no_grad():
        assert torch.allclose(model(fx["input"]), fx["output"], **fx["tolerance"])
    torch.save(hf, tmp_path / "hf.bin")  # load_pretrained converts it on its own
    kwargs = {k: v for k, v in fx["constructor"]["kwargs"].items()}
    target = NAT(**kwargs, pyramid_norm=False)
    report = load_pretrained(target, tmp_path / "hf.bin")
    assert report.converted == "nat" and not report.missing


def test_converter_rejects_foreign_keys_and_resizes_rpb():
    with pytest.raises(CheckpointError, match="not NAT/DiNAT keys"):
        convert_state_dict({"encoder.levels.0.layers.0.attention.self.query.weight": torch.zeros(1)})
    table = torch.randn(2, 13, 13)
    assert resize_rpb(table, 7) is table
    assert resize_rpb(table, 11).shape == (2, 21, 21)
    with pytest.raises(ValueError, match="unknown official NAT constructor 'NAT_s'"):
        from_official("nat", {"name": "NAT_s", "kwargs": {}}, {})


def test_dinat_with_the_unetr_head_trains_end_to_end(tmp_path):
    from attnseg.config import validate_config
    from attnseg.engine.runner import train

    cfg = validate_config({
        "work_dir": str(tmp_path),
        "model": {"backbone": {"name": "test_nat", "dilations": "classification_224"},
                  "head": {"name": "unetr", "feature_size": 8}, "num_classes": 3},
        "data": {"dataset": {"name": "synthetic2d", "num_classes": 3, "image_size": [40, 36], "num_train": 4,
                             "num_val": 2, "num_test": 2}, "batch_size": 2, "augment": None},
        "optimizer": {"lr": 0.003},
        "trainer": {"max_epochs": 1, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu", "devices": 1},
    })
    result = train(cfg)
    assert result["global_step"] == 2 and 0.0 <= result["metrics"]["val/mDice"] <= 1.0
    state = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.endswith("attn.rpb") for k in state) and any(".norm3." in k for k in state)


# -- isotropic models -------------------------------------------------------------------------------------------
# tests/fixtures/nat_isotropic_official.pt: the official classification/isotropic.py (d334f5b) run with natten
# 0.17.5 built for CPU, random weights; one case each for NAT-iso (k7), DiNAT-iso (k7, d2) and ViT-RPB.
ISO_FIXTURE = Path(__file__).parents[1] / "fixtures" / "nat_isotropic_official.pt"


def _iso_cases():
    return torch.load(ISO_FIXTURE, map_location="cpu", weights_only=True)["cases"]


@pytest.mark.parametrize("index,name", [(0, "nat_isotropic"), (1, "dinat_isotropic"), (2, "vitrpb")])
def test_isotropic_parity_with_the_official_code(index, name):
    fx = torch.load(ISO_FIXTURE, map_location="cpu", weights_only=True)
    case = fx["cases"][index]
    assert case["name"] == name
    model = from_official("nat", case["constructor"], case["state_dict"])
    assert isinstance(model, NATIsotropic) and model.pyramid is None
    with torch.no_grad():
        out = model(case["input"])
        feats = model.forward_features(case["input"])
    assert torch.allclose(out, case["output"], **fx["tolerance"])
    assert torch.allclose(feats, case["features"][0], **fx["tolerance"])
    # the attention kind and its position bias are what the record says
    attn = model.layers[1].attn
    if name == "vitrpb":
        assert isinstance(attn, GlobalAttentionRPB) and attn.rpb.shape == (2, 13, 13)
    else:
        assert attn.dilation == ((2, 2) if name == "dinat_isotropic" else (1, 1))


def test_vitrpb_bias_is_oriented_and_its_index_checked():
    case = _iso_cases()[2]
    sd = {k: (v.transpose(1, 2) if k.endswith("attn.rpb") else v) for k, v in case["state_dict"].items()}
    with torch.no_grad():
        delta = (from_official("nat", case["constructor"], sd)(case["input"]) - case["output"]).abs().max()
    assert delta > 10 * 1e-4  # the fixture's atol
    bad = dict(case["state_dict"])
    key = next(k for k in bad if k.endswith("relative_position_index"))
    bad[key] = bad[key].t().contiguous()  # Swin's query-minus-key index, not the official one
    with pytest.raises(CheckpointError, match="relative_position_index is not the ViT-RPB index"):
        from_official("nat", case["constructor"], bad)


def test_relative_position_bias_2d_against_a_loop():
    table = torch.randn(3, 9, 7)  # offsets up to 4 rows, 3 columns
    bias = relative_position_bias_2d(table, 4, 3)
    for q in range(12):
        for k in range(12):
            (qy, qx), (ky, kx) = divmod(q, 3), divmod(k, 3)
            assert torch.equal(bias[:, q, k], table[:, ky - qy + 4, kx - qx + 3])
    # a map beyond the table uses it bicubically resized to cover every offset
    big = relative_position_bias_2d(table, 6, 3)
    assert big.shape == (3, 18, 18)
    assert torch.allclose(big[:, 0, 0], resize_rel_pos_table(table, (11, 7))[:, 5, 3])


def test_isotropic_models_run_at_other_sizes_and_keep_official_logits_at_their_own():
    case = _iso_cases()[2]
    model = from_official("nat", case["constructor"], case["state_dict"])
    with torch.no_grad():
        for size in [(16, 16), (80, 112), (97, 131), (224, 224)]:  # maps below, at and beyond the 7x7 table
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_isotropic_variants_and_pyramid():
    counts = {"vitrpb_small": 22.08e6, "nat_isotropic_small": 22.00e6, "dinat_isotropic_base": 86.47e6}
    for name, want in counts.items():
        with torch.device("meta"):
            model = BACKBONES.get(name)(pyramid=False)
        got = sum(p.numel() for p in model.parameters())
        assert abs(got - want) / want < 0.002, (name, got)
    model = BACKBONES.get("test_nat_isotropic")(num_classes=0, out_indices=(1, 3))
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == [(16, 8), (32, 32)]
    assert model.new_key_prefixes == ("pyramid.",)
    with torch.no_grad():
        maps = model.forward_pyramid(torch.randn(2, 3, 64, 80))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 10), (2, 32, 2, 3)]
    with pytest.raises(InputSizeError, match="needs H and W >= 16"):
        model.forward_pyramid(torch.randn(1, 3, 15, 64))


def test_isotropic_gradients_reach_every_parameter():
    for kernel in (7, None):
        model = BACKBONES.get("test_nat_isotropic")(num_classes=3, kernel_size=kernel, img_size=64)
        x = torch.randn(2, 3, 64, 48)
        (model(x).sum() + sum(m.sum() for m in model.forward_pyramid(x))).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, (kernel, missing)


def test_official_vitrpb_checkpoint_loads_into_a_dense_backbone(tmp_path):
    case = _iso_cases()[2]
    torch.save(case["state_dict"], tmp_path / "vitrpb.pth")
    kwargs = {k: v for k, v in case["constructor"]["kwargs"].items() if k not in ("layer", "patch_norm", "num_classes")}
    model = NATIsotropic(**kwargs, num_classes=0)
    report = load_pretrained(model, tmp_path / "vitrpb.pth")
    assert report.converted == "nat" and not report.missing
    assert sorted(report.initialized) == sorted(k for k in model.state_dict() if k.startswith("pyramid."))
    assert torch.equal(model.layers[0].attn.rpb, case["state_dict"]["layers.0.attn.rpb"])
