import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import attnseg  # noqa: F401  (registers the attnseg_* names)


def test_features_only_gives_the_pyramid_with_timm_feature_info():
    model = timm.create_model("attnseg_nat_mini", features_only=True, out_indices=(1, 2, 3)).eval()
    assert model.feature_info.channels() == [128, 256, 512]
    assert model.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 96, 130))
    assert [tuple(m.shape) for m in maps] == [(1, 128, 12, 17), (1, 256, 6, 9), (1, 512, 3, 5)]


def test_classifier_and_refusal_to_download():
    model = timm.create_model("attnseg_mambaout_femto", num_classes=7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="never downloads weights"):
        timm.create_model("attnseg_nat_mini", pretrained=True)


def test_no_timm_name_is_overridden():
    script = (
        "import timm\n"
        "from timm.models import model_entrypoint\n"
        "before = {n: model_entrypoint(n) for n in timm.list_models()}\n"
        "import attnseg\n"
        "after = set(timm.list_models())\n"
        "new = after - set(before)\n"
        "assert new and all(n.startswith('attnseg_') for n in new), sorted(new)[:5]\n"
        "assert all(model_entrypoint(n) is fn for n, fn in before.items())\n"
        "assert 'attnseg_dinat_tiny' in new and not any(n.startswith('attnseg_test_') for n in new)\n"
        "print(len(new))\n"
    )
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning:timm", "-c", script], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) >= 15


@pytest.mark.parametrize("name", ["attnseg_sparsifiner_deit_tiny", "attnseg_karat_vit_tiny"])
def test_vit_family_features_only_gives_the_simple_feature_pyramid(name):
    model = timm.create_model(name, features_only=True, img_size=128).eval()  # 65 tokens: Sparsifiner K = 10
    assert model.feature_info.reduction() == [4, 8, 16, 32] and model.feature_info.channels()[2] == 192
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 128, 128))
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert [m.shape[1] for m in maps] == model.feature_info.channels()


# -- pretrained configurations ----------------------------------------------------------------------------------

def _timm_names():
    return timm.list_models("attnseg_*")


def test_every_registered_model_has_a_pretrained_cfg_with_the_keys():
    from attnseg.backbones import PRETRAINED_CFG_KEYS, pretrained_cfgs
    from attnseg.registry import BACKBONES

    ours = pretrained_cfgs()
    names = _timm_names()
    assert sorted(names) == sorted(f"attnseg_{n}" for n in BACKBONES.names() if not n.startswith("test_"))
    assert set(ours) == {n[len("attnseg_"):] for n in names}
    for name in names:
        src = ours[name[len("attnseg_"):]]
        assert set(src) == set(PRETRAINED_CFG_KEYS), name
        cfg = timm.models.get_pretrained_cfg(name)  # registered with timm, no model built
        assert cfg.architecture == name and cfg.tag is None
        assert (cfg.mean, cfg.std, cfg.input_size, cfg.crop_pct, cfg.interpolation, cfg.num_classes) == \
            (src["mean"], src["std"], src["input_size"], src["crop_pct"], src["interpolation"], src["num_classes"])
        assert (cfg.license, cfg.paper_ids, cfg.origin_url, cfg.checkpoints) == \
            (src["license"], src["paper"], src["origin"], src["checkpoints"])
        assert cfg.license in ("mit", "apache-2.0", "bsd-3-clause", "unknown"), name
        assert cfg.origin_url.startswith("https://github.com/") and len(cfg.paper_ids.split(".")) == 2, name
        assert len(cfg.mean) == len(cfg.std) == cfg.input_size[0], name
        assert not cfg.has_weights, name  # no url, no hub id: nothing to download
    assert timm.list_models("attnseg_*", pretrained=True) == []


def test_pretrained_cfg_accessor():
    from attnseg.backbones import pretrained_cfg

    cfg = pretrained_cfg("dinat_s_large_384")
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0
    assert cfg["checkpoints"] == ("dinat_s_large_1k_384.pth",) and cfg["paper"] == "2209.15001"
    cfg["mean"] = None  # a copy
    assert pretrained_cfg("dinat_s_large_384")["mean"] == (0.485, 0.456, 0.406)
    assert pretrained_cfg("dinat_large_21k")["num_classes"] == 21841
    assert pretrained_cfg("overlock_t_reparam")["checkpoints"] == ("overlock_t_in1k_224_reparam.pth",)
    with pytest.raises(KeyError, match="no pretrained configuration"):
        pretrained_cfg("test_nat")


