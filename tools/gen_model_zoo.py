"""Generate ``docs/model_zoo.md``: every backbone, head and published model with its size, cost and provenance.

Per registered backbone variant (the ``test_*`` CI variants are skipped), per published model (``MODELS``) and per
head: parameters, GFLOPs at the standard resolution, the official checkpoints the converter loads, the parity
fixtures the tests compare against (with their tolerance) and, with ``--throughput``, CPU images/s at batch 1.

Sources:

- standard resolution, official checkpoint names: ``attnseg.backbones.pretrained_cfg`` (each family's
  ``default_cfgs``); for the published whole models, :data:`MODEL_INPUTS` below (the resolution of the paper /
  shipped config) and the family converter's docstring;
- parity: :data:`PARITY` maps variants to fixture files of ``shared/fixtures/parity`` (or ``tests/fixtures``); the
  tolerance is read from the fixture itself and the test files are found by searching ``tests/`` for the file name,
  so a row never names a test that does not use its fixture;
- GFLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` at batch 1 (a multiply-add counts 2 FLOPs; only matmuls
  and convolutions are counted), with ``scaled_dot_product_attention`` forced onto its math kernel (the fused CPU
  kernel is not counted at all) and neighborhood attention counted analytically (see :func:`_analytic_na`). Models
  are built and run on the meta device for counting when they can be (no weights initialised, no arithmetic), else
  on the CPU; both give the same count;
- heads: each registered head on one fixed encoder (:data:`HEAD_ENCODER`, MambaOut-femto at 224, 2 classes) so that
  heads compare with each other; the published whole models give each head on its own encoder.

Measured rows are stored in the document as a JSON comment (the format of ``tools/bench_models.py``), so
``--families nat --throughput`` reruns one family and keeps every other row; a rerun without ``--throughput`` keeps
the stored images/s of the rows it regenerates.

Usage::

    python tools/gen_model_zoo.py                          # all families, no throughput (params, GFLOPs, ...)
    python tools/gen_model_zoo.py --throughput --families nat heads
    python tools/gen_model_zoo.py --throughput --max-gflops 12     # time only models up to 12 GFLOPs
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from bench_models import ROWS_MARK, merge_rows, stored_rows  # noqa: E402  (the models suite's row storage)

DOC = REPO / "docs" / "model_zoo.md"
PARITY_DIRS = (REPO / "shared" / "fixtures" / "parity", REPO.parent / "shared" / "fixtures" / "parity",
               REPO / "tests" / "fixtures")

# Published whole models: input (C, *S) of the paper / the shipped config, and the converter family.
MODEL_INPUTS: dict[str, tuple[int, ...]] = {
    "att_swin_unet_tiny": (3, 224, 224),  # Swin-Unet's fixed 224 input (configs/att_swin_unet)
    "dconnnet_resnet34": (3, 224, 320),  # ISIC resized to 224x320 (configs/connectivity/dconnnet_resnet34_isic_binary)
    "msga_resnext101": (1, 256, 256),  # CHAOS MRI at 256 (configs/msga/msga_resnext101_chaos_folder2d)
    "hybridgnet_2igsc": (1, 1024, 1024),  # chest X-rays at 1024 (configs/hybridgnet)
    "swin_unetr": (1, 96, 96, 96),  # BTCV 96^3 patches (configs/swin_unetr/swin_unetr_base_btcv)
    "swin_unetr_v2": (1, 96, 96, 96),
}
MODEL_CONVERTER = {"att_swin_unet_tiny": "att_swin_unet", "dconnnet_resnet34": "dconnnet",
                   "msga_resnext101": "msga", "hybridgnet_2igsc": "hybridgnet", "swin_unetr": "swin_unetr",
                   "swin_unetr_v2": "swin_unetr"}

# Heads measured on one fixed small encoder (MambaOut-femto, 3x224x224, 2 classes) so their costs compare; the
# heads' own published encoders are the MODELS rows. Options as in the shipped configs.
HEAD_ENCODER = "mambaout_femto"
HEAD_INPUT = (3, 224, 224)
HEAD_KWARGS: dict[str, dict[str, Any]] = {
    "unetr": {},
    "connectivity": {"inner": {"name": "unetr"}},
    "dconnnet": {},
    "msga": {},
    "hybridgnet": {"template": "chest_xray:LH", "latent": "avgpool", "input_size": None, "latent_dim": 64, "K": 6},
    "att_swin_unet": {},
}
HEAD_CLASSES = {"hybridgnet": 3}  # the chest_xray:LH template's labels
HEAD_MODEL = {"unetr": "swin_unetr", "dconnnet": "dconnnet_resnet34", "msga": "msga_resnext101",
              "hybridgnet": "hybridgnet_2igsc", "att_swin_unet": "att_swin_unet_tiny"}

# Parity: (pattern on the registered name, fixture file). Test files and tolerances are derived, not written here.
PARITY: list[tuple[str, str]] = [
    (r"^biformer_", "biformer_cls_tiny_cfg.pt"), (r"^biformer_", "biformer_mm_autopad_odd.pt"),
    (r"^(halonet|sehalonet|eca_halonext|haloregnetz)", "halonet_tiny_cfg.pt"),
    (r"^mambaout_", "mambaout_tiny_cfg.pt"),
    (r"^nat_(mini|tiny|small|base)$", "nat_tiny_cfg.pt"),
    (r"^dinat_(mini|tiny|small|base|large)", "dinat_tiny_cfg.pt"),
    (r"^dinat_s_", "dinat_s_tiny_cfg.pt"),
    (r"isotropic|^vitrpb_", "nat_isotropic_official.pt"),
    (r"^overlock_[a-z]+$", "overlock_cls_tiny_cfg.pt"), (r"^overlock_[a-z]+$", "overlock_seg_tiny_cfg.pt"),
    (r"^overlock_[a-z]+$", "overlock_det_tiny_cfg.pt"), (r"^overlock_.*_reparam$", "overlock_cls_tiny_cfg_reparam.pt"),
    (r"^transnext_", "transnext_cls_tiny_cfg.pt"), (r"^transnext_", "transnext_dense_tiny_cfg.pt"),
    (r"^transnext_", "transnext_cls_fixedpool_cfg.pt"),
    (r"^sparsifiner_", "sparsifiner_tiny_cfg.pt"),
    (r"^swinvit_|^swin_unetr$|^unetr$", "swin_unetr_3d_fs12.pt"),
    (r"^swinvit_|^swin_unetr$", "swin_unetr_3d_fs12_legacy_merge.pt"), (r"^swin_unetr$|^unetr$", "swin_unetr_2d_fs12.pt"), (r"^swin_unetr_v2$", "swin_unetr_2d_fs12_v2.pt"),
    (r"^swin_unet_encoder_|^att_swin_unet", "att_swin_unet_small.pt"),
    (r"^att_swin_unet$", "att_swin_unet_cca_block.pt"),
    (r"^hybridgnet", "hybridgnet_doubleskip_128.pt"),
    (r"^dconnnet", "dconnnet_model.pt"), (r"^connectivity$", "connectivity_ops.pt"),
    (r"^msga", "msga_daf_stack.pt"), (r"^msga$", "msga_modules.pt"),
]
# Families checked against a reference library rather than a fixture file.
REFERENCE_TESTS = {
    "resnet": ("torchvision / timm with the same weights", "tests/backbones/test_resnet.py"),
    "karat": ("none: the official code is not public (implemented from the paper, KARAT_NOTE.md)", ""),
}

FAMILY_ORDER = ["resnet", "halonet", "biformer", "nat", "mambaout", "transnext", "overlock", "sparsifiner", "karat",
                "swin_unetr", "att_swin_unet", "hybridgnet", "models", "heads"]


# -- measurements --------------------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors once)."""
    return sum(p.numel() for p in model.parameters())


