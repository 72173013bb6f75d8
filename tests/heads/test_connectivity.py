"""Connectivity (ConnNet / BiconNet / DconnNet): ops, decode rules, heads, loss, training."""

import doctest

import pytest
import torch
import torch.nn.functional as F

import attnseg.heads.connectivity as head_module
import attnseg.layers.connectivity as conn
import attnseg.models.dconnnet as model_module
from attnseg import build_model
from attnseg.config import validate_config
from attnseg.engine.losses import ConnectivityLoss
from attnseg.heads.connectivity import ConnectivityHead, DconnNetHead
from attnseg.models import Segmentor
from attnseg.models.dconnnet import test_dconnnet as small_dconnnet
from attnseg.registry import BACKBONES, HEADS, LOSSES, MODELS
from tests.conftest import load_fixture

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
# DconnNet's decoder at CI widths (over test_mambaout: stride-2 level synthesized, 1x1 adapters)
_SMALL_DCONNNET = {"name": "dconnnet", "widths": [16, 16, 32, 32, 64], "decoder_channels": 8}


@pytest.mark.parametrize("module", [conn, head_module, model_module])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=FLAGS)
    assert result.attempted > 0 and result.failed == 0


def test_loss_docstring_example():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(ConnectivityLoss, globs={"torch": torch, "ConnectivityLoss": ConnectivityLoss}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


def test_registered():
    assert "connectivity" in HEADS and "dconnnet" in HEADS and "connectivity" in LOSSES
    assert "dconnnet_resnet34" in MODELS and "test_dconnnet" in MODELS
    assert ConnectivityLoss.accepts == ("connectivity",) and ConnectivityLoss.target_key == "mask"
    for cls in (ConnectivityHead, DconnNetHead):
        assert cls.output_kind == "connectivity" and cls.default_loss == "connectivity"


# -- neighbourhoods and ops ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,n", [(2, 8), (2, 4), (3, 26), (3, 6)])
def test_offsets_are_lexicographic_and_opposite_is_n_minus_1_minus_k(dims, n):
    offsets = conn.neighbour_offsets(dims, n)
    assert len(offsets) == n and list(offsets) == sorted(offsets) and len(set(offsets)) == n
    assert all(tuple(-v for v in offsets[k]) == offsets[n - 1 - k] for k in range(n))
    assert all(max(map(abs, o)) == 1 for o in offsets)
    if n in (4, 6):
        assert all(sum(map(abs, o)) == 1 for o in offsets)


def test_official_2d_direction_order():
    assert conn.neighbour_offsets(2) == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
    assert conn.default_neighbours(2) == 8 and conn.default_neighbours(3) == 26


def _naive_encode(mask, offsets):
    """Loop definition of the cube: C[N*c + k](p) = m_c(p) * m_c(p + delta_k), zero outside."""
    b, k_cls, *size = mask.shape
    out = torch.zeros(b, k_cls * len(offsets), *size)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in size]).view(-1, len(size)).tolist():
        for k, o in enumerate(offsets):
            q = [i + d for i, d in zip(idx, o)]
            if all(0 <= v < s for v, s in zip(q, size)):
                for c in range(k_cls):
                    out[(slice(None), c * len(offsets) + k, *idx)] = mask[(slice(None), c, *idx)] * mask[
                        (slice(None), c, *q)]
    return out


@pytest.mark.parametrize("shape,n", [((2, 2, 5, 7), 8), ((1, 1, 6, 5), 4), ((1, 2, 3, 4, 5), 26), ((1, 1, 4, 3, 5), 6)])
def test_encode_matches_the_loop_definition(shape, n):
    mask = (torch.rand(shape) > 0.4).float()
    dims = len(shape) - 2
    assert torch.equal(conn.encode(mask, n), _naive_encode(mask, conn.neighbour_offsets(dims, n)))


def test_shift_and_errors():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    assert torch.equal(conn.shift(x, (1, -1))[0, 0], torch.tensor([[0, 4, 5, 6], [0, 8, 9, 10], [0, 0, 0, 0.0]]))
    with pytest.raises(ValueError, match=r"neighbours must be one of \(8, 4\) in 2D"):
        conn.neighbour_offsets(2, 26)
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        conn.encode(torch.ones(1, 1, 5))
    with pytest.raises(ValueError, match=r"expected a connectivity map \[B, 8 \* K, H, W\]"):
        conn.vote(torch.ones(1, 7, 4, 4))


