import pickle

import pytest
import torch
from pydantic import ValidationError

from attnseg.datasets import build_dataset
from attnseg.datasets.transforms import AugmentConfig, NormalizeConfig, build_transform
from attnseg.errors import ConfigError


def _marked(shape, pos, label=2):
    """An image ``[1, *shape]`` and mask ``[*shape]`` with one marked pixel at ``pos``."""
    image = torch.zeros(1, *shape)
    image[(0, *pos)] = 1.0
    mask = torch.zeros(shape, dtype=torch.long)
    mask[pos] = label
    return {"image": image, "mask": mask, "meta": {"id": "x"}}


def _where(t):
    return tuple(int(i) for i in (t != 0).nonzero()[0])


@pytest.mark.parametrize("dims", [2, 3])
def test_flips_move_image_and_mask_together(dims):
    shape, pos = ((16, 12), (2, 3)) if dims == 2 else ((5, 16, 12), (1, 2, 3))
    t = build_transform(AugmentConfig(hflip=1.0, vflip=1.0), None, train=True, spatial_dims=dims)
    out = t(_marked(shape, pos))
    expected = (*pos[:-2], 13, 8)  # H: 16 - 1 - 2, W: 12 - 1 - 3; depth untouched
    assert _where(out["image"][0]) == expected and _where(out["mask"]) == expected and out["mask"][expected] == 2
    assert out["mask"].dtype == torch.int64 and out["image"].dtype == torch.float32
    assert out["meta"] == {"id": "x"}
    h_only = build_transform(AugmentConfig(hflip=1.0), None, train=True, spatial_dims=dims)(_marked(shape, pos))
    assert _where(h_only["mask"]) == (*pos[:-1], 8)


@pytest.mark.parametrize("dims", [2, 3])
def test_rot90_keeps_alignment_and_non_square_shapes(dims):
    t = build_transform(AugmentConfig(rotate90=1.0), None, train=True, spatial_dims=dims)
    square = (12, 12) if dims == 2 else (3, 12, 12)
    pos = (2, 3) if dims == 2 else (1, 2, 3)
    seen = set()
    for _ in range(20):
        out = t(_marked(square, pos))
        assert _where(out["image"][0]) == _where(out["mask"])
        seen.add(_where(out["mask"]))
    assert len(seen) == 3  # k = 1, 2, 3
    wide = (10, 14) if dims == 2 else (3, 10, 14)
    out = t(_marked(wide, pos))
    assert out["mask"].shape == wide and _where(out["mask"]) == (*pos[:-2], 7, 10)  # 180 degrees only


@pytest.mark.parametrize("dims,shape,crop", [(2, (10, 40), [16, 16]), (3, (6, 20, 9), [8, 8, 12])])
def test_crop_pads_smaller_images(dims, shape, crop):
    torch.manual_seed(1)
    image = torch.rand(2, *shape) * 0.9 + 0.1  # > 0 everywhere, so padding (0) is visible
    mask = (image[0] > 0.5).long()
    t = build_transform(AugmentConfig(crop_size=crop), None, train=True, spatial_dims=dims, ignore_index=255)
    for _ in range(5):
        out = t({"image": image, "mask": mask})
        assert out["image"].shape == (2, *crop) and out["mask"].shape == tuple(crop)
        padded = out["image"][0] == 0
        assert padded.any() and torch.equal(out["mask"] == 255, padded)
        assert torch.equal(out["mask"][~padded] == 1, out["image"][0][~padded] > 0.5)
    eval_t = build_transform(AugmentConfig(crop_size=crop), None, train=False, spatial_dims=dims)
    assert eval_t({"image": image, "mask": mask})["image"].shape == (2, *shape)  # evaluation: no crop


@pytest.mark.parametrize("dims", [2, 3])
def test_rotation_and_zoom_resample_masks_with_nearest(dims):
    shape = (40, 48) if dims == 2 else (6, 40, 48)
    mask = torch.zeros(shape, dtype=torch.long)
    mask[..., 10:30, 12:36] = 1
    mask[..., 15:20, 20:26] = 3
    image = (mask.float() / 3)[None]
    t = build_transform(AugmentConfig(rotate_degrees=40, scale_range=(0.6, 0.9)), None, train=True, spatial_dims=dims,
                        ignore_index=255)
    for _ in range(4):
        out = t({"image": image, "mask": mask})
        assert out["mask"].shape == shape and set(out["mask"].unique().tolist()) <= {0, 1, 3, 255}
        assert (out["mask"] == 255).any()  # zoomed out: border pixels come from outside the image
        inside = out["mask"] != 255
        agree = (out["mask"][inside] == (out["image"][0][inside] * 3).round().long()).float().mean().item()
        assert agree > 0.95, agree


