"""``attnseg-infer --config C --checkpoint CKPT INPUT... --out DIR``: segment 2D images or 3D volumes.

**2D configs** (``model.spatial_dims: 2``): inputs are image files or folders of them (PNG, JPG, TIFF, BMP;
8/16-bit; grey or RGB). Each image of any size goes through the model whole, or through a sliding window
when it is larger than ``--window`` on any side; the outputs are ``<stem>_mask.png`` (class index per pixel,
same size as the input) and ``<stem>_overlay.png`` (the input beside the input with the coloured mask blended
over it). The mask is the head's: argmax (or sigmoid > 0.5), a connectivity head's bilateral vote, or a landmark
head's rasterized contours. A landmark model (HybridGNet) also writes ``<stem>_landmarks.json`` (each organ of its
template with its contour in pixel coordinates) and ``<stem>_contours.png`` (the contours drawn on the image); it
always sees the whole image (resized to the model's ``input_size`` when it has one, as the published HybridGNet),
and ``--tta`` is refused for it (a flip swaps left and right organs).

**3D configs**: inputs are NIfTI files (``.nii``/``.nii.gz``), DICOM series (a folder of DICOM files, or one
``.dcm`` file), folders of NIfTI files (for multi-channel models nnU-Net style ``<case>_0000.nii.gz``,
``<case>_0001.nii.gz``, ... are one case), or a ``.txt`` file listing any of these one per line. Each volume
goes through the config's ``data.volume`` preprocessing and a Gaussian-blended sliding window (window and
overlap from ``evaluation``, or ``--roi-size`` / ``--overlap``), optionally averaged over flips (``--tta``),
and its class probabilities are resampled back onto the input's grid. Outputs per case:

- ``<case>_seg.nii.gz``: the label map on the input grid, with the input's affine and header (label values as
  in the training data: class ``k`` is written as the ``k``-th label value of the dataset, when the checkpoint
  records them);
- ``<case>_prob.nii.gz`` with ``--probabilities``: ``[X, Y, Z, K]`` float32 class probabilities;
- ``<case>_montage.png`` (unless ``--no-montage``): axial slices through the labelled range with the overlay.

All inputs are checked (files readable, volumes, channel count) before the first one is predicted.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnseg.cli.common import add_config_args, run_main
from attnseg.errors import ConfigError, DataError, InputSizeError
from attnseg.visualize import overlay_image

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


def expand_volume_inputs(inputs: Iterable[str], in_chans: int = 1) -> list[tuple[str, list[Path]]]:
    """``(case name, files)`` for each volume given: NIfTI files, DICOM series (a folder or a ``.dcm`` file),
    folders of NIfTI files (grouped ``<case>_0000``, ``<case>_0001``, ... when ``in_chans > 1``), and ``.txt``
    files listing inputs (paths relative to the list's folder).

    Raises:
        DataError: a missing input, a file that is neither NIfTI nor DICOM, a folder with neither, a case with
            the wrong number of modality files, or two inputs with the same case name.
    """
    from attnseg.datasets.dicom import is_dicom_input
    from attnseg.datasets.volume_cases import VOLUME_SUFFIXES
    from attnseg.engine.volume_inference import case_name

    def is_nifti(p: Path) -> bool:  # an Analyze pair is named by its .hdr
        return p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES) and not p.name.lower().endswith(".img")

    cases: list[tuple[str, list[Path]]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            listed = [str(Path(ln) if Path(ln).is_absolute() else path.parent / ln)
                      for ln in lines if ln and not ln.startswith("#")]
            if not listed:
                raise DataError(f"input list {path} names no inputs")
            cases += expand_volume_inputs(listed, in_chans)
        elif is_nifti(path):
            cases.append((case_name(path), [path]))
        elif path.is_file():
            if not is_dicom_input(path):
                raise DataError(f"input {path} is neither a NIfTI file ({', '.join(VOLUME_SUFFIXES[:3])}) nor DICOM")
            cases.append((case_name(path), [path]))
        elif path.is_dir():
            niftis = sorted(p for p in path.iterdir() if is_nifti(p))
            if niftis:
                cases += _group_modalities(niftis, in_chans, path)
            elif is_dicom_input(path):
                cases.append((path.name, [path]))
            else:
                raise DataError(f"folder {path} holds no NIfTI files and no DICOM series")
        else:
            raise DataError(f"input not found: {path}")
    seen: dict[str, list[Path]] = {}
    for name, files in cases:
        if name in seen:
            raise DataError(f"two inputs would write the same outputs '{name}_*': {seen[name][0]} and {files[0]} "
                            f"(rename one, or run them into different --out folders)")
        seen[name] = files
    return cases


def _group_modalities(files: list[Path], in_chans: int, folder: Path) -> list[tuple[str, list[Path]]]:
    from attnseg.engine.volume_inference import case_name

    if in_chans == 1:
        return [(case_name(p), [p]) for p in files]
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        m = re.fullmatch(r"(.+)_(\d{4})", case_name(p))
        if m is None:  # one multi-channel file per case
            groups.setdefault(case_name(p), {})[0] = p
        else:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = p
    cases = []
    for name, members in sorted(groups.items()):
        if len(members) > 1 and sorted(members) != list(range(in_chans)):
            raise DataError(f"folder {folder}: case '{name}' has modality files {sorted(members)}; the model takes "
                            f"{in_chans} ({name}_0000 ... {name}_{in_chans - 1:04d})")
        cases.append((name, [members[i] for i in sorted(members)]))
    return cases


def _checkpoint_label_values(checkpoint: str) -> list[int] | None:
    """The stored label value of each class, as the training checkpoint (or the model's ``config.json``) recorded
    them (None if it did not)."""
    from attnseg.model_files import is_model_path, read_model_info

    if is_model_path(checkpoint):
        values = read_model_info(checkpoint).label_values
        return [int(v) for v in values] if values else None
    if not str(checkpoint).endswith(".ckpt"):
        return None
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_pretrained reports unreadable checkpoints with their name
        return None
    values = (state.get("attnseg_classes") or {}).get("label_values") if isinstance(state, dict) else None
    return [int(v) for v in values] if values else None


def _infer_volumes(args: argparse.Namespace, cfg: Any, model: torch.nn.Module,
                   cases: list[tuple[str, list[Path]]]) -> int:
    from PIL import Image
    from tqdm import tqdm

    from attnseg.datasets.dicom import is_dicom_input
    from attnseg.datasets.nifti import Case, CaseLoader
    from attnseg.engine.volume_inference import VolumePredictor, as_closest_ras, read_volume, save_like
    from attnseg.visualize import volume_montage

    # Check every NIfTI header before predicting anything (a bad file found after an hour helps no one): the cases
    # that fail are reported now and at the end, the others are segmented.
    header_check = CaseLoader(prepare=lambda d: d, label_values=[0], in_chans=cfg.model.in_chans)
    failed: list[tuple[str, str]] = []
    for name, files in cases:
        if not (len(files) == 1 and is_dicom_input(files[0])):
            try:
                header_check.inspect(Case(name, tuple(files)))
            except (DataError, InputSizeError) as e:
                _record_failure(failed, ", ".join(map(str, files)), e, len(cases))
    bad = {f for f, _ in failed}
    todo = [(name, files) for name, files in cases if ", ".join(map(str, files)) not in bad]
    n_cls = max(cfg.model.num_classes, 2)
    values = _checkpoint_label_values(args.checkpoint)
    lut = np.asarray(values if values and len(values) == n_cls else range(n_cls), dtype=np.int64)
    dtype = np.uint8 if lut.min() >= 0 and lut.max() <= 255 else np.int16 if lut.max() < 2**15 else np.int32
    predictor = VolumePredictor(model, cfg, roi_size=args.roi_size, overlap=args.overlap, blend_mode=args.blend,
                                sw_batch_size=args.sw_batch_size, tta=args.tta, device=args.device,
                                progress=args.progress)
    out_dir = Path(args.out)
    for name, files in tqdm(todo, desc="volumes", unit="vol", disable=not args.progress or len(todo) < 2):
        try:
            volume = read_volume(files, in_chans=cfg.model.in_chans, series_uid=args.series_uid, name=name)
            pred = predictor(volume, probabilities=args.probabilities)
        except (DataError, InputSizeError) as e:
            _record_failure(failed, ", ".join(map(str, files)), e, len(cases))
            continue
        seg = save_like(lut[pred.labels].astype(dtype), volume.affine, out_dir / f"{name}_seg.nii.gz", volume.header)
        written = [seg]
        if pred.probabilities is not None:
            probs = np.ascontiguousarray(np.moveaxis(pred.probabilities, 0, -1))  # [X, Y, Z, K]
            written.append(save_like(probs, volume.affine, out_dir / f"{name}_prob.nii.gz", volume.header))
        if args.montage:
            image_ras, labels_ras = as_closest_ras(volume.image[0], pred.labels, affine=volume.affine)
            png = out_dir / f"{name}_montage.png"
            Image.fromarray(volume_montage(image_ras, labels_ras, n_cls)).save(png)
            written.append(png)
        counts = np.bincount(pred.labels.reshape(-1), minlength=n_cls)[1:]
        tqdm.write(f"{', '.join(str(f) for f in files)} -> {', '.join(str(w) for w in written)} "
                   f"(grid {list(pred.labels.shape)}, predicted on {list(pred.processed_shape)}; foreground voxels per "
                   f"class {counts.tolist()})")
    _report_failures(failed, len(cases), "volumes")
    return 0


def _record_failure(failed: list[tuple[str, str]], name: str, error: Exception, total: int) -> None:
    """Add ``(name, message)`` to ``failed``; with several inputs also say at once that it is skipped."""
    failed.append((name, str(error)))
    if total > 1:
        from tqdm import tqdm

        tqdm.write(f"skipped {name}: {error}", file=sys.stderr)


def _report_failures(failed: list[tuple[str, str]], total: int, what: str) -> None:
    """Raise a :class:`DataError` listing the inputs that could not be segmented (the others were written)."""
    if not failed:
        return
    if total == 1:
        raise DataError(failed[0][1])
    listed = "; ".join(message if name in message else f"{name}: {message}" for name, message in failed)
    raise DataError(f"{len(failed)} of {total} {what} could not be segmented ({total - len(failed)} written): "
                    f"{listed}")


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="attnseg-infer", description="Segment images (2D configs) or volumes "
                                                                       "(3D configs: NIfTI or DICOM in, NIfTI out).")
    add_config_args(parser, positional=False, required=False,
                    help="experiment config (YAML); optional with a model saved in attnseg's format (its config.json "
                         "records the experiment)")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.ckpt), model weights, or a model "
                                                            "in attnseg's format (folder with model.safetensors + "
                                                            "config.json)")
    parser.add_argument("inputs", nargs="+", help="image files or folders; for 3D: NIfTI files, DICOM series "
                                                  "folders or .dcm files, folders of NIfTI files, .txt lists")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--window", type=int, default=1024,
                        help="2D: sliding-window size used when an image is larger on any side (default 1024)")
    parser.add_argument("--roi-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="3D: sliding-window size (default: evaluation.roi_size, else the training crop)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap in [0, 1) (default: 0.25 in 2D, evaluation.overlap in 3D)")
    parser.add_argument("--blend", choices=["gaussian", "constant"], default=None,
                        help="3D: window blending (default: evaluation.blend_mode)")
    parser.add_argument("--sw-batch-size", type=int, default=None, help="3D: windows per forward pass")
    parser.add_argument("--tta", action="store_true", help="average over a flip of each spatial axis")
    parser.add_argument("--probabilities", action="store_true", help="3D: also write class probabilities")
    parser.add_argument("--no-montage", dest="montage", action="store_false", help="3D: no PNG montage")
    parser.add_argument("--series-uid", default=None, help="3D: the DICOM series to read from a folder holding "
                                                           "several")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise ConfigError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.window < 16:
        raise ConfigError(f"--window must be at least 16, got {args.window}")
    if args.roi_size is not None and min(args.roi_size) < 1:
        raise ConfigError(f"--roi-size values must be >= 1, got {args.roi_size}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise ConfigError(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")

    from attnseg.checkpoint import load_pretrained
    from attnseg.models.builder import build_model

    cfg = _inference_config(args.config, args.checkpoint, args.overrides)
    if cfg.task != "segmentation":
        raise ConfigError(f"attnseg-infer handles segmentation configs; {args.config or args.checkpoint} has task: "
                          f"{cfg.task}")
    # Inputs are expanded (and bad ones refused) before the model is built.
    volumes = expand_volume_inputs(args.inputs, cfg.model.in_chans) if cfg.model.spatial_dims == 3 else None
    images = expand_inputs(args.inputs) if volumes is None else None
    model = build_model(cfg)
    report = load_pretrained(model, args.checkpoint)
    print(f"loaded {args.checkpoint}: {report}")
    model.eval().to(args.device)
    if volumes is not None:
        return _infer_volumes(args, cfg, model, volumes)
    return _infer_images(args, cfg, model, images)


def _inference_config(config: str | None, checkpoint: str, overrides: Sequence[str]) -> Any:
    """The ``--config`` file, else the experiment config a model in attnseg's format records (``--set`` applied)."""
    from attnseg.config import ExperimentConfig, apply_overrides, load_config
    from attnseg.model_files import is_model_path, read_model_info

    if config is not None:
        return load_config(config, overrides)
    info = read_model_info(checkpoint) if is_model_path(checkpoint) else None
    if info is None or info.experiment is None:
        raise ConfigError(f"--config is needed: {checkpoint} is not a model in attnseg's format that records its "
                          "experiment config (a folder with model.safetensors + config.json)")
    from pydantic import ValidationError

    try:
        return ExperimentConfig.model_validate(apply_overrides(info.experiment, overrides))
    except ValidationError as e:
        raise ConfigError(f"the config recorded in {checkpoint} with --set {list(overrides)}: {e}") from None


def _infer_images(args: argparse.Namespace, cfg: Any, model: torch.nn.Module, files: list[Path]) -> int:
    from PIL import Image
    from tqdm import tqdm

    from attnseg.datasets.io import convert_channels, read_image
    from attnseg.datasets.rasterize import landmarks_to_label_map
    from attnseg.datasets.transforms import build_transform
    from attnseg.engine.inference import blends_probabilities, flip_tta, predict_logits, probability_predictor
    from attnseg.heads._common import head_output_kind, label_map_of_probabilities

    overlap = 0.25 if args.overlap is None else args.overlap
    head = getattr(model, "head", model)
    landmarks = head_output_kind(head) == "landmarks"
    if landmarks and args.tta:
        raise ConfigError("--tta flips the image, which would swap the left and right organs of a landmark model; "
                          "run without --tta")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_cls = max(cfg.model.num_classes, 2)
    normalize = build_transform(None, cfg.data.normalize, train=False)
    # Windows and flips of a head with its own probability rule (connectivity votes) are averaged as probabilities.
    by_probabilities = blends_probabilities(model) and not landmarks

    failed: list[tuple[str, str]] = []
    for path in tqdm(files, desc="images", unit="img", disable=not args.progress or len(files) < 2):
        try:
            image = convert_channels(read_image(path), cfg.model.in_chans, path)  # [H, W, C] float in 0..1
        except (DataError, InputSizeError) as e:  # reported at the end; the other files go on
            _record_failure(failed, str(path), e, len(files))
            continue
        x = normalize({"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)})["image"]
        x = x[None].to(args.device)
        # A landmark model sees the whole image (its contours cannot be blended from windows); one with a fixed
        # input size (HybridGNet's flatten latent) sees it resized, its normalised landmarks fit the original.
        roi = [args.window, args.window] if max(x.shape[-2:]) > args.window and not landmarks else None
        fixed = getattr(head, "input_size", None) if landmarks else None
        if fixed is not None and tuple(x.shape[-2:]) != tuple(fixed):
            x = torch.nn.functional.interpolate(x, size=tuple(fixed), mode="bilinear", align_corners=False,
                                                antialias=True)

        blend = by_probabilities and (args.tta or roi is not None)
        net = probability_predictor(model) if blend else model

        def predict(t: torch.Tensor, roi=roi, net=net) -> torch.Tensor:
            return predict_logits(net, t, roi_size=roi, overlap=overlap)

        with torch.inference_mode():
            output = flip_tta(predict, x) if args.tta else predict(x)
            if fixed is not None:  # rasterize the contours at the image's own size
                labels = landmarks_to_label_map(output["landmarks"], head.template, image.shape[:2])
            elif blend:
                labels = label_map_of_probabilities(output)
            else:
                labels = model.postprocess(output)
            mask = labels[0].cpu().numpy().astype(np.uint8 if n_cls <= 256 else np.int32)
        Image.fromarray(mask).save(out_dir / f"{path.stem}_mask.png")
        Image.fromarray(overlay_image(image, mask, n_cls)).save(out_dir / f"{path.stem}_overlay.png")
        if landmarks:
            _write_landmarks(out_dir, path, output["landmarks"][0].float().cpu().numpy(), head.template, image, n_cls)
        tqdm.write(f"{path} -> {out_dir / (path.stem + '_mask.png')} ({mask.shape[1]}x{mask.shape[0]})")
    _report_failures(failed, len(files), "images")
    return 0


def _write_landmarks(out_dir: Path, path: Path, landmarks: np.ndarray, template: Any, image: np.ndarray,
                     num_classes: int) -> None:
    """``<stem>_landmarks.json`` (each organ's contour in pixel coordinates) and ``<stem>_contours.png``.

    ``landmarks`` ``[N, 2]`` are the model's normalised ``(x, y)``; pixel coordinates are ``x * W``, ``y * H``.
    """
    import json

    from PIL import Image

    from attnseg.visualize import contour_overlay

    h, w = image.shape[:2]
    pixels = landmarks * np.array([w, h], dtype=np.float64)
    record = {
        "image": str(path),
        "width": w,
        "height": h,
        "template": template.name,
        "coordinates": "pixels, (x, y) = (column, row), origin at the top-left corner of the top-left pixel",
        "organs": [{"name": o.name, "label": o.label, "points": pixels[o.nodes].round(3).tolist()}
                   for o in template.organs],
    }
    target = out_dir / f"{path.stem}_landmarks.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(target)
    contours = [(pixels[o.nodes], o.label) for o in template.organs]
    Image.fromarray(contour_overlay(image, contours, num_classes)).save(out_dir / f"{path.stem}_contours.png")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
