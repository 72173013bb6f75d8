"""Sparsifiner's distillation phases (attnseg.engine.distill): losses, trainable sets, teacher, config, end to end."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attnseg.checkpoint import load_pretrained
from attnseg.config import validate_config
from attnseg.engine.distill import (
    DistillationTask,
    attention_distillation_loss,
    logit_distillation_loss,
    token_distillation_loss,
)
from attnseg.engine.runner import build_task, evaluate, train
from attnseg.errors import ConfigError
from attnseg.models.builder import build_model
from attnseg.registry import BACKBONES

NUM_CLASSES = 3


# -- losses against hand computations ---------------------------------------------------------------------


def test_attention_loss_is_mean_over_layers_of_summed_squares_without_the_cls_row():
    B, H, N = 2, 3, 5
    student = [torch.rand(B, H, N - 1, N) for _ in range(2)]
    teacher = [torch.rand(B, H, N, N).softmax(-1) for _ in range(2)]
    by_hand = sum(((s - t[:, :, 1:, :]) ** 2).sum() for s, t in zip(student, teacher)) / 2
    assert torch.allclose(attention_distillation_loss(student, teacher), by_hand)
    with pytest.raises(ValueError, match="student gives 2 attention maps, the teacher 1"):
        attention_distillation_loss(student, teacher[:1])
    with pytest.raises(ValueError, match="layer 0"):
        attention_distillation_loss(student, [torch.rand(B, H + 1, N, N)] * 2)


def test_logit_loss_is_batchmean_kl_of_teacher_from_student():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    by_hand = (p_t * (p_t.log() - p_s.log())).sum() / 4
    assert torch.allclose(logit_distillation_loss(s, t), by_hand, atol=1e-6)
    assert float(logit_distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_docstring_examples_run():
    import doctest

    import attnseg.engine.distill

    result = doctest.testmod(attnseg.engine.distill, extraglobs={"torch": torch},
                             optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def test_token_loss_is_elementwise_mse():
    s, t = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    assert torch.allclose(token_distillation_loss(s, t), ((s - t) ** 2).sum() / s.numel())
    with pytest.raises(ValueError, match="width and token count"):
        token_distillation_loss(s, t[:, 1:])


# -- tasks ------------------------------------------------------------------------------------------------


def _teacher_file(tmp_path):
    torch.manual_seed(1)
    teacher = BACKBONES.get("test_sparsifiner")(num_classes=NUM_CLASSES, keep_rate=1.0)
    path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    return path


def _config(tmp_path, phase, student=None, **extra):
    return validate_config({
        "task": "classification", "work_dir": str(tmp_path / f"work_{phase}"),
        "model": {"backbone": {"name": "test_sparsifiner", "pyramid": False, **(student or {})},
                  "num_classes": NUM_CLASSES},
        "data": {"dataset": {"name": "imagefolder", "root": str(tmp_path / "data"), "image_size": [64, 64]},
                 "batch_size": 4, "augment": None},
        "optimizer": {"lr": 0.01},
        "trainer": {"max_epochs": 1, "progress_bar": "none", "loggers": ["csv"], "accelerator": "cpu",
                    "devices": 1},
        "distillation": {"phase": phase, "teacher": {"name": "test_sparsifiner", "keep_rate": 1.0,
                                                      "pretrained": str(_teacher_file(tmp_path))}},
        **extra,
    })


def _task(tmp_path, phase, student=None):
    cfg = _config(tmp_path, phase, student)
    torch.manual_seed(0)
    task = DistillationTask(build_model(cfg), cfg.model_dump(mode="json"))
    task.setup("fit")  # builds the teacher from distillation.teacher
    return task


def _steps(task, n=3):
    """``n`` AdamW steps on a fixed batch; returns the loss terms of the first step."""
    optimizer = task.configure_optimizers()["optimizer"]
    torch.manual_seed(2)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    first = None
    for _ in range(n):
        terms = task.distillation_losses(images, F.one_hot(labels, NUM_CLASSES).float())
        first = first or {k: v.detach() for k, v in terms.items()}
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    return images, labels, first


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_phase_predictor_trains_only_the_predictors_against_the_teacher_attention(tmp_path):
    task = _task(tmp_path, "predictor")
    student, teacher = task.model.backbone, task.teacher.module
    assert student.attn_recon  # set by validate_config for the predictor phase
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any("teacher" in k for k in task.state_dict())
    assert set(task.state_dict()) == {f"model.{k}" for k in task.model.state_dict()}
    s0, t0 = copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())
    # the loss of the first step by hand, from both models' official outputs
    with torch.no_grad():
        torch.manual_seed(2)
        images = torch.randn(4, 3, 64, 64)
        approx = student.forward_official(images)["approx_attn_list"]
        dense = teacher.forward_official(images)["unmasked_attn_list"]
        by_hand = 0.01 * sum(((a - t[:, :, 1:]) ** 2).sum() for a, t in zip(approx, dense)) / len(dense)
    _, _, first = _steps(task)
    assert set(first) == {"attn"} and torch.allclose(first["attn"], by_hand, rtol=1e-5)
    changed = _changed(s0, student.state_dict())
    predictor = {k for k in s0 if ".mask_predictor." in k}
    assert changed == predictor and len(predictor) == 2 * 6  # 2 layers x (proj_n, proj_back_n, proj_c_q/k w and b)
    assert not _changed(t0, teacher.state_dict())
    assert not teacher.training
    # only the predictors are in the optimizer
    opt_params = {id(p) for g in task.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in student.predictor_parameters()}


def test_phase_backbone_trains_everything_but_the_predictors_with_ce_kl_and_token_losses(tmp_path):
    task = _task(tmp_path, "backbone")
    student, teacher = task.model.backbone, task.teacher.module
    assert not student.attn_recon
    s0, t0 = copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())
    with torch.no_grad():
        torch.manual_seed(2)
        images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
        s, t = student.forward_official(images), teacher.forward_official(images)
        ce = F.cross_entropy(s["x"], labels)
        log_s, log_t = s["x"].log_softmax(-1), t["x"].log_softmax(-1)
        kl = (log_t.exp() * (log_t - log_s)).sum() / 4
        mse = ((s["features"] - t["features"]) ** 2).mean()
    _, _, first = _steps(task)
    assert torch.allclose(first["ce"], ce, rtol=1e-5)
    assert torch.allclose(first["kl"], 0.5 * kl, rtol=1e-4, atol=1e-7)
    assert torch.allclose(first["tokens"], 0.5 * mse, rtol=1e-5)
    changed = _changed(s0, student.state_dict())
    assert not any(".mask_predictor." in k for k in changed)
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight",
            "norm.weight", "pos_embed", "cls_token"} <= changed
    assert not _changed(t0, teacher.state_dict())


@pytest.mark.parametrize("phase", ["predictor", "backbone"])
def test_token_pruning_student_prunes_in_the_backbone_phase_only(tmp_path, phase):
    """The official token pruning is off in the attention-reconstruction phase; in the backbone phase the pruned
    patches reach the token loss as the final norm of zero tokens (the official features)."""
    task = _task(tmp_path, phase, {"token_keep_rate": 0.5, "token_pruning_loc": [0]})
    student = task.model.backbone
    with torch.no_grad():
        torch.manual_seed(2)
        out = student.forward_official(torch.randn(4, 3, 64, 64))
    masks = out["token_mask_list"]
    if phase == "predictor":
        assert masks == [None, None]
    else:
        assert masks[0].sum(1).tolist() == [8] * 4 and torch.equal(masks[1], masks[0])  # 16 patches -> 8
        pruned = ~masks[-1]
        zero_token = student.norm(torch.zeros(student.embed_dim))
        torch.testing.assert_close(out["features"][pruned], zero_token.expand(int(pruned.sum()), -1))
    _, _, first = _steps(task, n=1)
    assert all(torch.isfinite(v) for v in first.values())


def test_teacher_sees_the_mixed_images_the_student_sees(tmp_path):
    cfg = _config(tmp_path, "backbone", classification={"mixup_alpha": 0.8, "cutmix_alpha": 1.0})
    task = DistillationTask(build_model(cfg), cfg.model_dump(mode="json"))
    task.setup("fit")
    seen = {}

    def recording(who, official):
        def forward_official(x):
            seen[who] = x
            return official(x)
        return forward_official

    for who, model in (("student", task.model.backbone), ("teacher", task.teacher.module)):
        model.forward_official = recording(who, model.forward_official)
    images = torch.randn(4, 3, 64, 64)
    loss = task.training_step({"image": images, "label": torch.tensor([0, 1, 2, 0])}, 0)
    assert torch.isfinite(loss)
    assert seen["teacher"] is seen["student"] and not torch.equal(seen["student"], images)  # mixed, and shared


def test_teacher_follows_the_student_dtype_and_is_not_copied():
    teacher = BACKBONES.get("test_sparsifiner")(num_classes=NUM_CLASSES, keep_rate=1.0)
    from attnseg.engine.distill import FrozenTeacher

    holder = FrozenTeacher(teacher)
    out = holder(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert out["x"].dtype == torch.float64 and not out["x"].requires_grad
    assert copy.deepcopy(holder) is holder
    with pytest.raises(TypeError, match="forward_official"):
        FrozenTeacher(BACKBONES.get("test_mambaout")())


def test_sparsifiner_teacher_at_keep_rate_one_is_the_dense_vit(tmp_path):
    """The documented teacher: a Sparsifiner factory with keep_rate 1.0 computes the dense DeiT/ViT it loads."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                            num_classes=NUM_CLASSES).eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    cfg = _config(tmp_path, "backbone")
    raw = cfg.model_dump(mode="json")
    raw["distillation"]["teacher"]["pretrained"] = str(tmp_path / "vit.pth")
    task = DistillationTask(build_model(cfg), validate_config(raw).model_dump(mode="json"))
    task.setup("fit")
    x = torch.randn(2, 3, 64, 64)
    out = task.teacher(x)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        logits = vit.forward_head(tokens)
    assert torch.allclose(out["x"], logits, atol=1e-5) and torch.allclose(out["features"], tokens[:, 1:], atol=1e-5)
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in out["unmasked_attn_list"])


