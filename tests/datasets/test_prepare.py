"""tools/prepare_data.py (attnseg.datasets.prepare): on tiny generated stand-ins of the nilearn and mricron
template folders (every code path, no install needed), and on the real templates when they are installed."""

import json

import nibabel as nib
import numpy as np
import pytest

from attnseg.datasets import build_dataset
from attnseg.datasets import prepare as prep
from attnseg.errors import DataError

MNI_SHAPE = (12, 14, 10)
COLIN_SHAPE = (11, 13, 10)
# Both 1 mm, RAS; the Colin27 stand-in's origin is 1 mm further right, so Colin voxel (i, j, k) is MNI voxel
# (i + 1, j, k): a transfer between them is an exact shift by one voxel.
MNI_AFFINE = np.array([[1.0, 0, 0, -6], [0, 1, 0, -7], [0, 0, 1, -5], [0, 0, 0, 1]])
COLIN_AFFINE = np.array([[1.0, 0, 0, -5], [0, 1, 0, -7], [0, 0, 1, -5], [0, 0, 0, 1]])


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)


def fake_nilearn(folder, rng):
    """T1 (uint8, brain = a box, zero outside), GM and WM probability maps x255 (uint8)."""
    folder.mkdir(parents=True)
    t1 = np.zeros(MNI_SHAPE, np.uint8)
    t1[2:10, 2:12, 2:8] = rng.integers(60, 250, (8, 10, 6))
    gm = np.zeros(MNI_SHAPE, np.uint8)
    wm = np.zeros(MNI_SHAPE, np.uint8)
    gm[2:10, 2:12, 2:8] = 150      # GM 0.59 > 0.5
    wm[4:8, 4:10, 3:7] = 200       # WM 0.78 wins over GM inside
    gm[2, 2, 2] = 100              # 0.39 < 0.5 floor: background
    _save(folder / prep.MNI_FILES["t1"], t1, MNI_AFFINE)
    _save(folder / prep.MNI_FILES["gm"], gm, MNI_AFFINE)
    _save(folder / prep.MNI_FILES["wm"], wm, MNI_AFFINE)
    return folder


def fake_mricron(folder, rng):
    """ch2 (head = brain + skull shell), ch2bet (the brain), aal (3 regions), aal.nii.txt."""
    folder.mkdir(parents=True)
    ch2 = rng.integers(20, 60, COLIN_SHAPE).astype(np.uint8)
    bet = np.zeros(COLIN_SHAPE, np.uint8)
    bet[2:9, 2:11, 2:8] = rng.integers(60, 250, (7, 9, 6))
    ch2[bet > 0] = bet[bet > 0]
    aal = np.zeros(COLIN_SHAPE, np.uint8)
    aal[2:5, 2:11, 2:8] = 1
    aal[5:9, 2:11, 2:8] = 2
    aal[4, 4, 4] = 3
    _save(folder / "ch2.nii.gz", ch2, COLIN_AFFINE)
    _save(folder / "ch2bet.nii.gz", bet, COLIN_AFFINE)
    _save(folder / "aal.nii.gz", aal, COLIN_AFFINE)
    (folder / "aal.nii.txt").write_text("1 Region_A_L 2001\n2 Region_B_R 2002\n3 Region_C 3001\n\n")
    return folder


@pytest.fixture
def templates(tmp_path):
    rng = np.random.default_rng(0)
    return {"nilearn_dir": fake_nilearn(tmp_path / "nilearn_data", rng),
            "mricron_dir": fake_mricron(tmp_path / "mricron", rng)}


def _read(folder, case):
    image = nib.load(folder / "imagesTr" / f"{case}.nii.gz")
    label = nib.load(folder / "labelsTr" / f"{case}.nii.gz")
    return image, label


