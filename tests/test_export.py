"""attnseg.export: ONNX (checked with onnxruntime), torch.export and TorchScript round trips, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from attnseg.export import ExportError, export_onnx, export_torch, second_input  # noqa: E402
from attnseg.registry import BACKBONES  # noqa: E402


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ort_run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_second_input_grows_the_dynamic_axes_only():
    x = _x(1, 3, 64, 48)
    assert second_input(x, True, True).shape == (2, 3, 96, 112)
    assert second_input(x, True, False).shape == (2, 3, 64, 48)
    assert second_input(x, False, True).shape == (1, 3, 96, 112)


def test_onnx_mambaout_dynamic_batch_and_size(tmp_path):
    model = BACKBONES.get("test_mambaout")().eval()
    report = export_onnx(model, _x(1, 3, 64, 64), tmp_path / "m.onnx", name="test_mambaout")
    assert report.ok, report.summary()
    assert report.exporter == "dynamo"
    assert report.dynamic_axes == {0: "batch", 2: "H", 3: "W"}
    assert [c.input_shape for c in report.checks] == [(1, 3, 64, 64), (2, 3, 96, 128)]
    assert report.max_abs_diff < 1e-4
    # independently of the report: onnxruntime at a third size equals PyTorch
    x = _x(3, 3, 80, 64, seed=5)
    with torch.no_grad():
        ref = model(x).numpy()
    got = _ort_run(report.path, x)
    assert got.shape == ref.shape == (3, 1000)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_torch_export_round_trip(tmp_path):
    model = BACKBONES.get("test_mambaout")().eval()
    report = export_torch(model, _x(1, 3, 64, 64), tmp_path / "m.pt2", name="test_mambaout")
    assert report.ok, report.summary()
    assert report.dynamic_axes == {0: "batch", 2: "H", 3: "W"}
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = _x(2, 3, 96, 64, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_export_of_relative_position_bias_keeps_the_size_dynamic(tmp_path):
    """ViT-RPB's bias index is cached per size; symbolic sizes are computed instead (they are unhashable)."""
    model = BACKBONES.get("vitrpb_small")(num_classes=5, depth=2, embed_dim=64, num_heads=2).eval()
    report = export_torch(model, _x(1, 3, 64, 64), tmp_path / "m.pt2", name="vitrpb")
    assert report.ok, report.summary()
    assert report.dynamic_axes == {0: "batch", 2: "H", 3: "W"}


def test_traced_exports_of_karat_and_biformer(tmp_path):
    """Traced, KArAt takes plain ops (its custom autograd Function and batch-dependent chunking do not trace) and
    BiFormer's routing mask scatters a tensor (jit.trace has no alias info for a scalar bool scatter)."""
    karat = BACKBONES.get("test_karat")(num_classes=5).eval()
    report = export_torch(karat, _x(1, 3, 64, 64), tmp_path / "k.pt2", name="karat")
    assert report.ok and report.dynamic_axes == {0: "batch"}, report.summary()  # tokens fixed: KArAt's operators
    report = export_torch(karat, _x(1, 3, 64, 64), tmp_path / "k.ts", format="torchscript", name="karat")
    assert report.ok, report.summary()
    biformer = BACKBONES.get("test_biformer")(num_classes=5).eval()
    report = export_torch(biformer, _x(1, 3, 64, 64), tmp_path / "b.ts", format="torchscript", name="biformer")
    assert report.ok and report.dynamic_axes == {0: "batch", 2: "H", 3: "W"}, report.summary()


def test_structured_output_exports_as_its_tensors_and_a_size_the_model_refuses_fixes_the_axes(tmp_path):
    """HybridGNet returns a dict (landmarks, ..., a non-tensor input_size) and takes exactly 128x128."""
    from attnseg.registry import MODELS

    model = MODELS.get("test_hybridgnet_2igsc")().eval()
    report = export_torch(model, _x(1, 1, 128, 128), tmp_path / "h.ts", format="torchscript", name="hybridgnet")
    assert report.ok and report.dynamic_axes == {}, report.summary()
    assert report.notes[0] == ("structured output exported as the tuple of its tensors landmarks, pos1, pos2, mu, "
                               "logvar, downsample (not exported, not tensors: input_size.0, input_size.1)")
    assert "the PyTorch model refuses it: InputSizeError" in report.notes[1]
    loaded = torch.jit.load(str(tmp_path / "h.ts"))
    x = _x(1, 1, 128, 128, seed=5)
    with torch.no_grad():
        landmarks, *_ = loaded(x)
        torch.testing.assert_close(landmarks, model(x)["landmarks"], atol=1e-5, rtol=1e-5)


def test_torch_export_needs_pt2_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_torch(BACKBONES.get("test_mambaout")(), _x(1, 3, 64, 64), tmp_path / "m.bin")


class _SingularValues(nn.Module):
    """Uses an op (SVD) that ONNX has no operator for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x)


def test_unexportable_model_gives_a_clear_error(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(_SingularValues(), _x(1, 3, 8, 8), tmp_path / "bad.onnx", name="svd_model")
    message = str(info.value)
    assert message.startswith("svd_model cannot be exported to ONNX")
    # both exporters were tried; each names the op; an op error is not retried with fixed axes
    assert "dynamo exporter, dynamic batch and spatial size: ConversionError: no ONNX translation for " \
           "torch.ops.aten._linalg_svd" in message
    assert "torchscript exporter, dynamic batch and spatial size: UnsupportedOperatorError" in message
    assert "linalg_svdvals" in message and "fixed shape" not in message


class _DataDependentShape(nn.Module):
    """Builds a shape from tensor values: the trace cannot know it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int((x > 0).sum())
        return x.flatten()[:n]


def test_torch_export_error_names_the_model_line(tmp_path):
    with pytest.raises(ExportError) as info:
        export_torch(_DataDependentShape(), _x(1, 3, 8, 8), tmp_path / "dd.pt2", name="dd_model")
    message = str(info.value)
    assert message.startswith("dd_model cannot be exported to torch-export: torch.export, dynamic batch and spatial")
    assert "test_export.py" in message and "n = int((x > 0).sum())" in message


def test_export_error_is_a_user_error():
    from attnseg.errors import AttnsegError

    assert issubclass(ExportError, AttnsegError)


@pytest.mark.slow
def test_onnx_neighborhood_attention_fixed_size(tmp_path):
    # NAT's window tables are built from the feature-map size, so it exports at a fixed spatial size
    model = BACKBONES.get("test_nat")().eval()
    report = export_onnx(model, _x(1, 3, 64, 64), tmp_path / "nat.onnx", dynamic_spatial=False, name="test_nat")
    assert report.ok, report.summary()
    assert 0 in report.dynamic_axes and 2 not in report.dynamic_axes
    assert report.checks[-1].input_shape == (2, 3, 64, 64)
    assert report.max_abs_diff < 1e-4


@pytest.mark.slow
def test_onnx_segmentor_from_config(tmp_path):
    from attnseg.models.builder import build_model

    model = build_model({"backbone": {"name": "test_mambaout"}, "head": {"name": "unetr", "feature_size": 8},
                         "num_classes": 3, "in_chans": 1}, task="segmentation").eval()
    report = export_onnx(model, _x(1, 1, 64, 64), tmp_path / "seg.onnx", name="segmentor")
    assert report.ok, report.summary()
    assert 2 in report.dynamic_axes and 3 in report.dynamic_axes
    x = _x(2, 1, 96, 64, seed=7)
    with torch.no_grad():
        ref = model(x)
    got = _ort_run(report.path, x)
    assert got.shape == (2, 3, 96, 64)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-4)
