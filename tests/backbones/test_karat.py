import math

import pytest
import torch

from attnseg.backbones.karat import (
    FourierBasis,
    KANBasis,
    KArAtOperator,
    KArAtViT,
    kan_phi,
    make_basis,
    resize_token_grid,
    simplex_projection,
)
from attnseg.errors import InputSizeError
from attnseg.registry import BACKBONES


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _operator_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if "operator" in n)


# -- parameter counts (KARAT_NOTE.md, "Parameter count check") ------------------------------------------------------

# (factory, h x L, G, classes the paper counted with, paper total (M) for ViT / blockwise / universal)
PAPER = [("karat_vit_tiny", 3 * 12, 3, 10, (5.53, 6.29, 5.59)),
         ("karat_vit_small", 6 * 12, 3, 1000, (22.05, 23.58, 22.18)),
         ("karat_vit_base", 12 * 12, 1, 10, (85.81, 87.51, 85.95))]


@pytest.mark.parametrize("name,ops,order,classes,paper", PAPER)
def test_parameter_counts_follow_the_formula_and_the_paper(name, ops, order, classes, paper):
    N, r, heads = 197, 12, ops // 12
    with torch.device("meta"):
        models = {(mode, zf): BACKBONES.get(name)(num_classes=classes, pyramid=False, mode=mode,
                                                  basis_kwargs={"zero_frequency": zf})
                  for mode in ("blockwise", "universal") for zf in (False, True)}
    for (mode, zf), model in models.items():
        n_freq = order + 1 if zf else order
        per_op = 2 * n_freq * r * N + N * r
        assert _operator_params(model) == per_op * (ops if mode == "blockwise" else heads)
    vit = _count(models["blockwise", False]) - _operator_params(models["blockwise", False])
    # the paper's Table 1/13 totals are reproduced with the extra frequency slot (m = 0..G)
    assert round(vit / 1e6, 2) == paper[0]
    assert round(_count(models["blockwise", True]) / 1e6, 2) == paper[1]
    assert round(_count(models["universal", True]) / 1e6, 2) == paper[2]


def test_factories_are_the_papers_best_settings():
    with torch.device("meta"):
        t, b = BACKBONES.get("karat_vit_tiny")(pyramid=False), BACKBONES.get("karat_vit_base")(pyramid=False)
    assert t.blocks[0].attn.operator.basis.order == 3 and b.blocks[0].attn.operator.basis.order == 1
    assert t.num_tokens == 197 and t.blocks[0].attn.operator.rank == 12 and t.mode == "blockwise"


# -- the operator ---------------------------------------------------------------------------------------------------

