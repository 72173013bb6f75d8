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
(flattened by :func:`attnseg.datasets.collate`). With ``cache_dir`` each preprocessed case is also written to
disk once, keyed by its files and the preprocessing, and later runs read it from there instead of the NIfTI files
(:mod:`attnseg.datasets.case_cache`).

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

from attnseg.datasets.volume_cases import VolumeCaseDataset, case_id, check_common_args
from attnseg.errors import ConfigError, DataError
from attnseg.registry import DATASETS

__all__ = ["Decathlon", "read_dataset_json"]

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


class Decathlon(VolumeCaseDataset):
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
        cache_dir: a folder where each preprocessed case is also written once and read back by later runs
            (:mod:`attnseg.datasets.case_cache`); None: no disk cache.
        train_repeats: times each case of the ``train`` split is listed per epoch (e.g. 50 with a single
            training volume, so that an epoch is 50 random crops rather than one).

    Attributes: ``cases`` (:class:`~attnseg.datasets.nifti.Case` s of this split), ``num_classes``,
    ``class_names``, ``in_chans``, ``modalities``, ``properties`` (the JSON's other keys), ``spatial_dims`` (3),
    ``task`` ('segmentation'), ``ignore_index``.

    Example::

        >>> ds = Decathlon("train", None, root="data/Task09_Spleen", cache_rate=0.0)  # doctest: +SKIP
        >>> ds.class_names, ds.in_chans, ds[0]["image"].shape  # doctest: +SKIP
        (['background', 'spleen'], 1, torch.Size([1, 512, 512, 90]))
    """

    name = "decathlon"

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
        cache_dir: str | None = None,
        train_repeats: int = 1,
    ) -> None:
        name = self.name
        check_common_args(name, split, val_ratio, test_ratio, num_folds, cache_rate, cache_num_workers)
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
        cases = self._select(split, training, validation if json_validation else [], testing, val_ratio=val_ratio,
                             test_ratio=test_ratio, fold=fold, num_folds=num_folds, seed=seed,
                             source=str(self.json_path), labelled_key="training",
                             predict_why="its 'test' list is empty")
        self._start_loading(cases, where=f"{name} ({self.json_path}, split '{split}')", cache_rate=cache_rate,
                            cache_num_workers=cache_num_workers, cache_dir=cache_dir,
                            train_repeats=train_repeats)

    # -- dataset.json entries ----------------------------------------------------------------------------
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
        return Case(case_id(images[0]), images, label, fold)

    def _refuse_duplicates(self, cases: list[Any]) -> None:
        seen: set[Path] = set()
        for case in cases:
            if case.images[0] in seen:
                raise DataError(f"decathlon: {self.json_path}: the case '{case.id}' ({case.images[0]}) is listed "
                                f"twice in 'training'/'validation' (set json_validation: false when 'validation' "
                                f"repeats 'training' cases)")
            seen.add(case.images[0])

    def __repr__(self) -> str:
        return (f"decathlon(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.class_names}, modalities={self.modalities})")


DATASETS.register("decathlon", cls=Decathlon)(Decathlon)
