"""data.volume: MONAI dictionary transforms on attnseg sample dicts (values, shapes, seeding, config errors)."""

import pickle

import numpy as np
import pytest
import torch

from attnseg.config import validate_config
from attnseg.datasets import collate
from attnseg.datasets.volume_transforms import VolumeConfig, VolumeTransform
from attnseg.errors import ConfigError


def _sample(shape=(12, 14, 10), channels=1, fill=0.5):
    image = torch.full((channels, *shape), fill)
    return {"image": image, "mask": torch.zeros(shape, dtype=torch.long), "meta": {"id": "case"}}


def _marked(shape=(12, 14, 10), pos=(2, 3, 4)):
    s = _sample(shape, fill=0.0)
    s["image"][(0, *pos)] = 1.0
    s["mask"][pos] = 2
    return s


def _where(t):
    return tuple(int(i) for i in (t != 0).nonzero()[0])


def test_outputs_are_plain_tensors_with_the_sample_contract():
    t = VolumeTransform({"crop": {"type": "random", "spatial_size": [8, 8, 8]}, "flip_prob": [0.5, 0.5, 0.5]},
                        train=True)
    out = t(_sample())
    assert type(out["image"]) is torch.Tensor and type(out["mask"]) is torch.Tensor  # not MetaTensor
    assert out["image"].dtype == torch.float32 and out["mask"].dtype == torch.int64
    assert out["image"].shape == (1, 8, 8, 8) and out["mask"].shape == (8, 8, 8)
    assert out["meta"]["id"] == "case" and out["meta"]["affine"].shape == (4, 4)


def test_scale_intensity_range_maps_the_window_and_clips():
    values = torch.tensor([-1000.0, -175.0, 37.5, 250.0, 1000.0]).view(1, 5, 1, 1)
    sample = {"image": values, "mask": torch.zeros(5, 1, 1, dtype=torch.long), "meta": {}}
    window = {"type": "scale_range", "a_min": -175, "a_max": 250, "b_min": 0.0, "b_max": 1.0}
    out = VolumeTransform({"intensity": {**window, "clip": True}}, train=False)(sample)
    assert out["image"].flatten().tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    unclipped = VolumeTransform({"intensity": {**window, "clip": False}}, train=False)(sample)
    assert unclipped["image"].flatten().tolist() == pytest.approx([-825 / 425, 0.0, 0.5, 1.0, 1175 / 425])


def test_normalize_intensity_nonzero_channel_wise():
    image = torch.zeros(2, 4, 1, 1)
    image[0, :2] = torch.tensor([1.0, 3.0]).view(2, 1, 1)  # channel 0: non-zero mean 2, std 1
    image[1] = torch.tensor([10.0, 20.0, 30.0, 40.0]).view(4, 1, 1)
    sample = {"image": image, "mask": torch.zeros(4, 1, 1, dtype=torch.long), "meta": {}}
    out = VolumeTransform({"intensity": {"type": "normalize", "nonzero": True, "channel_wise": True}},
                          train=False)(sample)["image"]
    assert out[0].flatten().tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])  # zeros stay zero
    assert out[1].mean().item() == pytest.approx(0.0, abs=1e-6) and out[1].std(unbiased=False).item() == pytest.approx(1.0)


def test_crop_foreground_margin_and_k_divisible():
    s = _sample((20, 20, 20), fill=0.0)
    s["image"][0, 5:9, 6:8, 10:11] = 1.0  # box 4 x 2 x 1
    s["mask"][5:9, 6:8, 10:11] = 1
    out = VolumeTransform({"crop_foreground": {"margin": 1}}, train=False)(s)
    assert out["image"].shape == (1, 6, 4, 3) and out["mask"].sum() == 8
    out = VolumeTransform({"crop_foreground": {"k_divisible": 4}}, train=False)(s)
    assert out["image"].shape == (1, 4, 4, 4) and out["mask"].sum() == 8
    # the world position of the box moves into the affine: voxel (0, 0, 0) of the crop is voxel (5, 6, 10)
    margin = VolumeTransform({"crop_foreground": {"margin": 1}}, train=False)(s)
    assert margin["meta"]["affine"][:3, 3].tolist() == pytest.approx([4.0, 5.0, 9.0])