def test_cfg_factory_refuses_unknown_keys():
    from attnseg.backbones._common import pretrained_cfg_factory

    cfg = pretrained_cfg_factory(paper="1.2", origin="https://github.com/a/b", license="mit", first_conv="c",
                                 classifier="h", crop_pct=1.0)
    assert cfg(checkpoints=["a.pth"])["checkpoints"] == ("a.pth",) and cfg()["crop_pct"] == 1.0
    with pytest.raises(TypeError, match=r"unknown pretrained cfg keys \['crop'\]"):
        cfg(crop=0.9)


def test_cfg_layer_names_match_every_model():
    """first_conv / classifier name real layers of the right widths, for every registered model (built on the meta
    device: shapes without memory or init time)."""
    for name in _timm_names():
        with torch.device("meta"):
            model = timm.create_model(name)
        cfg, sd = model.pretrained_cfg, model.state_dict()
        assert sd[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0], name
        if cfg.get("classifier"):  # the encoders (num_classes 0) have none
            assert sd[cfg["classifier"] + ".weight"].shape[0] == cfg["num_classes"] == model.num_classes, name


@pytest.mark.parametrize("name,expected", [
    ("attnseg_haloregnetz_b", dict(input_size=(3, 224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                   crop_pct=0.94, interpolation="bicubic")),
    ("attnseg_halonet26t", dict(input_size=(3, 256, 256), crop_pct=0.95)),
    ("attnseg_transnext_small_384", dict(input_size=(3, 384, 384), crop_pct=1.0)),
    ("attnseg_mambaout_tiny", dict(input_size=(3, 224, 224), crop_pct=1.0, mean=(0.485, 0.456, 0.406))),
    ("attnseg_resnet50", dict(crop_pct=0.875, interpolation="bilinear", std=(0.229, 0.224, 0.225))),
    ("attnseg_swinvit_tiny", dict(input_size=(1, 96, 96, 96), mean=(0.0,), std=(1.0,), crop_pct=1.0)),
])
@pytest.mark.parametrize("features_only", [False, True])
def test_resolve_data_config(name, expected, features_only):
    from timm.data import resolve_data_config

    model = timm.create_model(name, features_only=features_only)
    assert model.pretrained_cfg["architecture"] == name and model.default_cfg is model.pretrained_cfg
    config = resolve_data_config({}, model=model)
    assert {k: config[k] for k in expected} == expected


# -- pretrained=True with a local file ----------------------------------------------------------------------------

MAMBAOUT_FIXTURE = "mambaout_tiny_cfg.pt"
MAMBAOUT_ARGS = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))  # the fixture's official constructor


