import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.datasets import build_dataset
from attnseg.datasets.io import convert_channels, read_image, read_mask
from attnseg.datasets.transforms import AugmentConfig, build_transform
from attnseg.errors import DataError


def test_synthetic2d_is_deterministic_and_splits_differ():
    a = build_dataset("synthetic2d", "train", image_size=[48, 40], num_train=3)
    b = build_dataset("synthetic2d", "train", image_size=[48, 40], num_train=3)
    v = build_dataset("synthetic2d", "val", image_size=[48, 40], num_val=3)
    assert torch.equal(a[1]["image"], b[1]["image"]) and torch.equal(a[1]["mask"], b[1]["mask"])
    assert not torch.equal(a[0]["image"], v[0]["image"])
    s = a[0]
    assert s["image"].shape == (3, 48, 40) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (48, 40) and s["mask"].dtype == torch.int64
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    with pytest.raises(IndexError):
        a[3]


def test_synthetic_covers_every_class_and_is_not_separable_by_intensity():
    ds = build_dataset("synthetic2d", "train", num_classes=4, image_size=[64, 64], num_train=24)
    pix, lab = [], []
    for i in range(len(ds)):
        s = ds[i]
        pix.append(s["image"].mean(0).flatten())
        lab.append(s["mask"].flatten())
    pix, lab = torch.cat(pix), torch.cat(lab)
    assert set(lab.unique().tolist()) == {0, 1, 2, 3}
    # Best accuracy of any intensity interval rule for each foreground class vs the rest of the foreground:
    fg = lab > 0
    for k in (1, 2, 3):
        x, y = pix[fg], (lab[fg] == k)
        qs = torch.quantile(x, torch.linspace(0, 1, 21))
        best = max(((x >= lo) & (x <= hi) == y).float().mean().item() for lo in qs for hi in qs if hi > lo)
        assert best < 0.8, (k, best)


def test_synthetic3d_shapes():
    ds = build_dataset("synthetic3d", "val", image_size=[24, 20, 16], num_val=2)
    s = ds[0]
    assert s["image"].shape == (1, 24, 20, 16) and s["mask"].shape == (24, 20, 16)
    assert s["mask"].max() > 0


def test_transforms_move_image_and_mask_together():
    image = torch.zeros(1, 16, 16)
    image[0, 2, 3] = 1.0
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[2, 3] = 2
    t = build_transform(AugmentConfig(hflip=1.0, vflip=1.0), None, train=True)
    out = t({"image": image, "mask": mask})
    assert out["image"][0, 13, 12] == 1.0 and out["mask"][13, 12] == 2 and out["mask"].dtype == torch.int64
    for dims, shape in ((2, (1, 10, 12)), (3, (1, 6, 10, 12))):
        crop = [16] * dims
        t = build_transform(AugmentConfig(crop_size=crop, rotate90=1.0), None, train=True, spatial_dims=dims)
        img = torch.rand(shape)
        out = t({"image": img, "mask": (img[0] > 0.5).long()})
        assert out["image"].shape == (1, *crop) and out["mask"].shape == tuple(crop)
        assert torch.equal(out["mask"].bool(), out["image"][0] > 0.5)  # aligned after pad/crop/rotation
    t = build_transform(AugmentConfig(hflip=1.0), {"mean": [0.5], "std": [0.25]}, train=False)
    out = t({"image": torch.full((1, 4, 4), 0.75), "mask": torch.zeros(4, 4, dtype=torch.long)})
    assert torch.allclose(out["image"], torch.ones(1, 4, 4))  # eval: normalise only, no flip


def test_albumentations_backend():
    pytest.importorskip("albumentations")
    t = build_transform({"backend": "albumentations", "albumentations": [{"type": "HorizontalFlip", "p": 1.0}]},
                        None, train=True)
    img = torch.rand(3, 8, 8)
    out = t({"image": img, "mask": torch.arange(64).reshape(8, 8)})
    assert torch.allclose(out["image"], img.flip(-1)) and torch.equal(out["mask"], torch.arange(64).reshape(8, 8).flip(-1))


