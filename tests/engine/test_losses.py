import pytest
import torch
import torch.nn.functional as F

from attnseg.engine.losses import CrossEntropyLoss, DiceCELoss, DiceLoss, FocalLoss
from attnseg.registry import LOSSES


def _perfect_logits(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(target, num_classes).movedim(-1, 1).float() * 40 - 20


@pytest.mark.parametrize("spatial", [(8, 9), (4, 5, 6)])
def test_dice_is_zero_for_perfect_prediction_and_one_for_disjoint(spatial):
    target = torch.randint(0, 3, (2, *spatial))
    assert DiceLoss(3)(_perfect_logits(target, 3), target).item() == pytest.approx(0.0, abs=1e-4)
    wrong = (target + 1) % 3
    assert DiceLoss(3)(_perfect_logits(wrong, 3), target).item() == pytest.approx(1.0, abs=1e-4)


def test_dice_matches_hand_computation():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = 100.0  # class 1 at pixel 0 with p=1; pixel 1 p=0.5 each
    target = torch.tensor([[[1, 0]]])
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(target, 2).movedim(-1, 1).float()
    inter = (probs * onehot).sum((0, 2, 3))
    dice = (2 * inter + 1e-5) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1e-5)
    assert DiceLoss(2)(logits, target).item() == pytest.approx((1 - dice).mean().item(), rel=1e-6)


def test_ce_equals_torch_and_respects_ignore_index():
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    assert torch.allclose(CrossEntropyLoss(4)(logits, target), F.cross_entropy(logits, target))
    target_ign = target.clone()
    target_ign[:, :2] = 255
    expected = F.cross_entropy(logits, target_ign, ignore_index=255)
    assert torch.allclose(CrossEntropyLoss(4, ignore_index=255)(logits, target_ign), expected)
    # Changing logits at ignored pixels changes nothing.
    logits2 = logits.clone()
    logits2[:, :, :2] += 5
    assert torch.allclose(CrossEntropyLoss(4, ignore_index=255)(logits2, target_ign), expected)
    assert torch.allclose(DiceLoss(4, ignore_index=255)(logits2, target_ign), DiceLoss(4, ignore_index=255)(logits, target_ign))


def test_binary_losses_use_sigmoid():
    logits = torch.randn(3, 1, 7, 7)
    target = torch.randint(0, 2, (3, 7, 7))
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], target.float())
    assert torch.allclose(CrossEntropyLoss(1)(logits, target), expected)
    perfect = (target.float() * 40 - 20).unsqueeze(1)
    assert DiceLoss(1)(perfect, target).item() == pytest.approx(0.0, abs=1e-4)


def test_focal_gamma_zero_is_cross_entropy_and_focuses_on_hard_pixels():
    logits = torch.randn(2, 3, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6))
    assert torch.allclose(FocalLoss(3, gamma=0.0)(logits, target), F.cross_entropy(logits, target), atol=1e-6)
    assert FocalLoss(3, gamma=2.0)(logits, target) < F.cross_entropy(logits, target)


def test_dice_ce_is_weighted_sum_and_class_weights_are_checked():
    logits = torch.randn(2, 3, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6))
    combo = DiceCELoss(3, lambda_dice=0.5, lambda_ce=2.0)(logits, target)
    assert torch.allclose(combo, 0.5 * DiceLoss(3)(logits, target) + 2.0 * CrossEntropyLoss(3)(logits, target))
    with pytest.raises(ValueError, match="class_weights has 2 values"):
        DiceCELoss(3, class_weights=[1.0, 2.0])
    weighted = CrossEntropyLoss(3, class_weights=[1.0, 2.0, 3.0])(logits, target)
    assert torch.allclose(weighted, F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 3.0])))


def test_registry_names():
    assert {"ce", "dice", "dice_ce", "focal"} <= set(LOSSES.names())
    with pytest.raises(KeyError, match="did you mean 'dice_ce'"):
        LOSSES.get("dice_cee")
