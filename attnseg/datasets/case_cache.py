"""A persistent on-disk cache of preprocessed 3D cases (``cache_dir`` of ``decathlon`` and ``nifti_folder``).

Reading, reorienting and resampling a volume costs seconds per case; MONAI's ``CacheDataset`` keeps the result
for one run only. With ``cache_dir`` every preprocessed case is also written to disk once and later runs read it
back, like MONAI's ``PersistentDataset``, but:

- **Key.** A case's file is ``<cache_dir>/<case id>.<key>.pt`` where ``key`` is a SHA-256 of the case's files
  (absolute path, modification time in ns, size; image(s) and label) and of the preprocessing fingerprint: the
  deterministic part of ``data.volume`` (``orientation``, ``spacing``, ``intensity``, ``crop_foreground``), the
  label values, ``in_chans``, ``ignore_index``, the MONAI version and this module's format version. Touching or
  replacing a file, or changing the preprocessing, gives a new key, so the stale entry is never read (it stays
  on disk until the folder is cleared; deleting the folder at any time is safe).
- **Writes are atomic** (temporary file in the same folder, fsync, rename): a run killed mid-write leaves no
  half-written entry, and concurrent runs writing the same case write the same bytes.
- **Loads are safe**: ``torch.load(weights_only=True)``; entries hold only tensors and plain values (numpy
  arrays of ``meta`` are stored as tensors and turned back). An unreadable entry is recomputed and replaced.

Only the deterministic preprocessing is cached; random crops and augmentation still run on every access.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform

from attnseg.checkpoint import save_state_dict_atomic
from attnseg.errors import ConfigError

__all__ = ["FORMAT_VERSION", "PersistentCaseLoader", "preprocessing_fingerprint"]

FORMAT_VERSION = 1
_PREPROCESSING_KEYS = {"orientation", "spacing", "intensity", "crop_foreground"}


def preprocessing_fingerprint(transform: Any, label_values: list[int], in_chans: int | None,
                              ignore_index: int | None) -> dict[str, Any]:
    """A JSON-able description of everything that shapes a cached case besides its files.

    Args:
        transform: the :class:`~attnseg.datasets.volume_transforms.VolumeTransform` whose preprocessing is
            cached, or None (volumes cached as stored).
        label_values: stored label value of each class (the class map).
        in_chans: expected image channels.
        ignore_index: label value kept as it is.
    """
    import monai

    preprocess = None
    if transform is not None:
        preprocess = transform.cfg.model_dump(mode="json", include=_PREPROCESSING_KEYS)
    return {"format": FORMAT_VERSION, "monai": monai.__version__, "preprocess": preprocess,
            "label_values": [int(v) for v in label_values], "in_chans": in_chans, "ignore_index": ignore_index}


def _safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)[:80] or "case"


class PersistentCaseLoader(Transform):
    """Wraps a :class:`~attnseg.datasets.nifti.CaseLoader`: a case is read from ``cache_dir`` when an entry with
    its key exists, else loaded by the wrapped loader and written there.

    A MONAI ``Transform`` (not random), so a ``CacheDataset`` over it also keeps the cases in memory.

    Args:
        loader: the case reader and preprocessor (``loader(case) -> sample``, ``loader.inspect(case)``).
        cache_dir: the cache folder (created when missing).
        fingerprint: :func:`preprocessing_fingerprint` of the preprocessing ``loader`` applies.

    Raises:
        ConfigError: when ``cache_dir`` exists and is not a folder, or cannot be created.
    """

    def __init__(self, loader: Any, cache_dir: str | Path, fingerprint: dict[str, Any]) -> None:
        self.loader = loader
        self.cache_dir = Path(cache_dir).expanduser()
        self.fingerprint = fingerprint
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"cache_dir {self.cache_dir} exists and is not a folder") from None
        except OSError as e:
            raise ConfigError(f"cannot create cache_dir {self.cache_dir}: {e}") from None

    def inspect(self, case: Any) -> None:
        """The wrapped loader's header check of ``case``."""
        self.loader.inspect(case)

    def key(self, case: Any) -> str | None:
        """The SHA-256 hex key of ``case`` (its files' paths, mtimes and sizes, and the fingerprint); None when a
        file cannot be stat'ed (the wrapped loader then reports it)."""
        files = []
        for path in (*case.images, *([case.label] if case.label is not None else [])):
            try:
                st = Path(path).stat()
            except OSError:
                return None
            files.append([str(Path(path).resolve()), st.st_mtime_ns, st.st_size])
        text = json.dumps({"id": case.id, "files": files, "fingerprint": self.fingerprint}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def path(self, case: Any) -> Path | None:
        """The cache file of ``case``, or None when its key cannot be computed."""
        key = self.key(case)
        return None if key is None else self.cache_dir / f"{_safe_name(case.id)}.{key[:24]}.pt"

    def __call__(self, case: Any) -> dict[str, Any]:
        path = self.path(case)
        if path is not None and path.is_file():
            try:
                return _unpack(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - a damaged entry is rebuilt, whatever unpickling raised
                warnings.warn(f"case cache entry {path} is unreadable ({type(e).__name__}: {e}); rebuilding it",
                              stacklevel=2)
        sample = self.loader(case)
        if path is not None:
            save_state_dict_atomic(_pack(sample), path)
        return sample

    def __repr__(self) -> str:
        return f"PersistentCaseLoader(cache_dir={str(self.cache_dir)!r})"


def _pack(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample as plain data ``weights_only`` loading accepts: numpy arrays in ``meta`` become tensors."""
    meta = dict(sample.get("meta") or {})
    arrays = sorted(k for k, v in meta.items() if isinstance(v, np.ndarray))
    for k in arrays:
        meta[k] = torch.from_numpy(np.ascontiguousarray(meta[k]))
    out = {"format": FORMAT_VERSION, "image": sample["image"], "meta": meta, "array_keys": arrays}
    if sample.get("mask") is not None:
        out["mask"] = sample["mask"]
    return out


def _unpack(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or not isinstance(data.get("image"),
                                                                                           torch.Tensor):
        raise ValueError(f"not an attnseg case cache entry of format {FORMAT_VERSION}")
    meta = dict(data["meta"])
    for k in data["array_keys"]:
        meta[k] = meta[k].numpy()
    out = {"image": data["image"], "meta": meta}
    if "mask" in data:
        out["mask"] = data["mask"]
    return out
