"""Official Att-SwinU-Net (NITR098/AttSwinUNet @ 4b14f37) and Swin-T ImageNet weights -> attnseg."""

import re

import numpy as np
import pytest
import torch

from attnseg import build_model, load_config, load_pretrained
from attnseg.convert import from_official
from attnseg.convert.att_swin_unet import DROPPED_KEYS, convert_cross_transformer, convert_state_dict, is_official
from attnseg.errors import CheckpointError
from attnseg.heads.att_swin_unet import AttSwinUNetHead
from attnseg.layers.swin import relative_position_index
from attnseg.models import Segmentor
from attnseg.models.att_swin_unet import SwinUnetEncoder, att_swin_unet_tiny
from attnseg.registry import MODELS
from tests.conftest import REPO_ROOT, load_fixture


def _tol(fx):
    return {"atol": fx["tolerance"]["atol"], "rtol": fx["tolerance"]["rtol"]}


def test_parity_with_the_official_model_fixture():
    fx = load_fixture("att_swin_unet_small.pt")
    model = from_official("att_swin_unet", fx["constructor"], fx["state_dict"])
    assert not model.training and model.num_classes == 9 == fx["constructor"]["effective_num_classes"]
    assert [level.cca is not None for level in model.head.levels] == [True] * 3  # skip_num '3'
    x = fx["input"]  # 1 channel: repeated to 3 as the official forward does
    with torch.no_grad():
        out = model(x)
        bottleneck, stage_inputs = model.backbone.forward_tokens(x.expand(-1, 3, -1, -1))
    assert out.shape == fx["output"].shape == (1, 9, 224, 224)
    assert torch.allclose(out, fx["output"], **_tol(fx))
    feats = fx["features"]
    assert torch.allclose(bottleneck.flatten(1, 2), feats["encoder.bottleneck"], **_tol(fx))
    for i in (2, 3):
        assert torch.allclose(stage_inputs[i].flatten(1, 2), feats[f"encoder.x_downsample[{i}]"], **_tol(fx))


def test_the_checkpoint_masks_are_what_runs_at_224():
    # the fixture's attn_mask buffers carry noise: a model computing its masks gives another output
    fx = load_fixture("att_swin_unet_small.pt")
    model = from_official("att_swin_unet", fx["constructor"], fx["state_dict"])
    sd = model.state_dict()
    assert torch.equal(sd["backbone.layers.0.blocks.1.attn_mask"], fx["state_dict"]["encoder.layers.0.blocks.1.attn_mask"])
    assert torch.equal(sd["head.levels.0.blocks.1.attn_mask"],
                       fx["state_dict"]["decoder.layers_up.3.blocks.1.attn_mask"])
    computed = MODELS.get("test_att_swin_unet")(img_size=None).eval()
    computed.load_state_dict({k: v for k, v in sd.items() if not k.endswith("attn_mask")})
    with torch.no_grad():
        delta = (computed(fx["input"]) - fx["output"]).abs().max()
    assert delta > 10 * fx["tolerance"]["atol"]


def _manifest_state_dict(keys, shapes):
    """Zeros of the manifest's shapes, with real index buffers (the converter checks them)."""
    sd = {}
    for key in keys:
        spec = shapes[key]
        if key.endswith("relative_position_index"):
            sd[key] = relative_position_index((7, 7))
        else:
            sd[key] = torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
    return sd


