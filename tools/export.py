#!/usr/bin/env python
"""Export an attnseg model to ONNX, torch.export (.pt2) or TorchScript, and check it against PyTorch.

Examples::

    python tools/export.py --config configs/demo/mambaout_femto_unetr_synthetic2d.yaml \\
        --checkpoint work_dirs/mambaout_femto_unetr_synthetic2d/last.ckpt --out model.onnx
    python tools/export.py --backbone mambaout_femto --input-size 224 --out mambaout_femto.onnx
    python tools/export.py --model test_dconnnet --format torch-export --out dconnnet.pt2
    python tools/export.py --all --doc docs/export.md           # the support table (resumable: --cache)

The check result (max |diff| against PyTorch on the example input and, when the batch or spatial axes are
dynamic, on a second input of another size) is printed; the exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from attnseg.cli.common import add_config_args, run_main  # noqa: E402
from attnseg.errors import ConfigError  # noqa: E402
from attnseg.export import FORMATS, ExportError, describe_failure, export_onnx, export_torch  # noqa: E402

SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2", "torchscript": ".ts"}

# What `--all` exports: the smallest real variant of every backbone family (variants of one family share their
# code, so they export alike), the whole registered models and a few backbone + head pairs.
# (kind, name, in_chans, input size); kind "backbone" | "model" | "pair:<head>".
SUPPORT_MATRIX: list[tuple[str, str, int, tuple[int, ...]]] = [
    ("backbone", "resnet18", 3, (64, 64)),
    ("backbone", "mambaout_femto", 3, (64, 64)),
    ("backbone", "nat_mini", 3, (64, 64)),
    ("pair:unetr", "mambaout_femto", 3, (64, 64)),
    ("model", "test_dconnnet", 3, (64, 64)),
    ("backbone", "dinat_mini", 3, (64, 64)),
    ("backbone", "biformer_tiny", 3, (64, 64)),
    ("backbone", "transnext_micro", 3, (64, 64)),
    ("backbone", "overlock_xt", 3, (64, 64)),
    ("backbone", "sparsifiner_deit_tiny", 3, (64, 64)),
    ("backbone", "karat_vit_tiny", 3, (64, 64)),
    ("backbone", "swin_unet_encoder_tiny", 3, (64, 64)),
    ("backbone", "swinvit_tiny", 1, (32, 32, 32)),
    ("backbone", "halonet_h0", 3, (64, 64)),
    ("model", "test_msga", 1, (64, 64)),
    ("model", "test_att_swin_unet", 3, (64, 64)),
    ("model", "test_hybridgnet_2igsc", 1, (128, 128)),  # its flattening latent needs exactly 128
    ("pair:unetr", "nat_mini", 3, (64, 64)),
    ("backbone", "nat_isotropic_small", 3, (64, 64)),
    ("backbone", "vitrpb_small", 3, (64, 64)),
    ("backbone", "hybridgnet_encoder", 1, (64, 64)),
]


# -- building ---------------------------------------------------------------------------------------------------


def build_backbone(name: str, in_chans: int | None = None) -> nn.Module:
    """A registered backbone by name (classification forward), random weights."""
    from attnseg.registry import BACKBONES

    kwargs = {} if in_chans is None else {"in_chans": in_chans}
    return BACKBONES.get(name)(**kwargs)


def build_registered_model(name: str, in_chans: int | None = None) -> nn.Module:
    """A whole registered model (``attnseg.registry.MODELS``: swin_unetr, test_dconnnet, ...)."""
    from attnseg.registry import MODELS

    kwargs = {} if in_chans is None else {"in_chans": in_chans}
    return MODELS.get(name)(**kwargs)


def build_pair(backbone: str, head: str, in_chans: int, spatial_dims: int = 2, num_classes: int = 3) -> nn.Module:
    """A Segmentor of ``backbone`` + ``head`` through the config builder (what a training config gives)."""
    from attnseg.models.builder import build_model

    return build_model({"backbone": {"name": backbone}, "head": {"name": head}, "num_classes": num_classes,
                        "in_chans": in_chans, "spatial_dims": spatial_dims}, task="segmentation")


def build_from_config(config: str | None, checkpoint: str | None, overrides: Sequence[str]) -> tuple[nn.Module, Any]:
    """The model of an experiment config, with the checkpoint's weights loaded when one is given."""
    from attnseg.config import load_config
    from attnseg.models.builder import build_model

    if config is None:
        raise ConfigError("--config is needed with --checkpoint")
    cfg = load_config(config, overrides)
    model = build_model(cfg)
    if checkpoint is not None:
        from attnseg.checkpoint import load_pretrained

        print(f"loaded {checkpoint}: {load_pretrained(model, checkpoint)}")
    return model, cfg


