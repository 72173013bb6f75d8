"""attnseg-infer on volumes: NIfTI in (files, folders, lists, multi-modal cases), NIfTI out on the input grid."""

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from attnseg.cli import infer
from attnseg.config import load_config
from attnseg.models.builder import build_model

from .test_tools import expect_error


def volume_cfg(tmp_path, in_chans=1, num_classes=3):
    cfg = {
        "work_dir": str(tmp_path / "work"),
        "model": {"backbone": {"name": "test_swinvit", "spatial_dims": 3}, "head": {"name": "unetr", "feature_size": 12},
                  "num_classes": num_classes, "in_chans": in_chans, "spatial_dims": 3},
        "data": {"dataset": {"name": "synthetic3d", "num_classes": num_classes}, "augment": None,
                 "volume": {"orientation": "RAS", "spacing": {"pixdim": [2.0, 2.0, 2.0]},
                            "intensity": {"type": "normalize"}}},
        "evaluation": {"sliding_window": True, "roi_size": [32, 32, 32], "overlap": 0.25},
    }
    path = tmp_path / f"cfg{in_chans}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def weights_for(cfg_path, tmp_path, label_values=None):
    """Random weights of the config's model, as bare weights or as a training checkpoint with label values."""
    torch.manual_seed(0)
    model = build_model(load_config(cfg_path))
    if label_values is None:
        path = tmp_path / "weights.pth"
        torch.save(model.state_dict(), path)
    else:
        path = tmp_path / "run.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "attnseg_classes": {"class_names": None, "label_values": label_values}}, path)
    return path


LPS = np.array([[-1.5, 0, 0, 30.0], [0, -1.2, 0, 25.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]])


def write_scan(path, shape=(30, 26, 14), seed=0, affine=LPS):
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header["descrip"] = b"scanner output"
    nib.save(img, str(path))
    return nib.load(str(path))


def test_nifti_files_folders_and_lists_give_label_maps_on_the_input_grid(tmp_path, capsys):
    cfg = volume_cfg(tmp_path)
    ckpt = weights_for(cfg, tmp_path)
    (tmp_path / "in").mkdir()
    src = write_scan(tmp_path / "in" / "a.nii.gz")
    write_scan(tmp_path / "in" / "b.nii", shape=(20, 22, 18), seed=1, affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    listed = tmp_path / "more.txt"
    write_scan(tmp_path / "c.nii.gz", shape=(16, 16, 16), seed=2)
    listed.write_text("# one per line\nc.nii.gz\n")
    out = tmp_path / "out"
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "in"), str(listed),
                       "--out", str(out), "--probabilities", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("_seg.nii.gz") == 3
    for name, shape in (("a", (30, 26, 14)), ("b", (20, 22, 18)), ("c", (16, 16, 16))):
        seg = nib.load(str(out / f"{name}_seg.nii.gz"))
        labels = np.asarray(seg.dataobj)
        assert seg.shape == shape and labels.dtype == np.uint8 and labels.max() <= 2
        prob = nib.load(str(out / f"{name}_prob.nii.gz")).get_fdata()
        assert prob.shape == (*shape, 3)
        np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-5)
        assert np.array_equal(prob.argmax(-1), labels)
        assert Image.open(out / f"{name}_montage.png").mode == "RGB"
    seg = nib.load(str(out / "a_seg.nii.gz"))
    assert np.array_equal(seg.affine, src.affine)
    assert seg.header["sform_code"] == 2 and seg.header["qform_code"] == 1
    assert seg.header["descrip"] == src.header["descrip"]


def test_label_values_from_the_checkpoint_and_tta(tmp_path, capsys):
    cfg = volume_cfg(tmp_path)
    ckpt = weights_for(cfg, tmp_path, label_values=[0, 7, 300])
    write_scan(tmp_path / "a.nii.gz", shape=(24, 24, 16))
    out = tmp_path / "out"
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "a.nii.gz"), "--out",
                       str(out), "--tta", "--no-montage", "--roi-size", "16", "16", "16", "--no-progress"]) == 0
    seg = nib.load(str(out / "a_seg.nii.gz"))
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert values <= {0, 7, 300} and len(values) >= 2 and seg.get_data_dtype() == np.int16
    assert not (out / "a_montage.png").exists()


