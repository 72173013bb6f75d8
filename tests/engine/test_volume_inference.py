"""Volume inference: resampling by affines, the source grid and header kept, sliding window = whole volume."""

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from attnseg.config import validate_config
from attnseg.engine.volume_inference import (
    VolumeInput,
    VolumePredictor,
    as_closest_ras,
    read_volume,
    resample_to_grid,
    save_like,
)


class Threshold(nn.Module):
    """An oracle 'model': class 1 where the (normalised) intensity is above 0.5, as two-class logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x[:, :1], x[:, :1] - 0.5], dim=1) * 20


class SmallConv(nn.Module):
    """A model whose output depends on neighbours (so windows and padding would show)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.GELU(), nn.Conv3d(4, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def cfg_with(volume=None, **evaluation):
    data = {"dataset": {"name": "synthetic3d"}, "volume": volume, "augment": None}
    return validate_config({"model": {"backbone": {"name": "test_swinvit"}, "head": {"name": "unetr"},
                                      "spatial_dims": 3, "num_classes": 2},
                            "data": data, "evaluation": evaluation})


def sphere(shape, center, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    return (np.linalg.norm(grid - np.asarray(center) * np.asarray(spacing), axis=-1) <= radius).astype(np.float32)


def test_resample_to_grid_is_exact_for_linear_fields_and_fills_outside():
    # Source: 2 mm voxels, origin (10, -4, 3); destination: 1 mm voxels over a larger box.
    src_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    src_affine[:3, 3] = [10, -4, 3]
    dst_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    src_shape, dst_shape = (8, 7, 6), (30, 20, 18)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in src_shape], indexing="ij"), -1)
    world = idx @ src_affine[:3, :3].T + src_affine[:3, 3]
    field = world @ np.array([0.5, -1.0, 2.0]) + 3.0  # linear in world coordinates
    values = torch.from_numpy(np.stack([field, -field])).float()
    out = resample_to_grid(values, src_affine, dst_affine, dst_shape, fill=[-99.0, 99.0], slab=5).numpy()
    dst_world = np.stack(np.meshgrid(*[np.arange(n) for n in dst_shape], indexing="ij"), -1).astype(float)
    expected = dst_world @ np.array([0.5, -1.0, 2.0]) + 3.0
    src_idx = (dst_world - src_affine[:3, 3]) / 2.0
    inside = ((src_idx >= 0) & (src_idx <= np.array(src_shape) - 1)).all(-1)
    outside = ((src_idx < -0.5) | (src_idx > np.array(src_shape) - 0.5)).any(-1)
    assert inside.sum() > 500 and outside.sum() > 500
    np.testing.assert_allclose(out[0][inside], expected[inside], atol=1e-3)
    np.testing.assert_allclose(out[1][inside], -expected[inside], atol=1e-3)
    assert (out[0][outside] == -99).all() and (out[1][outside] == 99).all()
    # same grid: returned as it is
    assert resample_to_grid(values, src_affine, src_affine, src_shape) is values


def write_nifti(path, data, affine, *, qform_code=1, sform_code=2, descrip=b"test scan"):
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine, code=sform_code)
    img.header["descrip"] = descrip
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(0.5, 10.0)  # stored values are scaled: the reader applies it
    nib.save(img, str(path))
    return nib.load(str(path))


def lps_oblique_affine():
    """An LPS-ish affine with a small rotation and anisotropic voxels (0.9, 1.1, 1.6 mm)."""
    angle = np.deg2rad(10)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag([0.9, 1.1, 1.6])
    affine[:3, 3] = [40.0, 35.0, -20.0]
    return affine