def _na_flops(query: torch.Tensor, value: torch.Tensor, kernel: tuple[int, ...],
              extra: torch.Tensor | None) -> int:
    """Analytic FLOPs of fused neighborhood attention: every query attends ``prod(kernel)`` keys (+ the extra ones);
    logits ``2 * d`` and weighted sum ``2 * d_v`` FLOPs per (query, key) pair, per head."""
    batch, *spatial, heads, dim = query.shape
    keys = math.prod(kernel) + (extra.shape[1] if extra is not None else 0)
    return 2 * batch * heads * math.prod(spatial) * keys * (dim + value.shape[-1])


@contextlib.contextmanager
def _analytic_na(counter: FlopCounterMode, state: dict[str, Any]) -> Iterator[None]:
    """Count neighborhood attention (``attnseg.ops``: fused, and the unfused qk / av) analytically in ``counter``.

    What a backend executes differs from the op's own work: the CPU backend runs the fused op as tiled GEMMs over
    the box of keys a tile of queries covers (more than ``prod(kernel)`` keys per query), and backends differ among
    themselves. Each call is wrapped: what the counter saw during the call is replaced by the analytic count
    (``state["correction"]`` accumulates the difference, ``state["calls"]`` counts the calls): per (query, key)
    pair and head, ``2 * d`` FLOPs for a logit and ``2 * d_v`` for the weighted sum. On the meta device the op is
    not run (an uninitialised output of its shape is returned). Strided or causal calls set
    ``state["approximate"]`` (the formula then overstates the keys).
    """
    import attnseg.ops.functional as functional
    import attnseg.ops.modules as modules

    originals = {n: getattr(functional, n) for n in ("_na_fused", "_na_qk", "_na_av")}

    def account(before: int, flops: int, stride: tuple[int, ...], causal: tuple[bool, ...]) -> None:
        if any(s != 1 for s in stride) or any(causal):
            state["approximate"] = True
        state["correction"] += flops - (counter.get_total_flops() - before)
        state["calls"] += 1

    def fused(ndim: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: Any,
              dilation: Any, stride: Any, is_causal: Any, *rest: Any) -> Any:
        # rest: rpb, scale, additional_keys, additional_values, return_lse, backend, mode
        before = counter.get_total_flops()
        if query.is_meta:  # the backends allocate on the CPU; on meta only the output shapes matter
            out = query.new_empty(*query.shape[:-1], value.shape[-1])
            out = (out, query.new_empty(query.shape[:-1])) if rest[4] else out
        else:
            out = originals["_na_fused"](ndim, query, key, value, kernel_size, dilation, stride, is_causal, *rest)
        p = functional.normalize_params(query.shape[1:-2], kernel_size, dilation, stride, is_causal, rest[-1])
        account(before, _na_flops(query, value, p.kernel, rest[2]), p.stride, p.causal)
        return out

    def qk(ndim: int, query: torch.Tensor, key: torch.Tensor, kernel_size: Any, dilation: Any, rpb: Any,
           is_causal: Any, backend: Any, mode: str) -> Any:
        before = counter.get_total_flops()  # query, key: [B, heads, *S, D] -> [B, heads, *S, K]
        p = functional.normalize_params(query.shape[2:-1], kernel_size, dilation, 1, is_causal, mode)
        if query.is_meta:
            out = query.new_empty(*query.shape[:-1], math.prod(p.kernel))
        else:
            out = originals["_na_qk"](ndim, query, key, kernel_size, dilation, rpb, is_causal, backend, mode)
        account(before, 2 * query[..., 0].numel() * math.prod(p.kernel) * query.shape[-1], p.stride, p.causal)
        return out

    def av(ndim: int, attn: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any, is_causal: Any,
           backend: Any, mode: str) -> Any:
        before = counter.get_total_flops()  # attn [B, heads, *S, K], value [B, heads, *S, Dv] -> [B, heads, *S, Dv]
        p = functional.normalize_params(value.shape[2:-1], kernel_size, dilation, 1, is_causal, mode)
        if value.is_meta:
            out = value.new_empty(value.shape)
        else:
            out = originals["_na_av"](ndim, attn, value, kernel_size, dilation, is_causal, backend, mode)
        account(before, 2 * attn.numel() * value.shape[-1], p.stride, p.causal)
        return out

    wrapped = {"_na_fused": fused, "_na_qk": qk, "_na_av": av}
    for module in (functional, modules):
        for name, fn in wrapped.items():
            setattr(module, name, fn)
    try:
        yield
    finally:
        for module in (functional, modules):
            for name, fn in originals.items():
                setattr(module, name, fn)


