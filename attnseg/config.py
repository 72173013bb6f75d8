"""Experiment configs: YAML files with ``_base_`` inheritance and dotted overrides, validated in full.

A config is loaded in three steps, and nothing is built before all three succeed:

1. **Merge.** ``_base_`` (a path or a list of paths, relative to the including file) is loaded first,
   recursively; the file's own keys are deep-merged over it: mappings merge key by key, everything else
   (lists included) is replaced. A mapping with ``_delete_: true`` replaces the inherited mapping instead
   of merging into it.
2. **Override.** ``--set a.b.c=VALUE`` pairs are applied in order; ``VALUE`` is parsed as YAML
   (``24`` is an int, ``[1, 2]`` a list, ``null`` None, ``'24'`` a string).
3. **Validate.** The merged mapping is checked against the pydantic schemas below (unknown keys are
   refused), and every registry name and every model, dataset and loss keyword argument is checked
   against the registered factory's signature and type hints. All problems are reported together in one
   :class:`~attnseg.errors.ConfigError`, each with its full key path, the expected type or range, and a
   close-match suggestion for misspelt keys and names.

Nothing in a config is evaluated or imported: YAML is read with ``yaml.safe_load`` and names resolve only
through the registries in :mod:`attnseg.registry`.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from attnseg.datasets.transforms import AugmentConfig, NormalizeConfig
from attnseg.datasets.volume_transforms import VolumeConfig
from attnseg.errors import ConfigError
from attnseg.registry import BACKBONES, DATASETS, HEADS, LOSSES, Registry, suggest

__all__ = [
    "ExperimentConfig",
    "load_config",
    "load_yaml_with_bases",
    "apply_overrides",
    "parse_overrides",
    "validate_config",
    "dump_config",
]

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"


# ----------------------------------------------------------------------------------------------------------
# Step 1 and 2: merging files and overrides
# ----------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path, included_from: Path | None) -> dict[str, Any]:
    where = f" (included from {included_from})" if included_from else ""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}{where}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"malformed YAML in {path}{pos}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping, got {type(data).__name__}")
    _check_tree(data, path)
    return data


_MAX_CONFIG_ENTRIES = 100_000


def _check_tree(data: Any, path: Path) -> None:
    """Refuse what YAML aliases can build: a mapping or list that contains itself (``a: &x {b: *x}``), or a tree
    that expands to more entries than any config has (nested aliases, "billion laughs")."""
    seen = 0
    stack: list[tuple[Any, str, tuple[int, ...]]] = [(data, "", ())]
    while stack:
        node, where, ancestors = stack.pop()
        seen += 1
        if seen > _MAX_CONFIG_ENTRIES:
            raise ConfigError(f"{path}: more than {_MAX_CONFIG_ENTRIES} entries once its YAML aliases are expanded; "
                              "a config is far smaller")
        if not isinstance(node, (dict, list)):
            continue
        if id(node) in ancestors:
            raise ConfigError(f"{path}: '{where or '(top level)'}' contains itself through a YAML alias")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            stack.append((value, f"{where}.{key}" if where else str(key), (*ancestors, id(node))))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``: mappings key by key, everything else replaced.

    A mapping in ``override`` with ``_delete_: true`` replaces the corresponding ``base`` mapping.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict):
            value = dict(value)
            delete = value.pop(DELETE_KEY, False)
            if not delete and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = deep_merge({}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _strip_delete_markers(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _strip_delete_markers(v) for k, v in data.items() if k != DELETE_KEY}
    if isinstance(data, list):
        return [_strip_delete_markers(v) for v in data]
    return data


def load_yaml_with_bases(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load ``path`` and everything it inherits through ``_base_``, merged (step 1 above)."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"circular _base_ inheritance: {chain}")
    data = _read_yaml(path, _stack[-1] if _stack else None)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_with_bases(path.parent / base, (*_stack, path)))
    return deep_merge(merged, data)


def parse_overrides(pairs: Iterable[str]) -> list[tuple[list[str], Any]]:
    """Parse ``["a.b=1", ...]`` into ``[(["a", "b"], 1), ...]``; values are YAML."""
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r} must look like 'dotted.key=value' (e.g. model.head.feature_size=24)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {pair!r}: value is not valid YAML ({getattr(e, 'problem', e)})") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a copy of ``data`` (step 2 above).

    Intermediate mappings are created as needed; a numeric part indexes into a list.
    """
    out = copy.deepcopy(data)
    for parts, value in parse_overrides(overrides):
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            path = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, part, path)
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise ConfigError(f"override {'.'.join(parts)}: '{path}' is a {type(node).__name__}, not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            _list_item(node, last, ".".join(parts))
            node[int(last)] = value
        elif isinstance(node, dict):
            if isinstance(value, dict) and isinstance(node.get(last), dict):
                node[last] = deep_merge(node[last], value)
            else:
                node[last] = value
        else:
            raise ConfigError(f"override {'.'.join(parts)}: parent is a {type(node).__name__}, not a mapping")
    return out


def _list_item(node: list, part: str, path: str) -> Any:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {path}: index {part!r} is out of range for a list of {len(node)} items")
    return node[int(part)]


# ----------------------------------------------------------------------------------------------------------
# Step 3: schemas
# ----------------------------------------------------------------------------------------------------------


class Strict(BaseModel):
    """Base of every config section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class Component(BaseModel):
    """A registry name plus keyword arguments for its factory (checked against the factory's signature)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="registered name")

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments given besides the fields this section declares."""
        return dict(self.model_extra or {})


class BackboneConfig(Component):
    pretrained: str | None = Field(None, description="path of a checkpoint to load (official or attnseg format)")
    out_indices: list[int] | None = Field(None, description="pyramid levels to use (default: all)")
    freeze: bool = Field(False, description="freeze the backbone's weights")


class HeadConfig(Component):
    pass


class ModelConfig(Strict):
    backbone: BackboneConfig = Field(description="backbone name and keyword arguments")
    head: HeadConfig | None = Field(None, description="segmentation head (required for segmentation)")
    num_classes: int = Field(ge=1, le=4096, description="number of output classes (1 = binary with sigmoid)")
    in_chans: int = Field(3, ge=1, le=64, description="input channels")
    spatial_dims: Literal[2, 3] = Field(2, description="2 for images, 3 for volumes")
    adapter_channels: list[int] | None = Field(None, description="1x1 projection widths per pyramid level")
    checkpoint: str | None = Field(None, description="attnseg checkpoint of the whole model to start from")


class DatasetConfig(Component):
    pass


class DataConfig(Strict):
    dataset: DatasetConfig = Field(description="dataset name and keyword arguments (all splits)")
    val_dataset: DatasetConfig | None = Field(None, description="another dataset for validation/test")
    batch_size: int = Field(8, ge=1, le=65536, description="training batch size per device")
    val_batch_size: int | None = Field(None, ge=1, le=65536, description="evaluation batch size (default: batch_size)")
    num_workers: int = Field(0, ge=0, le=256, description="data-loader worker processes")
    augment: AugmentConfig | None = Field(None, description="training augmentation (attnseg.datasets.transforms)")
    normalize: NormalizeConfig | None = Field(None, description="mean/std normalisation applied to every split")
    volume: VolumeConfig | None = Field(None, description="3D preprocessing and augmentation with MONAI "
                                                          "(attnseg.datasets.volume_transforms)")
    check_files: bool = Field(True, description="read every file once before training to report bad ones")

    @property
    def training_crop(self) -> list[int] | None:
        """The training crop size (``augment.crop_size`` or ``volume.crop.spatial_size``), or None."""
        if self.augment is not None and self.augment.crop_size is not None:
            return list(self.augment.crop_size)
        if self.volume is not None and self.volume.crop is not None:
            return list(self.volume.crop.spatial_size)
        return None


class LossConfig(Component):
    name: str = Field("dice_ce", description="registered loss name")


class OptimizerConfig(Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10, description="base learning rate")
    weight_decay: float = Field(0.05, ge=0, le=10)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = False
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay factor (backbone blocks)")
    no_decay_norm_bias: bool = Field(True, description="no weight decay on norms, biases and position tables")
    backbone_lr_mult: float = Field(1.0, ge=0, le=100, description="learning-rate multiplier of the backbone")


class SchedulerConfig(Strict):
    name: Literal["cosine", "poly", "step", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, description="linear warm-up, in optimizer steps")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warm-up as a fraction of all steps (adds to steps)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of the base lr")
    power: float = Field(0.9, gt=0, le=10, description="poly exponent")
    milestones: list[float] = Field([0.6, 0.85], description="step: fractions of training at which lr drops")
    gamma: float = Field(0.1, gt=0, le=1, description="step: lr factor at each milestone")


class CheckpointConfig(Strict):
    monitor: str | None = Field(None, description="metric for the best checkpoint (default: task's main metric)")
    mode: Literal["max", "min"] = "max"
    save_top_k: int = Field(1, ge=-1)
    every_n_epochs: int = Field(1, ge=1)


class EMAConfig(Strict):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)


class NonFiniteLossConfig(Strict):
    """What a NaN or infinite training loss does (see ``attnseg.engine.nonfinite``)."""

    action: Literal["stop", "skip", "lower_scale"] = Field(
        "stop", description="stop: raise with the step, samples and loss terms; skip: skip the batch (one process "
                            "only); lower_scale: let fp16's gradient scaler skip the step and lower its scale "
                            "(precision 16-mixed)")
    max_consecutive: int = Field(20, ge=1, description="non-finite steps in a row that skip / lower_scale tolerate")


class TrainerConfig(Strict):
    max_epochs: int | None = Field(10, ge=1)
    max_steps: int = Field(-1, ge=-1, description="-1: use max_epochs")
    precision: Literal["32", "32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | str | list[int] = "auto"
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp"] = "auto"
    num_nodes: int = Field(1, ge=1)
    accumulate_grad_batches: int = Field(1, ge=1)
    gradient_clip_val: float | None = Field(None, gt=0)
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    deterministic: bool = False
    check_val_every_n_epoch: int = Field(1, ge=1)
    log_every_n_steps: int = Field(10, ge=1)
    limit_train_batches: float | int | None = None
    limit_val_batches: float | int | None = None
    loggers: list[Literal["csv", "tensorboard"]] = ["csv", "tensorboard"]
    progress_bar: Literal["rich", "tqdm", "none"] = "rich"
    checkpoint: CheckpointConfig = CheckpointConfig()
    ema: EMAConfig = EMAConfig()
    nonfinite_loss: NonFiniteLossConfig = NonFiniteLossConfig()
    memory_check: bool = Field(True, description="estimate the training memory from one sample before training and "
                                                 "warn when the device has less free (attnseg.engine.memory)")

    @model_validator(mode="before")
    @classmethod
    def _precision_as_string(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("precision"), int):
            data = {**data, "precision": str(data["precision"])}
        return data


class ClassificationConfig(Strict):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup_alpha: float = Field(0.0, ge=0, description="0 disables mixup")
    cutmix_alpha: float = Field(0.0, ge=0, description="0 disables cutmix")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability a batch is mixed")


class TeacherConfig(Component):
    pretrained: str | None = Field(None, description="checkpoint of the teacher (required: a random teacher teaches "
                                                     "nothing)")


class DistillationConfig(Strict):
    """The official Sparsifiner training phases (lim142857/Sparsifiner ``src/main.py``, ``src/losses.py``); see
    :mod:`attnseg.engine.distill`."""

    phase: Literal["predictor", "backbone"] = Field(
        description="predictor: only the connectivity predictors train, against the teacher's attention (official "
                    "'attn_recon'; sets model.backbone.attn_recon: true); backbone: everything but the predictors "
                    "trains with cross-entropy plus logit and token distillation (official 'cls_distill')")
    teacher: TeacherConfig = Field(description="frozen teacher: a registered backbone with forward_official, built "
                                               "with model.num_classes and model.in_chans (for Sparsifiner students: "
                                               "the same factory with keep_rate: 1.0, i.e. dense DeiT)")
    attention_weight: float = Field(0.01, ge=0, description="phase predictor: weight of the attention "
                                                             "reconstruction loss (sum of squares, mean over layers)")
    logit_weight: float = Field(0.5, ge=0, description="phase backbone: weight of the KL divergence of the "
                                                       "teacher's class probabilities from the student's")
    token_weight: float = Field(0.5, ge=0, description="phase backbone: weight of the MSE between final-norm patch "
                                                       "tokens")


class EvaluationConfig(Strict):
    hd95: bool = Field(True, description="compute HD95 at test time (in mm where samples carry a spacing)")
    surface_dice: bool = Field(True, description="compute the surface Dice (NSD) at test time")
    surface_tolerance: float | list[float] = Field(
        1.0, description="NSD tolerance in mm (voxels without a spacing): one value, or one per class incl. class 0")
    include_background: bool = Field(False, description="count class 0 in the mean Dice/IoU")
    sliding_window: bool = Field(False, description="sliding-window inference in validation and test")
    roi_size: list[int] | None = Field(None, description="window size (default: the training crop)")
    overlap: float = Field(0.25, ge=0, lt=1)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, ge=1)


class ExperimentConfig(Strict):
    """The whole experiment: what ``tools/train.py`` validates before anything runs."""

    task: Literal["segmentation", "classification"] = "segmentation"
    seed: int = Field(0, ge=0)
    work_dir: str | None = Field(None, description="output folder (default: work_dirs/<config name>)")
    model: ModelConfig
    data: DataConfig
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    trainer: TrainerConfig = TrainerConfig()
    classification: ClassificationConfig = ClassificationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    distillation: DistillationConfig | None = Field(None, description="train in one of Sparsifiner's two "
                                                                      "distillation phases (classification only)")

    @property
    def source(self) -> str | None:
        return getattr(self, "_source", None)


# Arguments that build_model / the data module / the task pass themselves; a config may not set them
# inside a component (it would be silently overwritten), and the message says where they belong.
_RESERVED: dict[str, dict[str, str]] = {
    "model.backbone": {"num_classes": "model.num_classes", "in_chans": "model.in_chans",
                       "out_indices": "model.backbone.out_indices"},
    "model.head": {"in_channels": "(derived from the backbone)", "strides": "(derived from the backbone)",
                   "num_classes": "model.num_classes", "spatial_dims": "model.spatial_dims",
                   "in_chans": "model.in_chans"},
    "data.dataset": {"split": "(set per split)", "transform": "data.augment / data.normalize"},
    "data.val_dataset": {"split": "(set per split)", "transform": "data.augment / data.normalize"},
    "loss": {"num_classes": "model.num_classes", "ignore_index": "the dataset's ignore_index"},
    "distillation.teacher": {"num_classes": "model.num_classes (the teacher is built with the student's)",
                             "in_chans": "model.in_chans"},
}


def _check_component(registry: Registry, section: str, comp: Component | None, problems: list[str]) -> None:
    if comp is None:
        return
    if comp.name not in registry:
        problems.append(f"{section}.name: '{comp.name}' is not registered{suggest(comp.name, registry.names())}")
        return
    params = registry.parameters(comp.name)
    reserved = _RESERVED.get(section, {})
    accepted = [p for p in params if p != "**" and p not in reserved]
    hints = _type_hints(registry, comp.name)
    for key, value in comp.kwargs.items():
        path = f"{section}.{key}"
        if key in reserved:
            problems.append(f"{path}: set by attnseg, not here; use {reserved[key]}")
            continue
        if key not in params:
            if "**" in params:
                continue
            problems.append(
                f"{path}: unknown argument of {registry.kind} '{comp.name}'{suggest(key, accepted)}"
                f" (accepted: {', '.join(sorted(accepted)) or 'none'})"
            )
            continue
        hint = hints.get(key)
        if hint is None:
            continue
        try:
            TypeAdapter(hint).validate_python(value, strict=False)
        except ValidationError as e:
            detail = e.errors()[0]
            problems.append(f"{path}: {detail['msg']} (got {value!r}; expected {_type_name(hint)})")
        except Exception:  # noqa: BLE001 - an annotation pydantic cannot build a validator for is not checked
            pass


def _template_of(registry: Registry, comp: Component) -> Any:
    """The ``template`` a component is configured with (or its factory's default); None if it takes none."""
    if comp.name not in registry:
        return None
    if "template" in comp.kwargs:
        return comp.kwargs["template"]
    param = registry.parameters(comp.name).get("template")
    return None if param is None or param.default is param.empty else param.default


def _check_landmark_templates(cfg: ExperimentConfig, problems: list[str]) -> None:
    """A landmark head and its datasets must use the same template (organs and point counts, in node order)."""
    from attnseg.datasets.landmark_template import load_template

    def describe(spec: Any) -> tuple[tuple[str, int], ...]:
        return tuple((o.name, o.num_points) for o in load_template(spec).organs)

    def fmt(organs: tuple[tuple[str, int], ...]) -> str:
        return f"{sum(n for _, n in organs)} points: " + ", ".join(f"{name} {n}" for name, n in organs)

    head_spec = _template_of(HEADS, cfg.model.head)
    try:
        head_organs = describe(head_spec) if head_spec is not None else None
    except (ConfigError, ValueError, OSError) as e:
        problems.append(f"model.head.template: {e}")
        return
    for section, comp in (("data.dataset", cfg.data.dataset), ("data.val_dataset", cfg.data.val_dataset)):
        spec = _template_of(DATASETS, comp) if comp is not None else None
        if spec is None or head_organs is None:
            continue
        try:
            organs = describe(spec)
        except (ConfigError, ValueError, OSError) as e:
            problems.append(f"{section}.template: {e}")
            continue
        if organs != head_organs:
            problems.append(f"{section}.template {spec!r} ({fmt(organs)}) differs from model.head.template "
                            f"{head_spec!r} ({fmt(head_organs)}); the head decodes the landmarks its dataset gives")


def _registered_class(registry: Registry, raw: Any) -> type | None:
    """The class behind a config section ``{name: ...}`` (the factory itself when it is a class), or None."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or raw["name"] not in registry:
        return None
    factory = registry.get(raw["name"])
    return factory if isinstance(factory, type) else registry.owner_class(raw["name"])


def _check_distillation(data: dict[str, Any], problems: list[str]) -> None:
    """The ``distillation`` section against the task, the student and the teacher (on the raw mapping, so that its
    problems are listed even when the schema fails elsewhere)."""
    dist = data.get("distillation")
    if not isinstance(dist, dict):
        return
    task = data.get("task", "segmentation")
    if task != "classification":
        problems.append(f"distillation: the distillation phases train classifiers; set task: classification (got "
                        f"task: {task})")
    phase = dist.get("phase")
    raw_model = data.get("model") if isinstance(data.get("model"), dict) else {}
    student = raw_model.get("backbone")
    student_cls = _registered_class(BACKBONES, student)
    if student_cls is not None:
        name = student["name"]
        if not hasattr(student_cls, "forward_official"):
            problems.append(f"model.backbone.name: distillation needs a student with forward_official (attention "
                            f"maps and final-norm tokens, as the Sparsifiner backbones give); '{name}' has none")
        elif phase == "predictor" and not hasattr(student_cls, "predictor_parameters"):
            problems.append(f"model.backbone.name: phase predictor trains the student's predictor_parameters(); "
                            f"'{name}' has none")
    if isinstance(student, dict):
        recon = student.get("attn_recon")
        if phase == "backbone" and recon is True:
            problems.append("model.backbone.attn_recon: phase backbone trains with the sparse mask; remove "
                            "attn_recon (the predictor phase's dense mode)")
        if phase == "predictor" and recon is False:
            problems.append("model.backbone.attn_recon: phase predictor fits the predictors in attention-"
                            "reconstruction mode; remove attn_recon: false (the phase sets it to true)")
        if student.get("freeze") is True:
            problems.append("model.backbone.freeze: a distillation phase chooses what trains itself; remove freeze")
    teacher = dist.get("teacher")
    teacher_cls = _registered_class(BACKBONES, teacher)
    if teacher_cls is None:
        return  # a missing or unregistered teacher is reported by the schema and the registry checks
    name = teacher["name"]
    if not hasattr(teacher_cls, "forward_official"):
        problems.append(f"distillation.teacher.name: the teacher must give its attention maps, logits and final-norm "
                        f"tokens through forward_official; '{name}' has none (use a Sparsifiner factory with "
                        f"keep_rate: 1.0, which is dense DeiT)")
    param = BACKBONES.parameters(name).get("keep_rate")
    if param is not None:
        keep = teacher.get("keep_rate", param.default)
        rates = keep if isinstance(keep, list) else [keep]
        if any(r != 1.0 for r in rates):
            where = "" if "keep_rate" in teacher else " (the factory's default)"
            problems.append(f"distillation.teacher.keep_rate: the teacher attends densely in the official recipe; set "
                            f"keep_rate: 1.0 (got {keep!r}{where})")
    if not teacher.get("pretrained"):
        problems.append("distillation.teacher.pretrained: required (a frozen randomly initialised teacher teaches "
                        "nothing); e.g. the DeiT weights the student starts from")


def _with_distillation_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Phase predictor runs the student in attention-reconstruction mode: ``model.backbone.attn_recon: true`` is
    filled in when the student accepts it and the config leaves it unset."""
    dist, model = data.get("distillation"), data.get("model")
    if not (isinstance(dist, dict) and dist.get("phase") == "predictor" and isinstance(model, dict)):
        return data
    backbone = model.get("backbone")
    if not (isinstance(backbone, dict) and isinstance(backbone.get("name"), str) and backbone["name"] in BACKBONES):
        return data
    if "attn_recon" in backbone or "attn_recon" not in BACKBONES.parameters(backbone["name"]):
        return data
    return {**data, "model": {**model, "backbone": {**backbone, "attn_recon": True}}}


def _type_hints(registry: Registry, name: str) -> dict[str, Any]:
    fn = registry.get(name)
    hints: dict[str, Any] = {}
    owner = registry.owner_class(name)
    for target in ([owner.__init__] if owner is not None else []) + [fn]:
        try:
            hints.update(typing.get_type_hints(target))
        except Exception:  # noqa: BLE001 - unresolvable hints are simply not type-checked
            pass
    hints.pop("return", None)
    return hints


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) or str(hint)
    return text.replace("typing.", "")


def _loc_to_path(loc: Sequence[Any], data: Any) -> tuple[str, list[str]]:
    """Key path of a pydantic error location, walking the input so that union-branch tags that pydantic
    adds to ``loc`` (``'int'``, ``'list[int]'``, ...) are returned apart instead of read as keys."""
    parts: list[str] = []
    tags: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(node, dict) and item in node:
            parts.append(("." if parts else "") + str(item))
            node = node[item]
        elif isinstance(node, (list, tuple)) and isinstance(item, int) and -len(node) <= item < len(node):
            parts.append(f"[{item}]")
            node = node[item]
        elif isinstance(node, dict) and any(item == v for v in node.values() if isinstance(v, str)):
            tags.append(str(item))  # a discriminated union's tag (``type: pos_neg``), not a key
        elif isinstance(node, dict) or not parts or isinstance(item, int):
            parts.append(("." if parts and not isinstance(item, int) else "") + (
                f"[{item}]" if isinstance(item, int) else str(item)))  # a missing or unknown key
            node = None
        else:
            tags.append(str(item))
    return "".join(parts), tags


def _fields_at(loc: Sequence[Any]) -> list[str]:
    """Field names of the schema that holds the key at ``loc`` (for misspelt-key suggestions)."""
    model: Any = ExperimentConfig
    for item in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(item)
        if field is None:
            return []
        ann = field.annotation
        for arg in typing.get_args(ann) or (ann,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
                break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def _describe(errors: list[dict[str, Any]], data: dict[str, Any]) -> list[str]:
    """One line per key path; the errors of a union's branches merge into one line."""
    by_path: dict[str, list[tuple[dict[str, Any], list[str]]]] = {}
    for err in errors:
        path, tags = _loc_to_path(err["loc"], data)
        by_path.setdefault(path, []).append((err, tags))
    lines = []
    for path, items in by_path.items():
        err, tags = items[0]
        if len(items) > 1 and all(t for _, t in items):
            options = " | ".join(dict.fromkeys(t[0] for _, t in items))
            lines.append(f"{path}: Input should be one of {options} (got {err.get('input')!r})")
            continue
        for err, _ in items:
            lines.append(_describe_one(path, err))
    return lines


def _describe_one(path: str, err: dict[str, Any]) -> str:
    loc = err["loc"]
    if err["type"] == "extra_forbidden":
        fields = _fields_at(loc)
        hint = suggest(str(loc[-1]), fields)
        return f"{path}: unknown key{hint}" + (f" (allowed: {', '.join(fields)})" if fields and not hint else "")
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    ctx = err.get("ctx") or {}
    rng = ", ".join(f"{k} {v}" for k, v in ctx.items() if k in {"gt", "ge", "lt", "le"})
    extra = f"; allowed: {rng}" if rng else ""
    msg = err["msg"].removeprefix("Value error, ")
    got = "" if err["type"] == "value_error" else f" (got {err.get('input')!r}{extra})"
    return f"{path}: {msg}{got}"


def validate_config(data: dict[str, Any], source: str | None = None) -> ExperimentConfig:
    """Validate a merged config mapping; raise one :class:`ConfigError` listing every problem."""
    data = _strip_delete_markers(data)
    problems: list[str] = []
    cfg: ExperimentConfig | None = None
    raw_head = data["model"].get("head") if isinstance(data.get("model"), dict) else None
    head_cls = _registered_class(HEADS, raw_head)
    default_loss = getattr(head_cls, "default_loss", None)
    if "loss" not in data and default_loss:
        data = {**data, "loss": {"name": default_loss}}  # a head with its own output takes its own loss by default
    _check_distillation(data, problems)
    data = _with_distillation_defaults(data)
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        problems.extend(_describe(e.errors(), data))
    # Registry checks run even when the schema failed elsewhere, so one message lists everything.
    raw_model = data.get("model") if isinstance(data.get("model"), dict) else {}
    raw_data = data.get("data") if isinstance(data.get("data"), dict) else {}
    raw_dist = data.get("distillation") if isinstance(data.get("distillation"), dict) else {}
    for registry, section, schema, raw in (
        (BACKBONES, "model.backbone", BackboneConfig, raw_model.get("backbone")),
        (HEADS, "model.head", HeadConfig, raw_model.get("head")),
        (DATASETS, "data.dataset", DatasetConfig, raw_data.get("dataset")),
        (DATASETS, "data.val_dataset", DatasetConfig, raw_data.get("val_dataset")),
        (LOSSES, "loss", LossConfig, data.get("loss", {"name": LossConfig().name})),
        (BACKBONES, "distillation.teacher", TeacherConfig, raw_dist.get("teacher")),
    ):
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            try:
                comp = schema.model_validate(raw)
            except ValidationError:
                comp = Component.model_validate({"name": raw["name"]})  # field errors are reported above
            _check_component(registry, section, comp, problems)
    if cfg is not None and cfg.task == "segmentation" and cfg.model.head is None:
        problems.append("model.head: required key is missing (a segmentation task needs a head)")
    loss_cls = _registered_class(LOSSES, data.get("loss"))
    if cfg is not None and cfg.task == "segmentation" and head_cls is not None and loss_cls is not None:
        from attnseg.heads._common import head_output_kind  # here: the heads import the config's registries

        kind = head_output_kind(head_cls)
        accepts = tuple(getattr(loss_cls, "accepts", ("logits",)))
        if kind not in accepts:
            hint = f"; use loss.name: {default_loss} (the head's own loss)" if default_loss else ""
            problems.append(f"loss.name: '{cfg.loss.name}' takes {' or '.join(accepts)} outputs, but head "
                            f"'{cfg.model.head.name}' gives {kind} outputs{hint}")
        if kind == "landmarks" and cfg.evaluation.sliding_window:
            problems.append(f"evaluation.sliding_window: head '{cfg.model.head.name}' predicts landmarks of the "
                            "whole image, which windows cannot blend; set it to false")
        if kind == "landmarks":
            _check_landmark_templates(cfg, problems)
    if cfg is not None and cfg.trainer.nonfinite_loss.action == "lower_scale" and cfg.trainer.precision != "16-mixed":
        problems.append(f"trainer.nonfinite_loss.action: 'lower_scale' needs trainer.precision: 16-mixed (only fp16 "
                        f"mixed precision has a loss scale), got '{cfg.trainer.precision}'; use 'stop' or 'skip'")
    if cfg is not None and cfg.data.volume is not None:
        if cfg.model.spatial_dims != 3:
            problems.append("data.volume: MONAI volume transforms need 3D data (model.spatial_dims: 3); use "
                            "data.augment for images")
        if cfg.data.augment is not None:
            problems.append("data.augment and data.volume are both set: for volumes use data.volume's keys (crop, "
                            "flip_prob, rotate90, ...), or set data.volume: null to use data.augment's plain-torch "
                            "3D ops")
    if cfg is not None:
        tol = cfg.evaluation.surface_tolerance
        n_labels = max(cfg.model.num_classes, 2)
        values = tol if isinstance(tol, list) else [tol]
        if any(t < 0 for t in values) or (isinstance(tol, list) and len(tol) != n_labels):
            problems.append(f"evaluation.surface_tolerance: one value >= 0, or one per class ({n_labels}, class 0 "
                            f"first), got {tol}")
    if cfg is not None and cfg.trainer.max_epochs is None and cfg.trainer.max_steps < 0:
        problems.append("trainer: set trainer.max_epochs or trainer.max_steps")
    if problems:
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"invalid config{where} ({len(dict.fromkeys(problems))} {noun}):\n{lines}")
    assert cfg is not None
    object.__setattr__(cfg, "_source", source)
    return cfg


def load_config(path: str | Path, overrides: Iterable[str] | None = None) -> ExperimentConfig:
    """Load, merge, override and validate a config file.

    Args:
        path: YAML file; its ``_base_`` files are resolved relative to it.
        overrides: ``"dotted.key=value"`` strings, applied after merging (values are YAML).

    Returns:
        The validated :class:`ExperimentConfig`.

    Raises:
        ConfigError: listing every problem found (missing file, malformed YAML, unknown keys, bad
            values, unregistered names), each with its key path.
    """
    merged = apply_overrides(load_yaml_with_bases(path), overrides or [])
    return validate_config(merged, source=str(path))


def dump_config(cfg: ExperimentConfig) -> str:
    """The validated config as YAML (defaults filled in), as ``--print-config`` shows it."""
    data = cfg.model_dump(mode="json", exclude_none=False)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
