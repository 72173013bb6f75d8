import pytest

import attnseg
from attnseg.registry import BACKBONES, Registry


def test_register_get_duplicates_and_suggestions():
    reg = Registry("widget")

    @reg.register()
    def round_widget(size: int = 1):
        return size

    assert reg.get("round_widget")(size=3) == 3
    with pytest.raises(ValueError, match="widget 'round_widget' is already registered"):
        reg.register("round_widget")(lambda: None)
    with pytest.raises(KeyError, match="widget 'round_widgte' is not registered; did you mean 'round_widget'"):
        reg.get("round_widgte")
    assert set(reg.parameters("round_widget")) == {"size"}


def test_parameters_follow_kwargs_to_the_registered_class():
    params = BACKBONES.parameters("mambaout_femto")
    assert {"drop_path_rate", "in_chans", "num_classes", "out_indices"} <= set(params)
    assert "**" not in params


def test_public_api_lists_models():
    assert {"mambaout_femto", "mambaout_kobe", "mambaout_tiny", "mambaout_small", "mambaout_base"} <= set(
        attnseg.list_models("mambaout*"))
    assert "unetr" in attnseg.list_models(kind="head")
    assert {"synthetic2d", "synthetic3d", "folder2d", "imagefolder"} <= set(attnseg.list_models(kind="dataset"))
    with pytest.raises(ValueError, match="kind must be one of"):
        attnseg.list_models(kind="nope")
