"""Build Decathlon-format brain MRI datasets from real templates installed offline (``tools/prepare_data.py``).

Sources (neither is downloaded; both install from package registries):

- **MNI ICBM152 2009a** (nonlinear, symmetric), inside the ``nilearn`` wheel (``pip install nilearn``):
  ``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, 197x233x189 at 1 mm. The
  T1 is already skull-stripped; the brain mask is nilearn's rule, T1 > 0.2 of its maximum
  (``nilearn.datasets.load_mni152_brain_mask``). The files are read with nibabel; nilearn is not imported.
- **Colin27** and the **AAL** atlas, in Debian's ``mricron-data`` (``apt-get install mricron-data``):
  ``/usr/share/mricron/templates/{ch2,ch2bet,aal}.nii.gz`` (181x217x181 at 1 mm, one grid) and ``aal.nii.txt``
  (region names).

Tasks (one Decathlon folder each: ``dataset.json``, ``imagesTr/``, ``labelsTr/``; the held-out brain is the
JSON's ``validation`` list, so ``decathlon`` uses it as ``val`` and, with ``test_ratio: 0``, as ``test``):

- ``brainmask`` (2 classes): train on Colin27 (``ch2``, with skull -> ``ch2bet > 0``), test on MNI152 (T1 ->
  its brain mask). Both labels are the templates' own. The MNI T1 has no skull, so the held-out case checks that
  the model finds the brain without the skull cues it was trained with.
- ``tissue`` (3 classes: 0 background/CSF, 1 grey matter, 2 white matter): train on MNI152 (labels: argmax of
  ``[0.5, GM, WM]`` probabilities, i.e. GM/WM where that probability is the larger one and above 0.5), test on
  Colin27 (``ch2bet``) with the same labels carried over from MNI space by nearest-neighbour resampling in world
  coordinates (the affines), restricted to Colin27's brain (``ch2bet > 0``).
- ``aal`` (117 classes: background + the 116 AAL regions, names from ``aal.nii.txt``): train on Colin27
  (``ch2bet``, the brain the atlas was drawn on), test on MNI152 with AAL carried over the same way, restricted to
  the MNI brain mask.

Carried-over labels are **approximate**: an atlas transfer, not expert labels of that brain. Colin27 and
MNI152 2009a are both in MNI space, so the transfer is a pure resampling (no registration), but the two brains'
folds differ; the held-out Dice of ``tissue`` and ``aal`` is therefore a lower bound on what a model would score
against true labels of the held-out brain. Splitting one brain into a train and a test part instead was
rejected: the MNI 2009a template is symmetric (the hemispheres mirror each other, so a left/right split leaks),
and a slab split tests other anatomy than the model saw.

``tissue`` and ``aal`` use the skull-stripped Colin27 (``ch2bet``) as the image, since the MNI T1 is
skull-stripped too. Label files lie on their image's grid with the same affine; labels are uint8, images
float32. ``spacing`` resamples every case to that voxel size (trilinear images, nearest-neighbour labels) on a
grid with the same origin and axis directions, e.g. 2 mm for 91x109x91 (Colin27) and 99x117x95 (MNI152).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnseg.errors import ConfigError, DataError

__all__ = ["TASKS", "Volume", "find_mricron_dir", "find_nilearn_data_dir", "main", "prepare", "resample",
           "tissue_labels", "transfer_labels"]

TASKS = ("brainmask", "tissue", "aal")
MNI_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
             "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
             "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
COLIN_FILES = {"t1": "ch2.nii.gz", "brain": "ch2bet.nii.gz", "aal": "aal.nii.gz", "aal_names": "aal.nii.txt"}
MRICRON_DIRS = ("/usr/share/mricron/templates", "/usr/lib/mricron/templates", "/usr/local/share/mricron/templates")
MNI_BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask: T1 / max(T1) > 0.2
TISSUE_FLOOR = 0.5         # a voxel is GM or WM only where that probability is the larger one and above 0.5

_NILEARN_HINT = ("install nilearn (`pip install nilearn`, or `pip install 'attnseg[data]'`), or pass "
                 "--nilearn-dir pointing at a folder holding " + ", ".join(MNI_FILES.values()))
_MRICRON_HINT = ("install Debian's mricron-data (`apt-get install mricron-data`), or pass --mricron-dir pointing at "
                 "a folder holding " + ", ".join(COLIN_FILES.values()))


@dataclass
class Volume:
    """A 3D array ``[X, Y, Z]`` and its voxel-to-world affine ``[4, 4]`` (mm)."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


