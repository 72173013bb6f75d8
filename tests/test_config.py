import textwrap

import pytest

from attnseg.config import apply_overrides, load_config, load_yaml_with_bases, parse_overrides, validate_config
from attnseg.errors import ConfigError

MINIMAL = {
    "model": {"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 12}, "num_classes": 4},
    "data": {"dataset": {"name": "synthetic2d", "num_classes": 4}},
}


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_base_inheritance_deep_merge_lists_replace_and_delete(tmp_path):
    (tmp_path / "_base_").mkdir()
    write(tmp_path / "_base_" / "a.yaml", """
        model: {backbone: {name: x, drop_path_rate: 0.1}, num_classes: 3}
        trainer: {loggers: [csv, tensorboard], max_epochs: 5}
        optimizer: {name: adamw, lr: 0.01, betas: [0.8, 0.9]}
    """)
    write(tmp_path / "_base_" / "b.yaml", """
        trainer: {max_epochs: 7}
    """)
    write(tmp_path / "child.yaml", """
        _base_: [_base_/a.yaml, _base_/b.yaml]
        model: {backbone: {name: y}}
        trainer: {loggers: [csv]}
        optimizer: {_delete_: true, name: sgd}
    """)
    merged = load_yaml_with_bases(tmp_path / "child.yaml")
    assert merged["model"]["backbone"] == {"name": "y", "drop_path_rate": 0.1}
    assert merged["model"]["num_classes"] == 3
    assert merged["trainer"] == {"loggers": ["csv"], "max_epochs": 7}
    assert merged["optimizer"] == {"name": "sgd"}


def test_single_string_base_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", "seed: 3\n")
    write(tmp_path / "sub" / "c.yaml", "_base_: ../base.yaml\nseed: 4\ntask: segmentation\n")
    assert load_yaml_with_bases(tmp_path / "sub" / "c.yaml") == {"seed": 4, "task": "segmentation"}


def test_circular_missing_and_malformed(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular _base_"):
        load_yaml_with_bases(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml \(included from .*c.yaml\)"):
        load_yaml_with_bases(tmp_path / "c.yaml")
    write(tmp_path / "bad.yaml", "model:\n  backbone: {name: x\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line \d+, column \d+"):
        load_yaml_with_bases(tmp_path / "bad.yaml")
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml_with_bases(tmp_path / "list.yaml")


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=24", "c=[1, 2]", "d=null", "e='24'", "f=true"]) == [
        (["a", "b"], 24), (["c"], [1, 2]), (["d"], None), (["e"], "24"), (["f"], True)]
    data = apply_overrides({"a": {"b": 1}, "l": [{"x": 1}, {"x": 2}]}, ["a.b=2", "a.new.deep=3", "l.1.x=5"])
    assert data == {"a": {"b": 2, "new": {"deep": 3}}, "l": [{"x": 1}, {"x": 5}]}
    with pytest.raises(ConfigError, match="must look like 'dotted.key=value'"):
        parse_overrides(["model.head.feature_size"])
    with pytest.raises(ConfigError, match="index '7' is out of range"):
        apply_overrides({"l": [1]}, ["l.7=1"])


def test_valid_minimal_config_gets_defaults():
    cfg = validate_config(MINIMAL)
    assert cfg.model.head.kwargs == {"feature_size": 12}
    assert cfg.trainer.precision == "32-true"
    assert cfg.optimizer.name == "adamw"


def test_one_message_lists_every_problem_with_paths_and_suggestions():
    bad = {
        "model": {"backbone": {"name": "mambaout_femt"}, "head": {"name": "unetr", "feature_sise": 12},
                  "num_classes": 0},
        "data": {"dataset": {"name": "synthetic2d"}, "batch_sze": 4},
        "trainer": {"max_epochs": "many", "precision": "15-mixed"},
        "optimizer": {"lr": -1},
        "loss": {"name": "dice_cee"},
    }
    with pytest.raises(ConfigError) as info:
        validate_config(bad, source="x.yaml")
    msg = str(info.value)
    assert "invalid config in x.yaml" in msg
    assert "model.backbone.name: 'mambaout_femt' is not registered; did you mean 'mambaout_femto'?" in msg
    assert "model.head.feature_sise: unknown argument of head 'unetr'; did you mean 'feature_size'?" in msg
    assert "model.num_classes: Input should be greater than or equal to 1 (got 0" in msg
    assert "data.batch_sze: unknown key; did you mean 'batch_size'?" in msg
    assert "trainer.max_epochs: Input should be a valid integer" in msg
    assert "trainer.precision:" in msg and "'15-mixed'" in msg
    assert "optimizer.lr: Input should be greater than 0 (got -1" in msg
    assert "loss.name: 'dice_cee' is not registered; did you mean 'dice_ce'?" in msg
    assert msg.count("\n  - ") == 8


def test_component_argument_types_are_checked_and_reserved_keys_refused():
    bad = {**MINIMAL, "model": {**MINIMAL["model"], "head": {"name": "unetr", "feature_size": "big", "num_classes": 3}}}
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    msg = str(info.value)
    assert "model.head.feature_size: Input should be a valid integer" in msg
    assert "model.head.num_classes: set by attnseg, not here; use model.num_classes" in msg


def test_missing_required_sections():
    with pytest.raises(ConfigError, match=r"model: required key is missing[\s\S]*data: required key is missing"):
        validate_config({})


def test_load_config_with_overrides(tmp_path):
    import yaml

    write(tmp_path / "c.yaml", yaml.safe_dump(MINIMAL))
    cfg = load_config(tmp_path / "c.yaml", ["model.head.feature_size=24", "trainer.max_epochs=2"])
    assert cfg.model.head.kwargs["feature_size"] == 24 and cfg.trainer.max_epochs == 2
    with pytest.raises(ConfigError, match="model.head.feature_size: Input should be a valid integer"):
        load_config(tmp_path / "c.yaml", ["model.head.feature_size=abc"])


def test_config_reference_doc_is_current():
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen", repo / "tools" / "gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (repo / "docs" / "configs.md").read_text() == gen.render(), "run tools/gen_config_docs.py"


def test_union_errors_merge_and_nested_schema_errors_have_paths():
    bad = {**MINIMAL, "trainer": {"limit_train_batches": "abc"},
           "data": {**MINIMAL["data"], "augment": {"crop_size": [0, 5], "hflip": 2}}}
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    msg = str(info.value)
    assert "trainer.limit_train_batches: Input should be one of float | int (got 'abc')" in msg
    assert "data.augment.crop_size: crop_size needs 2 (2D) or 3 (3D) positive sizes, got [0, 5]" in msg
    assert "data.augment.hflip: Input should be less than or equal to 1 (got 2" in msg