# -- parity with the official encodings, votes and losses (connectivity_ops.pt) --------------------------------------

def test_encoding_parity_exact():
    fx = load_fixture("connectivity_ops.pt")
    data, enc = fx["data"], fx["encoding"]
    assert fx["sizes"]["K"] == 4
    single = conn.encode(data["mask"])
    assert torch.equal(single, enc["dconnnet_connectivity_matrix_single"])
    assert torch.equal(single, enc["biconnet_sal2conn_stacked"])
    assert torch.equal(single, enc["medical_connectivity_matrix_stacked"])
    assert torch.equal(conn.encode_labels(data["mask"][:, 0].long(), 1), single)
    multi = conn.encode_labels(data["labels"], 4)
    assert torch.equal(multi, enc["dconnnet_connectivity_matrix_multi"])
    assert torch.equal(conn.encode(data["onehot"]), multi)
    assert torch.equal(conn.edge_map(single), enc["edge_single"])
    assert torch.equal(conn.edge_map(multi), enc["edge_multi"])
    recon = conn.vote(single)[0]
    assert torch.equal(recon, enc["gt_vote_reconstruction_single"])
    assert int((data["mask"] - recon).sum()) == enc["gt_vote_isolated_pixels_lost"] == 13


def test_voting_rules_parity():
    fx = load_fixture("connectivity_ops.pt")
    data, votes, tol = fx["data"], fx["voting"], fx["tolerance"]["soft_votes"]
    logits, logits_multi = data["logits_single"], data["logits_multi"]
    s, v = conn.vote(torch.sigmoid(logits))
    ref = votes["dconnnet_bilateral_voting_on_sigmoid"]
    assert torch.allclose(s, ref["pred_mask"], **tol) and torch.allclose(v, ref["vote_out"], **tol)
    soft = conn.class_probabilities(logits, 1, "soft")
    assert torch.allclose(soft, votes["biconnet_bv_test"]["output"], **tol)
    binary = conn.label_map(logits, 1, "binarize")[:, None].float()
    assert torch.equal(binary, votes["dconnnet_test_single"]["output"])
    assert torch.equal(binary, votes["medical_test"]["output"])
    assert torch.equal(conn.vote((torch.sigmoid(logits) > 0.5).float())[1], votes["dconnnet_test_single"]["vote_out"])
    final, vote_out = conn.vote(logits_multi)
    multi = votes["dconnnet_test_multi"]
    assert torch.allclose(vote_out, multi["vote_out"], **tol)
    labels = conn.label_map(logits_multi, 4, "multiclass")
    assert torch.equal(labels[:, None], multi["top1_index"])
    assert torch.equal(F.one_hot(labels, 4).movedim(-1, 1).float(), multi["onehot"])


@pytest.mark.parametrize("name,kwargs,which", [
    ("dconnnet_single_isic", {"num_classes": 1}, "single"),
    ("dconnnet_single_chase", {"num_classes": 1, "variant": "dconnnet_chase"}, "single"),
    ("dconnnet_multi", {"num_classes": 4}, "multi"),
    ("biconnet_bicon_loss", {"num_classes": 1, "variant": "bicon"}, "single"),
    ("medical_connect_loss", {"num_classes": 1, "variant": "biconnet_medical"}, "single"),
])
def test_loss_parity(name, kwargs, which):
    fx = load_fixture("connectivity_ops.pt")
    data, expected, tol = fx["data"], fx["losses"][name], fx["losses"]["tolerance"]
    target = data["mask"][:, 0].long() if which == "single" else data["labels"]
    value = ConnectivityLoss(**kwargs)(data[f"logits_{which}"], target)
    assert torch.allclose(value, torch.tensor(expected), atol=tol["atol"], rtol=tol["rtol"]), (float(value), expected)


# -- round trip, flips, decode rules ----------------------------------------------------------------------------------