# -- config validation ------------------------------------------------------------------------------------


def _raw(**distillation):
    return {
        "task": "classification",
        "model": {"backbone": {"name": "test_sparsifiner"}, "num_classes": NUM_CLASSES},
        "data": {"dataset": {"name": "imagefolder", "root": "data"}},
        "distillation": {"phase": "backbone",
                         "teacher": {"name": "test_sparsifiner", "keep_rate": 1.0, "pretrained": "t.pth"},
                         **distillation},
    }


def _problems(raw):
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    return str(e.value)


def test_config_sets_attn_recon_for_the_predictor_phase_only():
    assert validate_config(_raw(phase="predictor")).model.backbone.kwargs["attn_recon"] is True
    assert "attn_recon" not in validate_config(_raw()).model.backbone.kwargs
    assert validate_config({**_raw(), "distillation": None}).distillation is None


def test_config_reports_every_bad_combination_together():
    raw = _raw(teacher={"name": "test_mambaout", "pretrained": "t.pth"})
    raw["task"] = "segmentation"
    raw["model"]["head"] = {"name": "unetr", "feature_size": 8}
    msg = _problems(raw)
    assert "(2 problems)" in msg
    assert "distillation: the distillation phases train classifiers; set task: classification" in msg
    assert "distillation.teacher.name: the teacher must give its attention maps" in msg and "forward_official" in msg

    msg = _problems(_raw(teacher={"name": "sparsifiner_deit_smal", "pretrained": "t.pth"}))
    assert "distillation.teacher.name: 'sparsifiner_deit_smal' is not registered; did you mean " \
           "'sparsifiner_deit_small'?" in msg

    msg = _problems(_raw(teacher={"name": "test_sparsifiner", "num_classes": 5, "depthh": 2}))
    for part in ("distillation.teacher.num_classes: set by attnseg, not here; use model.num_classes",
                 "distillation.teacher.depthh: unknown argument of backbone 'test_sparsifiner'; did you mean 'depth'",
                 "distillation.teacher.keep_rate: the teacher attends densely", "got 0.25 (the factory's default)",
                 "distillation.teacher.pretrained: required"):
        assert part in msg

    raw = _raw(phase="predictor")
    raw["model"]["backbone"] = {"name": "test_mambaout", "freeze": True}
    msg = _problems(raw)
    assert "model.backbone.name: distillation needs a student with forward_official" in msg
    assert "model.backbone.freeze: a distillation phase chooses what trains itself" in msg

    raw = _raw(phase="backbone")
    raw["model"]["backbone"]["attn_recon"] = True
    assert "model.backbone.attn_recon: phase backbone trains with the sparse mask" in _problems(raw)
    raw = _raw(phase="predictor")
    raw["model"]["backbone"]["attn_recon"] = False
    assert "model.backbone.attn_recon: phase predictor fits the predictors" in _problems(raw)
    assert "distillation.phase: Input should be 'predictor' or 'backbone'" in _problems(_raw(phase="joint"))
    assert "distillation.logit_weight: Input should be greater than or equal to 0" in _problems(_raw(logit_weight=-1))
    # a dumped config (every default filled in, as work_dirs/*/config.yaml) validates again
    dumped = validate_config(_raw(phase="predictor")).model_dump(mode="json")
    assert validate_config(dumped).distillation.phase == "predictor"