def _direct(op, A):
    """Literal loops over (b, h, k, p, q, m) of the paper's formula, then W."""
    B, H, N, _ = A.shape
    G, r = op.basis.order, op.rank
    c = op.coefficients.detach()  # [h, N, 2G, r]: cos for m = 1..G, then sin
    W = op.weight.detach()
    out = torch.zeros(B, H, N, N, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for k in range(N):
                phi = torch.zeros(r, dtype=torch.float64)
                for p in range(r):
                    for q in range(N):
                        x = A[b, h, k, q]
                        for m in range(1, G + 1):
                            phi[p] += c[h, q, m - 1, p] * math.cos(m * x) + c[h, q, G + m - 1, p] * math.sin(m * x)
                for col in range(N):
                    out[b, h, k, col] = sum(W[h, col, p] * phi[p] for p in range(r))
    return out


def test_operator_matches_the_direct_formula_float64():
    torch.manual_seed(0)
    op = KArAtOperator(2, (2, 2), rank=3, order=2).double()
    A = torch.randn(2, 2, 5, 5, dtype=torch.float64) * 2
    assert torch.allclose(op(A), _direct(op, A), atol=1e-12)


def test_operator_closed_form_g1_cosines_only():
    op = KArAtOperator(1, (1, 3), rank=2, order=1).double()
    with torch.no_grad():
        op.coefficients[..., 1, :] = 0  # sine coefficients
    A = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    a1 = op.coefficients[0, :, 0, :].T  # [r, N]
    expected = (torch.cos(A) @ a1.T) @ op.weight[0].T
    assert torch.allclose(op(A), expected, atol=1e-12)


def test_zero_frequency_adds_a_constant_slot():
    basis = FourierBasis(2, zero_frequency=True)
    feats = basis(torch.tensor([0.3, -1.0]))
    assert basis.num_functions == 6
    assert torch.equal(feats[:, 0], torch.ones(2)) and torch.equal(feats[:, 3], torch.zeros(2))


def test_operator_options_base_activation_and_simplex():
    torch.manual_seed(0)
    A = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    plain = KArAtOperator(2, (2, 2), rank=3, order=1).double()
    silu = KArAtOperator(2, (2, 2), rank=3, order=1, base_activation="silu").double()
    silu.load_state_dict(plain.state_dict())
    shift = torch.nn.functional.silu(A).sum(-1, keepdim=True)  # [B, h, N, 1], added to every unit
    assert torch.allclose(silu(A), plain(A) + shift @ plain.weight.sum(-1)[:, None, :], atol=1e-12)
    v = torch.randn(7, 5, dtype=torch.float64)
    s = simplex_projection(v)
    assert (s >= 0).all() and torch.allclose(s.sum(-1), torch.ones(7, dtype=torch.float64))
    inside = torch.softmax(v, -1)
    assert torch.allclose(simplex_projection(inside), inside)
    with pytest.raises(ValueError, match="base_activation"):
        KArAtOperator(1, (2, 2), base_activation="selu")


def test_half_precision_logits_run_in_float32():
    op = KArAtOperator(2, (2, 2), rank=3, order=3)
    A = torch.randn(1, 2, 5, 5) * 4
    out = op(A.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), op(A.bfloat16().float()), rtol=1e-2, atol=1e-2)


# -- blockwise vs universal -----------------------------------------------------------------------------------------

def test_blockwise_and_universal_parameter_sharing():
    blockwise = BACKBONES.get("test_karat")(mode="blockwise")
    universal = BACKBONES.get("test_karat")(mode="universal")
    ops = [b.attn.operator for b in blockwise.blocks]
    assert len({id(o.coefficients) for o in ops}) == len(ops) and blockwise.shared_operator is None
    assert all(b.attn.operator is None for b in universal.blocks)
    assert _operator_params(universal) == _operator_params(blockwise) // len(ops)
    keys = [k for k in universal.state_dict() if "operator" in k]
    assert keys == ["shared_operator.coefficients", "shared_operator.weight"]
    # every block uses the one shared operator: perturbing it changes every block's attention
    x = torch.randn(1, 3, 64, 64)
    seen = []
    hook = lambda mod, args, out: seen.append(id(mod))  # noqa: E731
    universal.shared_operator.register_forward_hook(hook)
    universal(x)
    assert seen == [id(universal.shared_operator)] * len(universal.blocks)
    with pytest.raises(ValueError, match="unknown mode 'universe'; did you mean 'universal'"):
        KArAtViT(mode="universe")


# -- pluggable basis ------------------------------------------------------------------------------------------------

class _GaussianBasis(KANBasis):
    """Test-only RBF basis with learnable centres: exp(-(x - c_f)^2)."""

    def __init__(self, order, width=1.0):
        super().__init__()
        self.centres = torch.nn.Parameter(torch.linspace(-2, 2, order))
        self.width, self.num_functions = width, order

    def forward(self, x):
        return torch.exp(-((x.unsqueeze(-1) - self.centres) / self.width) ** 2)


def test_another_basis_plugs_in_without_touching_the_attention():
    model = BACKBONES.get("test_karat")(basis=_GaussianBasis, order=5, basis_kwargs={"width": 0.5}, num_classes=3)
    op = model.blocks[0].attn.operator
    assert isinstance(op.basis, _GaussianBasis) and op.coefficients.shape == (2, 17, 5, 4)
    A = torch.randn(1, 2, 17, 17, dtype=torch.float64)
    op.double()
    feats = torch.exp(-((A[..., None] - op.basis.centres) / 0.5) ** 2)  # [1, h, N, N, 5]
    expected = torch.einsum("bhkqf,hqfr,hcr->bhkc", feats, op.coefficients, op.weight)
    assert torch.allclose(op(A), expected, atol=1e-12)
    model.float()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert op.basis.centres.grad is not None and op.basis.centres.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown basis 'fourir'; did you mean 'fourier'"):
        make_basis("fourir", 3)
    with pytest.raises(TypeError, match="KANBasis"):
        make_basis(lambda order: torch.nn.Identity(), 3)