# -- finding the templates ----------------------------------------------------------------------------


def find_nilearn_data_dir(explicit: str | Path | None = None) -> Path:
    """The folder holding the MNI152 2009a files: ``explicit``, else ``nilearn/datasets/data`` of the installed
    nilearn (found without importing it).

    Raises:
        DataError: saying how to install nilearn, when the folder or one of its files is missing.
    """
    if explicit is not None:
        folder = Path(explicit).expanduser()
    else:
        spec = importlib.util.find_spec("nilearn")
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"the MNI152 templates come with the Python package nilearn, which is not installed: "
                            f"{_NILEARN_HINT}")
        folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in MNI_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(f"MNI152 template files missing in {folder}: {missing}; {_NILEARN_HINT}")
    return folder


def _dpkg_templates() -> list[Path]:
    """Folders holding ch2.nii.gz according to ``dpkg -L mricron-data`` (empty when dpkg is absent)."""
    if shutil.which("dpkg") is None:
        return []
    try:
        out = subprocess.run(["dpkg", "-L", "mricron-data"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [Path(line).parent for line in out.splitlines() if line.endswith("/" + COLIN_FILES["t1"])]


def find_mricron_dir(explicit: str | Path | None = None) -> Path:
    """The mricron templates folder (Colin27 + AAL): ``explicit``, else the usual install folders, else where
    ``dpkg -L mricron-data`` put ``ch2.nii.gz``.

    Raises:
        DataError: saying how to install mricron-data, when no folder holds every file needed.
    """
    candidates = [Path(explicit).expanduser()] if explicit is not None else \
        [Path(d) for d in MRICRON_DIRS] + _dpkg_templates()
    for folder in candidates:
        if all((folder / name).is_file() for name in COLIN_FILES.values()):
            return folder
    if explicit is not None:
        missing = [n for n in COLIN_FILES.values() if not (candidates[0] / n).is_file()]
        raise DataError(f"Colin27/AAL template files missing in {candidates[0]}: {missing}; {_MRICRON_HINT}")
    raise DataError(f"Colin27/AAL templates not found (looked in {', '.join(str(c) for c in candidates)}): "
                    f"{_MRICRON_HINT}")


# -- reading and resampling ---------------------------------------------------------------------------


def _load(path: Path, dtype: Any = np.float32) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj).astype(dtype) if dtype is not None else np.asarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise DataError(f"cannot read template {path}: {type(e).__name__}: {e}") from None
    if data.ndim != 3:
        raise DataError(f"template {path} has shape {list(data.shape)}; expected a 3D volume")
    return Volume(data, np.asarray(img.affine, dtype=np.float64))


def read_aal_names(path: Path) -> dict[int, str]:
    """``{label value: region name}`` of an ``aal.nii.txt`` (lines ``<value> <name> [<code>]``).

    Raises:
        DataError: for a line that does not start with an integer and a name.
    """
    names: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit():
            raise DataError(f"{path}, line {number}: expected '<value> <name> [<code>]', got {line!r}")
        names[int(parts[0])] = parts[1]
    return names


def resample(volume: Volume, shape: Sequence[int], affine: np.ndarray, *, order: int) -> np.ndarray:
    """``volume`` sampled on the grid ``(shape, affine)`` by world coordinates: voxel ``v`` of the result takes
    the value at world point ``affine @ v`` (``order`` 0: nearest neighbour, 1: trilinear; 0 outside).

    Returns:
        ``[*shape]`` array, of ``volume``'s dtype for ``order`` 0, float32 for ``order`` 1.
    """
    from scipy.ndimage import affine_transform

    to_source = np.linalg.inv(volume.affine) @ affine  # target voxel -> source voxel
    data = volume.data if order == 0 else volume.data.astype(np.float32)
    return affine_transform(data, to_source[:3, :3], offset=to_source[:3, 3], output_shape=tuple(shape), order=order,
                            mode="constant", cval=0)


def transfer_labels(labels: Volume, target: Volume, within: np.ndarray | None = None) -> Volume:
    """Labels carried onto ``target``'s grid by nearest-neighbour world-coordinate resampling (an atlas transfer
    between brains in one space), set to 0 outside the boolean ``within`` ``[*target.shape]`` when given."""
    out = resample(labels, target.data.shape, target.affine, order=0).astype(np.uint8)
    if within is not None:
        out[~within] = 0
    return Volume(out, target.affine.copy())


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0 background/CSF, 1 GM, 2 WM: argmax of ``[0.5, gm, wm]`` (probabilities in 0..1), uint8 ``[X, Y, Z]``."""
    floor = np.full(gm.shape, TISSUE_FLOOR, dtype=np.float32)
    return np.argmax(np.stack([floor, gm.astype(np.float32), wm.astype(np.float32)]), axis=0).astype(np.uint8)


def grid_at_spacing(volume: Volume, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of a grid with ``spacing`` mm voxels, the same origin and axis directions, covering
    ``volume``'s extent."""
    old = np.asarray(volume.spacing)
    shape = tuple(int(np.floor((n - 1) * o / spacing)) + 1 for n, o in zip(volume.data.shape, old))
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] / old * spacing  # unit axis directions times the new voxel size
    return shape, affine  # type: ignore[return-value]


