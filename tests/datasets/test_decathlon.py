"""The decathlon dataset on small NIfTI folders written here: splits, class map, orientation, spacing,
multi-modal images, caching, every error naming its file, and a short end-to-end training run."""

import csv
import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from attnseg.datasets import build_dataset, collate
from attnseg.datasets.volume_transforms import VolumeTransform
from attnseg.errors import ConfigError, DataError

# Voxel axis 0 points to -A (1.5 mm), axis 1 to +S (1 mm), axis 2 to -R (2 mm): RAS reorders them to (2, 0, 1),
# flipping the old axes 2 and 0.
AFFINE = np.array([[0.0, 0.0, -2.0, 40.0], [-1.5, 0.0, 0.0, 30.0], [0.0, 1.0, 0.0, -20.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (24, 28, 20)
LABELS = {"0": "background", "1": "liver", "2": "tumour"}


def _volume(rng, shape=SHAPE, body=None):
    """A CT-like volume: air (-1000 HU) around a body box (-100 HU) holding a ball (class 1, 80 HU) and a box
    (class 2, 200 HU), with noise; returns (image float32, label uint8)."""
    body = body or tuple(slice(2, s - 2) for s in shape)
    grids = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    image = np.full(shape, -1000.0, np.float32)
    image[body] = -100.0
    label = np.zeros(shape, np.uint8)
    lo = [b.start for b in body]
    centre = [lo[i] + 6 + rng.integers(0, 3) for i in range(3)]
    ball = sum((g - c) ** 2 for g, c in zip(grids, centre)) <= 16
    label[ball] = 1
    corner = [lo[i] + 11 + rng.integers(0, 2) for i in range(3)]
    label[tuple(slice(c, c + 5) for c in corner)] = 2
    image[label == 1] = 80.0
    image[label == 2] = 200.0
    image += rng.normal(0, 10, shape).astype(np.float32)
    return image, label


def write_decathlon(root, n=6, channels=1, affine=AFFINE, labels=LABELS, shapes=None, extra=None, seed=0):
    """A Decathlon folder with ``n`` training cases (4D images when ``channels`` > 1) and one test image."""
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        shape = shapes[i] if shapes else SHAPE
        image, label = _volume(rng, shape)
        if channels > 1:
            image = np.stack([image + 10 * c for c in range(channels)], axis=-1)  # [X, Y, Z, C]
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"labelsTr/case_{i:03d}.nii.gz"})
    test_image = _volume(rng)[0] if channels == 1 else np.stack([_volume(rng)[0]] * channels, axis=-1)
    nib.save(nib.Nifti1Image(test_image, affine), root / "imagesTs" / "case_900.nii.gz")
    modality = {str(c): f"MR{c}" for c in range(channels)} if channels > 1 else {"0": "CT"}
    data = {"name": "Synthetic", "tensorImageSize": "4D" if channels > 1 else "3D", "modality": modality,
            "labels": labels, "numTraining": n, "numTest": 1, "training": training,
            "test": ["./imagesTs/case_900.nii.gz"], **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(data, indent=1))
    return root


def _ids(ds):
    return [c.id for c in ds.cases]


def _where(t):
    return tuple(int(i) for i in (t == t.max()).nonzero()[0])


@pytest.fixture
def folder(tmp_path):
    return write_decathlon(tmp_path / "Task99")


def test_attributes_from_the_json(folder):
    ds = build_dataset("decathlon", "train", root=str(folder), cache_rate=0.0)
    assert ds.class_names == ["background", "liver", "tumour"] and ds.num_classes == 3
    assert (ds.in_chans, ds.modalities, ds.spatial_dims, ds.task, ds.ignore_index) == (1, ["CT"], 3, "segmentation",
                                                                                       None)
    assert ds.properties["name"] == "Synthetic" and "training" not in ds.properties
    s = ds[0]
    assert type(s["image"]) is torch.Tensor and s["image"].dtype == torch.float32 and s["image"].shape == (1, *SHAPE)
    assert s["mask"].dtype == torch.int64 and set(s["mask"].unique().tolist()) == {0, 1, 2}
    raw = nib.load(folder / "imagesTr" / f"{s['meta']['id']}.nii.gz").get_fdata()
    assert np.allclose(s["image"][0].numpy(), raw)  # no transform: voxels as stored
    assert s["meta"]["orig_size"] == SHAPE and np.allclose(s["meta"]["original_affine"], AFFINE)
    assert s["meta"]["path"].endswith(".nii.gz") and s["meta"]["label_path"].endswith(".nii.gz")


def test_ratio_split_is_seeded_disjoint_and_test_falls_back_to_val(folder):
    parts = {s: _ids(build_dataset("decathlon", s, root=str(folder), val_ratio=0.34, cache_rate=0.0))
             for s in ("train", "val", "test")}
    assert (len(parts["train"]), len(parts["val"])) == (4, 2)
    assert sorted(parts["train"] + parts["val"]) == [f"case_{i:03d}" for i in range(6)]
    assert parts["test"] == parts["val"]  # Decathlon's test images have no labels: test is the held-out part
    again = _ids(build_dataset("decathlon", "val", root=str(folder), val_ratio=0.34, cache_rate=0.0))
    other = _ids(build_dataset("decathlon", "val", root=str(folder), val_ratio=0.34, seed=3, cache_rate=0.0))
    assert again == parts["val"] and other != parts["val"]
    three = {s: _ids(build_dataset("decathlon", s, root=str(folder), val_ratio=0.34, test_ratio=0.17,
                                   cache_rate=0.0)) for s in ("train", "val", "test")}
    assert [len(v) for v in three.values()] == [3, 2, 1]
    assert len(set(sum(three.values(), []))) == 6
    predict = build_dataset("decathlon", "predict", root=str(folder), cache_rate=0.0)
    assert _ids(predict) == ["case_900"] and "mask" not in predict[0] and predict[0]["image"].shape == (1, *SHAPE)


def test_fold_split_and_json_folds_and_validation_list(tmp_path):
    folder = write_decathlon(tmp_path / "a")
    folds = [_ids(build_dataset("decathlon", "val", root=str(folder), fold=f, num_folds=3, cache_rate=0.0))
             for f in range(3)]
    assert [len(f) for f in folds] == [2, 2, 2] and sorted(sum(folds, [])) == [f"case_{i:03d}" for i in range(6)]
    train0 = _ids(build_dataset("decathlon", "train", root=str(folder), fold=0, num_folds=3, cache_rate=0.0))
    assert sorted(train0 + folds[0]) == [f"case_{i:03d}" for i in range(6)]
    with pytest.raises(ConfigError, match="fold must be in 0..2"):
        build_dataset("decathlon", "val", root=str(folder), fold=3, num_folds=3)
    # entries with their own fold keys (BraTS 2021 style) and a validation list (BTCV style)
    data = json.loads((folder / "dataset.json").read_text())
    for i, entry in enumerate(data["training"]):
        entry["fold"] = i % 2
    (folder / "dataset.json").write_text(json.dumps(data))
    assert _ids(build_dataset("decathlon", "val", root=str(folder), fold=1, cache_rate=0.0)) == \
        ["case_001", "case_003", "case_005"]
    data["validation"] = data["training"][4:]
    data["training"] = data["training"][:4]
    (folder / "dataset.json").write_text(json.dumps(data))
    assert _ids(build_dataset("decathlon", "val", root=str(folder), cache_rate=0.0)) == ["case_004", "case_005"]
    assert len(build_dataset("decathlon", "train", root=str(folder), cache_rate=0.0)) == 4
    own = build_dataset("decathlon", "val", root=str(folder), json_validation=False, val_ratio=0.5, cache_rate=0.0)
    assert len(own) == 2 and set(_ids(own)) <= {f"case_{i:03d}" for i in range(4)}


def test_label_values_map_through_the_class_map(tmp_path):
    folder = write_decathlon(tmp_path / "a", n=2, labels={"0": "background", "1": "edema", "4": "enhancing"})
    for i in range(2):  # stored values 0, 1, 4 -> classes 0, 1, 2
        path = folder / "labelsTr" / f"case_{i:03d}.nii.gz"
        lab = np.asarray(nib.load(path).dataobj)
        nib.save(nib.Nifti1Image(np.where(lab == 2, 4, lab).astype(np.uint8), AFFINE), path)
    ds = build_dataset("decathlon", "train", root=str(folder), val_ratio=0.0, cache_rate=1.0)
    assert ds.class_names == ["background", "edema", "enhancing"] and ds.label_values == [0, 1, 4]
    assert set(ds[0]["mask"].unique().tolist()) == {0, 1, 2}


def test_orientation_moves_a_marked_voxel_where_ras_says(folder):
    image = np.zeros(SHAPE, np.float32)
    image[3, 5, 7] = 1000.0
    label = np.zeros(SHAPE, np.uint8)
    label[3, 5, 7] = 2
    nib.save(nib.Nifti1Image(image, AFFINE), folder / "imagesTr" / "case_000.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), folder / "labelsTr" / "case_000.nii.gz")
    ras = VolumeTransform({"orientation": "RAS"}, train=False)
    ds = build_dataset("decathlon", "train", transform=ras, root=str(folder), val_ratio=0.0, cache_rate=0.0)
    s = ds[_ids(ds).index("case_000")]
    # RAS axis 0 (R) is old axis 2 reversed (2 mm), axis 1 (A) old axis 0 reversed (1.5 mm), axis 2 (S) old axis 1
    assert s["image"].shape == (1, 20, 24, 28) and s["mask"].shape == (20, 24, 28)
    expected = (20 - 1 - 7, 24 - 1 - 3, 5)
    assert _where(s["image"][0]) == expected and s["mask"][expected] == 2 and s["mask"].sum() == 2
    assert np.allclose(np.diag(s["meta"]["affine"])[:3], [2.0, 1.5, 1.0]) and s["meta"]["spacing"] == (2.0, 1.5, 1.0)
    world = AFFINE @ np.array([3, 5, 7, 1.0])  # the marked voxel keeps its world position
    assert np.allclose(s["meta"]["affine"] @ np.array([*expected, 1.0]), world)
    # spacing 1 x 0.75 x 0.5 mm: every axis twice as fine, (n - 1) * 2 + 1 voxels; labels by nearest neighbour
    fine = VolumeTransform({"orientation": "RAS", "spacing": {"pixdim": [1.0, 0.75, 0.5]}}, train=False)
    ds = build_dataset("decathlon", "train", transform=fine, root=str(folder), val_ratio=0.0, cache_rate=0.0)
    s = ds[_ids(ds).index("case_000")]
    assert s["image"].shape == (1, 39, 47, 55) and s["meta"]["spacing"] == pytest.approx((1.0, 0.75, 0.5))
    assert s["mask"][tuple(2 * e for e in expected)] == 2 and set(s["mask"].unique().tolist()) == {0, 2}
    assert s["meta"]["orig_size"] == SHAPE


def test_multimodal_4d_images_become_channels_first(tmp_path):
    folder = write_decathlon(tmp_path / "brats", n=3, channels=2)
    ds = build_dataset("decathlon", "train", root=str(folder), val_ratio=0.0, cache_rate=1.0)
    assert ds.in_chans == 2 and ds.modalities == ["MR0", "MR1"]
    s = ds[0]
    assert s["image"].shape == (2, *SHAPE) and s["mask"].shape == SHAPE
    assert torch.allclose(s["image"][1] - s["image"][0], torch.full(SHAPE, 10.0), atol=1e-3)
    # one file per modality, listed per case, stacks the same way
    data = json.loads((folder / "dataset.json").read_text())
    for i, entry in enumerate(data["training"]):
        four = nib.load(folder / entry["image"]).get_fdata(dtype=np.float32)
        paths = []
        for c in range(2):
            nib.save(nib.Nifti1Image(four[..., c], AFFINE), folder / "imagesTr" / f"case_{i:03d}_{c}.nii.gz")
            paths.append(f"imagesTr/case_{i:03d}_{c}.nii.gz")
        entry["image"] = paths
    (folder / "dataset.json").write_text(json.dumps(data))
    split = build_dataset("decathlon", "train", root=str(folder), val_ratio=0.0, cache_rate=0.0)
    assert torch.equal(split[0]["image"], s["image"]) and split.cases[0].id == "case_000_0"


def test_cache_holds_the_deterministic_part_across_epochs(folder, monkeypatch):
    from attnseg.datasets import nifti

    cfg = {"intensity": {"type": "scale_range", "a_min": -175, "a_max": 250}, "crop_foreground": {},
           "crop": {"type": "pos_neg", "spatial_size": [12, 12, 12], "num_samples": 2}, "flip_prob": [0.5, 0.5, 0.5]}
    train = build_dataset("decathlon", "train", transform=VolumeTransform(cfg, train=True), root=str(folder),
                          cache_rate=1.0)
    val = build_dataset("decathlon", "val", transform=VolumeTransform(cfg, train=False), root=str(folder),
                        cache_rate=1.0)
    reads = []
    monkeypatch.setattr(nifti, "_image_voxels", lambda *a: reads.append(a))  # any read from now on is recorded
    epoch1 = [val[i] for i in range(len(val))]
    epoch2 = [val[i] for i in range(len(val))]
    for a, b in zip(epoch1, epoch2):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["image"].min() >= 0 and a["image"].max() <= 1  # windowed, then cached
        assert a["image"].shape[1:] == (20 - 4, 24 - 4, 28 - 4)  # RAS, then the crop drops 2 air voxels per side
    crops = [train[0], train[0]]
    assert reads == [] and all(len(c) == 2 for c in crops)
    assert not torch.equal(crops[0][0]["image"], crops[1][0]["image"])  # random parts are drawn again
    train.check()  # nothing left to read: every case is cached


def _rewrite(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), path)


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "imagesTr" / "case_001.nii.gz").unlink(), "image file not found: .*case_001.nii.gz"),
    (lambda f: (f / "labelsTr" / "case_001.nii.gz").write_bytes(b"not a nifti file"),
     "case 'case_001': cannot read label .*labelsTr/case_001.nii.gz"),
    (lambda f: _rewrite(f / "labelsTr" / "case_001.nii.gz", np.zeros((24, 28, 19), np.uint8)),
     "label .*case_001.nii.gz has shape \\[24, 28, 19\\] but its image case_001.nii.gz has spatial shape"),
    (lambda f: _rewrite(f / "labelsTr" / "case_001.nii.gz", np.zeros(SHAPE, np.uint8), np.diag([1.0, 1, 1, 1])),
     "label .*case_001.nii.gz and its image case_001.nii.gz have different affines"),
    (lambda f: _rewrite(f / "labelsTr" / "case_001.nii.gz", np.full(SHAPE, 7, np.uint8)),
     "label .*case_001.nii.gz holds values \\[7\\] outside the class map"),
    (lambda f: _rewrite(f / "imagesTr" / "case_001.nii.gz", np.zeros((*SHAPE, 2), np.float32)),
     "image .*case_001.nii.gz has 2 channels but the dataset has 1 modalities"),
])
def test_bad_cases_are_data_errors_naming_the_file(folder, damage, message):
    damage(folder)
    with pytest.raises(DataError, match=message):
        build_dataset("decathlon", "train", root=str(folder), val_ratio=0.0, cache_rate=1.0)