def test_multi_modal_cases_are_grouped_by_suffix(tmp_path, capsys):
    cfg = volume_cfg(tmp_path, in_chans=2)
    ckpt = weights_for(cfg, tmp_path)
    folder = tmp_path / "cases"
    folder.mkdir()
    for m in range(2):
        write_scan(folder / f"brain_{m:04d}.nii.gz", shape=(20, 20, 12), seed=m)
    out = tmp_path / "out"
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(folder), "--out", str(out),
                       "--no-montage", "--no-progress"]) == 0
    assert nib.load(str(out / "brain_seg.nii.gz")).shape == (20, 20, 12)
    (folder / "brain_0001.nii.gz").unlink()
    write_scan(folder / "brain_0002.nii.gz", shape=(20, 20, 12))
    expect_error(capsys, infer.main, ["--config", str(cfg), "--checkpoint", str(ckpt), str(folder), "--out",
                                      str(out)], "case 'brain' has modality files [0, 2]", "brain_0001")


def test_bad_volume_inputs_are_named_before_anything_runs(tmp_path, capsys):
    cfg = volume_cfg(tmp_path)
    ckpt = weights_for(cfg, tmp_path)
    out = tmp_path / "out"
    args = ["--config", str(cfg), "--checkpoint", str(ckpt), "--out", str(out)]
    expect_error(capsys, infer.main, [*args, str(tmp_path / "missing.nii.gz")], "input not found", "missing.nii.gz")
    (tmp_path / "notes.csv").write_text("a,b\n")
    expect_error(capsys, infer.main, [*args, str(tmp_path / "notes.csv")], "neither a NIfTI file", "notes.csv")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, infer.main, [*args, str(tmp_path / "empty")], "no NIfTI files and no DICOM", "empty")
    write_scan(tmp_path / "good.nii.gz", shape=(16, 16, 16))
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    # every header is checked before the first prediction; the bad case is named at once and at the end, the
    # good one is segmented
    assert infer.main([*args, str(tmp_path / "bad.nii.gz"), str(tmp_path / "good.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("skipped ") and "bad.nii.gz (not a NIfTI file, or damaged)" in err.split("\n")[0]
    assert "\nerror: 1 of 2 volumes could not be segmented (1 written): case 'bad'" in err
    assert (out / "good_seg.nii.gz").exists() and "Traceback" not in err
    (tmp_path / "x").mkdir()
    write_scan(tmp_path / "x" / "good.nii.gz", shape=(16, 16, 16))
    expect_error(capsys, infer.main, [*args, str(tmp_path / "good.nii.gz"), str(tmp_path / "x")],
                 "same outputs 'good_*'")
    expect_error(capsys, infer.main, [*args, str(tmp_path / "good.nii.gz"), "--roi-size", "0", "8", "8"],
                 "--roi-size")


@pytest.mark.parametrize("channels", [2])
def test_wrong_channel_count_is_named(tmp_path, capsys, channels):
    cfg = volume_cfg(tmp_path)
    ckpt = weights_for(cfg, tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, channels), np.float32), np.eye(4)), str(tmp_path / "two.nii.gz"))
    expect_error(capsys, infer.main, ["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "two.nii.gz"),
                                      "--out", str(tmp_path / "o")], "two.nii.gz", "2 channels")


def test_dicom_series_in_nifti_out_on_the_series_grid(tmp_path, capsys):
    from attnseg.datasets.dicom import read_dicom_series
    from tests.dicom_writer import write_volume

    cfg = volume_cfg(tmp_path)
    ckpt = weights_for(cfg, tmp_path)
    # a coronal acquisition: voxel axes run R, S (down the image: -S), A; written shuffled under random names
    affine = np.array([[0.8, 0, 0, -12.0], [0, 0, 3.0, 5.0], [0, -0.9, 0, 40.0], [0, 0, 0, 1]])
    volume = np.random.default_rng(0).integers(-100, 300, (24, 20, 10)).astype(np.int16)
    write_volume(tmp_path / "series", volume, affine, np.random.default_rng(1))
    out = tmp_path / "out"
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "series"), "--out", str(out),
                       "--no-progress"]) == 0
    seg = nib.load(str(out / "series_seg.nii.gz"))
    dicom = read_dicom_series(tmp_path / "series")
    assert seg.shape == dicom.array.shape == (24, 20, 10)
    np.testing.assert_allclose(seg.affine, dicom.affine, atol=1e-5)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
    assert seg.header["sform_code"] == 1 and seg.header["qform_code"] == 1
    assert (out / "series_montage.png").is_file()
