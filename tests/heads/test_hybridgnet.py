"""HybridGNet graph decoder: template, rasterizer, ChebConv, head contract, loss, training smoke run."""

import json

import numpy as np
import pytest
import torch

from attnseg.datasets.landmark_template import LandmarkTemplate, load_template, shipped_templates
from attnseg.datasets.rasterize import fill_polygon, landmarks_to_label_map, rasterize_landmarks
from attnseg.engine.losses import HybridGNetLoss
from attnseg.errors import ConfigError, InputSizeError
from attnseg.heads.hybridgnet import HybridGNetHead, roi_lookup
from attnseg.layers.graph import ChebConv, cheb_laplacian
from attnseg.models import Segmentor
from attnseg.models.hybridgnet import HybridGNetEncoder
from attnseg.registry import HEADS, LOSSES
from tests.conftest import load_fixture

SMALL = {"filters": [2, 8, 8, 8, 4, 4, 4], "K": 3, "latent_dim": 8}


def _unpack(packed: torch.Tensor) -> np.ndarray:
    return ((packed.long()[:, None] >> torch.arange(7, -1, -1)) & 1).reshape(1024, 1024).numpy().astype(bool)


# -- template -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, nodes, pooled", [("LH", 120, 60), ("all", 166, 84), ("lungs", 94, 47)])
def test_template_matrices_equal_the_official_ones(variant, nodes, pooled):
    fx = load_fixture("hybridgnet_template.pt")["templates"][variant]
    t = load_template(f"chest_xray:{variant}")
    assert (t.num_nodes, t.num_pooled_nodes) == (nodes, pooled)
    for name, m in (("A", t.adjacency()), ("AD", t.pooled_adjacency()), ("D", t.downsample()), ("U", t.upsample())):
        assert m.dtype == torch.float32 and torch.equal(m, fx[name]), name


def test_template_api_for_inference_tools():
    t = load_template("chest_xray:LH")
    assert t.name == "chest_xray:LH" and t.num_classes == 3 and t.class_names == ["background", "lungs", "heart"]
    assert t.describe() == [
        {"name": "right_lung", "nodes": [0, 44], "label": 1, "label_name": "lungs"},
        {"name": "left_lung", "nodes": [44, 94], "label": 1, "label_name": "lungs"},
        {"name": "heart", "nodes": [94, 120], "label": 2, "label_name": "heart"},
    ]
    full = load_template("chest_xray")
    assert full.num_nodes == 166 and full.num_classes == 4 and full.organ("left_clavicle").nodes == slice(143, 166)
    assert "chest_xray" in shipped_templates()
    # a 166-point (full layout) array gives the LH variant its first 120 rows
    pts = np.arange(332.0).reshape(166, 2)
    assert np.array_equal(t.select(pts), pts[:120])
    with pytest.raises(ValueError, match="130 points, but template chest_xray:LH needs 120 or 166"):
        t.select(np.zeros((130, 2)))


def test_templates_from_files_and_their_errors(tmp_path):
    spec = {"name": "hand", "organs": [{"name": "palm", "num_points": 6, "label": 1},
                                       {"name": "thumb", "num_points": 5, "label": 2, "draw_order": -1}],
            "labels": {"1": "palm", "2": "thumb"}, "variants": {"palm_only": ["palm"]}}
    (tmp_path / "hand.json").write_text(json.dumps(spec))
    (tmp_path / "hand.yaml").write_text("organs:\n  - {name: palm, num_points: 6, label: 1}\n")
    t = load_template(str(tmp_path / "hand.json"))
    assert isinstance(t, LandmarkTemplate) and t.num_nodes == 11 and t.num_pooled_nodes == 6
    assert [o.name for o in t.draw_sequence()] == ["thumb", "palm"]  # draw_order first, then node order
    assert load_template(f"{tmp_path / 'hand.json'}:palm_only").num_nodes == 6
    assert load_template(str(tmp_path / "hand.yaml")).name == "hand"
    with pytest.raises(ConfigError, match="unknown landmark template 'chest_xrey'; did you mean 'chest_xray'"):
        load_template("chest_xrey")
    with pytest.raises(ConfigError, match="no variant 'lh'"):
        load_template("chest_xray:lh")
    with pytest.raises(ConfigError, match="template file not found"):
        load_template(str(tmp_path / "missing.json"))
    for bad, message in ((
            {"organs": [{"name": "a", "num_points": 2}]}, r"num_points must be an int >= 3"), (
            {"organs": [{"name": "a", "num_points": 4, "label": 0}]}, r"label must be an int in 1..255"), (
            {"organs": [{"name": "a", "num_points": 4}, {"name": "a", "num_points": 4}]}, "unique"), (
            {"organs": [{"name": "a", "num_points": 4, "colour": 1}]}, "unknown keys"), (
            {"organz": []}, "unknown keys")):
        with pytest.raises(ConfigError, match=message):
            load_template(bad)


