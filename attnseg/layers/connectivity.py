"""Connectivity representation of masks: encoding, bilateral voting and the decode rules, as pure tensor ops.

Papers: Kampffmeyer et al., "ConnNet: A Long-Range Relation-Aware Pixel-Connectivity Network for Salient Segmentation"
(arXiv 1804.07836; no official code); Yang et al., "BiconNet: An Edge-preserved Connectivity-based Approach for
Salient Object Detection" (Pattern Recognition 2022, arXiv 2103.00334; Zyun-Y/BiconNets @ 38215c0 and
Zyun-Y/BiconNet-Medical @ f772f78); Yang & Farsiu, "Directional Connectivity-based Segmentation of Medical Images"
(CVPR 2023, arXiv 2304.00145; Zyun-Y/DconnNet @ e55ac71). Written anew; shared by the connectivity heads
(:mod:`attnseg.heads.connectivity`) and the ``connectivity`` loss (:mod:`attnseg.engine.losses`).

**Neighbourhoods.** ``N`` offsets ``delta_k``, ordered lexicographically over the offset tuple (``(d_row, d_col)``
in 2D, ``(d_depth, d_row, d_col)`` in 3D) without the zero offset: 2D 8-connectivity is the official raster order
``(-1,-1), (-1,0), (-1,+1), (0,-1), (0,+1), (+1,-1), (+1,0), (+1,+1)``; 2D 4-, 3D 6- and 3D 26-connectivity follow the
same rule. A symmetric set sorted that way puts the opposite of ``k`` at ``N - 1 - k``.

**Encoding.** For a binary map ``M`` of one class, channel ``k`` of the connectivity cube is
``C_k(p) = M(p) * M(p + delta_k)`` (zero where ``p + delta_k`` is outside); with ``K`` classes (one-hot maps) the
channel of class ``c``, direction ``k`` is ``N * c + k`` (DconnNet's ``connectivity_matrix``; BiconNets' ``sal2conn``
gives the same tensor). The edge map of a class is 1 where ``0 < sum_k C_k < N``.

**Bilateral voting.** ``V_k(p) = P_k(p) * P_{N-1-k}(p + delta_k)`` (zero outside): pixel ``p`` says it links to its
``k``-th neighbour and the neighbour says it links back. ``S = max_k V_k``. The official code shifts with dense
0/1 translation matrices and ``bmm`` (O(H^2 + W^2) memory, one fixed size per run); here a shift is one zero pad
and a slice, for any size, rank and device, with the same values (multiplication by the 0/1 matrices is exact).

**Decode rules** (:data:`DECODE_RULES`; ``logits`` are the ``N * K`` channels a model predicts):

- ``"soft"`` (BiconNets ``bv_test``): ``S`` of the sigmoid probabilities; mask ``S > 0.5``. With ``K > 1``, the
  label is the argmax of the per-class ``S`` (an attnseg extension).
- ``"binarize"`` (DconnNet single class, BiconNet-Medical test): sigmoid, threshold at 0.5, then vote: a pixel is
  foreground when some direction is linked both ways. Its probability map :func:`class_probabilities` is
  ``max_k min(P_k(p), P_{N-1-k}(p + delta_k))``, whose threshold at 0.5 is exactly that rule.
- ``"multiclass"`` (DconnNet, ``K > 1``): vote on the **raw logits** (products of logits, as the official test
  code does), softmax over classes, argmax.

Voting the ground-truth cube gives the mask back except isolated foreground pixels (no foreground neighbour):
connectivity cannot represent a one-pixel object.

Example::

    >>> mask = torch.zeros(1, 1, 5, 6); mask[0, 0, 1:4, 1:5] = 1
    >>> cube = encode(mask)  # [1, 8, 5, 6]
    >>> torch.equal(vote(cube)[0], mask)
    True
    >>> vol = torch.zeros(1, 1, 4, 5, 6); vol[0, 0, 1:3, 1:4, 2:5] = 1
    >>> torch.equal(vote(encode(vol, neighbours=26), neighbours=26)[0], vol)
    True
"""

from __future__ import annotations

import itertools
from functools import cache

import torch
import torch.nn.functional as F

__all__ = ["DECODE_RULES", "NEIGHBOURS", "neighbour_offsets", "default_neighbours", "check_neighbours", "check_decode",
           "shift", "encode", "encode_labels", "edge_map", "vote", "binarized_vote", "class_probabilities", "label_map",
           "flip"]

DECODE_RULES = ("soft", "binarize", "multiclass")
NEIGHBOURS = {2: (8, 4), 3: (26, 6)}  # neighbourhood sizes per rank, default first


def default_neighbours(spatial_dims: int) -> int:
    """8 in 2D, 26 in 3D."""
    return NEIGHBOURS[_check_rank(spatial_dims)][0]


def _check_rank(spatial_dims: int) -> int:
    if spatial_dims not in NEIGHBOURS:
        raise ValueError(f"connectivity is defined for 2 or 3 spatial axes, got {spatial_dims=}")
    return spatial_dims


