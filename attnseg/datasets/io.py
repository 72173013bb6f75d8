"""Reading and writing 2D images and masks, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnseg.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "read_image", "read_mask", "convert_channels"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _read_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                arr = np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL/tifffile raise many types for truncated or foreign files
        raise DataError(f"cannot read image {path}: {e}") from None
    if arr.size == 0 or arr.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D image (H, W) or (H, W, C), got array of shape {arr.shape}")
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """``[H, W, C]`` float32 in 0..1 (8-bit / 16-bit / float scaled by their range); C as stored."""
    path = Path(path)
    arr = _read_array(path)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    else:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: image contains NaN or infinite values")
    return arr


def read_mask(path: str | Path) -> np.ndarray:
    """``[H, W]`` int64 label values as stored (RGB masks must be grey: all channels equal)."""
    path = Path(path)
    arr = _read_array(path)
    if arr.ndim == 3:
        if arr.shape[-1] in (3, 4) and (arr[..., :3] == arr[..., :1]).all():
            arr = arr[..., 0]
        elif arr.shape[-1] == 1:
            arr = arr[..., 0]
        else:
            raise DataError(f"{path}: a mask must be a single-channel (or grey RGB) image, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise DataError(f"{path}: mask values must be integers")
    return arr.astype(np.int64)


def convert_channels(image: np.ndarray, in_chans: int, path: str | Path | None = None) -> np.ndarray:
    """Bring ``[H, W, C]`` to ``in_chans`` channels: grey -> repeated, RGB -> grey (luminance), RGBA -> RGB.

    Any other combination is a :class:`DataError` naming the file and both channel counts.
    """
    c = image.shape[-1]
    if c == in_chans:
        return image
    if c == 4 and in_chans in (1, 3):
        image, c = image[..., :3], 3
        if in_chans == 3:
            return image
    if c == 1:
        return np.repeat(image, in_chans, axis=-1)
    if c == 3 and in_chans == 1:
        return (image @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    where = f"{path}: " if path is not None else ""
    raise DataError(f"{where}image has {c} channels; the model expects {in_chans} (grey, RGB or RGBA convert, "
                    f"other channel counts do not)")