def count_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, Any]]:
    """FLOPs of ``model(x)`` (eval, inference mode): ``(total, info)``. ``model`` and ``x`` may be on the meta
    device (no arithmetic is done then; fused neighborhood attention returns uninitialised outputs of its shape).

    ``info``: ``modules`` (FLOPs per module name as FlopCounterMode reports them, without the neighborhood
    correction), ``na_calls`` (fused neighborhood-attention calls counted analytically), ``na_approximate``.
    """
    state: dict[str, Any] = {"correction": 0, "calls": 0, "approximate": False}
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), _analytic_na(counter, state), torch.inference_mode():
        model(x)
    modules = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() + state["correction"], {"modules": modules, "na_calls": state["calls"],
                                                             "na_approximate": state["approximate"]}


def instantiate(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device (no weights initialised) when it builds there, else on the CPU."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # construction with data-dependent steps (e.g. torch.nonzero on a graph template)
        return build()


def measure_flops(build: Callable[[], nn.Module], size: tuple[int, ...]) -> tuple[int, dict[str, Any]]:
    """:func:`count_flops` of ``build()`` on a batch-1 input of ``size``: on the meta device (fast, no weights
    initialised) when the model runs there, else on the CPU (``info["device"]`` says which)."""
    try:
        model = instantiate(build).eval()
        x = torch.empty(1, *size, device="meta") if next(model.parameters()).is_meta else torch.randn(1, *size)
        flops, info = count_flops(model, x)
        info["device"] = x.device.type
    except Exception:  # data-dependent control flow (.item(), a branch on values) cannot run on meta
        flops, info = count_flops(build().eval(), torch.randn(1, *size))
        info["device"] = "cpu"
    return flops, info


def images_per_second(model: nn.Module, x: torch.Tensor, reps: int = 3, budget_s: float = 20.0) -> tuple[float, int]:
    """Batch-``x.shape[0]`` inference throughput: ``(images/s as the median over reps, reps)`` after one warm-up
    call; fewer reps (at least 1) when one call would overrun ``budget_s``."""
    times = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)  # warm-up
        first = time.perf_counter() - t0
        reps = max(1, min(reps, int(budget_s / max(first, 1e-6))))
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times), reps