def test_full_size_key_manifest_is_placed_and_the_parameter_count_matches():
    fx = load_fixture("att_swin_unet_keys_default.pt")
    assert len(fx["keys"]) == 316
    official = _manifest_state_dict(fx["keys"], fx["shapes"])
    converted = convert_state_dict(official)
    model = att_swin_unet_tiny(num_classes=9)
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(tuple(converted[k].shape) == tuple(v.shape) for k, v in ours.items())
    # every official key is placed or dropped by name
    dropped = [k for k in official if any(re.fullmatch(p, k) for p in DROPPED_KEYS)]
    assert len(official) == len(converted) + len(dropped)
    assert sorted(k for k in dropped if not k.endswith("relative_position_index")) == [
        "decoder.norm.bias", "decoder.norm.weight", "patch_embed.norm.bias", "patch_embed.norm.weight",
        "patch_embed.proj.bias", "patch_embed.proj.weight"]
    # 32.69 M parameters: ours plus the two dead official modules
    dead = sum(v.numel() for k, v in official.items() if k in dropped and not k.endswith("relative_position_index"))
    assert sum(p.numel() for p in model.parameters()) + dead == fx["num_parameters"] == 32_689_956


def test_official_trainer_file_loads_through_load_pretrained(tmp_path):
    fx = load_fixture("att_swin_unet_small.pt")
    torch.save({"model_weights": fx["state_dict"], "test_F1_score": np.float64(0.9173)}, tmp_path / "w.model")
    model = MODELS.get("test_att_swin_unet")(num_classes=9)
    report = load_pretrained(model, tmp_path / "w.model")
    assert report.converted == "att_swin_unet" and not report.missing and not report.unexpected
    with torch.no_grad():
        assert torch.allclose(model.eval()(fx["input"]), fx["output"], **_tol(fx))
    # a binary model keeps all but the 9-class output layer
    binary = MODELS.get("test_att_swin_unet")(num_classes=1)
    report = load_pretrained(binary, tmp_path / "w.model")
    assert report.dropped == ["head.output.weight"]
    # a config-built Segmentor (plain encoder + head, no family of its own) takes the whole file too
    enc = SwinUnetEncoder(embed_dim=8, num_heads=(1, 2, 4, 8))
    head = AttSwinUNetHead([8, 16, 32, 64], [4, 8, 16, 32], 9, num_heads=[1, 2, 4], img_size=224)
    seg = Segmentor(enc, head)
    report = load_pretrained(seg, tmp_path / "w.model")
    assert not report.missing and not report.unexpected
    with torch.no_grad():
        assert torch.allclose(seg.eval()(fx["input"].expand(-1, 3, -1, -1)), fx["output"], **_tol(fx))
    # the bare encoder takes its part and sets the decoder aside
    enc = SwinUnetEncoder(embed_dim=8, num_heads=(1, 2, 4, 8))
    report = load_pretrained(enc, tmp_path / "w.model")
    assert not report.missing and report.ignored and all(k.startswith("head.") for k in report.ignored)


def test_skip_num_and_modes_of_the_official_record():
    fx = load_fixture("att_swin_unet_small.pt")
    cfg = fx["constructor"]["config"]
    for skip_num, levels in (("1", [False, False, True]), ("2", [False, True, True]), (3, [False] * 3)):
        model = from_official("att_swin_unet", {"config": {**cfg, "skip_num": skip_num}}, fx["state_dict"])
        assert [level.cca is not None for level in model.head.levels] == levels  # unused CCA weights dropped
    plain = {k: v for k, v in fx["state_dict"].items() if "Crossvit_layer" not in k}  # mode 'swin' builds no CCA
    model = from_official("att_swin_unet", {"config": {**cfg, "mode": "swin", "spatial_attention": "0"}}, plain)
    assert all(level.cca is None for level in model.head.levels)
    with pytest.raises(ValueError, match="concatenates each skip twice"):
        from_official("att_swin_unet", {"config": {**cfg, "mode": "swin"}}, plain)
    with pytest.raises(ValueError, match="image_size 224 only"):
        from_official("att_swin_unet", {"config": {**cfg, "image_size": 256}}, fx["state_dict"])
    with pytest.raises(CheckpointError, match="whole SwinAttentionUnet"):
        from_official("att_swin_unet", {"config": cfg},
                      {k: v for k, v in fx["state_dict"].items() if k.startswith("encoder.")})


