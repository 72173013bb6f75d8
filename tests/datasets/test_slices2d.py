"""slices2d: 2D samples cut from the cases of a 3D dataset along each axis, splits by case, the labelled-slice
filter, preprocessing before slicing, padding to one size, and a batch through the 2D transforms."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from attnseg.datasets import build_dataset, collate
from attnseg.datasets.transforms import build_transform
from attnseg.errors import ConfigError

SHAPE = (10, 12, 8)


def write_cases(root, n=4, affine=None, shapes=None):
    """``n`` cases whose voxel value encodes its position (image = 100 x + 10 y + z) and whose label marks
    a box at x 2..4, y 3..6, z 1..2 (class 1) and one voxel of class 2."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        shape = shapes[i] if shapes else SHAPE
        x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
        image = (100 * x + 10 * y + z + 1000 * i).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[2:5, 3:7, 1:3] = 1
        label[7, 1, 5] = 2
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"case_{i}.nii.gz")
    return root


def _source(root, **kw):
    return {"name": "nifti_folder", "root": str(root), "num_classes": 3, "val_ratio": 0.5, **kw}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_along_each_axis_hold_the_voxels_of_that_plane(tmp_path, axis):
    root = write_cases(tmp_path / "d", n=2)
    ds = build_dataset("slices2d", "train", source=_source(root, val_ratio=0.0), axis=axis)
    assert (ds.spatial_dims, ds.num_classes, ds.in_chans) == (2, 3, 1)
    assert len(ds) == 2 * SHAPE[axis]
    k = 5
    s = ds[k]
    plane = [SHAPE[a] for a in range(3) if a != axis]
    assert s["image"].shape == (1, *plane) and s["mask"].shape == tuple(plane) and s["mask"].dtype == torch.int64
    case = s["meta"]["case_id"]
    raw = nib.load(root / "images" / f"{case}.nii.gz").get_fdata()
    assert np.array_equal(s["image"][0].numpy(), np.take(raw, k, axis=axis))
    assert s["meta"]["id"] == f"{case}_{'xyz'[axis]}{k:03d}" and s["meta"]["index"] == k
    assert s["meta"]["spacing"] == (1.0, 1.0)


def test_splits_are_by_case_and_the_labelled_filter_keeps_foreground_slices(tmp_path):
    root = write_cases(tmp_path / "d", n=4)
    kw = {"source": _source(root), "axis": 2, "labelled_only": True}
    train = build_dataset("slices2d", "train", **kw)
    val = build_dataset("slices2d", "val", **kw)
    train_cases = {s["meta"]["case_id"] for s in (train[i] for i in range(len(train)))}
    val_cases = {val[i]["meta"]["case_id"] for i in range(len(val))}
    assert len(train_cases) == len(val_cases) == 2 and not train_cases & val_cases
    assert [c.id for c in train.cases] == sorted(train_cases)
    # train: only z 1, 2 (box) and 5 (the class-2 voxel) per case; val keeps every slice (eval_all_slices)
    assert [k for _, k in train.slices] == [1, 2, 5, 1, 2, 5]
    assert len(val) == 2 * SHAPE[2]
    assert all(train[i]["mask"].any() for i in range(len(train)))
    strict = build_dataset("slices2d", "val", eval_all_slices=False, **kw)
    assert len(strict) == 6
    # a share of the empty slices, seeded: 0.4 of the 5 empty ones = 2 per case
    some = build_dataset("slices2d", "train", empty_fraction=0.4, seed=1, **kw)
    again = build_dataset("slices2d", "train", empty_fraction=0.4, seed=1, **kw)
    assert len(some) == 2 * (3 + 2) and some.slices == again.slices
    assert sum(not some[i]["mask"].any() for i in range(len(some))) == 4


