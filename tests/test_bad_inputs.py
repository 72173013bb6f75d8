"""Bad input files (issue 11): truncated, empty, not images, NaN-filled, 1x1, extremely elongated, other channel
counts, for 2D inference, 3D inference and training with data-loader workers. Each gives a clear per-file error
naming the file (the other files are still processed) or is handled (a mask of the input's size)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from attnseg.cli import infer, train
from attnseg.cli.common import user_message
from attnseg.errors import DataError
from tests import test_tools

trained = test_tools.trained  # the module-scoped fixture: a tiny trained 2D model


def _bad_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(good).save(folder / "good.png")
    raw = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    Image.fromarray(np.full((40, 50), np.nan, np.float32)).save(folder / "nan.tif")
    Image.fromarray(good[:1, :1]).save(folder / "one.png")
    Image.fromarray((rng.random((2, 700, 3)) * 255).astype(np.uint8)).save(folder / "elongated.png")
    Image.fromarray(good[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.concatenate([good, good[..., :1]], -1)).save(folder / "rgba.png")
    return {"handled": {"good": (40, 50), "one": (1, 1), "elongated": (2, 700), "gray": (40, 50), "rgba": (40, 50)},
            "refused": {"truncated": "truncated", "empty": "cannot identify image file", "text": "cannot identify",
                        "nan": "NaN or infinite values"}}


def test_2d_inference_segments_the_good_files_and_names_each_bad_one(trained, tmp_path, capsys):
    cfg, ckpt = trained
    expected = _bad_images(tmp_path / "in")
    out = tmp_path / "out"
    rc = infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "in"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for name, (h, w) in expected["handled"].items():
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert mask.shape == (h, w) and mask.max() < 3, name
    error = err[err.index("error: "):]
    assert error.startswith("error: 4 of 9 images could not be segmented (5 written): ")
    for name, reason in expected["refused"].items():
        assert not (out / f"{name}_mask.png").exists()
        line = next(ln for ln in err.splitlines() if ln.startswith(f"skipped {tmp_path / 'in' / name}"))
        assert reason in line, line
        assert f"{name}." in error


def test_one_bad_image_alone_is_one_error_line(trained, tmp_path, capsys):
    cfg, ckpt = trained
    _bad_images(tmp_path / "in")
    rc = infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "in" / "truncated.png"),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cannot read image {tmp_path / 'in' / 'truncated.png'} (unreadable, truncated")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_names_the_unreadable_file_also_from_a_worker(tmp_path, capsys, num_workers):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), i * 20, np.uint8)).save(data / "images" / f"c{i}.png")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(data / "masks" / f"c{i}.png")
    broken = data / "images" / "c5.png"
    broken.write_bytes(broken.read_bytes()[:40])
    cfg = {"work_dir": str(tmp_path / "work"),
           "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8},
                     "num_classes": 2},
           "data": {"dataset": {"name": "folder2d", "root": str(data), "num_classes": 2, "val_ratio": 0.25},
                    "batch_size": 8, "num_workers": num_workers, "check_files": False},
           "trainer": {"max_epochs": 1, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu"},
           "evaluation": {"hd95": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert train.main([str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    error = err[err.index("error: "):].strip()
    assert error.startswith(f"error: cannot read image {broken} (unreadable, truncated or not an image)")
    assert "Traceback" not in error and "\n" not in error
    assert error.endswith("(data-loader worker 0)" if num_workers else "'")


def test_user_message_of_an_error_re_raised_by_a_worker():
    from torch.utils.data._utils import ExceptionWrapper

    try:
        raise DataError("cannot read image /x/a.png (truncated)")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(DataError) as info:
        wrapped.reraise()
    assert "Traceback" in str(info.value)  # what PyTorch does
    assert user_message(info.value) == "cannot read image /x/a.png (truncated) (data-loader worker 3)"
    assert user_message(DataError("plain")) == "plain"


def test_3d_inference_of_bad_volumes(tmp_path, capsys):
    import nibabel as nib

    from tests.test_infer_volumes import volume_cfg, weights_for, write_scan

    cfg = volume_cfg(tmp_path)
    ckpt = weights_for(cfg, tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    write_scan(folder / "good.nii.gz", shape=(20, 18, 16))
    raw = (folder / "good.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])
    (folder / "empty.nii.gz").write_bytes(b"")
    nib.save(nib.Nifti1Image(np.full((20, 18, 16), np.nan, np.float32), np.eye(4)), str(folder / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((1, 1, 1), np.float32), np.eye(4)), str(folder / "one.nii.gz"))
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((2, 2, 300)).astype(np.float32), np.eye(4)),
             str(folder / "elongated.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.float32), np.eye(4)), str(folder / "twochannel.nii.gz"))
    out = tmp_path / "out"
    rc = infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for name, shape in (("good", (20, 18, 16)), ("one", (1, 1, 1)), ("elongated", (2, 2, 300))):
        assert nib.load(str(out / f"{name}_seg.nii.gz")).shape == shape
    error = err[err.index("error: "):]
    assert error.startswith("error: 4 of 7 volumes could not be segmented (3 written)")
    for name, reason in (("truncated", "truncated or damaged file"), ("empty", "Empty file"),
                         ("nan", "NaN or infinite values"), ("twochannel", "2 channels")):
        assert not (out / f"{name}_seg.nii.gz").exists()
        assert f"{name}.nii.gz" in error and reason in error, name