def _isolated(mask, n):
    """Foreground pixels with no foreground neighbour in the N-neighbourhood (independent of attnseg's ops)."""
    dims = mask.dim() - 2
    kernel = torch.zeros((3,) * dims)
    for o in conn.neighbour_offsets(dims, n):
        kernel[tuple(1 + v for v in o)] = 1
    conv = F.conv2d if dims == 2 else F.conv3d
    count = conv(mask.flatten(0, 1).unsqueeze(1), kernel[None, None], padding=1).view_as(mask)
    return (mask > 0) & (count == 0)


@pytest.mark.parametrize("shape,n", [((2, 1, 23, 17), 8), ((2, 3, 19, 21), 8), ((1, 1, 15, 13), 4),
                                     ((1, 1, 9, 11, 7), 26), ((1, 2, 7, 9, 11), 6)])
def test_encode_vote_round_trip_recovers_masks_except_isolated_pixels(shape, n):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, shape[1] + 1 if shape[1] == 1 else shape[1], (shape[0], *shape[2:]), generator=g)
    masks = (labels[:, None] == 1).float() if shape[1] == 1 else F.one_hot(labels, shape[1]).movedim(-1, 1).float()
    masks[(0, 0, *(s // 2 for s in shape[2:]))] = 1  # plus a pixel of every kind of neighbourhood at random
    recon = conn.vote(conn.encode(masks, n), n)[0]
    isolated = _isolated(masks, n)
    assert torch.equal(recon, masks * ~isolated)
    # a pure single pixel is the documented loss case
    one = torch.zeros(1, 1, *shape[2:])
    one[(0, 0, *(s // 2 for s in shape[2:]))] = 1
    assert conn.vote(conn.encode(one, n), n)[0].sum() == 0


@pytest.mark.parametrize("shape,n", [((2, 2, 7, 9), 8), ((1, 1, 5, 6, 7), 26), ((1, 2, 5, 6, 7), 6)])
def test_flip_maps_the_cube_of_a_flipped_mask(shape, n):
    m = (torch.rand(shape) > 0.4).float()
    for axis in range(2, m.dim()):
        assert torch.equal(conn.flip(conn.encode(m, n), axis, n), conn.encode(m.flip(axis), n))
    logits = torch.randn(shape[0], shape[1] * n, *shape[2:])
    for axis in range(2, m.dim()):  # votes are equivariant: decode(flip(logits)) = flip(decode(logits))
        back = conn.flip(conn.flip(logits, axis, n), axis, n)
        assert torch.equal(back, logits)
        assert torch.equal(conn.vote(conn.flip(logits, axis, n), n)[0], conn.vote(logits, n)[0].flip(axis))


@pytest.mark.parametrize("k,rule,shape,n", [(1, "soft", (2, 13, 11), 8), (1, "binarize", (2, 13, 11), 8),
                                            (3, "multiclass", (2, 13, 11), 8), (3, "soft", (1, 9, 7), 4),
                                            (1, "binarize", (1, 5, 6, 7), 26), (2, "multiclass", (1, 5, 6, 7), 6)])
def test_postprocess_is_the_threshold_or_argmax_of_class_probabilities(k, rule, shape, n):
    logits = torch.randn(shape[0], n * k, *shape[1:]) * 3
    probs = conn.class_probabilities(logits, k, rule, n)
    labels = conn.label_map(logits, k, rule, n)
    assert probs.shape == (shape[0], k, *shape[1:]) and labels.shape == shape and labels.dtype == torch.int64
    assert probs.min() >= 0 and probs.max() <= 1
    expected = (probs[:, 0] > 0.5).long() if k == 1 else probs.argmax(1)
    assert torch.equal(labels, expected)
    if k > 1:
        assert torch.allclose(probs.sum(1), torch.ones(()))


def test_decode_rule_errors():
    with pytest.raises(ValueError, match="needs num_classes >= 2"):
        conn.label_map(torch.randn(1, 8, 4, 4), 1, "multiclass")
    with pytest.raises(ValueError, match="binarize' is DconnNet's single-class rule"):
        conn.class_probabilities(torch.randn(1, 16, 4, 4), 2, "binarize")
    with pytest.raises(ValueError, match="decode must be one of"):
        conn.label_map(torch.randn(1, 8, 4, 4), 1, "vote")


# -- the wrapper head ----------------------------------------------------------------------------------------------

def _wrapped_model(num_classes, **head):
    return build_model({"backbone": {"name": "test_mambaout"}, "num_classes": num_classes,
                        "head": {"name": "connectivity", "inner": {"name": "unetr", "feature_size": 8}, **head}})


@pytest.mark.parametrize("num_classes,head", [(1, {}), (1, {"decode": "binarize"}), (3, {}),
                                              (2, {"decode": "soft", "neighbours": 4})])
def test_wrapper_over_a_small_backbone_at_odd_sizes(num_classes, head):
    model = _wrapped_model(num_classes, **head).eval()
    n = head.get("neighbours", 8)
    assert model.head.inner.num_classes == n * num_classes
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, n * num_classes, 37, 29)
    labels = model.postprocess(out)
    assert labels.shape == (2, 37, 29) and labels.dtype == torch.int64
    assert model.head.class_probabilities(out).shape == (2, num_classes, 37, 29)
    assert model.head.decode == head.get("decode", "soft" if num_classes == 1 else "multiclass")
    flipped = model.head.flip_output(out, -1)
    assert torch.equal(conn.label_map(flipped, num_classes, model.head.decode, n), labels.flip(-1))


def test_wrapper_in_3d_with_26_and_6_neighbours():
    for n in (26, 6):
        head = ConnectivityHead([8, 16], [2, 4], num_classes=2, spatial_dims=3, in_chans=1,
                                inner={"name": "unetr", "feature_size": 4}, neighbours=n)
        out = head([torch.randn(1, 8, 4, 4, 4), torch.randn(1, 16, 2, 2, 2)], torch.randn(1, 1, 8, 8, 8))
        assert out.shape == (1, 2 * n, 8, 8, 8) and head.postprocess(out).shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"neighbours must be one of \(26, 6\) in 3D"):
        ConnectivityHead([8], [2], num_classes=1, spatial_dims=3, neighbours=8)


def test_wrapper_errors_name_the_problem():
    args = ([16, 32], [4, 8], 1)
    with pytest.raises(ValueError, match="inner.num_classes: set by the connectivity head"):
        ConnectivityHead(*args, inner={"name": "unetr", "num_classes": 3})
    with pytest.raises(ValueError, match="inner: head 'untr' is not registered; did you mean 'unetr'"):
        ConnectivityHead(*args, inner={"name": "untr"})
    with pytest.raises(ValueError, match="already has a connectivity output"):
        ConnectivityHead(*args, inner={"name": "dconnnet"})
    with pytest.raises(ValueError, match="outputs 'msga', not plain logits"):
        ConnectivityHead([16, 32, 64, 128], [4, 8, 16, 32], 1, inner={"name": "msga", "channels": 8})
    with pytest.raises(ValueError, match="multiclass"):
        ConnectivityHead(*args, decode="multiclass")


# -- the DconnNet decoder -------------------------------------------------------------------------------------------

def test_dconnnet_training_dict_eval_logits_and_crop():
    model = small_dconnnet(num_classes=2)
    assert model.head.decode == "multiclass" and model.head.stem2 is None
    x = torch.randn(2, 3, 29, 23)
    out = model.train()(x)
    assert set(out) == {"logits", "aux"} and all(v.shape == (2, 16, 29, 23) for v in out.values())
    model.eval()
    with torch.no_grad():
        logits = model(x)
        padded = F.pad(x, (0, 9, 0, 3))  # the Segmentor pads to 32 x 32
        full, aux = model.head.forward_with_aux(model.backbone.forward_pyramid(padded), padded)
    assert logits.shape == (2, 16, 29, 23) and torch.allclose(logits, full[..., :29, :23])
    assert model.head.crop_output({"logits": full, "aux": aux}, (29, 23))["aux"].shape == (2, 16, 29, 23)
    assert model.postprocess(logits).shape == (2, 29, 23)


def test_dconnnet_head_over_a_stride4_backbone_synthesizes_stride2():
    model = build_model({"backbone": {"name": "test_mambaout"}, "num_classes": 1, "head": _SMALL_DCONNNET})
    head = model.head
    assert head.stem2 is not None and any(not isinstance(a, torch.nn.Identity) for a in head.adapters)
    out = model.eval()(torch.randn(1, 3, 33, 27))
    assert out.shape == (1, 8, 33, 27) and head.decode == "soft"


def test_dconnnet_head_errors():
    with pytest.raises(ValueError, match=r"strides \[2, 4, 8, 16, 32\] or \[4, 8, 16, 32\]"):
        DconnNetHead([64, 128, 256], [8, 16, 32], num_classes=1)
    with pytest.raises(ValueError, match="not divisible by it"):
        DconnNetHead([64, 64, 128, 256, 500], [2, 4, 8, 16, 32], num_classes=1, widths=(64, 64, 128, 256, 500))


# -- loss ----------------------------------------------------------------------------------------------------------

def test_loss_on_training_dict_adds_aux_weight_and_accepts_eval_logits():
    g = torch.Generator().manual_seed(0)
    logits, aux = torch.randn(2, 8, 12, 10, generator=g), torch.randn(2, 8, 12, 10, generator=g)
    mask = (torch.rand(2, 12, 10, generator=g) > 0.5).long()
    loss = ConnectivityLoss(1)
    assert torch.allclose(loss({"logits": logits, "aux": aux}, mask), loss(logits, mask) + 0.3 * loss(aux, mask))
    assert torch.allclose(ConnectivityLoss(1, aux_weight=0)({"logits": logits, "aux": aux}, mask), loss(logits, mask))
    vol = torch.randn(1, 26 * 3, 5, 6, 7)  # 3D, 26 neighbours, 3 classes
    assert torch.isfinite(ConnectivityLoss(3)(vol, torch.randint(0, 3, (1, 5, 6, 7))))
    empty = ConnectivityLoss(1)(logits, torch.zeros(2, 12, 10, dtype=torch.long))  # no edges: L_edge = 0, not NaN
    assert torch.isfinite(empty)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(loss(logits.bfloat16(), mask))


def test_sdl_weights_each_images_dice_by_the_log_inverse_density_of_its_mask_size():
    # class 1 sizes 10, 20, 30 (zeros left out): 2 bins of width (30 + 50) / 2 = 40 -> densities [1, 0]
    loss_sdl = ConnectivityLoss(2, sdl_pixel_counts=[[10, 20, 0, 30]], sdl_bins=2)
    width, density = loss_sdl.sdl[0]
    assert float(width) == 40 and density.tolist() == [1.0, 0.0]
    target = torch.zeros(2, 10, 10, dtype=torch.long)
    target[0, 2:5, 2:7] = 1  # 15 pixels: bin 0, weight log(1 / 1.0001)
    target[1, 1:8, 1:9] = 1  # 56 pixels: bin 1, weight log(1e4)
    logits = torch.randn(2, 16, 10, 10)
    pred = torch.softmax(conn.vote(logits)[0], dim=1)[:, 1]
    truth = target.float()
    dice = 1 - (2 * (pred * truth).sum((1, 2)) + 1e-4) / (pred.sum((1, 2)) + truth.sum((1, 2)) + 1e-4)
    weight = torch.log(1 / (torch.tensor([1.0, 0.0]) + 1e-4))
    expected = ConnectivityLoss(2)(logits, target) + ((weight - 1) * dice).mean()
    assert torch.allclose(loss_sdl(logits, target), expected, atol=1e-5)
    with pytest.raises(ValueError, match="one list of counts per foreground class"):
        ConnectivityLoss(3, sdl_pixel_counts=[[1, 2]])


def test_loss_errors():
    with pytest.raises(ValueError, match="does not support ignore_index"):
        ConnectivityLoss(1, ignore_index=255)
    with pytest.raises(ValueError, match="unknown connectivity loss variant 'dconn'"):
        ConnectivityLoss(1, variant="dconn")
    with pytest.raises(ValueError, match="single-class loss"):
        ConnectivityLoss(3, variant="bicon")
    with pytest.raises(ValueError, match=r"expected logits \[B, N \* 3, \*S\]"):
        ConnectivityLoss(3)(torch.randn(1, 8, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # PAM/CAM gammas start at 0: make every path live


@pytest.mark.parametrize("kind", ["wrapper", "dconnnet"])
def test_gradients_reach_every_parameter(kind):
    if kind == "wrapper":
        model, k = _wrapped_model(3), 3
    else:  # DconnNet's decoder at small widths over a stride-4 backbone: adapters and stem2 included
        model, k = build_model({"backbone": {"name": "test_mambaout"}, "num_classes": 1, "head": _SMALL_DCONNNET}), 1
    _perturb(model)
    model.train()
    x = torch.randn(1, 3, 40, 36)  # padded to 64 x 64: the stride-32 level is 2 x 2 (at 1 x 1, norms cut gradients)
    target = torch.randint(0, max(k, 2), (1, 40, 36))
    ConnectivityLoss(k)(model(x), target).backward()
    # A PAM key bias adds q_i . b to every key of query i, which the softmax cancels: its gradient is 0 in exact
    # arithmetic (in the official module too), so it only has to be reached.
    invariant = [n for n, _ in model.named_parameters() if n.endswith("sa.key_conv.bias")]
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or (n not in invariant and not p.grad.abs().sum() > 0)]
    assert not dead, dead


def test_config_pairs_the_heads_with_the_connectivity_loss():
    from attnseg.errors import ConfigError

    base = {"model": {"backbone": {"name": "test_mambaout"}, "num_classes": 3,
                      "head": {"name": "connectivity", "inner": {"name": "unetr", "feature_size": 8}}},
            "data": {"dataset": {"name": "synthetic2d", "num_classes": 3}}}
    assert validate_config(base).loss.name == "connectivity"  # the head's default_loss
    for head in ("connectivity", "dconnnet"):
        bad = {**base, "model": {**base["model"], "head": {"name": head}}, "loss": {"name": "dice_ce"}}
        with pytest.raises(ConfigError, match=f"head .{head}. gives connectivity outputs; use loss.name: connectivity"):
            validate_config(bad)
    with pytest.raises(ConfigError, match="loss.variant"):
        validate_config({**base, "loss": {"name": "connectivity", "variant": 3}})


# -- training through attnseg's runner ------------------------------------------------------------------------------

@pytest.mark.slow  # 10-20 s each on 2 busy cores (Lightning start-up)
@pytest.mark.parametrize("model", [
    {"backbone": {"name": "test_mambaout"}, "head": {"name": "connectivity", "inner": {"name": "unetr",
                                                                                        "feature_size": 8}}},
    {"backbone": {"name": "test_mambaout"}, "head": _SMALL_DCONNNET},
])
def test_training_smoke_on_synthetic2d(tmp_path, model):
    from attnseg.engine.runner import train

    cfg = validate_config({
        "work_dir": str(tmp_path),
        "model": {**model, "num_classes": 3},
        "data": {"dataset": {"name": "synthetic2d", "num_classes": 3, "image_size": [32, 32], "num_train": 4,
                             "num_val": 1, "num_test": 1}, "batch_size": 2, "augment": None},
        "loss": {"name": "connectivity"},
        "optimizer": {"lr": 0.003},
        "trainer": {"max_epochs": 1, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu", "devices": 1},
        "evaluation": {"hd95": False, "surface_dice": False},
    })
    result = train(cfg)
    assert result["global_step"] == 2  # 4 images, batch 2 (BatchNorm at the 1 x 1 stride-32 level), 1 epoch
    assert 0.0 <= result["metrics"]["val/mDice"] <= 1.0
    assert torch.isfinite(torch.tensor(float(result["metrics"]["val/loss"])))


def test_backbone_registry_has_the_published_encoder():
    bb = BACKBONES.get("resnet34")(num_classes=0, out_indices=(0, 1, 2, 3, 4))
    assert [f["num_chs"] for f in bb.feature_info] == list(head_module.DCONNNET_WIDTHS)
    assert isinstance(small_dconnnet(), Segmentor)
