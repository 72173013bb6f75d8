"""attnseg-infer with heads whose output is not class logits: a connectivity head (mask by bilateral voting; flips
and windows averaged as its class probabilities) and HybridGNet (landmarks JSON, contour image, rasterized mask)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from attnseg.cli import infer, train
from attnseg.config import load_config
from attnseg.datasets.landmark_template import load_template
from attnseg.datasets.rasterize import landmarks_to_label_map
from attnseg.models.builder import build_model

REPO = Path(__file__).resolve().parents[1]
RUN = {"max_epochs": 1, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu"}


def _write(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg_path, tmp_path):
    assert train.main([str(cfg_path)]) == 0
    return tmp_path / "work" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def connectivity_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conn")
    cfg = _write(tmp, {
        "work_dir": str(tmp / "work"),
        "model": {"backbone": {"name": "test_mambaout"}, "num_classes": 3,
                  "head": {"name": "connectivity", "inner": {"name": "unetr", "feature_size": 8},
                           "decode": "multiclass"}},
        "data": {"dataset": {"name": "synthetic2d", "num_classes": 3, "image_size": [32, 32], "num_train": 4,
                             "num_val": 2, "num_test": 2}, "batch_size": 2},
        "trainer": RUN, "evaluation": {"hd95": False},
    })
    return cfg, _train(cfg, tmp)


def _model(cfg, ckpt):
    from attnseg.checkpoint import load_pretrained

    model = build_model(load_config(cfg))
    load_pretrained(model, ckpt)
    return model.eval()


def test_connectivity_mask_is_the_vote_and_tta_averages_its_probabilities(connectivity_run, tmp_path):
    cfg, ckpt = connectivity_run
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "odd.png"),
                       "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    mask = np.array(Image.open(tmp_path / "out" / "odd_mask.png"))
    model = _model(cfg, ckpt)
    x = torch.from_numpy(np.array(Image.open(tmp_path / "odd.png"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (1, 8 * 3, 45, 61)  # 8 directions per class
        np.testing.assert_array_equal(mask, model.postprocess(logits)[0].numpy())
        # the head's probabilities (its vote) of a flipped image, flipped back, equal those of the flipped-back
        # direction channels: what lets TTA average probabilities
        probs = model.class_probabilities
        torch.testing.assert_close(probs(model(x.flip(3))).flip(3), probs(model.head.flip_output(model(x.flip(3)), 3)))
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "odd.png"),
                       "--out", str(tmp_path / "tta"), "--tta", "--no-progress"]) == 0
    tta_mask = np.array(Image.open(tmp_path / "tta" / "odd_mask.png"))
    with torch.no_grad():  # flips are averaged as class probabilities (votes multiply logits: no logit averaging)
        expected = (probs(logits) + probs(model(x.flip(2))).flip(2) + probs(model(x.flip(3))).flip(3)) / 3
    np.testing.assert_array_equal(tta_mask, expected.argmax(1)[0].numpy())
    # windows too: a 20-pixel window over the 45x61 image gives a mask of the image's size and classes
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "odd.png"),
                       "--out", str(tmp_path / "sw"), "--window", "20", "--no-progress"]) == 0
    sw_mask = np.array(Image.open(tmp_path / "sw" / "odd_mask.png"))
    assert sw_mask.shape == (45, 61) and sw_mask.max() < 3


@pytest.fixture(scope="module", params=["avgpool", "flatten"])
def landmark_run(request, tmp_path_factory):
    """The CI landmark config, with the size-agnostic latent or the published flatten latent (fixed 64x64 input)."""
    tmp = tmp_path_factory.mktemp("landmarks")
    base = yaml.safe_load((REPO / "configs/hybridgnet/test_mambaout_hybridgnet_synthetic_landmarks.yaml").read_text())
    base.pop("_base_")
    base["work_dir"] = str(tmp / "work")
    base["trainer"] = RUN
    if request.param == "flatten":
        base["model"]["head"].update(latent="flatten", input_size=64)
    cfg = _write(tmp, base)
    return cfg, _train(cfg, tmp)


def test_landmark_model_writes_contours_json_and_its_rasterized_mask(landmark_run, tmp_path, capsys):
    """A 72x90 image: any size for the avgpool latent, resized to 64x64 for the flatten latent; the JSON, mask and
    contours are in the image's own pixels either way."""
    from attnseg.datasets.landmarks import synthetic_sample

    cfg, ckpt = landmark_run
    template = load_template("chest_xray:LH")
    sample = synthetic_sample(template, (72, 90), np.random.default_rng(3))
    image = sample[0] if isinstance(sample, tuple) else sample["image"]
    image = np.asarray(image, dtype=np.float32).squeeze()
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(tmp_path / "cxr.png")
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "cxr.png"),
                       "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / "cxr_landmarks.json").read_text())
    assert (record["width"], record["height"]) == (90, 72)
    assert [(o["name"], o["label"], len(o["points"])) for o in record["organs"]] == [
        (o.name, o.label, o.num_points) for o in template.organs]
    mask = np.array(Image.open(tmp_path / "out" / "cxr_mask.png"))
    assert mask.shape == (72, 90)
    # the mask is the rasterization of exactly the contours in the JSON
    points = np.concatenate([np.asarray(o["points"]) for o in record["organs"]]) / np.array([90, 72])
    expected = landmarks_to_label_map(torch.from_numpy(points)[None].float(), template, (72, 90))[0].numpy()
    assert (mask == expected).mean() > 0.999  # JSON coordinates are rounded to 1e-3 px
    contours = np.array(Image.open(tmp_path / "out" / "cxr_contours.png"))
    assert contours.shape == (72, 90, 3) and (contours[..., 0] != contours[..., 1]).any()  # coloured lines drawn
    assert infer.main(["--config", str(cfg), "--checkpoint", str(ckpt), str(tmp_path / "cxr.png"),
                       "--out", str(tmp_path / "tta"), "--tta"]) == 2
    assert "--tta flips the image" in capsys.readouterr().err
