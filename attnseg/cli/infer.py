"""``attnseg-infer --config C --checkpoint CKPT INPUT... --out DIR``: masks and overlays for 2D images.

Inputs are image files or folders of them (PNG, JPG, TIFF, BMP; 8/16-bit; grey or RGB). Each image of
any size goes through the model whole, or through a sliding window when it is larger than ``--window``
on any side; the outputs are ``<stem>_mask.png`` (class index per pixel, same size as the input) and
``<stem>_overlay.png`` (the input beside the input with the coloured mask blended over it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from attnseg.cli.common import add_config_args, run_main
from attnseg.errors import ConfigError, DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted); a missing path is an error."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input not found: {path}")
    return files


def palette(num_colors: int) -> np.ndarray:
    """A fixed, well-separated RGB colour per class (class 0 black), ``[num_colors, 3]`` uint8."""
    colors = np.zeros((max(num_colors, 1), 3), dtype=np.uint8)
    base = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]], dtype=np.uint8)
    for c in range(1, len(colors)):
        colors[c] = base[(c - 1) % len(base)] if c - 1 < len(base) else (np.array([37, 91, 173]) * c) % 256
    return colors


def overlay_image(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """``[H, 2W, 3]`` uint8: the image, and the image with the mask's colours blended in (background clear)."""
    rgb = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    rgb8 = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    colors = palette(max(num_classes, 2))[np.clip(mask, 0, max(num_classes, 2) - 1)]
    fg = (mask > 0)[..., None]
    blended = np.where(fg, (1 - alpha) * rgb8 + alpha * colors, rgb8).astype(np.uint8)
    return np.concatenate([rgb8, blended], axis=1)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="attnseg-infer", description="Predict masks for images.")
    add_config_args(parser, positional=False)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.ckpt) or model weights")
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--window", type=int, default=1024,
                        help="sliding-window size used when an image is larger on any side (default 1024)")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not 0 <= args.overlap < 1:
        raise ConfigError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.window < 16:
        raise ConfigError(f"--window must be at least 16, got {args.window}")

    from PIL import Image

    from attnseg.checkpoint import load_pretrained
    from attnseg.config import load_config
    from attnseg.datasets.io import convert_channels, read_image
    from attnseg.datasets.transforms import build_transform
    from attnseg.engine.inference import flip_tta, predict_logits
    from attnseg.models.builder import build_model

    cfg = load_config(args.config, args.overrides)
    if cfg.task != "segmentation" or cfg.model.spatial_dims != 2:
        raise ConfigError("attnseg-infer handles 2D segmentation configs (task: segmentation, spatial_dims: 2)")
    files = expand_inputs(args.inputs)
    model = build_model(cfg)
    load_pretrained(model, args.checkpoint)
    model.eval().to(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_cls = max(cfg.model.num_classes, 2)
    normalize = build_transform(None, cfg.data.normalize, train=False)

    for path in files:
        image = convert_channels(read_image(path), cfg.model.in_chans, path)  # [H, W, C] float in 0..1
        x = normalize({"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)})["image"]
        x = x[None].to(args.device)
        roi = [args.window, args.window] if max(x.shape[-2:]) > args.window else None

        def predict(t: torch.Tensor, roi=roi) -> torch.Tensor:
            return predict_logits(model, t, roi_size=roi, overlap=args.overlap)

        with torch.inference_mode():
            logits = flip_tta(predict, x) if args.tta else predict(x)
            mask = model.postprocess(logits)[0].cpu().numpy().astype(np.uint8 if n_cls <= 256 else np.int32)
        Image.fromarray(mask).save(out_dir / f"{path.stem}_mask.png")
        Image.fromarray(overlay_image(image, mask, n_cls)).save(out_dir / f"{path.stem}_overlay.png")
        print(f"{path} -> {out_dir / (path.stem + '_mask.png')} ({mask.shape[1]}x{mask.shape[0]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
