"""fashion_mnist: IDX parsing, splits, samples, the config path and error messages on small files written here; one
test against Debian's dataset-fashion-mnist files, skipped where they are not installed."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from attnseg.datasets import build_dataset
from attnseg.datasets.fashion_mnist import CLASSES, DEFAULT_ROOT, FashionMNIST, read_idx
from attnseg.errors import DataError

REPO = Path(__file__).resolve().parents[2]
PER_CLASS = {"train": 20, "t10k": 3}


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None, cut: int = 0) -> Path:
    """An IDX file of ``array`` (uint8), gzip-compressed for a ``.gz`` name; ``magic`` replaces the 4 magic bytes,
    ``cut`` drops that many bytes from the end of the uncompressed data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    head = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    raw = head + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    raw = raw[:len(raw) - cut] if cut else raw
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def make_split(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 28, 28], labels [n])``: every class ``n_per_class`` times, shuffled; pixel (0, 0) encodes the
    item's row (so items can be traced) and pixel (1, 1) its label."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), n_per_class)).astype(np.uint8)
    images = rng.integers(0, 256, (labels.size, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(labels.size) % 256
    images[:, 1, 1] = labels * 20
    return images, labels


@pytest.fixture
def fmnist_root(tmp_path) -> Path:
    root = tmp_path / "fmnist"
    for i, (prefix, n) in enumerate(PER_CLASS.items()):
        images, labels = make_split(n, seed=i)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


# -- parsing --------------------------------------------------------------------------------------------------------

def test_read_idx_round_trip_gz_and_plain(tmp_path):
    images, labels = make_split(2, seed=5)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", images), 3), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b", labels), 1), labels)
    odd = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)  # rows != cols: row-major order kept
    assert np.array_equal(read_idx(write_idx(tmp_path / "c.gz", odd), 3), odd)


def test_read_idx_bad_magic_names_file_and_values(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.zeros(4, np.uint8))  # labels (1-D) read as images
    with pytest.raises(DataError, match=r"x\.gz: magic number 0x00000801, expected 0x00000803"):
        read_idx(path, 3)
    path = write_idx(tmp_path / "y.gz", np.zeros((2, 2, 2), np.uint8), magic=bytes([0, 0, 0x0D, 3]))  # float32
    with pytest.raises(DataError, match=r"y\.gz: magic number 0x00000D03, expected 0x00000803"):
        read_idx(path, 3)