def test_preprocessing_before_slicing_and_padding_to_one_size(tmp_path):
    # voxel axis 0 points to -R: RAS reverses it; 2 mm voxels on axis 0 resampled to 1 mm double that axis
    affine = np.diag([-2.0, 1.0, 1.0, 1.0])
    root = write_cases(tmp_path / "d", n=2, affine=affine, shapes=[SHAPE, (9, 11, 8)])
    volume = {"orientation": "RAS", "spacing": {"pixdim": [1.0, 1.0, 1.0]},
              "intensity": {"type": "scale_range", "a_min": 0, "a_max": 2000}}
    ds = build_dataset("slices2d", "train", source=_source(root, val_ratio=0.0), axis=2, volume=volume)
    first = ds[0]
    assert first["image"].shape == (1, 2 * SHAPE[0] - 1, SHAPE[1]) and first["image"].max() <= 1
    # after RAS, the last row of the slice is the file's x = 0 (1000 x case + 10 y + z for case_0, z = 0)
    assert torch.allclose(first["image"][0, -1], torch.arange(SHAPE[1]) * 10 / 2000.0)
    assert first["meta"]["spacing"] == pytest.approx((1.0, 1.0))
    sizes = {tuple(ds[i]["image"].shape) for i in range(len(ds))}
    assert len(sizes) == 2  # the two cases have other grids ...
    fixed = build_dataset("slices2d", "train", source=_source(root, val_ratio=0.0), axis=2, volume=volume,
                          slice_size=[16, 16])
    assert {tuple(fixed[i]["image"].shape) for i in range(len(fixed))} == {(1, 16, 16)}  # ... padded or cropped
    s = fixed[3]
    assert s["mask"].shape == (16, 16) and s["mask"].dtype == torch.int64
    with pytest.raises(ConfigError, match="volume \\['crop'\\] are 3D training augmentation"):
        build_dataset("slices2d", "train", source=_source(root), volume={"crop": {"type": "random",
                                                                                "spatial_size": [4, 4, 4]}})


def test_a_batch_through_the_2d_transforms_and_a_decathlon_source(tmp_path):
    root = write_cases(tmp_path / "d", n=3)
    training = [{"image": f"images/case_{i}.nii.gz", "label": f"labels/case_{i}.nii.gz"} for i in range(3)]
    (root / "dataset.json").write_text(json.dumps({
        "training": training, "validation": [], "labels": {"0": "bg", "1": "box", "2": "dot"},
        "modality": {"0": "MR"}}))
    transform = build_transform({"crop_size": [8, 8], "hflip": 0.5}, {"mean": [500.0], "std": [100.0]}, train=True)
    ds = build_dataset("slices2d", "train", transform=transform, axis=2, labelled_only=True,
                       source={"name": "decathlon", "root": str(root), "val_ratio": 0.34})
    assert ds.class_names == ["bg", "box", "dot"]
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 1, 8, 8) and batch["mask"].shape == (4, 8, 8)
    assert len(batch["meta"]) == 4 and all("_z00" in m["id"] for m in batch["meta"])
    with pytest.raises(ConfigError, match="source.split is set by slices2d"):
        build_dataset("slices2d", "train", source={"name": "decathlon", "root": str(root), "split": "val"})
    with pytest.raises(ConfigError, match="source 'synthetic2d' is not a 3D case dataset"):
        build_dataset("slices2d", "train", source={"name": "synthetic2d", "num_classes": 2})


@pytest.mark.slow
def test_a_2d_model_trains_on_slices_and_is_evaluated_on_the_held_out_cases(tmp_path):
    import csv

    from attnseg.config import validate_config
    from attnseg.engine.runner import evaluate, train

    root = write_cases(tmp_path / "d", n=4)
    cfg = validate_config({
        "work_dir": str(tmp_path / "run"),
        "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 12},
                  "num_classes": 3, "in_chans": 1, "spatial_dims": 2},
        "data": {"dataset": {"name": "slices2d", "source": _source(root), "axis": 2, "labelled_only": True,
                             "empty_fraction": 0.5, "slice_size": [32, 32],
                             "volume": {"orientation": "RAS",
                                        "intensity": {"type": "scale_range", "a_min": 0, "a_max": 4000}}},
                 "batch_size": 4, "augment": {"vflip": 0.5}},
        "evaluation": {"hd95": False},
        "optimizer": {"lr": 0.01, "weight_decay": 0.0},
        "scheduler": {"name": "constant"},
        "trainer": {"max_epochs": 6, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu", "devices": 1,
                    "log_every_n_steps": 1},
    })
    result = train(cfg)
    # 2 training cases x (3 labelled + 2 of the 5 empty slices) = 10 slices: 2 full batches of 4 per epoch
    assert result["global_step"] == 6 * 2
    assert {"val/mDice", "val/Dice_class1", "val/Dice_class2"} <= set(result["metrics"])
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    res = evaluate(cfg, result["last_checkpoint"])
    assert res["class_names"] == ["class0", "class1", "class2"] and 0 <= res["mDice"] <= 1