def test_teacher_trained_for_other_classes_is_refused_when_its_logits_are_used(tmp_path):
    teacher = BACKBONES.get("test_sparsifiner")(num_classes=NUM_CLASSES + 2, keep_rate=1.0)
    torch.save(teacher.state_dict(), tmp_path / "t5.pth")
    raw = _raw()
    raw["distillation"]["teacher"]["pretrained"] = str(tmp_path / "t5.pth")
    task = DistillationTask(build_model(validate_config(raw)), validate_config(raw).model_dump(mode="json"))
    with pytest.raises(ConfigError, match="trained for another number of classes"):
        task.setup("fit")
    raw["distillation"]["phase"] = "predictor"  # the logits are not used there
    task = DistillationTask(build_model(validate_config(raw)), validate_config(raw).model_dump(mode="json"))
    task.setup("fit")
    assert task.teacher.module.num_classes == NUM_CLASSES


# -- end to end: phase 1, then phase 2 from phase 1's last.ckpt --------------------------------------------


def _image_folder(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(NUM_CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(2 if split == "train" else 1):
                img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
                img[:, :, c] += 150
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")


def test_phase_one_then_phase_two_from_its_last_checkpoint(tmp_path):
    _image_folder(tmp_path / "data")
    cfg1 = _config(tmp_path, "predictor")
    first = train(cfg1)
    assert first["global_step"] == 1  # 6 images, batch 4, drop_last
    ckpt = torch.load(first["last_checkpoint"], map_location="cpu", weights_only=True)
    assert not any("teacher" in k for k in ckpt["state_dict"])
    phase1 = {k[len("model.backbone."):]: v for k, v in ckpt["state_dict"].items()}
    # the phase-1 checkpoint is a plain Classifier's, as any classification run's
    plain = build_model(validate_config({**_raw(), "distillation": None,
                                         "model": {"backbone": {"name": "test_sparsifiner", "pyramid": False},
                                                   "num_classes": NUM_CLASSES}}))
    report = load_pretrained(plain, first["last_checkpoint"])
    assert not report.missing and not report.unexpected

    cfg2 = _config(tmp_path, "backbone")
    raw2 = cfg2.model_dump(mode="json")
    raw2["model"]["backbone"]["pretrained"] = first["last_checkpoint"]
    cfg2 = validate_config(raw2)
    task = build_task(cfg2)
    start = task.model.backbone.state_dict()
    assert all(torch.equal(start[k], phase1[k]) for k in phase1)
    second = train(cfg2)
    assert second["global_step"] == 1
    assert {"train/loss_ce", "train/loss_kl", "train/loss_tokens", "val/top1"} <= set(second["metrics"])
    final = torch.load(second["last_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    final = {k[len("model.backbone."):]: v for k, v in final.items()}
    predictor = [k for k in phase1 if ".mask_predictor." in k]
    assert predictor and all(torch.equal(final[k], phase1[k]) for k in predictor)
    assert not torch.equal(final["blocks.0.attn.qkv.weight"], phase1["blocks.0.attn.qkv.weight"])
    (tmp_path / "teacher.pth").unlink()  # evaluation never builds the teacher
    assert 0.0 <= evaluate(cfg2, second["last_checkpoint"], split="val")["top1"] <= 1.0


class _StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resumed_distillation_run_equals_an_uninterrupted_one(tmp_path):
    """The teacher is rebuilt from the config on resume; optimizer, schedule and RNG states come back."""
    _image_folder(tmp_path / "data")

    def config(name):
        raw = _config(tmp_path, "backbone").model_dump(mode="json")
        raw["work_dir"] = str(tmp_path / name)
        raw["trainer"].update(max_epochs=2, deterministic=True)
        raw["classification"].update(mixup_alpha=0.8)
        return validate_config(raw)

    full = train(config("full"))
    train(config("part"), callbacks=[_StopAfterFirstEpoch()])
    resumed = train(config("part"), resume=True)
    assert resumed["global_step"] == full["global_step"] == 2
    a = torch.load(full["last_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(resumed["last_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shipped_phase_configs_follow_the_official_recipe_and_chain():
    from pathlib import Path

    from attnseg.config import load_config
    from attnseg.engine.runner import work_dir_for

    folder = Path(__file__).resolve().parents[2] / "configs" / "sparsifiner"
    one = load_config(folder / "sparsifiner_deit_small_imagefolder_phase1_predictor.yaml")
    two = load_config(folder / "sparsifiner_deit_small_imagefolder_phase2_backbone.yaml")
    assert (one.distillation.phase, two.distillation.phase) == ("predictor", "backbone")
    assert (one.trainer.max_epochs, one.optimizer.lr, two.trainer.max_epochs, two.optimizer.lr) == (5, 3e-4, 45, 8e-5)
    assert one.optimizer.lr * one.scheduler.min_lr_ratio == pytest.approx(2e-4, rel=1e-3)
    assert two.optimizer.lr * two.scheduler.min_lr_ratio == pytest.approx(2e-6, rel=1e-3)
    assert one.model.backbone.kwargs["attn_recon"] and "attn_recon" not in two.model.backbone.kwargs
    assert two.model.backbone.pretrained == str(work_dir_for(one) / "checkpoints" / "last.ckpt")
    assert one.distillation.teacher.kwargs["keep_rate"] == two.distillation.teacher.kwargs["keep_rate"] == 1.0