def _config_input_size(cfg: Any) -> tuple[int, ...] | None:
    """The training crop / image size an experiment config records, if any."""
    dataset = getattr(getattr(cfg, "data", None), "dataset", None)
    for key in ("crop_size", "image_size", "slice_size", "spatial_size", "roi_size"):
        value = getattr(dataset, key, None) if dataset is not None else None
        if value is None and isinstance(dataset, dict):
            value = dataset.get(key)
        if value:
            return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    roi = getattr(getattr(cfg, "evaluation", None), "roi_size", None)  # 3D: the sliding-window size
    return tuple(int(v) for v in roi) if roi else None


def example_input(in_chans: int, size: Sequence[int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded ``[batch, in_chans, *size]`` normal tensor."""
    return torch.randn(batch, in_chans, *size, generator=torch.Generator().manual_seed(seed))


def export(model: nn.Module, x: torch.Tensor, out: Path, fmt: str, dynamic: bool = True, **kwargs: Any) -> Any:
    """Dispatch to :func:`attnseg.export.export_onnx` or :func:`attnseg.export.export_torch`."""
    if fmt == "onnx":
        return export_onnx(model, x, out, dynamic_batch=dynamic, dynamic_spatial=dynamic, **kwargs)
    kwargs.pop("opset", None)
    kwargs.pop("exporter", None)
    return export_torch(model, x, out, format=fmt, dynamic_batch=dynamic, dynamic_spatial=dynamic, **kwargs)


# -- the support table ------------------------------------------------------------------------------------------


def _entry_label(kind: str, name: str) -> str:
    return f"{name} + {kind.split(':', 1)[1]}" if kind.startswith("pair:") else name


def _run_child(label: str, fmt: str, cache: Path, timeout: float) -> None:
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--all", "--exact", label, "--formats", fmt,
           "--cache", str(cache), "--timeout", "0"]
    try:
        subprocess.run(cmd, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        pass


def run_matrix(formats: Sequence[str], cache: Path, work: Path, only: Sequence[str] = (),
               timeout: float | None = None, exact: str | None = None) -> dict[str, dict[str, Any]]:
    """Export every :data:`SUPPORT_MATRIX` entry in ``formats``; results go to ``cache`` (JSON) after each export,
    and entries already there are skipped, so an interrupted run resumes. ``only``: substrings of names to run;
    ``exact``: one entry's label. ``timeout``: run each export in a child process stopped after that many seconds
    (recorded as not finished)."""
    results: dict[str, dict[str, Any]] = json.loads(cache.read_text()) if cache.exists() else {}
    for kind, name, in_chans, size in SUPPORT_MATRIX:
        label = _entry_label(kind, name)
        if (only and not any(o in label for o in only)) or (exact is not None and label != exact):
            continue
        for fmt in formats:
            key = f"{label}|{fmt}"
            if key in results:
                continue
            if timeout is not None:  # run it in a child process that gives up after `timeout` seconds
                cache.parent.mkdir(parents=True, exist_ok=True)
                _run_child(label, fmt, cache, timeout)
                results = json.loads(cache.read_text()) if cache.exists() else {}
                if key not in results:
                    results[key] = {"model": label, "format": fmt, "input": [1, in_chans, *size], "ok": False,
                                    "error": f"not finished within {timeout:.0f} s on 2 CPU cores (export time)",
                                    "seconds": timeout}
                    cache.write_text(json.dumps(results, indent=1, sort_keys=True))
                row = results[key]
                print(f"{key}: {row.get('summary') or 'FAILS: ' + row['error']}", flush=True)
                continue
            t0 = time.perf_counter()
            row: dict[str, Any] = {"model": label, "format": fmt, "input": [1, in_chans, *size]}
            try:
                if kind == "backbone":
                    model = build_backbone(name, in_chans)
                elif kind == "model":
                    model = build_registered_model(name, in_chans)
                else:
                    model = build_pair(name, kind.split(":", 1)[1], in_chans, spatial_dims=len(size))
                report = export(model, example_input(in_chans, size), work / f"{label.replace(' + ', '_')}"
                                f"{SUFFIX[fmt]}", fmt, name=label)
                row.update(ok=report.ok, max_abs_diff=report.max_abs_diff, dynamic=list(report.dynamic_axes.values()),
                           exporter=report.exporter, notes=report.notes, summary=report.summary())
            except ExportError as e:
                row.update(ok=False, error=str(e).split(": ", 1)[-1][:400])
            except Exception as e:  # noqa: BLE001 - building or checking failed; recorded in the table
                row.update(ok=False, error=describe_failure(e)[:400])
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results = json.loads(cache.read_text()) if cache.exists() else {}
            results[key] = row
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(results, indent=1, sort_keys=True))
            print(f"{key}: {row.get('summary') or 'FAILS: ' + row['error']}", flush=True)
    return results


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if "error" in row:
        return "timeout" if row["error"].startswith("not finished") else "fails"
    if not row["ok"]:
        return f"mismatch ({row['max_abs_diff']:.0e})"
    dyn = row["dynamic"]
    axes = "B,H,W" if {"batch", "H", "W"} <= set(dyn) else ("B,D,H,W" if "D" in dyn and "batch" in dyn else
                                                           ",".join("B" if a == "batch" else a for a in dyn))
    return f"ok {row['max_abs_diff']:.0e}, dyn {axes or 'none'}, {row['seconds']:.0f} s"


def write_doc(results: dict[str, dict[str, Any]], formats: Sequence[str], doc: Path) -> None:
    """Write the how-to and the model x format table of ``results`` to ``doc``."""
    rows = []
    reasons = []
    for kind, name, in_chans, size in SUPPORT_MATRIX:
        label = _entry_label(kind, name)
        cells = [_cell(results.get(f"{label}|{f}")) for f in formats]
        if all(c == "not run" for c in cells):
            continue
        what = {"backbone": "backbone", "model": "model"}.get(kind, "segmentor")
        rows.append(f"| `{label}` | {what} | {'x'.join(map(str, (1, in_chans, *size)))} | " + " | ".join(cells) + " |")
        for f in formats:
            row = results.get(f"{label}|{f}")
            if row is None:
                continue
            if "error" in row:
                reasons.append(f"- `{label}`, {f}: {row['error']}")
            elif row.get("notes"):
                reasons.append(f"- `{label}`, {f}: " + "; ".join(n[:300] for n in row["notes"]))
    header = "| model | kind | input | " + " | ".join(formats) + " |\n|---|---|---|" + "---|" * len(formats)
    text = DOC_TEMPLATE.format(table=header + "\n" + "\n".join(rows),
                               reasons="\n".join(reasons) or "- none",
                               torch=torch.__version__, onnx_versions=_onnx_versions())
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def _onnx_versions() -> str:
    out = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            out.append(f"{mod} (not installed)")
    return ", ".join(out)


DOC_TEMPLATE = """# Exporting models (ONNX, torch.export, TorchScript)

`tools/export.py` (library: `attnseg.export`) writes a model as ONNX, as a `torch.export` program (`.pt2`) or as
traced TorchScript, loads the result back (onnxruntime on CPU, `torch.export.load`, `torch.jit.load`) and compares
it with PyTorch on the example input and, when the batch or spatial axes are dynamic, on a second input of another
batch and spatial size (batch + 1, height + 32, width + 64). A check passes when
max |diff| <= 1e-4 + 1e-4 * max |output|.

```bash
pip install "attnseg[onnx]"   # onnx, onnxscript, onnxruntime
# a trained experiment (weights from the Lightning checkpoint or a model in attnseg's format)
python tools/export.py --config configs/demo/mambaout_femto_unetr_synthetic2d.yaml \\
    --checkpoint work_dirs/mambaout_femto_unetr_synthetic2d/last.ckpt --input-size 64 --out model.onnx
# a bare backbone or a registered whole model, random weights unless --checkpoint
python tools/export.py --backbone mambaout_femto --input-size 224 --out mambaout_femto.onnx
python tools/export.py --model test_dconnnet --format torch-export --out dconnnet.pt2
python tools/export.py --backbone nat_mini --format torchscript --no-dynamic --out nat_mini.ts
```

```python
from attnseg.export import export_onnx, export_torch
report = export_onnx(model.eval(), torch.randn(1, 3, 224, 224), "model.onnx")  # dynamic batch + H, W if possible
print(report.summary(), report.dynamic_axes, report.notes)
report = export_torch(model, x, "model.pt2")                                   # torch.export.save / load
```

How it works:

- ONNX goes through `torch.onnx.export(..., dynamo=True)` with `dynamic_shapes` of `Dim.DYNAMIC` on the batch and
  spatial axes (a batch-1 example is traced at batch 2, since `torch.export` specialises size-1 axes). If that fails,
  or the graph declares the axes free but the check at another size fails (the model turned the size into constants,
  e.g. window tables or a padding amount built from `int(h)`), the export is retried with fixed spatial size, then a
  fixed batch; then (with `--exporter auto`, the default) with the legacy TorchScript-based exporter.
  `report.dynamic_axes` is read back from the written graph; `report.notes` lists every retry and why.
- Neighborhood attention exports through the `reference` backend (`--na-backend`, default `reference`): plain tensor
  ops (dense mask + softmax attention; O(N^2) memory in the number of tokens, so large inputs need a fixed size
  and memory). The window tables depend on the feature-map size, so NA models export at a fixed spatial size.
- Caches of attnseg (window tables, relative-position indices) are emptied before and after each export: a cache
  filled while tracing holds fake tensors that would break the next eager call.
- A failure raises `attnseg.export.ExportError` naming the model, each attempt, the error and the attnseg source line
  it came from (`[at attnseg/ops/cpu.py:194 in _axis_tiles: ...]`).
- TorchScript is `torch.jit.trace` (no model here scripts): shapes computed in Python are frozen at the example size;
  the second-size check says whether the traced module generalises, else it is for the example size only.
- Traced, Sparsifiner attends through its masked formulation (sparse CSR tensors do not trace) and KArAt through
  plain ops (its memory-saving autograd function does not trace); both give the eager outputs.
- Some models make discrete choices from float values, and onnxruntime, whose arithmetic differs from PyTorch's in
  the last bits, can choose otherwise: Sparsifiner's top-k keys per query where two scores (nearly) tie (random
  weights leave many exact zeros in its low-rank scores), and HybridGNet's RoIAlign lookups, whose adaptive sample
  count `ceil(box width)` is 4 instead of 3 for the 1-2% of boxes whose float32 width `(x + 2) - (x - 1)` rounds
  above 3 (as in the official code). A `mismatch` below can be such an input (other inputs and seeds tried matched
  to 1e-6); compare on your own data before relying on it.
- Structured outputs (a dict or list: HybridGNet's landmarks, the Swin encoders' pyramids) export to ONNX and
  TorchScript as the tuple of their tensors in order (the notes name them); non-tensor entries are left out.
  `torch.export` keeps the structure.

## Which models export

Generated by `python tools/export.py --all --doc docs/export.md` (torch {torch}; {onnx_versions}; CPU; random
weights; the smallest real variant of each family: variants of one family share their code and export alike).
Cells: `ok <max |diff|>, dyn <axes left free>, <seconds>` (B batch, H/W/D spatial; seconds: export + checks,
retries included, on 2 CPU cores), `fails` (reason below), `timeout` (the export did not finish within the
limit per export, `--timeout`), `mismatch` (exported, but the output differs), `not run`.

{table}

### Notes and failure reasons

{reasons}
"""


# -- command line -----------------------------------------------------------------------------------------------


def _parse_size(values: Sequence[int] | None, spatial_dims: int, default: Sequence[int]) -> tuple[int, ...]:
    if not values:
        return tuple(default)
    if len(values) == 1:
        return (values[0],) * spatial_dims
    if len(values) != spatial_dims:
        raise ConfigError(f"--input-size takes 1 or {spatial_dims} values for a {spatial_dims}D model, got {values}")
    return tuple(values)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="attnseg-export", description=__doc__.split("\n")[0])
    add_config_args(parser, positional=False, required=False)
    parser.add_argument("--checkpoint", default=None, help="weights to load (training .ckpt, model file or folder)")
    parser.add_argument("--backbone", default=None, help="a registered backbone (classification forward)")
    parser.add_argument("--model", default=None, help="a registered whole model (attnseg.registry.MODELS)")
    parser.add_argument("--all", action="store_true", help="export the support matrix and write --doc")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="--all: formats")
    parser.add_argument("--only", nargs="*", default=[], help="--all: only entries whose name contains one of these")
    parser.add_argument("--exact", default=None, help=argparse.SUPPRESS)  # one entry (the child process of --all)
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="--all: seconds per export before it is recorded as not finished (0: no limit)")
    parser.add_argument("--doc", default=str(REPO / "docs" / "export.md"), help="--all: the table to write")
    parser.add_argument("--cache", default=str(REPO / "work_dirs" / "export" / "results.json"),
                        help="--all: results so far (resumes from it)")
    parser.add_argument("--input-size", type=int, nargs="+", default=None, metavar="N",
                        help="spatial size (one value: square/cube); default from the config or the model's cfg")
    parser.add_argument("--batch-size", type=int, default=1, help="example batch (default 1)")
    parser.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")
    parser.add_argument("--out", default=None, help="output file (.onnx, .pt2, .ts)")
    parser.add_argument("--no-dynamic", dest="dynamic", action="store_false", help="fixed batch and spatial size")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                        help="ONNX exporter (auto: dynamo, then the legacy TorchScript exporter)")
    parser.add_argument("--na-backend", default="reference",
                        help="neighborhood-attention backend while exporting ('auto' for automatic selection)")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    na_backend = None if args.na_backend == "auto" else args.na_backend

    if args.all:
        results = run_matrix(args.formats, Path(args.cache), Path(args.cache).parent / "models", args.only,
                             timeout=args.timeout or None, exact=args.exact)
        if args.exact is not None:  # a child: the parent writes the doc
            return 0
        write_doc(results, FORMATS, Path(args.doc))
        print(f"wrote {args.doc}")
        return 0
    sources = [s for s in (args.config, args.backbone, args.model) if s]
    if len(sources) != 1:
        raise ConfigError("give exactly one of --config, --backbone, --model (or --all)")
    if args.out is None:
        raise ConfigError("--out is needed")

    spatial_dims, in_chans, default_size = 2, args.in_chans, (224, 224)
    if args.config:
        model, cfg = build_from_config(args.config, args.checkpoint, args.overrides)
        spatial_dims = int(getattr(cfg.model, "spatial_dims", 2) or 2)
        in_chans = in_chans or int(cfg.model.in_chans)
        default_size = _config_input_size(cfg) or (224,) * spatial_dims
        label = Path(args.config).stem
    else:
        name = args.backbone or args.model
        if args.backbone:
            model = build_backbone(name, in_chans)
        else:
            model = build_registered_model(name, in_chans)
        try:
            from attnseg.backbones import pretrained_cfg

            cfg_size = tuple(pretrained_cfg(name)["input_size"])
            spatial_dims, default_size = len(cfg_size) - 1, cfg_size[1:]
            in_chans = in_chans or int(cfg_size[0])
        except KeyError:
            first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
            in_chans = in_chans or (first.in_channels if first is not None else 3)
            if isinstance(first, nn.Conv3d):
                spatial_dims, default_size = 3, (96, 96, 96)
        if args.checkpoint:
            from attnseg.checkpoint import load_pretrained

            print(f"loaded {args.checkpoint}: {load_pretrained(model, args.checkpoint)}")
        label = name
    size = _parse_size(args.input_size, spatial_dims, default_size)
    x = example_input(in_chans, size, args.batch_size)
    report = export(model, x, Path(args.out), args.format, dynamic=args.dynamic, opset=args.opset,
                    exporter=args.exporter, na_backend=na_backend, name=label, atol=args.atol)
    print(report.summary())
    for note in report.notes:
        print(f"  note: {note}")
    print(f"wrote {report.path}")
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors print one line and exit 2 (see :func:`attnseg.cli.common.run_main`)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
