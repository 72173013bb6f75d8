"""What every 3D case-list dataset shares (``decathlon``, ``nifti_folder``): argument checks, the seeded
ratio / fold / listed splits, and loading cases through :class:`~attnseg.datasets.nifti.CaseLoader` into an
in-memory MONAI ``CacheDataset``, optionally backed by a persistent on-disk cache
(:mod:`attnseg.datasets.case_cache`).

A subclass finds its cases (from a JSON list, from folders) and calls, in its constructor,
:meth:`VolumeCaseDataset._select` to pick the split's cases, then :meth:`VolumeCaseDataset._start_loading`.

Samples: ``{"image": [C, X, Y, Z] float32, "mask": [X, Y, Z] int64, "meta": {...}}``; see
:mod:`attnseg.datasets.decathlon` for the keys and the split rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from attnseg.datasets.folder2d import _check_items, _ratio_counts, ratio_split
from attnseg.datasets.volume_transforms import VolumeTransform, to_sample
from attnseg.errors import ConfigError, DataError

__all__ = ["SPLITS", "VOLUME_SUFFIXES", "VolumeCaseDataset", "case_id", "check_common_args"]

SPLITS = ("train", "val", "test", "predict")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".img", ".hdr")


def case_id(path: str | Path) -> str:
    """The file name of ``path`` without its volume suffix (``a/case_001.nii.gz`` -> ``case_001``)."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_common_args(name: str, split: str, val_ratio: float, test_ratio: float, num_folds: int,
                      cache_rate: float, cache_num_workers: int) -> None:
    """Refuse an unknown split and out-of-range ratios, fold counts and cache settings (:class:`ConfigError`)."""
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