def test_truncated_file_fails_when_read_and_check_lists_every_bad_case(folder):
    path = folder / "imagesTr" / "case_002.nii.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2])[:-8])  # header intact, voxels cut short
    _rewrite(folder / "labelsTr" / "case_004.nii.gz", np.full(SHAPE, 9, np.uint8))
    # headers are fine, so a dataset without a cache builds; check() reads every case
    ds = build_dataset("decathlon", "train", root=str(folder), val_ratio=0.0, cache_rate=0.0)
    with pytest.raises(DataError, match=r"2 of 6 items cannot be used:\n.*case_002.*voxels.*\n.*case_004.*\[9\]"):
        ds.check()
    with pytest.raises(DataError, match="cannot read the voxels of image .*case_002.nii.gz"):
        ds[_ids(ds).index("case_002")]
    # with a cache, building reads every case and the error lists both
    with pytest.raises(DataError, match=r"2 of 6 items cannot be used"):
        build_dataset("decathlon", "train", root=str(folder), val_ratio=0.0, cache_rate=1.0)


def test_dataset_json_errors(tmp_path, folder):
    with pytest.raises(DataError, match="dataset file not found: .*other.json; .* holds \\['dataset.json'\\]"):
        build_dataset("decathlon", "train", root=str(folder), json_file="other.json")
    (folder / "bad.json").write_text('{"training": [],}')
    with pytest.raises(DataError, match="bad.json is not valid JSON: .* at line 1"):
        build_dataset("decathlon", "train", root=str(folder), json_file="bad.json")
    data = json.loads((folder / "dataset.json").read_text())
    (folder / "nomod.json").write_text(json.dumps({k: v for k, v in data.items() if k != "modality"}))
    with pytest.raises(DataError, match="nomod.json lacks the keys 'modality'"):
        build_dataset("decathlon", "train", root=str(folder), json_file="nomod.json")
    (folder / "entry.json").write_text(json.dumps({**data, "training": [{"image": "imagesTr/case_000.nii.gz"}]}))
    with pytest.raises(DataError, match="entry.json: 'training'\\[0\\] must be \\{'image': path, 'label': path\\}"):
        build_dataset("decathlon", "train", root=str(folder), json_file="entry.json")
    (folder / "twice.json").write_text(json.dumps({**data, "training": data["training"] + data["training"][:1]}))
    with pytest.raises(DataError, match="'case_000' .* is listed twice"):
        build_dataset("decathlon", "train", root=str(folder), json_file="twice.json")
    (folder / "notest.json").write_text(json.dumps({**data, "test": []}))
    with pytest.raises(DataError, match="the 'predict' split of .*notest.json is empty \\(its 'test' list is empty\\)"):
        build_dataset("decathlon", "predict", root=str(folder), json_file="notest.json")
    with pytest.raises(DataError, match="the 'val' split .* is empty \\(6 'training' cases with val_ratio=0.0"):
        build_dataset("decathlon", "val", root=str(folder), val_ratio=0.0)
    with pytest.raises(ConfigError, match="ignore_index 2 is a label value"):
        build_dataset("decathlon", "train", root=str(folder), ignore_index=2)
    with pytest.raises(DataError, match="root folder not found"):
        build_dataset("decathlon", "train", root=str(tmp_path / "nowhere"))


