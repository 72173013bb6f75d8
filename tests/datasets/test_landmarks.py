"""The ``landmarks`` dataset (images + contour landmark files) and the in-memory ``synthetic_landmarks``."""

import json

import numpy as np
import pytest
import torch

from attnseg.datasets import build_dataset
from attnseg.datasets.landmark_template import load_template
from attnseg.datasets.landmarks import LandmarkAugment, make_synthetic_landmarks, read_landmarks
from attnseg.datasets.rasterize import rasterize_landmarks
from attnseg.datasets.transforms import build_transform
from attnseg.errors import ConfigError, DataError
from tests.conftest import load_fixture


@pytest.fixture
def chest(tmp_path):
    return make_synthetic_landmarks(tmp_path / "chest", num_images=5, template="chest_xray", image_size=(96, 80))


def test_items_have_image_normalised_landmarks_and_their_rasterized_mask(chest):
    ds = build_dataset("landmarks", "train", root=str(chest), val_ratio=0.2, template="chest_xray:LH")
    assert len(ds) == 4 and ds.num_classes == 3 and ds.class_names == ["background", "lungs", "heart"]
    item = ds[0]
    assert item["image"].shape == (1, 96, 80) and item["image"].dtype == torch.float32
    lm = item["landmarks"]
    assert lm.shape == (120, 2) and lm.dtype == torch.float32 and 0 <= lm.min() and lm.max() <= 1
    expected = rasterize_landmarks(lm.double().numpy() * [80, 96], ds.template, (96, 80), np.int64)
    assert np.array_equal(item["mask"].numpy(), expected) and set(item["mask"].unique().tolist()) == {0, 1, 2}
    # the synthetic lungs are dark: the image agrees with its landmarks
    assert item["image"][0][item["mask"] == 1].mean() < item["image"][0][item["mask"] == 0].mean() - 0.2
    assert item["meta"]["id"].startswith("case_") and item["meta"]["orig_size"] == (96, 80)


@pytest.mark.parametrize("fmt", ["csv", "json", "npy"])
def test_the_three_file_formats_read_the_same_points(tmp_path, fmt):
    root = make_synthetic_landmarks(tmp_path / fmt, num_images=1, template="chest_xray", fmt=fmt, seed=3)
    ref = make_synthetic_landmarks(tmp_path / "ref", num_images=1, template="chest_xray", fmt="npy", seed=3)
    full, lh = load_template("chest_xray"), load_template("chest_xray:LH")
    a = read_landmarks(next((root / "landmarks").iterdir()), full)
    b = read_landmarks(ref / "landmarks" / "case_000.npy", full)
    assert a.shape == (166, 2) and np.allclose(a, b, atol=1e-3)
    assert np.allclose(read_landmarks(next((root / "landmarks").iterdir()), lh), b[:120], atol=1e-3)


def test_official_npy_layout_with_the_lh_template(tmp_path):
    fx = load_fixture("hybridgnet_rasterize.pt")
    (tmp_path / "images").mkdir()
    (tmp_path / "landmarks").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((1024, 1024), np.uint8)).save(tmp_path / "images" / "JPCLN010.png")
    np.save(tmp_path / "landmarks" / "JPCLN010.npy", fx["landmarks_px"].numpy())  # 166 x 2 float64 pixels
    (tmp_path / "split.json").write_text(json.dumps({"val": ["JPCLN010"]}))
    ds = build_dataset("landmarks", "val", root=str(tmp_path), template="chest_xray:LH", split_file="split.json",
                       image_size=[256, 256])
    item = ds[0]
    expected = np.clip(fx["landmarks_px"].numpy()[:120] / 1024, 0, 1)
    assert np.allclose(item["landmarks"].numpy(), expected, atol=1e-6)  # resize keeps normalised coordinates
    assert item["image"].shape == (1, 256, 256) and item["mask"].shape == (256, 256)