# -- rasterization ------------------------------------------------------------------------------------------------

def test_rasterizer_equals_the_official_getseg_label_map():
    fx = load_fixture("hybridgnet_rasterize.pt")
    labels = rasterize_landmarks(fx["landmarks_px"].numpy(), load_template("chest_xray"), (1024, 1024))
    assert labels.dtype == np.uint8
    assert np.array_equal(labels, fx["getSeg_label_map"].numpy())


def test_rasterizer_equals_the_evaluation_notebook_masks():
    fx = load_fixture("hybridgnet_rasterize.pt")
    points = np.trunc((fx["notebook_target_float32"].reshape(-1) * 1024).reshape(-1, 2).numpy().astype(np.float64))
    t = load_template("chest_xray:LH")
    lungs, heart = np.zeros((1024, 1024), np.uint8), np.zeros((1024, 1024), np.uint8)
    for organ in ("right_lung", "left_lung"):
        fill_polygon(lungs, points[t.organ(organ).nodes], 255)
    fill_polygon(heart, points[t.organ("heart").nodes], 255)
    assert np.array_equal(lungs > 0, _unpack(fx["notebook_lungs_packbits"]))
    assert np.array_equal(heart > 0, _unpack(fx["notebook_heart_packbits"]))
    assert (lungs > 0).sum() == fx["notebook_counts"]["lungs"] and (heart > 0).sum() == fx["notebook_counts"]["heart"]


def test_fill_polygon_includes_the_boundary_and_clips_outside_points():
    square = fill_polygon(np.zeros((6, 6), np.uint8), np.array([[1, 1], [4, 1], [4, 4], [1, 4]]), 7)
    assert (square[1:5, 1:5] == 7).all() and square.sum() == 16 * 7
    triangle = fill_polygon(np.zeros((8, 8), np.uint8), np.array([[-5, -5], [10, 1], [1, 10]]), 1)
    assert triangle[0, 0] == 1 and triangle[7, 7] == 0 and triangle.sum() > 20
    assert fill_polygon(np.zeros((4, 4), np.uint8), np.array([[10, 10], [20, 10], [20, 20]]), 1).sum() == 0


def test_label_map_from_normalised_landmarks_scales_x_by_width_and_y_by_height():
    t = load_template("chest_xray:LH")
    fx = load_fixture("hybridgnet_rasterize.pt")
    norm = torch.from_numpy(fx["landmarks_px"].numpy()[:120] / 1024).float()
    maps = landmarks_to_label_map(norm[None].expand(2, -1, -1), t, (64, 96))
    assert maps.shape == (2, 64, 96) and maps.dtype == torch.long and set(maps.unique().tolist()) == {0, 1, 2}
    direct = rasterize_landmarks(norm.double().numpy() * [96, 64], t, (64, 96), np.int64)
    assert np.array_equal(maps[0].numpy(), direct)


# -- graph convolution ----------------------------------------------------------------------------------------------

def test_chebconv_equals_the_chebyshev_formula():
    torch.manual_seed(0)
    a = load_template("chest_xray:LH").adjacency()
    conv = ChebConv(5, 7, a, K=4).double()
    x = torch.randn(3, 120, 5, dtype=torch.float64)
    deg = a.double().sum(1)
    lap = -(a.double() / deg.sqrt()[:, None] / deg.sqrt()[None, :])  # -D^-1/2 A D^-1/2
    assert torch.allclose(cheb_laplacian(a), lap)
    t = [x, lap @ x]
    for _ in range(2):
        t.append(2 * lap @ t[-1] - t[-2])
    expected = sum(tk @ lin.weight.t() for tk, lin in zip(t, conv.lins)) + conv.bias
    assert torch.allclose(conv(x), expected, atol=1e-12)
    # PyG 2.x parameter names; K = 1 ignores the graph
    assert sorted(conv.state_dict()) == ["bias", "lins.0.weight", "lins.1.weight", "lins.2.weight", "lins.3.weight"]
    one = ChebConv(5, 2, a, K=1, bias=False)
    assert list(one.state_dict()) == ["lins.0.weight"]
    assert torch.allclose(one(x.float()), x.float() @ one.lins[0].weight.t())
    with pytest.raises(ValueError, match=r"expects \[\.\.\., 120 nodes, 5 features\]"):
        conv(torch.randn(1, 60, 5, dtype=torch.float64))


