"""Sparsifiner's token pruning: removing the pruned tokens gives what the official code computes by zeroing them."""
import math

import pytest
import torch
import torch.nn.functional as F

from attnseg.backbones.sparsifiner import Sparsifiner, cls_attention

PRUNE_AT, RATE = (1, 2), 0.7


def _model(**kwargs):
    """64 patches + cls; attention budgets 17 (keep 0.25) and 39 (keep 0.6: above the 32 patches left after the
    second pruning, so the official cap to the tokens present is exercised)."""
    torch.manual_seed(0)
    model = Sparsifiner(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0,
                        reduce_n_factor=4, coef_topk=4, keep_rate=[0.25, 0.25, 0.6, 0.6], num_classes=5,
                        token_keep_rate=RATE, token_pruning_loc=PRUNE_AT, **kwargs)
    with torch.no_grad():  # far from the near-uniform init, so that a wrong token or key would show
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.05 if "proj_back_n" in name else 0.5 / math.sqrt(p.shape[-1]))
    return model


def _official_forward(model, x):
    """The official Sparsifiner forward with token pruning, written out from lim142857/Sparsifiner
    ``src/models/sparsifiner.py`` (MaskPredictor, Attention, Block): every token stays in the tensors, pruned ones
    zeroed (tokens after each block; q, k, v and the predictor's q', k' rows) and masked out of the predictor's
    scores, the cls row never masked. Returns ``(logits, final normed patch tokens, last token mask)``."""
    tokens, _ = model._embed(x)
    B, N, C = tokens.shape
    mask = None  # [B, N-1] bool, True = present

    def zero_pruned(t):  # [B, heads, N, c]: pruned patch rows -> 0
        return t if mask is None else torch.cat([t[:, :, :1], t[:, :, 1:] * mask[:, None, :, None]], dim=2)

    for i, block in enumerate(model.blocks):
        attn_mod, pred = block.attn, block.attn.mask_predictor
        qkv = attn_mod.qkv(block.norm1(tokens)).reshape(B, N, 3, attn_mod.num_heads, attn_mod.head_dim)
        q, k, v = (zero_pruned(t) for t in qkv.permute(2, 0, 3, 1, 4))
        qc, kc = zero_pruned(pred.proj_c_q(q)), zero_pruned(pred.proj_c_k(k))
        coef = ((qc @ (kc.transpose(-2, -1) @ pred.proj_n)) * pred.scale)[..., 1:, :].softmax(dim=-1)
        top = coef.topk(pred.coef_topk, sorted=False)
        coef = torch.zeros_like(coef).scatter(-1, top.indices, top.values)
        score = coef @ F.threshold(pred.proj_back_n.t().abs(), pred.basis_threshold, 0.0)  # [B, heads, N-1, N]
        budget = math.ceil(pred.keep_rate * N)
        if mask is not None:
            score = torch.cat([score[..., :1], score[..., 1:].masked_fill(~mask[:, None, None], float("-inf"))], -1)
            budget = min(budget, int(mask[0].sum()))
        keep = torch.zeros_like(score, dtype=torch.bool).scatter(-1, score.topk(budget, sorted=False).indices, True)
        keep = torch.cat([keep.new_ones(B, attn_mod.num_heads, 1, N), keep], dim=2)
        logits = (q @ k.transpose(-2, -1)) * attn_mod.scale
        attn = torch.nan_to_num(logits.masked_fill(~keep, float("-inf")).softmax(dim=-1))
        tokens = tokens + attn_mod.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        tokens = tokens + block.mlp(block.norm2(tokens))
        if i in PRUNE_AT:
            token_score = attn[:, :, 0, 1:].mean(dim=1)
            if mask is not None:
                token_score = token_score.masked_fill(~mask, float("-inf"))
            budget = math.ceil(RATE ** (PRUNE_AT.index(i) + 1) * (N - 1))
            mask = torch.zeros_like(token_score, dtype=torch.bool).scatter(-1, token_score.topk(budget).indices, True)
        if mask is not None:
            tokens = torch.cat([tokens[:, :1], tokens[:, 1:] * mask[..., None]], dim=1)
    normed = model.norm(tokens)
    return model.head(normed[:, 0]), normed[:, 1:], mask


