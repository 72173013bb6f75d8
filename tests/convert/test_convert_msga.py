"""Official multi-scale self-guided attention (sinAshish/Multi-Scale-Attention @ 96d76f2, ``DAF_stack``) -> attnseg."""

import re

import pytest
import torch

from attnseg import build_model, load_config, load_pretrained
from attnseg.convert import from_official
from attnseg.convert.msga import DROPPED_KEYS, convert_block, convert_state_dict, head_key, is_official
from attnseg.errors import CheckpointError
from attnseg.models.msga import MSGA, msga_resnext101
from tests.conftest import REPO_ROOT, load_fixture


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("msga_daf_stack.pt")


@pytest.fixture(scope="module")
def model(fixture):
    return from_official("msga", fixture["constructor"], fixture["state_dict"])


def test_eval_output_equals_the_official_model(fixture, model):
    assert isinstance(model, MSGA) and not model.training and model.num_classes == 5
    with torch.no_grad():
        out = model(fixture["input"])
    tol = fixture["tolerance"]
    assert out.shape == fixture["output"].shape == (1, 5, 128, 128)
    assert torch.allclose(out, fixture["output"], atol=tol["atol"], rtol=tol["rtol"])


def _check_checksum(tensor, ref, atol):
    """The fixture stores module inputs/reconstructions as checksums. Train-mode BatchNorm over tiny maps makes them
    depend on the thread count (1 vs 2 threads: sums 2e-3, abs_sum/std 2e-4 relative, values 4e-2), hence
    aggregate checks at 1e-2 relative (sums: of abs_sum) and the fixture's atol on values."""
    flat = tensor.reshape(-1).double()
    assert list(tensor.shape) == list(ref["shape"])
    assert abs(flat.sum().item() - ref["sum"]) <= 1e-2 * ref["abs_sum"]
    for name, value in (("abs_sum", flat.abs().sum()), ("std", flat.std())):
        assert value.item() == pytest.approx(float(ref[name]), rel=1e-2), name
    for name, value in (("min", flat.min()), ("max", flat.max())):
        assert abs(value.item() - float(ref[name])) <= atol, name
    assert torch.allclose(flat[ref["sample_flat_indices"]], ref["sample_values"].double(), atol=atol)


def test_training_outputs_equal_the_official_32_tuple(fixture, model):
    train = fixture["train"]
    tensors, sums, tol = train["tensors"], train["checksums"], train["tolerance"]
    close = {"atol": tol["atol"], "rtol": tol["rtol"]}
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # train mode updates BatchNorm statistics
    model.train()
    try:
        with torch.no_grad():
            out = model(train["input"])
    finally:
        model.eval().load_state_dict(saved)
    assert set(out) == {"logits", "predictions", "semantic_pairs", "reconstruction_pairs"}
    for k in range(4):  # predictions follow the scale index: level k is the official down{k+1}
        assert torch.allclose(out["predictions"][k], tensors[f"predict{k + 1}"], **close)
        assert torch.allclose(out["predictions"][4 + k], tensors[f"predict{k + 1}_2"], **close)
    for k, (v1, v2) in enumerate(out["semantic_pairs"]):  # semVector_{l}_{j}: j = 1 is down4 (reversed)
        j = 4 - k
        assert torch.allclose(v1.reshape(-1), tensors[f"semVector_1_{j}"], **close)
        assert torch.allclose(v2.reshape(-1), tensors[f"semVector_2_{j}"], **close)
    for k in range(4):
        for level in (1, 2):
            inp, rec = out["reconstruction_pairs"][(level - 1) * 4 + k]
            name = f"cat(down{k + 1},fuse1)" if level == 1 else f"cat(down{k + 1},attention1_{k + 1}*fuse1)"
            _check_checksum(inp, sums[name], tol["atol"])
            _check_checksum(rec, sums[f"semanticModule_{level}_{4 - k}"], tol["atol"])
    # the fixture's atol (5) covers fp32 vs fp64 of the official code (0.2); observed here: 0 with the default
    # threads, 0.1 with one thread, so ask for 10x less than the fixture
    worst = max((out["predictions"][k] - tensors[n]).abs().max().item()
                for k, n in enumerate([f"predict{i}" for i in range(1, 5)] + [f"predict{i}_2" for i in range(1, 5)]))
    assert worst < 0.1 * tol["atol"]


