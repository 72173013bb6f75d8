from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _save_image(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` with the writer its suffix calls for (tifffile for TIFF, Pillow otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


@pytest.fixture
def save_image():
    """``save_image(path, array)`` -> path, written by tifffile (TIFF) or Pillow (other suffixes)."""
    return _save_image


@pytest.fixture
def write_pair():
    """``write_pair(root, stem, image, mask, img_ext='.png', mask_ext='.png')`` -> (image path, mask path)."""

    def write(root: Path, stem: str, image: np.ndarray, mask: np.ndarray, img_ext: str = ".png",
              mask_ext: str = ".png", mask_suffix: str = "") -> tuple[Path, Path]:
        return (_save_image(root / "images" / f"{stem}{img_ext}", image),
                _save_image(root / "masks" / f"{stem}{mask_suffix}{mask_ext}", mask))

    return write