def test_data_loader_flattens_crops_of_cached_volumes(folder):
    cfg = {"crop": {"type": "pos_neg", "spatial_size": [10, 10, 10], "pos": 1, "neg": 1, "num_samples": 3}}
    ds = build_dataset("decathlon", "train", transform=VolumeTransform(cfg, train=True), root=str(folder),
                       val_ratio=0.34)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (6, 1, 10, 10, 10) and batch["mask"].shape == (6, 10, 10, 10)
    assert [m["id"] for m in batch["meta"]][::3] == _ids(ds)[:2]


# -- end to end -----------------------------------------------------------------------------------------------


class Tiny3d(torch.nn.Module):
    """A stand-in 3D segmentation model (the registered 3D backbones are tested elsewhere)."""

    def __init__(self, in_chans, num_classes):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv3d(in_chans, 16, 3, padding=1),
                                       torch.nn.InstanceNorm3d(16, affine=True), torch.nn.ReLU(),
                                       torch.nn.Conv3d(16, num_classes, 1))

    def forward(self, x):
        return self.net(x)


def _train_config(work_dir, root, **trainer):
    from attnseg.config import validate_config

    return validate_config({
        "work_dir": str(work_dir),
        "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr"}, "num_classes": 3, "in_chans": 1,
                  "spatial_dims": 3},
        "data": {"dataset": {"name": "decathlon", "root": str(root), "val_ratio": 0.34},
                 "batch_size": 2, "val_batch_size": 1,
                 "volume": {"orientation": "RAS", "spacing": {"pixdim": [2.0, 1.5, 1.5]},
                            "intensity": {"type": "scale_range", "a_min": -175, "a_max": 250, "clip": True},
                            "crop_foreground": {"source_key": "image"},
                            "crop": {"type": "pos_neg", "spatial_size": [16, 16, 16], "num_samples": 2},
                            "flip_prob": [0.2, 0.2, 0.2], "rotate90": {"prob": 0.2},
                            "scale_intensity": {"factors": 0.1, "prob": 0.1},
                            "shift_intensity": {"offsets": 0.1, "prob": 0.1}}},
        "evaluation": {"sliding_window": True, "overlap": 0.5, "blend_mode": "gaussian", "hd95": True},
        "optimizer": {"lr": 0.05, "weight_decay": 0.0},
        "scheduler": {"name": "constant"},
        "trainer": {"max_epochs": 4, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu", "devices": 1,
                    "log_every_n_steps": 1, **trainer},
    })


