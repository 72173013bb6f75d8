"""Multi-scale self-guided attention head: official blocks, any pyramid and size, training output, loss, memory guard."""

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import attnseg.heads.msga
import attnseg.layers.danet
import attnseg.models.msga
from attnseg.config import validate_config
from attnseg.convert.msga import convert_block
from attnseg.engine.losses import MSGALoss
from attnseg.errors import ConfigError
from attnseg.heads.msga import AttentionBranch, MSGAHead, MultiConv, SemanticModule
from attnseg.layers.danet import ChannelAttention, PositionAttention
from attnseg.models import Segmentor
from attnseg.registry import BACKBONES, HEADS, LOSSES
from tests.conftest import load_fixture

STRIDES = [4, 8, 16, 32]


def _block(name, kwargs):
    if name == "PAM_Module":
        return PositionAttention(kwargs["in_dim"])
    if name == "CAM_Module":
        return ChannelAttention(kwargs["in_dim"])
    if name == "PAM_CAM_Layer":
        return AttentionBranch(kwargs["in_ch"], "pam" if kwargs["use_pam"] else "cam")
    if name == "semanticModule":
        return SemanticModule(kwargs["in_dim"])
    if name == "MultiConv":
        return MultiConv(kwargs["in_ch"], kwargs["out_ch"], attn=kwargs["attn"])
    raise AssertionError(name)


def test_every_official_block_case():
    fx = load_fixture("msga_modules.pt")
    names = set()
    for case in fx["cases"]:
        name = case["constructor"]["name"]
        names.add(case["name"])
        block = _block(name, case["constructor"]["kwargs"])
        block.load_state_dict(convert_block(name, case["state_dict"]), strict=True)
        block.eval()
        with torch.no_grad():
            out = block(case["input"])
        tol = {"atol": case["tolerance"]["atol"], "rtol": case["tolerance"]["rtol"]}
        if name == "semanticModule":  # official: (enc2.view(-1), dec1)
            assert torch.allclose(out[0].reshape(-1), case["output"][0], **tol)
            assert torch.allclose(out[1], case["output"][1], **tol)
        else:
            assert out.shape == case["output"].shape
            assert torch.allclose(out, case["output"], **tol), case["name"]
    assert len(names) == 7


def _pyramid(batch, size, channels=(16, 24, 32, 48)):
    return [torch.randn(batch, c, math.ceil(size[0] / s), math.ceil(size[1] / s)) for c, s in zip(channels, STRIDES)]


def _segmentor(num_classes=3, **head_kwargs):
    backbone = BACKBONES.get("test_mambaout")(num_classes=0)
    info = backbone.feature_info
    head = MSGAHead([f["num_chs"] for f in info], [f["reduction"] for f in info], num_classes=num_classes,
                    channels=head_kwargs.pop("channels", 16), **head_kwargs)
    return Segmentor(backbone, head)


def test_registered_and_declares_its_output():
    head = HEADS.get("msga")([16, 24, 32, 48], STRIDES, num_classes=3)
    assert head.output_kind == "msga" and head.default_loss == "msga" and "msga" in LOSSES
    assert head.size_divisor == head.required_divisor(STRIDES) == 32
    assert HEADS.get("msga")([8, 8], [8, 16], num_classes=2, channels=8).required_divisor([8, 16]) == 32  # 4 * s_1
    assert MSGALoss.accepts == ("msga", "logits") and MSGALoss.target_key == "mask"


def test_odd_input_sizes_give_logits_and_training_dict_of_the_input_size():
    torch.manual_seed(0)
    model = _segmentor(num_classes=3).eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3, 97, 131)
    labels = model.head.postprocess(out)
    probs = model.head.class_probabilities(out)
    assert labels.shape == (2, 97, 131) and probs.shape == (2, 3, 97, 131)
    assert torch.equal(labels, probs.argmax(1))
    assert torch.allclose(probs.sum(1), torch.ones(2, 97, 131), atol=1e-5)

    train_out = model.train()(x)
    assert isinstance(train_out, dict) and train_out["logits"].shape == (2, 3, 97, 131)
    assert len(train_out["predictions"]) == 8 and all(p.shape == (2, 3, 97, 131) for p in train_out["predictions"])
    # padded to 128x160 -> finest map 32x40; semantic code of the 2c-wide input: 8c x 8 x 10 per sample
    assert [tuple(a.shape) for a, _ in train_out["semantic_pairs"]] == [(2, 128 * 8 * 10)] * 4
    assert len(train_out["reconstruction_pairs"]) == 8
    assert all(i.shape == r.shape == (2, 32, 32, 40) for i, r in train_out["reconstruction_pairs"])