def _write_pair(root, stem, image, mask, img_ext=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    if img_ext in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(root / "images" / f"{stem}{img_ext}", image)
    else:
        Image.fromarray(image).save(root / "images" / f"{stem}{img_ext}")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_folder2d_formats_channels_and_mask_values(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:10] = 255
    _write_pair(tmp_path, "rgb", np.full((20, 30, 3), 128, np.uint8), mask)
    _write_pair(tmp_path, "grey", np.full((20, 30), 64, np.uint8), mask, ".bmp")
    _write_pair(tmp_path, "deep", np.full((20, 30), 65535, np.uint16), mask, ".tif")
    _write_pair(tmp_path, "photo", np.full((20, 30, 3), 200, np.uint8), mask, ".jpg")
    ds = build_dataset("folder2d", "train", root=str(tmp_path), mask_values=[0, 255], val_ratio=0.0)
    assert len(ds) == 4 and ds.num_classes == 2
    by_id = {ds[i]["meta"]["id"]: ds[i] for i in range(len(ds))}
    assert by_id["deep"]["image"].shape == (3, 20, 30) and torch.allclose(by_id["deep"]["image"], torch.ones(1))
    assert by_id["grey"]["image"][:, 0, 0].tolist() == pytest.approx([64 / 255] * 3)
    assert set(by_id["rgb"]["mask"].unique().tolist()) == {0, 1}
    ds.check()


def test_folder2d_split_file_and_ratio_split(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    for i in range(10):
        _write_pair(tmp_path, f"c{i}", np.zeros((8, 8, 3), np.uint8), mask)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "val": ["c3"], "test": []}))
    ds = build_dataset("folder2d", "val", root=str(tmp_path), num_classes=2, split_file="split.json")
    assert [p[0].stem for p in ds.pairs] == ["c3"]
    tr = build_dataset("folder2d", "train", root=str(tmp_path), num_classes=2, val_ratio=0.3)
    va = build_dataset("folder2d", "val", root=str(tmp_path), num_classes=2, val_ratio=0.3)
    assert len(tr) == 7 and len(va) == 3 and not {p[0] for p in tr.pairs} & {p[0] for p in va.pairs}
    with pytest.raises(DataError, match="the 'test' split of .* is empty"):
        build_dataset("folder2d", "test", root=str(tmp_path), num_classes=2, split_file="split.json")


def test_folder2d_errors_name_the_file(tmp_path):
    _write_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8))
    ds = build_dataset("folder2d", "train", root=str(tmp_path), num_classes=2, val_ratio=0.0)
    with pytest.raises(DataError, match=r"image .*a.png is 8x8 but its mask .*a.png is 8x9"):
        ds[0]
    _write_pair(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 9, np.uint8))
    with pytest.raises(DataError, match=r"mask .*a.png has values \[9\] outside the class map \(allowed: \[0, 1\]\)"):
        ds[0]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(DataError, match="image .*lonely.png has no mask"):
        build_dataset("folder2d", "train", root=str(tmp_path), num_classes=2)
    with pytest.raises(DataError, match="folder not found: .*nowhere"):
        build_dataset("folder2d", "train", root=str(tmp_path / "nowhere"), num_classes=2)
    (tmp_path / "e" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no images .* found in .*e/images"):
        build_dataset("folder2d", "train", root=str(tmp_path / "e"), num_classes=2)


def test_io_errors_and_channel_conversion(tmp_path):
    bad = tmp_path / "t.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError, match="cannot read image .*t.png"):
        read_image(bad)
    rgba = np.random.rand(4, 4, 4).astype(np.float32)
    assert convert_channels(rgba, 3).shape == (4, 4, 3)
    assert convert_channels(rgba[..., :3], 1).shape == (4, 4, 1)
    with pytest.raises(DataError, match="x.tif: image has 2 channels; the model expects 3"):
        convert_channels(np.zeros((4, 4, 2), np.float32), 3, "x.tif")
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[7] * 4] * 4


def test_imagefolder(tmp_path):
    for split in ("train", "val"):
        for c, v in (("cat", 10), ("dog", 200)):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.full((12, 10), v, np.uint8)).save(tmp_path / split / c / "x.png")
    ds = build_dataset("imagefolder", "val", root=str(tmp_path), image_size=[16, 16])
    assert ds.class_names == ["cat", "dog"] and len(ds) == 2
    s = ds[1]
    assert s["image"].shape == (3, 16, 16) and s["label"].item() == 1
    with pytest.raises(DataError, match="folder not found"):
        build_dataset("imagefolder", "test", root=str(tmp_path))