@pytest.mark.parametrize("impl", ["masked", "gather", "csr"])
def test_removing_pruned_tokens_equals_the_official_zeroing(impl):
    model = _model(attn_impl=impl).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref_logits, ref_features, ref_mask = _official_forward(model, x)
        out = model.forward_official(x)
    assert ref_mask.sum(1).tolist() == [32] * 3  # ceil(0.7 * 64) = 45, then ceil(0.49 * 64) = 32
    assert torch.equal(out["token_mask_list"][-1], ref_mask)
    assert out["token_mask_list"][0] is None and out["token_mask_list"][1].sum(1).tolist() == [45] * 3
    torch.testing.assert_close(out["x"], ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["features"], ref_features, atol=1e-5, rtol=1e-5)
    # the later blocks really run on fewer tokens; the key budget is capped at the patches present
    assert [a.shape[-1] for a in out["approx_attn_list"]] == [65, 65, 46, 33]
    if impl == "masked":
        assert out["attn_mask_list"][3][:, :, 1:].sum(-1).unique().tolist() == [32]
        assert out["attn_mask_list"][2][:, :, 1:].sum(-1).unique().tolist() == [39]


def test_training_gradients_equal_the_official_ones():
    model = _model(attn_impl="masked").train()
    x = torch.randn(2, 3, 64, 64)
    weight = torch.randn(2, 5)
    (model(x) * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (_official_forward(model, x)[0] * weight).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert grads["blocks.3.mlp.fc1.weight"].abs().sum() > 0


def test_cls_attention_counts_absent_keys_as_zero_logits():
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    out, probs = cls_attention(q, k, v, 0.5, absent=3)
    k_full = torch.cat([k, torch.zeros(1, 2, 3, 4)], dim=2)
    v_full = torch.cat([v, torch.zeros(1, 2, 3, 4)], dim=2)
    ref = ((q[:, :, :1] @ k_full.transpose(-2, -1)) * 0.5).softmax(-1)
    torch.testing.assert_close(probs, ref[..., :5])
    torch.testing.assert_close(out, ref @ v_full)
    assert probs.sum(-1).max() < 1  # the absent keys keep their share


def test_pruned_model_outputs_the_full_grid_and_other_sizes_work():
    model = _model().eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 64, 64))
        assert tokens.shape == (2, 65, 32)
        assert (tokens[:, 1:].abs().sum(-1) == 0).sum(1).tolist() == [64 - 32] * 2  # pruned patches zero
        maps = model.forward_pyramid(torch.randn(1, 3, 80, 100))  # 10 x 13 patches: keeps 91, then 64
        assert [tuple(m.shape[-2:]) for m in maps] == [(20, 25), (10, 13), (5, 7), (3, 4)]
        aux = model.forward_official(torch.randn(1, 3, 80, 100))["token_mask_list"]
        assert [None if m is None else int(m.sum()) for m in aux] == [None, 91, 64, 64]


def test_grad_checkpointing_and_recon_phase():
    model = _model(attn_impl="masked").train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)
    model.attn_recon = True  # the official attention-reconstruction phase never prunes
    assert all(m is None for m in model.forward_official(x)["token_mask_list"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(token_keep_rate=0.0), "token_keep_rate must be in"),
    (dict(token_keep_rate=1.5), "token_keep_rate must be in"),
    (dict(token_keep_rate=0.7, token_pruning_loc=(6, 3)), "token_pruning_loc must be increasing"),
    (dict(token_keep_rate=0.7, token_pruning_loc=(12,)), r"block indices in 0\.\.11"),
    (dict(token_keep_rate=0.7, token_pruning_loc=()), "token_pruning_loc must be increasing"),
])
def test_bad_pruning_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sparsifiner(img_size=32, embed_dim=16, depth=12, num_heads=2, num_classes=0, **kwargs)
