"""Pictures for a quick look: mask overlays, slice montages of volumes, training curves, metric box plots.

Overlays and montages use only NumPy (and Pillow to write them); the plots use Matplotlib's non-interactive
``Agg`` backend, so nothing here needs a display.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["palette", "overlay_image", "contour_overlay", "volume_montage", "plot_training_curves", "plot_metric_boxes"]


def palette(num_colors: int) -> np.ndarray:
    """A fixed, well-separated RGB colour per class (class 0 black), ``[num_colors, 3]`` uint8."""
    colors = np.zeros((max(num_colors, 1), 3), dtype=np.uint8)
    base = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]], dtype=np.uint8)
    for c in range(1, len(colors)):
        colors[c] = base[(c - 1) % len(base)] if c - 1 < len(base) else (np.array([37, 91, 173]) * c) % 256
    return colors


def _blend(rgb8: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float) -> np.ndarray:
    colors = palette(max(num_classes, 2))[np.clip(mask, 0, max(num_classes, 2) - 1)]
    fg = (mask > 0)[..., None]
    return np.where(fg, (1 - alpha) * rgb8 + alpha * colors, rgb8).astype(np.uint8)


def overlay_image(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """``[H, 2W, 3]`` uint8: the image ``[H, W, C]`` (values in 0..1), and the image with the mask's colours
    blended in (background clear)."""
    rgb = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    rgb8 = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    return np.concatenate([rgb8, _blend(rgb8, mask, num_classes, alpha)], axis=1)


def contour_overlay(image: np.ndarray, contours: Sequence[tuple[np.ndarray, int]], num_classes: int,
                    width: int = 2, point_radius: int = 2) -> np.ndarray:
    """``[H, W, 3]`` uint8: the image ``[H, W, C]`` (values in 0..1) with closed contours drawn on it.

    Args:
        contours: ``(points [N, 2] as (x, y) pixel coordinates, label)`` per contour; drawn in the label's palette
            colour, with a dot on every landmark.
        num_classes: the palette size (labels ``1 .. num_classes - 1``).
    """
    from PIL import Image, ImageDraw

    rgb = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    canvas = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    colors = palette(max(num_classes, 2))
    for points, label in contours:
        color = tuple(int(c) for c in colors[min(max(int(label), 1), len(colors) - 1)])
        xy = [(float(x), float(y)) for x, y in np.asarray(points, dtype=np.float64)]
        draw.line(xy + xy[:1], fill=color, width=width)
        for x, y in xy:
            draw.ellipse([x - point_radius, y - point_radius, x + point_radius, y + point_radius], fill=color)
    return np.asarray(canvas)


def volume_montage(
    volume: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    num_slices: int = 12,
    columns: int = 4,
    axis: int = 2,
    alpha: float = 0.45,
) -> np.ndarray:
    """A grid of slices of ``volume`` ``[X, Y, Z]`` with ``labels`` ``[X, Y, Z]`` blended in, ``[H, W, 3]`` uint8.

    Slices are spread evenly over the labelled extent along ``axis`` (the whole volume when nothing is labelled).
    Intensities are windowed to their 1st..99th percentile. Each slice is shown with the first remaining voxel
    axis to the right and the second up (a RAS volume with ``axis=2`` gives axial slices in neurological
    view: the patient's right on the right, anterior up).
    """
    if volume.shape != labels.shape or volume.ndim != 3:
        raise ValueError(f"volume {volume.shape} and labels {labels.shape} must be equal 3D shapes")
    lo, hi = np.percentile(volume, [1, 99]) if volume.size else (0.0, 1.0)
    scaled = np.clip((volume - lo) / max(hi - lo, 1e-8), 0, 1)
    labelled = np.flatnonzero(np.moveaxis(labels, axis, 0).reshape(labels.shape[axis], -1).any(1))
    first, last = (labelled[0], labelled[-1]) if labelled.size else (0, labels.shape[axis] - 1)
    picks = np.unique(np.linspace(first, last, num=min(num_slices, last - first + 1)).round().astype(int))
    tiles = []
    for k in picks:
        img = np.take(scaled, k, axis=axis)
        lab = np.take(labels, k, axis=axis)
        # Voxel axis 0 -> columns (left to right), axis 1 -> rows from the bottom up.
        img, lab = np.flipud(img.T), np.flipud(lab.T)
        rgb8 = (np.repeat(img[..., None], 3, axis=-1) * 255).astype(np.uint8)
        tiles.append(_blend(rgb8, lab, num_classes, alpha))
    rows = math.ceil(len(tiles) / columns)
    h, w = tiles[0].shape[:2]
    grid = np.zeros((rows * h, min(columns, len(tiles)) * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path) -> list[str]:
    """Plot the loss and metric columns of Lightning's CSV log (``metrics.csv``) against the step.

    One panel per group: losses (``*loss*``), scores (``*/mDice``, ``*/mIoU``, ``*/mNSD``, ``*/top1``, ``*/top5``),
    the learning rate (``lr*``). Epoch-level and step-level rows are both drawn (rows holding a value for the column).

    Returns:
        The names of the plotted columns (empty when the log has none, in which case nothing is written).
    """
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        step = row.get("step")
        if not step:
            continue
        for key, value in row.items():
            if key in ("step", "epoch") or value in (None, ""):
                continue
            try:
                v = float(value)
            except ValueError:
                continue
            xs, ys = columns.setdefault(key, ([], []))
            xs.append(float(step))
            ys.append(v)
    groups = {
        "loss": [k for k in columns if "loss" in k],
        "score": [k for k in columns if k.rpartition("/")[2] in ("mDice", "mIoU", "mNSD", "top1", "top5")],
        "learning rate": [k for k in columns if k.startswith("lr")],
    }
    groups = {name: keys for name, keys in groups.items() if keys}
    if not groups:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], groups.items()):
        for key in keys:
            xs, ys = columns[key]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(name)
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return [k for keys in groups.values() for k in keys]


def plot_metric_boxes(per_case: Sequence[Mapping[str, float]], class_names: Sequence[str], out_png: str | Path,
                      metrics: Sequence[str] = ("Dice", "HD95", "NSD")) -> list[str]:
    """Box plots of per-case metric values, one box per class and one panel per metric.

    ``per_case`` rows hold ``"<metric>_<class>"`` values (as :meth:`SegmentationMetrics.per_case
    <attnseg.engine.metrics.SegmentationMetrics.per_case>` gives them); NaNs are left out.

    Returns:
        The metrics plotted (those present in the rows).
    """
    present = [m for m in metrics if any(f"{m}_{c}" in row for row in per_case for c in class_names)]
    if not present:
        return []
    plt = _pyplot()
    shown = [c for c in class_names if any(f"{present[0]}_{c}" in row for row in per_case)]
    width = min(max(4.0, 0.35 * len(shown) + 2), 40.0)
    fig, axes = plt.subplots(len(present), 1, figsize=(width, 3.2 * len(present)), squeeze=False)
    for ax, metric in zip(axes[:, 0], present):
        data = [[row[f"{metric}_{c}"] for row in per_case
                 if f"{metric}_{c}" in row and not math.isnan(row[f"{metric}_{c}"])] for c in shown]
        ax.boxplot([d if d else [math.nan] for d in data], showfliers=True)
        ax.set_xticks(range(1, len(shown) + 1), shown, rotation=90 if len(shown) > 8 else 0, fontsize=7)
        ax.set_ylabel(metric + (" (mm)" if metric == "HD95" else ""))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return present
