"""attnseg's own model format: ``model.safetensors`` + ``config.json``, readable without unpickling anything.

A saved model is a folder::

    my_model/
      model.safetensors   the weights (safetensors: a JSON header and raw tensor bytes, no pickle)
      config.json         how to rebuild the model: format version, attnseg version, task, the ``model:``
                          config section, class names, label values, input normalisation and, when known,
                          the whole experiment config (what ``attnseg-infer`` needs to run without ``--config``)

or a pair of files ``name.safetensors`` + ``name.json`` when :func:`save_model` is given a path ending in
``.safetensors``. The config is also copied into the safetensors header (``__metadata__["attnseg_config"]``),
so a lone ``.safetensors`` file still loads; ``config.json`` wins when both exist, and both carry one random
``weights_id`` so that a folder whose two files come from different saves is refused.

:func:`load_model` builds the model with :func:`attnseg.models.builder.build_model` from the JSON and loads the
weights strictly (every key, every shape); :func:`export_checkpoint` turns a training checkpoint
(``last.ckpt``/``best-*.ckpt``, read with ``weights_only=True``) into this format, and
:func:`attnseg.checkpoint.load_pretrained` reads such a folder like any other checkpoint.

Example::

    >>> import tempfile
    >>> from attnseg.models.builder import build_model
    >>> cfg = {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8}, "num_classes": 3}
    >>> folder = save_model(build_model(cfg), Path(tempfile.mkdtemp()) / "model", cfg, class_names=["bg", "a", "b"])
    >>> sorted(os.listdir(folder))
    ['config.json', 'model.safetensors']
    >>> model, info = load_model(folder)
    >>> type(model).__name__, info.task, info.class_names
    ('Segmentor', 'segmentation', ['bg', 'a', 'b'])
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnseg.errors import CheckpointError

__all__ = ["ModelInfo", "save_model", "load_model", "read_model_info", "export_checkpoint", "is_model_path",
           "resolve_model_files", "FORMAT", "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME"]

FORMAT = "attnseg.model"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_METADATA_KEY = "attnseg_config"


@dataclass
class ModelInfo:
    """What ``config.json`` records besides the weights.

    Attributes:
        task: ``"segmentation"`` or ``"classification"``.
        model: the ``model:`` config section (plain data; ``backbone.pretrained`` and ``checkpoint`` cleared, the
            weights being in the file).
        class_names: a name per output class, when known.
        label_values: the value each class has in the training labels (e.g. 0, 1, 2, 4), when known.
        normalize: the input normalisation (``data.normalize``) as plain data, or None.
        experiment: the whole experiment config (plain data) when the model came from one, else None.
        source: where the weights came from (a training checkpoint, an official file), for the record.
        format_version: the format version the file was written with.
        attnseg_version: the attnseg version that wrote it.
        weights_id: random id shared with the safetensors header.
    """

    task: str
    model: dict[str, Any]
    class_names: list[str] | None = None
    label_values: list[int] | None = None
    normalize: dict[str, Any] | None = None
    experiment: dict[str, Any] | None = None
    source: str | None = None
    format_version: int = FORMAT_VERSION
    attnseg_version: str = ""
    weights_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> dict[str, Any]:
        """The ``config.json`` document."""
        return {"format": FORMAT, "format_version": self.format_version, "attnseg_version": self.attnseg_version,
                "weights_id": self.weights_id, "task": self.task, "model": self.model,
                "class_names": self.class_names, "label_values": self.label_values, "normalize": self.normalize,
                "source": self.source, "experiment": self.experiment}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> ModelInfo:
        """Parse a ``config.json`` document; :class:`CheckpointError` naming ``where`` when it is not one."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not an attnseg model config (no \"format\": \"{FORMAT}\")")
        version = doc.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{where} has format_version {version!r}; this attnseg reads versions up to "
                                  f"{FORMAT_VERSION} (upgrade attnseg)")
        if doc.get("task") not in ("segmentation", "classification") or not isinstance(doc.get("model"), dict):
            raise CheckpointError(f"{where}: 'task' must be segmentation or classification and 'model' a mapping")
        return cls(task=doc["task"], model=doc["model"], class_names=doc.get("class_names"),
                   label_values=doc.get("label_values"), normalize=doc.get("normalize"),
                   experiment=doc.get("experiment"), source=doc.get("source"), format_version=version,
                   attnseg_version=str(doc.get("attnseg_version", "")), weights_id=str(doc.get("weights_id", "")))

    def experiment_config(self) -> Any:
        """The recorded experiment config as an :class:`~attnseg.config.ExperimentConfig`, or None."""
        if self.experiment is None:
            return None
        from attnseg.config import ExperimentConfig

        return ExperimentConfig.model_validate(self.experiment)


# -- paths ----------------------------------------------------------------------------------------------------------

