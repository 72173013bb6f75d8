"""Inference on whole medical volumes, in the volume's own grid: read, preprocess, predict, map back, write.

A model is trained on volumes that the config's ``data.volume`` preprocessing reoriented, resampled, scaled
and cropped. :class:`VolumePredictor` applies the same preprocessing (without the training crops), predicts
by a Gaussian-blended sliding window (optionally averaged over flips), and resamples the class probabilities
trilinearly back onto the **source grid** through the two affines, so the label map lines up voxel for voxel
with the input file. Voxels outside the preprocessed volume (cut off by a foreground crop) are background.

:func:`read_volume` reads a NIfTI file (or one file per modality) or a DICOM series; :func:`save_like` writes
a NIfTI on the source grid with the source's affine and header (only the data type and scaling change).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnseg.engine.inference import blends_probabilities, flip_tta, predict_logits, probability_predictor
from attnseg.heads._common import class_probabilities, label_map_of_probabilities

__all__ = ["VolumeInput", "VolumePrediction", "VolumePredictor", "as_closest_ras", "case_name", "read_volume",
           "resample_to_grid", "save_like"]


@dataclass
class VolumeInput:
    """A volume to segment: ``image`` ``[C, X, Y, Z]`` float32 on the grid of ``affine`` (voxel -> RAS mm);
    ``header`` is the source NIfTI image (for :func:`save_like`), or None for DICOM input."""

    name: str
    image: np.ndarray
    affine: np.ndarray
    sources: tuple[Path, ...]
    header: Any = None
    kind: str = "nifti"


@dataclass
class VolumePrediction:
    """``labels`` ``[X, Y, Z]`` class indices on the source grid; ``probabilities`` ``[K, X, Y, Z]`` float32 when
    asked for (K = 1 for a one-channel sigmoid model)."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    processed_shape: tuple[int, ...] = field(default_factory=tuple)


def case_name(path: Path) -> str:
    """The name of a volume input: its file name without the NIfTI (``a.nii.gz`` -> ``a``) or ``.dcm`` suffix, or a
    folder's name."""
    from attnseg.datasets.volume_cases import case_id

    return path.stem if path.suffix.lower() == ".dcm" else case_id(path)


def read_volume(paths: Sequence[Path], *, in_chans: int | None = None, series_uid: str | None = None,
                name: str | None = None) -> VolumeInput:
    """Read one volume: NIfTI file(s) (several files are stacked as channels) or a DICOM series (a folder or a
    ``.dcm`` file).

    Raises:
        DataError: naming the file, for unreadable files, layouts that are not volumes, files on different grids,
            a channel count other than ``in_chans``, DICOM series problems.
    """
    from attnseg.datasets import dicom, nifti

    paths = [Path(p) for p in paths]
    if len(paths) == 1 and dicom.is_dicom_input(paths[0]):
        vol = dicom.read_dicom_series(paths[0], series_uid=series_uid)
        image = np.asarray(vol.array, dtype=np.float32)[None]
        if in_chans is not None and in_chans != 1:
            from attnseg.errors import DataError

            raise DataError(f"DICOM series {paths[0]} has 1 channel but the model takes {in_chans}")
        return VolumeInput(name or case_name(paths[0]), image, np.asarray(vol.affine, np.float64), tuple(paths),
                           None, "dicom")
    image, affine = nifti.read_image(paths, in_chans)
    import nibabel as nib

    return VolumeInput(name or case_name(paths[0]), image, affine, tuple(paths), nib.load(str(paths[0])), "nifti")


def save_like(data: np.ndarray, affine: np.ndarray, path: Path, reference: Any = None) -> Path:
    """Write ``data`` (``[X, Y, Z]`` or ``[X, Y, Z, K]``) as NIfTI on the grid of ``affine``.

    With a ``reference`` NIfTI image (the source), its header is kept: qform and sform with their codes,
    units, description and intent stay as they were; only the data type, the dimensions and the scaling
    (slope 1, intercept 0: label values are stored as they are) change. Without one (DICOM input), qform and
    sform are the affine with code 1 (scanner). The file is written to a temporary name and renamed.
    """
    import nibabel as nib

    if reference is not None and isinstance(reference, (nib.Nifti1Image, nib.Nifti2Image)):
        header = reference.header.copy()
        header.set_data_dtype(data.dtype)
        out = type(reference)(data, reference.affine, header=header)
        out.header.set_slope_inter(1.0, 0.0)
    else:
        out = nib.Nifti1Image(data, affine)
        out.header.set_data_dtype(data.dtype)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    nib.save(out, str(tmp))
    tmp.replace(path)
    return path


