import json

import numpy as np
import pytest
import tifffile
import torch

from attnseg.datasets import build_dataset
from attnseg.errors import ConfigError, DataError


def _binary_mask(h=20, w=30):
    mask = np.zeros((h, w), np.uint8)
    mask[5:10, 5:12] = 255
    return mask


def _folder(tmp_path, write_pair, n=10, size=(8, 8)):
    for i in range(n):
        write_pair(tmp_path, f"c{i}", np.full((*size, 3), i, np.uint8), np.zeros(size, np.uint8))
    return tmp_path


def test_formats_channels_and_mask_values(tmp_path, write_pair):
    mask = _binary_mask()
    write_pair(tmp_path, "rgb", np.full((20, 30, 3), 128, np.uint8), mask)
    write_pair(tmp_path, "grey", np.full((20, 30), 64, np.uint8), mask, ".bmp", mask_ext=".bmp")
    write_pair(tmp_path, "deep", np.full((20, 30), 65535, np.uint16), mask, ".tif", ".tif")
    write_pair(tmp_path, "photo", np.full((20, 30, 3), 200, np.uint8), mask, ".JPG")
    ds = build_dataset("folder2d", "train", root=str(tmp_path), mask_values=[0, 255], val_ratio=0.0)
    assert (len(ds), ds.num_classes, ds.in_chans, ds.spatial_dims, ds.task) == (4, 2, 3, 2, "segmentation")
    assert ds.class_names == ["class0", "class1"] and ds.ignore_index is None
    by_id = {ds[i]["meta"]["id"]: ds[i] for i in range(len(ds))}
    assert sorted(by_id) == ["deep", "grey", "photo", "rgb"]
    assert by_id["deep"]["image"].shape == (3, 20, 30) and torch.allclose(by_id["deep"]["image"], torch.ones(1))
    assert by_id["grey"]["image"][:, 0, 0].tolist() == pytest.approx([64 / 255] * 3)
    assert by_id["photo"]["image"].mean().item() == pytest.approx(200 / 255, abs=0.02)
    for s in by_id.values():
        assert s["image"].dtype == torch.float32 and s["mask"].dtype == torch.int64
        assert s["mask"].sum().item() == 35 and set(s["mask"].unique().tolist()) == {0, 1}
    assert by_id["rgb"]["meta"]["orig_size"] == (20, 30) and by_id["rgb"]["meta"]["path"].endswith("rgb.png")
    ds.check()
    grey = build_dataset("folder2d", "train", root=str(tmp_path), mask_values=[0, 255], val_ratio=0.0, in_chans=1,
                         classes=["bg", "lesion"])
    assert grey[0]["image"].shape == (1, 20, 30) and grey.class_names == ["bg", "lesion"]


def test_ignore_index_and_mask_suffix(tmp_path, write_pair):
    mask = np.array([[0, 128, 255], [128, 0, 0]], np.uint8)
    write_pair(tmp_path, "a", np.zeros((2, 3, 3), np.uint8), mask, mask_suffix="_segmentation")
    ds = build_dataset("folder2d", "train", root=str(tmp_path), mask_values=[0, 128], ignore_index=255,
                       val_ratio=0.0, mask_suffix="_segmentation")
    assert ds[0]["mask"].tolist() == [[0, 1, 255], [1, 0, 0]] and ds.ignore_index == 255
    with pytest.raises(ConfigError, match="ignore_index 1 is a class index"):
        build_dataset("folder2d", "train", root=str(tmp_path), num_classes=2, ignore_index=1)


def test_ratio_split_is_seeded_disjoint_and_complete(tmp_path, write_pair):
    root = str(_folder(tmp_path, write_pair))
    parts = {s: build_dataset("folder2d", s, root=root, num_classes=2, val_ratio=0.3, test_ratio=0.2)
             for s in ("train", "val", "test")}
    stems = {s: [p[0].stem for p in d.pairs] for s, d in parts.items()}
    assert [len(v) for v in stems.values()] == [5, 3, 2]
    assert sorted(sum(stems.values(), [])) == sorted(f"c{i}" for i in range(10))
    again = build_dataset("folder2d", "val", root=root, num_classes=2, val_ratio=0.3, test_ratio=0.2)
    assert [p[0].stem for p in again.pairs] == stems["val"]
    other = build_dataset("folder2d", "val", root=root, num_classes=2, val_ratio=0.3, test_ratio=0.2, seed=5)
    assert [p[0].stem for p in other.pairs] != stems["val"]
    # a small ratio still gives one image while train keeps the rest
    assert len(build_dataset("folder2d", "val", root=root, num_classes=2, val_ratio=0.01)) == 1