def test_read_idx_truncated_data_header_and_stream(tmp_path):
    images = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(DataError, match=r"t\.gz is truncated: the header gives sizes \[3, 4, 4\] \(48 bytes of data\), "
                                        r"the file holds 47"):
        read_idx(write_idx(tmp_path / "t.gz", images, cut=1), 3)
    with pytest.raises(DataError, match=r"h is truncated: 10 bytes, shorter than its 16-byte header"):
        read_idx(write_idx(tmp_path / "h", images, cut=48 + 6), 3)
    full = gzip.compress(b"\x00\x00\x08\x01" + (1000).to_bytes(4, "big") + bytes(1000))
    (tmp_path / "cut.gz").write_bytes(full[: len(full) // 2])  # a download cut off midway
    with pytest.raises(DataError, match=r"cannot read IDX file .*cut\.gz: EOFError"):
        read_idx(tmp_path / "cut.gz", 1)
    (tmp_path / "notgz.gz").write_bytes(b"plain bytes, not gzip")
    with pytest.raises(DataError, match=r"cannot read IDX file .*notgz\.gz: BadGzipFile"):
        read_idx(tmp_path / "notgz.gz", 1)


# -- the dataset ----------------------------------------------------------------------------------------------------

def test_splits_are_disjoint_stratified_and_deterministic(fmnist_root):
    train = FashionMNIST("train", None, root=str(fmnist_root), val_ratio=0.25)
    val = FashionMNIST("val", None, root=str(fmnist_root), val_ratio=0.25)
    test = FashionMNIST("test", None, root=str(fmnist_root))
    assert (len(train), len(val), len(test)) == (150, 50, 30)
    assert not set(train.indices) & set(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(200))
    assert np.bincount(val.labels, minlength=10).tolist() == [5] * 10  # 25 % of each class's 20
    assert np.bincount(train.labels, minlength=10).tolist() == [15] * 10
    assert test.indices.tolist() == list(range(30))
    again = FashionMNIST("val", None, root=str(fmnist_root), val_ratio=0.25)
    assert np.array_equal(again.indices, val.indices)
    other = FashionMNIST("val", None, root=str(fmnist_root), val_ratio=0.25, seed=1)
    assert not np.array_equal(other.indices, val.indices) and len(other) == 50
    # the labels follow the files: pixel (1, 1) encodes each item's label
    for ds in (train, val, test):
        for i in (0, len(ds) // 2, len(ds) - 1):
            s = ds[i]
            assert int(s["label"]) == round(float(s["image"][0, 1, 1]) * 255 / 20)


def test_samples_values_channels_resize_and_meta(fmnist_root):
    images, labels = make_split(PER_CLASS["t10k"], seed=1)
    ds = FashionMNIST("test", None, root=str(fmnist_root))
    s = ds[7]
    assert s["image"].dtype == torch.float32 and s["image"].shape == (1, 28, 28)
    assert torch.equal(s["image"][0], torch.from_numpy(images[7].astype(np.float32) / 255))
    assert s["label"].dtype == torch.int64 and int(s["label"]) == labels[7]
    assert s["meta"] == {"id": "t10k/7", "index": 7, "source": "t10k", "orig_size": (28, 28)}
    rgb = FashionMNIST("test", None, root=str(fmnist_root), in_chans=3)[7]["image"]
    assert rgb.shape == (3, 28, 28) and all(torch.equal(rgb[c], s["image"][0]) for c in range(3))
    big = FashionMNIST("test", None, root=str(fmnist_root), image_size=(56, 42))[7]["image"]
    assert big.shape == (1, 56, 42) and 0 <= big.min() and big.max() <= 1
    assert ds.num_classes == 10 and ds.class_names == list(CLASSES) and ds.task == "classification"


def test_pickles_without_the_decoded_images(fmnist_root):
    import pickle

    ds = FashionMNIST("test", None, root=str(fmnist_root))
    ds.check()  # decodes the images
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._images is None and len(pickle.dumps(ds)) < 5000
    assert torch.equal(copy[4]["image"], ds[4]["image"])


def test_limit_takes_a_seeded_subset_of_the_split(fmnist_root):
    val = FashionMNIST("val", None, root=str(fmnist_root), val_ratio=0.25)
    small = FashionMNIST("val", None, root=str(fmnist_root), val_ratio=0.25, limit=12)
    assert len(small) == 12 and set(small.indices) <= set(val.indices)
    assert list(small.indices) == sorted(small.indices)
    assert np.array_equal(small.indices, FashionMNIST("val", None, root=str(fmnist_root), val_ratio=0.25,
                                                      limit=12).indices)
    assert len(FashionMNIST("test", None, root=str(fmnist_root), limit=1000)) == 30  # more than there is: all


def test_uncompressed_files_are_read(tmp_path):
    images, labels = make_split(2, seed=3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    ds = FashionMNIST("test", None, root=str(tmp_path))
    assert len(ds) == 20 and int(ds[3]["label"]) == labels[3]


def test_missing_root_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match=r"root folder .*nowhere not found; install Debian's dataset-fashion-mnist "
                                        r".* or set root"):
        FashionMNIST("train", None, root=str(tmp_path / "nowhere"))


def test_missing_file_is_named(fmnist_root):
    (fmnist_root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"has no t10k-labels-idx1-ubyte\.gz \(nor t10k-labels-idx1-ubyte\)"):
        FashionMNIST("test", None, root=str(fmnist_root))
    FashionMNIST("train", None, root=str(fmnist_root))  # the training files are still there


def test_image_and_label_counts_must_agree(fmnist_root):
    images, _ = make_split(3, seed=1)
    write_idx(fmnist_root / "t10k-images-idx3-ubyte.gz", images[:29])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz holds 29 images but .*t10k-labels-idx1-ubyte"
                                        r"\.gz holds 30 labels"):
        FashionMNIST("test", None, root=str(fmnist_root))


def test_bad_images_file_fails_in_check(fmnist_root):
    """The images are decoded on first use; check() (called before training) reports a broken file."""
    images, _ = make_split(3, seed=1)
    write_idx(fmnist_root / "t10k-images-idx3-ubyte.gz", images, cut=5)
    ds = FashionMNIST("test", None, root=str(fmnist_root))  # the header still gives 30 images
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is truncated"):
        ds.check()


def test_labels_outside_the_classes(fmnist_root):
    images, labels = make_split(3, seed=1)
    labels[4] = 12
    write_idx(fmnist_root / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"holds values \[12\] outside the class indices 0..9"):
        FashionMNIST("test", None, root=str(fmnist_root))


def test_registered_and_transforms_through_the_config(fmnist_root):
    from attnseg.config import load_config
    from attnseg.engine.runner import build_dataset as build_from_config

    assert len(build_dataset("fashion_mnist", "test", root=str(fmnist_root))) == 30
    cfg = load_config(REPO / "configs" / "karat" / "karat_vit_tiny_fashion_mnist.yaml",
                      [f"data.dataset.root={fmnist_root}"])
    mean, std = cfg.data.normalize.mean[0], cfg.data.normalize.std[0]
    val = build_from_config(cfg, "val")
    raw = FashionMNIST("val", None, root=str(fmnist_root))
    for i in (0, 5):
        torch.testing.assert_close(val[i]["image"], (raw[i]["image"] - mean) / std)  # evaluation: normalised only
    train = build_from_config(cfg, "train")
    torch.manual_seed(0)
    batch = torch.stack([train[i]["image"] for i in range(len(train))])
    assert batch.shape == (len(train), 1, 28, 28)
    unnormalised = batch * std + mean
    assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5
    plain = torch.stack([FashionMNIST("train", None, root=str(fmnist_root))[i]["image"] for i in range(len(train))])
    assert not torch.allclose(unnormalised, plain, atol=1e-3)  # augmented (zoom, flips)


# -- the real files ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_files():
    train = FashionMNIST("train", None, val_ratio=0)
    test = FashionMNIST("test", None)
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # the mean pixel, from the dataset's decoded array, and independently from the raw gzip stream (zlib, the
    # 16-byte header skipped, bytes summed); 0.2860 is the published statistic
    decoded = float(train.images().mean(dtype=np.float64) / 255)
    with open(Path(DEFAULT_ROOT) / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = zlib.decompress(f.read(), wbits=31)
    independent = np.frombuffer(raw[16:], dtype=np.uint8).astype(np.float64).sum() / (60000 * 28 * 28 * 255)
    assert decoded == pytest.approx(independent, rel=1e-12)
    assert decoded == pytest.approx(0.2860406, abs=1e-6)
    first = test[0]
    assert first["image"].shape == (1, 28, 28) and test.class_names[int(first["label"])] == "Ankle boot"
