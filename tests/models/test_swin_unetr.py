"""Swin UNETR: parity with MONAI (fixtures and MONAI itself), checkpoints in every published layout, any size."""

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets import swin_unetr as monai_swin
from monai.networks.utils import copy_model_state

from attnseg import load_pretrained
from attnseg.config import load_config
from attnseg.convert import from_official
from attnseg.convert.swin_unetr import convert_state_dict, is_official
from attnseg.errors import CheckpointError
from attnseg.models import Segmentor
from attnseg.models.builder import build_model
from attnseg.models.swin_unetr import SwinViT, swin_unetr
from attnseg.registry import BACKBONES, MODELS
from tests.conftest import REPO_ROOT, load_fixture

FIXTURES = ["swin_unetr_2d_fs12.pt", "swin_unetr_2d_fs12_v2.pt", "swin_unetr_3d_fs12.pt",
            "swin_unetr_3d_fs12_legacy_merge.pt"]


def _monai(seed: int = 0, **kwargs) -> SwinUNETR:
    """A MONAI SwinUNETR with every parameter perturbed away from its init (so no weight is inert)."""
    torch.manual_seed(seed)
    model = SwinUNETR(**kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _ours_from(ref: SwinUNETR, **kwargs) -> Segmentor:
    model = swin_unetr(**kwargs).eval()
    model.load_state_dict(convert_state_dict(ref.state_dict()))
    return model


@pytest.mark.parametrize("fixture", [f if "2d" in f else pytest.param(f, marks=pytest.mark.slow) for f in FIXTURES])
def test_parity_with_monai_fixtures(fixture):
    fx = load_fixture(fixture)
    model = from_official("swin_unetr", fx["constructor"], fx["state_dict"])
    x = fx["input"].float()
    tol = {k: fx["tolerance"][k] for k in ("atol", "rtol")}
    with torch.no_grad():
        out = model(x)
        hidden = model.backbone(x)
    assert not model.training and out.shape == fx["output"].shape
    assert torch.allclose(out, fx["output"], **tol)
    for name, ref in fx.get("features", {}).items():
        i = int(name[name.index("[") + 1])
        assert torch.allclose(hidden[i], ref, **tol), name


@pytest.mark.slow
def test_the_two_3d_merge_orders_differ_and_legacy_is_not_the_default_of_monai_1_5():
    current, legacy = load_fixture("swin_unetr_3d_fs12.pt"), load_fixture("swin_unetr_3d_fs12_legacy_merge.pt")
    assert torch.equal(current["input"], legacy["input"])
    wrong = from_official("swin_unetr", {**current["constructor"], "merge_order_3d": "legacy"}, current["state_dict"])
    with torch.no_grad():
        out = wrong(current["input"].float())
    assert torch.allclose(out, legacy["output"], atol=1e-4)
    assert (out - current["output"]).abs().max() > 0.1


@pytest.mark.parametrize("kwargs, size", [
    (dict(spatial_dims=3, in_channels=2, out_channels=3, feature_size=12, downsample="mergingv2", use_v2=True,
          depths=(1, 1, 1, 1)), (32, 32, 64)),
    (dict(spatial_dims=3, in_channels=1, out_channels=2, feature_size=12, depths=(1, 2, 1, 1), window_size=4), (32, 64, 32)),
    (dict(spatial_dims=2, in_channels=1, out_channels=4, feature_size=24, norm_name="batch"), (64, 96)),
    (dict(spatial_dims=2, in_channels=3, out_channels=2, feature_size=12, patch_norm=True, normalize=False), (96, 64)),
])
def test_equal_to_monai_itself(kwargs, size):
    ref = _monai(**kwargs)
    ours = from_official("swin_unetr", {"name": "SwinUNETR", "kwargs": kwargs, "merge_order_3d": "current"},
                         ref.state_dict())
    x = torch.randn(1, kwargs["in_channels"], *size)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=5e-5, rtol=1e-4)


def test_key_manifests_are_fully_placed_with_the_published_parameter_counts():
    for name, params in [("swin_unetr_keys_3d_fs48.pt", 62.19), ("swin_unetr_keys_2d_fs48_v2.pt", None)]:
        fx = load_fixture(name)
        ctor = fx["constructor"]["kwargs"]
        model = swin_unetr(in_chans=ctor["in_channels"], num_classes=ctor["out_channels"],
                           spatial_dims=ctor["spatial_dims"], feature_size=ctor["feature_size"],
                           use_v2=ctor.get("use_v2", False))
        fake = {k: torch.zeros(fx["shapes"][k]["shape"]) for k in fx["keys"]}
        converted = convert_state_dict(fake)
        model_sd = model.state_dict()
        assert set(converted) == set(model_sd)
        assert all(tuple(converted[k].shape) == tuple(model_sd[k].shape) for k in converted)
        n = sum(p.numel() for p in model.parameters())
        assert n == fx["num_parameters"]
        if params is not None:
            assert round(n / 1e6, 2) == params  # heads.md: 3D fs48 has 62.19 M parameters


