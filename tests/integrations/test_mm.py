"""attnseg.integrations.mm's backbones against mmengine's Registry, Config and BaseModule (the full mmseg/mmdet
need mmcv's compiled ops, which do not build here; the decode heads run in mmseg on mmcv-lite:
test_mm_decode_head.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("mmengine")

from mmengine import Config  # noqa: E402
from mmengine.registry import MODELS, Registry  # noqa: E402
from mmengine.utils import import_modules_from_strings  # noqa: E402

from attnseg.backbones import pretrained_cfg  # noqa: E402
from attnseg.errors import CheckpointError  # noqa: E402
from attnseg.registry import BACKBONES  # noqa: E402
from tests.conftest import load_fixture  # noqa: E402

mm = import_modules_from_strings("attnseg.integrations.mm")  # what custom_imports does

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "mm"

# a sibling of attnseg's registry under mmengine's root, as mmseg.registry.MODELS / mmdet.registry.MODELS are
SEG_LIKE = Registry("model", parent=MODELS, scope="attnseg_test_mmseg_like")


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- registration -------------------------------------------------------------------------------------------

def test_custom_imports_in_a_config_registers_every_backbone(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("custom_imports = dict(imports=['attnseg.integrations.mm'], allow_failed_imports=False)\n"
                        "model = dict(backbone=dict(type='attnseg.test_nat', out_indices=(1, 3)))\n")
    cfg = Config.fromfile(cfg_file)
    assert cfg.custom_imports.imports == ["attnseg.integrations.mm"]
    # every backbone (test_* CI variants included) and the decode-head builder
    assert sorted(mm.ATTNSEG_MODELS.module_dict) == sorted([*BACKBONES.names(), "DecodeHead"])
    model = MODELS.build(cfg.model.backbone)
    assert type(model).__name__ == "AttnSeg_test_nat" and model.attnseg_name == "test_nat"
    assert mm.register_mm_models() == []  # idempotent


def test_registry_sits_under_mmengine_root_with_scope_attnseg():
    assert mm.ATTNSEG_MODELS.scope == "attnseg" and mm.ATTNSEG_MODELS.parent is MODELS
    assert MODELS.children["attnseg"] is mm.ATTNSEG_MODELS
    # a sibling registry (mmseg's / mmdet's position) resolves the scoped name through the root
    assert SEG_LIKE.get("attnseg.nat_mini") is mm.ATTNSEG_MODELS.get("nat_mini")
    assert MODELS.get("attnseg.nat_mini").attnseg_name == "nat_mini"


@pytest.mark.parametrize("registry", [MODELS, SEG_LIKE, mm.ATTNSEG_MODELS], ids=["root", "sibling", "own"])
def test_bad_type_names_give_mmengines_error(registry):
    with pytest.raises(KeyError, match=r"attnseg\.test_nta is not in the .*model registry"):
        registry.build(dict(type="attnseg.test_nta"))
    # unscoped: siblings are never searched. (Not "test_nat": mmengine falls back to importing the name as a
    # module path, and in a full pytest run the test module tests/backbones/test_nat.py is importable.)
    with pytest.raises(KeyError, match=r"nat_mini is not in the .*model registry"):
        SEG_LIKE.build(dict(type="nat_mini"))
    with pytest.raises(TypeError, match="unexpected keyword argument 'widht'"):
        registry.build(dict(type="attnseg.test_nat", widht=3))


# -- the mm backbone contract ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,out_indices,channels,strides", [
    ("test_nat", (1, 3), [32, 128], [8, 32]),
    ("test_mambaout", (0, 1, 2, 3), [16, 24, 32, 48], [4, 8, 16, 32]),
    ("test_halonet", (1, 2, 3, 4), [32, 64, 128, 256], [4, 8, 16, 32]),
    ("test_resnet", (2, 4), [128, 512], [8, 32]),
    ("test_swin_unet_encoder", (2, 3), [32, 64], [16, 32]),  # no out_indices of its own: picked by the wrapper
    ("test_swinvit", (1, 2, 3, 4), [24, 48, 96, 192], [4, 8, 16, 32]),  # Swin UNETR's encoder, built 2D
])
def test_build_gives_a_tuple_of_nchw_maps(name, out_indices, channels, strides):
    extra = dict(spatial_dims=2, in_chans=3) if name == "test_swinvit" else {}
    model = SEG_LIKE.build(dict(type=f"attnseg.{name}", out_indices=out_indices, **extra))
    assert isinstance(model, mm.MMBackbone)
    assert model.out_indices == out_indices
    assert model.out_channels == channels and model.strides == strides
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, tuple)
    assert [tuple(o.shape) for o in out] == [(2, c, 64 // s, 64 // s) for c, s in zip(channels, strides, strict=True)]


def test_default_out_indices_are_the_backbones():
    assert MODELS.build(dict(type="attnseg.test_nat")).out_indices == (0, 1, 2, 3)
    halo = MODELS.build(dict(type="attnseg.test_halonet"))
    assert halo.out_indices == (1, 2, 3, 4) and halo.strides == [4, 8, 16, 32]
    enc = MODELS.build(dict(type="attnseg.test_swin_unet_encoder"))
    assert enc.out_indices == (0, 1, 2, 3) and enc.strides == [4, 8, 16, 32]


def test_no_classifier_and_backbone_kwargs_pass_through():
    model = MODELS.build(dict(type="attnseg.test_nat", in_chans=1, drop_path_rate=0.1))
    assert model.backbone.num_classes == 0
    assert not any(k.startswith("head.") for k in model.backbone.state_dict())
    assert model.backbone.patch_embed.proj[0].in_channels == 1
    with pytest.raises(ValueError, match=r"out_indices \[7\] out of range; the backbone gives 4 levels"):
        MODELS.build(dict(type="attnseg.test_swin_unet_encoder", out_indices=(1, 7)))


def test_norm_eval_keeps_batchnorm_in_eval_mode():
    model = MODELS.build(dict(type="attnseg.test_resnet", norm_eval=True))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    model.train()
    assert model.training and not any(m.training for m in bns)
    plain = MODELS.build(dict(type="attnseg.test_resnet")).train()
    assert all(m.training for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))


# -- init_cfg -----------------------------------------------------------------------------------------------

def test_pretrained_init_cfg_loads_in_init_weights(tmp_path):
    source = MODELS.build(dict(type="attnseg.test_nat", out_indices=(1, 3)))
    path = tmp_path / "nat.pth"
    torch.save(source.backbone.state_dict(), path)
    model = MODELS.build(dict(type="attnseg.test_nat", out_indices=(1, 3),
                              init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    want = _params(source)
    assert any(not torch.equal(v, want[k]) for k, v in model.state_dict().items())  # nothing loaded at build
    model.init_weights()
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert model.pretrained_report is not None and model.pretrained_report.missing == []
    assert model.pretrained_report.unexpected == []


def test_pretrained_with_prefix_reads_a_whole_mm_model_checkpoint(tmp_path):
    source = MODELS.build(dict(type="attnseg.test_mambaout"))
    # what mmengine saves for an EncoderDecoder with this backbone: backbone.backbone.*, decode_head.*
    sd = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(4, 8, 1, 1)
    path = tmp_path / "iter_100.pth"
    torch.save({"meta": {"iter": 100}, "state_dict": sd}, path)
    model = MODELS.build(dict(type="attnseg.test_mambaout",
                              init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone.")))
    model.init_weights()
    want = _params(source)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert model.pretrained_report.ignored == ["decode_head.conv_seg.weight"]
    bad = MODELS.build(dict(type="attnseg.test_mambaout",
                            init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="neck.")))
    with pytest.raises(CheckpointError, match="no key starts with prefix 'neck.'"):
        bad.init_weights()


def test_official_checkpoint_goes_through_the_converter(tmp_path):
    from attnseg.convert import convert_state_dict

    fx = load_fixture("mambaout_tiny_cfg.pt")
    official = fx["state_dict"]  # yuweihao/MambaOut layout (downsample_layers.*, head.fc1 ...)
    path = tmp_path / "mambaout_official.pth"
    torch.save({"model": official}, path)
    kwargs = {k: tuple(v) for k, v in fx["constructor"]["kwargs"].items() if k != "num_classes"}
    model = MODELS.build(dict(type="attnseg.mambaout_tiny", **kwargs,
                              init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    model.init_weights()
    report = model.pretrained_report
    assert report.converted == "mambaout"
    assert report.dropped and all(k.startswith("head.") for k in report.dropped)  # the classifier of a 10-class model
    converted = convert_state_dict("mambaout", official)
    got = model.backbone.state_dict()
    loaded = [k for k in converted if k in got]
    assert len(loaded) >= len(converted) - len(report.dropped) > 0
    assert all(torch.equal(got[k], converted[k]) for k in loaded)


def test_other_init_cfg_types_go_to_mmengine_and_pretrained_wins(tmp_path):
    model = MODELS.build(dict(type="attnseg.test_resnet",
                              init_cfg=dict(type="Constant", val=0.5, layer="Conv2d")))
    model.init_weights()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(bool((m.weight == 0.5).all()) for m in convs)
    assert model.pretrained_report is None

    source = MODELS.build(dict(type="attnseg.test_resnet"))
    path = tmp_path / "resnet.pth"
    torch.save(source.backbone.state_dict(), path)
    both = MODELS.build(dict(type="attnseg.test_resnet", init_cfg=[
        dict(type="Pretrained", checkpoint=str(path)), dict(type="Constant", val=0.5, layer="Conv2d")]))
    both.init_weights()
    want = _params(source)
    assert all(torch.equal(v, want[k]) for k, v in both.state_dict().items())
    assert isinstance(both.init_cfg, list) and len(both.init_cfg) == 2  # restored after init_weights


def test_bad_init_cfg_is_refused():
    with pytest.raises(ValueError, match=r"unknown keys \['chekpoint'\]"):
        MODELS.build(dict(type="attnseg.test_nat", init_cfg=dict(type="Pretrained", chekpoint="x.pth")))
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        MODELS.build(dict(type="attnseg.test_nat", init_cfg=dict(type="Pretrained")))
    remote = MODELS.build(dict(type="attnseg.test_nat", init_cfg=dict(
        type="Pretrained", checkpoint="https://example.org/nat_mini.pth")))
    with pytest.raises(ValueError, match="is remote; attnseg never downloads"):
        remote.init_weights()


# -- example configs ----------------------------------------------------------------------------------------

def _config_backbone(cfg: Config) -> torch.nn.Module:
    backbone = dict(cfg.model.backbone)
    ckpt = backbone.pop("init_cfg")["checkpoint"]
    name = backbone["type"].split(".", 1)[1]
    assert Path(ckpt).name in pretrained_cfg(name)["checkpoints"]  # the official file the converter reads
    with torch.device("meta"):  # shapes only: the forward pass is tested on the test_* variants above
        return MODELS.build(backbone)


def test_mmseg_config_parses_and_its_backbone_fits_the_heads():
    cfg = Config.fromfile(CONFIGS / "upernet_nat_mini_8xb2-160k_ade20k-512x512.py")
    assert cfg.custom_imports.imports == ["attnseg.integrations.mm"] and cfg.default_scope == "mmseg"
    assert cfg.model.type == "EncoderDecoder" and cfg.model.backbone.type == "attnseg.nat_mini"
    backbone = _config_backbone(cfg)
    head, aux = cfg.model.decode_head, cfg.model.auxiliary_head
    assert [backbone.out_channels[i] for i in head.in_index] == head.in_channels == [64, 128, 256, 512]
    assert backbone.out_channels[aux.in_index] == aux.in_channels
    assert backbone.strides == [4, 8, 16, 32]


def test_mmdet_config_parses_and_its_backbone_fits_the_neck():
    cfg = Config.fromfile(CONFIGS / "retinanet_mambaout_tiny_fpn_1x_coco.py")
    assert cfg.custom_imports.imports == ["attnseg.integrations.mm"] and cfg.default_scope == "mmdet"
    assert cfg.model.backbone.type == "attnseg.mambaout_tiny"
    backbone = _config_backbone(cfg)
    neck = cfg.model.neck
    assert backbone.out_channels == neck.in_channels == [192, 384, 576]
    assert backbone.strides == [8, 16, 32]
    assert backbone.strides[neck.start_level] == cfg.model.bbox_head.anchor_generator.strides[0]


@pytest.mark.parametrize("package", ["mmseg", "mmdet"])
def test_real_mmseg_and_mmdet_registries_find_the_backbones(package, monkeypatch):
    """Runs where mmsegmentation / mmdet are installed (not in CI: see docs/mm.md)."""
    import importlib

    registry = pytest.importorskip(f"{package}.registry").MODELS
    try:
        importlib.import_module(f"{package}.models")
    except ImportError:  # mmcv-lite: no compiled ops, so the registry's own models cannot load; ours still resolve
        monkeypatch.setattr(registry, "_imported", True)
    assert registry.scope == package and registry.parent is MODELS
    model = registry.build(dict(type="attnseg.test_nat", out_indices=(1, 3)))
    assert type(model).__name__ == "AttnSeg_test_nat"
    with torch.no_grad():
        assert [tuple(o.shape) for o in model(torch.randn(1, 3, 64, 64))] == [(1, 32, 8, 8), (1, 128, 2, 2)]