def test_labels_come_back_on_the_source_grid_with_its_affine_and_header(tmp_path):
    affine = lps_oblique_affine()
    shape = (40, 36, 24)
    ball = sphere(shape, (20, 17, 12), 9.0, spacing=(0.9, 1.1, 1.6))
    stored = (ball * 100).astype(np.int16)  # scaled by 0.5 + 10 in the file: 10 outside, 60 inside
    src = write_nifti(tmp_path / "scan.nii.gz", stored, affine)
    volume = read_volume([tmp_path / "scan.nii.gz"])
    assert volume.image.shape == (1, *shape) and volume.image.max() == 60.0
    # RAS, 2 mm, intensities 10..60 -> 0..1: the model sees a resampled, reoriented copy
    cfg = cfg_with({"orientation": "RAS", "spacing": {"pixdim": [2.0, 2.0, 2.0]},
                    "intensity": {"type": "scale_range", "a_min": 10, "a_max": 60, "b_min": 0, "b_max": 1}},
                   roi_size=[16, 16, 16], sliding_window=True)
    pred = VolumePredictor(Threshold(), cfg)(volume, probabilities=True)
    assert pred.labels.shape == shape and pred.probabilities.shape == (2, *shape)
    assert pred.processed_shape != shape
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    # The ball comes back where it was (only a rim of voxels differs after 2 mm resampling).
    agree = (pred.labels == ball).mean()
    dice = 2 * (pred.labels * ball).sum() / (pred.labels.sum() + ball.sum())
    assert agree > 0.98 and dice > 0.93

    out = save_like(pred.labels.astype(np.uint8), volume.affine, tmp_path / "out" / "scan_seg.nii.gz", volume.header)
    written = nib.load(str(out))
    assert written.shape == shape and np.array_equal(np.asarray(written.dataobj), pred.labels)
    assert np.array_equal(written.affine, src.affine)
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "descrip", "xyzt_units", "dim_info"):
        assert np.array_equal(written.header[key], src.header[key]), key
    assert written.header.get_data_dtype() == np.uint8
    assert written.header.get_slope_inter() in ((1.0, 0.0), (None, None))
    assert not list(tmp_path.joinpath("out").glob(".*tmp*"))  # the temporary file was renamed


@pytest.mark.parametrize("roi", [None, [24, 20, 16], [64, 64, 64]])
def test_a_window_covering_the_volume_equals_whole_volume_inference(roi):
    model = SmallConv().eval()
    cfg = cfg_with(None, sliding_window=True)
    image = np.random.default_rng(0).standard_normal((1, 24, 20, 16)).astype(np.float32)
    volume_in = VolumeInput("v", image, np.eye(4), ())
    predictor = VolumePredictor(model, cfg, roi_size=roi)
    with torch.no_grad():
        whole = model(torch.from_numpy(image)[None])
    torch.testing.assert_close(predictor.logits(torch.from_numpy(image)[None]), whole, atol=1e-6, rtol=0)
    pred = predictor(volume_in, probabilities=True)
    np.testing.assert_allclose(pred.probabilities, torch.softmax(whole[0], 0).numpy(), atol=1e-6)
    assert np.array_equal(pred.labels, whole[0].argmax(0).numpy())


def test_overlapping_windows_and_flips_stay_close_to_whole_volume():
    model = SmallConv().eval()
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 1, 30, 28, 26)).astype(np.float32))
    cfg = cfg_with(None, sliding_window=True)
    with torch.no_grad():
        whole = model(image)
    windows = VolumePredictor(model, cfg, roi_size=[16, 16, 16], overlap=0.5).logits(image)
    # Interior voxels (more than the receptive field from any window edge) match; borders differ by padding.
    torch.testing.assert_close(windows[..., 4:-4, 4:-4, 4:-4], whole[..., 4:-4, 4:-4, 4:-4], atol=0.15, rtol=0)
    tta = VolumePredictor(model, cfg, tta=True).logits(image)
    flips = [whole] + [model(image.flip(a)).flip(a) for a in (2, 3, 4)]
    torch.testing.assert_close(tta, torch.stack(flips).mean(0), atol=1e-5, rtol=0)