def test_eval_output_is_the_mean_of_the_refined_logits_of_the_training_dict():
    torch.manual_seed(1)
    head = MSGAHead([16, 24, 32, 48], STRIDES, num_classes=4, channels=16)
    feats, image = _pyramid(2, (64, 96)), torch.randn(2, 1, 64, 96)
    head.train()
    with torch.no_grad():
        out = head(feats, image)
    refined = torch.stack(out["predictions"][4:]).mean(0)
    assert torch.allclose(out["logits"], refined, atol=1e-6)
    cropped = head.crop_output(out, (50, 70))
    assert cropped["logits"].shape == (2, 4, 50, 70) and all(p.shape == (2, 4, 50, 70) for p in cropped["predictions"])
    assert cropped["semantic_pairs"] is out["semantic_pairs"]


def test_gradients_reach_every_parameter_in_training():
    torch.manual_seed(0)
    model = _segmentor(num_classes=3, channels=8).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    MSGALoss(3)(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    # gamma starts at 0 (official), so PAM's query/key/value get zero gradients until gamma moves
    zero = {n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0}
    assert zero and all(".attention." in n and "_conv." in n for n in zero)
    model.zero_grad()
    for m in model.modules():
        if isinstance(m, (PositionAttention, ChannelAttention)):
            torch.nn.init.constant_(m.gamma, 0.5)
    MSGALoss(3)(model(x), y).backward()
    assert not [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]


def test_binary_head_and_other_level_counts():
    head = MSGAHead([8, 16, 32], [4, 8, 16], num_classes=1, channels=8).eval()
    feats = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip([8, 16, 32], [4, 8, 16])]
    with torch.no_grad():
        out = head(feats, torch.randn(1, 1, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    assert torch.equal(head.postprocess(out), (head.class_probabilities(out)[:, 0] > 0.5).long())
    assert len(head.predict) == 3 and head.fuse.block1.conv.in_channels == 3 * 8


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="2D only"):
        MSGAHead([8], [4], num_classes=2, spatial_dims=3)
    with pytest.raises(ValueError, match="attention_stride must be a multiple"):
        MSGAHead([8, 8], [4, 8], num_classes=2, attention_stride=6)
    with pytest.raises(ValueError, match="increasing strides"):
        MSGAHead([8, 8], [8, 4], num_classes=2)


def test_attention_stride_runs_position_attention_on_a_coarser_map():
    torch.manual_seed(0)
    fine = MSGAHead([16, 24, 32, 48], STRIDES, num_classes=2, channels=16).eval()
    coarse = MSGAHead([16, 24, 32, 48], STRIDES, num_classes=2, channels=16, attention_stride=16).eval()
    for m in fine.modules():
        if isinstance(m, PositionAttention):
            torch.nn.init.constant_(m.gamma, 0.5)  # 0 at init: PAM would be the identity
    coarse.load_state_dict(fine.state_dict())  # same parameters: the option only changes where PAM runs
    seen = {}

    def hook(name):
        return lambda module, args, out: seen.setdefault(name, []).append(tuple(args[0].shape[2:]))

    for name, head in (("fine", fine), ("coarse", coarse)):
        for m in head.modules():
            if isinstance(m, (PositionAttention, ChannelAttention)):
                m.register_forward_hook(hook(f"{name}.{type(m).__name__}"))
    feats, image = _pyramid(1, (128, 64)), torch.randn(1, 1, 128, 64)
    with torch.no_grad():
        a, b = fine(feats, image), coarse(feats, image)
    assert set(seen["fine.PositionAttention"]) == {(32, 16)}
    assert set(seen["coarse.PositionAttention"]) == {(8, 4)}
    assert set(seen["coarse.ChannelAttention"]) == {(32, 16)}  # CAM stays at the finest stride
    assert a.shape == b.shape == (1, 2, 128, 64) and not torch.allclose(a, b)
    assert fine.attention_bytes((128, 64))["positions"] == 32 * 16
    assert coarse.attention_bytes((128, 64), batch=2) == {"positions": 32, "per_matrix": 2 * 32 * 32 * 4,
                                                         "forward": 8 * 2 * 32 * 32 * 4}
    assert MSGAHead([8, 8], [4, 8], num_classes=2, attention_stride=64).required_divisor([4, 8]) == 64


def test_a_too_large_position_attention_is_refused_with_the_remedy():
    head = MSGAHead([16, 24, 32, 48], STRIDES, num_classes=2, channels=16, max_attention_bytes=2**20).eval()
    assert head.attention_bytes((128, 128))["per_matrix"] == 1024**2 * 4 > 2**20
    with pytest.raises(MemoryError, match="attention_stride"), torch.no_grad():
        head(_pyramid(1, (128, 128)), torch.randn(1, 1, 128, 128))
    with torch.no_grad():  # 64x64 -> 256 positions, 256 KiB: allowed
        assert head(_pyramid(1, (64, 64)), torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def _hand_ce(logits, target, ignore=None):
    logp = F.log_softmax(logits.double(), dim=1)
    valid = torch.ones_like(target, dtype=torch.bool) if ignore is None else target != ignore
    safe = torch.where(valid, target, torch.zeros_like(target))
    picked = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    return -(picked * valid).sum() / valid.sum()


def test_loss_equals_a_hand_computation_on_the_official_training_outputs():
    fx = load_fixture("msga_daf_stack.pt")["train"]["tensors"]
    preds = [fx[f"predict{k}"] for k in range(1, 5)] + [fx[f"predict{k}_2"] for k in range(1, 5)]
    sem = [(fx[f"semVector_1_{j}"][None], fx[f"semVector_2_{j}"][None]) for j in range(4, 0, -1)]
    g = torch.Generator().manual_seed(0)
    recon = [(torch.randn(1, 8, 4, 4, generator=g), torch.randn(1, 8, 4, 4, generator=g)) for _ in range(8)]
    target = torch.randint(0, 5, (1, 64, 64), generator=g)
    target[0, :8] = 255
    output = {"logits": torch.stack(preds[4:]).mean(0), "predictions": preds, "semantic_pairs": sem,
              "reconstruction_pairs": recon}

    def mse(a, b):
        return ((a.double() - b.double()) ** 2).mean()

    ce = sum(_hand_ce(p, target, 255) for p in preds)
    sem_term = sum(mse(a, b) for a, b in sem)
    rec_term = sum(mse(a, b) for a, b in recon)
    assert sem_term > 0 and rec_term > 0
    loss = MSGALoss(5, ignore_index=255)(output, target)
    assert loss.item() == pytest.approx((ce + 0.25 * sem_term + 0.1 * rec_term).item(), rel=1e-5)
    weighted = MSGALoss(5, ignore_index=255, ce_weight=0.5, semantic_weight=0.0, reconstruction_weight=1.0)
    assert weighted(output, target).item() == pytest.approx((0.5 * ce + rec_term).item(), rel=1e-5)
    # the eval output (a Tensor) gets the CE alone
    assert MSGALoss(5, ignore_index=255)(output["logits"], target).item() == pytest.approx(
        _hand_ce(output["logits"], target, 255).item(), rel=1e-5)
    with pytest.raises(ValueError, match="lacks"):
        MSGALoss(5)({"logits": output["logits"]}, target)


def test_a_few_optimizer_steps_lower_the_loss():
    torch.manual_seed(0)
    model = _segmentor(num_classes=2, channels=8).train()
    x = torch.randn(4, 3, 32, 32)
    y = (x[:, 0] > 0).long()
    loss_fn = MSGALoss(2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_config_pairs_the_head_with_its_loss():
    base = {"model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "msga", "channels": 8},
                      "num_classes": 3},
            "data": {"dataset": {"name": "synthetic2d", "num_classes": 3}}}
    assert validate_config(base).loss.name == "msga"  # the head's default_loss
    with pytest.raises(ConfigError, match="'dice_ce' takes logits outputs, but head 'msga' gives msga outputs; use "
                                          "loss.name: msga"):
        validate_config({**base, "loss": {"name": "dice_ce"}})
    plain = {**base, "model": {**base["model"], "head": {"name": "unetr", "feature_size": 8}}, "loss": {"name": "msga"}}
    assert validate_config(plain).loss.name == "msga"  # on plain logits MSGALoss is a cross-entropy


def test_short_training_run_on_synthetic_data(tmp_path):
    from attnseg.engine.runner import train

    cfg = validate_config({
        "work_dir": str(tmp_path),
        "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "msga", "channels": 8},
                  "num_classes": 3},
        "data": {"dataset": {"name": "synthetic2d", "num_classes": 3, "image_size": [40, 40], "num_train": 8,
                             "num_val": 4, "num_test": 4},
                 "batch_size": 4, "augment": None},
        "loss": {"name": "msga"},
        "optimizer": {"lr": 0.003},
        "scheduler": {"name": "constant"},
        "trainer": {"max_epochs": 3, "progress_bar": "none", "loggers": ["csv"], "deterministic": True,
                    "accelerator": "cpu", "devices": 1},
    })
    result = train(cfg)
    assert result["global_step"] == 6
    assert 0.0 <= result["metrics"]["val/mDice"] <= 1.0
    assert math.isfinite(result["metrics"]["val/loss"])
    rows = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("train/loss_epoch")
    losses = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.parametrize("module", [attnseg.heads.msga, attnseg.models.msga, attnseg.layers.danet])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