def test_pos_neg_crops_count_size_and_foreground_centres():
    s = _sample((30, 30, 30), fill=1.0)
    s["mask"][20:24, 3:7, 10:14] = 1
    t = VolumeTransform({"orientation": None, "crop": {"type": "pos_neg", "spatial_size": [8, 8, 8], "pos": 1,
                                                       "neg": 0, "num_samples": 3}}, train=True)
    crops = t(s)
    assert isinstance(crops, list) and len(crops) == 3
    for c in crops:
        assert c["image"].shape == (1, 8, 8, 8) and c["mask"].shape == (8, 8, 8)
        assert c["mask"][4, 4, 4] == 1  # pos only: every crop is centred on a foreground voxel
        assert c["meta"]["id"] == "case"
    batch = collate([crops, t(s)])  # two volumes x three crops, flattened into one batch
    assert batch["image"].shape == (6, 1, 8, 8, 8) and batch["mask"].shape == (6, 8, 8, 8)
    assert len(batch["meta"]) == 6


def test_volumes_smaller_than_the_crop_are_padded_with_ignore_index():
    s = _sample((5, 14, 10), fill=1.0)
    t = VolumeTransform({"crop": {"type": "random", "spatial_size": [8, 8, 8]}}, train=True, ignore_index=255)
    out = t(s)
    assert out["image"].shape == (1, 8, 8, 8)
    # depth 5 -> 8: padded slices have image 0 and mask 255, the 5 real ones image 1 and mask 0
    assert (out["mask"] == 255).sum() == 3 * 64 and ((out["mask"] == 255) == (out["image"][0] == 0)).all()


def test_flips_and_rot90_move_image_and_mask_together():
    flip = VolumeTransform({"orientation": None, "flip_prob": [1.0, 0.0, 1.0]}, train=True)
    out = flip(_marked())
    assert _where(out["image"][0]) == _where(out["mask"]) == (12 - 1 - 2, 3, 10 - 1 - 4)
    assert out["mask"][_where(out["mask"])] == 2
    rot = VolumeTransform({"orientation": None, "rotate90": {"prob": 1.0, "max_k": 3, "spatial_axes": [0, 1]}},
                          train=True)
    seen = set()
    for _ in range(30):
        out = rot(_marked((12, 12, 10)))
        assert _where(out["image"][0]) == _where(out["mask"])
        seen.add(_where(out["mask"]))
    # k = 1, 2, 3 quarter turns in the (0, 1) plane; the last axis never moves
    assert len(seen) == 3 and all(p[2] == 4 for p in seen)


def test_scale_and_shift_intensity_stay_in_their_ranges():
    t = VolumeTransform({"orientation": None, "scale_intensity": {"factors": 0.1, "prob": 1.0},
                         "shift_intensity": {"offsets": 0.2, "prob": 1.0}}, train=True)
    values = set()
    for _ in range(20):
        out = t(_sample(fill=1.0))["image"]
        assert out.unique().numel() == 1  # one factor and one offset per volume
        v = out.flatten()[0].item()
        assert 0.9 - 0.2 - 1e-6 <= v <= 1.1 + 0.2 + 1e-6
        values.add(round(v, 6))
    assert len(values) > 10


def test_random_ops_follow_torch_seeding():
    t = VolumeTransform({"orientation": None, "crop": {"type": "random", "spatial_size": [6, 6, 6],
                                                       "num_samples": 2}, "flip_prob": [0.5, 0.5, 0.5],
                         "scale_intensity": {"prob": 0.5}}, train=True)
    s = _sample((12, 14, 10))
    s["image"] = torch.rand(1, 12, 14, 10)

    def draw(seed):
        torch.manual_seed(seed)
        return torch.cat([c["image"] for _ in range(3) for c in t(s)])

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    # a pickled copy (as a worker process gets) draws the same for the same torch seed
    copy = pickle.loads(pickle.dumps(t))
    torch.manual_seed(3)
    a = copy(s)[0]["image"]
    torch.manual_seed(3)
    assert torch.equal(a, t(s)[0]["image"])


def test_data_loader_workers_draw_different_crops():
    class Same(torch.utils.data.Dataset):
        def __init__(self, transform):
            self.transform = transform
            self.image = torch.rand(1, 16, 16, 16)

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.transform({"image": self.image, "mask": torch.zeros(16, 16, 16, dtype=torch.long),
                                   "meta": {"id": str(i)}})

    t = VolumeTransform({"orientation": None, "crop": {"type": "random", "spatial_size": [4, 4, 4]}}, train=True)
    loader = torch.utils.data.DataLoader(Same(t), batch_size=1, num_workers=2, collate_fn=collate)
    crops = [b["image"] for b in loader]
    assert not torch.equal(crops[0], crops[1])  # items 0 and 1 come from different workers


def _cfg(volume, **data):
    return {"model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr"}, "num_classes": 3,
                      "in_chans": 1, "spatial_dims": data.pop("spatial_dims", 3)},
            "data": {"dataset": {"name": "synthetic3d", "num_classes": 3, "image_size": [16, 16, 16]},
                     "volume": volume, **data}}


