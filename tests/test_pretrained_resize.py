"""load_pretrained across token grids and patch sizes: the backbones' ``adapt_pretrained`` hooks (Sparsifiner, KArAt).

The strongest check: a model built at size X and loaded from weights of a size-Y model computes, on X inputs, what the
size-Y model computes on them (both resample with the same rule, one at load time, one at run time).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from attnseg.backbones.karat import test_karat as karat_factory
from attnseg.backbones.sparsifiner import resample_token_table
from attnseg.backbones.sparsifiner import test_sparsifiner as sparsifiner_factory
from attnseg.checkpoint import load_pretrained
from attnseg.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def _save(tmp_path, sd: dict[str, torch.Tensor], name: str = "w.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (zero-initialised tables would make the comparisons weak)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# -- Sparsifiner ----------------------------------------------------------------------------------------------------

def test_sparsifiner_loaded_at_other_size_equals_runtime_resampling(tmp_path):
    torch.manual_seed(0)
    src = sparsifiner_factory(num_classes=5).eval()  # 64 px: 4x4 patches, N = 17, K = 17 // 4 = 4
    _randomize(src)
    path = _save(tmp_path, src.state_dict())
    # 96 px: 6x6 patches, N = 37; reduce_n_factor 9 keeps K = 37 // 9 = 4
    dst = sparsifiner_factory(num_classes=5, img_size=96, reduce_n_factor=9).eval()
    report = load_pretrained(dst, path)
    adapted = {a.split(":")[0] for a in report.adapted}
    assert adapted == {"pos_embed"} | {f"blocks.{i}.attn.mask_predictor.{t}" for i in range(2)
                                       for t in ("proj_n", "proj_back_n")}
    assert "pos_embed: [1, 17, 32] -> [1, 37, 32] (by Sparsifiner)" in report.adapted
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected, got = src.forward_official(x), dst.forward_official(x)
    torch.testing.assert_close(got["x"], expected["x"], rtol=0, atol=1e-6)
    for a, b in zip(got["attn_mask_list"], expected["attn_mask_list"]):
        assert torch.equal(a, b)
    for a, b in zip(got["approx_attn_list"], expected["approx_attn_list"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the tables themselves: proj_n with the token-sum scale (17 - 1 patches -> 37 - 1), proj_back_n without
    pred_src, pred_dst = src.blocks[1].attn.mask_predictor, dst.blocks[1].attn.mask_predictor
    torch.testing.assert_close(pred_dst.proj_n, resample_token_table(pred_src.proj_n, (4, 4), (6, 6), scale_sum=True))
    torch.testing.assert_close(pred_dst.proj_back_n, resample_token_table(pred_src.proj_back_n, (4, 4), (6, 6)))
    ratio = pred_dst.proj_n[1:].sum() / resample_token_table(pred_src.proj_n, (4, 4), (6, 6))[1:].sum()
    assert ratio.item() == pytest.approx(16 / 36, rel=1e-5)


def test_sparsifiner_deit_weights_into_384_model(tmp_path):
    """A DeiT-like state dict (no predictor) of a 224 model into a 384 model: pos_embed as timm resamples it."""
    from attnseg.backbones.sparsifiner import sparsifiner_deit_tiny

    src = sparsifiner_deit_tiny(num_classes=10, depth=2, pyramid=False)
    _randomize(src)
    deit = {k: v for k, v in src.state_dict().items() if ".mask_predictor." not in k}
    path = _save(tmp_path, deit)
    dst = sparsifiner_deit_tiny(num_classes=10, depth=2, img_size=384, pyramid=False)
    report = load_pretrained(dst, path)
    assert report.adapted == ["pos_embed: [1, 197, 192] -> [1, 577, 192] (by Sparsifiner)"]
    assert sorted(report.initialized) == sorted(k for k in dst.state_dict() if ".mask_predictor." in k)
    torch.testing.assert_close(dst.pos_embed.detach(), resample_abs_pos_embed(src.pos_embed.detach(), [24, 24]),
                               rtol=0, atol=0)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # cls row kept
    assert torch.equal(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)


def test_sparsifiner_deit_224_into_28px_patch4_one_channel(tmp_path):
    """DeiT (patch 16, RGB, 224) into a Fashion-MNIST-sized model (28 px, patch 4, 1 channel): pos_embed 14x14 ->
    7x7, the patch kernel resized (FlexiViT) and its input channels summed."""
    from attnseg.backbones.sparsifiner import sparsifiner_deit_tiny

    src = sparsifiner_deit_tiny(num_classes=0, depth=1, pyramid=False)
    _randomize(src)
    path = _save(tmp_path, {k: v for k, v in src.state_dict().items() if ".mask_predictor." not in k})
    dst = sparsifiner_deit_tiny(num_classes=0, depth=1, pyramid=False, img_size=28, patch_size=4, in_chans=1)
    report = load_pretrained(dst, path)
    assert sorted(a.split(":")[0] for a in report.adapted) == ["patch_embed.proj.weight", "pos_embed"]
    w = src.patch_embed.proj.weight.detach()
    torch.testing.assert_close(dst.patch_embed.proj.weight.detach(), resample_patch_embed(w, [4, 4]).sum(1, True))
    assert dst.pos_embed.shape == (1, 50, 192)
    assert torch.equal(dst.patch_embed.proj.bias, src.patch_embed.proj.bias)


def test_patch_embed_resize_keeps_tokens_of_resized_patches(tmp_path):
    """FlexiViT's property, on values: upsampling the patch (4 -> 8), a patch resized bicubically to the new size
    gives the token the original patch gave."""
    src = sparsifiner_factory(num_classes=0, patch_size=4, pyramid=False)
    _randomize(src)
    path = _save(tmp_path, src.state_dict())
    # 128 px at patch 8 is the same 16x16 grid as 64 px at patch 4: only the kernel differs
    dst = sparsifiner_factory(num_classes=0, patch_size=8, img_size=128, pyramid=False)
    report = load_pretrained(dst, path)
    assert [a.split(":")[0] for a in report.adapted] == ["patch_embed.proj.weight"]
    patch = torch.randn(5, 3, 4, 4)
    big = torch.nn.functional.interpolate(patch, size=(8, 8), mode="bicubic", antialias=True)
    with torch.no_grad():
        before = src.patch_embed.proj(patch).flatten(1)
        after = dst.patch_embed.proj(big).flatten(1)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_token_table_is_not_mistaken_for_a_classifier(tmp_path):
    """A predictor table [N, K] of a model with num_classes == N looks like a class layer; the hook comes first."""
    src = sparsifiner_factory(num_classes=37)
    path = _save(tmp_path, src.state_dict())
    dst = sparsifiner_factory(num_classes=37, img_size=96, reduce_n_factor=9)  # N = 37 tokens, K = 4
    report = load_pretrained(dst, path)
    assert "blocks.0.attn.mask_predictor.proj_n: [17, 4] -> [37, 4] (by Sparsifiner)" in report.adapted
    assert report.dropped == []
    torch.testing.assert_close(dst.head.weight, src.head.weight, rtol=0, atol=0)


def test_sparsifiner_other_rank_is_refused_with_the_factor(tmp_path):
    src = sparsifiner_factory(num_classes=5)  # K = 4
    path = _save(tmp_path, src.state_dict())
    dst = sparsifiner_factory(num_classes=5, img_size=96)  # N = 37, K = 37 // 4 = 9
    with pytest.raises(CheckpointError) as err:
        load_pretrained(dst, path)
    msg = str(err.value)
    assert "blocks.0.attn.mask_predictor.proj_n: [17, 4] vs [37, 9]" in msg
    assert "K=4 differs from this model's K=9" in msg and "reduce_n_factor in 8..9 keeps K=4" in msg  # 37 // 8 = 37 // 9 = 4


def test_sparsifiner_shared_tables_are_refused(tmp_path):
    src = sparsifiner_factory(num_classes=5, share_inout_proj=True)
    path = _save(tmp_path, src.state_dict())
    dst = sparsifiner_factory(num_classes=5, share_inout_proj=True, img_size=96, reduce_n_factor=9)
    with pytest.raises(CheckpointError, match="share_inout_proj"):
        load_pretrained(dst, path)


def test_unadaptable_mismatch_still_raises(tmp_path):
    """Another width is no resampling matter: the generic mismatch error, nothing loaded."""
    src = sparsifiner_factory(num_classes=5, embed_dim=48, num_heads=2)
    path = _save(tmp_path, src.state_dict())
    dst = sparsifiner_factory(num_classes=5, img_size=96, reduce_n_factor=9)
    before = dst.pos_embed.detach().clone()
    with pytest.raises(CheckpointError, match=r"pos_embed: \[1, 17, 48\] vs \[1, 37, 32\]"):
        load_pretrained(dst, path)
    assert torch.equal(dst.pos_embed, before)


def test_non_square_pos_embed_is_refused_with_reason(tmp_path):
    src = sparsifiner_factory(num_classes=5)
    sd = src.state_dict()
    sd["pos_embed"] = torch.randn(1, 1 + 3 * 5, 32)
    path = _save(tmp_path, sd)
    with pytest.raises(CheckpointError, match="16 tokens, not 1 \\+ a square grid"):
        load_pretrained(sparsifiner_factory(num_classes=5), path)


def test_backbone_checkpoint_into_classifier(tmp_path):
    """The hook is found under the ``backbone.`` prefix of a wrapped model."""
    from attnseg.models import Classifier

    src = sparsifiner_factory(num_classes=0)
    _randomize(src)
    path = _save(tmp_path, src.state_dict())
    model = Classifier(sparsifiner_factory(num_classes=0, img_size=96, reduce_n_factor=9), num_classes=3)
    report = load_pretrained(model, path, strict=False)
    assert "backbone.pos_embed: [1, 17, 32] -> [1, 37, 32] (by Sparsifiner)" in report.adapted
    torch.testing.assert_close(model.backbone.pos_embed.detach(),
                               resample_abs_pos_embed(src.pos_embed.detach(), [6, 6], [4, 4]))


# -- KArAt ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["blockwise", "universal"])
def test_karat_loaded_at_other_size_equals_runtime_resizing(tmp_path, mode):
    src = karat_factory(num_classes=4, mode=mode).eval()  # 64 px: 4x4 patches, N = 17
    _randomize(src)
    path = _save(tmp_path, src.state_dict())
    dst = karat_factory(num_classes=4, mode=mode, img_size=96).eval()  # 6x6 patches, N = 37
    report = load_pretrained(dst, path)
    ops = ["shared_operator"] if mode == "universal" else [f"blocks.{i}.attn.operator" for i in range(2)]
    assert sorted(a.split(":")[0] for a in report.adapted) == sorted(
        ["pos_embed"] + [f"{o}.{t}" for o in ops for t in ("coefficients", "weight")])
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=1e-5)
        feats_dst, feats_src = dst.forward_pyramid(x), src.forward_pyramid(x)
    for a, b in zip(feats_dst, feats_src):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_karat_other_rank_still_raises(tmp_path):
    path = _save(tmp_path, karat_factory(num_classes=4).state_dict())  # rank 4
    with pytest.raises(CheckpointError, match=r"operator\.coefficients: \[2, 17, 4, 4\] vs \[2, 37, 4, 6\]"):
        load_pretrained(karat_factory(num_classes=4, img_size=96, rank=6), path)


def test_deit_weights_into_the_sparsifiner_unetr_config(tmp_path):
    """The shipped Segmentor config (DeiT-T at 96 px: 6x6 patches) takes 224-px DeiT-T weights through
    ``model.backbone.pretrained``: pos_embed resampled under the ``backbone.`` prefix, the predictor and decoder new."""
    import attnseg
    from attnseg.backbones.sparsifiner import sparsifiner_deit_tiny

    src = sparsifiner_deit_tiny(num_classes=1000, pyramid=False)
    deit = {k: v for k, v in src.state_dict().items() if ".mask_predictor." not in k}
    path = _save(tmp_path, {"model": deit}, "deit_tiny_patch16_224.pth")
    cfg = attnseg.load_config(REPO / "configs" / "sparsifiner" / "sparsifiner_deit_tiny_unetr_synthetic2d.yaml")
    model = attnseg.build_model(cfg)
    report = load_pretrained(model, path, strict=False)
    assert report.adapted == ["backbone.pos_embed: [1, 197, 192] -> [1, 37, 192] (by Sparsifiner)"]
    torch.testing.assert_close(model.backbone.pos_embed.detach(),
                               resample_abs_pos_embed(src.pos_embed.detach(), [6, 6], [14, 14]))
    assert torch.equal(model.backbone.blocks[11].mlp.fc2.weight, src.blocks[11].mlp.fc2.weight)
