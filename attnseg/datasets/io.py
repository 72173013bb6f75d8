"""Reading and writing 2D images and label masks; every failure is a :class:`DataError` naming the file.

Formats: PNG, JPEG, BMP through Pillow; TIFF through tifffile (16-bit, float, planar and multi-sample files),
falling back to Pillow when tifffile cannot decode a file (e.g. a compression that needs ``imagecodecs``).
Images and masks are read as stored: EXIF orientation tags are not applied, so an image and its mask stay in
the same pixel grid. A multi-page TIFF (a stack) is refused: the 2D datasets read single images.

Layouts: images ``[H, W, C]`` float32, masks ``[H, W]`` int64 (numpy, as the readers of the format give them;
the datasets turn them into ``[C, H, W]`` tensors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnseg.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "list_images", "read_image", "read_mask", "write_mask_png", "convert_channels"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, what PIL's convert("L") uses


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by suffix, case-insensitive; hidden files skipped) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        arr = series.asarray()
        axes = series.axes
    # Drop singleton axes other than the image plane, then accept YX, YXS (contiguous) or SYX (planar).
    keep = [i for i, a in enumerate(axes) if a in "YX" or arr.shape[i] > 1]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if axes == "SYX":
        arr = np.moveaxis(arr, 0, -1)  # [S, H, W] -> [H, W, S]
    elif axes not in ("YX", "YXS"):
        raise DataError(f"{path}: a multi-page or multi-dimensional TIFF (axes '{axes}', shape {list(arr.shape)}); "
                        f"2D datasets read single-page images (Y, X and samples only)")
    return arr


def _read_pil(path: Path, *, palette_as_index: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("P", "PA") and not palette_as_index:
            im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
        elif mode in ("LA", "La", "PA"):
            im = im.getchannel(0)  # drop alpha (PA: keep the palette indices of a mask)
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBa"):
            im = im.convert("RGB")
        arr = np.asarray(im)
        if mode == "I" and im.format == "PNG":  # older Pillow opens 16-bit grey PNGs as 32-bit "I"
            arr = arr.astype(np.uint16)
        return arr


def _read_array(path: str | Path, *, palette_as_index: bool) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    errors = []
    arr = None
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            arr = _read_tiff(path)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - tifffile raises many types for foreign or truncated files
            errors.append(f"tifffile: {e}")
    if arr is None:
        try:
            arr = _read_pil(path, palette_as_index=palette_as_index)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
            errors.append(f"Pillow: {e}")
            raise DataError(f"cannot read image {path} (unreadable, truncated or not an image): "
                            f"{'; '.join(errors)}") from None
    if arr.size == 0 or arr.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D image [H, W] or [H, W, C], got an array of shape {list(arr.shape)}")
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as ``[H, W, C]`` float32 in 0..1, C as stored (alpha of grey+alpha files dropped).

    Unsigned and signed integer images (8-bit, 16-bit, ...) are divided by their dtype's maximum, booleans
    become 0/1, and float images (TIFF) are taken as already scaled; NaN or infinite values are refused.
    Palette images are expanded to RGB (RGBA when they have transparency).

    Raises:
        DataError: naming ``path``, when it is missing, unreadable, truncated, or not a 2D image.
    """
    arr = _read_array(path, palette_as_index=False)
    if arr.ndim == 2:
        arr = arr[..., None]  # [H, W] -> [H, W, 1]
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path}: unsupported pixel type {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    return arr


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as ``[H, W]`` int64, values as stored.

    Grey (8/16-bit) and palette images give their stored values (a palette PNG gives its palette indices,
    as in Pascal VOC); an RGB(A) mask is accepted only when it is grey (all colour channels equal); a float
    TIFF only when every value is a whole number.

    Raises:
        DataError: naming ``path``, for an unreadable file, a colour mask, or non-integer values.
    """
    arr = _read_array(path, palette_as_index=True)
    if arr.ndim == 3:
        c = arr.shape[-1]
        if c == 1 or (c in (3, 4) and (arr[..., 1:3] == arr[..., :1]).all()):
            arr = arr[..., 0]
        else:
            colours = len(np.unique(arr[..., :3].reshape(-1, min(c, 3)), axis=0))
            raise DataError(f"{path}: a mask must hold one label value per pixel (grey or palette image), got "
                            f"{c} channels with {colours} distinct colours; convert colour-coded masks to an index "
                            f"image first")
    if arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{path}: mask values must be whole numbers, got {arr.dtype} values such as "
                            f"{arr[arr != np.round(arr)][:3].tolist() if np.isfinite(arr).all() else 'NaN/inf'}")
    return arr.astype(np.int64)


def write_mask_png(path: str | Path, mask: np.ndarray, palette: list[tuple[int, int, int]] | None = None) -> Path:
    """Write a label mask ``[H, W]`` as a PNG; returns the path (parent folders are created).

    Values 0..255 give an 8-bit file (a palette PNG when ``palette`` lists an RGB colour per value, so it
    opens in colour yet reads back as indices), values up to 65535 a 16-bit grey file.

    Raises:
        DataError: for a mask that is not 2D, or values outside 0..65535 (naming ``path``).
    """
    from PIL import Image

    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"{path}: a mask to write must be [H, W], got shape {list(mask.shape)}")
    if mask.size and (mask.min() < 0 or mask.max() > 65535):
        raise DataError(f"{path}: mask values must be in 0..65535 for PNG, got {int(mask.min())}..{int(mask.max())}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask.size == 0 or mask.max() <= 255:
        im = Image.fromarray(mask.astype(np.uint8))  # mode L
        if palette is not None:
            flat = [int(v) for rgb in palette[:256] for v in rgb]
            im = im.convert("P")  # same indices; "L" -> "P" keeps the values
            im.putpalette(flat + [0] * (768 - len(flat)))
    else:
        if palette is not None:
            raise DataError(f"{path}: a palette PNG holds at most 256 labels, the mask has values up to {mask.max()}")
        im = Image.fromarray(mask.astype(np.uint16))
    im.save(path, format="PNG")
    return path


def convert_channels(image: np.ndarray, in_chans: int, path: str | Path | None = None) -> np.ndarray:
    """Bring ``[H, W, C]`` to ``in_chans`` channels: grey is repeated, RGB becomes grey by luminance (BT.601),
    RGBA loses its alpha (then as RGB).

    Raises:
        DataError: for any other combination, naming the file and both channel counts.
    """
    c = image.shape[-1]
    if c == in_chans:
        return image
    if c == 4:
        image, c = image[..., :3], 3  # drop alpha
        if in_chans == 3:
            return image
    if c == 1:
        return np.repeat(image, in_chans, axis=-1)
    if c == 3 and in_chans == 1:
        return (image @ _LUMA)[..., None]  # [H, W, 3] -> [H, W, 1]
    where = f"{path}: " if path is not None else ""
    found = image.shape[-1]
    raise DataError(f"{where}image has {found} channels but in_chans={in_chans} is expected (grey repeats to any "
                    f"count, RGB converts to grey, RGBA drops alpha; other channel counts need in_chans={found})")