def test_split_files(tmp_path, write_pair):
    root = _folder(tmp_path, write_pair, n=6)
    (root / "split.json").write_text(json.dumps({"train": ["c1", "c2.png"], "val": ["c3"]}))
    ds = build_dataset("folder2d", "train", root=str(root), num_classes=2, split_file="split.json")
    assert [p[0].stem for p in ds.pairs] == ["c1", "c2"]
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("# training cases\nc4\n\nc0\n")
    (root / "splits" / "val.txt").write_text("c5\n")
    ds = build_dataset("folder2d", "train", root=str(root), num_classes=2, split_file="splits/{split}.txt")
    assert [p[0].stem for p in ds.pairs] == ["c4", "c0"]
    assert len(build_dataset("folder2d", "val", root=str(root), num_classes=2, split_file="splits/{split}.txt")) == 1
    with pytest.raises(DataError, match=r"split file not found: splits/test\.txt"):
        build_dataset("folder2d", "test", root=str(root), num_classes=2, split_file="splits/{split}.txt")
    with pytest.raises(DataError, match=r"the 'test' split is empty: split file split\.json lists no stems for it "
                                        r"\(6 images in .*images\)"):
        build_dataset("folder2d", "test", root=str(root), num_classes=2, split_file="split.json")
    bad = {"bad1.json": ({"train": ["c1", "zz"]}, r"'train' lists 1 stems without an image, e.g. \['zz'\]"),
           "bad2.json": ({"train": ["c1"], "val": ["c1"]}, r"'train' and 'val' share 1 stems, e.g. \['c1'\]"),
           "bad3.json": ({"training": ["c1"]}, r"must be a JSON object .*got keys \['training'\]"),
           "bad4.json": ({"train": ["c1", "c1"]}, r"'train' lists some stems twice, e.g. \['c1'\]")}
    for name, (content, message) in bad.items():
        (root / name).write_text(json.dumps(content))
        with pytest.raises(DataError, match=rf"split file .*{name}.*{message}"):
            build_dataset("folder2d", "train", root=str(root), num_classes=2, split_file=name)
    (root / "broken.json").write_text("{train: [")
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON"):
        build_dataset("folder2d", "train", root=str(root), num_classes=2, split_file="broken.json")
    (root / "list.txt").write_text("c1\n")
    with pytest.raises(DataError, match=r"list\.txt: use a JSON file .* or a text path with a '\{split\}'"):
        build_dataset("folder2d", "train", root=str(root), num_classes=2, split_file="list.txt")


