"""3D preprocessing and augmentation with MONAI dictionary transforms, declared in the config (``data.volume``).

Two stages, each a ``monai.transforms.Compose`` over keys ``image`` ``[C, X, Y, Z]`` and ``label`` ``[1, X, Y, Z]``:

1. **Preprocessing** (deterministic; every split): ``Orientationd`` (``orientation``) -> ``Spacingd``
   (``spacing``; images bilinear or nearest, labels always nearest) -> ``ScaleIntensityRanged`` or
   ``NormalizeIntensityd`` (``intensity``) -> ``CropForegroundd`` (``crop_foreground``). Datasets that cache
   (``decathlon``: MONAI ``CacheDataset``) run it once per volume, before the cache.
2. **Augmentation** (random; training only, after the cache): ``SpatialPadd`` to the crop size ->
   ``RandCropByPosNegLabeld`` or ``RandSpatialCrop(Samples)d`` (``crop``) -> ``RandFlipd`` per axis
   (``flip_prob``) -> ``RandRotate90d`` (``rotate90``) -> ``RandScaleIntensityd`` (``scale_intensity``) ->
   ``RandShiftIntensityd`` (``shift_intensity``). Then ``data.normalize`` (mean/std) when it is set, in every split.

Axes: the three spatial axes are the voxel axes of the file (after ``orientation: RAS``: towards Right,
Anterior, Superior), i.e. NIfTI's ``[X, Y, Z]``; attnseg's ``[D, H, W]`` only means "three spatial axes" and no
transpose happens, so ``meta["affine"]`` maps voxel indices of the sample to world coordinates. Volumes
without an affine (``synthetic3d``) are taken as 1 mm voxels in RAS, so ``orientation`` and ``spacing`` have
nothing to change there unless ``spacing`` is not 1 mm.

Samples leave both stages as attnseg sample dicts of **plain** tensors (``image`` float32 ``[C, *spatial]``,
``mask`` int64 ``[*spatial]``, ``meta`` a plain dict): MONAI's ``MetaTensor`` exists only inside the stages
(its per-op bookkeeping is expensive in collation and in the model), and MONAI's global ``set_track_meta``
switch is never touched. After preprocessing, ``meta`` holds ``affine`` (4x4 float64, of the preprocessed
sample) and ``spacing`` (mm per axis) besides what the dataset put there. Between the stages the mask is kept
in the smallest integer type that holds it (uint8 for up to 255), to keep caches small.

With ``crop.num_samples`` above 1 the augmentation returns a **list** of that many sample dicts for one
volume; :func:`attnseg.datasets.collate` flattens such lists, so a training batch holds ``batch_size *
num_samples`` crops.

Seeding: MONAI's random transforms draw from their own ``numpy.random.RandomState``. Before each sample the
augmentation re-seeds all of them from one draw of torch's global generator. They therefore follow the same
seeding as every other attnseg transform: ``seed_everything`` at start, torch's per-worker seeds in data-loader
workers (different crops in each worker), and the torch RNG state that training checkpoints save and restore,
so with ``num_workers: 0`` a resumed run draws the crops an uninterrupted one would (tested). Data-loader
workers are seeded by torch when they start (the runner keeps them for the whole run), so with workers a
resumed run is reproducible but draws other crops than the uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from attnseg.datasets.transforms import Normalize, NormalizeConfig

__all__ = [
    "VolumeConfig",
    "SpacingConfig",
    "ScaleIntensityRangeConfig",
    "NormalizeIntensityConfig",
    "CropForegroundConfig",
    "PosNegCropConfig",
    "RandomCropConfig",
    "Rotate90Config",
    "ScaleIntensityConfig",
    "ShiftIntensityConfig",
    "VolumeTransform",
    "build_volume_transform",
    "to_monai",
    "to_sample",
]

Sample = dict[str, Any]
_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


# -- config schemas -----------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _check_size(name: str, values: tuple[int, ...], low: int) -> tuple[int, ...]:
    if any(v < low for v in values):
        raise ValueError(f"{name} values must be >= {low}, got {list(values)}")
    return values


class SpacingConfig(_Section):
    """``Spacingd``: resample to ``pixdim`` mm per axis (labels always with nearest neighbours)."""

    pixdim: tuple[float, float, float] = Field(description="target voxel size in mm per axis, each in (0, 100]")
    image_mode: Literal["bilinear", "nearest"] = Field("bilinear", description="image interpolation")

    @field_validator("pixdim")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0 < p <= 100 for p in v):
            raise ValueError(f"pixdim values must be in (0, 100] mm, got {list(v)}")
        return v


class ScaleIntensityRangeConfig(_Section):
    """``ScaleIntensityRanged``: map ``[a_min, a_max]`` linearly to ``[b_min, b_max]`` (a CT window)."""

    type: Literal["scale_range"] = Field(description="scale_range: a fixed intensity window")
    a_min: float = Field(description="input value mapped to b_min (e.g. -175 HU)")
    a_max: float = Field(description="input value mapped to b_max (e.g. 250 HU); > a_min")
    b_min: float = Field(0.0, description="output value of a_min")
    b_max: float = Field(1.0, description="output value of a_max; > b_min")
    clip: bool = Field(True, description="clip the output to [b_min, b_max]")

    @model_validator(mode="after")
    def _ordered(self) -> ScaleIntensityRangeConfig:
        if not self.a_min < self.a_max:
            raise ValueError(f"a_min must be < a_max, got a_min={self.a_min}, a_max={self.a_max}")
        if not self.b_min < self.b_max:
            raise ValueError(f"b_min must be < b_max, got b_min={self.b_min}, b_max={self.b_max}")
        return self


class NormalizeIntensityConfig(_Section):
    """``NormalizeIntensityd``: subtract the mean and divide by the standard deviation of each volume (MRI)."""

    type: Literal["normalize"] = Field(description="normalize: per-volume zero mean, unit variance")
    nonzero: bool = Field(False, description="statistics over (and changes to) non-zero voxels only")
    channel_wise: bool = Field(False, description="statistics per channel (modality)")


class CropForegroundConfig(_Section):
    """``CropForegroundd``: crop image and label to the bounding box of the foreground of ``source_key``."""

    source_key: Literal["image", "label"] = Field("image", description="volume whose foreground sets the box")
    threshold: float = Field(0.0, description="foreground: voxels of source_key > threshold (any channel)")
    margin: int | tuple[int, int, int] = Field(0, description="voxels added around the box per side, >= 0")
    k_divisible: int | tuple[int, int, int] = Field(1, description="box size rounded up to a multiple of this, >= 1")

    @field_validator("margin", "k_divisible")
    @classmethod
    def _sizes(cls, v: int | tuple[int, int, int], info: Any) -> int | tuple[int, int, int]:
        _check_size(info.field_name, (v,) if isinstance(v, int) else v, 0 if info.field_name == "margin" else 1)
        return v


class PosNegCropConfig(_Section):
    """``RandCropByPosNegLabeld``: crops centred on foreground (``pos``) or background (``neg``) voxels."""

    type: Literal["pos_neg"] = Field(description="pos_neg: label-balanced random crops")
    spatial_size: tuple[int, int, int] = Field(description="crop size per axis (volumes are padded to it first)")
    pos: float = Field(1.0, ge=0, description="weight of foreground-centred crops")
    neg: float = Field(1.0, ge=0, description="weight of background-centred crops")
    num_samples: int = Field(1, ge=1, le=64, description="crops per volume (batch = batch_size x num_samples)")
    image_threshold: float | None = Field(
        0.0, description="background centres only where the image is > this (null: anywhere)")

    @field_validator("spatial_size")
    @classmethod
    def _size(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        return _check_size("spatial_size", v, 1)

    @model_validator(mode="after")
    def _weights(self) -> PosNegCropConfig:
        if self.pos + self.neg <= 0:
            raise ValueError(f"pos + neg must be > 0, got pos={self.pos}, neg={self.neg}")
        return self


class RandomCropConfig(_Section):
    """``RandSpatialCropd`` / ``RandSpatialCropSamplesd``: crops at uniformly random positions."""

    type: Literal["random"] = Field(description="random: uniformly placed crops")
    spatial_size: tuple[int, int, int] = Field(description="crop size per axis (volumes are padded to it first)")
    num_samples: int = Field(1, ge=1, le=64, description="crops per volume (batch = batch_size x num_samples)")

    @field_validator("spatial_size")
    @classmethod
    def _size(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        return _check_size("spatial_size", v, 1)


class Rotate90Config(_Section):
    """``RandRotate90d``: rotation by k x 90 degrees, k uniform in 1..max_k, in the plane of ``spatial_axes``."""

    prob: float = Field(0.1, ge=0, le=1, description="probability of a rotation")
    max_k: int = Field(3, ge=1, le=3, description="largest number of quarter turns")
    spatial_axes: tuple[int, int] = Field((0, 1), description="the two spatial axes (0..2) of the rotation plane")

    @field_validator("spatial_axes")
    @classmethod
    def _axes(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] == v[1] or not all(0 <= a <= 2 for a in v):
            raise ValueError(f"spatial_axes must be two different axes in 0..2, got {list(v)}")
        return v


class ScaleIntensityConfig(_Section):
    """``RandScaleIntensityd``: ``image * (1 + f)``, f uniform in ``[-factors, factors]``."""

    factors: float = Field(0.1, ge=0, le=10, description="largest relative scale change")
    prob: float = Field(0.1, ge=0, le=1, description="probability per sample")


class ShiftIntensityConfig(_Section):
    """``RandShiftIntensityd``: ``image + o``, o uniform in ``[-offsets, offsets]``."""

    offsets: float = Field(0.1, ge=0, description="largest shift, in image units (after intensity scaling)")
    prob: float = Field(0.1, ge=0, le=1, description="probability per sample")


class VolumeConfig(_Section):
    """3D preprocessing and augmentation with MONAI (``data.volume``); see :mod:`attnseg.datasets.volume_transforms`.

    Every op is off when its key is null (``flip_prob`` 0). Example (the BTCV CT recipe)::

        volume:
          orientation: RAS
          spacing: {pixdim: [1.5, 1.5, 2.0]}
          intensity: {type: scale_range, a_min: -175, a_max: 250, b_min: 0.0, b_max: 1.0, clip: true}
          crop_foreground: {source_key: image}
          crop: {type: pos_neg, spatial_size: [96, 96, 96], pos: 1, neg: 1, num_samples: 4}
          flip_prob: [0.2, 0.2, 0.2]
          rotate90: {prob: 0.2, max_k: 3}
          scale_intensity: {factors: 0.1, prob: 0.1}
          shift_intensity: {offsets: 0.1, prob: 0.1}
    """

    orientation: str | None = Field("RAS", description="axis codes to reorient to (one of L/R, A/P, S/I each); "
                                                        "null keeps the file's voxel order")
    spacing: SpacingConfig | None = Field(None, description="resample to a voxel size (null: keep the file's)")
    intensity: ScaleIntensityRangeConfig | NormalizeIntensityConfig | None = Field(
        None, discriminator="type", description="intensity scaling, by type: scale_range or normalize")
    crop_foreground: CropForegroundConfig | None = Field(None, description="crop to the foreground's bounding box")
    crop: PosNegCropConfig | RandomCropConfig | None = Field(
        None, discriminator="type", description="training crops, by type: pos_neg or random (null: whole volumes)")
    flip_prob: tuple[float, float, float] = Field((0.0, 0.0, 0.0), description="probability of a flip along each "
                                                                                "spatial axis, each in 0..1")
    rotate90: Rotate90Config | None = Field(None, description="random quarter turns (training)")
    scale_intensity: ScaleIntensityConfig | None = Field(None, description="random intensity scaling (training)")
    shift_intensity: ShiftIntensityConfig | None = Field(None, description="random intensity shift (training)")

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str | None) -> str | None:
        if v is None:
            return v
        codes = v.upper()
        if len(codes) != 3 or any(sum(c in pair for c in codes) != 1 for pair in _AXIS_PAIRS):
            raise ValueError(f"orientation must be three axis codes with one of L/R, A/P and S/I each (e.g. RAS, "
                             f"LPS), got {v!r}")
        return codes

    @field_validator("flip_prob")
    @classmethod
    def _probs(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0 <= p <= 1 for p in v):
            raise ValueError(f"flip_prob values must be in 0..1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _rotation_keeps_crop_shape(self) -> VolumeConfig:
        if self.rotate90 is not None and self.rotate90.prob > 0 and self.crop is not None:
            a, b = self.rotate90.spatial_axes
            size = self.crop.spatial_size
            if size[a] != size[b]:
                raise ValueError(f"rotate90.spatial_axes {list(self.rotate90.spatial_axes)} rotate a plane of the "
                                 f"crop {list(size)} whose sizes differ ({size[a]} != {size[b]}): crops of one batch "
                                 f"would differ in shape; use a crop that is square in that plane or other axes")
        return self


# -- sample dict <-> MONAI dict ------------------------------------------------------------------------


def _plain(x: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` (MetaTensor -> its data, without a copy; numpy -> tensor)."""
    as_tensor = getattr(x, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else torch.as_tensor(x)


def _compact_labels(label: torch.Tensor) -> torch.Tensor:
    """Class indices in the smallest integer type holding them (uint8 for 0..255, else int32)."""
    if label.numel() and label.min() >= 0 and label.max() <= 255:
        return label.to(torch.uint8)
    return label.to(torch.int32)


def to_monai(sample: Sample, *, meta_tensors: bool) -> dict[str, Any]:
    """An attnseg sample (``image`` ``[C, *spatial]``, ``mask`` ``[*spatial]``, ``meta``) as a MONAI dict
    (``image``, ``label`` ``[1, *spatial]``, ``meta``); with ``meta_tensors`` both become ``MetaTensor``s carrying
    ``meta["affine"]`` (identity when absent: 1 mm voxels in RAS)."""
    out: dict[str, Any] = {"image": sample["image"], "meta": dict(sample.get("meta") or {})}
    if sample.get("mask") is not None:
        out["label"] = sample["mask"][None]  # [*spatial] -> [1, *spatial]
    if meta_tensors:
        from monai.data import MetaTensor

        affine = torch.as_tensor(np.asarray(out["meta"].get("affine", np.eye(4)), dtype=np.float64))
        for key in ("image", "label"):
            if key in out and not isinstance(out[key], MetaTensor):
                out[key] = MetaTensor(out[key], affine=affine.clone())
    return out


def to_sample(data: dict[str, Any], *, compact: bool = False) -> Sample:
    """A MONAI dict (``image``, optional ``label`` ``[1, *spatial]``, ``meta``) as an attnseg sample of plain
    tensors: ``image`` float32 ``[C, *spatial]``, ``mask`` ``[*spatial]`` (int64, or with ``compact`` the smallest
    integer type that holds it). When the image is a ``MetaTensor``, ``meta`` gains its ``affine`` and
    ``spacing``."""
    image = data["image"]
    meta = dict(data.get("meta") or {})
    affine = getattr(image, "affine", None)
    if affine is not None:
        affine = np.asarray(_plain(affine).detach().cpu(), dtype=np.float64)
        meta["affine"] = affine
        meta["spacing"] = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    out: Sample = {"image": _plain(image).to(torch.float32).contiguous()}
    if data.get("label") is not None:
        label = _plain(data["label"])[0]  # [1, *spatial] -> [*spatial]
        if label.is_floating_point():
            label = label.round()
        out["mask"] = (_compact_labels(label) if compact else label.to(torch.int64)).contiguous()
    out["meta"] = meta
    return out


# -- the transform ------------------------------------------------------------------------------------


class _Above:
    """``x > threshold``: a picklable foreground selector for ``CropForegroundd``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold

    def __repr__(self) -> str:
        return f"_Above({self.threshold})"


def _preprocessing(cfg: VolumeConfig) -> list[Any]:
    import monai.transforms as mt

    keys = ["image", "label"]
    ops: list[Any] = []
    if cfg.orientation is not None:
        ops.append(mt.Orientationd(keys, axcodes=cfg.orientation, labels=None, allow_missing_keys=True))
    if cfg.spacing is not None:
        ops.append(mt.Spacingd(keys, pixdim=cfg.spacing.pixdim, mode=(cfg.spacing.image_mode, "nearest"),
                               dtype=np.float32, allow_missing_keys=True))
    if isinstance(cfg.intensity, ScaleIntensityRangeConfig):
        i = cfg.intensity
        ops.append(mt.ScaleIntensityRanged("image", a_min=i.a_min, a_max=i.a_max, b_min=i.b_min, b_max=i.b_max,
                                           clip=i.clip))
    elif isinstance(cfg.intensity, NormalizeIntensityConfig):
        ops.append(mt.NormalizeIntensityd("image", nonzero=cfg.intensity.nonzero,
                                          channel_wise=cfg.intensity.channel_wise))
    if cfg.crop_foreground is not None:
        c = cfg.crop_foreground
        # allow_smaller=True: the box may end at the volume's edge (MONAI's old default; the BTCV recipe sets it).
        ops.append(mt.CropForegroundd(keys, source_key=c.source_key, select_fn=_Above(c.threshold), margin=c.margin,
                                      k_divisible=c.k_divisible, allow_smaller=True, start_coord_key=None,
                                      end_coord_key=None, allow_missing_keys=True))
    return ops


def _augmentation(cfg: VolumeConfig, fill_mask: int) -> list[Any]:
    import monai.transforms as mt

    keys = ["image", "label"]
    ops: list[Any] = []
    crop = cfg.crop
    if crop is not None:
        size = list(crop.spatial_size)
        ops += [mt.SpatialPadd("image", spatial_size=size, value=0.0),
                mt.SpatialPadd("label", spatial_size=size, value=fill_mask)]
        if isinstance(crop, PosNegCropConfig):
            ops.append(mt.RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=size, pos=crop.pos, neg=crop.neg, num_samples=crop.num_samples,
                image_key="image" if crop.image_threshold is not None else None,
                image_threshold=crop.image_threshold or 0.0))
        elif crop.num_samples > 1:
            ops.append(mt.RandSpatialCropSamplesd(keys, roi_size=size, num_samples=crop.num_samples, random_size=False))
        else:
            ops.append(mt.RandSpatialCropd(keys, roi_size=size, random_size=False))
    for axis, p in enumerate(cfg.flip_prob):
        if p > 0:
            ops.append(mt.RandFlipd(keys, prob=p, spatial_axis=axis))
    if cfg.rotate90 is not None and cfg.rotate90.prob > 0:
        r = cfg.rotate90
        ops.append(mt.RandRotate90d(keys, prob=r.prob, max_k=r.max_k, spatial_axes=r.spatial_axes))
    if cfg.scale_intensity is not None and cfg.scale_intensity.prob > 0:
        ops.append(mt.RandScaleIntensityd("image", factors=cfg.scale_intensity.factors,
                                          prob=cfg.scale_intensity.prob))
    if cfg.shift_intensity is not None and cfg.shift_intensity.prob > 0:
        ops.append(mt.RandShiftIntensityd("image", offsets=cfg.shift_intensity.offsets,
                                          prob=cfg.shift_intensity.prob))
    return ops


class VolumeTransform:
    """The two stages of ``data.volume`` (module docstring) over attnseg sample dicts; picklable for workers.

    - ``prepare(data)``: preprocessing of a MONAI dict of ``MetaTensor``s (``image`` ``[C, X, Y, Z]``, ``label``
      ``[1, X, Y, Z]`` optional, ``meta``) into a sample with a compact mask; what a caching dataset caches.
    - ``augment(sample)``: training augmentation (nothing in evaluation), then ``normalize``; returns a sample,
      or a list of ``crop.num_samples`` samples. ``mask`` leaves as int64.
    - ``__call__(sample)``: both, for datasets that yield tensors (``synthetic3d``).

    Args:
        cfg: the ``data.volume`` section (a dict is validated first).
        train: build the augmentation stage (True) or only preprocess (False).
        normalize: mean/std applied last (``data.normalize``), or None.
        ignore_index: mask value of padding added before cropping (default 0, background).

    Example::

        >>> t = VolumeTransform({"orientation": None, "crop": {"type": "random", "spatial_size": [8, 8, 8],
        ...                      "num_samples": 2}, "flip_prob": [0.5, 0.5, 0.5]}, train=True)
        >>> crops = t({"image": torch.rand(1, 12, 10, 6), "mask": torch.zeros(12, 10, 6, dtype=torch.long),
        ...            "meta": {"id": "a"}})
        >>> len(crops), crops[0]["image"].shape, crops[0]["mask"].dtype
        (2, torch.Size([1, 8, 8, 8]), torch.int64)
    """

    def __init__(self, cfg: VolumeConfig | dict, *, train: bool, normalize: NormalizeConfig | dict | None = None,
                 ignore_index: int | None = None) -> None:
        import monai.transforms as mt

        self.cfg = cfg if isinstance(cfg, VolumeConfig) else VolumeConfig.model_validate(cfg)
        if isinstance(normalize, dict):
            normalize = NormalizeConfig.model_validate(normalize)
        self.train = train
        self.normalize = Normalize(normalize.mean, normalize.std) if normalize is not None else None
        pre = _preprocessing(self.cfg)
        aug = _augmentation(self.cfg, 0 if ignore_index is None else ignore_index) if train else []
        self.preprocess = mt.Compose(pre) if pre else None
        self.random = mt.Compose(aug) if aug else None

    def prepare(self, data: dict[str, Any]) -> Sample:
        """Preprocess a MONAI dict of ``MetaTensor``s into a sample (mask in its compact type)."""
        if self.preprocess is not None:
            data = self.preprocess(data)
        return to_sample(data, compact=True)

    def augment(self, sample: Sample) -> Sample | list[Sample]:
        """Random training ops (re-seeded from torch's generator), then ``normalize``; one sample or a list."""
        if self.random is None:
            outs = [to_sample(to_monai(sample, meta_tensors=False))]
        else:
            self.random.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
            # MetaTensors in: crops, flips and turns then update meta["affine"] along with the voxels.
            result = self.random(to_monai(sample, meta_tensors=True))
            outs = [to_sample(d) for d in (result if isinstance(result, list) else [result])]
        if self.normalize is not None:
            for out in outs:
                out["image"] = self.normalize(out["image"])
        return outs[0] if len(outs) == 1 else outs

    def __call__(self, sample: Sample) -> Sample | list[Sample]:
        if self.preprocess is not None:
            sample = self.prepare(to_monai(sample, meta_tensors=True))
        return self.augment(sample)

    def __repr__(self) -> str:
        return f"VolumeTransform(train={self.train}, preprocess={self.preprocess}, random={self.random})"


def build_volume_transform(cfg: VolumeConfig | dict, normalize: NormalizeConfig | dict | None, *, train: bool,
                           ignore_index: int | None = None) -> VolumeTransform:
    """The :class:`VolumeTransform` of ``data.volume`` for a training (``train``) or evaluation split."""
    return VolumeTransform(cfg, train=train, normalize=normalize, ignore_index=ignore_index)
