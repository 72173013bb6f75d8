import pytest
import torch

import attnseg.convert as convert
from attnseg.convert import sparsifiner as conv
from attnseg.errors import CheckpointError
from tests.conftest import load_fixture

FIXTURE = "sparsifiner_tiny_cfg.pt"


def test_family_is_discovered():
    assert "sparsifiner" in convert.families()
    assert convert.get_converter("sparsifiner") is conv


@pytest.mark.parametrize("impl", ["auto", "csr", "gather", "masked"])
def test_parity_with_the_official_model(impl):
    fx = load_fixture(FIXTURE)
    model = convert.from_official("sparsifiner", fx["constructor"], fx["state_dict"])
    model.backbone.attn_impl = impl
    tol = fx["tolerance"]
    with torch.no_grad():
        out = model(fx["input"])
        logits = model.backbone(fx["input"])  # plain forward: a sparse path unless impl is masked
    assert torch.allclose(out["x"], fx["output"], **tol) and torch.allclose(logits, fx["output"], **tol)
    assert torch.allclose(out["features"], fx["features"], **tol)
    for key in ("approx_attn", "basis_coef", "masked_attn"):
        for ours, ref in zip(out[f"{key}_list"], fx[key]):
            assert torch.allclose(ours, ref, **tol), key
    for ours, ref in zip(out["attn_mask_list"], fx["attn_mask"]):
        assert torch.equal(ours, ref)  # exact, as the fixture requires
    assert out["token_mask_list"] == fx["token_mask"]
    for key, value in fx["sparsity"].items():
        assert abs(float(out[key]) - value) < 1e-6


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd}, lambda sd: {"state_dict_ema": sd}])
def test_published_layouts_give_the_same_keys(wrap):
    sd = load_fixture(FIXTURE)["state_dict"]
    out = conv.convert_state_dict(wrap(sd))
    assert list(out) == list(sd) and all(out[k] is sd[k] for k in sd)
    assert not conv.is_official(sd)


def test_old_style_patch_embedding_is_reshaped():
    sd = dict(load_fixture(FIXTURE)["state_dict"])
    conv_w = sd["patch_embed.proj.weight"]
    sd["patch_embed.proj.weight"] = conv_w.reshape(conv_w.shape[0], -1)
    assert conv.is_official(sd)
    assert torch.equal(conv.convert_state_dict(sd)["patch_embed.proj.weight"], conv_w)


def test_unknown_and_distilled_keys_are_refused():
    sd = load_fixture(FIXTURE)["state_dict"]
    with pytest.raises(CheckpointError, match=r"distilled DeiT.*dist_token"):
        conv.convert_state_dict({**sd, "dist_token": torch.zeros(1, 1, 64), "head_dist.weight": torch.zeros(2, 64)})
    with pytest.raises(CheckpointError, match="not a Sparsifiner / DeiT state_dict"):
        conv.convert_state_dict({"stem.conv1.weight": torch.zeros(1)})


def test_unsupported_official_arguments_are_refused():
    fx = load_fixture(FIXTURE)
    kwargs = fx["constructor"]["kwargs"]
    with pytest.raises(ValueError, match="token pruning"):
        conv.from_official({**fx["constructor"], "kwargs": {**kwargs, "token_pruning_loc_indicator": [True] * 3}},
                           fx["state_dict"])
    with pytest.raises(ValueError, match="not supported"):
        conv.from_official({**fx["constructor"], "kwargs": {**kwargs, "hybrid_backbone": "resnet"}}, fx["state_dict"])
    with pytest.raises(ValueError, match="unknown official Sparsifiner constructor 'Sparsifine'; did you mean"):
        conv.from_official({**fx["constructor"], "name": "Sparsifine"}, fx["state_dict"])


def test_headless_official_model_keeps_its_final_norm():
    fx = load_fixture(FIXTURE)
    sd = {k: v for k, v in fx["state_dict"].items() if not k.startswith("head.")}
    ctor = {**fx["constructor"], "kwargs": {**fx["constructor"]["kwargs"], "num_classes": 0}}
    model = conv.from_official(ctor, sd)
    with torch.no_grad():
        out = model(fx["input"])
    assert out["x"].shape == (2, 64)
    torch.testing.assert_close(out["x"] @ fx["state_dict"]["head.weight"].T + fx["state_dict"]["head.bias"],
                               fx["output"], **fx["tolerance"])
