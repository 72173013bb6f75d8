"""Training augmentation and normalisation, declared in the config (``data.augment``, ``data.normalize``) and
applied to sample dicts.

A transform takes and returns a sample dict: ``image`` ``[C, *spatial]`` float (0..1 before normalisation),
``mask`` ``[*spatial]`` int64 (segmentation) or ``label`` (classification, passed through), ``meta`` (passed
through). Every geometric op moves image and mask together; masks are resampled with nearest neighbours, so
labels stay labels, and padded or rotated-in mask pixels get ``ignore_index`` when one is given (else 0).

Order of the training ops: [albumentations list] -> rotate/scale -> crop (padding when smaller) -> flips ->
rot90 -> brightness/contrast -> Gaussian noise -> normalise. Evaluation transforms only normalise.

Backends:

- 2D, ``backend: torchvision`` (default): ``torchvision.transforms.v2`` on ``tv_tensors.Image`` /
  ``tv_tensors.Mask``; rot90 and the intensity ops are attnseg's own (they work for any channel count).
- 2D, ``backend: albumentations``: the ``albumentations`` list, e.g. ``[{type: HorizontalFlip, p: 0.5}]``,
  runs first on numpy ``[H, W, C]`` float32 / ``[H, W]`` int32 arrays, then the generic keys as above. Types
  are looked up only as attributes of the ``albumentations`` module (nothing is imported by path);
  ``OneOf``/``SomeOf``/``Sequential`` take a nested ``transforms`` list. Needs the ``albumentations`` extra
  (pinned 2.0.8, the last MIT release; AlbumentationsX installs under the same name with an AGPL licence).
- 3D: plain torch. Flips, rot90 and ``rotate_degrees`` act in the H-W plane (``hflip`` flips W, ``vflip``
  flips H; the depth axis is never flipped or rotated); ``scale_range`` zooms all three axes.

``rotate90`` on non-square images (H != W) only rotates by 180 degrees, so shapes stay batchable.
``scale_range`` zooms about the centre and keeps the image size (values < 1 zoom out and pad).
Random draws use torch's global generator (seeded per data-loader worker by torch); the albumentations
backend uses albumentations' own generators.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from attnseg.errors import ConfigError
from attnseg.registry import suggest

__all__ = ["AugmentConfig", "NormalizeConfig", "SampleTransform", "Normalize", "build_transform"]

Sample = dict[str, Any]
Op = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]

_ALBUMENTATIONS_VERSION = "2.0.8"


# -- config schemas -----------------------------------------------------------------------------------


def _import_albumentations() -> Any:
    try:
        import albumentations as A
    except ImportError:
        raise ValueError("the albumentations backend needs the optional extra: "
                         f"pip install 'attnseg[albumentations]' (albumentations=={_ALBUMENTATIONS_VERSION})") from None
    version = getattr(A, "__version__", "?")
    if version != _ALBUMENTATIONS_VERSION:
        warnings.warn(f"albumentations {version} is installed; attnseg is tested with {_ALBUMENTATIONS_VERSION} "
                      "(versions above 2.0.8 are AlbumentationsX, AGPL-licensed)", stacklevel=3)
    return A


def _build_albumentation(A: Any, spec: Any, where: str) -> Any:
    """One albumentations transform from ``{type: Name, **params}``; nested ``transforms`` for compositions."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ValueError(f"{where}: expected a mapping with a 'type' string, e.g. {{type: HorizontalFlip, p: 0.5}}, "
                         f"got {spec!r}")
    name = spec["type"]
    params = {k: v for k, v in spec.items() if k != "type"}
    cls = getattr(A, name, None) if name.isidentifier() and not name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose))):
        names = [n for n in dir(A) if isinstance(getattr(A, n), type)
                 and issubclass(getattr(A, n), (A.BasicTransform, A.BaseCompose))]
        raise ValueError(f"{where}: '{name}' is not an albumentations transform{suggest(name, names)}")
    if issubclass(cls, A.BaseCompose):
        children = params.get("transforms")
        if not isinstance(children, list) or not children:
            raise ValueError(f"{where} ({name}): needs a non-empty 'transforms' list of {{type: ...}} mappings")
        params["transforms"] = [_build_albumentation(A, c, f"{where}.transforms[{i}]") for i, c in enumerate(children)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            transform = cls(**params)
        except Exception as e:  # noqa: BLE001 - albumentations re-raises its pydantic errors as ValueError, ...
            # One line: drop pydantic's "For further information visit ..." lines.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "further information" not in ln]
            raise ValueError(f"{where} ({name}): {' | '.join(lines)}") from None
    for w in caught:
        text = str(w.message)
        if "not valid for transform" in text:
            raise ValueError(f"{where} ({name}): {text}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return transform


class AugmentConfig(BaseModel):
    """Training-time augmentation (``data.augment``); see :mod:`attnseg.datasets.transforms` for the order."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["torchvision", "albumentations"] = Field(
        "torchvision", description="2D library: torchvision (v2) or albumentations (runs the albumentations list)")
    crop_size: list[int] | None = Field(
        None, description="random crop [H, W] or [D, H, W]; smaller images are padded first")
    scale_range: tuple[float, float] | None = Field(
        None, description="random zoom factor range about the centre, e.g. [0.75, 1.25]; size is kept")
    rotate_degrees: float = Field(0.0, ge=0, le=180, description="random rotation in [-deg, deg] (H-W plane in 3D)")
    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip (W axis)")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip (H axis)")
    rotate90: float = Field(0.0, ge=0, le=1, description="probability of a 90/180/270-degree rotation (H-W plane)")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness and contrast factors drawn in 1 +- this")
    gaussian_noise: float = Field(0.0, ge=0, le=1, description="std of additive Gaussian noise (0..1 image scale)")
    albumentations: list[dict[str, Any]] = Field(
        [], description="backend albumentations: [{type: HorizontalFlip, p: 0.5}, ...], run before the keys above")

    @field_validator("crop_size")
    @classmethod
    def _crop_positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) not in (2, 3) or min(v) < 1):
            raise ValueError(f"crop_size needs 2 (2D) or 3 (3D) positive sizes, got {v}")
        return v

    @field_validator("scale_range")
    @classmethod
    def _scale_ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1] <= 10:
            raise ValueError(f"scale_range must satisfy 0 < low <= high <= 10, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _albumentations_list(self) -> AugmentConfig:
        if self.albumentations and self.backend != "albumentations":
            raise ValueError("an albumentations list is given but backend is 'torchvision'; set backend: "
                             "albumentations (or drop the list)")
        if self.albumentations:  # build each transform once, so that bad types and arguments fail here
            A = _import_albumentations()
            for i, spec in enumerate(self.albumentations):
                _build_albumentation(A, spec, f"albumentations[{i}]")
        return self


class NormalizeConfig(BaseModel):
    """``(image - mean) / std`` per channel (``data.normalize``; null for none). Defaults: ImageNet statistics."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field([0.485, 0.456, 0.406], description="per-channel mean of 0..1 images (1 value: all)")
    std: list[float] = Field([0.229, 0.224, 0.225], description="per-channel std, all > 0 (1 value: all)")

    @model_validator(mode="after")
    def _consistent(self) -> NormalizeConfig:
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need the same number (>= 1) of values, got {len(self.mean)} and "
                             f"{len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be > 0, got {self.std}")
        return self


# -- ops: each maps (image [C, *spatial], mask [*spatial] | None) to the same ------------------------------


class Normalize:
    """``(image - mean) / std`` over the channel axis; one value applies to every channel."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        c = image.shape[0]
        if len(self.mean) not in (1, c):
            raise ConfigError(f"normalize has {len(self.mean)} mean/std values but the image has {c} channels "
                              f"(give {c} values or 1)")
        shape = (-1,) + (1,) * (image.ndim - 1)
        return (image - self.mean.view(shape)) / self.std.view(shape)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


def _rand(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


class TorchvisionGeometry:
    """2D rotate/scale, crop with padding and flips through ``torchvision.transforms.v2``."""

    def __init__(self, aug: AugmentConfig, fill_mask: int) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        fill = {tv_tensors.Image: 0.0, tv_tensors.Mask: fill_mask}
        ops: list[Any] = []
        if aug.scale_range is not None or aug.rotate_degrees > 0:
            ops.append(v2.RandomAffine(degrees=aug.rotate_degrees, scale=aug.scale_range,
                                       interpolation=v2.InterpolationMode.BILINEAR, fill=fill))
        if aug.crop_size is not None:
            ops.append(v2.RandomCrop(aug.crop_size, pad_if_needed=True, fill=fill))
        if aug.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(aug.hflip))
        if aug.vflip > 0:
            ops.append(v2.RandomVerticalFlip(aug.vflip))
        self.pipeline = v2.Compose(ops)
        self._types = (tv_tensors.Image, tv_tensors.Mask)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        image_t, mask_t = self._types
        if mask is None:
            return self.pipeline(image_t(image)).as_subclass(torch.Tensor), None
        image, mask = self.pipeline(image_t(image), mask_t(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"TorchvisionGeometry({self.pipeline.transforms})"


class Albumentations:
    """The ``albumentations`` list on numpy ``[H, W, C]`` float32 / ``[H, W]`` int32 arrays, back to tensors."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        A = _import_albumentations()
        self.pipeline = A.Compose([_build_albumentation(A, s, f"albumentations[{i}]") for i, s in enumerate(specs)])

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        args = {"image": image.permute(1, 2, 0).contiguous().numpy()}  # [C, H, W] -> [H, W, C]
        if mask is not None:
            args["mask"] = mask.to(torch.int32).numpy()
        out = self.pipeline(**args)
        result = np.ascontiguousarray(out["image"])
        result = result[..., None] if result.ndim == 2 else result
        image = torch.from_numpy(result).permute(2, 0, 1).float().contiguous()  # [H, W, C] -> [C, H, W]
        return image, torch.from_numpy(np.ascontiguousarray(out["mask"])).long() if mask is not None else None

    def __repr__(self) -> str:
        return f"Albumentations({[type(t).__name__ for t in self.pipeline.transforms]})"


class VolumeGeometry:
    """3D rotate (H-W plane) / zoom, crop with padding, flips (W, H) and rot90 (H-W plane) in plain torch."""

    def __init__(self, aug: AugmentConfig, fill_mask: int) -> None:
        self.aug = aug
        self.fill_mask = fill_mask

    def _affine(self, image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        aug = self.aug
        angle = math.radians(_rand(-aug.rotate_degrees, aug.rotate_degrees))
        scale = _rand(*aug.scale_range) if aug.scale_range is not None else 1.0
        d, h, w = image.shape[1:]
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        # affine_grid maps output to input in normalised (x, y, z) = (W, H, D) coordinates; the H/W ratios keep
        # the rotation rigid in pixel units on non-square planes.
        theta = torch.tensor([[cos, -sin * h / w, 0.0, 0.0],
                              [sin * w / h, cos, 0.0, 0.0],
                              [0.0, 0.0, 1 / scale, 0.0]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 1, d, h, w], align_corners=False)  # [1, D, H, W, 3]
        image = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)[0]
        if mask is not None:
            stacked = torch.stack([mask.float(), torch.ones_like(mask, dtype=torch.float32)])[None]  # [1, 2, D, H, W]
            moved = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
            mask = torch.where(moved[1] > 0.5, moved[0].round().long(), torch.full_like(mask, self.fill_mask))
        return image, mask

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        aug = self.aug
        if aug.rotate_degrees > 0 or aug.scale_range is not None:
            image, mask = self._affine(image, mask)
        if aug.crop_size is not None:
            image, mask = _random_crop(image, mask, list(aug.crop_size), self.fill_mask)
        if aug.hflip > 0 and torch.rand(()) < aug.hflip:
            image, mask = image.flip(-1), mask.flip(-1) if mask is not None else None
        if aug.vflip > 0 and torch.rand(()) < aug.vflip:
            image, mask = image.flip(-2), mask.flip(-2) if mask is not None else None
        return image, mask

    def __repr__(self) -> str:
        return f"VolumeGeometry({self.aug.model_dump(exclude={'backend', 'albumentations'})})"


def _random_crop(image: torch.Tensor, mask: torch.Tensor | None, crop: list[int],
                 fill_mask: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random ``crop`` of ``[C, *spatial]`` / ``[*spatial]``; an axis shorter than the crop is padded at a random
    offset (image with 0, mask with ``fill_mask``)."""
    spatial = image.shape[1:]
    pads = [max(c - s, 0) for c, s in zip(crop, spatial)]
    if any(pads):
        before = [int(torch.randint(0, p + 1, ()).item()) for p in pads]
        flat = [v for b, p in zip(reversed(before), reversed(pads)) for v in (b, p - b)]  # F.pad: last axis first
        image = F.pad(image, flat, value=0.0)
        mask = F.pad(mask, flat, value=fill_mask) if mask is not None else None
    starts = [int(torch.randint(0, s - c + 1, ()).item()) for s, c in zip(image.shape[1:], crop)]
    window = tuple(slice(a, a + c) for a, c in zip(starts, crop))
    return image[(slice(None), *window)], mask[window] if mask is not None else None


class RandomRot90:
    """Rotation by k * 90 degrees in the last two axes with probability ``p`` (k = 2 only when they differ)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.rand(()) >= self.p:
            return image, mask
        k = int(torch.randint(1, 4, ()).item()) if image.shape[-1] == image.shape[-2] else 2
        return torch.rot90(image, k, dims=(-2, -1)), torch.rot90(mask, k, dims=(-2, -1)) if mask is not None else None

    def __repr__(self) -> str:
        return f"RandomRot90(p={self.p})"


class Intensity:
    """Brightness and contrast jitter (clamped to 0..1), then additive Gaussian noise; any channel count."""

    def __init__(self, jitter: float, noise: float) -> None:
        self.jitter = jitter
        self.noise = noise

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.jitter > 0:
            contrast = _rand(1 - self.jitter, 1 + self.jitter)
            brightness = _rand(1 - self.jitter, 1 + self.jitter)
            mean = image.mean()
            image = (((image - mean) * contrast + mean) * brightness).clamp(0, 1)
        if self.noise > 0:
            image = image + self.noise * torch.randn_like(image)
        return image, mask

    def __repr__(self) -> str:
        return f"Intensity(jitter={self.jitter}, noise={self.noise})"


# -- the sample transform -----------------------------------------------------------------------------


class SampleTransform:
    """Applies ``ops`` to a sample's image (and mask), then normalises; picklable for worker processes."""

    def __init__(self, ops: list[Op], normalize: Normalize | None, task: str) -> None:
        self.ops = ops
        self.normalize = normalize
        self.task = task

    def __call__(self, sample: Sample) -> Sample:
        sample = dict(sample)
        image = sample["image"].float()
        mask = sample.get("mask") if self.task == "segmentation" else None
        for op in self.ops:
            image, mask = op(image, mask)
        if self.normalize is not None:
            image = self.normalize(image)
        sample["image"] = image.contiguous()
        if mask is not None:
            sample["mask"] = mask.long().contiguous()
        return sample

    def __repr__(self) -> str:
        return f"SampleTransform(ops={self.ops}, normalize={self.normalize}, task={self.task!r})"


def build_transform(
    augment: AugmentConfig | dict | None,
    normalize: NormalizeConfig | dict | None,
    *,
    train: bool,
    spatial_dims: int = 2,
    task: str = "segmentation",
    ignore_index: int | None = None,
) -> SampleTransform:
    """A callable mapping a sample dict to an augmented (``train`` only) and normalised sample dict.

    Args:
        augment: training augmentation (ignored when ``train`` is False); a dict is validated first.
        normalize: mean/std (applied in training and evaluation), or None for none.
        train: augment (True) or only normalise (False).
        spatial_dims: 2 (``image`` ``[C, H, W]``) or 3 (``[C, D, H, W]``).
        task: 'segmentation' (``mask`` ``[*spatial]`` int64 moves with the image) or 'classification'.
        ignore_index: label given to mask pixels that padding or rotation brings in (default 0, background).

    Example::

        >>> t = build_transform({"crop_size": [64, 64], "hflip": 0.5}, None, train=True)
        >>> out = t({"image": torch.rand(3, 50, 70), "mask": torch.zeros(50, 70, dtype=torch.long)})
        >>> out["image"].shape, out["mask"].shape
        (torch.Size([3, 64, 64]), torch.Size([64, 64]))
        >>> t3 = build_transform({"crop_size": [16, 32, 32], "rotate90": 1.0}, {"mean": [0.5], "std": [0.25]},
        ...                      train=True, spatial_dims=3)
        >>> t3({"image": torch.rand(1, 20, 24, 40), "mask": torch.zeros(20, 24, 40, dtype=torch.long)})["image"].shape
        torch.Size([1, 16, 32, 32])
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if task not in ("segmentation", "classification"):
        raise ConfigError(f"task must be 'segmentation' or 'classification', got {task!r}")
    if isinstance(augment, dict):
        augment = AugmentConfig.model_validate(augment)
    if isinstance(normalize, dict):
        normalize = NormalizeConfig.model_validate(normalize)
    norm = Normalize(normalize.mean, normalize.std) if normalize is not None else None
    ops: list[Op] = []
    if train and augment is not None:
        if augment.crop_size is not None and len(augment.crop_size) != spatial_dims:
            raise ConfigError(f"augment.crop_size {augment.crop_size} has {len(augment.crop_size)} sizes but the data "
                              f"is {spatial_dims}D")
        fill_mask = 0 if ignore_index is None else ignore_index
        if spatial_dims == 3:
            if augment.backend == "albumentations":
                raise ConfigError("augment.backend 'albumentations' works on 2D images only; use the generic keys "
                                  "(crop_size, hflip, ...) for volumes")
            ops.append(VolumeGeometry(augment, fill_mask))
        else:
            if augment.backend == "albumentations" and augment.albumentations:
                ops.append(Albumentations(augment.albumentations))
            geometric = (augment.scale_range, augment.crop_size, augment.rotate_degrees, augment.hflip, augment.vflip)
            if any(geometric):
                ops.append(TorchvisionGeometry(augment, fill_mask))
        if augment.rotate90 > 0:
            ops.append(RandomRot90(augment.rotate90))
        if augment.color_jitter > 0 or augment.gaussian_noise > 0:
            ops.append(Intensity(augment.color_jitter, augment.gaussian_noise))
    return SampleTransform(ops, norm, task)
