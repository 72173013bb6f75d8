"""The contract for heads with a structured output: Segmentor cropping, loss/head pairing in config validation,
the head's default loss, the task's loss target, and flips averaged as the head's class probabilities."""

import pytest
import torch
from torch import nn

from attnseg.config import validate_config
from attnseg.engine.inference import blends_probabilities, flip_tta, probability_predictor
from attnseg.errors import ConfigError
from attnseg.models import Segmentor
from attnseg.registry import BACKBONES, HEADS, LOSSES


class PairHead(nn.Module):
    """A toy head with an auxiliary output in training: ``{"logits", "aux"}``; plain logits in eval."""

    output_kind = "pair"
    default_loss = "test_pair"

    def __init__(self, in_channels, strides, num_classes, spatial_dims=2, in_chans=3):
        super().__init__()
        self.in_channels, self.strides, self.num_classes, self.spatial_dims = in_channels, strides, num_classes, 2
        self.size_divisor = max(strides)
        self.proj = nn.Conv2d(in_channels[0], num_classes, 1)
        self.cropped = []

    def forward(self, features, image):
        logits = nn.functional.interpolate(self.proj(features[0]), size=image.shape[2:], mode="nearest")
        return {"logits": logits, "aux": 2 * logits} if self.training else logits

    def crop_output(self, output, size):
        self.cropped.append(tuple(size))
        return {k: v[..., : size[0], : size[1]] for k, v in output.items()}

    def class_probabilities(self, logits):
        return torch.softmax(2 * logits, dim=1)


class PairLoss(nn.Module):
    accepts = ("pair", "logits")
    target_key = "mask"

    def __init__(self, num_classes, ignore_index=None):
        super().__init__()

    def forward(self, output, target):
        logits = output["logits"] if isinstance(output, dict) else output
        loss = nn.functional.cross_entropy(logits, target)
        return loss + nn.functional.cross_entropy(output["aux"], target) if isinstance(output, dict) else loss


@pytest.fixture
def pair_head():
    HEADS.register("test_pair_head")(PairHead)
    LOSSES.register("test_pair")(PairLoss)
    yield
    for registry, name in ((HEADS, "test_pair_head"), (LOSSES, "test_pair")):
        registry._entries.pop(name)


def _config(tmp_path, **extra):
    return {
        "work_dir": str(tmp_path),
        "model": {"backbone": {"name": "test_resnet"}, "head": {"name": "test_pair_head"}, "num_classes": 3},
        "data": {"dataset": {"name": "synthetic2d", "num_classes": 3, "image_size": [40, 40], "num_train": 4,
                             "num_val": 2, "num_test": 2}, "batch_size": 2, "augment": None},
        "trainer": {"max_epochs": 1, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu", "devices": 1},
        **extra,
    }


def test_segmentor_crops_a_structured_output_through_the_head(pair_head):
    bb = BACKBONES.get("test_resnet")(num_classes=0)
    model = Segmentor(bb, PairHead([f["num_chs"] for f in bb.feature_info], [4, 8, 16, 32], 3))
    out = model.train()(torch.randn(1, 3, 45, 70))
    assert model.head.cropped == [(45, 70)]
    assert out["logits"].shape == out["aux"].shape == (1, 3, 45, 70)
    logits = model.eval()(torch.randn(1, 3, 45, 70))
    assert logits.shape == (1, 3, 45, 70)
    torch.testing.assert_close(model.class_probabilities(logits), torch.softmax(2 * logits, 1))
    x = torch.randn(1, 3, 45, 70)
    # a head with its own probability rule has its flips averaged as those probabilities, not as logits
    assert blends_probabilities(model)
    with torch.no_grad():
        tta = flip_tta(probability_predictor(model), x)
        probs = [torch.softmax(2 * model(x), 1), torch.softmax(2 * model(x.flip(2)), 1).flip(2),
                 torch.softmax(2 * model(x.flip(3)), 1).flip(3)]
    torch.testing.assert_close(tta, sum(probs) / 3)


def test_the_heads_default_loss_is_used_when_no_loss_is_given(pair_head, tmp_path):
    assert validate_config(_config(tmp_path)).loss.name == "test_pair"


def test_a_loss_that_cannot_take_the_heads_output_is_refused(pair_head, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(_config(tmp_path, loss={"name": "dice_ce"}))
    assert ("loss.name: 'dice_ce' takes logits outputs, but head 'test_pair_head' gives pair outputs; use "
            "loss.name: test_pair") in str(err.value)


def test_training_and_testing_pass_the_structured_output_to_the_loss(pair_head, tmp_path):
    from attnseg.engine.runner import evaluate, train

    result = train(validate_config(_config(tmp_path)))
    assert result["global_step"] == 2
    assert 0.0 <= result["metrics"]["val/mDice"] <= 1.0
    metrics = evaluate(validate_config(_config(tmp_path)), result["last_checkpoint"], split="test")
    assert 0.0 <= metrics["mDice"] <= 1.0


def test_a_landmark_head_and_its_dataset_must_share_the_template():
    from attnseg.config import load_config

    path = "configs/hybridgnet/test_mambaout_hybridgnet_synthetic_landmarks.yaml"
    assert load_config(path).loss.name == "hybridgnet"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.dataset.template=chest_xray", "evaluation.sliding_window=true"])
    text = str(err.value)
    assert ("data.dataset.template 'chest_xray' (166 points: right_lung 44, left_lung 50, heart 26, right_clavicle 23, "
            "left_clavicle 23) differs from model.head.template 'chest_xray:LH' (120 points") in text
    assert "evaluation.sliding_window: head 'hybridgnet' predicts landmarks" in text
    with pytest.raises(ConfigError, match="model.head.template: unknown landmark template 'no_such'"):
        load_config(path, ["model.head.template=no_such"])