def test_three_tasks_written_as_decathlon_folders_with_held_out_brains(tmp_path, templates):
    out = tmp_path / "out"
    results = prep.prepare(out, **templates)
    assert [r["task"] for r in results] == ["BrainMask", "BrainTissue", "AAL116"]
    for task, train_case, held_out in (("brainmask", "colin27", "mni152"), ("tissue", "mni152", "colin27"),
                                       ("aal", "colin27", "mni152")):
        data = json.loads((out / task / "dataset.json").read_text())
        assert [e["image"] for e in data["training"]] == [f"./imagesTr/{train_case}.nii.gz"]
        assert [e["label"] for e in data["validation"]] == [f"./labelsTr/{held_out}.nii.gz"]
        for case in (train_case, held_out):
            image, label = _read(out / task, case)
            assert np.array_equal(image.affine, label.affine) and image.shape == label.shape
            assert label.get_data_dtype() == np.uint8 and image.get_data_dtype() == np.float32
        # the decathlon dataset takes the held-out brain as val and test
        assert [c.id for c in build_dataset("decathlon", "test", root=str(out / task), cache_rate=0.0).cases] == \
            [held_out]
    # brain mask: ch2bet > 0 on Colin27 (with skull), T1 > 0.2 max on MNI152
    _, colin_label = _read(out / "brainmask", "colin27")
    bet = np.asarray(nib.load(templates["mricron_dir"] / "ch2bet.nii.gz").dataobj)
    assert np.array_equal(np.asarray(colin_label.dataobj), (bet > 0).astype(np.uint8))
    colin_image, _ = _read(out / "brainmask", "colin27")
    assert colin_image.get_fdata()[0, 0, 0] > 0  # the image keeps the skull
    # tissue: argmax of [0.5, GM, WM]; Colin27's labels are MNI's shifted by one voxel, inside its brain only
    _, mni_tissue = _read(out / "tissue", "mni152")
    t = np.asarray(mni_tissue.dataobj)
    assert (t[3, 3, 2], t[5, 5, 4], t[2, 2, 2], t[0, 0, 0]) == (1, 2, 0, 0)
    _, colin_tissue = _read(out / "tissue", "colin27")
    expected = t[1:COLIN_SHAPE[0] + 1, :COLIN_SHAPE[1], :COLIN_SHAPE[2]].copy()
    expected[bet == 0] = 0
    assert np.array_equal(np.asarray(colin_tissue.dataobj), expected)
    # aal: names from aal.nii.txt; MNI's labels are Colin's shifted back, inside the MNI brain
    data = json.loads((out / "aal" / "dataset.json").read_text())
    assert data["labels"] == {"0": "background", "1": "Region_A_L", "2": "Region_B_R", "3": "Region_C"}
    assert data["validation"] and data["cases"][1]["approximate_labels"] is True
    _, mni_aal = _read(out / "aal", "mni152")
    a = np.asarray(mni_aal.dataobj)
    assert a[5, 4, 4] == 3 and a[3, 5, 5] == 1 and a[7, 5, 5] == 2 and a[0, 5, 5] == 0