def _losses(work_dir):
    with open(work_dir / "logs" / "metrics.csv") as f:
        return [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]


@pytest.fixture
def tiny_model(monkeypatch):
    import attnseg.models.builder as builder

    monkeypatch.setattr(builder, "build_model", lambda cfg: Tiny3d(cfg.model.in_chans, cfg.model.num_classes))


@pytest.mark.slow
def test_training_on_a_decathlon_folder_with_sliding_window_validation(tmp_path, tiny_model):
    from attnseg.engine.runner import build_dataset as runner_dataset
    from attnseg.engine.runner import evaluate, train

    # cases of different sizes: validation volumes reach the sliding window at their own (odd) sizes
    shapes = [(24, 28, 20), (22, 30, 18), (26, 26, 21), (20, 28, 23), (24, 25, 19), (23, 27, 22)]
    root = write_decathlon(tmp_path / "Task99", shapes=shapes)
    cfg = _train_config(tmp_path / "run", root, max_epochs=12)
    val = runner_dataset(cfg, "val")
    sizes = {tuple(val[i]["image"].shape) for i in range(len(val))}
    assert len(sizes) == len(val) == 2
    result = train(cfg)
    assert result["global_step"] == 12 * 2  # 4 training volumes, batch 2 (x 2 crops each), 12 epochs
    m = result["metrics"]
    assert {"val/mDice", "val/loss", "val/Dice_liver", "val/Dice_tumour"} <= set(m)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 12 and losses[-1] < 0.4 * losses[0]  # measured 1.91 -> 0.21
    assert m["val/mDice"] > 0.5  # measured 0.77: liver and tumour are found in whole validation volumes
    res = evaluate(cfg, result["last_checkpoint"])
    assert res["class_names"] == ["background", "liver", "tumour"] and "mHD95" in res
    # one row per validation volume, named by its case id; the checkpoint records the stored label values
    assert sorted(r["case"] for r in res["cases"]) == sorted(c.id for c in val.cases)
    saved = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)["attnseg_classes"]
    assert saved == {"class_names": ["background", "liver", "tumour"], "label_values": [0, 1, 2]}


