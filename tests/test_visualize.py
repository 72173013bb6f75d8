"""Pictures: slice montages, training curves and metric box plots."""

import math

import numpy as np
from PIL import Image

from attnseg.visualize import palette, plot_metric_boxes, plot_training_curves, volume_montage


def test_volume_montage_spreads_slices_over_the_labelled_extent():
    volume = np.zeros((10, 8, 30), np.float32)
    volume[:, :, :] = np.arange(30)[None, None]  # intensity grows along z
    labels = np.zeros((10, 8, 30), np.int64)
    labels[2:5, 3:6, 10:20] = 2
    grid = volume_montage(volume, labels, 3, num_slices=4, columns=2, axis=2)
    # 4 tiles of [Y=8 rows, X=10 columns] in a 2x2 grid
    assert grid.shape == (16, 20, 3) and grid.dtype == np.uint8
    # every tile lies inside the labelled range 10..19, so every tile shows class 2's colour
    colour = palette(3)[2]
    for r in range(2):
        for c in range(2):
            tile = grid[r * 8:(r + 1) * 8, c * 10:(c + 1) * 10].astype(int)
            grey = tile[0, 0, 0]  # y 7, x 0: outside the label, so plain grey
            assert (tile[0, 0] == grey).all()
            mask_pixels = tile[2:5, 2:5]  # rows count y downwards from 7: y 5..3 -> rows 2..4; x 2..4
            expected = (0.55 * grey + 0.45 * colour).astype(int)
            assert (np.abs(mask_pixels - expected) <= 1).all()
    # intensity rises with the slice index: the last tile is brighter than the first
    assert grid[0, 0, 0] < grid[8, 10, 0]


def test_training_curves_from_a_lightning_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,lr-AdamW,step,train/loss_step,train/loss_epoch,val/loss,val/mDice,val/Dice_a\n"
                   "0,0.001,0,,,,,\n0,,0,1.5,,,,\n0,,9,,1.2,1.1,0.4,0.3\n1,,19,,0.8,0.9,0.6,0.5\n")
    out = tmp_path / "curves.png"
    plotted = plot_training_curves(csv, out)
    assert set(plotted) == {"lr-AdamW", "train/loss_step", "train/loss_epoch", "val/loss", "val/mDice"}
    assert Image.open(out).size[0] == 1500  # three panels of 5 inches at 100 dpi
    (tmp_path / "empty.csv").write_text("epoch,step\n0,0\n")
    assert plot_training_curves(tmp_path / "empty.csv", tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def test_metric_boxes_skip_nan_and_missing_metrics(tmp_path):
    rows = [{"case": "a", "Dice_x": 0.5, "Dice_y": math.nan}, {"case": "b", "Dice_x": 0.7, "Dice_y": 0.9}]
    out = tmp_path / "box.png"
    assert plot_metric_boxes(rows, ["x", "y"], out) == ["Dice"]
    assert Image.open(out).size[1] == 320  # one panel
