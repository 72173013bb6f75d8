"""The ``Example::`` blocks in public docstrings run and print what they claim."""

import doctest

import pytest

import attnseg.backbones.mambaout
import attnseg.convert
import attnseg.heads.unetr
import attnseg.layers.dims
import attnseg.layers.drop
import attnseg.layers.norm
import attnseg.models.classifier
import attnseg.models.segmentor
import attnseg.ops.functional
import attnseg.ops.modules


@pytest.mark.parametrize("module", [attnseg.backbones.mambaout, attnseg.heads.unetr, attnseg.models.segmentor,
                                    attnseg.models.classifier,
                                    attnseg.ops.functional, attnseg.ops.modules, attnseg.convert,
                                    attnseg.layers.dims, attnseg.layers.drop, attnseg.layers.norm])
def test_examples(module):
    import torch

    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