def as_closest_ras(*volumes: np.ndarray, affine: np.ndarray) -> list[np.ndarray]:
    """``volumes`` (each ``[X, Y, Z]`` on the grid of ``affine``) with their axes permuted and flipped so that
    they run towards Right, Anterior, Superior as closely as the grid allows (no resampling), for display."""
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    return [nio.apply_orientation(v, transform) for v in volumes]


def resample_to_grid(
    values: torch.Tensor,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    *,
    fill: Sequence[float] | None = None,
    slab: int = 16,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Trilinear resampling of ``values`` ``[K, *src]`` (on the grid of ``src_affine``) onto the grid
    ``dst_shape`` of ``dst_affine``, by world coordinates.

    Destination voxels that fall outside the source volume (by more than half a voxel) get ``fill`` (one value
    per channel; default 0); those within half a voxel of its edge take the edge value. The destination is
    computed in slabs of ``slab`` planes along its last axis so memory stays bounded; ``reduce`` (e.g. an
    argmax over channels) is applied to every slab before the slabs are joined.

    Returns:
        ``[K, *dst_shape]`` (or what ``reduce`` makes of each ``[K, *slab]`` piece, joined on the last axis).
    """
    k = values.shape[0]
    src_shape = values.shape[1:]
    if len(src_shape) != 3 or len(dst_shape) != 3:
        raise ValueError(f"resample_to_grid works on 3D grids, got {list(src_shape)} -> {list(dst_shape)}")
    fill_t = torch.zeros(k, dtype=values.dtype) if fill is None else torch.as_tensor(fill, dtype=values.dtype)
    same = tuple(src_shape) == tuple(dst_shape) and np.allclose(src_affine, dst_affine, atol=1e-6)
    if same:
        return values if reduce is None else reduce(values)
    dst_to_src = torch.as_tensor(np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64))
    sizes = torch.tensor(src_shape, dtype=torch.float64)
    source = values[None].float()
    axes = [torch.arange(n, dtype=torch.float64) for n in dst_shape]
    pieces = []
    for z0 in range(0, int(dst_shape[2]), slab):
        zs = axes[2][z0:z0 + slab]
        grid = torch.stack(torch.meshgrid(axes[0], axes[1], zs, indexing="ij"), -1)  # [X, Y, z, 3] dst indices
        src_idx = grid @ dst_to_src[:3, :3].T + dst_to_src[:3, 3]  # source voxel indices
        inside = ((src_idx >= -0.5) & (src_idx <= sizes - 0.5)).all(-1)
        # grid_sample with align_corners: -1 and 1 are the centres of the first and last voxel; its last grid
        # axis lists coordinates for the input's axes in reverse order (W, H, D).
        norm = torch.where(sizes > 1, 2 * src_idx / (sizes - 1).clamp_min(1) - 1, torch.zeros_like(src_idx))
        sampled = F.grid_sample(source, norm.flip(-1)[None].to(source.dtype), mode="bilinear",
                                padding_mode="border", align_corners=True)[0]  # [K, X, Y, z]
        sampled = torch.where(inside[None], sampled, fill_t.to(sampled.dtype)[:, None, None, None])
        pieces.append(sampled.to(values.dtype) if reduce is None else reduce(sampled))
    return torch.cat(pieces, dim=-1)


class VolumePredictor:
    """Segment whole volumes with a 3D model the way its config preprocesses them.

    Args:
        model: maps ``[B, in_chans, X, Y, Z]`` to logits ``[B, K, X, Y, Z]``.
        cfg: the experiment config (``data.volume``, ``data.normalize``, ``evaluation``).
        roi_size: sliding-window size (default: ``evaluation.roi_size``, else the training crop, else the whole
            volume in one pass).
        overlap, blend_mode, sw_batch_size: sliding-window settings (default: ``evaluation``'s).
        tta: average over the identity and a flip of each spatial axis: the logits, or for a head with its own
            ``class_probabilities`` rule (connectivity) the probabilities, as windows are then blended too.
        device: where the model runs.
        progress: show MONAI's per-window progress bar.

    Example::

        >>> predictor = VolumePredictor(model, cfg, tta=True)  # doctest: +SKIP
        >>> pred = predictor(read_volume([Path("case.nii.gz")]), probabilities=True)  # doctest: +SKIP
        >>> pred.labels.shape, pred.probabilities.shape  # doctest: +SKIP
        ((512, 512, 90), (3, 512, 512, 90))
    """

    def __init__(self, model: nn.Module, cfg: Any, *, roi_size: Sequence[int] | None = None,
                 overlap: float | None = None, blend_mode: str | None = None, sw_batch_size: int | None = None,
                 tta: bool = False, device: str | torch.device = "cpu", progress: bool = False) -> None:
        from attnseg.datasets.transforms import Normalize

        ev = cfg.evaluation
        self.model = model
        self.roi_size = list(roi_size) if roi_size is not None else (ev.roi_size or cfg.data.training_crop)
        self.overlap = ev.overlap if overlap is None else overlap
        self.blend_mode = blend_mode or ev.blend_mode
        self.sw_batch_size = sw_batch_size or ev.sw_batch_size
        self.tta = tta
        self.device = torch.device(device)
        self.progress = progress
        self.preprocess = self._build_preprocessing(cfg.data.volume)
        norm = cfg.data.normalize
        self.normalize = Normalize(norm.mean, norm.std) if norm is not None else None

    @staticmethod
    def _build_preprocessing(volume_cfg: Any) -> Any:
        """The deterministic part of ``data.volume`` (no training crops); a label-driven foreground crop is
        dropped (there is no label at inference: the whole volume is predicted instead)."""
        if volume_cfg is None:
            return None
        from attnseg.datasets.volume_transforms import VolumeTransform

        updates: dict[str, Any] = {"crop": None, "rotate90": None, "flip_prob": (0.0, 0.0, 0.0)}
        if volume_cfg.crop_foreground is not None and volume_cfg.crop_foreground.source_key == "label":
            updates["crop_foreground"] = None
        return VolumeTransform(volume_cfg.model_copy(update=updates), train=False)

    def prepare(self, volume: VolumeInput) -> tuple[torch.Tensor, np.ndarray]:
        """``(image [1, C, *processed], processed affine)``: ``data.volume``'s preprocessing, then ``normalize``."""
        from monai.data import MetaTensor

        image = torch.from_numpy(np.ascontiguousarray(volume.image, dtype=np.float32))
        affine = np.asarray(volume.affine, np.float64)
        if self.preprocess is not None:
            sample = self.preprocess.prepare({"image": MetaTensor(image, affine=torch.from_numpy(affine)),
                                              "meta": {"id": volume.name}})
            image, affine = sample["image"], np.asarray(sample["meta"]["affine"], np.float64)
        if self.normalize is not None:
            image = self.normalize(image)
        return image[None], affine

    @torch.inference_mode()
    def logits(self, image: torch.Tensor, *, probabilities: bool = False) -> torch.Tensor:
        """Logits ``[1, K, *processed]`` of a prepared image, by sliding window (and flips with ``tta``); with
        ``probabilities`` the model's class probabilities, blended and averaged as probabilities."""
        roi = self.roi_size
        if roi is not None:
            # A window no larger than the volume: one that covers it gives exactly the whole-volume forward pass.
            roi = [min(r, s) for r, s in zip(roi, image.shape[2:])]
        predictor = probability_predictor(self.model) if probabilities else self.model

        def run(x: torch.Tensor) -> torch.Tensor:
            return predict_logits(predictor, x, roi_size=roi, overlap=self.overlap, blend_mode=self.blend_mode,
                                  sw_batch_size=self.sw_batch_size, progress=self.progress)

        image = image.to(self.device)
        return (flip_tta(run, image) if self.tta else run(image)).float().cpu()

    def __call__(self, volume: VolumeInput, *, probabilities: bool = False) -> VolumePrediction:
        """Labels (and optionally class probabilities) of ``volume`` on its own grid."""
        image, processed_affine = self.prepare(volume)
        if blends_probabilities(self.model):
            # The head's own rule (a connectivity head votes its direction channels into class probabilities), per
            # window and flip, so that overlaps and flips are averaged as probabilities.
            probs = self.logits(image, probabilities=True)[0]
        else:
            probs = class_probabilities(self.logits(image))[0]  # [K, *processed]
        single = probs.shape[0] == 1
        # Outside the processed volume: background (probability 1 of class 0; 0 for a one-channel sigmoid).
        fill = [0.0] if single else [1.0] + [0.0] * (probs.shape[0] - 1)
        src_shape = volume.image.shape[1:]

        def to_labels(p: torch.Tensor) -> torch.Tensor:  # [K, ...] -> [...]
            return label_map_of_probabilities(p[None])[0]

        if probabilities:
            on_source = resample_to_grid(probs, processed_affine, volume.affine, src_shape, fill=fill)
            labels = to_labels(on_source)
            prob_np = on_source.numpy().astype(np.float32)
        else:
            labels = resample_to_grid(probs, processed_affine, volume.affine, src_shape, fill=fill, reduce=to_labels)
            prob_np = None
        return VolumePrediction(labels.numpy(), prob_np, tuple(image.shape[2:]))