# -- the subjects -------------------------------------------------------------------------------------


def load_mni152(folder: Path) -> dict[str, Volume]:
    """MNI152 2009a: ``t1`` (float32), ``brain`` (uint8 mask), ``gm``/``wm`` (probabilities 0..1), one grid."""
    t1 = _load(folder / MNI_FILES["t1"])
    gm = _load(folder / MNI_FILES["gm"])
    wm = _load(folder / MNI_FILES["wm"])
    for name, v in (("gm", gm), ("wm", wm)):
        if v.data.shape != t1.data.shape or not np.allclose(v.affine, t1.affine, atol=1e-3):
            raise DataError(f"{folder / MNI_FILES[name]} is not on the grid of {MNI_FILES['t1']}")
    scale = 255.0 if max(float(gm.data.max()), float(wm.data.max())) > 1.0 else 1.0  # nilearn stores them x255
    brain = (t1.data > MNI_BRAIN_THRESHOLD * float(t1.data.max())).astype(np.uint8)
    return {"t1": t1, "brain": Volume(brain, t1.affine), "gm": Volume(gm.data / scale, gm.affine),
            "wm": Volume(wm.data / scale, wm.affine)}


def load_colin27(folder: Path) -> dict[str, Any]:
    """Colin27: ``t1`` (with skull), ``t1_brain`` (skull-stripped), ``brain`` (uint8 mask), ``aal`` (uint8
    labels 0..116), ``aal_names`` (``{value: name}``), one grid."""
    t1 = _load(folder / COLIN_FILES["t1"])
    bet = _load(folder / COLIN_FILES["brain"])
    aal = _load(folder / COLIN_FILES["aal"], dtype=None)
    for name, v in (("brain", bet), ("aal", aal)):
        if v.data.shape != t1.data.shape or not np.allclose(v.affine, t1.affine, atol=1e-3):
            raise DataError(f"{folder / COLIN_FILES[name]} is not on the grid of {COLIN_FILES['t1']}")
    if not np.issubdtype(aal.data.dtype, np.integer) or aal.data.min() < 0 or aal.data.max() > 255:
        raise DataError(f"{folder / COLIN_FILES['aal']} must hold integer labels 0..255, got {aal.data.dtype} "
                        f"{aal.data.min()}..{aal.data.max()}")
    names = read_aal_names(folder / COLIN_FILES["aal_names"])
    unnamed = sorted(set(np.unique(aal.data).tolist()) - {0} - set(names))
    if unnamed:
        raise DataError(f"{folder / COLIN_FILES['aal']} holds label values {unnamed[:10]} that "
                        f"{COLIN_FILES['aal_names']} does not name")
    return {"t1": t1, "t1_brain": bet, "brain": Volume((bet.data > 0).astype(np.uint8), t1.affine),
            "aal": Volume(aal.data.astype(np.uint8), aal.affine), "aal_names": names}