def check_neighbours(neighbours: int | None, spatial_dims: int) -> int:
    """``neighbours`` validated for the rank (``None``: the default, 8 or 26)."""
    allowed = NEIGHBOURS[_check_rank(spatial_dims)]
    if neighbours is None:
        return allowed[0]
    if neighbours not in allowed:
        raise ValueError(f"neighbours must be one of {allowed} in {spatial_dims}D, got {neighbours=}")
    return int(neighbours)


@cache
def neighbour_offsets(spatial_dims: int = 2, neighbours: int | None = None) -> tuple[tuple[int, ...], ...]:
    """The ``N`` offsets in channel order: lexicographic over the offset tuple, zero excluded.

    ``neighbours``: 8 (default) or 4 in 2D, 26 (default) or 6 in 3D. Opposite of ``k`` is ``N - 1 - k``.

    Example::

        >>> neighbour_offsets(2)
        ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
        >>> neighbour_offsets(3, 6)
        ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, 1), (0, 1, 0), (1, 0, 0))
    """
    n = check_neighbours(neighbours, spatial_dims)
    full = [o for o in itertools.product((-1, 0, 1), repeat=spatial_dims) if any(o)]
    offsets = tuple(full if n == 3**spatial_dims - 1 else [o for o in full if sum(map(abs, o)) == 1])
    assert all(tuple(-v for v in offsets[k]) == offsets[len(offsets) - 1 - k] for k in range(len(offsets)))
    return offsets


