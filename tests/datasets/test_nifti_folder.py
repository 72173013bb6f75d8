"""The nifti_folder dataset on small NIfTI folders written here: case matching by name (plain, nnU-Net suffixes,
several modalities), the class map, the seeded splits shared with decathlon, a split file, every error naming
the case, and the persistent case cache (reused, invalidated by a touched file or another preprocessing)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from attnseg.datasets import build_dataset
from attnseg.datasets.volume_transforms import VolumeTransform
from attnseg.errors import ConfigError, DataError

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (12, 10, 8)


def _pair(rng, shape=SHAPE):
    """(image float32, label uint8 with classes 0 and 1): a bright box on noise."""
    image = rng.normal(0, 1, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    lo = rng.integers(1, 3, 3)
    label[lo[0]:lo[0] + 5, lo[1]:lo[1] + 4, lo[2]:lo[2] + 3] = 1
    image[label == 1] += 5
    return image, label


def write_folder(root, n=5, suffixes=("",), images_dir="images", labels_dir="labels", seed=0, affine=AFFINE):
    """``n`` cases ``case_<i>`` under ``root``; one image file per suffix (channel c = image + 10 c)."""
    rng = np.random.default_rng(seed)
    (root / images_dir).mkdir(parents=True, exist_ok=True)
    (root / labels_dir).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label = _pair(rng)
        for c, s in enumerate(suffixes):
            nib.save(nib.Nifti1Image(image + 10 * c, affine), root / images_dir / f"case_{i}{s}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / labels_dir / f"case_{i}.nii.gz")
    return root


def _ids(ds):
    return [c.id for c in ds.cases]


def test_pairs_matched_by_name_with_class_map_and_seeded_splits(tmp_path):
    root = write_folder(tmp_path / "d")
    ds = build_dataset("nifti_folder", "train", root=str(root), classes={0: "background", 1: "box"},
                       val_ratio=0.4, cache_rate=0.0)
    assert (ds.class_names, ds.num_classes, ds.in_chans, ds.spatial_dims) == (["background", "box"], 2, 1, 3)
    s = ds[0]
    raw = nib.load(root / "images" / f"{s['meta']['id']}.nii.gz").get_fdata()
    assert s["image"].shape == (1, *SHAPE) and np.allclose(s["image"][0].numpy(), raw)
    assert s["mask"].dtype == torch.int64 and set(s["mask"].unique().tolist()) == {0, 1}
    parts = {sp: _ids(build_dataset("nifti_folder", sp, root=str(root), num_classes=2, val_ratio=0.4,
                                    cache_rate=0.0)) for sp in ("train", "val", "test")}
    assert len(parts["train"]) == 3 and len(parts["val"]) == 2 and parts["test"] == parts["val"]
    assert sorted(parts["train"] + parts["val"]) == [f"case_{i}" for i in range(5)]
    # the same seeded shuffle as decathlon over the sorted cases, and folds partition them
    folds = [_ids(build_dataset("nifti_folder", "val", root=str(root), num_classes=2, fold=f, num_folds=5,
                                cache_rate=0.0)) for f in range(5)]
    assert sorted(sum(folds, [])) == [f"case_{i}" for i in range(5)] and all(len(f) == 1 for f in folds)


def test_nnunet_suffixes_and_several_modalities_stack_as_channels(tmp_path):
    root = write_folder(tmp_path / "d", n=3, suffixes=("_0000", "_0001"), images_dir="imagesTr",
                        labels_dir="labelsTr")
    ds = build_dataset("nifti_folder", "train", root=str(root), images_dir="imagesTr", labels_dir="labelsTr",
                       image_suffix=["_0000", "_0001"], classes=["background", "box"], val_ratio=0.0,
                       modalities=["T1", "T2"], cache_rate=0.0)
    assert _ids(ds) == ["case_0", "case_1", "case_2"] and ds.in_chans == 2 and ds.modalities == ["T1", "T2"]
    s = ds[0]
    assert s["image"].shape == (2, *SHAPE)
    assert torch.allclose(s["image"][1] - s["image"][0], torch.full(SHAPE, 10.0), atol=1e-4)
    # every image file must carry one of the suffixes: selecting one modality of several is refused, not guessed
    with pytest.raises(DataError, match="image .*case_0_0001.nii.gz does not end with the image suffix '_0000'"):
        build_dataset("nifti_folder", "train", root=str(root), images_dir="imagesTr", labels_dir="labelsTr",
                      image_suffix="_0000", num_classes=2, val_ratio=0.0, cache_rate=0.0)
    # one suffix: the channel count is read from the files
    one = write_folder(tmp_path / "one", n=2, suffixes=("_0000",))
    ds1 = build_dataset("nifti_folder", "train", root=str(one), image_suffix="_0000", num_classes=2, val_ratio=0.0,
                        cache_rate=0.0)
    assert ds1.in_chans == 1 and ds1.modalities == ["channel0"] and _ids(ds1) == ["case_0", "case_1"]


def test_label_values_and_split_file(tmp_path):
    root = write_folder(tmp_path / "d", n=4)
    for i in range(4):  # stored values 0 and 4 -> classes 0 and 1
        p = root / "labels" / f"case_{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(nib.load(p).dataobj) * 4, AFFINE), p)
    (root / "split.json").write_text(json.dumps({"train": ["case_0", "case_2"], "val": ["case_3"]}))
    kw = {"root": str(root), "classes": {"0": "background", "4": "box"}, "split_file": "split.json", "cache_rate": 1.0}
    train = build_dataset("nifti_folder", "train", **kw)
    assert _ids(train) == ["case_0", "case_2"] and train.label_values == [0, 4]
    assert set(train[0]["mask"].unique().tolist()) == {0, 1}
    assert _ids(build_dataset("nifti_folder", "test", **kw)) == ["case_3"]  # no test list: the val cases
    (root / "bad.json").write_text(json.dumps({"train": ["case_0"], "val": ["case_9"]}))
    with pytest.raises(DataError, match="'val' lists 1 stems without an image, e.g. \\['case_9'\\]"):
        build_dataset("nifti_folder", "val", **{**kw, "split_file": "bad.json"})


def _save(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), path)


@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "labels" / "case_2.nii.gz").unlink(),
     r"1 of 5 images in .*images have no label in .*labels: cases \['case_2'\]"),
    (lambda r: (r / "images" / "case_3.nii.gz").unlink(),
     r"1 labels in .*labels have no image in .*images: \['case_3.nii.gz'\]"),
    (lambda r: (r / "labels" / "case_1.nii.gz").write_bytes(b"junk"),
     r"case 'case_1': cannot read label .*labels/case_1.nii.gz"),
    (lambda r: _save(r / "labels" / "case_1.nii.gz", np.zeros((12, 10, 7), np.uint8)),
     r"case 'case_1': label .*case_1.nii.gz has shape \[12, 10, 7\] but its image"),
    (lambda r: _save(r / "labels" / "case_1.nii.gz", np.zeros(SHAPE, np.uint8), np.eye(4)),
     r"case 'case_1': label .*case_1.nii.gz and its image case_1.nii.gz have different affines"),
    (lambda r: _save(r / "labels" / "case_1.nii.gz", np.full(SHAPE, 3, np.uint8)),
     r"case 'case_1': label .*case_1.nii.gz holds values \[3\] outside the class map"),
    (lambda r: _save(r / "images" / "case_1.nii", np.zeros(SHAPE, np.float32)),
     r"case 'case_1' has two image files"),
])
def test_bad_folders_are_data_errors_naming_the_case(tmp_path, damage, message):
    root = write_folder(tmp_path / "d")
    damage(root)
    with pytest.raises(DataError, match=message):
        build_dataset("nifti_folder", "train", root=str(root), num_classes=2, val_ratio=0.0, cache_rate=1.0)


def test_config_errors_and_empty_splits(tmp_path):
    root = write_folder(tmp_path / "d", n=2)
    with pytest.raises(DataError, match="the 'val' split of .* is empty \\(2 'labelled' cases with val_ratio=0.0"):
        build_dataset("nifti_folder", "val", root=str(root), num_classes=2, val_ratio=0.0)
    with pytest.raises(DataError, match="the 'predict' split .* is empty \\(no predict_dir is set\\)"):
        build_dataset("nifti_folder", "predict", root=str(root), num_classes=2)
    with pytest.raises(ConfigError, match="give classes .* or num_classes"):
        build_dataset("nifti_folder", "train", root=str(root))
    with pytest.raises(ConfigError, match="num_classes is 3 but classes lists 2 classes"):
        build_dataset("nifti_folder", "train", root=str(root), classes=["a", "b"], num_classes=3)
    with pytest.raises(DataError, match="image .*case_0.nii.gz does not end with the image suffix '_0000'"):
        build_dataset("nifti_folder", "train", root=str(root), num_classes=2, image_suffix="_0000")
    with pytest.raises(DataError, match="case 'case_0' in .* lacks the modality file\\(s\\) \\['case_0_0001.nii.gz'\\]"):
        write_folder(tmp_path / "m", n=1, suffixes=("_0000", "_0001"))
        (tmp_path / "m" / "images" / "case_0_0001.nii.gz").unlink()
        build_dataset("nifti_folder", "train", root=str(tmp_path / "m"), num_classes=2,
                      image_suffix=["_0000", "_0001"])
    with pytest.raises(DataError, match="labels folder \\(labels_dir='masks'\\) not found"):
        build_dataset("nifti_folder", "train", root=str(root), num_classes=2, labels_dir="masks")
    # unlabelled images of predict_dir are the predict split, without masks
    (root / "imagesTs").mkdir()
    _save(root / "imagesTs" / "new_0.nii.gz", np.zeros(SHAPE, np.float32))
    predict = build_dataset("nifti_folder", "predict", root=str(root), num_classes=2, predict_dir="imagesTs")
    assert _ids(predict) == ["new_0"] and "mask" not in predict[0]


# -- persistent cache ---------------------------------------------------------------------------------------


PREP = {"orientation": "RAS", "intensity": {"type": "normalize", "nonzero": False}}


def _cached(root, cache_dir, prep=PREP, split="train"):
    return build_dataset("nifti_folder", split, transform=VolumeTransform(prep, train=False), root=str(root),
                         num_classes=2, val_ratio=0.4, cache_rate=1.0, cache_dir=str(cache_dir))


def _fail_reads(monkeypatch):
    from attnseg.datasets import nifti

    def refuse(*a, **k):
        raise DataError("a NIfTI file was read although the case is cached")

    monkeypatch.setattr(nifti, "_image_voxels", refuse)


def test_second_build_reads_the_cache_and_touching_a_file_or_changing_preprocessing_invalidates(
        tmp_path, monkeypatch):
    root = write_folder(tmp_path / "d")
    cache = tmp_path / "cache"
    first = _cached(root, cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 3 and all(e.startswith("case_") and e.endswith(".pt") for e in entries)
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())  # written atomically, nothing left over
    with monkeypatch.context() as m:
        _fail_reads(m)
        second = _cached(root, cache)  # every case comes from disk
        for i in range(len(first)):
            a, b = first[i], second[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
            assert np.allclose(a["meta"]["affine"], b["meta"]["affine"]) and isinstance(b["meta"]["affine"],
                                                                                          np.ndarray)
            assert b["meta"]["orig_size"] == SHAPE and b["meta"]["spacing"] == (2.0, 2.0, 2.0)
        # another preprocessing is another key: the reader is needed again
        with pytest.raises(DataError, match="a NIfTI file was read although the case is cached"):
            _cached(root, cache, {**PREP, "intensity": {"type": "normalize", "nonzero": True}})
        # touching one case's label invalidates that case only
        label = root / "labels" / f"{first.cases[0].id}.nii.gz"
        st = label.stat()
        os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(DataError, match=f"case '{first.cases[0].id}'.*a NIfTI file was read"):
            _cached(root, cache)
    third = _cached(root, cache)
    assert len(list(cache.iterdir())) == 3 + 1  # the first three, and the touched case once more
    assert torch.equal(third[0]["image"], first[0]["image"])


def test_a_damaged_cache_entry_is_rebuilt(tmp_path):
    root = write_folder(tmp_path / "d", n=3)
    cache = tmp_path / "cache"
    first = _cached(root, cache)
    entry = next(iter(sorted(cache.iterdir())))
    entry.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="case cache entry .* is unreadable"):
        again = _cached(root, cache)
    assert all(torch.equal(first[i]["image"], again[i]["image"]) for i in range(len(first)))
    assert torch.load(entry, weights_only=True)["format"] == 1  # rewritten


def test_decathlon_takes_cache_dir_too(tmp_path, monkeypatch):
    from attnseg.datasets.volume_transforms import VolumeTransform as VT

    root = write_folder(tmp_path / "d", n=3)
    training = [{"image": f"images/case_{i}.nii.gz", "label": f"labels/case_{i}.nii.gz"} for i in range(3)]
    (root / "dataset.json").write_text(json.dumps({"training": training, "labels": {"0": "bg", "1": "box"},
                                                   "modality": {"0": "MR"}}))
    kw = {"root": str(root), "val_ratio": 0.0, "cache_dir": str(tmp_path / "c")}
    first = build_dataset("decathlon", "train", transform=VT(PREP, train=False), **kw)
    _fail_reads(monkeypatch)
    second = build_dataset("decathlon", "train", transform=VT(PREP, train=False), **kw)
    assert torch.equal(first[1]["image"], second[1]["image"])


def test_train_repeats_lists_training_cases_several_times_per_epoch(tmp_path):
    root = write_folder(tmp_path / "d", n=3)
    kw = {"root": str(root), "num_classes": 2, "val_ratio": 0.34, "cache_rate": 1.0, "train_repeats": 4}
    train = build_dataset("nifti_folder", "train", **kw)
    val = build_dataset("nifti_folder", "val", **kw)
    assert len(train.cases) == 2 and len(train) == 8 and len(val) == 1  # val is never repeated
    assert [train[i]["meta"]["id"] for i in range(8)] == [c.id for c in train.cases] * 4
    with pytest.raises(IndexError):
        train[8]
    with pytest.raises(ConfigError, match="train_repeats must be >= 1"):
        build_dataset("nifti_folder", "train", **{**kw, "train_repeats": 0})