# -- provenance ----------------------------------------------------------------------------------------------------


def _fixture_path(fixture: str) -> Path | None:
    return next((d / fixture for d in PARITY_DIRS if (d / fixture).is_file()), None)


def fixture_tolerance(fixture: str) -> str:
    """The output tolerance the fixture states: ``atol/rtol`` of its ``tolerance`` record; the range over its
    ``cases`` for per-case files; one entry per quantity where the record is split (e.g. connectivity ops)."""
    path = _fixture_path(fixture)
    if path is None:
        return "fixture absent here"
    data = torch.load(path, map_location="cpu", weights_only=True)
    tol = data.get("tolerance")
    if isinstance(tol, dict) and "atol" in tol:
        return f"atol {float(tol['atol']):g}, rtol {float(tol.get('rtol', 0.0)):g}"
    if isinstance(tol, dict):  # one tolerance per quantity
        return ", ".join(f"{k} {v if isinstance(v, str) else 'atol ' + format(float(v['atol']), 'g')}"
                         for k, v in tol.items() if isinstance(v, str) or (isinstance(v, dict) and "atol" in v))
    atols = sorted({float(c["tolerance"]["atol"]) for c in data.get("cases", [])
                    if isinstance(c, dict) and isinstance(c.get("tolerance"), dict) and "atol" in c["tolerance"]})
    if atols:
        return f"atol {atols[0]:g}" + (f"–{atols[-1]:g}" if len(atols) > 1 else "") + " per case"
    return "tolerance not stated"


def tests_using(fixture: str, tests_dir: Path = REPO / "tests") -> list[str]:
    """Test files (relative to the repo) that mention ``fixture`` (this tool's own test excepted)."""
    return sorted(str(p.relative_to(REPO)) for p in tests_dir.rglob("test_*.py")
                  if p.name != "test_model_zoo.py" and fixture in p.read_text())