def test_any_input_size_equals_monai_on_the_padded_input():
    ref = _monai(spatial_dims=3, in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))
    ours = _ours_from(ref, in_chans=1, num_classes=2, spatial_dims=3, feature_size=12, depths=(1, 1, 1, 1),
                      merge_order="current")
    x = torch.randn(1, 1, 20, 33, 30)
    with torch.no_grad():
        out = ours(x)
        padded = torch.nn.functional.pad(x, (0, 2, 0, 31, 0, 12))  # to 32 x 64 x 32
        expected = ref(padded)[..., :20, :33, :30]
    assert out.shape == (1, 2, 20, 33, 30)
    assert torch.allclose(out, expected, atol=5e-5)
    with pytest.raises(ValueError):  # MONAI refuses sizes that are not multiples of 32
        ref(x)


def test_trains_on_a_32_cube_where_monai_fails_and_gradients_reach_every_parameter():
    model = swin_unetr(in_chans=1, num_classes=3, spatial_dims=3, feature_size=12, depths=(1, 1, 1, 1)).train()
    x = torch.randn(1, 1, 32, 32, 32)
    model(x).logsumexp(1).mean().backward()
    unreached = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # the 1x1x1 bottleneck: InstanceNorm of one element is 0 whatever the conv before it, so only its two convs
    # get no gradient from such a batch (the block passes its input on through the residual)
    assert unreached == ["head.encoder10.layer.conv1.conv.weight", "head.encoder10.layer.conv2.conv.weight"]
    ref = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, spatial_dims=3).train()
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        ref(x)


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    model = swin_unetr(in_chans=1, num_classes=2, spatial_dims=2, feature_size=12, drop_path_rate=0.0).train()
    x = torch.randn(1, 1, 64, 64)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.backbone.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert all(torch.allclose(p.grad, grads[n], atol=1e-5) for n, p in model.named_parameters())


def _ssl_file(ref: SwinUNETR) -> dict:
    """The layout of the CVPR'22 self-supervised ``model_swinvit.pt``: ``module.`` keys, ``mlp.fc1/2``, a final norm."""
    sd = {}
    for k, v in ref.swinViT.state_dict().items():
        sd["module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2")] = v
    dim = ref.swinViT.layers4[0].downsample.reduction.weight.shape[0]
    sd["module.norm.weight"], sd["module.norm.bias"] = torch.ones(dim), torch.zeros(dim)
    return {"state_dict": sd}


def test_self_supervised_encoder_weights_load_like_monai_load_from(tmp_path):
    small = dict(spatial_dims=3, in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))
    weights = _ssl_file(_monai(seed=1, **small))
    path = tmp_path / "model_swinvit.pt"
    torch.save(weights, path)
    ref = _monai(seed=2, **small)
    ref.load_from(weights)  # MONAI's loader: the encoder only
    ours = _ours_from(_monai(seed=2, **small), in_chans=1, num_classes=2, spatial_dims=3, feature_size=12,
                      depths=(1, 1, 1, 1), merge_order="current")
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(ours, path)  # strict: the decoder is not in the file
    report = load_pretrained(ours, path, strict=False)
    assert report.converted == "swin_unetr" and report.missing and all(k.startswith("head.") for k in report.missing)
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), ref(x), atol=5e-5)
    bare = SwinViT(in_chans=1, spatial_dims=3, feature_size=12, depths=(1, 1, 1, 1), merge_order="current")
    assert not load_pretrained(bare, path).missing  # straight into the encoder


def test_self_supervised_weights_adapt_to_more_input_channels(tmp_path):
    donor = _monai(seed=1, spatial_dims=3, in_channels=1, out_channels=2, feature_size=12)
    path = tmp_path / "model_swinvit.pt"
    torch.save(_ssl_file(donor), path)
    enc = SwinViT(in_chans=4, spatial_dims=3, feature_size=12, merge_order="current").eval()
    report = load_pretrained(enc, path)
    assert report.adapted == ["patch_embed.proj.weight: 1 -> 4 input channels"]
    x = torch.randn(1, 1, 32, 32, 32)
    one = SwinViT(in_chans=1, spatial_dims=3, feature_size=12, merge_order="current").eval()
    load_pretrained(one, path)
    with torch.no_grad():  # one image repeated over the 4 channels gives the 1-channel response
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(enc(x.repeat(1, 4, 1, 1, 1)), one(x)))