# -- the fixed token count ------------------------------------------------------------------------------------------

def test_built_size_uses_the_parameters_unchanged_and_other_sizes_resize():
    op = KArAtOperator(2, (3, 3), rank=2, order=1)
    assert op.parameters_for((3, 3), 10)[0] is op.coefficients
    c, w = op.parameters_for((5, 4), 21)
    assert c.shape == (2, 21, 2, 2) and w.shape == (2, 21, 2)
    assert torch.equal(c[:, :1], op.coefficients[:, :1])  # the cls slot is kept
    # the patch part is resampled and scaled by 9 / 20 (sums over keys keep their magnitude)
    ref = resize_token_grid(op.coefficients, (3, 3), (5, 4), dim=1)
    assert torch.allclose(c[:, 1:], ref[:, 1:] * 9 / 20)
    with pytest.raises(InputSizeError, match="sized for N=10 tokens"):
        op(torch.randn(1, 2, 12, 12))  # no grid given


def test_constant_grid_resizes_to_a_constant():
    t = torch.ones(1, 1 + 14 * 14, 3)
    out = resize_token_grid(t, (14, 14), (7, 9))
    assert out.shape == (1, 64, 3) and torch.allclose(out, torch.ones_like(out))


def test_fixed_size_model_refuses_other_sizes():
    model = BACKBONES.get("test_karat")(dynamic_size=False, num_classes=2)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    with pytest.raises(InputSizeError, match="built for 64x64 inputs"):
        model(torch.randn(1, 3, 80, 64))
    op = model.blocks[0].attn.operator
    with pytest.raises(InputSizeError, match="dynamic_size=False"):
        op(torch.randn(1, 2, 21, 21), (4, 5))