def test_swin_t_imagenet_initialisation_follows_swin_unet(tmp_path):
    # a Microsoft-layout checkpoint (index buffers, classifier, Swin-T's 6 blocks in stage 3), Swin-Unet's mapping
    src = SwinUnetEncoder(embed_dim=8, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8))
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    sd = dict(src.state_dict())
    for name, module in src.named_modules():
        if name.endswith(".attn"):
            sd[f"{name}.relative_position_index"] = module.relative_position_index.clone()
    sd["head.weight"], sd["head.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    assert is_official(sd) and not is_official(src.state_dict())
    torch.save({"model": sd}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    model = MODELS.get("test_att_swin_unet")(num_classes=2)
    report = load_pretrained(model, tmp_path / "swin_tiny_patch4_window7_224.pth", strict=False)
    assert report.converted == "att_swin_unet"
    assert sorted({re.sub(r"\.blocks\.(\d+)\..*", r".blocks.\1", k) for k in report.unexpected}) == [
        f"backbone.layers.2.blocks.{j}" for j in range(2, 6)] + [f"head.levels.2.blocks.{j}" for j in range(2, 6)]
    ours = model.state_dict()
    assert torch.equal(ours["backbone.layers.1.blocks.1.attn.qkv.weight"], sd["layers.1.blocks.1.attn.qkv.weight"])
    assert torch.equal(ours["head.levels.1.blocks.1.attn.qkv.weight"], sd["layers.1.blocks.1.attn.qkv.weight"])
    assert torch.equal(ours["backbone.norm.weight"], sd["norm.weight"])
    missing = {re.sub(r"\.\d+\..*|\.(weight|bias)$", "", k) for k in report.missing}
    assert missing == {"head.expand.expand", "head.expand.norm", "head.levels", "head.norm",
                       "head.final_expand.expand", "head.final_expand.norm", "head.output"}
    assert not any(".blocks." in k for k in report.missing)  # every decoder block got Swin-T weights


def test_converter_refuses_what_it_cannot_place():
    fx = load_fixture("att_swin_unet_small.pt")
    sd = dict(fx["state_dict"])
    with pytest.raises(CheckpointError, match=r"1 key\(s\) have no place .*decoder\.extra\.weight"):
        convert_state_dict({**sd, "decoder.extra.weight": torch.zeros(1)})
    bad_index = sd["encoder.layers.0.blocks.0.attn.relative_position_index"].t().contiguous()
    with pytest.raises(CheckpointError, match="not the Swin relative position index"):
        convert_state_dict({**sd, "encoder.layers.0.blocks.0.attn.relative_position_index": bad_index})
    with pytest.raises(CheckpointError, match="not CrossTransformer keys: layers.0.0.project_in.weight"):
        convert_cross_transformer({"layers.0.0.project_in.weight": torch.zeros(1)})


def test_official_file_into_the_shipped_binary_config(tmp_path):
    # the config's model at the fixture's size (overrides): an official file loads, minus its 9-class output layer
    fx = load_fixture("att_swin_unet_small.pt")
    torch.save({"model_weights": fx["state_dict"], "test_F1_score": np.float64(0.9)}, tmp_path / "w.model")
    cfg = load_config(REPO_ROOT / "configs/att_swin_unet/att_swin_unet_tiny_skin_binary.yaml",
                      ["model.backbone.name=test_swin_unet_encoder", "model.head.num_heads=[1, 2, 4]"])
    model = build_model(cfg)
    report = load_pretrained(model, tmp_path / "w.model")
    assert report.converted == "att_swin_unet" and report.dropped == ["head.output.weight"]
    assert not report.missing and not report.unexpected
    nine = MODELS.get("test_att_swin_unet")(num_classes=9)
    load_pretrained(nine, tmp_path / "w.model")
    model.head.output.weight.data.copy_(nine.head.output.weight[:1])
    with torch.no_grad():
        assert torch.allclose(model.eval()(fx["input"].expand(-1, 3, -1, -1)), fx["output"][:, :1], **_tol(fx))