def resolve_model_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(weights file, config file or None)`` of a saved model: a folder, or a ``.safetensors`` file whose config
    is ``<stem>.json`` beside it (or ``config.json`` beside a ``model.safetensors``), else its embedded copy.

    Raises:
        CheckpointError: neither a folder holding ``model.safetensors`` nor a ``.safetensors`` file.
    """
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{path} is a folder without {WEIGHTS_NAME} (not an attnseg model folder)")
        config = path / CONFIG_NAME
        return weights, config if config.is_file() else None
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointError(f"model not found: {path} (expected a folder with {WEIGHTS_NAME} and {CONFIG_NAME}, "
                              "or a .safetensors file)")
    for config in (path.with_suffix(".json"), path.parent / CONFIG_NAME if path.name == WEIGHTS_NAME else None):
        if config is not None and config.is_file():
            return path, config
    return path, None


def is_model_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is in attnseg's own format (a model folder, or a ``.safetensors`` file with an attnseg
    config beside it or in its header)."""
    try:
        read_model_info(path)
    except CheckpointError:
        return False
    return True


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """The :class:`ModelInfo` of a saved model (no tensors are read).

    Raises:
        CheckpointError: not a saved model, an unreadable or foreign config, or a ``config.json`` and
            ``model.safetensors`` written by different saves.
    """
    weights, config = resolve_model_files(path)
    embedded = _header_metadata(weights).get(_METADATA_KEY)
    if config is not None:
        try:
            doc = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {config}: {e}") from None
        info = ModelInfo.from_json(doc, str(config))
        if embedded is not None:
            header_id = json.loads(embedded).get("weights_id")
            if header_id != info.weights_id:
                raise CheckpointError(f"{config} and {weights} come from different saves (weights_id {info.weights_id}"
                                      f" vs {header_id}); an interrupted save_model? Save the model again")
        return info
    if embedded is None:
        raise CheckpointError(f"{weights} has no attnseg config: no {CONFIG_NAME}/{weights.stem}.json beside it and "
                              f"none in its header (a plain safetensors file: build the model and use "
                              "load_pretrained)")
    return ModelInfo.from_json(json.loads(embedded), f"{weights} (header)")


def _header_metadata(weights: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"cannot read safetensors file {weights}: {e}") from None


# -- save -------------------------------------------------------------------------------------------------------------

def _plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict on the CPU, contiguous, with no two tensors sharing storage (safetensors refuses that; tied
    weights are stored twice and tied again by ``load_state_dict``)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ident in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # shared, or a view of a larger storage
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[key] = t
    return out


def _model_section(config: Any) -> tuple[dict[str, Any], str | None, dict[str, Any] | None, dict[str, Any] | None]:
    """``(model section, task, normalize, whole experiment)`` as plain data from an ExperimentConfig, a ModelConfig
    or a dict of either; weight-loading keys cleared."""
    from attnseg.config import ExperimentConfig, ModelConfig

    if isinstance(config, dict):
        config = ExperimentConfig.model_validate(config) if "model" in config else ModelConfig.model_validate(config)
    if isinstance(config, ExperimentConfig):
        experiment = config.model_dump(mode="json")
        model = experiment["model"]
        normalize = experiment["data"].get("normalize")
        task: str | None = config.task
    elif isinstance(config, ModelConfig):
        experiment, normalize, task = None, None, None
        model = config.model_dump(mode="json")
    else:
        raise TypeError(f"config must be an ExperimentConfig, a ModelConfig or a dict, got {type(config).__name__}")
    model["backbone"]["pretrained"] = None  # the weights are in the file; nothing else is to be read at load time
    model["checkpoint"] = None
    return model, task, normalize, experiment