def test_every_key_is_placed_or_dropped_by_name(fixture, model):
    sd = fixture["state_dict"]
    dropped = [k for k in sd if any(re.fullmatch(p, k) for p in DROPPED_KEYS)]
    assert {k.split(".")[0] for k in dropped} == {*(f"attention{i}" for i in range(1, 5)),
                                                 *(f"refine{i}" for i in range(1, 5)),
                                                 *(f"conv6_{i}" for i in range(1, 5)), *(f"conv7_{i}" for i in range(1, 5))}
    unused = sum(sd[k].numel() for k in dropped if sd[k].is_floating_point() and not k.endswith(
        ("running_mean", "running_var")))
    assert unused == pytest.approx(0.96e6, rel=0.01)  # reference/heads.md §3.2
    converted = convert_state_dict(sd)
    assert len(converted) == len(sd) - len(dropped)
    assert set(converted) == set(model.state_dict())
    assert is_official(sd) and not is_official(model.state_dict())


def test_reversed_indices_and_shared_modules():
    assert head_key("conv_sem_1_1.weight") == "guide1.conv_sem.3.weight"  # j = 1 serves down4
    assert head_key("conv_sem_2_4.bias") == "guide2.conv_sem.0.bias"
    assert head_key("conv8_1.weight") == "guide1.out.3.weight"
    assert head_key("conv8_14.weight") == "guide2.out.0.weight"
    assert head_key("pam_attention_1_4.attn.3.gamma") == "guide1.pam.3.attention.gamma"  # scale index
    assert head_key("predict4_2.bias") == "predict.3.bias" and head_key("predict1.bias") == "side_predict.0.bias"
    assert head_key("semanticModule_2_1.dec1.decode.6.weight") == "guide2.semantic.dec1.6.weight"
    assert head_key("semanticModule_1_2.enc1.encode.0.weight") is None  # only one shared module per level


def test_unplaced_keys_are_listed():
    with pytest.raises(CheckpointError, match=r"1 key\(s\) have no place.*fuse2\.fuse_attn\.0\.weight"):
        convert_state_dict({"fuse2.fuse_attn.0.weight": torch.zeros(1), "predict1.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not MultiConv keys: fuse_attn.9.weight"):
        convert_block("MultiConv", {"fuse_attn.9.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown official MSGA block"):
        convert_block("PAM", {})
    with pytest.raises(ValueError, match="takes no arguments"):
        from_official("msga", {"name": "DAF_stack", "kwargs": {"num_classes": 4}}, {})


def test_official_file_loads_into_the_published_and_the_config_built_model(fixture, model, tmp_path):
    torch.save(fixture["state_dict"], tmp_path / "Best_MS-Dual-Guided.pth")
    published = msga_resnext101()
    report = load_pretrained(published, tmp_path / "Best_MS-Dual-Guided.pth")
    assert report.converted == "msga" and not report.missing and not report.unexpected
    cfg = load_config(REPO_ROOT / "configs/msga/msga_resnext101_chaos_folder2d.yaml")
    built = build_model(cfg)
    assert set(built.state_dict()) == set(published.state_dict())
    # a config-built Segmentor has no family: the head's converter recognises the official file
    report = load_pretrained(built, tmp_path / "Best_MS-Dual-Guided.pth")
    assert report.converted == "msga" and not report.missing and not report.unexpected
    with torch.no_grad():
        assert torch.equal(built.eval()(fixture["input"]), published.eval()(fixture["input"]))
        assert torch.equal(published(fixture["input"]), model(fixture["input"]))
