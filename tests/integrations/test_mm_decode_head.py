"""attnseg heads as mmseg decode heads, inside mmseg's own EncoderDecoder (mmsegmentation with mmcv-lite, from the
dev extra). mmcv-lite has no compiled ops (``mmcv._ext``); none of the mmseg code used here (EncoderDecoder,
BaseDecodeHead, CrossEntropyLoss, SegDataPreProcessor) calls one, so a stand-in module that raises on any op
lets ``mmseg.models`` import."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mmengine")


class _NoCompiledOps(types.ModuleType):
    """``mmcv._ext`` for mmcv-lite: every op raises, naming itself."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise RuntimeError(f"mmcv op {name} is not built (mmcv-lite)")
        return missing


@pytest.fixture(scope="module")
def mmseg_models():
    pytest.importorskip("mmcv")
    try:
        importlib.import_module("mmcv._ext")
    except ImportError:
        sys.modules["mmcv._ext"] = _NoCompiledOps("mmcv._ext")
    try:
        importlib.import_module("mmseg.models")
    except ImportError as e:
        pytest.skip(f"mmseg.models does not import here: {e}")
    importlib.import_module("attnseg.integrations.mm")  # custom_imports
    from mmseg.registry import MODELS
    return MODELS


HEAD_CFG = dict(num_heads=[1, 2, 4], window_size=4, cca_heads=2, cca_head_dim=8, drop_path_rate=0.0)


def _segmentor(models, num_classes=3):
    from mmengine.registry import DefaultScope

    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("mmseg"):  # what a config's default_scope='mmseg' does
        return _build(models, num_classes)


def _build(models, num_classes):
    from mmengine.config import ConfigDict

    return models.build(dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0],
                               size=(64, 64), pad_val=0, seg_pad_val=255),
        backbone=dict(type="attnseg.test_nat"),
        decode_head=dict(type="attnseg.DecodeHead", head="att_swin_unet", in_channels=[16, 32, 64, 128],
                         in_index=[0, 1, 2, 3], strides=[4, 8, 16, 32], num_classes=num_classes, head_cfg=HEAD_CFG,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(), test_cfg=ConfigDict(mode="whole")))  # a config file's dicts are ConfigDicts


def _samples(labels):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for label in labels:
        sample = SegDataSample(gt_sem_seg=PixelData(data=label[None]))
        h, w = label.shape
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        samples.append(sample)
    return samples


def test_att_swin_unet_head_in_mmsegs_encoder_decoder_gives_attnsegs_logits_and_cross_entropy(mmseg_models):
    from attnseg.registry import HEADS

    model = _segmentor(mmseg_models)
    head = model.decode_head
    assert type(head).__mro__[1].__name__ == "BaseDecodeHead" and not hasattr(head, "conv_seg")
    assert head.num_classes == head.out_channels == 3
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[0, :4] = 255  # ignored pixels
    features = model.extract_feat(images)
    assert [tuple(f.shape) for f in features] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    # the same attnseg head, fed directly, gives the same logits
    direct = HEADS.get("att_swin_unet")([16, 32, 64, 128], [4, 8, 16, 32], num_classes=3, **HEAD_CFG)
    direct.load_state_dict({k[len("head."):]: v for k, v in head.state_dict().items()})
    model.eval()
    direct.eval()
    with torch.no_grad():
        logits = head(features)
        torch.testing.assert_close(logits, direct(list(features), images), rtol=0, atol=0)
    assert logits.shape == (2, 3, 64, 64)
    # mmseg's loss: cross-entropy summed over the non-ignored pixels and divided by all of them (mmseg's default
    # avg_non_ignore=False), and the pixel accuracy
    model.train()
    losses = model.loss(images, _samples(labels))
    assert set(losses) == {"decode.loss_ce", "decode.acc_seg"}
    with torch.no_grad():
        reference = F.cross_entropy(head(model.extract_feat(images)), labels, ignore_index=255,
                                    reduction="sum") / labels.numel()
    torch.testing.assert_close(losses["decode.loss_ce"], reference, rtol=1e-5, atol=1e-6)
    losses["decode.loss_ce"].backward()
    assert model.backbone.backbone.patch_embed.proj[0].weight.grad is not None  # reaches the backbone
    assert all(p.grad is not None for p in head.head.parameters() if p.requires_grad)


def test_predict_gives_a_label_map_at_the_image_size(mmseg_models):
    model = _segmentor(mmseg_models, num_classes=4).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (sample,) = model.predict(images, _samples(torch.zeros(1, 64, 64, dtype=torch.long)))
        logits = model.decode_head(model.extract_feat(images))
    assert sample.seg_logits.data.shape == (4, 64, 64)
    assert torch.equal(sample.pred_sem_seg.data[0], logits[0].argmax(0))


@pytest.mark.parametrize("head, reason", [
    ("unetr", "convolves the input image itself"),
    ("dconnnet", "its output is 'connectivity'"),
    ("msga", "its output is 'msga'"),
    ("hybridgnet", "its output is 'landmarks'"),
])
def test_heads_that_do_not_fit_are_refused_with_the_reason(head, reason):
    mm = importlib.import_module("attnseg.integrations.mm")
    with pytest.raises(ValueError, match=reason):
        mm.ATTNSEG_MODELS.build(dict(type="DecodeHead", head=head, in_channels=[16, 32, 64, 128],
                                     strides=[4, 8, 16, 32], num_classes=3))


def test_decode_head_without_mmseg_names_what_to_install(monkeypatch):
    mm = importlib.import_module("attnseg.integrations.mm")
    monkeypatch.setattr(mm, "_DECODE_HEAD_CLASS", None)
    monkeypatch.setitem(sys.modules, "mmseg.models.decode_heads.decode_head", None)  # import fails
    with pytest.raises(ImportError, match="needs mmsegmentation"):
        mm.mm_decode_head("att_swin_unet", [16, 32, 64, 128], [4, 8, 16, 32], num_classes=3)


def test_shipped_mmseg_config_builds_and_runs_in_mmseg(mmseg_models):
    """configs/mm's UperNet + NAT-Mini, built by mmseg from the file (BN instead of SyncBN on one CPU process)."""
    from pathlib import Path

    from mmengine import Config
    from mmengine.registry import DefaultScope

    cfg = Config.fromfile(Path(__file__).resolve().parents[2] / "configs" / "mm"
                          / "upernet_nat_mini_8xb2-160k_ade20k-512x512.py")
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.norm_cfg = dict(type="BN", requires_grad=True)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = mmseg_models.build(cfg.model).eval()
    assert type(model.backbone).__name__ == "AttnSeg_nat_mini"
    with torch.no_grad():
        (sample,) = model.predict(torch.randn(1, 3, 64, 96), _samples(torch.zeros(1, 64, 96, dtype=torch.long)))
    assert sample.seg_logits.data.shape == (cfg.model.decode_head.num_classes, 64, 96)
