import math

import pytest
import torch

from attnseg.engine.metrics import SegmentationMetrics, hd95_per_class


def test_dice_iou_from_known_confusion():
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 1]]])
    m = SegmentationMetrics(num_classes=3, include_background=False)
    m.update(pred, target)
    out = m.compute()
    # class 1: tp 3, fp 1, fn 0 -> dice 6/7, iou 3/4; class 2: tp 1, fp 0, fn 1 -> dice 2/3, iou 1/2
    assert out["Dice"][1] == pytest.approx(6 / 7)
    assert out["IoU"][1] == pytest.approx(3 / 4)
    assert out["Dice"][2] == pytest.approx(2 / 3)
    assert out["mDice"] == pytest.approx((6 / 7 + 2 / 3) / 2)
    assert out["mIoU"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    # background: tp 2, fp 1, fn 1 -> 4/6
    assert out["Dice"][0] == pytest.approx(4 / 6)


def test_accumulates_over_batches_and_ignores_index():
    m = SegmentationMetrics(num_classes=2, ignore_index=255, include_background=True)
    t = torch.tensor([[1, 1, 255, 0]])
    p = torch.tensor([[1, 0, 1, 0]])
    m.update(p, t)
    m.update(t.clamp(max=1), t.clamp(max=1))
    out = m.compute()
    # first: class1 tp1 fn1; class0 tp1 fp1. second (no ignore): class1 tp3 ; class0 tp1
    assert out["Dice"][1] == pytest.approx(2 * 4 / (2 * 4 + 1))
    assert out["Dice"][0] == pytest.approx(2 * 2 / (2 * 2 + 1))


def test_absent_class_is_nan_and_left_out_of_mean():
    m = SegmentationMetrics(num_classes=4)
    m.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 1]]))
    out = m.compute()
    assert math.isnan(out["Dice"][3]) and out["mDice"] == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [2, 5])
def test_hd95_of_shifted_square(shift):
    a = torch.zeros(40, 40, dtype=torch.long)
    a[10:20, 10:20] = 1
    b = torch.roll(a, shifts=shift, dims=1)
    hd = hd95_per_class(b, a, 2)
    assert hd[1].item() == pytest.approx(shift, abs=0.01)
    m = SegmentationMetrics(2, hd95=True)
    m.update(b[None], a[None])
    assert m.compute()["mHD95"] == pytest.approx(shift, abs=0.01)


def test_hd95_3d():
    a = torch.zeros(16, 16, 16, dtype=torch.long)
    a[4:10, 4:10, 4:10] = 1
    assert hd95_per_class(a, a, 2)[1].item() == 0.0