# -- writing ------------------------------------------------------------------------------------------


@dataclass
class _Case:
    id: str
    image: Volume
    label: Volume
    role: str        # 'training' or 'validation'
    source: str      # where image and label come from
    approximate: bool


def _at_spacing(case: _Case, spacing: float | None) -> _Case:
    if spacing is None:
        return case
    shape, affine = grid_at_spacing(case.image, spacing)
    image = Volume(resample(case.image, shape, affine, order=1), affine)
    label = Volume(resample(case.label, shape, affine, order=0).astype(np.uint8), affine.copy())
    return _Case(case.id, image, label, case.role, case.source, case.approximate)


def _save(volume: Volume, path: Path, dtype: Any) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(volume.data.astype(dtype)), volume.affine)
    img.set_qform(volume.affine, code=4)  # 4: MNI152 space, which both templates are in
    img.set_sform(volume.affine, code=4)
    nib.save(img, str(path))


def _write_task(folder: Path, name: str, description: str, labels: dict[int, str], cases: list[_Case],
                spacing: float | None) -> dict[str, Any]:
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
    summary = []
    for case in (_at_spacing(c, spacing) for c in cases):
        _save(case.image, folder / "imagesTr" / f"{case.id}.nii.gz", np.float32)
        _save(case.label, folder / "labelsTr" / f"{case.id}.nii.gz", np.uint8)
        entries[case.role].append({"image": f"./imagesTr/{case.id}.nii.gz", "label": f"./labelsTr/{case.id}.nii.gz"})
        counts = np.bincount(case.label.data.ravel(), minlength=len(labels))
        summary.append({"id": case.id, "role": case.role, "shape": list(case.image.data.shape),
                        "spacing": [round(s, 3) for s in case.image.spacing], "classes_present": int((counts > 0).sum()),
                        "foreground_voxels": int(counts[1:].sum()), "labels": case.source,
                        "approximate_labels": case.approximate})
    data = {
        "name": name,
        "description": description,
        "reference": "MNI ICBM152 2009a (Fonov et al. 2011, via nilearn); Colin27 (Holmes et al. 1998) and AAL "
                     "(Tzourio-Mazoyer et al. 2002) via Debian mricron-data",
        "licence": "see the MNI, Colin27 and AAL terms of use; BSD-3 packaging (nilearn, mricron-data)",
        "tensorImageSize": "3D",
        "modality": {"0": "T1w"},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(entries["training"]),
        "numTest": 0,
        "training": entries["training"],
        "validation": entries["validation"],
        "test": [],
        "cases": summary,
    }
    (folder / "dataset.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return {"task": name, "folder": str(folder), "cases": summary}


def prepare(out_dir: str | Path, tasks: Sequence[str] = TASKS, *, spacing: float | None = None,
            mricron_dir: str | Path | None = None, nilearn_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Write one Decathlon folder per task under ``out_dir`` (``out_dir/<task>/``); see the module docstring.

    Args:
        out_dir: the output folder (created; existing files of the same names are replaced).
        tasks: any of ``brainmask``, ``tissue``, ``aal``.
        spacing: resample every case to this voxel size in mm (None: the templates' 1 mm grids).
        mricron_dir: the mricron templates folder (default: found as :func:`find_mricron_dir` says).
        nilearn_dir: the folder of the MNI152 files (default: inside the installed nilearn).

    Returns:
        One summary per task: ``{"task", "folder", "cases": [{"id", "role", "shape", "spacing", ...}]}``.

    Raises:
        ConfigError: for an unknown task or a spacing outside (0, 10] mm.
        DataError: when a template is missing (saying how to install it) or unreadable.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"tasks must be among {list(TASKS)}, got {list(tasks)}")
    if spacing is not None and not 0 < spacing <= 10:
        raise ConfigError(f"spacing must be in (0, 10] mm, got {spacing}")
    mni = load_mni152(find_nilearn_data_dir(nilearn_dir))
    colin = load_colin27(find_mricron_dir(mricron_dir))
    out = Path(out_dir).expanduser()
    results = []
    if "brainmask" in tasks:
        results.append(_write_task(
            out / "brainmask", "BrainMask",
            "Brain extraction of a T1 MRI. Train: Colin27 with skull (label ch2bet > 0). Held-out: MNI152 2009a "
            "(already skull-stripped; label T1 > 0.2 max, nilearn's brain mask).",
            {0: "background", 1: "brain"},
            [_Case("colin27", colin["t1"], colin["brain"], "training", "ch2bet.nii.gz > 0", False),
             _Case("mni152", mni["t1"], mni["brain"], "validation", "T1 > 0.2 x max (nilearn)", False)], spacing))
    if "tissue" in tasks:
        labels = Volume(tissue_labels(mni["gm"].data, mni["wm"].data), mni["t1"].affine)
        on_colin = transfer_labels(labels, colin["t1_brain"], within=colin["brain"].data > 0)
        results.append(_write_task(
            out / "tissue", "BrainTissue",
            "Grey/white matter of a skull-stripped T1 MRI (0 background/CSF, 1 GM, 2 WM; argmax of [0.5, GM, WM] "
            "probabilities). Train: MNI152 2009a. Held-out: Colin27 (ch2bet) with the MNI labels carried over by "
            "nearest-neighbour world-coordinate resampling inside its brain mask: APPROXIMATE labels (atlas "
            "transfer, not tissue maps of Colin27).",
            {0: "background", 1: "grey_matter", 2: "white_matter"},
            [_Case("mni152", mni["t1"], labels, "training", "MNI GM/WM probability maps", False),
             _Case("colin27", colin["t1_brain"], on_colin, "validation", "MNI tissue labels transferred", True)],
            spacing))
    if "aal" in tasks:
        on_mni = transfer_labels(colin["aal"], mni["t1"], within=mni["brain"].data > 0)
        names = {0: "background", **{v: colin["aal_names"][v] for v in sorted(colin["aal_names"])}}
        results.append(_write_task(
            out / "aal", "AAL116",
            "Automated Anatomical Labeling: 116 regions + background on a skull-stripped T1 MRI. Train: Colin27 "
            "(ch2bet), the brain AAL was drawn on. Held-out: MNI152 2009a with AAL carried over by nearest-neighbour "
            "world-coordinate resampling inside its brain mask: APPROXIMATE labels (atlas transfer).",
            names,
            [_Case("colin27", colin["t1_brain"], colin["aal"], "training", "aal.nii.gz", False),
             _Case("mni152", mni["t1"], on_mni, "validation", "AAL transferred from Colin27", True)], spacing))
    return results


# -- command line -------------------------------------------------------------------------------------


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="prepare_data", description="Build Decathlon-format brain MRI datasets (brain mask, tissue, AAL) from "
                                         "the MNI152 (nilearn) and Colin27/AAL (mricron-data) templates.")
    parser.add_argument("--out", default="data/brain", help="output folder; one sub-folder per task (data/brain)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to build (all)")
    parser.add_argument("--spacing", type=float, default=None,
                        help="resample to this voxel size in mm, e.g. 2 (default: the templates' 1 mm)")
    parser.add_argument("--mricron-dir", default=None, help="mricron templates folder (default: found via dpkg)")
    parser.add_argument("--nilearn-dir", default=None, help="folder of the MNI152 files (default: in nilearn)")
    args = parser.parse_args(argv)
    for result in prepare(args.out, args.tasks, spacing=args.spacing, mricron_dir=args.mricron_dir,
                          nilearn_dir=args.nilearn_dir):
        print(f"{result['task']}: {result['folder']}")
        for c in result["cases"]:
            flag = " (approximate labels)" if c["approximate_labels"] else ""
            print(f"  {c['role']:<10} {c['id']:<8} {c['shape']} @ {c['spacing']} mm, {c['classes_present']} classes, "
                  f"{c['foreground_voxels']} foreground voxels{flag}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/prepare_data.py [--out DIR] [--tasks ...] [--spacing MM] [--mricron-dir D] [--nilearn-dir D]``."""
    from attnseg.cli.common import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