def test_intensity_ops_leave_the_mask_alone():
    s = build_dataset("synthetic2d", "train", image_size=[24, 24], num_train=1)[0]
    t = build_transform(AugmentConfig(color_jitter=0.5, gaussian_noise=0.1), None, train=True)
    out = t(s)
    assert torch.equal(out["mask"], s["mask"]) and not torch.equal(out["image"], s["image"])
    torch.manual_seed(3)
    a = t(s)["image"]
    torch.manual_seed(3)
    assert torch.equal(a, t(s)["image"])  # draws come from torch's generator
    jitter_only = build_transform(AugmentConfig(color_jitter=1.0), None, train=True)(s)["image"]
    assert jitter_only.min() >= 0 and jitter_only.max() <= 1


def test_normalization_and_eval_transform():
    t = build_transform(AugmentConfig(hflip=1.0), {"mean": [0.5, 0.25], "std": [0.25, 0.5]}, train=False)
    image = torch.stack([torch.full((3, 4), 0.75), torch.arange(12.0).reshape(3, 4) / 12])
    out = t({"image": image, "mask": torch.arange(12).reshape(3, 4)})
    assert torch.allclose(out["image"][0], torch.ones(3, 4))
    assert torch.allclose(out["image"][1], (image[1] - 0.25) / 0.5)
    assert torch.equal(out["mask"], torch.arange(12).reshape(3, 4))  # evaluation: no flip
    one = build_transform(None, NormalizeConfig(mean=[0.5], std=[0.5]), train=True, spatial_dims=3)
    assert torch.allclose(one({"image": torch.ones(3, 2, 2, 2)})["image"], torch.ones(3, 2, 2, 2))
    imagenet = build_transform(None, {}, train=False)
    assert torch.allclose(imagenet({"image": torch.zeros(3, 1, 1)})["image"].flatten(),
                          -torch.tensor([0.485 / 0.229, 0.456 / 0.224, 0.406 / 0.225]))
    with pytest.raises(ConfigError, match="normalize has 3 mean/std values but the image has 1 channels"):
        imagenet({"image": torch.zeros(1, 4, 4)})
    assert build_transform(None, None, train=False)({"image": torch.ones(1, 2, 2)})["image"].sum() == 4


def test_classification_samples():
    t = build_transform(AugmentConfig(crop_size=[8, 8], hflip=1.0, rotate90=1.0, color_jitter=0.2), None,
                        train=True, task="classification")
    out = t({"image": torch.rand(3, 12, 10), "label": torch.tensor(4), "meta": {}})
    assert out["image"].shape == (3, 8, 8) and out["label"].item() == 4 and "mask" not in out


def test_transform_pickles_for_worker_processes():
    t = build_transform(AugmentConfig(crop_size=[8, 8], hflip=0.5, rotate_degrees=10, color_jitter=0.1),
                        {"mean": [0.5], "std": [0.5]}, train=True)
    again = pickle.loads(pickle.dumps(t))
    assert again({"image": torch.rand(1, 10, 10), "mask": torch.zeros(10, 10, dtype=torch.long)})["image"].shape == (
        1, 8, 8)
    assert "TorchvisionGeometry" in repr(t) and "Normalize" in repr(t)