@pytest.mark.parametrize("volume,message", [
    ({"flip": [0.5, 0.5, 0.5]}, "data.volume.flip: unknown key; did you mean 'flip_prob'"),
    ({"orientation": "RAP"}, "orientation must be three axis codes"),
    ({"flip_prob": [0.5, 1.5, 0.0]}, "flip_prob values must be in 0..1"),
    ({"spacing": {"pixdim": [1.5, 0, 2]}}, "pixdim values must be in \\(0, 100\\]"),
    ({"intensity": {"type": "window", "a_min": 0, "a_max": 1}}, "data.volume.intensity"),
    ({"intensity": {"type": "scale_range", "a_min": 250, "a_max": -175}}, "a_min must be < a_max"),
    ({"crop": {"type": "pos_neg", "spatial_size": [96, 96, 0]}}, "spatial_size values must be >= 1"),
    ({"crop": {"type": "pos_neg", "spatial_size": [8, 8, 8], "num_samples": 0}}, "num_samples"),
    ({"crop": {"type": "pos_neg", "spatial_size": [8, 8, 8], "pos": 0, "neg": 0}}, "pos \\+ neg must be > 0"),
    ({"crop": {"type": "random", "spatial_size": [8, 16, 8]}, "rotate90": {"prob": 0.5}},
     "rotate90.spatial_axes \\[0, 1\\] rotate a plane of the crop \\[8, 16, 8\\]"),
    ({"rotate90": {"prob": 0.5, "spatial_axes": [1, 1]}}, "spatial_axes must be two different axes"),
    ({"scale_intensity": {"factors": 0.1, "prob": 2}}, "data.volume.scale_intensity.prob"),
])
def test_config_errors_name_the_key(volume, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg(volume))


def test_volume_needs_3d_and_excludes_augment():
    with pytest.raises(ConfigError, match="data.volume: MONAI volume transforms need 3D data"):
        validate_config(_cfg({}, spatial_dims=2))
    with pytest.raises(ConfigError, match="data.augment and data.volume are both set"):
        validate_config(_cfg({}, augment={"hflip": 0.5}))
    cfg = VolumeConfig.model_validate({"orientation": "lps"})
    assert cfg.orientation == "LPS" and cfg.crop is None and cfg.flip_prob == (0.0, 0.0, 0.0)


def test_synthetic3d_with_the_volume_section_through_the_runner():
    from attnseg.engine.runner import build_dataloader, build_dataset

    cfg = validate_config({
        **_cfg({"orientation": None, "crop": {"type": "random", "spatial_size": [8, 8, 8], "num_samples": 2},
                "flip_prob": [0.5, 0.5, 0.5], "rotate90": {"prob": 0.5}, "scale_intensity": {"prob": 0.5},
                "shift_intensity": {"prob": 0.5}}, batch_size=2),
        "evaluation": {"sliding_window": True},
    })
    cfg.data.dataset.__pydantic_extra__.update(num_train=4, num_val=2)
    batch = next(iter(build_dataloader(cfg, build_dataset(cfg, "train"), "train")))
    assert batch["image"].shape == (4, 1, 8, 8, 8) and batch["mask"].shape == (4, 8, 8, 8)
    assert batch["mask"].dtype == torch.int64 and np.isin(batch["mask"].unique().numpy(), [0, 1, 2]).all()
    val = next(iter(build_dataloader(cfg, build_dataset(cfg, "val"), "val")))
    assert val["image"].shape == (2, 1, 16, 16, 16)  # whole volumes in evaluation
    assert cfg.data.training_crop == [8, 8, 8]  # the sliding window's default roi


def test_synthetic3d_volume_base_config_gives_flattened_crop_batches():
    from pathlib import Path

    from attnseg.config import apply_overrides, deep_merge, load_yaml_with_bases
    from attnseg.engine.runner import build_dataloader, build_dataset

    base = Path(__file__).resolve().parents[2] / "configs" / "_base_" / "datasets" / "synthetic3d_volume.yaml"
    data = deep_merge(load_yaml_with_bases(base), {"model": {"backbone": {"name": "test_mambaout"},
                                                             "head": {"name": "unetr"}}})
    cfg = validate_config(apply_overrides(data, ["data.dataset.num_train=2", "data.dataset.num_val=1"]))
    assert cfg.data.augment is None and cfg.data.training_crop == [32, 32, 32] and cfg.evaluation.sliding_window
    batch = next(iter(build_dataloader(cfg, build_dataset(cfg, "train"), "train")))
    assert batch["image"].shape == (4, 1, 32, 32, 32)  # batch_size 2 x num_samples 2


def test_docstring_example_runs():
    import doctest

    import attnseg.datasets.volume_transforms as module

    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