@pytest.mark.slow
def test_resumed_training_draws_the_same_crops(tmp_path, tiny_model):
    import lightning.pytorch as pl

    from attnseg.engine.runner import train

    class StopAfter(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch + 1 >= 2:
                trainer.should_stop = True

    root = write_decathlon(tmp_path / "Task99")
    straight = train(_train_config(tmp_path / "straight", root, max_epochs=4))
    first = train(_train_config(tmp_path / "resumed", root, max_epochs=4), callbacks=[StopAfter()])
    # last.ckpt is the last epoch even when the monitored val/mDice did not improve in it
    assert torch.load(first["last_checkpoint"], weights_only=True)["global_step"] == first["global_step"] == 4
    resumed = train(_train_config(tmp_path / "resumed", root, max_epochs=4), resume=True)
    a = torch.load(straight["last_checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(resumed["last_checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    other = train(_train_config(tmp_path / "other", root, max_epochs=4), resume=False)
    c = torch.load(other["last_checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], c[k]) for k in a)  # seeded: two runs are identical


def test_base_config_builds_every_split(folder):
    from pathlib import Path

    from attnseg.config import apply_overrides, deep_merge, load_yaml_with_bases, validate_config
    from attnseg.engine.runner import build_dataset as runner_dataset

    base = Path(__file__).resolve().parents[2] / "configs" / "_base_" / "datasets" / "decathlon.yaml"
    data = deep_merge(load_yaml_with_bases(base), {"model": {"backbone": {"name": "test_mambaout"},
                                                             "head": {"name": "unetr"}, "num_classes": 3}})
    cfg = validate_config(apply_overrides(data, [f"data.dataset.root={folder}", "data.dataset.cache_num_workers=1",
                                                 "data.volume.crop.spatial_size=[16,16,16]"]))
    assert cfg.evaluation.roi_size == [96, 96, 96] and cfg.data.volume.spacing.pixdim == (1.5, 1.5, 2.0)
    crops = runner_dataset(cfg, "train")[0]
    assert len(crops) == 4 and all(c["image"].shape == (1, 16, 16, 16) for c in crops)
    val = runner_dataset(cfg, "val")
    s = val[0]
    assert s["image"].min() >= 0 and s["image"].max() <= 1 and s["meta"]["spacing"] == pytest.approx((1.5, 1.5, 2))
    assert _ids(runner_dataset(cfg, "test")) == _ids(val) and len(val) == 1  # val_ratio 0.2 of 6 cases
