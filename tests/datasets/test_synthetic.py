import doctest

import pytest
import torch

import attnseg.datasets.synthetic
import attnseg.datasets.transforms
from attnseg.datasets import build_dataset, collate
from attnseg.errors import ConfigError, DataError
from attnseg.registry import DATASETS


def test_registered_and_contract_attributes():
    assert {"synthetic2d", "synthetic3d", "folder2d", "imagefolder"} <= set(DATASETS.names())
    ds = build_dataset("synthetic2d", "train", num_train=2)
    assert (ds.num_classes, ds.in_chans, ds.spatial_dims, ds.task, ds.ignore_index) == (4, 3, 2, "segmentation", None)
    assert ds.class_names == ["background", "disc_hstripes", "rect_vstripes", "triangle_dstripes"]
    ds3 = build_dataset("synthetic3d", "test", num_test=1)
    assert (ds3.in_chans, ds3.spatial_dims, ds3.class_names[3]) == (1, 3, "shell_dstripes")
    with pytest.raises(KeyError, match="did you mean 'synthetic2d'"):
        build_dataset("synthetic2", "train")


def test_deterministic_per_seed_split_and_index():
    a = build_dataset("synthetic2d", "train", image_size=[48, 40], num_train=3)
    b = build_dataset("synthetic2d", "train", image_size=[48, 40], num_train=3)
    for i in range(3):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    val = build_dataset("synthetic2d", "val", image_size=[48, 40], num_val=3)
    other_seed = build_dataset("synthetic2d", "train", image_size=[48, 40], num_train=3, seed=1)
    assert not torch.equal(a[0]["mask"], val[0]["mask"]) and not torch.equal(a[0]["image"], val[0]["image"])
    assert not torch.equal(a[0]["image"], other_seed[0]["image"])
    # reading out of order gives the same sample (generated from (seed, split, index) alone)
    assert torch.equal(b[2]["image"], a[2]["image"])
    c = build_dataset("synthetic3d", "train", image_size=[16, 16, 16], num_train=2)
    d = build_dataset("synthetic3d", "train", image_size=[16, 16, 16], num_train=2)
    assert torch.equal(c[1]["image"], d[1]["image"]) and torch.equal(c[1]["mask"], d[1]["mask"])


@pytest.mark.parametrize("name,size,chans", [("synthetic2d", [48, 40], 3), ("synthetic2d", [33, 65], 1),
                                             ("synthetic3d", [24, 20, 16], 1), ("synthetic3d", [16, 16, 16], 2)])
def test_shapes_dtypes_and_range(name, size, chans):
    ds = build_dataset(name, "val", image_size=size, num_val=2, in_chans=chans)
    s = ds[0]
    assert s["image"].shape == (chans, *size) and s["image"].dtype == torch.float32
    assert s["mask"].shape == tuple(size) and s["mask"].dtype == torch.int64
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["meta"] == {"id": "val_00000", "path": None, "orig_size": tuple(size)}
    assert len(ds) == 2
    with pytest.raises(IndexError):
        ds[2]
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, chans, *size) and batch["mask"].shape == (2, *size)
    assert [m["id"] for m in batch["meta"]] == ["val_00000", "val_00001"]


@pytest.mark.parametrize("num_classes", [2, 4, 8])
def test_every_class_appears(num_classes):
    ds = build_dataset("synthetic2d", "train", num_classes=num_classes, image_size=[48, 48], num_train=16)
    seen = set()
    for i in range(len(ds)):
        seen |= set(ds[i]["mask"].unique().tolist())
    assert seen == set(range(num_classes))
    ds3 = build_dataset("synthetic3d", "train", num_classes=num_classes, image_size=[24, 24, 24], num_train=12)
    seen = set()
    for i in range(len(ds3)):
        seen |= set(ds3[i]["mask"].unique().tolist())
    assert seen == set(range(num_classes))


@pytest.mark.parametrize("num_classes", [4, 8])
def test_foreground_classes_not_separable_by_intensity(num_classes):
    """No per-pixel intensity rule tells the foreground classes apart: neither a threshold per class (balanced
    accuracy) nor the best possible intensity-only classifier (the majority class of each intensity bin)."""
    ds = build_dataset("synthetic2d", "train", num_classes=num_classes, image_size=[64, 64], num_train=32)
    x = torch.cat([ds[i]["image"].mean(0).flatten() for i in range(len(ds))])
    y = torch.cat([ds[i]["mask"].flatten() for i in range(len(ds))])
    fg = y > 0
    x, y = x[fg], y[fg]
    above = x[None] > torch.linspace(0, 1, 101)[:, None]  # [thresholds, pixels]
    for k in range(1, num_classes):
        pos = y == k
        tpr = above[:, pos].float().mean(1)  # rule "x > t means class k"
        tnr = (~above[:, ~pos]).float().mean(1)
        balanced = 0.5 * (tpr + tnr)
        best = torch.maximum(balanced, 1 - balanced).max().item()  # either direction of the rule
        assert best < 0.65, (k, best)  # 0.5 is chance
    bins = (x * 64).long().clamp(0, 63)
    table = torch.zeros(64, num_classes).index_put_((bins, y), torch.ones_like(x), accumulate=True)
    bayes = table.max(1).values.sum().item() / len(x)
    majority = torch.bincount(y).max().item() / len(y)
    assert bayes < majority + 0.12 and bayes < 0.6, (bayes, majority)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="num_classes must be in 2..8, got 9"):
        build_dataset("synthetic2d", "train", num_classes=9)
    with pytest.raises(ConfigError, match=r"image_size must have 3 sizes >= 8, got \[32, 32\]"):
        build_dataset("synthetic3d", "train", image_size=[32, 32])
    with pytest.raises(ConfigError, match="split must be one of"):
        build_dataset("synthetic2d", "training")


def test_collate_refuses_mixed_shapes():
    a = build_dataset("synthetic2d", "train", image_size=[16, 16], num_train=1)[0]
    b = build_dataset("synthetic2d", "train", image_size=[16, 20], num_train=1)[0]
    with pytest.raises(DataError, match=r"'image' tensors differ in shape .*train_00000: \[3, 16, 16\], "
                                        r"train_00000: \[3, 16, 20\].*crop_size"):
        collate([a, b])


@pytest.mark.parametrize("module", [attnseg.datasets.synthetic, attnseg.datasets.transforms])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
def test_small_cnn_learns_the_classes():
    """What intensity cannot separate, texture and shape do: a 4-layer CNN reaches a high foreground accuracy."""
    torch.manual_seed(0)
    train = build_dataset("synthetic2d", "train", image_size=[48, 48], num_train=64)
    val = build_dataset("synthetic2d", "val", image_size=[48, 48], num_val=16)
    xs = torch.stack([train[i]["image"] for i in range(len(train))])
    ys = torch.stack([train[i]["mask"] for i in range(len(train))])
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 24, 3, padding=2, dilation=2), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 24, 3, padding=4, dilation=4), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 4, 1),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(500):
        idx = torch.randint(0, len(xs), (8,))
        loss = torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xv = torch.stack([val[i]["image"] for i in range(len(val))])
        yv = torch.stack([val[i]["mask"] for i in range(len(val))])
        pred = net(xv).argmax(1)
    fg = yv > 0
    acc = (pred[fg] == yv[fg]).float().mean().item()
    assert acc > 0.8, acc