@pytest.mark.parametrize("mode", ["blockwise", "universal"])
@pytest.mark.parametrize("size", [(97, 131), (64, 64), (16, 16)])
def test_odd_sizes_give_pyramids_of_the_right_shapes(mode, size):
    model = BACKBONES.get("test_karat")(mode=mode, num_classes=0).eval()
    with torch.no_grad():
        maps = model.forward_pyramid(torch.randn(2, 3, *size))
    h, w = size
    assert [tuple(m.shape) for m in maps] == [
        (2, c, -(-h // s), -(-w // s)) for c, s in zip((8, 16, 32, 32), (4, 8, 16, 32))]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    tokens = BACKBONES.get("test_karat")(mode=mode, num_classes=0).forward_features(torch.randn(1, 3, *size))
    assert tokens.shape == (1, 1 + -(-h // 16) * -(-w // 16), 32)


def test_no_pyramid_gives_the_stride_16_map():
    model = BACKBONES.get("test_karat")(pyramid=False, num_classes=0)
    (m,) = model.forward_pyramid(torch.randn(1, 3, 97, 131))
    assert m.shape == (1, 32, 7, 9) and model.feature_info == [{"num_chs": 32, "reduction": 16, "module": "blocks"}]


# -- training ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["blockwise", "universal"])
def test_gradients_reach_every_parameter(mode):
    torch.manual_seed(0)
    model = BACKBONES.get("test_karat")(mode=mode, num_classes=3, drop_path_rate=0.1)
    x = torch.randn(2, 3, 97, 131)  # resized operators and position embedding are differentiable too
    loss = model(x).sum() + sum(m.sum() for m in model.forward_pyramid(x))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_grad_checkpointing_gives_the_same_result():
    torch.manual_seed(0)
    model = BACKBONES.get("test_karat")(mode="universal", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 80)
    ref = model(x)
    model.set_grad_checkpointing()
    out = model(x)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert model.shared_operator.coefficients.grad is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        KArAtViT(img_size=100)
    with pytest.raises(ValueError, match="order >= 1"):
        KArAtViT(order=0)
    with pytest.raises(ValueError, match="not divisible"):
        KArAtViT(embed_dim=100, num_heads=3)
    with pytest.raises(InputSizeError, match=">= 16"):
        BACKBONES.get("test_karat")()(torch.randn(1, 3, 8, 64))


def test_docstring_examples():
    import doctest

    import attnseg.backbones.karat as karat

    result = doctest.testmod(karat, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("options", [{}, {"base_activation": "gelu", "simplex_projection": True}])
def test_row_chunks_give_the_same_values_and_gradients(options):
    torch.manual_seed(0)
    full = KArAtOperator(2, (3, 3), rank=3, order=2, **options).double()
    chunked = KArAtOperator(2, (3, 3), rank=3, order=2, row_chunk=4, **options).double()
    chunked.load_state_dict(full.state_dict())
    A = torch.randn(2, 2, 10, 10, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 2, 10, 10, dtype=torch.float64)
    outs, grads = [], []
    for op in (full, chunked):
        out = op(A)
        (out * g).sum().backward()
        outs.append(out)
        grads.append([A.grad.clone(), op.coefficients.grad.clone(), op.weight.grad.clone()])
        A.grad = None
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(*grads))
    with torch.no_grad():
        assert torch.allclose(chunked(A), outs[0], atol=1e-12)
    with pytest.raises(ValueError, match="row_chunk"):
        KArAtOperator(1, (2, 2), row_chunk=0)
    model = BACKBONES.get("test_karat")(row_chunk=5, num_classes=2)
    assert model.blocks[0].attn.operator.row_chunk == 5 and model(torch.randn(1, 3, 64, 48)).shape == (1, 2)


# -- memory-efficient path ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zero_frequency,row_chunk", [(False, None), (True, 2), (False, 3)])
def test_kan_phi_gradcheck_and_equals_plain_autograd(zero_frequency, row_chunk):
    torch.manual_seed(0)
    basis = FourierBasis(3, zero_frequency=zero_frequency)
    a = (torch.randn(2, 2, 5, 4, dtype=torch.float64) * 2).requires_grad_()
    coeff = torch.randn(2, 4 * basis.num_functions, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: kan_phi(a, c, basis, row_chunk), (a, coeff))
    g = torch.randn(2, 2, 5, 2, dtype=torch.float64)
    fused = kan_phi(a, coeff, basis, row_chunk)
    plain = basis(a).reshape(2, 2, 5, -1) @ coeff  # what autograd differentiates on the plain path
    grads_fused = torch.autograd.grad((fused * g).sum(), (a, coeff))
    grads_plain = torch.autograd.grad((plain * g).sum(), (a, coeff))
    assert torch.allclose(fused, plain, atol=1e-12)
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(grads_fused, grads_plain))
    # only the logits' gradient, or only the coefficients'
    assert torch.allclose(torch.autograd.grad((kan_phi(a, coeff.detach(), basis, row_chunk) * g).sum(), a)[0],
                          grads_plain[0], atol=1e-12)
    assert torch.allclose(torch.autograd.grad((kan_phi(a.detach(), coeff, basis, row_chunk) * g).sum(), coeff)[0],
                          grads_plain[1], atol=1e-12)


@pytest.mark.parametrize("row_chunk", [None, 2])
def test_kan_phi_from_queries_and_keys_gradcheck_and_equals_plain_autograd(row_chunk):
    torch.manual_seed(0)
    basis = FourierBasis(2)
    q = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    coeff = torch.randn(2, 5 * basis.num_functions, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, c: kan_phi(q, c, basis, row_chunk, key=k, scale=0.7), (q, k, coeff))
    g = torch.randn(2, 2, 5, 2, dtype=torch.float64)
    fused = kan_phi(q, coeff, basis, row_chunk, key=k, scale=0.7)
    plain = basis((q @ k.transpose(-1, -2)) * 0.7).reshape(2, 2, 5, -1) @ coeff
    assert torch.allclose(fused, plain, atol=1e-12)
    grads_fused = torch.autograd.grad((fused * g).sum(), (q, k, coeff))
    grads_plain = torch.autograd.grad((plain * g).sum(), (q, k, coeff))
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(grads_fused, grads_plain))
    only_k = torch.autograd.grad((kan_phi(q.detach(), coeff, basis, row_chunk, key=k, scale=0.7) * g).sum(), k)[0]
    assert torch.allclose(only_k, grads_plain[1], atol=1e-12)


class _FourierWithoutMatrix(FourierBasis):
    """The Fourier basis through the generic analytic-derivative path (no derivative matrix)."""

    def derivative_matrix(self):
        return None


def test_fourier_derivative_matrix_and_the_generic_derivative_path():
    basis = FourierBasis(3, zero_frequency=True)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    feats, deriv = basis.features_and_derivative(x.detach())
    autograd = torch.stack([torch.autograd.grad(basis(x)[..., f].sum(), x)[0] for f in range(8)], dim=-1)
    assert torch.allclose(deriv, autograd, atol=1e-12)
    assert torch.allclose(feats @ basis.derivative_matrix().double(), deriv, atol=1e-12)
    generic = _FourierWithoutMatrix(2)
    a = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    coeff = torch.randn(2, 3 * 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: kan_phi(a, c, generic, 3), (a, coeff))


def test_kan_phi_stores_only_the_logits_and_coefficients():
    basis = FourierBasis(3)
    a = torch.randn(1, 2, 7, 7, requires_grad=True)
    coeff = torch.randn(2, 7 * 6, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kan_phi(a, coeff, basis)
    assert sorted(saved) == sorted([a.numel(), coeff.numel()])
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        basis(a).reshape(1, 2, 7, -1) @ coeff
    assert max(saved) == a.numel() * 6  # the plain path stores the features
    q, k = torch.randn(1, 2, 7, 3, requires_grad=True), torch.randn(1, 2, 7, 3, requires_grad=True)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kan_phi(q, coeff, basis, key=k, scale=0.5)
    assert sorted(saved) == sorted([q.numel(), k.numel(), coeff.numel()])  # not even the logits [1, 2, 7, 7]


def test_kan_phi_falls_back_to_autograd_for_a_basis_with_parameters():
    basis = _GaussianBasis(4)
    a = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    coeff = torch.randn(1, 12, 2, dtype=torch.float64)
    kan_phi(a, coeff.double(), basis.double()).sum().backward()
    assert basis.centres.grad is not None and basis.centres.grad.abs().sum() > 0


@pytest.mark.parametrize("mode,options", [("blockwise", {}), ("universal", {"row_chunk": 5}),
                                          ("blockwise", {"base_activation": "gelu", "simplex_projection": True})])
def test_memory_efficient_model_equals_plain_autograd(mode, options):
    torch.manual_seed(0)
    model = BACKBONES.get("test_karat")(mode=mode, num_classes=3, order=3, **options)
    x = torch.randn(2, 3, 64, 64)
    results = []
    for efficient in (True, False):
        for op in model.modules():
            if isinstance(op, KArAtOperator):
                op.memory_efficient = efficient
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (out_fast, grads_fast), (out_plain, grads_plain) = results
    assert torch.allclose(out_fast, out_plain, rtol=1e-5, atol=1e-6)
    assert grads_fast.keys() == grads_plain.keys() and any("operator.coefficients" in n for n in grads_plain)
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_fast[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item()), name


def test_operator_with_value_or_queries_and_keys():
    torch.manual_seed(0)
    op = KArAtOperator(2, (2, 2), rank=3, order=2).double()
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    A = (q @ k.transpose(-1, -2)) * 0.5
    expected = op(A) @ v
    for efficient in (True, False):
        op.memory_efficient = efficient
        assert torch.allclose(op(A, value=v), expected, atol=1e-12)
        assert torch.allclose(op((q, k, 0.5), value=v), expected, atol=1e-12)
        assert torch.allclose(op((q, k, 0.5)), op(A), atol=1e-12)