def test_per_file_errors_name_the_file(chest, tmp_path):
    lm = chest / "landmarks"
    (lm / "case_000.csv").write_text("x,y\n1,2\n3,4\n")
    (lm / "case_001.csv").write_text("x,y\n" + "500,10\n" * 166)
    (lm / "case_002.csv").write_text("x,y\n" + "oops,1\n" * 166)
    ds = build_dataset("landmarks", "train", root=str(chest), val_ratio=0.0, template="chest_xray:LH")
    with pytest.raises(DataError, match=r"case_000.csv: 2 points, but template chest_xray:LH needs 120 or 166"):
        ds.load(0)
    with pytest.raises(DataError, match=r"case_001.csv: 120 point\(s\) outside the 80x96 .*clip_outside"):
        ds.load(1)
    with pytest.raises(DataError, match=r"case_002.csv: cannot read landmarks"):
        ds.load(2)
    with pytest.raises(DataError, match=r"3 of 5 items cannot be used"):
        ds.check()
    clipped = build_dataset("landmarks", "train", root=str(chest), val_ratio=0.0, clip_outside=True)
    assert clipped[1]["landmarks"][:, 0].eq(1.0).all()
    (lm / "case_003.csv").unlink()
    with pytest.raises(DataError, match=r"1 of 5 images have no landmark file .*case_003.png"):
        build_dataset("landmarks", "train", root=str(chest))
    (lm / "case_004.json").write_text(json.dumps({"organs": {"right_lung": [[1, 1]] * 44}}))
    (lm / "case_004.csv").unlink()
    with pytest.raises(DataError, match=r"case_004.json: organs \['left_lung', 'heart'\] .* are missing"):
        read_landmarks(lm / "case_004.json", load_template("chest_xray:LH"))


def test_flips_are_refused_and_geometric_data_augment_too(chest):
    with pytest.raises(ConfigError, match=r"flips are not valid .*left/right.*hflip"):
        build_dataset("landmarks", "train", root=str(chest), augment={"hflip": 0.5})
    flips = build_transform({"hflip": 0.5}, None, train=True)
    with pytest.raises(ConfigError, match=r"data.augment: flips are not valid.*hflip"):
        build_dataset("landmarks", "train", transform=flips, root=str(chest))
    crops = build_transform({"crop_size": [64, 64]}, None, train=True)
    with pytest.raises(ConfigError, match="would move the image but not its landmarks"):
        build_dataset("synthetic_landmarks", "train", transform=crops)
    jitter = build_transform({"color_jitter": 0.1, "gaussian_noise": 0.01}, None, train=True)
    assert build_dataset("synthetic_landmarks", "train", transform=jitter)[0]["image"].shape == (1, 128, 128)
    with pytest.raises(ConfigError, match="unknown augment keys"):
        LandmarkAugment.from_config({"shear": 3})


def test_augmentation_moves_image_and_landmarks_together():
    torch.manual_seed(0)
    ds = build_dataset("synthetic_landmarks", "train", image_size=[96, 112], num_train=6,
                       augment={"scale": True, "scale_min": 0.8, "rotate_degrees": 30.0, "gamma": 0.0,
                                "noise_std": 0.0})
    for i in range(6):
        item = ds[i]
        assert item["image"].shape == (1, 96, 112) and item["mask"].shape == (96, 112)
        image = item["image"][0]
        # the dark lungs and the bright heart of the image are where the moved landmarks say they are (a rotation
        # or scale applied the wrong way round misplaces a large part at 30 degrees)
        assert (image[item["mask"] == 1] < 0.4).float().mean() > 0.9, i
        assert (image[item["mask"] == 2] > 0.6).float().mean() > 0.9, i
    plain = build_dataset("synthetic_landmarks", "val", image_size=[96, 112])
    assert torch.equal(plain[0]["image"], plain[0]["image"])  # no augmentation outside training, deterministic


def test_split_file_and_template_by_path(chest, tmp_path):
    (chest / "split.json").write_text(json.dumps({"train": ["case_000", "case_001"], "val": ["case_002"],
                                                  "test": ["case_003.png"]}))
    template = tmp_path / "lungs.yaml"
    template.write_text("name: lungs_only\norgans:\n  - {name: right_lung, num_points: 44, label: 1}\n"
                        "  - {name: left_lung, num_points: 50, label: 1}\n")
    with pytest.raises(DataError, match="166 points, but template lungs_only needs 94"):
        build_dataset("landmarks", "val", root=str(chest), split_file="split.json", template=str(template))[0]
    ds = build_dataset("landmarks", "val", root=str(chest), split_file="split.json", template="chest_xray:lungs")
    assert [p.stem for p, _ in ds.items] == ["case_002"] and ds[0]["landmarks"].shape == (94, 2)
    assert ds.num_classes == 2