@pytest.mark.slow
def test_disruptive_autoencoder_weights_load_like_monai_filter(tmp_path):
    donor = _monai(seed=3, spatial_dims=3, in_channels=1, out_channels=1, feature_size=12)
    dae = {}
    for k, v in donor.state_dict().items():  # the DAE layout: encoder.layers{k}.0.0.*, CNN blocks named as MONAI's
        if k.startswith("swinViT.layers"):
            dae["encoder." + k[8:18] + "0." + k[18:]] = v
        elif k.startswith("swinViT."):
            dae["encoder." + k[8:]] = v
        else:
            dae[k] = v
    dae["encoder.mask_token"] = torch.zeros(1, 1, 12)
    dae["encoder.norm.weight"], dae["encoder.norm.bias"] = torch.ones(192), torch.zeros(192)
    path = tmp_path / "ssl_pretrained_weights.pth"
    torch.save({"model": dae}, path)
    # the DAE output layer reconstructs the image (1 channel); the model segments 3 classes
    ref = _monai(seed=4, spatial_dims=3, in_channels=1, out_channels=3, feature_size=12)
    _, loaded, not_loaded = copy_model_state(ref, dae, filter_func=monai_swin.filter_swinunetr)
    ours = _ours_from(_monai(seed=4, spatial_dims=3, in_channels=1, out_channels=3, feature_size=12), in_chans=1,
                      num_classes=3, spatial_dims=3, feature_size=12, merge_order="current")
    report = load_pretrained(ours, path, strict=False)
    assert sorted(report.missing) == ["head.out.conv.conv.bias", "head.out.conv.conv.weight"]
    assert len(not_loaded) == 2
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), ref(x), atol=5e-5)


def test_published_btcv_file_loads_into_a_config_built_model(tmp_path):
    ref = _monai(seed=5, spatial_dims=3, in_channels=1, out_channels=4, feature_size=12)
    path = tmp_path / "swin_unetr.tiny_5000ep_f12_lr2e-4_pretrained.pt"
    torch.save({"epoch": 5000, "best_acc": 0.7, "state_dict": ref.state_dict()}, path)
    cfg = load_config(REPO_ROOT / "configs/swin_unetr/swin_unetr_tiny_synthetic3d.yaml",
                      ["model.backbone.merge_order=current", "model.num_classes=4"])
    model = build_model(cfg).eval()
    report = load_pretrained(model, path)
    assert report.converted == "swin_unetr" and not report.missing and not report.unexpected
    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=5e-5)


def test_converter_refuses_foreign_keys_and_recognises_layouts():
    assert is_official({"swinViT.patch_embed.proj.weight": torch.zeros(1)})
    assert not is_official({"backbone.patch_embed.proj.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not Swin UNETR keys.*stages.0.weight"):
        convert_state_dict({"swinViT.patch_embed.proj.weight": torch.zeros(1), "stages.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="use_hyena"):
        from_official("swin_unetr", {"kwargs": {"in_channels": 1, "out_channels": 2, "use_hyena": True}}, {})


@pytest.mark.parametrize("kwargs, match", [
    (dict(spatial_dims=4), "spatial_dims"), (dict(feature_size=10), "divisible by its num_heads"),
    (dict(merge_order="new"), "merge_order"), (dict(downsample="pool"), "downsample"),
    (dict(depths=(2, 2, 2)), "4 positive values"), (dict(out_indices=(0, 5)), "out_indices"),
    (dict(num_classes=3), "no classifier"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwinViT(**kwargs)


def test_registered_names():
    assert {"swin_unetr", "swin_unetr_v2"} <= set(MODELS.names())
    assert {"swinvit_tiny", "swinvit_small", "swinvit_base", "test_swinvit"} <= set(BACKBONES.names())
    assert BACKBONES.get("swinvit_small")(spatial_dims=2).feature_size == 24
    assert MODELS.get("swin_unetr_v2")(spatial_dims=2, feature_size=12).backbone.use_v2


@pytest.mark.slow
@pytest.mark.parametrize("config", ["swin_unetr_tiny_synthetic3d.yaml", "swin_unetr_v2_tiny_synthetic3d.yaml"])
def test_synthetic3d_configs_train_with_sliding_window_validation(tmp_path, config):
    import csv

    from attnseg.engine.runner import train

    cfg = load_config(REPO_ROOT / "configs" / "swin_unetr" / config, [
        f"work_dir={tmp_path}", "data.dataset.num_train=4", "data.dataset.num_val=1", "data.dataset.num_test=1",
        "data.dataset.image_size=[40,40,40]", "trainer.max_epochs=4", "trainer.progress_bar=none",
        "trainer.loggers=[csv]", "trainer.accelerator=cpu", "trainer.devices=1", "scheduler.warmup_ratio=0.0"])
    result = train(cfg)
    assert result["global_step"] == 8
    assert 0.0 <= result["metrics"]["val/mDice"] <= 1.0  # whole 40³ volumes through 32³ Gaussian-blended windows
    with open(tmp_path / "logs" / "metrics.csv") as f:
        epochs = [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert len(epochs) == 4 and epochs[-1] < epochs[0]