def parity_of(name: str, family: str, cache: dict[str, tuple[str, list[str]]] | None = None) -> str:
    """Markdown cell: each fixture that covers ``name`` with its tolerance and the tests comparing against it."""
    cache = {} if cache is None else cache
    parts = []
    for pattern, fixture in PARITY:
        if not re.search(pattern, name):
            continue
        if fixture not in cache:
            cache[fixture] = (fixture_tolerance(fixture), tests_using(fixture))
        tol, tests = cache[fixture]
        where = ", ".join(f"`{Path(t).name}`" for t in tests) or "**no test uses it**"
        parts.append(f"`{fixture}` ({tol}; {where})")
    if not parts and family in REFERENCE_TESTS:
        what, test = REFERENCE_TESTS[family]
        parts.append(what + (f" (`{Path(test).name}`)" if test else ""))
    return "<br>".join(parts) or "none"


def converter_summary(family: str) -> str:
    """First sentence of ``attnseg.convert.<family>``'s docstring (what the converter reads)."""
    import importlib

    try:
        doc = importlib.import_module(f"attnseg.convert.{family}").__doc__ or ""
    except ImportError:
        return "–"
    first = doc.strip().splitlines()[0].rstrip(".")
    first = re.sub(r"\s*\(:mod:`[^`]*`\)", "", first)  # reST cross-references mean nothing in the table
    return first.replace("``", "`")


def family_of(name: str, factory: Callable[..., Any]) -> str:
    """``attnseg.backbones.nat`` -> ``nat``; encoders registered in ``attnseg.models.<x>`` -> ``x``."""
    return factory.__module__.rsplit(".", 1)[-1]


# -- rows ----------------------------------------------------------------------------------------------------------