def test_eager_errors_name_folders_and_files(tmp_path, write_pair, save_image):
    with pytest.raises(DataError, match=r"folder2d: root folder not found: .*nowhere; .* holds no folders"):
        build_dataset("folder2d", "train", root=str(tmp_path / "nowhere"), num_classes=2)
    (tmp_path / "r" / "imgs").mkdir(parents=True)
    with pytest.raises(DataError, match=r"images folder \(images_dir='images'\) not found: .*r/images; .*\['imgs'\]"):
        build_dataset("folder2d", "train", root=str(tmp_path / "r"), num_classes=2)
    with pytest.raises(DataError, match=r"masks folder \(masks_dir='masks'\) not found"):
        build_dataset("folder2d", "train", root=str(tmp_path / "r"), images_dir="imgs", num_classes=2)
    (tmp_path / "r" / "masks").mkdir()
    (tmp_path / "r" / "imgs" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found in .*r/imgs \(looked for \.png, \.jpg, .*\.bmp, any case\); "
                                        r"it holds 1 other files, e.g. \['notes.txt'\]"):
        build_dataset("folder2d", "train", root=str(tmp_path / "r"), images_dir="imgs", num_classes=2)
    write_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    save_image(tmp_path / "images" / "lonely.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"1 of 2 images have no mask in .*masks: lonely\.png \(the mask of "):
        build_dataset("folder2d", "train", root=str(tmp_path), num_classes=2)
    save_image(tmp_path / "masks" / "lonely.png", np.zeros((8, 8), np.uint8))
    save_image(tmp_path / "images" / "a.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"two files in .*images have the stem 'a': a\.jpg and a\.png"):
        build_dataset("folder2d", "train", root=str(tmp_path), num_classes=2)
    (tmp_path / "images" / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"the 'val' split is empty: 0 of 2 images in .*images with val_ratio=0\.0, "
                                        r"test_ratio=0\.0"):
        build_dataset("folder2d", "val", root=str(tmp_path), num_classes=2, val_ratio=0.0)
    with pytest.raises(ConfigError, match=r"class counts disagree: \{'num_classes': 3, 'len\(mask_values\)': 2\}"):
        build_dataset("folder2d", "train", root=str(tmp_path), num_classes=3, mask_values=[0, 255])
    with pytest.raises(ConfigError, match="give num_classes, classes or mask_values"):
        build_dataset("folder2d", "train", root=str(tmp_path))
    with pytest.raises(ConfigError, match="val_ratio and test_ratio must be >= 0 and sum to < 1"):
        build_dataset("folder2d", "train", root=str(tmp_path), num_classes=2, val_ratio=0.6, test_ratio=0.5)


def test_item_errors_name_files_and_values(tmp_path, write_pair):
    write_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8))
    write_pair(tmp_path, "b", np.zeros((8, 8, 3), np.uint8), np.tile(np.array([0, 1, 7, 9], np.uint8), (8, 2)))
    write_pair(tmp_path, "c", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), ".tif")
    tifffile.imwrite(tmp_path / "images" / "c.tif", np.zeros((8, 8, 2), np.uint8), photometric="minisblack",
                     planarconfig="contig")  # two samples per pixel
    write_pair(tmp_path, "d", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    (tmp_path / "images" / "d.png").write_bytes((tmp_path / "images" / "d.png").read_bytes()[:40])  # truncate
    write_pair(tmp_path, "e", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    ds = build_dataset("folder2d", "train", root=str(tmp_path), num_classes=2, val_ratio=0.0)  # pairing is fine
    with pytest.raises(DataError, match=r"image .*images/a\.png is 8x8 but its mask .*masks/a\.png is 8x9 \(H x W\)"):
        ds[0]
    with pytest.raises(DataError, match=r"mask .*b\.png has values \[7, 9\] outside the class map "
                                        r"\(allowed: \[0, 1\]\)"):
        ds[1]
    with pytest.raises(DataError, match=r"c\.tif: image has 2 channels but in_chans=3 is expected"):
        ds[2]
    with pytest.raises(DataError, match=r"cannot read image .*d\.png"):
        ds[3]
    assert ds[4]["mask"].shape == (8, 8)
    with pytest.raises(DataError) as info:
        ds.check()
    text = str(info.value)
    assert text.startswith("folder2d (") and "split 'train'): 4 of 5 items cannot be used" in text
    for name in ("a.png", "b.png", "c.tif", "d.png"):
        assert name in text
    with pytest.raises(DataError, match=r"1 more"):
        ds.check(max_errors=3)
    # a binary 0/255 mask read with num_classes=2 suggests mask_values
    write_pair(tmp_path / "bin", "x", np.zeros((20, 30, 3), np.uint8), _binary_mask())
    with pytest.raises(DataError, match=r"values \[255\] .*set mask_values: \[0, 255\]"):
        build_dataset("folder2d", "train", root=str(tmp_path / "bin"), num_classes=2, val_ratio=0.0)[0]


def _class_folders(save_image, root, splits=("train", "val"), classes=(("cat", 10), ("dog", 200)), n=1,
                   size=(12, 10)):
    for split in splits:
        for c, v in classes:
            for i in range(n):
                save_image(root / split / c / f"x{i}.png", np.full(size, v, np.uint8))


def test_imagefolder_split_dirs(tmp_path, save_image):
    _class_folders(save_image, tmp_path, classes=(("cat", 10), ("dog", 200)))
    save_image(tmp_path / "train" / "emu" / "e.png", np.zeros((12, 10), np.uint8))  # only in train
    ds = build_dataset("imagefolder", "val", root=str(tmp_path), image_size=[16, 16])
    assert ds.class_names == ["cat", "dog", "emu"] and len(ds) == 2  # same class indices as train
    assert (ds.task, ds.num_classes, ds.in_chans, ds.spatial_dims, ds.ignore_index) == ("classification", 3, 3, 2,
                                                                                        None)
    s = ds[1]
    assert s["image"].shape == (3, 16, 16) and s["label"].item() == 1 and s["label"].dtype == torch.int64
    assert s["image"].mean().item() == pytest.approx(200 / 255, abs=1e-3)
    assert s["meta"]["id"] == "dog/x0" and s["meta"]["orig_size"] == (12, 10)
    native = build_dataset("imagefolder", "train", root=str(tmp_path), image_size=None, in_chans=1)
    assert native[0]["image"].shape == (1, 12, 10) and len(native) == 3
    ds.check()
    with pytest.raises(DataError, match=r"'test' folder \(split_dirs=True reads .*\) not found: .*test; .* holds the "
                                        r"folders \['train', 'val'\]"):
        build_dataset("imagefolder", "test", root=str(tmp_path))
    with pytest.raises(DataError, match=r"class folders \['emu'\] under .* are not in classes \['cat', 'dog'\]"):
        build_dataset("imagefolder", "val", root=str(tmp_path), classes=["cat", "dog"])
    (tmp_path / "val" / "cat" / "x0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"imagefolder .*1 of 2 items cannot be used:\n  cannot read image .*cat/x0"):
        ds.check()


def test_imagefolder_ratio_split(tmp_path, save_image):
    for c, v in (("a", 0), ("b", 255)):
        for i in range(5):
            save_image(tmp_path / c / f"{i}.png", np.full((6, 6, 3), v, np.uint8))
    train = build_dataset("imagefolder", "train", root=str(tmp_path), split_dirs=False, val_ratio=0.4)
    val = build_dataset("imagefolder", "val", root=str(tmp_path), split_dirs=False, val_ratio=0.4)
    assert len(train) == 6 and len(val) == 4
    assert sorted(label for _, label in val.items) == [0, 0, 1, 1]  # stratified
    assert not {p for p, _ in train.items} & {p for p, _ in val.items}
    with pytest.raises(DataError, match=r"the 'test' split is empty: 0 of 10 images .* test_ratio=0\.0"):
        build_dataset("imagefolder", "test", root=str(tmp_path), split_dirs=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_dataset("imagefolder", "train", root=str(tmp_path / "empty"), split_dirs=False)