# -- the head -----------------------------------------------------------------------------------------------------

def _segmentor(latent="avgpool", **kw):
    enc = HybridGNetEncoder()
    head = HybridGNetHead([f["num_chs"] for f in enc.feature_info], [f["reduction"] for f in enc.feature_info],
                          num_classes=3, in_chans=1, latent=latent, **{**SMALL, **kw})
    return Segmentor(enc, head)


def test_odd_input_sizes_with_the_size_agnostic_latent():
    model = _segmentor().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 77, 101))
    assert out["landmarks"].shape == (2, 120, 2) and out["pos1"].shape == (2, 60, 2) and out["pos2"].shape == (2, 120, 2)
    assert out["mu"].shape == out["logvar"].shape == (2, 8) and out["input_size"] == (77, 101)
    labels, probs = model.postprocess(out), model.class_probabilities(out)
    assert labels.shape == (2, 77, 101) and labels.dtype == torch.long
    assert probs.shape == (2, 3, 77, 101) and torch.equal(probs.argmax(1), labels)
    assert torch.equal(probs.sum(1), torch.ones(2, 77, 101))


def test_encoder_gives_ceil_stride_pyramids_at_any_size():
    enc = HybridGNetEncoder(out_indices=(0, 2, 5)).eval()
    assert [(f["num_chs"], f["reduction"]) for f in enc.feature_info] == [(8, 1), (32, 4), (128, 32)]
    with torch.no_grad():
        maps = enc.forward_pyramid(torch.randn(1, 1, 33, 70))
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 33, 70), (32, 9, 18), (128, 2, 3)]
    with pytest.raises(InputSizeError, match=r"expects \[B, 1, H, W\]"):
        enc.forward_pyramid(torch.randn(1, 3, 32, 32))


def test_crop_output_rescales_coordinates_from_the_padded_to_the_unpadded_size():
    head = _segmentor().head
    out = {"landmarks": torch.tensor([[[0.5, 0.25]]]), "pos1": torch.tensor([[[1.0, 1.0]]]), "input_size": (128, 96)}
    cropped = head.crop_output(out, (100, 80))
    assert torch.allclose(cropped["landmarks"], torch.tensor([[[0.5 * 96 / 80, 0.25 * 128 / 100]]]))
    assert torch.allclose(cropped["pos1"], torch.tensor([[[96 / 80, 128 / 100]]])) and cropped["input_size"] == (100, 80)
    # the same pixel: padding on the far side does not move it
    assert cropped["landmarks"][0, 0, 0] * 80 == pytest.approx(out["landmarks"][0, 0, 0] * 96)


def test_flatten_latent_needs_its_input_size_and_other_constructor_errors():
    model = _segmentor(latent="flatten", input_size=64)
    assert model.head.fc_mu.in_features == 128 * 2 * 2
    with pytest.raises(InputSizeError, match=r"exactly \[64, 64\].*latent='avgpool'"):
        model(torch.randn(1, 1, 96, 96))
    args = ([32, 64, 128, 128], [4, 8, 16, 32])
    with pytest.raises(ValueError, match="num_classes must be the template's 3"):
        HybridGNetHead(*args, num_classes=4)
    with pytest.raises(ValueError, match="input_size must be one or two sizes divisible by 32"):
        HybridGNetHead(*args, num_classes=3, input_size=100)
    with pytest.raises(ValueError, match="skip_levels"):
        HybridGNetHead(*args, num_classes=3, skip_levels=(-1, 4))
    with pytest.raises(ValueError, match="latent must be one of"):
        HybridGNetHead(*args, num_classes=3, latent="mean")
    with pytest.raises(ValueError, match="cannot be flipped"):
        model.head.flip_output({}, -1)


def test_training_samples_z_and_eval_uses_mu():
    model = _segmentor()
    x = torch.randn(2, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a["landmarks"], b["landmarks"])
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.equal(c["landmarks"], d["landmarks"])