def test_spacing_resamples_every_case_to_one_voxel_size(tmp_path, templates):
    out = tmp_path / "out"
    prep.prepare(out, ["brainmask"], spacing=2.0, **templates)
    image, label = _read(out / "brainmask", "colin27")
    assert image.shape == tuple((n - 1) // 2 + 1 for n in COLIN_SHAPE) == label.shape
    assert np.allclose(np.linalg.norm(image.affine[:3, :3], axis=0), 2.0)
    assert np.allclose(image.affine[:3, 3], COLIN_AFFINE[:3, 3])  # same origin
    bet = np.asarray(nib.load(templates["mricron_dir"] / "ch2bet.nii.gz").dataobj)
    assert np.array_equal(np.asarray(label.dataobj), (bet[::2, ::2, ::2] > 0).astype(np.uint8))
    assert not (out / "tissue").exists()


def test_missing_templates_say_how_to_install_them(tmp_path, templates, monkeypatch, capsys):
    with pytest.raises(DataError, match=r"missing in .*: \['ch2bet.nii.gz'\]; install Debian's mricron-data "
                                        r"\(`apt-get install mricron-data`\)"):
        (templates["mricron_dir"] / "ch2bet.nii.gz").unlink()
        prep.find_mricron_dir(templates["mricron_dir"])
    monkeypatch.setattr(prep, "MRICRON_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.setattr(prep, "_dpkg_templates", lambda: [])
    with pytest.raises(DataError, match="Colin27/AAL templates not found .*apt-get install mricron-data"):
        prep.find_mricron_dir()
    monkeypatch.setattr(prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="nilearn, which is not installed: install nilearn \\(`pip install nilearn`"):
        prep.find_nilearn_data_dir()
    # the command line prints the message alone and exits with status 2
    assert prep.main(["--out", str(tmp_path / "o"), "--nilearn-dir", str(templates["nilearn_dir"])]) == 2
    assert "apt-get install mricron-data" in capsys.readouterr().err


def test_command_line_writes_the_chosen_tasks(tmp_path, templates, capsys):
    args = ["--out", str(tmp_path / "o"), "--tasks", "aal", "--mricron-dir", str(templates["mricron_dir"]),
            "--nilearn-dir", str(templates["nilearn_dir"])]
    assert prep.main(args) == 0
    printed = capsys.readouterr().out
    assert "AAL116" in printed and "approximate labels" in printed
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["aal"]


def _real_templates():
    try:
        return {"mricron_dir": prep.find_mricron_dir(), "nilearn_dir": prep.find_nilearn_data_dir()}
    except DataError as e:
        pytest.skip(f"real templates not installed: {e}"[:300])


def test_real_templates_brain_mask_at_2mm(tmp_path):
    found = _real_templates()
    prep.prepare(tmp_path, ["brainmask"], spacing=2.0, **found)
    colin_image, colin_label = _read(tmp_path / "brainmask", "colin27")
    mni_image, mni_label = _read(tmp_path / "brainmask", "mni152")
    assert colin_image.shape == (91, 109, 91) and mni_image.shape == (99, 117, 95)
    # about 1.74 M (Colin27) and 1.88 M (MNI152) brain voxels at 1 mm: an eighth of that at 2 mm
    assert 200_000 < int(np.asarray(colin_label.dataobj).sum()) < 235_000
    assert 220_000 < int(np.asarray(mni_label.dataobj).sum()) < 250_000


def test_real_templates_tissue_and_aal(tmp_path):
    found = _real_templates()
    prep.prepare(tmp_path, ["tissue", "aal"], **found)
    data = json.loads((tmp_path / "aal" / "dataset.json").read_text())
    assert len(data["labels"]) == 117 and data["labels"]["1"] == "Precentral_L" and data["labels"]["116"] == \
        "Vermis_10"
    _, aal_mni = _read(tmp_path / "aal", "mni152")
    assert aal_mni.shape == (197, 233, 189) and len(np.unique(np.asarray(aal_mni.dataobj))) == 117
    _, tissue = _read(tmp_path / "tissue", "mni152")
    counts = np.bincount(np.asarray(tissue.dataobj).ravel())
    assert abs(counts[1] - 1.08e6) < 0.05e6 and abs(counts[2] - 0.63e6) < 0.05e6  # data.md's recipe counts


@pytest.mark.parametrize("config", ["swin_unetr_fs12_brainmask", "swin_unetr_fs24_tissue", "swin_unetr_fs12_aal",
                                    "mambaout_femto_unetr_tissue_slices"])
def test_brain_configs_build_their_splits_on_prepared_folders(tmp_path, templates, config):
    from pathlib import Path

    from attnseg.config import load_config
    from attnseg.engine.runner import build_dataset as runner_dataset

    prep.prepare(tmp_path / "brain", **templates)
    path = Path(__file__).resolve().parents[2] / "configs" / "brain" / f"{config}.yaml"
    slices = "slices" in config
    key = "data.dataset.source" if slices else "data.dataset"
    task = {"brainmask": "brainmask", "tissue": "tissue", "aal": "aal"}[config.split("_")[-1 - slices]]
    overrides = [f"{key}.root={tmp_path / 'brain' / task}", f"{key}.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(path, overrides + (["model.num_classes=4"] if task == "aal" else []))  # 3 stand-in regions
    train, val, test = (runner_dataset(cfg, s) for s in ("train", "val", "test"))
    if slices:
        assert {c.id for c in train.cases} == {"mni152"} and {c.id for c in test.cases} == {"colin27"}
        s = train[0]
        assert s["image"].shape == (1, 128, 128) and s["mask"].shape == (128, 128)
        assert len(val) == val.source.prepared(0)["image"].shape[3] == 6  # every axial slice: 10 at 1 mm, 6 at 2 mm
    else:
        item = train[0]
        crop = cfg.data.volume.crop
        crops = item if isinstance(item, list) else [item]
        assert len(crops) == crop.num_samples and all(c["image"].shape == (1, *crop.spatial_size) for c in crops)
        assert len(train) == cfg.data.dataset.kwargs["train_repeats"] and len(train.cases) == 1
        assert [c.id for c in val.cases] == [c.id for c in test.cases]
        held_out = val[0]
        assert held_out["image"].shape[1:] == held_out["mask"].shape
        assert held_out["meta"]["spacing"] == pytest.approx((2.0, 2.0, 2.0))
        assert int(held_out["mask"].max()) < cfg.model.num_classes
    assert any((tmp_path / "cache").iterdir())  # the persistent cache was filled