def save_model(model: nn.Module, path: str | os.PathLike, config: Any = None, *, task: str | None = None,
               class_names: list[str] | None = None, label_values: list[int] | None = None,
               normalize: dict[str, Any] | None = None, source: str | None = None) -> Path:
    """Save ``model`` in attnseg's own format (module docstring), atomically.

    Args:
        model: a Segmentor/Classifier built by ``build_model``, or a Lightning task of attnseg (its ``model``,
            config, class names and label values are taken).
        path: a folder (``model.safetensors`` + ``config.json`` inside; created, or its two files replaced), or a
            ``name.safetensors`` path (``name.json`` beside it).
        config: the config ``model`` was built from: an ExperimentConfig, its ``model`` section, or a dict of
            either (default: a task's own config).
        task: ``"segmentation"``/``"classification"`` when ``config`` is only the model section (default:
            segmentation when it has a head).
        class_names, label_values, normalize: recorded for inference (default: the task's / the config's).
        source: provenance recorded in ``config.json``.

    Returns:
        The folder, or the ``.safetensors`` file.

    The files are written to temporary names beside the targets, synced, then renamed into place (a new folder
    is renamed into place whole); a crash leaves the old model or the new one, and a pair mixed from two saves
    is refused by :func:`load_model` (``weights_id``).
    """
    from safetensors.torch import save_file

    import attnseg

    if config is None:
        config = getattr(model, "cfg", None)
        if config is None:
            raise ValueError("save_model needs the config the model was built from (config=...)")
    if isinstance(getattr(model, "model", None), nn.Module) and hasattr(model, "cfg"):  # a Lightning task
        class_names = class_names if class_names is not None else getattr(model, "class_names", None)
        label_values = label_values if label_values is not None else getattr(model, "label_values", None)
        model = model.model
    section, cfg_task, cfg_normalize, experiment = _model_section(config)
    task = task or cfg_task or ("segmentation" if section.get("head") else "classification")
    info = ModelInfo(task=task, model=section, class_names=list(class_names) if class_names else None,
                     label_values=[int(v) for v in label_values] if label_values else None,
                     normalize=normalize if normalize is not None else cfg_normalize, experiment=experiment,
                     source=source, attnseg_version=attnseg.__version__)
    doc = info.to_json()
    text = json.dumps(doc, indent=2)
    tensors = _plain_tensors(model)

    path = Path(path)
    if path.suffix == ".safetensors":
        targets = (path, path.with_suffix(".json"))
    else:
        targets = (path / WEIGHTS_NAME, path / CONFIG_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_folder = path.suffix != ".safetensors" and not path.exists()
    if path.suffix != ".safetensors" and path.exists() and not path.is_dir():
        raise ValueError(f"save_model: {path} exists and is not a folder")
    # staged beside the folder it becomes (a new one), else beside the files it replaces: renames stay on one disk
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp",
                                  dir=path.parent if new_folder else targets[0].parent))
    try:
        save_file(tensors, str(stage / WEIGHTS_NAME), metadata={_METADATA_KEY: text, "format": "pt"})
        (stage / CONFIG_NAME).write_text(text + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            with open(stage / name, "rb") as f:
                os.fsync(f.fileno())
        if new_folder:
            os.replace(stage, path)
        else:
            os.replace(stage / WEIGHTS_NAME, targets[0])
            os.replace(stage / CONFIG_NAME, targets[1])
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return path


# -- load -------------------------------------------------------------------------------------------------------------

def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Build the model a saved model folder (or ``.safetensors`` file) describes and load its weights strictly.

    Nothing is unpickled: the config is JSON, the weights safetensors.

    Returns:
        ``(model in eval mode on map_location, ModelInfo)``.

    Raises:
        CheckpointError: not a saved model, a config from a newer format, or weights that do not fit the model the
            config builds (the message lists missing/unexpected keys and shape mismatches).
    """
    from safetensors.torch import load_file

    from attnseg.models.builder import build_model

    info = read_model_info(path)
    weights, _ = resolve_model_files(path)
    model = build_model(info.model, task=info.task)
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"cannot read safetensors file {weights}: {e}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        from attnseg.checkpoint import _abbrev

        parts = [f"{name} ({len(items)}): {_abbrev(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatches (file vs model)", mismatched))
                 if items]
        raise CheckpointError(f"{weights} does not fit the {type(model).__name__} its config describes: "
                              + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), info


# -- export from a training checkpoint -----------------------------------------------------------------------------

def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the model of an attnseg training checkpoint (Lightning ``.ckpt``) in the own format.

    The checkpoint is read with ``weights_only=True``; its ``hyper_parameters.config`` (the validated experiment
    config every attnseg task records) rebuilds the model, the ``model.*`` weights load strictly (a teacher's or
    a loss's keys are left out), and the class names / label values it recorded go into ``config.json``.

    Returns:
        What :func:`save_model` returns.

    Raises:
        CheckpointError: an unreadable or unsafe file, or one without an attnseg config (not a training checkpoint
            of attnseg: load it with ``load_pretrained`` into a model you build, then :func:`save_model`).
    """
    from attnseg.checkpoint import _numpy_scalar_globals, read_state_dict
    from attnseg.config import ExperimentConfig
    from attnseg.models.builder import build_model

    checkpoint = Path(checkpoint)
    state = read_state_dict(checkpoint)  # the safety checks and the clear refusals of read_state_dict
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    config = ((obj.get("hyper_parameters") or {}).get("config") if isinstance(obj, dict) else None)
    if not isinstance(config, dict):
        raise CheckpointError(f"{checkpoint} records no attnseg config (hyper_parameters.config): not a training "
                              "checkpoint of attnseg; build the model, load_pretrained() it, then save_model()")
    cfg = ExperimentConfig.model_validate(config)
    classes = obj.get("attnseg_classes") or {}
    section, *_ = _model_section(cfg)
    model = build_model(section, task=cfg.task)
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: the weights do not fit the model of its own config: {e}") from None
    return save_model(model, out, cfg, class_names=classes.get("class_names"),
                      label_values=classes.get("label_values"), source=str(checkpoint))
