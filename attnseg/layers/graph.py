"""Spectral graph convolution on small fixed graphs, in plain torch (no torch_geometric).

:class:`ChebConv` is PyG's ``ChebConv`` (Defferrard et al., NeurIPS 2016) with ``normalization="sym"`` and
``lambda_max = 2``, the configuration HybridGNet uses: with ``A`` the binary adjacency (self-loops removed, edge
values ignored) and ``D`` its degrees, ``L_hat = 2 L / lambda_max - I = -D^-1/2 A D^-1/2`` and

    ``T_0 = X``, ``T_1 = L_hat X``, ``T_k = 2 L_hat T_{k-1} - T_{k-2}``, ``out = sum_{k<K} T_k W_k + b``.

The graphs here (landmark contours, a few hundred nodes) are small, so the propagation is dense: one 0/1 selection
matmul per neighbour slot over ``[..., N, F]`` features (any leading batch dims), weighted and summed in the order
PyG's message passing rounds them (bit-equal to PyG on ring graphs; deterministic, no scatter). Parameter names follow PyG 2.x
(``lins.{k}.weight`` ``[out, in]``, ``bias``), so PyG state_dicts load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChebConv", "cheb_laplacian", "graph_pool"]


def cheb_laplacian(adjacency: torch.Tensor) -> torch.Tensor:
    """``L_hat = -D^-1/2 A D^-1/2`` of a dense adjacency ``[N, N]`` (nonzero = edge; the diagonal is ignored), i.e.
    PyG's scaled ``sym`` Laplacian for ``lambda_max = 2``, as a dense float64 matrix (isolated nodes: zero rows)."""
    nbr, deg = _neighbours(adjacency)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    return -(inv[:, None] * (adjacency != 0).fill_diagonal_(False).double() * inv[None, :])


def _neighbours(adjacency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(neighbours [N, Dmax] (-1 = none), degree [N] float64)`` of a dense adjacency (edge ``j -> i`` where
    ``A[j, i] != 0``; self-loops removed, as PyG's ``get_laplacian`` does)."""
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"adjacency must be a square [N, N] matrix, got {list(adjacency.shape)}")
    a = (adjacency != 0).clone()
    a.fill_diagonal_(False)
    n = a.shape[0]
    lists = [torch.nonzero(a[:, i]).flatten().tolist() for i in range(n)]  # sources j of the edges j -> i
    width = max((len(x) for x in lists), default=0)
    nbr = torch.full((n, max(width, 1)), -1, dtype=torch.long)
    for i, src in enumerate(lists):
        nbr[i, :len(src)] = torch.tensor(src, dtype=torch.long)
    return nbr, a.sum(1).double()  # PyG: degree of the source index (our graphs are symmetric)


def graph_pool(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``out_i = sum_j M_ij x_j``: ``x`` ``[..., N_in, F]``, ``matrix`` ``[N_out, N_in]`` -> ``[..., N_out, F]``
    (HybridGNet's COMA-style ``Pool`` with the up- or downsampling matrix)."""
    return torch.matmul(matrix.to(x.dtype), x)


class ChebConv(nn.Module):
    """Chebyshev spectral graph convolution of order ``K`` on a fixed graph.

    Args:
        in_channels: input features per node.
        out_channels: output features per node.
        adjacency: dense ``[N, N]`` adjacency (kept as non-persistent buffers; nothing graph-related is saved).
        K: number of Chebyshev terms (``K = 1``: a per-node linear map, the graph is not used).
        bias: add a learnable bias.
        init_std: weights (and bias) drawn from ``N(0, init_std)`` (HybridGNet's init); None: PyG's glorot and zeros.

    Forward: ``x`` ``[..., N, in_channels]`` -> ``[..., N, out_channels]``.

    Example::

        >>> ring = torch.roll(torch.eye(6), 1, 0) + torch.roll(torch.eye(6), -1, 0)
        >>> ChebConv(4, 8, ring, K=3)(torch.randn(2, 6, 4)).shape
        torch.Size([2, 6, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, adjacency: torch.Tensor, K: int, bias: bool = True,
                 init_std: float | None = 0.1) -> None:
        super().__init__()
        if K < 1:
            raise ValueError(f"K must be >= 1, got {K=}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be >= 1, got {in_channels=}, {out_channels=}")
        self.in_channels, self.out_channels, self.K = in_channels, out_channels, K
        self.lins = nn.ModuleList(nn.Linear(in_channels, out_channels, bias=False) for _ in range(K))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nbr, deg = _neighbours(adjacency)
        n = nbr.shape[0]
        # The propagation L_hat x = sum_d w_d * (P_d x) with 0/1 selection matrices P_d (P_d x copies neighbour d
        # exactly) and per-edge weights w_d = -(deg_j^-1/2 * deg_i^-1/2) computed in the input dtype: the same
        # roundings as PyG's message passing (products, then a sum), so outputs match it bit for bit on rings.
        select = torch.zeros(nbr.shape[1], n, n)
        valid = nbr >= 0
        for d in range(nbr.shape[1]):
            rows = torch.nonzero(valid[:, d]).flatten()
            select[d, rows, nbr[rows, d]] = 1.0
        self.register_buffer("select", select, persistent=False)  # [Dmax, N, N]
        self.register_buffer("neighbours", nbr, persistent=False)  # [N, Dmax], -1 = none
        self.register_buffer("degree", deg, persistent=False)  # [N] float64
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float | None = 0.1) -> None:
        for lin in self.lins:
            if init_std is None:
                nn.init.xavier_uniform_(lin.weight)
            else:
                nn.init.normal_(lin.weight, 0.0, init_std)
        if self.bias is not None:
            if init_std is None:
                nn.init.zeros_(self.bias)
            else:
                nn.init.normal_(self.bias, 0.0, init_std)

    @property
    def num_nodes(self) -> int:
        return self.select.shape[1]

    def edge_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """``[Dmax, N, 1]``: the weight of each node's neighbour ``d`` in ``L_hat`` (0 where there is none),
        computed as PyG does: ``-(deg_j^-1/2 * 1 * deg_i^-1/2)`` in ``dtype``."""
        deg = self.degree.to(dtype)
        inv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))  # [N]
        nbr = self.neighbours.clamp_min(0)
        w = -((inv[nbr] * 1.0) * inv[:, None])  # [N, Dmax]: source j = nbr, target i
        w = torch.where(self.neighbours >= 0, w, torch.zeros_like(w))
        return w.t().unsqueeze(-1)

    def propagate(self, x: torch.Tensor) -> torch.Tensor:
        """``L_hat x`` for ``x`` ``[..., N, F]``."""
        w = self.edge_weights(x.dtype)
        sel = self.select.to(x.dtype)
        out = w[0] * torch.matmul(sel[0], x)
        for d in range(1, sel.shape[0]):
            out = out + w[d] * torch.matmul(sel[d], x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.num_nodes or x.shape[-1] != self.in_channels:
            raise ValueError(f"ChebConv expects [..., {self.num_nodes} nodes, {self.in_channels} features], got "
                             f"{list(x.shape)}")
        t0 = x
        out = self.lins[0](t0)
        if self.K > 1:
            t1 = self.propagate(x)
            out = out + self.lins[1](t1)
            for lin in self.lins[2:]:
                t2 = 2.0 * self.propagate(t1) - t0
                out = out + lin(t2)
                t0, t1 = t1, t2
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, K={self.K}, nodes={self.num_nodes}, bias={self.bias is not None}"