@pytest.fixture
def official_mambaout(tmp_path):
    """The parity fixture's official MambaOut (official key layout, random weights) saved as a plain file."""
    from tests.conftest import load_fixture

    fx = load_fixture(MAMBAOUT_FIXTURE)
    assert fx["constructor"]["kwargs"] == {"depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64], "num_classes": 10}
    path = tmp_path / "mambaout_official.pth"
    torch.save(fx["state_dict"], path)
    return fx, path


def test_pretrained_file_goes_through_the_converter(official_mambaout):
    fx, path = official_mambaout
    model = timm.create_model("attnseg_mambaout_femto", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=10, **MAMBAOUT_ARGS).eval()
    report = model.pretrained_report
    assert report.converted == "mambaout" and not report.missing and not report.unexpected and not report.dropped
    assert report.initialized == [f"pyramid_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert model.pretrained_cfg["file"] == str(path) and model.pretrained_cfg["crop_pct"] == 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(fx["input"]), fx["output"], **fx["tolerance"])

    # another in_chans: the cfg's first conv is adapted (summed over the 3 channels for 1, as timm does)
    gray = timm.create_model("attnseg_mambaout_femto", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             num_classes=10, in_chans=1, **MAMBAOUT_ARGS).eval()
    assert gray.pretrained_report.adapted == ["stem.conv1.weight: 3 -> 1 input channels"]
    x = fx["input"][:, :1]
    with torch.no_grad():
        torch.testing.assert_close(gray(x), model(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_pretrained_cfg_dict_applies_over_the_registered_cfg_and_drops_another_classifier(official_mambaout):
    fx, path = official_mambaout
    model = timm.create_model("attnseg_mambaout_femto", pretrained=True, pretrained_cfg=dict(file=str(path)),
                              num_classes=7, **MAMBAOUT_ARGS)
    assert model.pretrained_report.dropped == ["head.fc.weight", "head.fc.bias"]
    assert model.head.fc.out_features == 7
    cfg = model.pretrained_cfg  # the data settings stay (timm would reset them with a whole new cfg)
    assert (cfg["file"], cfg["crop_pct"], cfg["license"], cfg["checkpoints"]) == \
        (str(path), 1.0, "apache-2.0", ("mambaout_femto.pth",))


def test_pretrained_features_only_gives_the_official_stages_in_nchw(official_mambaout):
    fx, path = official_mambaout
    model = timm.create_model("attnseg_mambaout_femto", pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **MAMBAOUT_ARGS).eval()
    report = model.backbone.pretrained_report
    assert report.dropped[-2:] == ["head.fc.weight", "head.fc.bias"] and len(report.dropped) == 8
    assert "num_classes" not in model.pretrained_cfg and model.pretrained_cfg["input_size"] == (3, 224, 224)
    with torch.no_grad():
        maps = model(fx["input"])
    for ours, official in zip(maps, fx["features"], strict=True):  # official: NHWC stage outputs, no norm
        expected = torch.nn.functional.layer_norm(official, official.shape[-1:], eps=1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(ours, expected, **fx["tolerance"])  # fresh pyramid norms: plain LayerNorm


def test_pretrained_attnseg_checkpoint_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    from attnseg.registry import BACKBONES

    tiny = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2.0,
                dilations=[[1], [1, 2], [2], [1]], layer_scale=1e-5)  # test_nat's shape
    source = BACKBONES.get("test_nat")(num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
    torch.save({"model": source.state_dict()}, tmp_path / "nat.pth")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "nat.safetensors"))
    for file in ("nat.pth", "nat.safetensors"):
        model = timm.create_model("attnseg_dinat_mini", pretrained=True, num_classes=5, **tiny,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / file))).eval()
        assert not model.pretrained_report.missing and not model.pretrained_report.dropped
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)


def test_pretrained_without_a_local_file_raises_and_names_the_official_files():
    with pytest.raises(ValueError, match=r"no local file was given; attnseg never downloads weights.*"
                                         r"pretrained_cfg_overlay=dict\(file=PATH\).*official files: nat_mini\.pth"):
        timm.create_model("attnseg_nat_mini", pretrained=True)
    with pytest.raises(ValueError, match="has a url but no local file; attnseg never downloads"):
        timm.create_model("attnseg_nat_mini", pretrained=True, pretrained_cfg_overlay=dict(url="https://x/y.pth"))
    with pytest.raises(ValueError, match="has no pretrained tag 'in1k'"):
        timm.create_model("attnseg_nat_mini.in1k")
    model = timm.create_model("attnseg_nat_mini", pretrained_cfg_overlay=dict(file="/nonexistent.pth"))
    assert not hasattr(model, "pretrained_report")  # pretrained=False: the file is recorded, not read


def test_docstring_examples_run():
    import doctest

    import attnseg.backbones
    import attnseg.backbones._common
    import attnseg.integrations.timm

    for module in (attnseg.integrations.timm, attnseg.backbones, attnseg.backbones._common):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 1 and result.failed == 0, module.__name__


@pytest.mark.parametrize("name,source,kwargs", [
    ("sparsifiner_deit_tiny", "test_sparsifiner", dict(img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                                                       reduce_n_factor=4, coef_topk=2)),
    ("dinat_mini", "test_nat", dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8), mlp_ratio=2.0,
                                    dilations=[[1], [1, 2], [2], [1]], layer_scale=1e-5)),
])
def test_features_only_loads_a_classification_checkpoint_strictly(tmp_path, name, source, kwargs):
    from attnseg.registry import BACKBONES

    torch.save(BACKBONES.get(source)().state_dict(), tmp_path / "cls.pth")  # with its final norm and classifier
    model = timm.create_model(f"attnseg_{name}", pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "cls.pth")), **kwargs)
    report = model.backbone.pretrained_report
    assert sorted(report.dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert not report.missing and not report.unexpected
