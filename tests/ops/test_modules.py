import pytest
import torch
import torch.nn.functional as F

from attnseg import ops
from attnseg.ops import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D


def _manual(module, x):
    """qkv -> scaled fused NA with rpb -> proj, from the module's own weights."""
    b, *s, c = x.shape
    h = module.num_heads
    qkv = module.qkv(x).reshape(b, *s, 3, h, c // h)
    q, k, v = qkv.unbind(-3)
    fused = getattr(ops, f"na{len(s)}d")
    out = fused(q, k, v, module.kernel_size, module.dilation, rpb=module.rpb, scale=module.scale)
    return module.proj(out.reshape(b, *s, c))


@pytest.mark.parametrize("cls,shape,kernel,dilation", [
    (NeighborhoodAttention1D, (1, 19, 16), 5, 2),
    (NeighborhoodAttention2D, (2, 14, 11, 16), 7, 1),
    (NeighborhoodAttention2D, (1, 12, 12, 16), 3, (4, 2)),
    (NeighborhoodAttention3D, (1, 6, 7, 5, 16), 3, (1, 2, 1)),
])
def test_module_equals_fused_op(cls, shape, kernel, dilation):
    torch.manual_seed(0)
    m = cls(dim=16, num_heads=2, kernel_size=kernel, dilation=dilation).eval()
    torch.nn.init.normal_(m.rpb, std=0.5)
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.allclose(m(x), _manual(m, x), atol=1e-5)


def test_state_dict_keys_match_nat_checkpoints():
    m = NeighborhoodAttention2D(dim=32, num_heads=4, kernel_size=7)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "qkv.weight": (96, 32), "qkv.bias": (96,), "rpb": (4, 13, 13), "proj.weight": (32, 32), "proj.bias": (32,)}
    assert "rpb" not in NeighborhoodAttention2D(32, 4, 7, rel_pos_bias=False).state_dict()


def test_small_maps_are_padded_then_cropped_like_natten_0_14():
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=7).eval()
    x = torch.randn(1, 5, 4, 8)
    with torch.no_grad():
        out = m(x)
        ref = _manual(m, F.pad(x, (0, 0, 0, 3, 0, 2)))[:, :5, :4]
    assert out.shape == x.shape and torch.allclose(out, ref, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by num_heads \(4\)"):
        NeighborhoodAttention2D(10, 4, 3)
    with pytest.raises(ValueError, match="expects"):
        NeighborhoodAttention2D(8, 2, 3)(torch.randn(1, 8, 8))
