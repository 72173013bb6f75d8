"""Export attnseg models to ONNX, ``torch.export`` (ExportedProgram) and TorchScript, checked against PyTorch.

Every export is verified: the exported artefact is loaded back (onnxruntime for ONNX, ``torch.export.load`` or
``torch.jit.load`` otherwise) and run on the example input and, when the batch or spatial axes are dynamic, on a
second input of another batch and spatial size; the largest absolute difference to the PyTorch output is reported
with the tolerance it is judged by.

Which axes are dynamic is read back from the exported graph, not assumed: ``torch.export`` may specialise an axis
the model's Python code turns into a constant (a window table built from the feature-map size, a ``pad`` computed
from ``int(h)``). When dynamic spatial sizes cannot be traced at all, the export is retried with a fixed spatial
size (and then a fixed batch) and the report says why (``report.notes``).

Neighborhood-attention layers run inside the export through the backend ``na_backend`` names (default
``"reference"``: plain tensor ops that every exporter understands; ``None`` keeps automatic selection).

Example::

    from attnseg import build_model  # or attnseg.registry.BACKBONES.get("mambaout_femto")()
    from attnseg.export import export_onnx
    report = export_onnx(model.eval(), torch.randn(1, 3, 224, 224), "model.onnx")
    print(report.summary())  # ok: max |diff| 2.1e-06 (tol 1e-04) at 1x3x224x224, 2x3x256x288; dynamic: batch, H, W
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from attnseg.errors import AttnsegError

__all__ = ["ExportError", "ExportCheck", "ExportReport", "export_onnx", "export_torch", "second_input",
           "FORMATS"]

FORMATS = ("onnx", "torch-export", "torchscript")
_SPATIAL_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


class ExportError(AttnsegError, RuntimeError):
    """A model cannot be exported (or its export does not run); the message names the model and the failing op."""


@dataclasses.dataclass
class ExportCheck:
    """One comparison of the exported artefact with PyTorch on one input."""

    input_shape: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    error: str | None = None  # set when the exported artefact could not run this input

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_abs_diff <= self.tolerance


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_onnx` / :func:`export_torch` did: artefact, exporter, dynamic axes and checks."""

    model: str
    format: str
    path: Path
    exporter: str  # "dynamo", "torchscript" (legacy ONNX exporter), "torch.export", "jit.trace"
    dynamic_axes: dict[int, str]  # input axis -> name, for the axes the exported graph leaves free
    checks: list[ExportCheck]
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=float("nan"))

    def summary(self) -> str:
        """One line: ``ok``/``MISMATCH``, the largest difference, inputs checked, dynamic axes."""
        shapes = ", ".join("x".join(map(str, c.input_shape)) for c in self.checks)
        dyn = ", ".join(self.dynamic_axes.values()) or "none (fixed shape)"
        status = "ok" if self.ok else "MISMATCH"
        failed = [f"{'x'.join(map(str, c.input_shape))}: {c.error}" for c in self.checks if c.error]
        tol = max((c.tolerance for c in self.checks), default=float("nan"))
        line = (f"{self.model} -> {self.format} ({self.exporter}, {self.seconds:.1f} s): {status}: max |diff| "
                f"{self.max_abs_diff:.1e} (tol {tol:.0e}) at {shapes}; dynamic: {dyn}")
        if failed:
            line += "; failed: " + "; ".join(failed)
        return line


# -- helpers ----------------------------------------------------------------------------------------------------


def _axis_names(ndim: int) -> dict[int, str]:
    names = _SPATIAL_NAMES.get(ndim - 2, tuple(f"S{i}" for i in range(ndim - 2)))
    return {0: "batch", **{i + 2: n for i, n in enumerate(names)}}


def second_input(example: torch.Tensor, dynamic_batch: bool, dynamic_spatial: bool, step: int = 32) -> torch.Tensor:
    """Another input for the dynamic-shape check: batch + 1 and every spatial side + ``step`` (once more for the
    last side, so that non-square sizes are covered), where those axes are dynamic."""
    shape = list(example.shape)
    if dynamic_batch:
        shape[0] += 1
    if dynamic_spatial:
        for i in range(2, len(shape)):
            shape[i] += step * (2 if i == len(shape) - 1 else 1)
    gen = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=gen, dtype=example.dtype).to(example.device)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compare(ref: Any, got: Sequence[Any], shape: tuple[int, ...], atol: float, rtol: float) -> ExportCheck:
    ref_leaves = _leaves(ref)
    if len(ref_leaves) != len(got):
        return ExportCheck(shape, float("inf"), atol, f"{len(got)} outputs, PyTorch gives {len(ref_leaves)}")
    diff, scale = 0.0, 0.0
    for r, g in zip(ref_leaves, got):
        g = torch.as_tensor(g).to(r.device)
        if tuple(g.shape) != tuple(r.shape):
            return ExportCheck(shape, float("inf"), atol, f"output shape {tuple(g.shape)}, PyTorch {tuple(r.shape)}")
        if r.numel():
            diff = max(diff, (g.double() - r.double()).abs().max().item())
            scale = max(scale, r.double().abs().max().item())
    return ExportCheck(shape, diff, atol + rtol * scale)