def test_gradients_reach_every_parameter():
    model = _segmentor(skip_levels=(-2, -3)).train()
    out = model(torch.randn(2, 1, 64, 96))
    loss = HybridGNetLoss()(out, torch.rand(2, 120, 2))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_lookup_scales_x_by_width_and_y_by_height_and_official_mode_uses_the_width():
    fmap = torch.arange(8 * 16, dtype=torch.float32).reshape(1, 1, 8, 16)  # value = 16 * row + col
    pos = torch.tensor([[[0.5, 0.5]]])
    # box centred at (w x, h y) = (8, 4) pixels with the half-pixel RoIAlign alignment: the mean is the map there
    assert roi_lookup(pos, fmap).item() == pytest.approx(16 * 4 + 8)
    # official: y scaled by the width (16) -> row 8 of 8: samples at rows 7, 8 (clamped to 7) and 9 (outside: 0)
    assert roi_lookup(pos, fmap, mode="official").item() == pytest.approx(2 * (16 * 7 + 8) / 3)
    pos.requires_grad_(True)
    fmap.requires_grad_(True)
    roi_lookup(pos, fmap).sum().backward()
    assert fmap.grad is not None and pos.grad is None  # RoIAlign: no gradient through the boxes, as published


def test_registered_head_and_loss_contract():
    assert HEADS.get("hybridgnet") is HybridGNetHead
    assert HybridGNetHead.output_kind == "landmarks" and HybridGNetHead.default_loss == "hybridgnet"
    loss_cls = LOSSES.get("hybridgnet")
    assert loss_cls.accepts == ("landmarks",) and loss_cls.target_key == "landmarks"


# -- the loss -----------------------------------------------------------------------------------------------------

def test_loss_is_the_published_formula_and_takes_the_eval_output():
    torch.manual_seed(1)
    t = load_template("chest_xray:LH")
    y = torch.rand(2, 120, 2)
    out = {"landmarks": torch.rand(2, 120, 2), "pos1": torch.rand(2, 60, 2), "pos2": torch.rand(2, 120, 2),
           "mu": torch.randn(2, 8), "logvar": torch.randn(2, 8), "downsample": t.downsample()}
    kl = -0.5 * (1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp()).mean()
    mse = torch.nn.functional.mse_loss
    expected = mse(out["landmarks"], y) + mse(out["pos1"], t.downsample() @ y) + mse(out["pos2"], y) + 1e-5 * kl
    assert torch.allclose(HybridGNetLoss(num_classes=3)(out, y), expected)
    weighted = HybridGNetLoss(landmark_weight=2.0, pos1_weight=0.0, pos2_weight=0.5, kl_weight=0.0)(out, y)
    assert torch.allclose(weighted, 2 * mse(out["landmarks"], y) + 0.5 * mse(out["pos2"], y))
    model = _segmentor().eval()
    with torch.no_grad():
        value = HybridGNetLoss()(model(torch.randn(1, 1, 64, 64)), torch.rand(1, 120, 2))
    assert torch.isfinite(value)
    with pytest.raises(ValueError, match=r"target landmarks \[1, 94, 2\] do not match"):
        HybridGNetLoss()(out, torch.rand(1, 94, 2))
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        HybridGNetLoss(kl_weight=-1.0)


# -- training smoke run -------------------------------------------------------------------------------------------

def test_training_smoke_run_on_synthetic_landmarks(tmp_path):
    from attnseg.config import load_config
    from attnseg.engine.runner import train
    from tests.conftest import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs/hybridgnet/test_mambaout_hybridgnet_synthetic_landmarks.yaml",
                      [f"work_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=1",
                       "trainer.max_epochs=1", "data.dataset.num_train=8", "data.dataset.num_val=2"])
    result = train(cfg)
    assert result["global_step"] == 2
    metrics = result["metrics"]
    assert np.isfinite(metrics["val/loss"]) and 0.0 <= metrics["val/mDice"] <= 1.0
    assert "val/Dice_lungs" in metrics and "val/Dice_heart" in metrics
    ckpt = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    assert any(k.startswith("model.head.conv6.lins.") for k in ckpt["state_dict"])


# -- docstring examples -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["attnseg.datasets.landmark_template", "attnseg.datasets.rasterize",
                                    "attnseg.layers.graph", "attnseg.heads.hybridgnet", "attnseg.models.hybridgnet"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch, "np": np},
                             optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
