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


def _blobs(seed: int, shape=(24, 20, 16), num_classes=3) -> torch.Tensor:
    """A label map of a few overlapping boxes (class 1 and 2) at random places."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(shape, dtype=torch.long)
    for c in range(1, num_classes):
        for _ in range(2):
            lo = [int(torch.randint(0, s - 6, (), generator=g)) for s in shape]
            size = [int(torch.randint(3, 7, (), generator=g)) for _ in shape]
            out[tuple(slice(a, a + b) for a, b in zip(lo, size))] = c
    return out


def test_per_case_metrics_agree_with_monai():
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
    from monai.networks.utils import one_hot

    spacing = (1.5, 0.8, 2.0)
    preds = torch.stack([_blobs(s) for s in (1, 2, 3)])
    targets = torch.stack([_blobs(s) for s in (11, 2, 13)])
    preds[1, 0:3] = 0  # case 2: a near-perfect prediction
    m = SegmentationMetrics(3, hd95=True, surface_dice=True, surface_tolerance=[1.0, 1.0, 2.5])
    m.update(preds, targets, ids=["a", "b", "c"], spacings=[spacing] * 3)
    rows = m.per_case(["bg", "x", "y"])
    assert [r["case"] for r in rows] == ["a", "b", "c"]

    p1h, t1h = one_hot(preds[:, None], 3), one_hot(targets[:, None], 3)
    dice = DiceMetric(include_background=False, reduction="none")(p1h, t1h)
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p1h, t1h, spacing=spacing)
    nsd = SurfaceDiceMetric([1.0, 2.5], include_background=False, reduction="none")(p1h, t1h, spacing=spacing)
    for i, row in enumerate(rows):
        for c, name in ((0, "x"), (1, "y")):
            assert row[f"Dice_{name}"] == pytest.approx(float(dice[i, c]), abs=1e-6)
            assert row[f"HD95_{name}"] == pytest.approx(float(hd[i, c]), abs=1e-5)
            assert row[f"NSD_{name}"] == pytest.approx(float(nsd[i, c]), abs=1e-6)
        assert row["mDice"] == pytest.approx(float(dice[i].mean()), abs=1e-6)
    out = m.compute()
    assert out["mNSD"] == pytest.approx(float(nsd.mean(0).mean()), abs=1e-6)
    assert out["HD95"][1] == pytest.approx(float(hd[:, 0].mean()), abs=1e-5)
    assert 0 < out["mNSD"] < 1 and rows[1]["mNSD"] > rows[0]["mNSD"]


def test_one_sided_class_gives_zero_dice_and_nsd_and_undefined_hd95():
    target = torch.zeros(1, 12, 12, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    pred = torch.zeros_like(target)
    m = SegmentationMetrics(3, hd95=True, surface_dice=True)
    m.update(pred, target, ids=["only-target"])
    row = m.per_case()[0]
    assert row["Dice_1"] == 0 and row["NSD_1"] == 0 and math.isnan(row["HD95_1"])
    assert math.isnan(row["Dice_2"]) and math.isnan(row["NSD_2"])  # absent from both
    assert m.compute()["HD95_undefined"] == 1


def test_surface_metrics_on_a_crop_equal_the_whole_volume():
    """The bounding-box shortcut gives what MONAI computes on the whole volume."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    from attnseg.engine.metrics import surface_metrics_per_class

    pred, target = _blobs(5, (30, 26, 22)), _blobs(6, (30, 26, 22))
    target[0:4, 0:4, 0:4] = 2  # a class touching the volume's corner
    hd, nsd = surface_metrics_per_class(pred, target, 3, (1.0, 2.0, 0.5), surface_tolerance=[1.0] * 3)
    for c in (1, 2):
        p, t = (pred == c)[None, None].float(), (target == c)[None, None].float()
        assert hd[c] == pytest.approx(float(compute_hausdorff_distance(p, t, True, percentile=95,
                                                                       spacing=[1.0, 2.0, 0.5])), abs=1e-5)
        assert nsd[c] == pytest.approx(float(compute_surface_dice(p, t, [1.0], True, spacing=[1.0, 2.0, 0.5])),
                                       abs=1e-6)