def _model_name(model: nn.Module, name: str | None) -> str:
    return name or getattr(model, "name", None) or type(model).__name__


def _failing_frame(exc: BaseException) -> str:
    """``file:line in function`` of the innermost attnseg frame of ``exc`` (where the model's code broke)."""
    frames = traceback.extract_tb(exc.__traceback__)
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:  # dynamo re-raises; follow the chain
        seen = seen.__cause__ or seen.__context__
        frames = frames + traceback.extract_tb(seen.__traceback__)
    def user_code(filename: str) -> bool:  # not torch, not the standard library, not this module
        f = filename.replace("\\", "/")
        return not ("/site-packages/" in f or "/lib/python" in f or f.endswith("attnseg/export.py") or f[:1] == "<")

    ours = [f for f in frames if user_code(f.filename)]
    if not ours:
        return ""
    f = ([g for g in ours if "/attnseg/" in g.filename.replace("\\", "/")] or ours)[-1]
    path = f.filename.replace("\\", "/")
    path = path[path.rfind("/attnseg/") + 1:] if "/attnseg/" in path else path
    return f"{path}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _short(exc: BaseException, limit: int = 300) -> str:
    """The exception type and the first meaningful line of its message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # the dynamo ONNX exporter wraps the real error; its summary sits at the end ("<class 'X'>: msg")
    summary = [ln for ln in lines if ln.startswith("<class '")]
    text = summary[-1] if summary else (lines[0] if lines else "")
    if summary:  # "<class 'torch...ConversionError'>: msg" -> "ConversionError: msg"
        text = re.sub(r"^<class '(?:[\w.]*\.)?(\w+)'>", r"\1", text)
    op = re.search(r"Error when translating node .*?target=([\w.:]+)", text)
    if op:  # the dynamo exporter has no ONNX translation for an aten op
        text = f"ConversionError: no ONNX translation for {op.group(1)}"
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if not summary and root is not exc:
        rl = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
        text = f"{type(root).__name__}: {rl[0] if rl else ''}"
    elif not summary:
        text = f"{type(exc).__name__}: {text}"
    return text[:limit]


def describe_failure(exc: BaseException) -> str:
    """A short reason for a failed export: the error and, when known, the attnseg line it came from."""
    where = _failing_frame(exc)
    return _short(exc) + (f" [at {where}]" if where else "")


def _clear_attnseg_caches() -> None:
    """Empty every ``functools.lru_cache`` in attnseg's modules.

    Window tables, relative-position indices and the like are cached per size as tensors; a cache filled while
    ``torch.export`` traces holds fake (or symbolic) tensors that break the next eager call, so the caches are
    emptied after every export (and before, so that a trace never reads a stale entry).
    """
    import sys

    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("attnseg") or mod is None:
            continue
        for value in list(vars(mod).values()):
            clear = getattr(value, "cache_clear", None)
            if callable(clear) and hasattr(value, "__wrapped__"):
                clear()


@contextlib.contextmanager
def _tracing(na_backend: str | None) -> Iterator[None]:
    """Export scope: the neighborhood-attention backend, no grad, no warnings, attnseg caches emptied around it."""
    _clear_attnseg_caches()
    try:
        with _na_backend(na_backend), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _clear_attnseg_caches()


@contextlib.contextmanager
def _na_backend(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    from attnseg.ops.functional import use_backend

    with use_backend(name):
        yield


def _dynamic_shapes(example: torch.Tensor, batch: bool, spatial: bool) -> dict[str, dict[int, Any]] | None:
    from torch.export import Dim

    axes: dict[int, Any] = {}
    if batch:
        axes[0] = Dim.DYNAMIC
    if spatial:
        axes.update({i: Dim.DYNAMIC for i in range(2, example.dim())})
    return axes or None


def _trace_input(example: torch.Tensor, batch: bool) -> torch.Tensor:
    """The tensor to trace with: a batch-1 example is repeated to batch 2 when the batch is dynamic, since
    ``torch.export`` specialises axes of size 0 and 1 (and then refuses a dynamic batch)."""
    return example.repeat(2, *([1] * (example.dim() - 1))) if batch and example.shape[0] == 1 else example


def _attempts(dynamic_batch: bool, dynamic_spatial: bool) -> list[tuple[bool, bool]]:
    """(batch, spatial) dynamism to try, most dynamic first, each later one fixing more."""
    out = [(dynamic_batch, dynamic_spatial)]
    if dynamic_spatial:
        out.append((dynamic_batch, False))
    if dynamic_batch:
        out.append((False, False))
    return list(dict.fromkeys(out))


class _TensorOutputs(nn.Module):
    """``model`` with its structured output (a dict or list: HybridGNet's landmarks, MSGA's training outputs) as the
    tuple of its tensors in ``pytree`` order; ONNX graphs and traced TorchScript return tensors only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_leaves(self.model(x)))


