"""Landmark datasets: images + contour landmarks of a template (``landmarks``), and a synthetic one
(``synthetic_landmarks``) for tests and demos; HybridGNet's data.

``landmarks`` reads ``<root>/<images_dir>/<stem>.<png|jpg|tif|bmp>`` and its landmark file
``<root>/<landmarks_dir>/<stem>.<csv|json|npy>``:

- ``.npy``: ``[P, 2]`` (or ``[2P]``) ``(x = column, y = row)`` pixel coordinates; HybridGNet's JSRT/Montgomery/
  Shenzhen files (``166 x 2`` float64 on the 1024x1024 image) read as they are;
- ``.csv``: one ``x,y`` row per point (a non-numeric first row is a header and skipped);
- ``.json``: a list of ``[x, y]``, or ``{"points": [[x, y], ...]}``, or ``{"organs": {"<organ>": [[x, y], ...]}}``
  (by the template's organ names; organs of the template file that the variant does not use may be left out).

``P`` is the template's node count, or that of the template file's full layout (all its organs), from which the
variant's organs are taken (JSRT's 166 points for the 120-node ``chest_xray:LH``). Coordinates are pixels of the
stored image unless ``normalized: true`` (then in ``[0, 1]``, x by width and y by height).

The template (:mod:`attnseg.datasets.landmark_template`, by shipped name or path) is part of the dataset definition;
the ``hybridgnet`` head is given the same one (configs write it once, see ``configs/hybridgnet``).

Items: ``image`` ``[in_chans, H, W]`` float in 0..1, resized to ``image_size``; ``landmarks`` ``[N, 2]`` float32
normalised ``(x, y)`` clipped to ``[0, 1]`` (HybridGNet's ``ToTensor``); ``mask`` ``[H, W]`` int64, the landmarks
rasterized by the template (HybridGNet's ``getSeg``: what Dice/HD are computed on); ``meta``.

Augmentation (``augment``, training split only; HybridGNet's ``RandomScale``, ``Rotate(3)``, ``AugColor(0.4)``,
``utils/dataLoader.py``), applied to the image and its landmarks together:

- ``scale``: independent x/y factors ``U(scale_min, size / landmark extent)`` (so the landmarks fit), the image
  resized by them, then cropped (a window that keeps every landmark inside) or zero-padded (offset
  ``U[pad/4, 3 pad/4)``) back to ``image_size``;
- ``rotate_degrees``: a rotation by ``U(-deg, deg)`` about the image centre (bilinear, zero fill);
- ``gamma``: ``image ** (1 / g)`` with ``g ~ U(1 - gamma, 1 + gamma / 2)``; ``noise_std``: additive Gaussian noise.

Flips are refused (here and in ``data.augment``): a flipped right lung is not a left lung, the template's organs
are anatomical left/right. ``data.augment`` may add intensity jitter and noise; its geometric keys would move the
image without its landmarks and are refused with a message. Splits: ``split_file`` or a seeded ratio split, as
``folder2d``. Every problem is a :class:`~attnseg.errors.DataError` naming the file: missing or unreadable files, a
wrong point count, NaN, coordinates outside the image (``clip_outside: true`` clips them instead).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from attnseg.datasets.folder2d import (
    _check_items,
    _check_ratios,
    _check_split,
    _images_by_stem,
    _no_images_error,
    _read_split_file,
    _require_dir,
    ratio_split,
)
from attnseg.datasets.io import convert_channels, read_image
from attnseg.datasets.landmark_template import LandmarkTemplate, load_template
from attnseg.datasets.rasterize import rasterize_landmarks
from attnseg.errors import ConfigError, DataError
from attnseg.registry import DATASETS

__all__ = ["Landmarks", "SyntheticLandmarks", "LandmarkAugment", "read_landmarks", "make_synthetic_landmarks",
           "synthetic_sample"]

LANDMARK_SUFFIXES = (".csv", ".json", ".npy")
_FLIP_MESSAGE = ("flips are not valid for landmark contours: the template's organs are anatomical left/right (a "
                 "flipped right lung is not a left lung); remove {what}")


# -- reading --------------------------------------------------------------------------------------------------------


def _json_points(data: Any, template: LandmarkTemplate, path: Path) -> np.ndarray:
    if isinstance(data, dict) and "organs" in data:
        organs = data["organs"]
        if not isinstance(organs, dict):
            raise DataError(f"{path}: 'organs' must map organ names to [[x, y], ...] lists")
        missing = [o.name for o in template.organs if o.name not in organs]
        if missing:
            raise DataError(f"{path}: organs {missing} of template {template.name} are missing (found "
                            f"{sorted(organs)})")
        parts = []
        for o in template.organs:
            arr = np.asarray(organs[o.name], dtype=np.float64)
            if arr.ndim != 2 or arr.shape != (o.num_points, 2):
                raise DataError(f"{path}: organ {o.name} has {arr.shape[0] if arr.ndim == 2 else '?'} points of "
                                f"shape {list(arr.shape)}; template {template.name} needs {o.num_points} [x, y] points")
            parts.append(arr)
        return np.concatenate(parts)
    if isinstance(data, dict) and "points" in data:
        data = data["points"]
    return np.asarray(data, dtype=np.float64)


def read_landmarks(path: str | Path, template: LandmarkTemplate) -> np.ndarray:
    """``[N, 2]`` float64 ``(x, y)`` of ``path`` (CSV, JSON or NPY; see the module docstring) in the template's
    node order (the variant's organs taken out of a full-layout file).

    Raises:
        DataError: naming the file: unreadable, not numbers, NaN/infinite, or a point count that fits neither layout.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            pts = np.load(path, allow_pickle=False)
        elif suffix == ".json":
            pts = _json_points(json.loads(path.read_text(encoding="utf-8")), template, path)
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
            if rows:
                try:
                    [float(c) for c in rows[0][:2]]
                except ValueError:
                    rows = rows[1:]  # a header row
            if any(len(r) < 2 for r in rows):
                raise DataError(f"{path}: every CSV row must be 'x,y'")
            pts = np.array([[float(r[0]), float(r[1])] for r in rows], dtype=np.float64)
        else:
            raise DataError(f"{path}: unsupported landmark file (use {', '.join(LANDMARK_SUFFIXES)})")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: landmark file not found") from None
    except (OSError, ValueError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read landmarks: {e}") from None
    pts = np.asarray(pts)
    if not np.issubdtype(pts.dtype, np.number):
        raise DataError(f"{path}: landmarks must be numbers, got dtype {pts.dtype}")
    pts = pts.astype(np.float64)
    if pts.ndim == 1 and pts.size % 2 == 0:
        pts = pts.reshape(-1, 2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise DataError(f"{path}: landmarks must be [P, 2] (x, y) points, got shape {list(pts.shape)}")
    if not np.isfinite(pts).all():
        raise DataError(f"{path}: landmarks contain NaN or infinite values")
    try:
        return template.select(pts, where=str(path))
    except ValueError as e:
        raise DataError(str(e)) from None


# -- augmentation ---------------------------------------------------------------------------------------------------


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi)`` (``lo`` when the range is empty)."""
    return lo if hi <= lo else int(torch.randint(lo, hi, ()))


def _resize(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


class LandmarkAugment:
    """HybridGNet's training augmentation on ``(image [C, H, W], landmarks [N, 2] pixels)`` (module docstring).

    Args:
        scale: random scale then crop/pad back; ``scale_min`` its lower factor (0.8).
        rotate_degrees: rotation range (3).
        gamma: gamma factor ``g`` drawn in ``[1 - gamma, 1 + gamma / 2]`` (0.4); 0 disables.
        noise_std: Gaussian noise std on the 0..1 image (1/128).
    """

    def __init__(self, scale: bool = True, scale_min: float = 0.8, rotate_degrees: float = 3.0, gamma: float = 0.4,
                 noise_std: float = 1 / 128) -> None:
        if not 0 < scale_min <= 1 or not 0 <= rotate_degrees <= 180 or not 0 <= gamma < 1 or noise_std < 0:
            raise ConfigError(f"landmarks augment: need 0 < scale_min <= 1, 0 <= rotate_degrees <= 180, 0 <= gamma < 1, "
                              f"noise_std >= 0; got {scale_min=}, {rotate_degrees=}, {gamma=}, {noise_std=}")
        self.scale, self.scale_min, self.rotate_degrees = scale, scale_min, rotate_degrees
        self.gamma, self.noise_std = gamma, noise_std

    @classmethod
    def from_config(cls, spec: dict[str, Any] | bool | None) -> LandmarkAugment | None:
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if not isinstance(spec, dict):
            raise ConfigError(f"landmarks: augment must be a mapping, true or null, got {spec!r}")
        flips = [k for k in spec if k in ("hflip", "vflip", "flip", "rotate90")]
        if flips:
            raise ConfigError("landmarks: augment." + _FLIP_MESSAGE.format(what=", ".join(flips)))
        allowed = ("scale", "scale_min", "rotate_degrees", "gamma", "noise_std")
        unknown = sorted(set(spec) - set(allowed))
        if unknown:
            raise ConfigError(f"landmarks: unknown augment keys {unknown} (allowed: {', '.join(allowed)})")
        return cls(**spec)

    def _scale(self, image: torch.Tensor, pts: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        h, w = image.shape[-2:]
        ext = np.maximum(pts.max(0) - pts.min(0), 1e-6)
        vx = _uniform(self.scale_min, max(self.scale_min, w / ext[0]))
        vy = _uniform(self.scale_min, max(self.scale_min, h / ext[1]))
        nh, nw = max(1, round(h * vy)), max(1, round(w * vx))
        image = _resize(image, (nh, nw))
        pts = pts * np.array([nw / w, nh / h])
        for axis, (n, full) in enumerate(((nw, w), (nh, h))):  # x: columns, y: rows
            lo, hi = float(pts[:, axis].min()), float(pts[:, axis].max())
            if n > full:  # crop a window that keeps every landmark inside
                first = max(0, math.ceil(hi) - full)
                last = min(n - full, max(0, math.floor(lo)))
                start = _randint(first, last + 1) if last >= first else min(max(0, math.floor(lo)), n - full)
                image = image[..., start:start + full] if axis == 0 else image[..., start:start + full, :]
                pts[:, axis] -= start
            elif n < full:
                pad = full - n
                p0 = _randint(math.floor(pad / 4), math.ceil(3 * pad / 4))
                padding = [p0, pad - p0, 0, 0] if axis == 0 else [0, 0, p0, pad - p0]
                image = F.pad(image, padding)
                pts[:, axis] += p0
        return image, pts

    def _rotate(self, image: torch.Tensor, pts: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        theta = math.radians(_uniform(-self.rotate_degrees, self.rotate_degrees))
        c, s = math.cos(theta), math.sin(theta)
        h, w = image.shape[-2:]
        cx, cy = w / 2, h / 2
        # output pixel centres -> source positions (inverse rotation), as grid_sample coordinates
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                                indexing="ij")
        dx, dy = xs - cx, ys - cy
        sx, sy = cx + c * dx - s * dy, cy + s * dx + c * dy
        grid = torch.stack([2 * sx / w - 1, 2 * sy / h - 1], dim=-1)[None].to(image.dtype)
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        d = pts - np.array([cx, cy])
        pts = np.stack([cx + c * d[:, 0] + s * d[:, 1], cy - s * d[:, 0] + c * d[:, 1]], axis=1)
        return image, pts

    def __call__(self, image: torch.Tensor, pts: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        pts = pts.copy()
        if self.scale:
            image, pts = self._scale(image, pts)
        if self.rotate_degrees > 0:
            image, pts = self._rotate(image, pts)
        if self.gamma > 0:
            g = _uniform(1 - self.gamma, 1 + self.gamma / 2)
            image = image.clamp(0, 1) ** (1.0 / g)
        if self.noise_std > 0:
            image = image + self.noise_std * torch.randn_like(image)
        return image, pts

    def __repr__(self) -> str:
        return (f"LandmarkAugment(scale={self.scale}, scale_min={self.scale_min}, rotate_degrees={self.rotate_degrees}"
                f", gamma={self.gamma}, noise_std={self.noise_std})")


def _check_transform(name: str, transform: Any) -> None:
    """Refuse a ``data.augment`` transform whose geometric ops would move the image without its landmarks."""
    ops = getattr(transform, "ops", None) or []
    geometric = [type(op).__name__ for op in ops if type(op).__name__ != "Intensity"]
    if geometric:
        inner = [type(t).__name__ for op in ops for t in getattr(getattr(op, "pipeline", None), "transforms", [])]
        flips = [k for k, cls in (("hflip", "RandomHorizontalFlip"), ("vflip", "RandomVerticalFlip")) if cls in inner]
        if "RandomRot90" in geometric:
            flips.append("rotate90")
        if flips:
            raise ConfigError(f"{name}: data.augment: " + _FLIP_MESSAGE.format(what=", ".join(flips)))
        raise ConfigError(f"{name}: data.augment's geometric ops ({', '.join(geometric)}) would move the image but "
                          "not its landmarks; use the dataset's own augment (scale, rotate_degrees, gamma, "
                          "noise_std) and keep data.augment to color_jitter / gaussian_noise")


def _finish(name: str, image: torch.Tensor, pts: np.ndarray, template: LandmarkTemplate, meta: dict[str, Any],
            transform: Callable[[dict], dict] | None) -> dict[str, Any]:
    h, w = image.shape[-2:]
    norm = np.clip(pts / np.array([w, h]), 0.0, 1.0)  # HybridGNet's ToTensor: normalise, clip
    mask = rasterize_landmarks(norm * np.array([w, h]), template, (h, w), np.int64)
    sample = {"image": image.float().contiguous(), "mask": torch.from_numpy(mask),
              "landmarks": torch.from_numpy(norm).float(), "meta": meta}
    return transform(sample) if transform is not None else sample


# -- the file dataset -----------------------------------------------------------------------------------------------


class Landmarks(Dataset):
    """Images and landmark files of a contour template; see the module docstring.

    Attributes: ``items`` (``[(image_path, landmark_path)]`` of this split), ``template``, ``num_classes`` (the
    template's), ``class_names``, ``in_chans``, ``spatial_dims`` (2), ``task`` ('segmentation'), ``ignore_index``
    (None), ``image_size``.
    """

    task = "segmentation"
    spatial_dims = 2
    ignore_index = None

    def __init__(
        self,
        split: str,
        transform: Callable[[dict], dict] | None,
        root: str,
        template: str = "chest_xray:LH",
        images_dir: str = "images",
        landmarks_dir: str = "landmarks",
        split_file: str | None = None,
        val_ratio: float = 0.2,
        test_ratio: float = 0.0,
        seed: int = 0,
        in_chans: int = 1,
        image_size: list[int] | None = None,
        normalized: bool = False,
        clip_outside: bool = False,
        augment: dict[str, Any] | bool | None = None,
    ) -> None:
        name = "landmarks"
        _check_split(name, split)
        _check_ratios(name, val_ratio, test_ratio)
        if in_chans < 1:
            raise ConfigError(f"{name}: in_chans must be >= 1, got {in_chans}")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ConfigError(f"{name}: image_size must be [H, W] or null, got {image_size}")
        self.template = load_template(template)
        self.split, self.transform, self.in_chans = split, transform, in_chans
        self.image_size = tuple(int(s) for s in image_size) if image_size is not None else None
        self.normalized, self.clip_outside = normalized, clip_outside
        self.augment = LandmarkAugment.from_config(augment) if split == "train" else None
        if split == "train":
            _check_transform(name, transform)
        self.num_classes = self.template.num_classes
        self.class_names = self.template.class_names
        self.root = Path(root).expanduser()
        _require_dir(name, self.root, "root folder")
        images_path, lm_path = self.root / images_dir, self.root / landmarks_dir
        _require_dir(name, images_path, f"images folder (images_dir={images_dir!r})")
        _require_dir(name, lm_path, f"landmarks folder (landmarks_dir={landmarks_dir!r})")
        images = _images_by_stem(name, images_path)
        if not images:
            raise _no_images_error(name, images_path)
        files: dict[str, Path] = {}
        for p in sorted(lm_path.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in LANDMARK_SUFFIXES:
                if p.stem in files:
                    raise DataError(f"{name}: two landmark files for '{p.stem}' in {lm_path}: {files[p.stem].name} "
                                    f"and {p.name} (keep one)")
                files[p.stem] = p
        missing = [p.name for s, p in images.items() if s not in files]
        if missing:
            raise DataError(f"{name}: {len(missing)} of {len(images)} images have no landmark file in {lm_path}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (the landmarks of "
                            f"<stem>.<ext> are <stem>.csv, .json or .npy)")
        stems = sorted(images)
        if split_file is not None:
            chosen = _read_split_file(name, self.root, split_file, split, stems)
        else:
            chosen = [stems[i] for i in ratio_split(len(stems), split, val_ratio, test_ratio, seed)]
        if not chosen:
            raise DataError(f"{name}: the '{split}' split is empty ({len(stems)} images in {images_path}, "
                            f"{split_file=}, {val_ratio=}, {test_ratio=})")
        self.items: list[tuple[Path, Path]] = [(images[s], files[s]) for s in chosen]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict[str, Any]:
        """Sample ``index`` before augmentation: ``image`` at ``image_size`` and its landmarks in its pixels."""
        img_path, lm_path = self.items[index]
        array = convert_channels(read_image(img_path), self.in_chans, img_path)
        h0, w0 = array.shape[:2]
        pts = read_landmarks(lm_path, self.template)
        if self.normalized:
            pts = pts * np.array([w0, h0])
        outside = (pts[:, 0] < 0) | (pts[:, 0] > w0) | (pts[:, 1] < 0) | (pts[:, 1] > h0)
        if outside.any():
            if not self.clip_outside:
                i = int(np.flatnonzero(outside)[0])
                raise DataError(f"{lm_path}: {int(outside.sum())} point(s) outside the {w0}x{h0} (W x H) image "
                                f"{img_path.name}, e.g. point {i} at ({pts[i, 0]:.1f}, {pts[i, 1]:.1f})"
                                f"{' (normalized: true reads [0, 1] coordinates)' if not self.normalized else ''}; "
                                "set clip_outside: true to clip them")
            pts = np.clip(pts, 0, [w0, h0])
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # [C, H, W]
        if self.image_size is not None and (h0, w0) != self.image_size:
            image = _resize(image, self.image_size).clamp(0, 1)
            pts = pts * np.array([self.image_size[1] / w0, self.image_size[0] / h0])
        meta = {"id": img_path.stem, "path": str(img_path), "landmarks_path": str(lm_path), "orig_size": (h0, w0)}
        return {"image": image, "points": pts, "meta": meta}

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.load(index)
        image, pts = raw["image"], raw["points"]
        if self.augment is not None:
            image, pts = self.augment(image, pts)
        return _finish("landmarks", image, pts, self.template, raw["meta"], self.transform)

    def check(self, max_errors: int = 20) -> None:
        """Read every image and landmark file of this split once; one :class:`DataError` lists every bad item."""
        _check_items(f"landmarks ({self.root}, split '{self.split}')", len(self), self.load, max_errors)

    def __repr__(self) -> str:
        return (f"landmarks(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"template={self.template.name!r}, image_size={self.image_size})")


DATASETS.register("landmarks", cls=Landmarks)(Landmarks)


# -- synthetic data -------------------------------------------------------------------------------------------------

# Organ-like placements on a unit canvas: centre (x, y), radii (rx, ry), by organ name; unknown organs get a
# position on a ring. Right lung on the image's left (patient's right), heart low and left of centre (image right).
_PLACES = {
    "right_lung": (0.30, 0.48, 0.14, 0.28), "left_lung": (0.70, 0.48, 0.14, 0.28),
    "heart": (0.58, 0.64, 0.14, 0.12), "right_clavicle": (0.30, 0.16, 0.16, 0.035),
    "left_clavicle": (0.70, 0.16, 0.16, 0.035),
}
_INTENSITY = {1: 0.25, 2: 0.75, 3: 0.95}


def synthetic_sample(template: LandmarkTemplate, size: Sequence[int], rng: np.random.Generator,
                     in_chans: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """One synthetic X-ray-like image ``[in_chans, H, W]`` in 0..1 and its landmarks ``[N, 2]`` in pixels: each organ
    a jittered ellipse with the template's point count (clockwise from the top), drawn with a per-label intensity
    on a soft background, plus noise."""
    h, w = int(size[0]), int(size[1])
    shift = rng.uniform(-0.04, 0.04, 2)
    zoom = rng.uniform(0.9, 1.1, 2)
    parts = []
    n_org = len(template.organs)
    for k, organ in enumerate(template.organs):
        ring = (0.5 + 0.3 * math.cos(2 * math.pi * k / n_org), 0.5 + 0.3 * math.sin(2 * math.pi * k / n_org),
                0.08, 0.08)
        cx, cy, rx, ry = _PLACES.get(organ.name, ring)
        t = np.linspace(0, 2 * np.pi, organ.num_points, endpoint=False) + rng.uniform(0, 0.1)
        wobble = 1 + 0.08 * np.sin(2 * t + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 0.01, organ.num_points)
        x = 0.5 + (cx - 0.5 + shift[0]) * zoom[0] + rx * zoom[0] * wobble * np.sin(t)
        y = 0.5 + (cy - 0.5 + shift[1]) * zoom[1] - ry * zoom[1] * wobble * np.cos(t)
        parts.append(np.stack([x * w, y * h], axis=1))
    pts = np.clip(np.concatenate(parts), 0, [w - 1e-3, h - 1e-3])
    canvas = np.full((h, w), 0.55, dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    canvas += 0.15 * np.exp(-(((xx / w - 0.5) / 0.35) ** 2 + ((yy / h - 0.55) / 0.45) ** 2)).astype(np.float32)
    labels = rasterize_landmarks(pts, template, (h, w))
    for value, level in _INTENSITY.items():
        canvas[labels == value] = level
    for value in np.unique(labels):
        if value not in _INTENSITY and value > 0:
            canvas[labels == value] = 0.1 + 0.8 * ((value * 37) % 10) / 10
    image = torch.from_numpy(canvas)[None, None]
    image = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]
    image = (image + torch.from_numpy(rng.normal(0, 0.03, (1, h, w)).astype(np.float32))).clamp(0, 1)
    return image.expand(in_chans, -1, -1).contiguous(), pts


def make_synthetic_landmarks(root: str | Path, num_images: int = 8, template: str | LandmarkTemplate = "chest_xray",
                             image_size: Sequence[int] = (128, 128), seed: int = 0, fmt: str = "csv") -> Path:
    """Write ``num_images`` synthetic images (``<root>/images/case_###.png``, 8-bit grey) and landmark files
    (``<root>/landmarks/case_###.<fmt>``, pixels; ``fmt`` csv, json or npy) for ``template``; returns ``root``."""
    from PIL import Image

    if fmt not in ("csv", "json", "npy"):
        raise ValueError(f"fmt must be csv, json or npy, got {fmt!r}")
    t = load_template(template)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "landmarks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        image, pts = synthetic_sample(t, image_size, rng)
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(root / "images" / f"case_{i:03d}.png")
        out = root / "landmarks" / f"case_{i:03d}.{fmt}"
        if fmt == "npy":
            np.save(out, pts)
        elif fmt == "json":
            out.write_text(json.dumps({"organs": {o.name: pts[o.nodes].tolist() for o in t.organs}}))
        else:
            out.write_text("x,y\n" + "".join(f"{x:.3f},{y:.3f}\n" for x, y in pts))
    return root


class SyntheticLandmarks(Dataset):
    """In-memory synthetic landmark data (:func:`synthetic_sample`), deterministic per item; no files needed.

    Args: ``num_train``, ``num_val``, ``num_test`` (items per split), ``image_size`` ``[H, W]``, ``template``,
    ``in_chans``, ``seed``, ``augment`` (as ``landmarks``; training split only).
    """

    task = "segmentation"
    spatial_dims = 2
    ignore_index = None

    def __init__(self, split: str, transform: Callable[[dict], dict] | None, template: str = "chest_xray:LH",
                 image_size: list[int] = (128, 128), num_train: int = 16, num_val: int = 4, num_test: int = 4,
                 in_chans: int = 1, seed: int = 0, augment: dict[str, Any] | bool | None = None) -> None:
        _check_split("synthetic_landmarks", split)
        counts = {"train": num_train, "val": num_val, "test": num_test}
        if counts[split] < 1 or len(image_size) != 2 or min(image_size) < 8:
            raise ConfigError(f"synthetic_landmarks: need >= 1 item in the '{split}' split and image_size [H, W] >= 8, "
                              f"got num_{split}={counts[split]}, {image_size=}")
        self.template = load_template(template)
        self.split, self.transform, self.in_chans = split, transform, in_chans
        self.image_size = tuple(int(s) for s in image_size)
        self.n = counts[split]
        self.offset = {"train": 0, "val": 1_000_003, "test": 2_000_006}[split] + seed * 7_919
        self.augment = LandmarkAugment.from_config(augment) if split == "train" else None
        if split == "train":
            _check_transform("synthetic_landmarks", transform)
        self.num_classes, self.class_names = self.template.num_classes, self.template.class_names

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        image, pts = synthetic_sample(self.template, self.image_size, np.random.default_rng(self.offset + index),
                                      self.in_chans)
        if self.augment is not None:
            image, pts = self.augment(image, pts)
        meta = {"id": f"{self.split}_{index:04d}", "orig_size": self.image_size}
        return _finish("synthetic_landmarks", image, pts, self.template, meta, self.transform)


DATASETS.register("synthetic_landmarks", cls=SyntheticLandmarks)(SyntheticLandmarks)
