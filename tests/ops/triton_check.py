"""Run Triton neighborhood-attention cases against the reference backend; one JSON line per case.

Run as a script (``python tests/ops/triton_check.py CASES.json [--device cuda]``): on CPU it must run under
``TRITON_INTERPRET=1`` and in its own process, because an out-of-bounds load in the interpreter kills the
process instead of raising. The reference runs in float64 on the same (upcast) inputs, so one comparison
measures the error of every dtype. Each case is a dict: ``shape`` (spatial), ``kernel``, and optionally
``dilation``, ``stride``, ``causal``, ``mode``, ``heads``, ``kv_heads``, ``dim``, ``dim_v``, ``batch``,
``rpb``, ``extra`` (number of additional keys), ``dtype``, ``determinism`` (run the backward twice and report
whether the gradients are bitwise equal), ``gradcheck`` (torch.autograd.gradcheck in float64). A case ``{"fixture": NAME, "fixture_dir": DIR}`` instead
runs the cases of an official NATTEN parity fixture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from attnseg import ops


def _inputs(case: dict, device: str, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape, ndim = case["shape"], len(case["shape"])
    kernel = case["kernel"] if isinstance(case["kernel"], list) else [case["kernel"]] * ndim
    heads, kv_heads = case.get("heads", 2), case.get("kv_heads", case.get("heads", 2))
    dim, dim_v, batch = case.get("dim", 16), case.get("dim_v", case.get("dim", 16)), case.get("batch", 1)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(device)

    tensors = {"query": rand(batch, *shape, heads, dim), "key": rand(batch, *shape, kv_heads, dim),
               "value": rand(batch, *shape, kv_heads, dim_v)}
    if case.get("rpb"):
        tensors["rpb"] = rand(heads, *[2 * k - 1 for k in kernel])
    if case.get("extra"):
        tensors["additional_keys"] = rand(batch, case["extra"], kv_heads, dim)
        tensors["additional_values"] = rand(batch, case["extra"], kv_heads, dim_v)
    return {name: t.to(dtype).requires_grad_() for name, t in tensors.items()}


def _run(case: dict, tensors: dict, backend: str, grad_out: torch.Tensor | None = None,
         grad_lse: torch.Tensor | None = None):  # noqa: ANN202
    fn = getattr(ops, f"na{len(case['shape'])}d")
    kwargs = {k: case[k] for k in ("dilation", "stride", "mode") if k in case}
    if "causal" in case:
        kwargs["is_causal"] = case["causal"]
    out, lse = fn(**tensors, kernel_size=case["kernel"], return_lse=True, backend=backend, **kwargs)
    if grad_out is None:
        gen = torch.Generator().manual_seed(1234)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
        grad_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(out.device)
    loss = (out.double() * grad_out).sum() + (lse.double() * grad_lse).sum()
    grads = torch.autograd.grad(loss, list(tensors.values()))
    return out, lse, dict(zip(tensors, grads)), grad_out, grad_lse


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0))


def check(case: dict, device: str) -> dict:
    dtype = getattr(torch, case.get("dtype", "float64"))
    tensors = _inputs(case, device, dtype, seed=case.get("seed", 0))
    out, lse, grads, grad_out, grad_lse = _run(case, tensors, "triton")
    reference = {name: t.detach().double().requires_grad_() for name, t in tensors.items()}
    ref_out, ref_lse, ref_grads, _, _ = _run(case, reference, "reference", grad_out, grad_lse)
    result = {"out": _rel_err(out, ref_out), "lse": _rel_err(lse, ref_lse)}
    result.update({f"d{name}": _rel_err(grads[name], ref_grads[name]) for name in grads})
    if case.get("determinism"):
        again = _run(case, tensors, "triton", grad_out, grad_lse)[2]
        result["bitwise_deterministic"] = all(torch.equal(again[n], grads[n]) for n in grads)
    if case.get("gradcheck"):
        fn = getattr(ops, f"na{len(case['shape'])}d")
        names = list(tensors)
        kwargs = {k: case[k] for k in ("dilation", "stride") if k in case}

        def f(*ts: torch.Tensor) -> torch.Tensor:
            return fn(**dict(zip(names, ts)), kernel_size=case["kernel"], backend="triton", **kwargs)

        result["gradcheck"] = bool(torch.autograd.gradcheck(f, tuple(tensors.values()), atol=1e-6))
    return result


def check_fixture(case: dict, device: str) -> dict:
    """Max error over the cases of an official NATTEN parity fixture, and the fixture's own tolerance."""
    fx = torch.load(Path(case["fixture_dir"]) / case["fixture"], map_location="cpu", weights_only=True)
    errors = []
    for item in fx["cases"]:
        tensors = {name: item[key].to(device) for name, key in (("query", "q"), ("key", "k"), ("value", "v"))}
        for name in ("additional_keys", "additional_values"):
            if name in item:
                tensors[name] = item[name].to(device)
        out, lse = getattr(ops, item["op"])(**tensors, **item["kwargs"], return_lse=True, backend="triton")
        errors.append(float((out.cpu() - item["output"]).abs().max()))
        if "lse" in item:
            errors.append(float((lse.cpu() - item["lse"]).abs().max()))
    return {"max_abs_err": max(errors), "atol": fx["tolerance"]["atol"], "cases": len(fx["cases"])}


def main(argv: list[str]) -> None:
    cases = json.loads(open(argv[0]).read())
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    for case in cases:
        result = check_fixture(case, device) if "fixture" in case else check(case, device)
        print(json.dumps({"case": case, "result": result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
