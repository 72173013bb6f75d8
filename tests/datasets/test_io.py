import numpy as np
import pytest
import tifffile
from PIL import Image

from attnseg.datasets.io import convert_channels, read_image, read_mask, write_mask_png
from attnseg.errors import DataError


def test_read_image_formats_and_scaling(tmp_path, save_image):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    out = read_image(save_image(tmp_path / "a.png", rgb))
    assert out.shape == (6, 7, 3) and out.dtype == np.float32 and np.allclose(out, rgb / 255)
    assert np.allclose(read_image(save_image(tmp_path / "a.bmp", rgb)), rgb / 255)
    assert read_image(save_image(tmp_path / "g.png", np.full((6, 7), 51, np.uint8))).shape == (6, 7, 1)
    deep = np.array([[0, 65535], [32768, 1000]], np.uint16)
    for name in ("d.png", "d.tif"):
        assert np.allclose(read_image(save_image(tmp_path / name, deep))[..., 0], deep / 65535)
    jpg = read_image(save_image(tmp_path / "p.jpg", np.full((8, 8, 3), 200, np.uint8)))
    assert jpg.shape == (8, 8, 3) and np.allclose(jpg, 200 / 255, atol=0.02)
    floats = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(read_image(save_image(tmp_path / "f.tif", floats))[..., 0], floats)
    # planar (samples first) TIFF comes back channels-last
    planar = np.stack([np.full((5, 6), v, np.uint8) for v in (0, 128, 255)])
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    assert np.allclose(read_image(tmp_path / "planar.tif")[2, 3], [0, 128 / 255, 1])


def test_read_image_palette_alpha_and_bool(tmp_path):
    p = Image.new("P", (4, 3))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (3, 4, 3) and out[1, 1].tolist() == [1.0, 0.0, 0.0]
    Image.new("LA", (4, 3), (100, 7)).save(tmp_path / "la.png")
    assert np.allclose(read_image(tmp_path / "la.png"), 100 / 255) and read_image(tmp_path / "la.png").shape[-1] == 1
    Image.new("1", (4, 3), 1).save(tmp_path / "b.png")
    assert read_image(tmp_path / "b.png").max() == 1.0


def test_read_errors_name_the_file(tmp_path, save_image):
    with pytest.raises(DataError, match="file not found: .*missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataError, match=r"cannot read image .*t\.png"):
        read_image(tmp_path / "t.png")
    save_image(tmp_path / "full.png", np.zeros((64, 64, 3), np.uint8))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match=r"cannot read image .*junk\.tif.*tifffile.*Pillow"):
        read_image(tmp_path / "junk.tif")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 6, 2), np.uint8), photometric="minisblack")
    with pytest.raises(DataError, match=r"stack\.tif: a multi-page .*TIFF \(axes 'QYX', shape \[5, 6, 2\]\)"):
        read_image(tmp_path / "stack.tif")
    nan = np.full((3, 3), np.nan, np.float32)
    with pytest.raises(DataError, match=r"nan\.tif: image contains NaN"):
        read_image(save_image(tmp_path / "nan.tif", nan))


def test_read_mask(tmp_path, save_image):
    m = np.array([[0, 1], [2, 255]], np.uint8)
    assert read_mask(save_image(tmp_path / "m.png", m)).tolist() == m.tolist()
    assert read_mask(save_image(tmp_path / "m.png", m)).dtype == np.int64
    assert read_mask(save_image(tmp_path / "m16.tif", m.astype(np.uint16) * 257)).max() == 65535
    grey_rgb = np.repeat(m[..., None], 3, axis=-1)
    assert read_mask(save_image(tmp_path / "rgb.png", grey_rgb)).tolist() == m.tolist()
    p = Image.fromarray(m).convert("P")
    p.putpalette([10, 20, 30] * 256)
    p.save(tmp_path / "pal.png")
    assert read_mask(tmp_path / "pal.png").tolist() == m.tolist()  # palette indices, not colours
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(DataError, match=r"colour\.png: a mask must hold one label value .*3 channels with 2 distinct"):
        read_mask(save_image(tmp_path / "colour.png", colour))
    with pytest.raises(DataError, match=r"frac\.tif: mask values must be whole numbers.*0\.5"):
        read_mask(save_image(tmp_path / "frac.tif", np.array([[0, 0.5]], np.float32)))


def test_write_mask_png_roundtrip(tmp_path):
    m = np.array([[0, 1], [2, 3]])
    assert read_mask(write_mask_png(tmp_path / "sub" / "a.png", m)).tolist() == m.tolist()
    big = np.array([[0, 300], [65535, 7]])
    path = write_mask_png(tmp_path / "b.png", big)
    assert read_mask(path).tolist() == big.tolist()
    path = write_mask_png(tmp_path / "c.png", m, palette=[(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)])
    with Image.open(path) as im:
        assert im.mode == "P"
    assert read_mask(path).tolist() == m.tolist()
    assert read_image(path)[0, 1].tolist() == [1.0, 0.0, 0.0]  # opens in colour
    with pytest.raises(DataError, match=r"neg\.png: mask values must be in 0\.\.65535 for PNG, got -1\.\.2"):
        write_mask_png(tmp_path / "neg.png", m - 1)
    with pytest.raises(DataError, match="must be"):
        write_mask_png(tmp_path / "d.png", np.zeros((2, 2, 2)))


def test_convert_channels():
    grey = np.random.rand(4, 5, 1).astype(np.float32)
    assert np.array_equal(convert_channels(grey, 3), np.repeat(grey, 3, -1))
    rgb = np.random.rand(4, 5, 3).astype(np.float32)
    assert np.allclose(convert_channels(rgb, 1)[..., 0], rgb @ [0.299, 0.587, 0.114], atol=1e-6)
    rgba = np.concatenate([rgb, np.ones((4, 5, 1), np.float32)], -1)
    assert np.array_equal(convert_channels(rgba, 3), rgb)
    assert convert_channels(rgba, 1).shape == (4, 5, 1)
    assert convert_channels(rgb, 3) is rgb
    with pytest.raises(DataError, match=r"x\.tif: image has 2 channels but in_chans=3 is expected"):
        convert_channels(np.zeros((4, 4, 2), np.float32), 3, "x.tif")
    with pytest.raises(DataError, match="image has 3 channels but in_chans=4"):
        convert_channels(rgb, 4)
