"""Plain folders of NIfTI image/label pairs: the ``nifti_folder`` dataset (3D).

Layout (folder names and suffixes are arguments)::

    root/images/case_001.nii.gz     root/labels/case_001.nii.gz
    root/images/case_002.nii.gz     root/labels/case_002.nii.gz

An image and its label are matched by case name: the file name without ``.nii.gz`` / ``.nii`` and without
``image_suffix`` (labels: without ``label_suffix``). nnU-Net's raw layout (``imagesTr/case_001_0000.nii.gz``,
``labelsTr/case_001.nii.gz``) is ``images_dir: imagesTr, labels_dir: labelsTr, image_suffix: _0000``; several
modalities, one file per modality, are a list of suffixes (``image_suffix: [_0000, _0001]``) stacked as
channels in that order. A 4D file ``[X, Y, Z, C]`` is C channels (:mod:`attnseg.datasets.nifti`).
``predict_dir`` (e.g. ``imagesTs``) holds unlabelled images, the ``predict`` split.

Class map: ``classes: {0: background, 1: brain}`` (stored label value -> class name; classes are indexed in
order of value, so values 0, 1, 4 become classes 0..2), ``classes: [background, brain]`` (values 0..n-1), or
``num_classes: n`` alone (values 0..n-1, names ``class0``...).

Splits are those of ``decathlon`` over the labelled cases (sorted by name): a seeded ``val_ratio`` /
``test_ratio`` shuffle, or fold ``fold`` of ``num_folds`` (seeded partition); ``test`` is the ``val`` cases when
``test_ratio`` is 0. ``split_file`` replaces them with listed case names: a JSON object
``{"train": [...], "val": [...], "test": [...]}`` or a ``{split}.txt`` path pattern (as ``folder2d``); without a
``test`` list ``test`` is ``val``. Samples, caching (``cache_rate``, ``cache_dir``) and ``check()`` are those of
:class:`~attnseg.datasets.volume_cases.VolumeCaseDataset`.

Errors are :class:`~attnseg.errors.DataError` s naming the case or file: a missing folder, no images, an image
without a label, a label without an image, a missing modality file, two files for one case, an unreadable file,
image/label shape or affine mismatch, label values outside the class map, an empty split.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnseg.datasets.folder2d import _read_split_file, _require_dir
from attnseg.datasets.volume_cases import VolumeCaseDataset, case_id, check_common_args
from attnseg.errors import ConfigError, DataError
from attnseg.registry import DATASETS

__all__ = ["NiftiFolder", "class_map"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def class_map(name: str, classes: dict[int, str] | list[str] | None,
              num_classes: int | None) -> tuple[list[int], list[str]]:
    """``(label_values, class_names)`` from ``classes`` (value -> name, or names of values 0..n-1) and/or
    ``num_classes``.

    Raises:
        ConfigError: when neither is given, they disagree, or values are not distinct integers >= 0.
    """
    if classes is None:
        if num_classes is None:
            raise ConfigError(f"{name}: give classes ({{0: background, 1: ...}} or a list of names) or num_classes")
        if num_classes < 1:
            raise ConfigError(f"{name}: num_classes must be >= 1, got {num_classes}")
        return list(range(num_classes)), [f"class{i}" for i in range(num_classes)]
    if isinstance(classes, dict):
        try:
            pairs = sorted(((int(k), str(v)) for k, v in classes.items()), key=lambda kv: kv[0])
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: classes keys must be integer label values, got {list(classes)}") from None
    else:
        pairs = [(i, str(n)) for i, n in enumerate(classes)]
    if not pairs or pairs[0][0] < 0:
        raise ConfigError(f"{name}: classes must map label values >= 0 to names, got {classes!r}")
    if num_classes is not None and num_classes != len(pairs):
        raise ConfigError(f"{name}: num_classes is {num_classes} but classes lists {len(pairs)} classes")
    return [v for v, _ in pairs], [n for _, n in pairs]


def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))


class NiftiFolder(VolumeCaseDataset):
    """NIfTI image/label folders; see the module docstring.

    Args:
        split: 'train', 'val', 'test' or 'predict'.
        transform: a :class:`~attnseg.datasets.volume_transforms.VolumeTransform` (``data.volume``), any
            callable on sample dicts, or None.
        root: the dataset folder.
        images_dir, labels_dir: image and label folders under ``root``.
        image_suffix: the end of each image's case name (``_0000``), or a list of them, one file per modality.
        label_suffix: the end of each label's case name.
        predict_dir: a folder under ``root`` of unlabelled images (the ``predict`` split), or None.
        classes: stored label value -> class name, or a list of names for values 0..n-1.
        num_classes: the number of classes when ``classes`` is not given (values 0..n-1).
        modalities: names of the image channels; ``in_chans`` is its length (default: read from the files).
        split_file: a JSON or ``{split}.txt`` file of case names per split, relative to ``root`` or absolute.
        val_ratio, test_ratio, fold, num_folds, seed: the seeded splits (as ``decathlon``).
        cache_rate, cache_num_workers: the in-memory cache of preprocessed cases.
        ignore_index: a label value outside the class map that is excluded from loss and metrics.
        cache_dir: a folder for the persistent cache of preprocessed cases (:mod:`attnseg.datasets.case_cache`).
        train_repeats: times each case of the ``train`` split is listed per epoch.

    Attributes: ``cases``, ``num_classes``, ``class_names``, ``label_values``, ``in_chans``, ``modalities``,
    ``spatial_dims`` (3), ``task`` ('segmentation'), ``ignore_index``.

    Example::

        >>> ds = NiftiFolder("train", None, root="data/brains", classes={0: "background", 1: "brain"},
        ...                  cache_rate=0.0)  # doctest: +SKIP
        >>> ds.class_names, ds[0]["image"].shape  # doctest: +SKIP
        (['background', 'brain'], torch.Size([1, 181, 217, 181]))
    """

    name = "nifti_folder"

    def __init__(
        self,
        split: str,
        transform: Callable[[dict], Any] | None,
        root: str,
        images_dir: str = "images",
        labels_dir: str = "labels",
        image_suffix: str | list[str] = "",
        label_suffix: str = "",
        predict_dir: str | None = None,
        classes: dict[int, str] | list[str] | None = None,
        num_classes: int | None = None,
        modalities: list[str] | None = None,
        split_file: str | None = None,
        val_ratio: float = 0.2,
        test_ratio: float = 0.0,
        fold: int | None = None,
        num_folds: int = 5,
        seed: int = 0,
        cache_rate: float = 1.0,
        cache_num_workers: int = 0,
        ignore_index: int | None = None,
        cache_dir: str | None = None,
        train_repeats: int = 1,
    ) -> None:
        name = self.name
        check_common_args(name, split, val_ratio, test_ratio, num_folds, cache_rate, cache_num_workers)
        self.label_values, self.class_names = class_map(name, classes, num_classes)
        self.num_classes = len(self.label_values)
        if ignore_index is not None and ignore_index in self.label_values:
            raise ConfigError(f"{name}: ignore_index {ignore_index} is a label value of classes ({self.label_values})")
        suffixes = [image_suffix] if isinstance(image_suffix, str) else list(image_suffix)
        if not suffixes or len(set(suffixes)) != len(suffixes):
            raise ConfigError(f"{name}: image_suffix must be a string or a list of distinct strings, got "
                              f"{image_suffix!r}")
        if modalities is not None and not modalities:
            raise ConfigError(f"{name}: modalities must not be an empty list")
        self.split = split
        self.transform = transform
        self.ignore_index = ignore_index
        self.root = Path(root).expanduser()
        _require_dir(name, self.root, "root folder")
        images_path, labels_path = self.root / images_dir, self.root / labels_dir
        _require_dir(name, images_path, f"images folder (images_dir={images_dir!r})")
        _require_dir(name, labels_path, f"labels folder (labels_dir={labels_dir!r})")

        images = self._images_by_case(images_path, suffixes)
        labels = self._labels_by_case(labels_path, label_suffix)
        no_label = [c for c in images if c not in labels]
        no_image = [c for c in labels if c not in images]
        if no_label:
            raise DataError(f"{name}: {len(no_label)} of {len(images)} images in {images_path} have no label in "
                            f"{labels_path}: cases {no_label[:5]}{' ...' if len(no_label) > 5 else ''} (the label of "
                            f"case <name> is <name>{label_suffix}.nii.gz)")
        if no_image:
            raise DataError(f"{name}: {len(no_image)} labels in {labels_path} have no image in {images_path}: "
                            f"{[labels[c].name for c in no_image[:5]]}{' ...' if len(no_image) > 5 else ''} "
                            f"(images are <name>{suffixes[0]}.nii.gz)")
        from attnseg.datasets.nifti import Case

        labelled = [Case(c, images[c], labels[c]) for c in sorted(images)]
        testing: list[Any] = []
        if predict_dir is not None:
            predict_path = self.root / predict_dir
            _require_dir(name, predict_path, f"predict folder (predict_dir={predict_dir!r})")
            unlabelled = self._images_by_case(predict_path, suffixes)
            testing = [Case(c, unlabelled[c]) for c in sorted(unlabelled)]

        if split_file is not None and split != "predict":
            cases = self._listed(split_file, split, labelled)
        else:
            cases = self._select(split, labelled, [], testing, val_ratio=val_ratio, test_ratio=test_ratio,
                                 fold=fold, num_folds=num_folds, seed=seed, source=str(self.root),
                                 labelled_key="labelled",
                                 predict_why="no predict_dir is set" if predict_dir is None
                                 else f"{predict_dir} holds no images")
        self.in_chans = len(modalities) if modalities is not None else self._channels_of(cases[0])
        self.modalities = list(modalities) if modalities is not None else [f"channel{i}" for i in
                                                                           range(self.in_chans)]
        self._start_loading(cases, where=f"{name} ({self.root}, split '{split}')", cache_rate=cache_rate,
                            cache_num_workers=cache_num_workers, cache_dir=cache_dir,
                            train_repeats=train_repeats)

    # -- finding cases -----------------------------------------------------------------------------------
    def _images_by_case(self, folder: Path, suffixes: list[str]) -> dict[str, tuple[Path, ...]]:
        """``{case: (file per suffix, ...)}`` of the NIfTI files in ``folder``."""
        files = _volume_files(folder)
        if not files:
            others = sorted(p.name for p in folder.iterdir())[:3]
            raise DataError(f"{self.name}: no NIfTI images (.nii.gz, .nii) in {folder}"
                            + (f"; it holds e.g. {others}" if others else "; it is empty"))
        found: dict[str, dict[str, Path]] = {}
        # longest suffix first, so '_0001' is not taken for '' or '1'
        by_length = sorted(suffixes, key=len, reverse=True)
        for path in files:
            stem = case_id(path)
            suffix = next((s for s in by_length if stem.endswith(s) and len(stem) > len(s)), None)
            if suffix is None:
                raise DataError(f"{self.name}: image {path} does not end with the image suffix "
                                f"{suffixes if len(suffixes) > 1 else suffixes[0]!r} (set image_suffix)")
            case = stem[: len(stem) - len(suffix)] if suffix else stem
            per_case = found.setdefault(case, {})
            if suffix in per_case:
                raise DataError(f"{self.name}: case '{case}' has two image files for suffix {suffix!r}: "
                                f"{per_case[suffix].name} and {path.name} (keep one)")
            per_case[suffix] = path
        out = {}
        for case, per_case in found.items():
            missing = [s for s in suffixes if s not in per_case]
            if missing:
                raise DataError(f"{self.name}: case '{case}' in {folder} lacks the modality file(s) "
                                f"{[case + s + '.nii.gz' for s in missing]} (it has "
                                f"{sorted(p.name for p in per_case.values())})")
            out[case] = tuple(per_case[s] for s in suffixes)
        return out

    def _labels_by_case(self, folder: Path, suffix: str) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for path in _volume_files(folder):
            stem = case_id(path)
            if suffix and not stem.endswith(suffix):
                raise DataError(f"{self.name}: label {path} does not end with label_suffix {suffix!r}")
            case = stem[: len(stem) - len(suffix)] if suffix else stem
            if case in out:
                raise DataError(f"{self.name}: case '{case}' has two label files: {out[case].name} and {path.name} "
                                f"(keep one)")
            out[case] = path
        return out

    def _listed(self, split_file: str, split: str, labelled: list[Any]) -> list[Any]:
        """The cases ``split_file`` lists for ``split`` (``test`` falls back to ``val``)."""
        by_id = {c.id: c for c in labelled}
        names = _read_split_file(self.name, self.root, split_file, split, by_id)
        if split == "test" and not names:
            names = _read_split_file(self.name, self.root, split_file, "val", by_id)
        if not names:
            raise DataError(f"{self.name}: the '{split}' split of {self.root} is empty: split file {split_file} "
                            f"lists no cases for it")
        return [by_id[n] for n in names]

    def _channels_of(self, case: Any) -> int:
        """Image channels of ``case`` from its headers (every case is then checked against it)."""
        from attnseg.datasets.nifti import read_channels

        try:
            return read_channels(case.images)
        except DataError as e:
            raise DataError(f"{self.name}: case '{case.id}': {e}") from None

    def __repr__(self) -> str:
        return (f"nifti_folder(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.class_names})")


DATASETS.register("nifti_folder", cls=NiftiFolder)(NiftiFolder)