def _padded(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    return F.pad(x, [1] * (2 * spatial_dims))  # zero border of one on every spatial axis


def _slice(padded: torch.Tensor, offset: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    """``y[p] = x[p + offset]`` from the once-padded ``x``."""
    return padded[(..., *(slice(1 + d, 1 + d + n) for d, n in zip(offset, size)))]


def shift(x: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
    """``y[..., p] = x[..., p + offset]`` over the last ``len(offset)`` axes, zero where ``p + offset`` is outside
    (offsets in ``{-1, 0, 1}``).

    Example::

        >>> shift(torch.arange(1., 5.).view(1, 4), (1,))
        tensor([[2., 3., 4., 0.]])
    """
    dims = len(offset)
    return _slice(_padded(x, dims), offset, tuple(x.shape[-dims:]))


def _split(cube: torch.Tensor, neighbours: int | None, spatial_dims: int | None) -> tuple[torch.Tensor, int, int]:
    """``[B, N*K, *S]`` -> ``([B, K, N, *S], N, dims)``."""
    dims = cube.dim() - 2 if spatial_dims is None else spatial_dims
    n = check_neighbours(neighbours, dims)
    if cube.dim() != dims + 2 or cube.shape[1] % n:
        raise ValueError(f"expected a connectivity map [B, {n} * K, {', '.join('DHW'[-dims:])}] ({n} neighbours), "
                         f"got shape {list(cube.shape)}")
    return cube.unflatten(1, (cube.shape[1] // n, n)), n, dims


def encode(masks: torch.Tensor, neighbours: int | None = None) -> torch.Tensor:
    """Binary maps ``[B, K, *S]`` (one per class, e.g. one-hot) -> connectivity cube ``[B, N * K, *S]``.

    Channel ``N * c + k`` is ``masks[:, c](p) * masks[:, c](p + delta_k)``; 2 or 3 spatial axes (``N`` = 8/26 by
    default). The values are products of the inputs, so 0/1 maps give an exact 0/1 cube.
    """
    dims = masks.dim() - 2
    offsets = neighbour_offsets(dims, check_neighbours(neighbours, dims))
    size = tuple(masks.shape[2:])
    padded = _padded(masks, dims)
    cube = torch.stack([masks * _slice(padded, o, size) for o in offsets], dim=2)  # [B, K, N, *S]
    return cube.flatten(1, 2)


def encode_labels(labels: torch.Tensor, num_classes: int, neighbours: int | None = None) -> torch.Tensor:
    """Integer label map ``[B, *S]`` -> cube ``[B, N * max(K, 1), *S]`` (float32).

    ``num_classes == 1``: the labels are the binary mask (values 0/1); otherwise the one-hot maps of the
    ``num_classes`` classes (DconnNet's multi-class target: background is class 0 and has its own channels).
    """
    return encode(_masks(labels, num_classes), neighbours)


def _masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if num_classes == 1:
        return labels.unsqueeze(1).float()
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def edge_map(cube: torch.Tensor, neighbours: int | None = None) -> torch.Tensor:
    """Cube ``[B, N * K, *S]`` -> edge maps ``[B, K, *S]``: 1 where ``0 < sum_k C_k < N``, else 0 (same dtype)."""
    split, n, _ = _split(cube, neighbours, None)
    total = split.sum(2)
    return ((total > 0) & (total < n)).to(cube.dtype)


def vote(cube: torch.Tensor, neighbours: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilateral voting: ``[B, N * K, *S]`` -> ``(S [B, K, *S], V [B, K, N, *S])``.

    ``V_k(p) = x_k(p) * x_{N-1-k}(p + delta_k)`` (zero outside) and ``S = max_k V_k``, per class. ``x`` is whatever
    the rule votes on: sigmoid probabilities, 0/1 maps, or raw logits (DconnNet's multi-class test).
    """
    split, n, dims = _split(cube, neighbours, None)
    offsets = neighbour_offsets(dims, n)
    size = tuple(cube.shape[2:])
    padded = _padded(split, dims)  # [B, K, N, *S + 2]
    back = torch.stack([_slice(padded[:, :, n - 1 - k], o, size) for k, o in enumerate(offsets)], dim=2)
    votes = split * back  # [B, K, N, *S]
    return votes.amax(2), votes


def binarized_vote(cube_probs: torch.Tensor, neighbours: int | None = None) -> torch.Tensor:
    """``max_k min(P_k(p), P_{N-1-k}(p + delta_k))`` ``[B, K, *S]``: the continuous form of "threshold the
    probabilities at 0.5, then vote": it is above 0.5 exactly where that rule gives foreground."""
    split, n, dims = _split(cube_probs, neighbours, None)
    offsets = neighbour_offsets(dims, n)
    size = tuple(cube_probs.shape[2:])
    padded = _padded(split, dims)
    back = torch.stack([_slice(padded[:, :, n - 1 - k], o, size) for k, o in enumerate(offsets)], dim=2)
    return torch.minimum(split, back).amax(2)


def check_decode(decode: str | None, num_classes: int) -> str:
    """``decode`` validated for ``num_classes`` (``None``: ``"soft"`` for one class, ``"multiclass"`` for several)."""
    if decode is None:
        return "soft" if num_classes == 1 else "multiclass"
    if decode not in DECODE_RULES:
        raise ValueError(f"decode must be one of {DECODE_RULES}, got {decode!r}")
    if decode == "multiclass" and num_classes < 2:
        raise ValueError("decode='multiclass' (softmax over classes) needs num_classes >= 2; use 'soft' or "
                         "'binarize' for one class")
    if decode == "binarize" and num_classes != 1:
        raise ValueError(f"decode='binarize' is DconnNet's single-class rule; with {num_classes=} use 'multiclass' "
                         "(DconnNet) or 'soft'")
    return decode


def class_probabilities(logits: torch.Tensor, num_classes: int, decode: str,
                        neighbours: int | None = None) -> torch.Tensor:
    """Connectivity logits ``[B, N * K, *S]`` -> per-class probabilities ``[B, K, *S]`` by the decode rule.

    ``soft``: ``S`` of the sigmoid (``K > 1``: normalised over classes); ``binarize``: :func:`binarized_vote` of the
    sigmoid; ``multiclass``: softmax over classes of ``S`` voted on the raw logits. Thresholding at 0.5 (one class)
    or the argmax (several) gives :func:`label_map` in every rule.
    """
    check_decode(decode, num_classes)
    if decode == "multiclass":
        return torch.softmax(vote(logits, neighbours)[0], dim=1)
    probs = torch.sigmoid(logits)
    if decode == "binarize":
        return binarized_vote(probs, neighbours)
    s = vote(probs, neighbours)[0]
    return s if num_classes == 1 else s / s.sum(1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def label_map(logits: torch.Tensor, num_classes: int, decode: str, neighbours: int | None = None) -> torch.Tensor:
    """Connectivity logits ``[B, N * K, *S]`` -> label map ``[B, *S]`` (int64) by the decode rule.

    ``binarize`` computes the official rule itself (threshold, then vote on the 0/1 maps); ``multiclass`` is the
    argmax of the raw-logit vote (softmax does not change it).
    """
    check_decode(decode, num_classes)
    if decode == "binarize":
        return vote((torch.sigmoid(logits) > 0.5).to(logits.dtype), neighbours)[0][:, 0].long()
    if decode == "multiclass":
        return vote(logits, neighbours)[0].argmax(1)
    s = vote(torch.sigmoid(logits), neighbours)[0]
    return (s[:, 0] > 0.5).long() if num_classes == 1 else s.argmax(1)


def flip(cube: torch.Tensor, axis: int, neighbours: int | None = None) -> torch.Tensor:
    """The cube of the mirrored image: flip spatial tensor ``axis`` (2.. or negative) and move each direction's
    channels to the mirrored direction (its offset negated along that axis), for every class.

    ``flip(encode(m), a) == encode(m.flip(a))``; test-time flip averaging maps outputs back with this.
    """
    split, n, dims = _split(cube, neighbours, None)
    ax = axis % cube.dim()
    if not 2 <= ax < cube.dim():
        raise ValueError(f"axis must be a spatial axis of a [B, C, *S] map, got {axis=} for shape {list(cube.shape)}")
    offsets = neighbour_offsets(dims, n)
    a = ax - 2
    source = [offsets.index(tuple(-v if i == a else v for i, v in enumerate(o))) for o in offsets]
    return split[:, :, source].flip(ax + 1).flatten(1, 2)
