"""Medical Segmentation Decathlon folders: the ``decathlon`` dataset (3D NIfTI volumes listed by ``dataset.json``).

A Decathlon task folder (``Task09_Spleen/``) holds ``dataset.json``, ``imagesTr/``, ``labelsTr/`` and
``imagesTs/``; derived datasets (BTCV's ``dataset_0.json``, ...) use the same JSON. Keys read:

- ``training``: ``[{"image": path, "label": path}, ...]``, the labelled cases. ``image`` may also be a list of
  paths, one per modality (stacked as channels). An integer ``fold`` in every entry is used by ``fold``.
- ``validation`` (optional; some derived datasets have it): more labelled cases, the ``val`` split.
- ``test``: ``[path, ...]`` (or ``[{"image": path}, ...]``), unlabelled images: the ``predict`` split.
- ``labels``: ``{"0": "background", "1": "spleen", ...}``, stored label value -> class name. Classes are
  indexed in order of value (values 0, 1, 2, 4 become classes 0..3); ``class_names`` and ``num_classes``
  come from it.
- ``modality``: ``{"0": "CT"}``, one entry per image channel; ``in_chans`` is its length.

Other keys (``name``, ``numTraining``, ``tensorImageSize``, ...) are kept in ``properties``, unchecked. Paths
are relative to the JSON file's folder (``./imagesTr/a.nii.gz`` or ``imagesTr/a.nii.gz``) or absolute. File
layouts (3D, 4D multi-modal ``[X, Y, Z, C]`` -> channels first) are those of :mod:`attnseg.datasets.nifti`.

Splits (``split``):

- ``val``: the JSON's ``validation`` list when it has one (and ``json_validation`` is on); else fold ``fold``
  of ``num_folds`` (the entries' own ``fold`` keys when every entry has one, else a seeded partition); else the
  ``val_ratio`` part of a seeded shuffle of ``training``.
- ``test``: Decathlon's ``test`` images have **no labels**, so ``test`` is held out from ``training``: the
  ``test_ratio`` part of the seeded shuffle, taken before ``val``. With ``test_ratio: 0`` (the default) it is
  the ``val`` cases, i.e. the held-out part of ``training``.
- ``train``: the rest of ``training``.
- ``predict``: the unlabelled ``test`` images, as samples without ``mask`` (for inference).

A ratio above 0 gets at least one case while ``train`` keeps one (as in ``folder2d``).

Samples: ``{"image": [C, X, Y, Z] float32, "mask": [X, Y, Z] int64, "meta": {"id", "path", "label_path",
"orig_size", "original_affine", "affine", "spacing"}}`` (plain tensors; ``orig_size`` and
``original_affine`` describe the file, ``affine`` and ``spacing`` the preprocessed sample). With ``data.volume``
the transform's preprocessing (orientation, spacing, intensity, foreground crop) runs once per case inside a
MONAI ``CacheDataset`` (``cache_rate`` of the cases, read by ``cache_num_workers`` threads when the dataset is
built) and its random crops and augmentations on every access; with ``data.augment`` (plain-torch 3D ops)
volumes are cached as stored. A random crop with ``num_samples > 1`` makes an item a list of samples
(flattened by :func:`attnseg.datasets.collate`).

Errors are :class:`~attnseg.errors.DataError` s naming the file: a missing or malformed ``dataset.json``
(missing keys, bad entries, duplicate cases), an empty split, and per case a missing or unreadable image or
label file, shape, channel or affine mismatch between them, label values outside ``labels``. The constructor
checks the headers of every case of the split (listing every bad case) and reads the cached ones;
``check()`` reads every case not cached and lists every bad one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from attnseg.datasets.folder2d import _check_items, _ratio_counts, ratio_split
from attnseg.datasets.volume_transforms import VolumeTransform, to_sample
from attnseg.errors import ConfigError, DataError
from attnseg.registry import DATASETS

__all__ = ["Decathlon", "read_dataset_json"]

SPLITS = ("train", "val", "test", "predict")
_REQUIRED = {"training": "the labelled cases", "labels": "label value -> class name",
             "modality": "one entry per image channel"}


def read_dataset_json(path: Path) -> dict[str, Any]:
    """The parsed ``dataset.json`` at ``path``, with its required keys checked (``training``, ``labels``,
    ``modality``).

    Raises:
        DataError: naming ``path``, for a missing file, invalid JSON, or missing or malformed keys.
    """
    if not path.is_file():
        folder = path.parent
        hint = ""
        if folder.is_dir():
            jsons = sorted(p.name for p in folder.glob("*.json"))
            hint = f"; {folder} holds {jsons}" if jsons else f"; {folder} holds no .json file"
        raise DataError(f"decathlon: dataset file not found: {path}{hint} (set data.dataset.json_file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"decathlon: {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"decathlon: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"decathlon: {path} must hold a JSON object, got {type(data).__name__}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        listed = ", ".join(f"'{k}' ({_REQUIRED[k]})" for k in missing)
        raise DataError(f"decathlon: {path} lacks the keys {listed}; it has {sorted(data)}")
    for key in ("labels", "modality"):
        table = data[key]
        if not isinstance(table, dict) or not table or not all(
                isinstance(k, str) and k.strip().lstrip("-").isdigit() and isinstance(v, str) for k, v in table.items()):
            raise DataError(f"decathlon: {path}: '{key}' must be a non-empty object of integer strings -> names, e.g. "
                            f"{{\"0\": \"background\", \"1\": \"liver\"}}; got {table!r}"[:400])
    for key in ("training", "validation", "test"):
        if key in data and not isinstance(data[key], list):
            raise DataError(f"decathlon: {path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _case_id(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mgz", ".img", ".hdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class Decathlon(Dataset):
    """A Decathlon-format dataset folder; see the module docstring.

    Args:
        split: 'train', 'val', 'test' or 'predict'.
        transform: a :class:`~attnseg.datasets.volume_transforms.VolumeTransform` (``data.volume``: its
            preprocessing is cached, its augmentation runs per access) or any callable on sample dicts
            (``data.augment``), or None.
        root: the task folder.
        json_file: the dataset JSON, relative to ``root`` (or absolute).
        val_ratio, test_ratio: fractions of ``training`` for ``val`` and ``test`` (seeded shuffle).
        fold, num_folds: use fold ``fold`` (0-based) of ``num_folds`` as ``val`` instead of ``val_ratio``.
        json_validation: use the JSON's ``validation`` list, when it has one, as ``val``.
        seed: seed of the shuffle and the fold partition.
        cache_rate: fraction of the split's cases whose preprocessed volumes are cached in memory.
        cache_num_workers: threads that fill the cache.
        ignore_index: a label value outside ``labels`` that is excluded from loss and metrics.

    Attributes: ``cases`` (:class:`~attnseg.datasets.nifti.Case` s of this split), ``num_classes``,
    ``class_names``, ``in_chans``, ``modalities``, ``properties`` (the JSON's other keys), ``spatial_dims`` (3),
    ``task`` ('segmentation'), ``ignore_index``.

    Example::

        >>> ds = Decathlon("train", None, root="data/Task09_Spleen", cache_rate=0.0)  # doctest: +SKIP
        >>> ds.class_names, ds.in_chans, ds[0]["image"].shape  # doctest: +SKIP
        (['background', 'spleen'], 1, torch.Size([1, 512, 512, 90]))
    """

    task = "segmentation"
    spatial_dims = 3

    def __init__(
        self,
        split: str,
        transform: Callable[[dict], Any] | None,
        root: str,
        json_file: str = "dataset.json",
        val_ratio: float = 0.2,
        test_ratio: float = 0.0,
        fold: int | None = None,
        num_folds: int = 5,
        json_validation: bool = True,
        seed: int = 0,
        cache_rate: float = 1.0,
        cache_num_workers: int = 0,
        ignore_index: int | None = None,
    ) -> None:
        from attnseg.datasets import nifti  # imports MONAI and nibabel: only when a Decathlon dataset is built

        name = "decathlon"
        if split not in SPLITS:
            raise ConfigError(f"{name}: split must be one of {list(SPLITS)}, got {split!r}")
        if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
            raise ConfigError(f"{name}: val_ratio and test_ratio must be >= 0 and sum to < 1, got {val_ratio=}, "
                              f"{test_ratio=}")
        if num_folds < 2:
            raise ConfigError(f"{name}: num_folds must be >= 2, got {num_folds}")
        if not 0 <= cache_rate <= 1 or cache_num_workers < 0:
            raise ConfigError(f"{name}: need 0 <= cache_rate <= 1 and cache_num_workers >= 0, got {cache_rate=}, "
                              f"{cache_num_workers=}")
        self.split = split
        self.transform = transform
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{name}: root folder not found: {self.root}")
        json_path = Path(json_file).expanduser()
        self.json_path = json_path if json_path.is_absolute() else self.root / json_path
        data = read_dataset_json(self.json_path)
        self.properties = {k: v for k, v in data.items() if k not in ("training", "validation", "test")}

        labels = sorted(((int(k), v) for k, v in data["labels"].items()), key=lambda kv: kv[0])
        self.label_values = [v for v, _ in labels]
        self.class_names = [n for _, n in labels]
        self.num_classes = len(labels)
        self.modalities = [n for _, n in sorted(((int(k), v) for k, v in data["modality"].items()))]
        self.in_chans = len(self.modalities)
        if ignore_index is not None and ignore_index in self.label_values:
            raise ConfigError(f"{name}: ignore_index {ignore_index} is a label value of {self.json_path} "
                              f"({self.label_values})")
        self.ignore_index = ignore_index

        training = [self._entry(e, "training", i, labelled=True) for i, e in enumerate(data["training"])]
        validation = [self._entry(e, "validation", i, labelled=True) for i, e in enumerate(data.get("validation") or [])]
        testing = [self._entry(e, "test", i, labelled=False) for i, e in enumerate(data.get("test") or [])]
        self._refuse_duplicates(training + (validation if json_validation else []))
        self.cases: list[nifti.Case] = self._select(split, training, validation if json_validation else [], testing,
                                                    val_ratio, test_ratio, fold, num_folds, seed)

        is_volume = isinstance(transform, VolumeTransform)
        if split == "predict" and is_volume and transform.cfg.crop_foreground is not None \
                and transform.cfg.crop_foreground.source_key == "label":
            raise ConfigError(f"{name}: the 'predict' split has no labels; crop_foreground.source_key 'label' cannot "
                              f"be used for it (use 'image')")
        prepare = transform.prepare if is_volume else _AsSample()
        self.loader = nifti.CaseLoader(prepare, self.label_values, self.in_chans, ignore_index)
        self._where = f"{name} ({self.json_path}, split '{split}')"
        problems = []
        for case in self.cases:
            try:
                self.loader.inspect(case)
            except DataError as e:
                problems.append(str(e))
        if problems:
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(f"{self._where}: {len(problems)} of {len(self.cases)} cases cannot be used:\n  "
                            + "\n  ".join(problems[:20]) + more)
        self._cache = self._build_cache(cache_rate, cache_num_workers)

    # -- dataset.json entries and splits -----------------------------------------------------------------
    def _path(self, value: Any, where: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"decathlon: {self.json_path}: {where} must be a file path string, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.json_path.parent / p

    def _entry(self, entry: Any, key: str, index: int, *, labelled: bool) -> Any:
        from attnseg.datasets.nifti import Case

        where = f"'{key}'[{index}]"
        if not labelled and isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry or (labelled and "label" not in entry):
            need = "{'image': path, 'label': path}" if labelled else "a path or {'image': path}"
            raise DataError(f"decathlon: {self.json_path}: {where} must be {need}, got {entry!r}"[:400])
        raw = entry["image"]
        images = tuple(self._path(p, f"{where}.image") for p in (raw if isinstance(raw, list) else [raw]))
        if not images:
            raise DataError(f"decathlon: {self.json_path}: {where}.image is an empty list")
        label = self._path(entry["label"], f"{where}.label") if labelled else None
        fold = entry.get("fold")
        if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int)):
            raise DataError(f"decathlon: {self.json_path}: {where}.fold must be an integer, got {fold!r}")
        return Case(_case_id(str(images[0])), images, label, fold)

    def _refuse_duplicates(self, cases: list[Any]) -> None:
        seen: set[Path] = set()
        for case in cases:
            if case.images[0] in seen:
                raise DataError(f"decathlon: {self.json_path}: the case '{case.id}' ({case.images[0]}) is listed "
                                f"twice in 'training'/'validation' (set json_validation: false when 'validation' "
                                f"repeats 'training' cases)")
            seen.add(case.images[0])

    def _select(self, split: str, training: list[Any], validation: list[Any], testing: list[Any], val_ratio: float,
                test_ratio: float, fold: int | None, num_folds: int, seed: int) -> list[Any]:
        n = len(training)
        if split == "predict":
            chosen = testing
            why = "its 'test' list is empty"
        elif validation or fold is not None:
            test_idx = ratio_split(n, "test", 0.0, test_ratio, seed)
            rest = ratio_split(n, "train", 0.0, test_ratio, seed)
            if validation:
                val, train = validation, [training[i] for i in rest]
            else:
                folds = self._folds([training[i] for i in rest], fold, num_folds, seed)
                val = [c for c, f in folds if f == fold]
                train = [c for c, f in folds if f != fold]
            chosen = {"train": train, "val": val,
                      "test": [training[i] for i in test_idx] or val}[split]
            why = f"{n} 'training' cases with {test_ratio=}" + (f", {fold=} of {num_folds}" if fold is not None else "")
        else:
            n_val, n_test = _ratio_counts(n, val_ratio, test_ratio)
            part = "val" if split == "test" and n_test == 0 else split
            chosen = [training[i] for i in ratio_split(n, part, val_ratio, test_ratio, seed)]
            why = f"{n} 'training' cases with {val_ratio=}, {test_ratio=}"
        if not chosen:
            raise DataError(f"decathlon: the '{split}' split of {self.json_path} is empty ({why})")
        return chosen

    def _folds(self, cases: list[Any], fold: int, num_folds: int, seed: int) -> list[tuple[Any, int]]:
        """``(case, fold)`` pairs: the entries' own ``fold`` keys when all have one, else a seeded partition."""
        if cases and all(c.fold is not None for c in cases):
            present = sorted({c.fold for c in cases})
            if fold not in present:
                raise ConfigError(f"decathlon: fold {fold} is not among the folds of {self.json_path} ({present})")
            return [(c, c.fold) for c in cases]
        if not 0 <= fold < num_folds:
            raise ConfigError(f"decathlon: fold must be in 0..{num_folds - 1} (num_folds={num_folds}), got {fold}")
        order = np.random.default_rng([seed, num_folds]).permutation(len(cases))
        assigned = np.empty(len(cases), dtype=np.int64)
        for f, part in enumerate(np.array_split(order, num_folds)):
            assigned[part] = f
        return [(c, int(f)) for c, f in zip(cases, assigned)]

    # -- loading -----------------------------------------------------------------------------------------
    def _build_cache(self, cache_rate: float, num_workers: int) -> Any:
        from monai.data import CacheDataset

        try:
            return CacheDataset(self.cases, transform=self.loader, cache_rate=cache_rate,
                                num_workers=max(num_workers, 1), progress=False, copy_cache=False)
        except RuntimeError as e:  # MONAI wraps the loader's DataError
            error = _data_error(e)
            if error is None:
                raise
            # Read every case once more, so that one message lists every bad one (this path runs only on failure).
            _check_items(self._where, len(self.cases), lambda i: self.loader(self.cases[i]), 20)
            raise error from None

    def _load(self, index: int) -> dict[str, Any]:
        try:
            return self._cache[index]
        except RuntimeError as e:
            error = _data_error(e)
            if error is None:
                raise
            raise error from None

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any] | list[dict[str, Any]]:
        cached = self._load(index)
        # Cached tensors are shared by every access: nothing below writes into them (MONAI ops return new tensors
        # or views, collate copies), and meta is copied.
        sample = {**cached, "meta": dict(cached["meta"])}
        if isinstance(self.transform, VolumeTransform):
            return self.transform.augment(sample)
        if "mask" in sample:
            sample["mask"] = sample["mask"].long()
        return self.transform(sample) if self.transform is not None else sample

    def check(self, max_errors: int = 20) -> None:
        """Read every case of this split that is not cached (cached ones were read when the dataset was built);
        one :class:`DataError` lists every bad case (up to ``max_errors``)."""
        cached = getattr(self._cache, "cache_num", 0)
        todo = list(range(cached, len(self.cases)))
        _check_items(self._where, len(todo), lambda i: self.loader(self.cases[todo[i]]), max_errors)

    def __repr__(self) -> str:
        return (f"decathlon(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.class_names}, modalities={self.modalities})")


class _AsSample:
    """``prepare`` without preprocessing (``data.volume`` not set): the MONAI dict as a sample, compact mask."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        return to_sample(data, compact=True)


def _data_error(e: BaseException) -> DataError | None:
    """The :class:`DataError` in the ``__cause__`` chain of ``e`` (MONAI re-raises as ``RuntimeError``)."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, DataError):
            return cause
        cause = cause.__cause__
    return None


DATASETS.register("decathlon", cls=Decathlon)(Decathlon)