def test_config_validation():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AugmentConfig(hflp=0.5)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValidationError, match="less than or equal to 180"):
        AugmentConfig(rotate_degrees=200)
    with pytest.raises(ValidationError, match="crop_size needs 2 .* or 3 .* positive sizes"):
        AugmentConfig(crop_size=[0, 4])
    with pytest.raises(ValidationError, match="0 < low <= high"):
        AugmentConfig(scale_range=(1.5, 0.5))
    with pytest.raises(ValidationError, match="backend is 'torchvision'; set backend: albumentations"):
        AugmentConfig(albumentations=[{"type": "HorizontalFlip"}])
    with pytest.raises(ValidationError, match="same number"):
        NormalizeConfig(mean=[0.5, 0.5], std=[0.5])
    with pytest.raises(ValidationError, match="std values must be > 0"):
        NormalizeConfig(mean=[0.5], std=[0.0])
    with pytest.raises(ConfigError, match=r"crop_size \[8, 8\] has 2 sizes but the data is 3D"):
        build_transform(AugmentConfig(crop_size=[8, 8]), None, train=True, spatial_dims=3)
    for name, field in AugmentConfig.model_fields.items():
        assert field.description, name
    for name, field in NormalizeConfig.model_fields.items():
        assert field.description, name


# -- albumentations (optional extra) ------------------------------------------------------------------


def test_albumentations_backend_keeps_alignment():
    pytest.importorskip("albumentations")
    t = build_transform({"backend": "albumentations", "albumentations": [{"type": "HorizontalFlip", "p": 1.0}]},
                        None, train=True)
    image = torch.rand(3, 8, 8)
    mask = torch.arange(64).reshape(8, 8)
    out = t({"image": image, "mask": mask})
    assert torch.allclose(out["image"], image.flip(-1)) and torch.equal(out["mask"], mask.flip(-1))
    assert out["image"].dtype == torch.float32 and out["mask"].dtype == torch.int64
    # the list runs first, then the generic keys (here a vertical flip and a padded crop)
    both = build_transform({"backend": "albumentations", "vflip": 1.0, "crop_size": [10, 10],
                            "albumentations": [{"type": "OneOf", "transforms": [{"type": "HorizontalFlip", "p": 1}]}]},
                           None, train=True, ignore_index=255)
    out = both({"image": torch.rand(1, 8, 8), "mask": mask})
    assert out["image"].shape == (1, 10, 10) and out["mask"].shape == (10, 10)
    kept = out["mask"][out["mask"] != 255]
    assert kept.numel() == 64 and sorted(kept.tolist()) == list(range(64))
    assert "Albumentations" in repr(both)
    assert pickle.loads(pickle.dumps(both))({"image": torch.rand(1, 8, 8), "mask": mask})["mask"].shape == (10, 10)


def test_albumentations_spec_errors():
    pytest.importorskip("albumentations")
    with pytest.raises(ValidationError, match=r"albumentations\[0\]: 'HorizontalFlp' is not an albumentations "
                                              r"transform; did you mean 'HorizontalFlip'\?"):
        AugmentConfig(backend="albumentations", albumentations=[{"type": "HorizontalFlp"}])
    for bad in ("os.system", "__class__", "albucore", "Compose.__init__"):
        with pytest.raises(ValidationError, match="is not an albumentations transform"):
            AugmentConfig(backend="albumentations", albumentations=[{"type": bad}])
    with pytest.raises(ValidationError, match=r"albumentations\[1\] \(Affine\): .*rotate"):
        AugmentConfig(backend="albumentations", albumentations=[{"type": "HorizontalFlip"},
                                                                {"type": "Affine", "rotate": "lots"}])
    with pytest.raises(ValidationError, match=r"albumentations\[0\] \(HorizontalFlip\): .*'prob' .*not valid"):
        AugmentConfig(backend="albumentations", albumentations=[{"type": "HorizontalFlip", "prob": 0.5}])
    with pytest.raises(ValidationError, match=r"albumentations\[0\]\.transforms\[0\]: 'Nope' is not"):
        AugmentConfig(backend="albumentations", albumentations=[{"type": "OneOf", "transforms": [{"type": "Nope"}]}])
    with pytest.raises(ValidationError, match=r"albumentations\[0\]: expected a mapping with a 'type' string"):
        AugmentConfig(backend="albumentations", albumentations=[{"p": 0.5}])
    with pytest.raises(ConfigError, match="works on 2D images only"):
        build_transform({"backend": "albumentations", "albumentations": [{"type": "HorizontalFlip"}]}, None,
                        train=True, spatial_dims=3)


def test_albumentations_missing_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "albumentations", None)  # import fails as if not installed
    with pytest.raises(ValidationError, match=r"pip install 'attnseg\[albumentations\]'"):
        AugmentConfig(backend="albumentations", albumentations=[{"type": "HorizontalFlip"}])
