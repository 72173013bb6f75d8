"""The ``Example::`` blocks in public docstrings run and print what they claim."""

import doctest

import pytest

import attnseg.backbones.mambaout
import attnseg.backbones.resnet
import attnseg.backbones.sparsifiner
import attnseg.convert
import attnseg.datasets.landmark_template
import attnseg.datasets.rasterize
import attnseg.engine.losses
import attnseg.heads.connectivity
import attnseg.heads.hybridgnet
import attnseg.heads.msga
import attnseg.heads.unetr
import attnseg.layers.connectivity
import attnseg.layers.danet
import attnseg.layers.dims
import attnseg.layers.drop
import attnseg.layers.graph
import attnseg.layers.norm
import attnseg.models.classifier
import attnseg.models.dconnnet
import attnseg.models.hybridgnet
import attnseg.models.msga
import attnseg.models.segmentor
import attnseg.ops.functional
import attnseg.ops.modules


@pytest.mark.parametrize("module", [attnseg.backbones.mambaout, attnseg.heads.unetr, attnseg.models.segmentor,
                                    attnseg.models.classifier,
                                    attnseg.ops.functional, attnseg.ops.modules, attnseg.convert,
                                    attnseg.layers.dims, attnseg.layers.drop, attnseg.layers.norm,
                                    attnseg.backbones.resnet,
                                    attnseg.backbones.sparsifiner,
                                    attnseg.heads.connectivity,
                                    attnseg.heads.msga,
                                    attnseg.heads.hybridgnet,
                                    attnseg.layers.danet,
                                    attnseg.layers.graph,
                                    attnseg.layers.connectivity,
                                    attnseg.engine.losses,
                                    attnseg.datasets.landmark_template,
                                    attnseg.datasets.rasterize,
                                    attnseg.models.msga,
                                    attnseg.models.dconnnet,
                                    attnseg.models.hybridgnet])
def test_examples(module):
    import torch

    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
