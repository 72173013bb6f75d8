"""Official HybridGNet 2-IGSC (ngaggion/HybridGNet @ 7c39944, hybridDoubleSkip.Hybrid) -> attnseg."""

import re

import pytest
import torch

from attnseg.convert import from_official
from attnseg.convert.hybridgnet import convert_state_dict, is_official
from attnseg.errors import CheckpointError
from attnseg.heads.hybridgnet import roi_lookup
from attnseg.models.hybridgnet import hybridgnet_2igsc
from attnseg.registry import MODELS
from tests.conftest import load_fixture


def _tol(fx):
    return {"atol": fx["tolerance"]["atol"], "rtol": fx["tolerance"]["rtol"]}


def _feature(fx, prefix):
    return next(v for k, v in fx["features"].items() if k.startswith(prefix))


def test_parity_with_the_official_model_fixture():
    fx = load_fixture("hybridgnet_doubleskip_128.pt")
    model = from_official("hybridgnet", fx["constructor"], fx["state_dict"])
    assert not model.training and sum(p.numel() for p in model.parameters()) == fx["extras"]["num_parameters"]
    with torch.no_grad():
        out, pos1, pos2 = model(fx["input"])  # the official forward's tuple
    ref = fx["output"]
    assert torch.equal(ref["main"], ref["landmarks"])
    for mine, key in ((out, "landmarks"), (pos1, "pos1"), (pos2, "pos2")):
        assert mine.shape == ref[key].shape
        assert torch.allclose(mine, ref[key], **_tol(fx)), key
    # The lookups sample 3 or 4 points per axis depending on float rounding of the boxes (extras.
    # roi_align_sample_counts): the model reproduces the official positions to the bit here (ChebConv rounds as PyG,
    # the node norm is instance_norm), so it gets the same counts; a fixed 3x3 grid is ~1e-2 off.
    assert (ref["landmarks"] - fx["extras"]["output_with_sampling_ratio_3"]["landmarks"]).abs().max() > 100 * \
        fx["tolerance"]["atol"]


def test_encoder_latent_and_lookups_on_the_official_positions():
    fx = load_fixture("hybridgnet_doubleskip_128.pt")
    model = from_official("hybridgnet", fx["constructor"], fx["state_dict"])
    with torch.no_grad():
        feats = model.backbone.forward_pyramid(fx["input"])
        mu, _ = model.head.encode(feats[-1])
        skip1 = roi_lookup(fx["output"]["pos1"], feats[-1], (3, 3), "official")
        skip2 = roi_lookup(fx["output"]["pos2"], feats[-2], (3, 3), "official")
    assert torch.allclose(mu, fx["features"]["encoder.mu"], **_tol(fx))
    assert torch.allclose(skip1.reshape(-1), _feature(fx, "skip1").reshape(-1), **_tol(fx))
    assert torch.allclose(skip2.reshape(-1), _feature(fx, "skip2").reshape(-1), **_tol(fx))


def test_skipblock_naming_and_pyg1_weight_layout_convert_to_the_same_model():
    fx = load_fixture("hybridgnet_doubleskip_128.pt")
    official = fx["state_dict"]
    renamed = {re.sub(r"^graphConv_pre([12])\.", r"SC_\1.graphConv_pre.", k): v for k, v in official.items()}
    assert any(k.startswith("SC_1.graphConv_pre.") for k in renamed)
    pyg1 = {}
    for k, v in official.items():  # PyG 1.x: one weight [K, in, out] per ChebConv
        m = re.fullmatch(r"(.+)\.lins\.(\d+)\.weight", k)
        if m is None:
            pyg1[k] = v
        elif m.group(2) == "0":
            n = sum(1 for kk in official if kk.startswith(f"{m.group(1)}.lins."))
            pyg1[f"{m.group(1)}.weight"] = torch.stack([official[f"{m.group(1)}.lins.{i}.weight"].t()
                                                        for i in range(n)])
    base = convert_state_dict(official)
    for variant in (renamed, pyg1):
        assert is_official(variant)
        converted = convert_state_dict(variant)
        assert converted.keys() == base.keys()
        assert all(torch.equal(converted[k], base[k]) for k in base)
    model = from_official("hybridgnet", fx["constructor"], pyg1)
    with torch.no_grad():
        out, _, _ = model(fx["input"])
    assert torch.allclose(out, fx["output"]["landmarks"], **_tol(fx))


def test_converter_errors_name_the_keys():
    fx = load_fixture("hybridgnet_doubleskip_128.pt")
    with pytest.raises(CheckpointError, match="1 key.* not HybridGNet 2-IGSC keys: graphConv_skip.weight"):
        convert_state_dict({**fx["state_dict"], "graphConv_skip.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"must be \[K, in, out\]"):
        convert_state_dict({"graphConv_up6.weight": torch.zeros(16, 16)})
    sd = dict(fx["state_dict"])
    sd.pop("dec_lin.bias")
    with pytest.raises(CheckpointError, match="missing.*head.dec_lin.bias"):
        from_official("hybridgnet", fx["constructor"], sd)
    bad = {**fx["constructor"], "config": {**fx["constructor"]["config"], "n_nodes": [100] * 6}}
    with pytest.raises(ValueError, match="n_nodes 100 is not a chest X-ray template"):
        from_official("hybridgnet", bad, fx["state_dict"])
    assert not is_official(MODELS.get("test_hybridgnet_2igsc")().state_dict())


def test_published_model_size_and_key_layout():
    model = hybridgnet_2igsc()
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == 17.51  # reference heads.md 5.3: 17.51 M, 16.78 M of them in fc_mu/fc_logvar
    assert round((model.head.fc_mu.weight.numel() + model.head.fc_logvar.weight.numel()) / 1e6, 2) == 16.78
    fx = load_fixture("hybridgnet_doubleskip_128.pt")
    small = MODELS.get("test_hybridgnet_2igsc")()
    converted = convert_state_dict(fx["state_dict"])
    assert set(converted) == set(small.state_dict())
    # BatchNorm without running statistics: no buffers in the state_dict, batch statistics in eval too
    assert not any("running" in k or "num_batches" in k for k in small.state_dict())


def test_official_file_loads_into_the_config_built_model(tmp_path):
    from attnseg import load_pretrained
    from attnseg.config import load_config
    from attnseg.models.builder import build_model
    from tests.conftest import REPO_ROOT

    fx = load_fixture("hybridgnet_doubleskip_128.pt")
    path = tmp_path / "best.pt"
    torch.save({k: v.clone() for k, v in fx["state_dict"].items()}, path)  # a plain official state_dict file
    model = build_model(load_config(REPO_ROOT / "configs/hybridgnet/hybridgnet_2igsc_synthetic_landmarks.yaml"))
    report = load_pretrained(model, path)
    assert report.converted == "hybridgnet" and not report.missing and not report.unexpected
    with torch.no_grad():
        out = model.eval()(fx["input"])  # square input: per-axis lookup scaling equals the official one
    assert torch.allclose(out["landmarks"], fx["output"]["landmarks"], **_tol(fx))