def _fmt_input(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


MAX_GFLOPS: float | None = None  # --max-gflops: throughput is not measured above this cost
MIN_GFLOPS: float | None = None  # --min-gflops: nor below this one (those rows keep their stored images/s)


def _wants_throughput(row: dict[str, Any], throughput: bool) -> bool:
    """Whether to time this row; a row over :data:`MAX_GFLOPS` records ``ips_skipped`` instead."""
    if not throughput or (MIN_GFLOPS is not None and row["flops"] < MIN_GFLOPS * 1e9):
        return False
    if MAX_GFLOPS is not None and row["flops"] > MAX_GFLOPS * 1e9:
        row["ips_skipped"] = f"> {MAX_GFLOPS:g} GFLOPs, not timed"
        return False
    return True


def backbone_row(name: str, throughput: bool = False, reps: int = 3) -> dict[str, Any]:
    """Measure one backbone variant at its standard resolution (``pretrained_cfg(name)["input_size"]``); the
    classifier (when the cfg has one) at ``cfg["num_classes"]`` classes."""
    from attnseg.backbones import pretrained_cfg
    from attnseg.registry import BACKBONES

    factory = BACKBONES.get(name)
    cfg = pretrained_cfg(name)
    classes = int(cfg["num_classes"])
    kwargs = {"num_classes": classes} if classes else {}
    size = tuple(cfg["input_size"])
    params = count_params(instantiate(lambda: factory(**kwargs)))
    no_head = count_params(instantiate(lambda: factory(num_classes=0))) if classes else None
    row: dict[str, Any] = {"family": family_of(name, factory), "model": name, "kind": "backbone",
                           "input": list(size), "classes": classes, "params": params, "params_no_head": no_head,
                           "checkpoints": list(cfg["checkpoints"]), "license": cfg["license"], "paper": cfg["paper"]}
    flops, info = measure_flops(lambda: factory(**kwargs), size)
    row.update(flops=flops, na_calls=info["na_calls"], na_approximate=info["na_approximate"], counted_on=info["device"])
    if _wants_throughput(row, throughput):
        row["ips"], row["reps"] = images_per_second(factory(**kwargs).eval(), torch.randn(1, *size), reps)
    return row


def model_row(name: str, throughput: bool = False, reps: int = 3) -> dict[str, Any]:
    """Measure one published whole model (``MODELS``) at :data:`MODEL_INPUTS`; its head = ``model.head``."""
    from attnseg.registry import MODELS

    size = MODEL_INPUTS[name]
    model = instantiate(MODELS.get(name))
    flops, info = measure_flops(MODELS.get(name), size)
    cls = type(model).__name__
    row: dict[str, Any] = {"family": "models", "model": name, "kind": "model", "input": list(size),
                           "encoder": _encoder_name(model), "params": count_params(model),
                           "params_head": count_params(model.head), "flops": flops,
                           "flops_head": info["modules"].get(f"{cls}.head", 0),
                           "na_calls": info["na_calls"], "na_approximate": info["na_approximate"],
                           "counted_on": info["device"]}
    if _wants_throughput(row, throughput):
        row["ips"], row["reps"] = images_per_second(MODELS.get(name)().eval(), torch.randn(1, *size), reps)
    return row


def _encoder_name(model: nn.Module) -> str:
    return type(model.backbone).__name__


def head_row(head: str, throughput: bool = False, reps: int = 3) -> dict[str, Any]:
    """Measure one head on :data:`HEAD_ENCODER` at :data:`HEAD_INPUT` (2 classes; HybridGNet: its template's 3);
    a head that cannot be built on it gets a row with the reason."""
    from attnseg.models.segmentor import Segmentor
    from attnseg.registry import BACKBONES, HEADS

    row: dict[str, Any] = {"family": "heads", "model": head, "kind": "head", "input": list(HEAD_INPUT),
                           "encoder": HEAD_ENCODER}

    def build() -> nn.Module:
        backbone = BACKBONES.get(HEAD_ENCODER)()
        info = backbone.feature_info
        module = HEADS.get(head)(in_channels=[int(f["num_chs"]) for f in info],
                                 strides=[int(f["reduction"]) for f in info], num_classes=HEAD_CLASSES.get(head, 2),
                                 spatial_dims=2, in_chans=HEAD_INPUT[0], **HEAD_KWARGS.get(head, {}))
        return Segmentor(backbone, module)

    try:
        model = instantiate(build)
    except (TypeError, ValueError, KeyError) as err:
        row["note"] = f"not buildable on {HEAD_ENCODER}: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return row
    flops, info = measure_flops(build, HEAD_INPUT)
    row.update(params=count_params(model), params_head=count_params(model.head), flops=flops,
               flops_head=info["modules"].get("Segmentor.head", 0), na_calls=info["na_calls"],
               na_approximate=info["na_approximate"], counted_on=info["device"])
    if _wants_throughput(row, throughput):
        row["ips"], row["reps"] = images_per_second(build().eval(), torch.randn(1, *HEAD_INPUT), reps)
    return row


def collect(families: list[str], throughput: bool, reps: int,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Rows of the requested families (backbone families, ``models``, ``heads``)."""
    from attnseg.registry import BACKBONES, HEADS, MODELS

    run = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if throughput and hasattr(os, "getloadavg"):
        # other jobs on the machine slow the timings; say how busy it was
        run += f" (load {os.getloadavg()[0]:.1f})"
    rows = []
    for name in BACKBONES.names():
        if name.startswith("test_") or family_of(name, BACKBONES.get(name)) not in families:
            continue
        rows.append(backbone_row(name, throughput, reps))
        log(f"{name}: {rows[-1]['params'] / 1e6:.2f} M, {rows[-1]['flops'] / 1e9:.2f} GFLOPs, "
            f"{rows[-1].get('ips', '-')} img/s")
    if "models" in families:
        for name in MODELS.names():
            if not name.startswith("test_"):
                rows.append(model_row(name, throughput, reps))
                log(f"{name}: {rows[-1]['params'] / 1e6:.2f} M, {rows[-1]['flops'] / 1e9:.2f} GFLOPs")
    if "heads" in families:
        for name in HEADS.names():
            rows.append(head_row(name, throughput, reps))
            log(f"head {name}: {rows[-1].get('params_head', '-')} params, {rows[-1].get('note', '')}")
    for r in rows:
        r["run"] = run
    return rows


# -- rendering -----------------------------------------------------------------------------------------------------


def _m(n: int | None) -> str:
    return f"{n / 1e6:.2f}" if isinstance(n, int) else "–"


def _g(r: dict[str, Any], key: str = "flops") -> str:
    if not isinstance(r.get(key), int):
        return "–"
    mark = "²" if r.get("na_approximate") else ("¹" if r.get("na_calls") and key == "flops" else "")
    return f"{r[key] / 1e9:.2f}{mark}"


def _ips(r: dict[str, Any]) -> str:
    if isinstance(r.get("ips"), float):
        return f"{r['ips']:.2f} ({r['reps']})"
    return r.get("ips_skipped", "–")


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(rows: list[dict[str, Any]], machine: str | None = None) -> str:
    """The whole document: header, one table per backbone family, the published models, the heads, and the rows
    as a JSON comment."""
    import json

    machine = machine or (f"{_cpu_name()} ({os.cpu_count()} cores visible), torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads")
    runs = "; ".join(f"{fam}: {', '.join(sorted({r.get('run', '?') for r in rows if r['family'] == fam}))}"
                     for fam in dict.fromkeys(r["family"] for r in rows))
    lines = [
        "# Model zoo",
        "",
        "<!-- generated by tools/gen_model_zoo.py; do not edit by hand -->",
        "",
        "Generated by `python tools/gen_model_zoo.py --throughput` (`--families a b` reruns some families and keeps "
        f"the other rows). Machine: {machine}. Runs: {runs}.",
        "",
        "- **Params (M)**: all parameters; for backbones with the ImageNet classifier at the cfg's class count "
        "(1000, or 21841 for the `_21k` variants), and *no head* = built with `num_classes=0` (what a segmentation "
        "model uses).",
        "- **GFLOPs**: `torch.utils.flop_counter.FlopCounterMode` at batch 1 and the standard input "
        "(`attnseg.backbones.pretrained_cfg(name)[\"input_size\"]`), eval mode. A multiply-add counts **2** FLOPs "
        "(papers quoting fvcore/ptflops \"FLOPs\" count MACs, half these numbers); only matmuls and convolutions are "
        "counted (not softmax, norms or element-wise ops). `scaled_dot_product_attention` runs on its math kernel "
        "while counting (FlopCounterMode counts the fused CPU kernel as 0). ¹ fused neighborhood attention counted "
        "analytically, 2·heads·queries·kernel²·(d_qk + d_v) for the fused op (the CPU backend's tiled GEMMs execute more, over the "
        "masked box of keys); the unfused `na*_qk` / `na*_av` ops likewise, 2·heads·queries·kernel²·d each. ² strided or causal neighborhood attention: the analytic count overstates the keys. "
        "Everything else is what the eager CPU path executes (e.g. BiFormer's gathered top-k regions, TransNeXt's "
        "pooled tokens).",
        "- **Official checkpoints**: the file names the family's converter loads (`default_cfgs`); – = none "
        "published for that variant. Load with `attnseg.load_pretrained(model, path)`; nothing downloads.",
        "- **Parity**: the fixtures of the official code (random weights, `shared/fixtures/parity`, see its README) "
        "that cover this architecture, with the tolerance stated in the fixture and the tests comparing against "
        "it (found by searching `tests/`). Fixtures are reduced configurations of the same code path, not the "
        "variant itself.",
        "- **CPU img/s**: batch 1, fp32, eval, `torch.inference_mode()`, median over the reps in parentheses after "
        "one warm-up call (fewer reps when a call takes long; – = not measured). The run times above give the "
        "machine's 1-minute load average when a timed run started, where recorded. Rows from runs under different load are not comparable; read the "
        "column as orders of magnitude, not benchmarks (`tools/benchmark.py models` times attnseg and the "
        "references in turns, which is how speed claims are made).",
        "",
    ]
    families = [f for f in FAMILY_ORDER if any(r["family"] == f for r in rows)]
    families += sorted({r["family"] for r in rows} - set(families))
    parity_cache: dict[str, tuple[str, list[str]]] = {}
    for fam in families:
        fam_rows = [r for r in rows if r["family"] == fam]
        if fam == "models":
            lines += [
                "## Published models (encoder + head as in the paper)", "",
                "Each at its paper's input; *head* = the `head` submodule (its FLOPs as FlopCounterMode attributes "
                "them to it). Official checkpoints: what the converter reads.", "",
                "| model | input | encoder | params (M) | head params (M) | GFLOPs | head GFLOPs | official checkpoints "
                "| parity | CPU img/s (reps) |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in fam_rows:
                conv = converter_summary(MODEL_CONVERTER.get(r["model"], ""))
                lines.append(f"| `{r['model']}` | {_fmt_input(tuple(r['input']))} | {r.get('encoder', '–')} | "
                             f"{_m(r.get('params'))} | {_m(r.get('params_head'))} | {_g(r)} | {_g(r, 'flops_head')} "
                             f"| {conv} | {parity_of(r['model'], fam, parity_cache)} | {_ips(r)} |")
        elif fam == "heads":
            lines += [
                "## Heads", "",
                f"Each head on one fixed small encoder, `{HEAD_ENCODER}` (headless), at "
                f"{_fmt_input(HEAD_INPUT)} with 2 classes, so heads compare with each other; options as in the "
                "shipped configs. *head* = the head module alone; the totals include the encoder. The heads on their "
                "own published encoders are the rows of the table above.", "",
                "| head | on | params (M) | head params (M) | GFLOPs | head GFLOPs | published with | parity | "
                "CPU img/s (reps) | note |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in fam_rows:
                lines.append(f"| `{r['model']}` | {r.get('encoder', '–')} | {_m(r.get('params'))} | "
                             f"{_m(r.get('params_head'))} | {_g(r)} | {_g(r, 'flops_head')} | "
                             f"{HEAD_MODEL.get(r['model'], '–')} | {parity_of(r['model'], fam, parity_cache)} | "
                             f"{_ips(r)} | {r.get('note', '')} |")
        else:
            lic = ", ".join(sorted({r.get("license", "?") for r in fam_rows}))
            papers = ", ".join(f"arXiv {p}" for p in sorted({r.get("paper", "?") for r in fam_rows}))
            lines += [
                f"## {fam}", "",
                f"Licence of the official weights/code: {lic}; paper: {papers}.", "",
                "| variant | input | params (M) | no head (M) | GFLOPs | official checkpoints | parity | "
                "CPU img/s (reps) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in fam_rows:
                ckpts = ", ".join(f"`{c}`" for c in r.get("checkpoints", [])) or "–"
                lines.append(f"| `{r['model']}` | {_fmt_input(tuple(r['input']))} | {_m(r.get('params'))} | "
                             f"{_m(r.get('params_no_head', r.get('params')) if r.get('classes') else None)} | {_g(r)} "
                             f"| {ckpts} | {parity_of(r['model'], fam, parity_cache)} | {_ips(r)} |")
        lines.append("")
    lines += [ROWS_MARK + json.dumps(rows) + " -->", ""]
    return "\n".join(lines)


def merge(previous: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New rows replace the previous rows of their families (``bench_models.merge_rows``); a new row without a
    throughput keeps the previous row's one. Rows come back in :data:`FAMILY_ORDER`, registry order inside."""
    old = {r["model"]: r for r in previous}
    for r in new:
        if "ips" not in r and "ips_skipped" not in r and "ips" in old.get(r["model"], {}):
            r["ips"], r["reps"] = old[r["model"]]["ips"], old[r["model"]]["reps"]
    rows = merge_rows(previous, new)
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return sorted(rows, key=lambda r: order.get(r["family"], len(order)))


def all_families() -> list[str]:
    """Backbone families with non-test variants, then ``models`` and ``heads``."""
    from attnseg.registry import BACKBONES

    fams = {family_of(n, BACKBONES.get(n)) for n in BACKBONES.names() if not n.startswith("test_")}
    return [f for f in FAMILY_ORDER if f in fams or f in ("models", "heads")] + sorted(fams - set(FAMILY_ORDER))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", help="backbone families (module names), 'models', 'heads'")
    parser.add_argument("--throughput", action="store_true", help="also measure CPU images/s (slow)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per model (fewer for slow ones)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gflops", type=float, help="time only models up to this many GFLOPs")
    parser.add_argument("--min-gflops", type=float,
                        help="time only models from this many GFLOPs (the others keep their stored images/s)")
    parser.add_argument("--output", type=Path, default=DOC)
    parser.add_argument("--machine", help="machine description for the header (default: platform + torch)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global MAX_GFLOPS, MIN_GFLOPS
    MAX_GFLOPS, MIN_GFLOPS = args.max_gflops, args.min_gflops
    families = args.families or all_families()
    unknown = set(families) - set(all_families())
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {all_families()}")
    previous = stored_rows(args.output.read_text()) if args.output.is_file() else []
    rows = merge(previous, collect(families, args.throughput, args.reps))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(rows, args.machine))
    print(f"wrote {args.output} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
