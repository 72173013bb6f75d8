"""Training augmentation and normalisation, declared in the config and applied to sample dicts.

2D uses torchvision.transforms.v2 with ``tv_tensors.Image`` / ``tv_tensors.Mask`` (masks are resampled
with nearest neighbours, so labels stay labels); an albumentations pipeline can be used instead when the
``albumentations`` extra is installed (types resolve only as attributes of the albumentations module).
3D uses plain tensor ops (flips, 90-degree rotations in the H-W plane, random crop, intensity jitter);
the full MONAI dictionary pipeline for volumes comes with the 3D data issue.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from attnseg.registry import suggest

__all__ = ["AugmentConfig", "NormalizeConfig", "build_transform"]

Sample = dict[str, Any]


class AugmentConfig(BaseModel):
    """Training-time augmentation (``data.augment``)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["torchvision", "albumentations"] = Field("torchvision", description="2D augmentation library")
    crop_size: list[int] | None = Field(None, description="random crop (padded when the image is smaller)")
    scale_range: tuple[float, float] | None = Field(None, description="random rescale range, e.g. [0.75, 1.25]")
    rotate_degrees: float = Field(0.0, ge=0, le=180, description="random rotation range in degrees (2D)")
    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0, le=1, description="probability of a vertical flip")
    rotate90: float = Field(0.0, ge=0, le=1, description="probability of a 90/180/270-degree rotation")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast jitter strength")
    gaussian_noise: float = Field(0.0, ge=0, le=1, description="std of additive Gaussian noise")
    albumentations: list[dict[str, Any]] = Field([], description="[{type: HorizontalFlip, p: 0.5}, ...]")

    @field_validator("crop_size")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) not in (2, 3) or min(v) < 1):
            raise ValueError(f"crop_size needs 2 (2D) or 3 (3D) positive sizes, got {v}")
        return v

    @field_validator("scale_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {list(v)}")
        return v

    @field_validator("albumentations")
    @classmethod
    def _known_types(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not v:
            return v
        try:
            import albumentations as A
        except ImportError:
            raise ValueError("albumentations is not installed: pip install 'attnseg[albumentations]'") from None
        for i, spec in enumerate(v):
            name = spec.get("type") if isinstance(spec, dict) else None
            if not isinstance(name, str) or not isinstance(getattr(A, name, None), type):
                names = [n for n in dir(A) if n[:1].isupper()]
                raise ValueError(f"[{i}].type {name!r} is not an albumentations transform{suggest(str(name), names)}")
        return v


class NormalizeConfig(BaseModel):
    """``(x - mean) / std`` per channel (``data.normalize``)."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field(description="per-channel mean (of 0..1 scaled images)")
    std: list[float] = Field(description="per-channel std, all > 0")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: list[float]) -> list[float]:
        if not v or min(v) <= 0:
            raise ValueError(f"std values must be > 0, got {v}")
        return v


def _normalizer(normalize: NormalizeConfig | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if normalize is None:
        return lambda x: x

    def apply(x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.ndim - 1)
        mean = torch.tensor(normalize.mean, dtype=x.dtype).view(shape)
        std = torch.tensor(normalize.std, dtype=x.dtype).view(shape)
        return (x - mean) / std

    return apply


def _torchvision_2d(aug: AugmentConfig) -> Callable[[torch.Tensor, torch.Tensor | None], tuple]:
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    ops: list[Any] = []
    if aug.scale_range is not None or aug.rotate_degrees > 0:
        ops.append(v2.RandomAffine(degrees=aug.rotate_degrees, scale=aug.scale_range))
    if aug.crop_size is not None:
        ops.append(v2.RandomCrop(aug.crop_size, pad_if_needed=True))
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip:
        ops.append(v2.RandomVerticalFlip(aug.vflip))
    pipeline = v2.Compose(ops)

    def apply(image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if mask is None:
            image = pipeline(tv_tensors.Image(image))
        else:
            image, mask = pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
            mask = mask.as_subclass(torch.Tensor)
        image = image.as_subclass(torch.Tensor)
        if aug.color_jitter and image.shape[0] in (1, 3):
            image = v2.ColorJitter(brightness=aug.color_jitter, contrast=aug.color_jitter)(image.clamp(0, 1))
        return image, mask

    return apply


def _albumentations_2d(aug: AugmentConfig) -> Callable[[torch.Tensor, torch.Tensor | None], tuple]:
    import albumentations as A

    pipeline = A.Compose([getattr(A, s["type"])(**{k: v for k, v in s.items() if k != "type"})
                          for s in aug.albumentations])

    def apply(image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        args = {"image": image.permute(1, 2, 0).numpy()}
        if mask is not None:
            args["mask"] = mask.numpy()
        out = pipeline(**args)
        image = torch.from_numpy(out["image"]).permute(2, 0, 1).float().contiguous()
        return image, torch.from_numpy(out["mask"]).long() if mask is not None else None

    return apply


def _tensor_ops(aug: AugmentConfig, spatial_dims: int) -> Callable[[torch.Tensor, torch.Tensor | None], tuple]:
    """Dimension-agnostic flips, rot90 (in the last two axes), crop, noise; used for 3D."""

    def apply(image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        def both(fn):
            nonlocal image, mask
            image = fn(image, 1)
            mask = fn(mask, 0) if mask is not None else None

        if aug.crop_size is not None:
            size = list(image.shape[1:])
            crop = list(aug.crop_size)
            pads = [max(c - s, 0) for c, s in zip(crop, size)]
            if any(pads):
                flat = [p for extra in reversed(pads) for p in (0, extra)]
                image = torch.nn.functional.pad(image, flat)
                mask = torch.nn.functional.pad(mask, flat) if mask is not None else None
            starts = [random.randint(0, s - c) for s, c in zip(image.shape[1:], crop)]
            both(lambda t, o: t[(slice(None),) * o + tuple(slice(a, a + c) for a, c in zip(starts, crop))])
        if random.random() < aug.hflip:
            both(lambda t, o: t.flip(-1))
        if random.random() < aug.vflip:
            both(lambda t, o: t.flip(-2))
        if random.random() < aug.rotate90:
            k = random.randint(1, 3) if image.shape[-1] == image.shape[-2] else 2
            both(lambda t, o: torch.rot90(t, k, dims=(-2, -1)))
        if aug.color_jitter:
            gain = 1 + random.uniform(-aug.color_jitter, aug.color_jitter)
            shift = random.uniform(-aug.color_jitter, aug.color_jitter) * 0.5
            image = image * gain + shift
        return image.contiguous(), mask.contiguous() if mask is not None else None

    return apply


def build_transform(
    augment: AugmentConfig | dict | None,
    normalize: NormalizeConfig | dict | None,
    *,
    train: bool,
    spatial_dims: int = 2,
    task: str = "segmentation",
) -> Callable[[Sample], Sample]:
    """A callable mapping a sample dict to an augmented (training only) and normalised sample dict.

    ``sample["image"]`` is ``[C, *spatial]`` float; ``sample["mask"]`` (segmentation) ``[*spatial]`` int64
    and moves with the image through every geometric op.
    """
    if isinstance(augment, dict):
        augment = AugmentConfig.model_validate(augment)
    if isinstance(normalize, dict):
        normalize = NormalizeConfig.model_validate(normalize)
    norm = _normalizer(normalize)
    geometric = None
    if train and augment is not None:
        if spatial_dims == 3:
            geometric = _tensor_ops(augment, 3)
        elif augment.backend == "albumentations":
            geometric = _albumentations_2d(augment)
        else:
            tv = _torchvision_2d(augment)
            ops = _tensor_ops(AugmentConfig(rotate90=augment.rotate90), 2) if augment.rotate90 else None

            def geometric(image, mask, tv=tv, ops=ops):
                image, mask = tv(image, mask)
                return ops(image, mask) if ops is not None else (image, mask)

    noise = augment.gaussian_noise if (train and augment is not None) else 0.0

    def apply(sample: Sample) -> Sample:
        sample = dict(sample)
        image = sample["image"]
        mask = sample.get("mask") if task == "segmentation" else None
        if geometric is not None:
            image, mask = geometric(image, mask)
        if noise:
            image = image + noise * torch.randn_like(image)
        sample["image"] = norm(image.float())
        if mask is not None:
            sample["mask"] = mask.long()
        return sample

    return apply