def test_foreground_crop_leaves_background_outside(tmp_path):
    shape = (30, 30, 20)
    image = np.zeros(shape, np.float32)
    image[10:20, 8:22, 5:15] = 1.0  # the only foreground; the crop keeps just this box
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "box.nii.gz"))
    cfg = cfg_with({"orientation": "RAS", "crop_foreground": {"source_key": "image", "threshold": 0.5}})
    predictor = VolumePredictor(Threshold(), cfg)
    volume = read_volume([tmp_path / "box.nii.gz"])
    x, processed_affine = predictor.prepare(volume)
    assert tuple(x.shape[2:]) == (10, 14, 10) and processed_affine[0, 3] == 10
    pred = predictor(volume)
    assert np.array_equal(pred.labels, (image > 0.5).astype(np.int64))


def test_label_driven_foreground_crop_is_dropped_at_inference():
    cfg = cfg_with({"orientation": None, "crop_foreground": {"source_key": "label"}})
    predictor = VolumePredictor(Threshold(), cfg)
    assert predictor.preprocess is not None and predictor.preprocess.cfg.crop_foreground is None


def test_as_closest_ras_reorders_axes_for_display():
    # voxel axis 0 runs along +A (world y), axis 1 along -S (world -z), axis 2 along -R (world -x)
    affine = np.array([[0, 0, -2.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(float)
    (ras,) = as_closest_ras(vol, affine=affine)
    # so R, A, S are voxel axes 2 (flipped), 0, 1 (flipped)
    assert ras.shape == (4, 2, 3)
    assert ras[0, 0, 0] == vol[0, 2, 3] and ras[3, 1, 2] == vol[1, 0, 0]


def test_real_template_round_trips_affine_and_header(tmp_path):
    """The nilearn MNI152 template (when nilearn is installed): read, predict at 2 mm, written back exactly."""
    pytest.importorskip("nilearn")
    from pathlib import Path

    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path.name} is not in this nilearn")
    src = nib.load(str(path))
    volume = read_volume([path])
    cfg = cfg_with({"orientation": "RAS", "spacing": {"pixdim": [2.0, 2.0, 2.0]},
                    "intensity": {"type": "scale_range", "a_min": 0, "a_max": 200, "b_min": 0, "b_max": 1}})
    pred = VolumePredictor(Threshold(), cfg)(volume)
    assert pred.labels.shape == src.shape
    out = nib.load(str(save_like(pred.labels.astype(np.uint8), volume.affine, tmp_path / "seg.nii.gz", src)))
    assert np.array_equal(out.affine, src.affine)
    for key in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "pixdim", "quatern_b", "qoffset_x"):
        assert np.array_equal(out.header[key], src.header[key]), key
    # bright tissue (> 100 of 200) found at 2 mm and mapped back agrees with thresholding at 1 mm
    truth = (np.asarray(src.dataobj) > 100).astype(np.int64)
    dice = 2 * (pred.labels * truth).sum() / (pred.labels.sum() + truth.sum())
    assert dice > 0.9


def test_a_connectivity_model_is_blended_and_flipped_as_class_probabilities():
    from attnseg.heads.connectivity import ConnectivityHead
    from attnseg.models import Segmentor
    from attnseg.registry import BACKBONES

    torch.manual_seed(0)
    backbone = BACKBONES.get("test_swinvit")(in_chans=1)
    info = backbone.feature_info
    head = ConnectivityHead([f["num_chs"] for f in info], [f["reduction"] for f in info], num_classes=3,
                            spatial_dims=3, in_chans=1, inner={"name": "unetr", "feature_size": 12},
                            neighbours=26)
    model = Segmentor(backbone, head).eval()
    image = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 1, 32, 32, 32)).astype(np.float32))
    cfg = cfg_with(None, sliding_window=True)
    with torch.no_grad():
        probs = model.class_probabilities(model(image))
        flips = [probs] + [model.class_probabilities(model(image.flip(a))).flip(a) for a in (2, 3, 4)]
    assert model(image).shape == (1, 26 * 3, 32, 32, 32) and probs.shape == (1, 3, 32, 32, 32)
    volume = VolumeInput("v", image[0].numpy(), np.eye(4), ())
    pred = VolumePredictor(model, cfg, tta=True)(volume, probabilities=True)
    np.testing.assert_allclose(pred.probabilities, torch.stack(flips).mean(0)[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(pred.labels, torch.stack(flips).mean(0)[0].argmax(0).numpy())