def _tensor_outputs(model: nn.Module, example: torch.Tensor, notes: list[str]) -> nn.Module:
    """``model``, or :class:`_TensorOutputs` around it (noted with the output names) when its output is not a
    tensor."""
    with torch.no_grad():
        out = model(example)
    if isinstance(out, torch.Tensor):
        return model
    def name(path: tuple[Any, ...]) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    paths, _ = pytree.tree_flatten_with_path(out)
    kept = [name(path) for path, leaf in paths if isinstance(leaf, torch.Tensor)]
    dropped = [name(path) for path, leaf in paths if not isinstance(leaf, torch.Tensor)]
    notes.append(f"structured output exported as the tuple of its tensors {', '.join(kept)}"
                 + (f" (not exported, not tensors: {', '.join(dropped)})" if dropped else ""))
    return _TensorOutputs(model)


def _forward_arg_name(model: nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[0].name if params else "x"


# -- ONNX -------------------------------------------------------------------------------------------------------


def _onnx_dynamic_axes(path: Path, ndim: int) -> dict[int, str]:
    """The input axes the saved ONNX graph leaves symbolic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    names = _axis_names(ndim)
    return {i: names.get(i, str(i)) for i, d in enumerate(dims) if not d.HasField("dim_value")}


def _run_onnx(path: Path, inputs: list[torch.Tensor], reference: Callable[[torch.Tensor], Any], atol: float,
              rtol: float) -> list[ExportCheck]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    checks = []
    for x in inputs:
        shape = tuple(x.shape)
        try:
            ref = reference(x)
        except Exception as e:  # noqa: BLE001 - the model itself takes only some sizes (e.g. a flattening latent)
            checks.append(ExportCheck(shape, float("inf"), atol, f"the PyTorch model refuses it: {_short(e, 200)}"))
            continue
        try:
            got = session.run(None, {name: x.detach().cpu().numpy()})
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; recorded in the report
            checks.append(ExportCheck(shape, float("inf"), atol, f"onnxruntime: {str(e).splitlines()[0][:200]}"))
            continue
        checks.append(_compare(ref, [torch.from_numpy(g) for g in got], shape, atol, rtol))
    return checks


def export_onnx(
    model: nn.Module, example_input: torch.Tensor, path: str | Path, dynamic_batch: bool = True,
    dynamic_spatial: bool = True, opset: int | None = 18, exporter: str = "auto", na_backend: str | None = "reference",
    name: str | None = None, atol: float = 1e-4, rtol: float = 1e-4, check: bool = True,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and check it with onnxruntime against PyTorch.

    Args:
        model: the module to export; put in eval mode here (and left so).
        example_input: ``[B, C, *spatial]`` tensor the export traces with (and the first check input).
        path: the ``.onnx`` file to write (weights inline; parent folders are created).
        dynamic_batch / dynamic_spatial: ask for a free batch axis / free spatial axes. An axis the model fixes
            (or that cannot be traced symbolically) is fixed in a retry; ``report.dynamic_axes`` says what the
            written graph leaves free and ``report.notes`` why anything was fixed.
        opset: ONNX opset (``None``: the exporter's default).
        exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, torch.export based), ``"torchscript"`` (the
            legacy tracer, deprecated in torch) or ``"auto"`` (dynamo, then the legacy tracer if dynamo fails).
        na_backend: neighborhood-attention backend during export (``"reference"``: plain tensor ops); ``None``
            keeps automatic selection.
        name: model name for messages (default: the class name).
        atol / rtol: a check passes when max |onnx - torch| <= atol + rtol * max |torch|.
        check: run onnxruntime on the example (and a second input when dynamic); False skips it.

    Returns:
        :class:`ExportReport`.

    Raises:
        ExportError: no exporter could write the model; names the model, the error and the attnseg line it came from.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    label = _model_name(model, name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    start = time.perf_counter()
    notes: list[str] = []
    exporters = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    with _tracing(na_backend):
        traced_model = _tensor_outputs(model, example_input, notes)
    arg = _forward_arg_name(traced_model)
    attempts = [(w, b, sp) for w in exporters for b, sp in _attempts(dynamic_batch, dynamic_spatial)]

    def reference(x: torch.Tensor) -> Any:
        with torch.no_grad():
            return model(x)

    last: BaseException | None = None
    skip: set[str] = set()
    for n, (which, batch, spatial) in enumerate(attempts):
        what = _what(batch, spatial)
        if which in skip:
            continue
        try:
            with _tracing(na_backend):
                if which == "dynamo":
                    dyn = _dynamic_shapes(example_input, batch, spatial)
                    torch.onnx.export(traced_model, (_trace_input(example_input, batch),), str(path), dynamo=True,
                                      opset_version=opset, dynamic_shapes={arg: dyn} if dyn else None,
                                      verbose=False, input_names=["input"], external_data=False)
                else:
                    axes = {i: a for i, a in _axis_names(example_input.dim()).items()
                            if (i == 0 and batch) or (i >= 2 and spatial)}
                    torch.onnx.export(traced_model, (example_input,), str(path), dynamo=False, opset_version=opset,
                                      input_names=["input"], dynamic_axes={"input": axes} if axes else None)
        except Exception as e:  # noqa: BLE001 - every exporter failure is reported, the last one raised
            notes.append(f"{which} exporter, {what}: {describe_failure(e)}")
            last = e
            if not _shape_related(e):  # fixing axes will not help: go to the next exporter
                skip.add(which)
            continue
        dyn_axes = _onnx_dynamic_axes(path, example_input.dim())
        checks: list[ExportCheck] = []
        if check:
            inputs = [example_input]
            if dyn_axes:
                inputs.append(second_input(example_input, 0 in dyn_axes, any(i >= 2 for i in dyn_axes)))
            checks = _run_onnx(path, inputs, reference, atol, rtol)
            more = n + 1 < len(attempts) and attempts[n + 1][0] == which
            if dyn_axes and not all(c.ok for c in checks) and more:
                # the graph declares the axes free but bakes in example-size constants: fix them and retry
                bad = next(c for c in checks if not c.ok)
                notes.append(f"{which} exporter, {what}: exported, but onnxruntime at {_shape(bad.input_shape)} "
                             f"gives {bad.error or f'max |diff| {bad.max_abs_diff:.1e}'}; the model fixes those axes")
                continue
        return ExportReport(label, "onnx", path, which, dyn_axes, checks, time.perf_counter() - start, notes)
    raise ExportError(f"{label} cannot be exported to ONNX: " + " | ".join(notes)) from last


_SHAPE_WORDS = ("symint", "symbolic", "guard", "specializ", "constraint", "dynamic", "dim", "shape", "size")


def _shape_related(exc: BaseException) -> bool:
    """Whether an export error may go away with fewer dynamic axes (it mentions shapes, symbols or guards)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = f"{type(seen).__name__} {seen}".lower()
        if "conversionerror" in text or "unsupportedoperator" in text:
            return False
        if any(w in text for w in _SHAPE_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _what(batch: bool, spatial: bool) -> str:
    return ("dynamic batch and spatial size" if batch and spatial else
            "dynamic spatial size" if spatial else "dynamic batch" if batch else "fixed shape")


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# -- torch.export / TorchScript ---------------------------------------------------------------------------------


def export_torch(
    model: nn.Module, example_input: torch.Tensor, path: str | Path, format: str = "torch-export",
    dynamic_batch: bool = True, dynamic_spatial: bool = True, na_backend: str | None = "reference",
    name: str | None = None, atol: float = 1e-4, rtol: float = 1e-4, check: bool = True,
) -> ExportReport:
    """Export ``model`` with ``torch.export`` (``format="torch-export"``, saved by ``torch.export.save``, a ``.pt2``
    file) or TorchScript (``format="torchscript"``, ``torch.jit.trace`` then ``torch.jit.save``), load it back and
    compare with PyTorch on the example input and, where dynamic, on a second input.

    ``torch.export`` follows the same dynamic-shape retries as :func:`export_onnx`. A traced TorchScript module has
    no declared dynamic axes: shapes computed in Python are frozen at the example size, so it is checked at a
    second size too and ``dynamic_axes`` lists the axes that check passed on (empty when it did not).

    Raises:
        ExportError: the model cannot be exported or the saved program cannot be loaded and run.
    """
    if format not in ("torch-export", "torchscript"):
        raise ValueError(f"format must be 'torch-export' or 'torchscript', got {format!r}")
    if format == "torch-export" and not str(path).endswith(".pt2"):
        raise ValueError(f"torch.export.save needs a file name ending in .pt2, got {str(path)!r}")
    label = _model_name(model, name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    start = time.perf_counter()
    notes: list[str] = []
    arg = _forward_arg_name(model)
    names = _axis_names(example_input.dim())
    attempts = _attempts(dynamic_batch, dynamic_spatial) if format == "torch-export" else [
        (dynamic_batch, dynamic_spatial)]
    last: BaseException | None = None
    for n, (batch, spatial) in enumerate(attempts):
        try:
            with _tracing(na_backend):
                if format == "torch-export":
                    dyn = _dynamic_shapes(example_input, batch, spatial)
                    program = torch.export.export(model, (_trace_input(example_input, batch),),
                                                  dynamic_shapes={arg: dyn} if dyn else None)
                    torch.export.save(program, str(path))
                    dyn_axes = _program_dynamic_axes(program, names)
                else:
                    flat = _tensor_outputs(model, example_input, notes)  # one attempt only
                    traced = torch.jit.trace(flat, (example_input,), check_trace=False, strict=False)
                    torch.jit.save(traced, str(path))
                    dyn_axes = {i: a for i, a in names.items() if (i == 0 and batch) or (i >= 2 and spatial)}
        except Exception as e:  # noqa: BLE001 - every failure is reported, the last one raised
            kind = "torch.export" if format == "torch-export" else "torch.jit.trace"
            notes.append(f"{kind}, {_what(batch, spatial)}: {describe_failure(e)}")
            last = e
            continue
        checks = _check_torch(model, path, format, example_input, dyn_axes, na_backend, label, atol, rtol) if check \
            else []
        if dyn_axes and not all(c.ok for c in checks):
            bad = next(c for c in checks if not c.ok)
            why = bad.error or f"max |diff| {bad.max_abs_diff:.1e}"
            if format == "torchscript" and checks[0].ok:
                notes.append(f"the traced module does not generalise: at {_shape(bad.input_shape)} it gives {why}; "
                             f"use it at {_shape(example_input.shape)} only")
                dyn_axes, checks = {}, checks[:1]
            elif n + 1 < len(attempts):
                notes.append(f"torch.export, {_what(batch, spatial)}: exported, but at {_shape(bad.input_shape)} the "
                             f"program gives {why}; the model fixes those axes")
                continue
        exporter = "torch.export" if format == "torch-export" else "jit.trace"
        return ExportReport(label, format, path, exporter, dyn_axes, checks, time.perf_counter() - start, notes)
    raise ExportError(f"{label} cannot be exported to {format}: " + " | ".join(notes)) from last


def _check_torch(model: nn.Module, path: Path, format: str, example: torch.Tensor, dyn_axes: dict[int, str],
                 na_backend: str | None, label: str, atol: float, rtol: float) -> list[ExportCheck]:
    """Load the saved program and compare it with ``model`` on ``example`` (and a second input when dynamic)."""
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.export.load(str(path)).module() if format == "torch-export" else torch.jit.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{label}: the saved {format} program {path} does not load: {describe_failure(e)}") from e
    inputs = [example]
    if dyn_axes:
        inputs.append(second_input(example, 0 in dyn_axes, any(i >= 2 for i in dyn_axes)))
    checks = []
    for x in inputs:
        with torch.no_grad():
            try:
                ref = model(x)
            except Exception as e:  # noqa: BLE001 - the model itself takes only some sizes
                checks.append(ExportCheck(tuple(x.shape), float("inf"), atol,
                                          f"the PyTorch model refuses it: {_short(e, 200)}"))
                continue
            try:
                got = _leaves(loaded(x))
            except Exception as e:  # noqa: BLE001 - a program that cannot run this shape is a failed check
                checks.append(ExportCheck(tuple(x.shape), float("inf"), atol, _short(e, 200)))
                continue
        checks.append(_compare(ref, got, tuple(x.shape), atol, rtol))
    return checks


def _program_dynamic_axes(program: Any, names: dict[int, str]) -> dict[int, str]:
    """Input axes of an ExportedProgram's first user input that are symbolic."""
    from torch.export.graph_signature import InputKind

    user = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    for node in program.graph.nodes:
        if node.op == "placeholder" and user and node.name == user[0]:
            val = node.meta.get("val")
            if val is None:
                return {}
            return {i: names.get(i, str(i)) for i, s in enumerate(val.shape) if not isinstance(s, int)}
    return {}