class VolumeCaseDataset(Dataset):
    """Base of the 3D datasets built from a list of :class:`~attnseg.datasets.nifti.Case` s.

    Subclasses set ``name`` (for messages), ``label_values``, ``class_names``, ``num_classes``, ``in_chans``,
    ``ignore_index``, ``split`` and ``transform``, then call :meth:`_select` and :meth:`_start_loading`.

    Attributes after loading: ``cases`` (this split's cases), ``loader`` (the case reader: a
    :class:`~attnseg.datasets.nifti.CaseLoader`, wrapped by a persistent cache when ``cache_dir`` is set).
    """

    task = "segmentation"
    spatial_dims = 3
    name = "volumes"

    # -- splits ------------------------------------------------------------------------------------------
    def _select(self, split: str, training: Sequence[Any], validation: Sequence[Any], testing: Sequence[Any], *,
                val_ratio: float, test_ratio: float, fold: int | None, num_folds: int, seed: int, source: str,
                labelled_key: str, predict_why: str) -> list[Any]:
        """The cases of ``split``.

        ``training``: labelled cases that ratios and folds partition; ``validation``: an explicit ``val`` list
        (when non-empty it replaces ratio and fold); ``testing``: unlabelled cases, the ``predict`` split.
        ``test`` is the ``test_ratio`` part of ``training`` or, when that is 0, the ``val`` cases. ``source``
        and ``labelled_key`` name the origin of the lists in messages.

        Raises:
            DataError: when the split is empty (saying why).
            ConfigError: for a fold outside the folds.
        """
        n = len(training)
        if split == "predict":
            chosen = list(testing)
            why = predict_why
        elif validation or fold is not None:
            test_idx = ratio_split(n, "test", 0.0, test_ratio, seed)
            rest = ratio_split(n, "train", 0.0, test_ratio, seed)
            if validation:
                val, train = list(validation), [training[i] for i in rest]
            else:
                folds = self._folds([training[i] for i in rest], fold, num_folds, seed, source)
                val = [c for c, f in folds if f == fold]
                train = [c for c, f in folds if f != fold]
            chosen = {"train": train, "val": val,
                      "test": [training[i] for i in test_idx] or val}[split]
            why = (f"{n} '{labelled_key}' cases with {test_ratio=}"
                   + (f", {fold=} of {num_folds}" if fold is not None else ""))
        else:
            _, n_test = _ratio_counts(n, val_ratio, test_ratio)
            part = "val" if split == "test" and n_test == 0 else split
            chosen = [training[i] for i in ratio_split(n, part, val_ratio, test_ratio, seed)]
            why = f"{n} '{labelled_key}' cases with {val_ratio=}, {test_ratio=}"
        if not chosen:
            raise DataError(f"{self.name}: the '{split}' split of {source} is empty ({why})")
        return chosen

    def _folds(self, cases: list[Any], fold: int, num_folds: int, seed: int,
               source: str) -> list[tuple[Any, int]]:
        """``(case, fold)`` pairs: the cases' own ``fold`` keys when all have one, else a seeded partition."""
        if cases and all(c.fold is not None for c in cases):
            present = sorted({c.fold for c in cases})
            if fold not in present:
                raise ConfigError(f"{self.name}: fold {fold} is not among the folds of {source} ({present})")
            return [(c, c.fold) for c in cases]
        if not 0 <= fold < num_folds:
            raise ConfigError(f"{self.name}: fold must be in 0..{num_folds - 1} (num_folds={num_folds}), got {fold}")
        order = np.random.default_rng([seed, num_folds]).permutation(len(cases))
        assigned = np.empty(len(cases), dtype=np.int64)
        for f, part in enumerate(np.array_split(order, num_folds)):
            assigned[part] = f
        return [(c, int(f)) for c, f in zip(cases, assigned)]

    # -- loading -----------------------------------------------------------------------------------------
    def _start_loading(self, cases: list[Any], *, where: str, cache_rate: float, cache_num_workers: int,
                       cache_dir: str | Path | None, train_repeats: int = 1) -> None:
        """Check the headers of every case (one :class:`DataError` lists every bad case), then fill the cache.

        ``train_repeats``: in the ``train`` split each case is listed that many times per epoch (an epoch of a
        one-volume training set is then ``train_repeats`` steps, not one).
        """
        from attnseg.datasets import nifti

        if train_repeats < 1:
            raise ConfigError(f"{self.name}: train_repeats must be >= 1, got {train_repeats}")
        self.cases = cases
        self.repeats = train_repeats if self.split == "train" else 1
        transform = self.transform
        is_volume = isinstance(transform, VolumeTransform)
        if self.split == "predict" and is_volume and transform.cfg.crop_foreground is not None \
                and transform.cfg.crop_foreground.source_key == "label":
            raise ConfigError(f"{self.name}: the 'predict' split has no labels; crop_foreground.source_key 'label' "
                              f"cannot be used for it (use 'image')")
        prepare = transform.prepare if is_volume else _AsSample()
        loader = nifti.CaseLoader(prepare, self.label_values, self.in_chans, self.ignore_index)
        if cache_dir is not None:
            from attnseg.datasets.case_cache import PersistentCaseLoader, preprocessing_fingerprint

            fingerprint = preprocessing_fingerprint(transform if is_volume else None, self.label_values,
                                                    self.in_chans, self.ignore_index)
            loader = PersistentCaseLoader(loader, cache_dir, fingerprint)
        self.loader = loader
        self._where = where
        problems = []
        for case in self.cases:
            try:
                self.loader.inspect(case)
            except DataError as e:
                problems.append(str(e))
        if problems:
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(f"{where}: {len(problems)} of {len(self.cases)} cases cannot be used:\n  "
                            + "\n  ".join(problems[:20]) + more)
        self._cache = self._build_cache(cache_rate, cache_num_workers)

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

    def prepared(self, index: int) -> dict[str, Any]:
        """Case ``index`` after the deterministic preprocessing only (the cached sample, mask in its compact
        integer type); callers must not write into its tensors."""
        return self._load(index)

    def __len__(self) -> int:
        return len(self.cases) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any] | list[dict[str, Any]]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} items")
        cached = self._load(index % len(self.cases))
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

