"""The ``triton`` backend: fused flash-style neighborhood attention for GPUs, forward and backward.

Every problem is run as 3D (1D and 2D maps get leading axes of size 1 and kernel 1). One program handles
one box-shaped tile of queries of one (batch, head, dilation group): dilation groups are independent
sub-lattices read with stride ``d`` (no permute copy). The keys any query of the tile can see lie in one box
(window bounds are monotone in the query coordinate), which is walked in key tiles with an online softmax;
each (query, key) pair is masked by the per-query window ``[lo, hi)`` read from the semantic core's tables
(:mod:`attnseg.ops.windows`), so stride, causal windows, even kernels and the zero-padded mode come for free.

Backward is deterministic (no atomics): one kernel recomputes the probabilities per query tile for dQ, a
second one walks, per key tile, the box of queries that can see it (again an interval per axis) for dK and dV,
summing the query heads of a key/value head in a fixed order. The relative-position-bias gradient comes from
the per-slot logit gradients the dQ kernel stores, reduced by one-hot contractions.

The same kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (correctness only, slow), which is how the
tests exercise them without a GPU.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch

from attnseg.ops.merge import attend_extra_and_merge
from attnseg.ops.windows import axis_bounds, rpb_onehot

try:  # triton is a dependency of CUDA builds of torch; a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["na_fused_triton", "can_run_triton"]

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_triton(*tensors: torch.Tensor, op: str = "fused", **_: Any) -> str | None:
    if triton is None:
        return "triton is not installed"
    if op != "fused":
        return "only the fused op has Triton kernels"
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"} and not (devices == {"cpu"} and _interpreting()):
        return "inputs are not on a CUDA device (CPU tensors run only under TRITON_INTERPRET=1)"
    allowed = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if _interpreting() else ())
    if any(t.dtype not in allowed for t in tensors):
        return f"unsupported dtype {tensors[0].dtype} (fp16, bf16 and fp32 are supported)"
    if any(t.shape[-1] > 256 for t in tensors[:3]):
        return f"head_dim {tensors[0].shape[-1]} > 256"
    return None


# -- tables ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _bounds_on(geometry: tuple, device: torch.device) -> torch.Tensor:
    """``int32 [3, 5, Lmax]``: :func:`axis_bounds` of the three axes, padded, on ``device``."""
    tables = [axis_bounds(*axis) for axis in geometry]
    width = max(t.shape[1] for t in tables)
    out = torch.zeros(3, 5, width, dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, :, : t.shape[1]] = t
    return out.to(device)


# -- kernels ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tile_coords(tile, TX: tl.constexpr, TY: tl.constexpr, TZ: tl.constexpr, LY, LZ, DY, DZ):
        """Group coordinates of the elements of tile number ``tile`` (row-major over tiles and elements)."""
        nty = tl.cdiv((LY + DY - 1) // DY, TY)
        ntz = tl.cdiv((LZ + DZ - 1) // DZ, TZ)
        e = tl.arange(0, TX * TY * TZ)
        tx = tile // (nty * ntz)
        ty = (tile // ntz) % nty
        tz = tile % ntz
        return tx * TX + e // (TY * TZ), ty * TY + (e // TZ) % TY, tz * TZ + e % TZ, tx * TX, ty * TY, tz * TZ

    @triton.jit
    def _load_bounds(TAB, TAB_L, axis: tl.constexpr, field: tl.constexpr, real, ok):
        return tl.load(TAB + (axis * 5 + field) * TAB_L + real, mask=ok, other=0)

    @triton.jit
    def _split_program(pid, H, DX, DY, DZ, LX, LY, LZ):
        """Batch, head, dilation group and group lengths of program ``pid`` (of ``B * H * DX * DY * DZ``)."""
        gz = pid % DZ
        gy = (pid // DZ) % DY
        gx = (pid // (DZ * DY)) % DX
        h = (pid // (DZ * DY * DX)) % H
        b = pid // (DZ * DY * DX * H)
        return b, h, gx, gy, gz, (LX - gx + DX - 1) // DX, (LY - gy + DY - 1) // DY, (LZ - gz + DZ - 1) // DZ

    @triton.jit
    def _windows(TAB, TAB_L, xq, yq, zq, q_ok):
        """Per-query window bounds ``[lo, hi)`` on the three axes."""
        return (_load_bounds(TAB, TAB_L, 0, 0, xq, q_ok), _load_bounds(TAB, TAB_L, 0, 1, xq, q_ok),
                _load_bounds(TAB, TAB_L, 1, 0, yq, q_ok), _load_bounds(TAB, TAB_L, 1, 1, yq, q_ok),
                _load_bounds(TAB, TAB_L, 2, 0, zq, q_ok), _load_bounds(TAB, TAB_L, 2, 1, zq, q_ok))

    @triton.jit
    def _box(TAB, TAB_L, first: tl.constexpr, last: tl.constexpr, x0, y0, z0, x1, y1, z1, DX, DY, DZ, gx, gy, gz):
        """Box of group coordinates from table rows ``first`` (at the tile's first element) and ``last`` (at its
        last): the keys a query tile sees (rows lo, hi) or the queries that see a key tile (q_first, q_end)."""
        return (tl.load(TAB + first * TAB_L + x0 * DX + gx), tl.load(TAB + last * TAB_L + x1 * DX + gx),
                tl.load(TAB + (5 + first) * TAB_L + y0 * DY + gy), tl.load(TAB + (5 + last) * TAB_L + y1 * DY + gy),
                tl.load(TAB + (10 + first) * TAB_L + z0 * DZ + gz),
                tl.load(TAB + (10 + last) * TAB_L + z1 * DZ + gz))

    @triton.jit
    def _query_tile(TAB, TAB_L, ix, iy, iz, ix0, iy0, iz0, lgx, lgy, lgz, DX, DY, DZ, gx, gy, gz,
                    TX: tl.constexpr, TY: tl.constexpr, TZ: tl.constexpr):
        """A query tile's validity, real coordinates, per-query windows and the box of keys they see."""
        q_ok = (ix < lgx) & (iy < lgy) & (iz < lgz)
        xq, yq, zq = ix * DX + gx, iy * DY + gy, iz * DZ + gz
        lox, hix, loy, hiy, loz, hiz = _windows(TAB, TAB_L, xq, yq, zq, q_ok)
        kx0, kx1, ky0, ky1, kz0, kz1 = _box(TAB, TAB_L, 0, 1, ix0, iy0, iz0, tl.minimum(ix0 + TX, lgx) - 1,
                                            tl.minimum(iy0 + TY, lgy) - 1, tl.minimum(iz0 + TZ, lgz) - 1,
                                            DX, DY, DZ, gx, gy, gz)
        return q_ok, xq, yq, zq, lox, hix, loy, hiy, loz, hiz, kx0, kx1, ky0, ky1, kz0, kz1

    @triton.jit
    def _box_tile(n, x0, y0, z0, x1, y1, z1, BY: tl.constexpr, BZ: tl.constexpr):
        """Coordinates of the elements ``n`` of a sub-tile at ``(x0, y0, z0)`` and which lie inside the box end."""
        x = x0 + n // (BY * BZ)
        y = y0 + (n // BZ) % BY
        z = z0 + n % BZ
        return x, y, z, (x < x1) & (y < y1) & (z < z1)

    @triton.jit
    def _load_rows(PTR, b, s_b, x, s_x, y, s_y, z, s_z, h, s_h, DX, DY, DZ, gx, gy, gz, ok, cols, width):
        """``[rows, cols]`` tile of a ``[B, X, Y, Z, heads, dim]`` tensor at group coordinates ``(x, y, z)``."""
        off = b * s_b + (x * DX + gx) * s_x + (y * DY + gy) * s_y + (z * DZ + gz) * s_z + h * s_h
        return tl.load(PTR + off[:, None] + cols[None, :], mask=ok[:, None] & (cols[None, :] < width), other=0.0)

    @triton.jit
    def _bias(RPB, h, ix, iy, iz, jx, jy, jz, KX, KY, KZ, mask, TRANSPOSED: tl.constexpr, ACC: tl.constexpr):
        """Relative position bias of each (query, key) pair in log2 units (``[keys, queries]`` if TRANSPOSED)."""
        if TRANSPOSED:
            r = _rpb_index_t(ix, iy, iz, jx, jy, jz, KX, KY, KZ)
        else:
            r = _rpb_index(ix, iy, iz, jx, jy, jz, KX, KY, KZ)
        bias = tl.load(RPB + h * ((2 * KX - 1) * (2 * KY - 1) * (2 * KZ - 1)) + r, mask=mask, other=0.0)
        return bias.to(ACC) * 1.4426950408889634

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE == 2:  # the interpreter multiplies bf16 tiles as raw bits: upcast there (never on a GPU)
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        elif IEEE == 1:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _pair_mask(ix, iy, iz, jx, jy, jz, q_ok, k_ok, lox, hix, loy, hiy, loz, hiz):
        """``[queries, keys]``: key ``j`` lies in query ``i``'s window on every axis."""
        m = q_ok[:, None] & k_ok[None, :]
        m = m & (jx[None, :] >= lox[:, None]) & (jx[None, :] < hix[:, None])
        m = m & (jy[None, :] >= loy[:, None]) & (jy[None, :] < hiy[:, None])
        return m & (jz[None, :] >= loz[:, None]) & (jz[None, :] < hiz[:, None])

    @triton.jit
    def _rpb_index(ix, iy, iz, jx, jy, jz, KX, KY, KZ):
        """``[queries, keys]`` flat index into the bias table: per axis ``j - i + k - 1``, clamped like NATTEN."""
        rx = tl.minimum(tl.maximum(jx[None, :] - ix[:, None] + KX - 1, 0), 2 * KX - 2)
        ry = tl.minimum(tl.maximum(jy[None, :] - iy[:, None] + KY - 1, 0), 2 * KY - 2)
        rz = tl.minimum(tl.maximum(jz[None, :] - iz[:, None] + KZ - 1, 0), 2 * KZ - 2)
        return (rx * (2 * KY - 1) + ry) * (2 * KZ - 1) + rz

    @triton.jit
    def _pair_mask_t(ix, iy, iz, jx, jy, jz, q_ok, k_ok, lox, hix, loy, hiy, loz, hiz):
        """``[keys, queries]``: :func:`_pair_mask` transposed (the dK/dV kernel works key-major)."""
        m = k_ok[:, None] & q_ok[None, :]
        m = m & (jx[:, None] >= lox[None, :]) & (jx[:, None] < hix[None, :])
        m = m & (jy[:, None] >= loy[None, :]) & (jy[:, None] < hiy[None, :])
        return m & (jz[:, None] >= loz[None, :]) & (jz[:, None] < hiz[None, :])

    @triton.jit
    def _rpb_index_t(ix, iy, iz, jx, jy, jz, KX, KY, KZ):
        """``[keys, queries]``: :func:`_rpb_index` transposed."""
        rx = tl.minimum(tl.maximum(jx[:, None] - ix[None, :] + KX - 1, 0), 2 * KX - 2)
        ry = tl.minimum(tl.maximum(jy[:, None] - iy[None, :] + KY - 1, 0), 2 * KY - 2)
        rz = tl.minimum(tl.maximum(jz[:, None] - iz[None, :] + KZ - 1, 0), 2 * KZ - 2)
        return (rx * (2 * KY - 1) + ry) * (2 * KZ - 1) + rz

    @triton.jit
    def _key_tile_logits(K, RPB, q, n, jx0, jy0, jz0, kx1, ky1, kz1, b, s_kb, s_kx, s_ky, s_kz, hk, s_kh, h,
                         DX, DY, DZ, gx, gy, gz, d, D, ix, iy, iz, q_ok, lox, hix, loy, hiy, loz, hiz,
                         KX, KY, KZ, qk_scale, BY: tl.constexpr, BZ: tl.constexpr, HAS_RPB: tl.constexpr,
                         IEEE: tl.constexpr, ACC: tl.constexpr):
        """One key tile of a query tile's box: its coordinates, keys, log2-unit logits (+ bias) and window mask.

        The logits are not masked; callers apply ``mask`` as their pass needs (-inf, or zero probabilities).
        """
        jx, jy, jz, k_ok = _box_tile(n, jx0, jy0, jz0, kx1, ky1, kz1, BY, BZ)
        kt = _load_rows(K, b, s_kb, jx, s_kx, jy, s_ky, jz, s_kz, hk, s_kh, DX, DY, DZ, gx, gy, gz, k_ok, d, D)
        s = _dot(q, tl.trans(kt), IEEE).to(ACC) * qk_scale
        mask = _pair_mask(ix, iy, iz, jx, jy, jz, q_ok, k_ok, lox, hix, loy, hiy, loz, hiz)
        if HAS_RPB:
            s += _bias(RPB, h, ix, iy, iz, jx, jy, jz, KX, KY, KZ, mask, False, ACC)
        return jx, jy, jz, k_ok, kt, s, mask

    @triton.jit
    def _na_forward_kernel(
        Q, K, V, OUT, LSE, TAB, RPB,
        s_qb, s_qx, s_qy, s_qz, s_qh,
        s_kb, s_kx, s_ky, s_kz, s_kh,
        s_vb, s_vx, s_vy, s_vz, s_vh,
        H, REP, LX, LY, LZ, DX, DY, DZ, TAB_L, KX, KY, KZ, D, DV, qk_scale,
        TX: tl.constexpr, TY: tl.constexpr, TZ: tl.constexpr,
        BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,
        BD: tl.constexpr, BDV: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
    ):
        # program = (query tile, batch * head * dilation group); OUT is laid out like Q with DV columns,
        # LSE is [B, X, Y, Z, H]
        b, h, gx, gy, gz, lgx, lgy, lgz = _split_program(tl.program_id(1), H, DX, DY, DZ, LX, LY, LZ)
        hk = h // REP
        ix, iy, iz, ix0, iy0, iz0 = _tile_coords(tl.program_id(0), TX, TY, TZ, LY, LZ, DY, DZ)
        if (ix0 < lgx) & (iy0 < lgy) & (iz0 < lgz):
            q_ok, xq, yq, zq, lox, hix, loy, hiy, loz, hiz, kx0, kx1, ky0, ky1, kz0, kz1 = _query_tile(
                TAB, TAB_L, ix, iy, iz, ix0, iy0, iz0, lgx, lgy, lgz, DX, DY, DZ, gx, gy, gz, TX, TY, TZ)
            d = tl.arange(0, BD)
            dv = tl.arange(0, BDV)
            q = _load_rows(Q, b, s_qb, ix, s_qx, iy, s_qy, iz, s_qz, h, s_qh, DX, DY, DZ, gx, gy, gz, q_ok, d, D)
            m_i = tl.full([TX * TY * TZ], float("-inf"), dtype=ACC)
            l_i = tl.zeros([TX * TY * TZ], dtype=ACC)
            acc = tl.zeros([TX * TY * TZ, BDV], dtype=ACC)
            n = tl.arange(0, BX * BY * BZ)
            for jx0 in range(kx0, kx1, BX):
                for jy0 in range(ky0, ky1, BY):
                    for jz0 in range(kz0, kz1, BZ):
                        jx, jy, jz, k_ok, kt, s, mask = _key_tile_logits(
                            K, RPB, q, n, jx0, jy0, jz0, kx1, ky1, kz1, b, s_kb, s_kx, s_ky, s_kz, hk, s_kh, h,
                            DX, DY, DZ, gx, gy, gz, d, D, ix, iy, iz, q_ok, lox, hix, loy, hiy, loz, hiz,
                            KX, KY, KZ, qk_scale, BY, BZ, HAS_RPB, IEEE, ACC)
                        s = tl.where(mask, s, float("-inf"))
                        m_new = tl.maximum(m_i, tl.max(s, 1))
                        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
                        p = tl.math.exp2(s - base[:, None])
                        alpha = tl.math.exp2(m_i - base)
                        l_i = l_i * alpha + tl.sum(p, 1)
                        vt = _load_rows(V, b, s_vb, jx, s_vx, jy, s_vy, jz, s_vz, hk, s_vh, DX, DY, DZ, gx, gy, gz,
                                        k_ok, dv, DV)
                        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE).to(ACC)
                        m_i = m_new
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            row = (b * LX * LY * LZ + (xq * LY + yq) * LZ + zq) * H + h
            tl.store(OUT + row[:, None] * DV + dv[None, :], (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
                     mask=q_ok[:, None] & (dv[None, :] < DV))
            lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
            tl.store(LSE + row, lse, mask=q_ok)

    @triton.jit
    def _na_backward_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DS, TAB, RPB,
        s_qb, s_qx, s_qy, s_qz, s_qh,
        s_kb, s_kx, s_ky, s_kz, s_kh,
        s_vb, s_vx, s_vy, s_vz, s_vh,
        H, REP, LX, LY, LZ, DX, DY, DZ, TAB_L, KX, KY, KZ, D, DV, qk_scale, scale,
        TX: tl.constexpr, TY: tl.constexpr, TZ: tl.constexpr,
        BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,
        BD: tl.constexpr, BDV: tl.constexpr, HAS_RPB: tl.constexpr, STORE_DS: tl.constexpr, IEEE: tl.constexpr,
        ACC: tl.constexpr,
    ):
        # the forward's iteration, recomputing P from the saved LSE; DQ is laid out like Q, DO like OUT.
        # STORE_DS writes each logit gradient to DS [B, H, N, prod(kernel)] at its window slot (for the rpb grad).
        b, h, gx, gy, gz, lgx, lgy, lgz = _split_program(tl.program_id(1), H, DX, DY, DZ, LX, LY, LZ)
        hk = h // REP
        ix, iy, iz, ix0, iy0, iz0 = _tile_coords(tl.program_id(0), TX, TY, TZ, LY, LZ, DY, DZ)
        if (ix0 < lgx) & (iy0 < lgy) & (iz0 < lgz):
            q_ok, xq, yq, zq, lox, hix, loy, hiy, loz, hiz, kx0, kx1, ky0, ky1, kz0, kz1 = _query_tile(
                TAB, TAB_L, ix, iy, iz, ix0, iy0, iz0, lgx, lgy, lgz, DX, DY, DZ, gx, gy, gz, TX, TY, TZ)
            d = tl.arange(0, BD)
            dv = tl.arange(0, BDV)
            q = _load_rows(Q, b, s_qb, ix, s_qx, iy, s_qy, iz, s_qz, h, s_qh, DX, DY, DZ, gx, gy, gz, q_ok, d, D)
            row = (b * LX * LY * LZ + (xq * LY + yq) * LZ + zq) * H + h
            do = tl.load(DO + row[:, None] * DV + dv[None, :], mask=q_ok[:, None] & (dv[None, :] < DV), other=0.0)
            lse2 = tl.load(LSE + row, mask=q_ok, other=0.0).to(ACC) * 1.4426950408889634
            delta = tl.load(DELTA + row, mask=q_ok, other=0.0).to(ACC)
            if STORE_DS:
                stx = _load_bounds(TAB, TAB_L, 0, 2, xq, q_ok)
                sty = _load_bounds(TAB, TAB_L, 1, 2, yq, q_ok)
                stz = _load_bounds(TAB, TAB_L, 2, 2, zq, q_ok)
                ds_row = ((b * H + h) * LX * LY * LZ + (xq * LY + yq) * LZ + zq) * (KX * KY * KZ)
            dq = tl.zeros([TX * TY * TZ, BD], dtype=ACC)
            n = tl.arange(0, BX * BY * BZ)
            for jx0 in range(kx0, kx1, BX):
                for jy0 in range(ky0, ky1, BY):
                    for jz0 in range(kz0, kz1, BZ):
                        jx, jy, jz, k_ok, kt, s, mask = _key_tile_logits(
                            K, RPB, q, n, jx0, jy0, jz0, kx1, ky1, kz1, b, s_kb, s_kx, s_ky, s_kz, hk, s_kh, h,
                            DX, DY, DZ, gx, gy, gz, d, D, ix, iy, iz, q_ok, lox, hix, loy, hiy, loz, hiz,
                            KX, KY, KZ, qk_scale, BY, BZ, HAS_RPB, IEEE, ACC)
                        p = tl.where(mask, tl.math.exp2(s - lse2[:, None]), 0.0)
                        vt = _load_rows(V, b, s_vb, jx, s_vx, jy, s_vy, jz, s_vz, hk, s_vh, DX, DY, DZ, gx, gy, gz,
                                        k_ok, dv, DV)
                        ds = p * (_dot(do, tl.trans(vt), IEEE).to(ACC) - delta[:, None])
                        dq += _dot(ds.to(kt.dtype), kt, IEEE).to(ACC)
                        if STORE_DS:
                            slot = ((jx[None, :] - stx[:, None]) * KY + (jy[None, :] - sty[:, None])) * KZ + (
                                jz[None, :] - stz[:, None])
                            tl.store(DS + ds_row[:, None] + slot, ds, mask=mask)
            q_off = b * s_qb + xq * s_qx + yq * s_qy + zq * s_qz + h * s_qh
            tl.store(DQ + q_off[:, None] + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                     mask=q_ok[:, None] & (d[None, :] < D))

    @triton.jit
    def _na_backward_dkv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV_OUT, TAB, RPB,
        s_qb, s_qx, s_qy, s_qz, s_qh,
        s_kb, s_kx, s_ky, s_kz, s_kh,
        s_vb, s_vx, s_vy, s_vz, s_vh,
        H, HK, REP, LX, LY, LZ, DX, DY, DZ, TAB_L, KX, KY, KZ, D, DV, qk_scale, scale,
        TX: tl.constexpr, TY: tl.constexpr, TZ: tl.constexpr,
        BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,
        BD: tl.constexpr, BDV: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
    ):
        # program = (key tile BX x BY x BZ, batch * kv head * dilation group), walking query tiles TX x TY x TZ
        # of every query head of the kv head in a fixed order (deterministic, no atomics). DK/DV_OUT like K/V.
        b, hk, gx, gy, gz, lgx, lgy, lgz = _split_program(tl.program_id(1), HK, DX, DY, DZ, LX, LY, LZ)
        jx, jy, jz, jx0, jy0, jz0 = _tile_coords(tl.program_id(0), BX, BY, BZ, LY, LZ, DY, DZ)
        if (jx0 < lgx) & (jy0 < lgy) & (jz0 < lgz):
            k_ok = (jx < lgx) & (jy < lgy) & (jz < lgz)
            qx0, qx1, qy0, qy1, qz0, qz1 = _box(TAB, TAB_L, 3, 4, jx0, jy0, jz0, tl.minimum(jx0 + BX, lgx) - 1,
                                                tl.minimum(jy0 + BY, lgy) - 1, tl.minimum(jz0 + BZ, lgz) - 1,
                                                DX, DY, DZ, gx, gy, gz)
            d = tl.arange(0, BD)
            dv = tl.arange(0, BDV)
            kt = _load_rows(K, b, s_kb, jx, s_kx, jy, s_ky, jz, s_kz, hk, s_kh, DX, DY, DZ, gx, gy, gz, k_ok, d, D)
            vt = _load_rows(V, b, s_vb, jx, s_vx, jy, s_vy, jz, s_vz, hk, s_vh, DX, DY, DZ, gx, gy, gz, k_ok, dv, DV)
            dk = tl.zeros([BX * BY * BZ, BD], dtype=ACC)
            dvv = tl.zeros([BX * BY * BZ, BDV], dtype=ACC)
            m = tl.arange(0, TX * TY * TZ)
            for r in range(REP):
                h = hk * REP + r
                for ix0 in range(qx0, qx1, TX):
                    for iy0 in range(qy0, qy1, TY):
                        for iz0 in range(qz0, qz1, TZ):
                            ix, iy, iz, q_ok = _box_tile(m, ix0, iy0, iz0, qx1, qy1, qz1, TY, TZ)
                            xq, yq, zq = ix * DX + gx, iy * DY + gy, iz * DZ + gz
                            lox, hix, loy, hiy, loz, hiz = _windows(TAB, TAB_L, xq, yq, zq, q_ok)
                            q = _load_rows(Q, b, s_qb, ix, s_qx, iy, s_qy, iz, s_qz, h, s_qh, DX, DY, DZ, gx, gy, gz,
                                           q_ok, d, D)
                            row = (b * LX * LY * LZ + (xq * LY + yq) * LZ + zq) * H + h
                            do = tl.load(DO + row[:, None] * DV + dv[None, :],
                                         mask=q_ok[:, None] & (dv[None, :] < DV), other=0.0)
                            lse2 = tl.load(LSE + row, mask=q_ok, other=0.0).to(ACC) * 1.4426950408889634
                            delta = tl.load(DELTA + row, mask=q_ok, other=0.0).to(ACC)
                            # transposed problem: rows are keys, columns queries
                            st = _dot(kt, tl.trans(q), IEEE).to(ACC) * qk_scale
                            mask = _pair_mask_t(ix, iy, iz, jx, jy, jz, q_ok, k_ok, lox, hix, loy, hiy, loz, hiz)
                            if HAS_RPB:
                                st += _bias(RPB, h, ix, iy, iz, jx, jy, jz, KX, KY, KZ, mask, True, ACC)
                            pt = tl.where(mask, tl.math.exp2(st - lse2[None, :]), 0.0)
                            dvv += _dot(pt.to(do.dtype), do, IEEE).to(ACC)
                            dst = pt * (_dot(vt, tl.trans(do), IEEE).to(ACC) - delta[None, :])
                            dk += _dot(dst.to(q.dtype), q, IEEE).to(ACC)
            k_off = b * s_kb + (jx * DX + gx) * s_kx + (jy * DY + gy) * s_ky + (jz * DZ + gz) * s_kz + hk * s_kh
            v_off = b * s_vb + (jx * DX + gx) * s_vx + (jy * DY + gy) * s_vy + (jz * DZ + gz) * s_vz + hk * s_vh
            tl.store(DK + k_off[:, None] + d[None, :], (dk * scale).to(DK.dtype.element_ty),
                     mask=k_ok[:, None] & (d[None, :] < D))
            tl.store(DV_OUT + v_off[:, None] + dv[None, :], dvv.to(DV_OUT.dtype.element_ty),
                     mask=k_ok[:, None] & (dv[None, :] < DV))


# -- launch -----------------------------------------------------------------------------------------------

# Query and key tile shapes per rank (powers of two, >= 16 elements so tl.dot compiles on GPUs).
_TILES = {1: (1, 1, 64), 2: (1, 8, 8), 3: (4, 4, 4)}


def _tile_for(rank: int, group_sizes: tuple[int, int, int]) -> tuple[int, int, int]:
    """The rank's tile, with any axis longer than the map shrunk (keeping >= 16 elements)."""
    tile = list(_TILES[rank])
    for axis in range(3):
        while tile[axis] > 1 and tile[axis] // 2 >= group_sizes[axis] and math.prod(tile) // 2 >= 16:
            tile[axis] //= 2
    return tuple(tile)


def _dot_mode(dtype: torch.dtype) -> int:
    """0: the GPU's native half-precision dot, 1: full fp32/fp64 dot (no TF32), 2: bf16 under the interpreter."""
    if dtype in (torch.float32, torch.float64):
        return 1
    return 2 if dtype == torch.bfloat16 and _interpreting() else 0


def _acc_dtype(dtype: torch.dtype):  # noqa: ANN202 - triton dtype
    return tl.float64 if dtype == torch.float64 else tl.float32


class _Geometry:
    """Everything about one call that is not a tensor: 3D-padded sizes, parameters, tables and tiles."""

    def __init__(self, spatial, kernel, dilation, stride, causal, mode, device):  # noqa: ANN001
        pad = 3 - len(spatial)
        self.rank = len(spatial)
        self.size = (1,) * pad + tuple(spatial)
        self.kernel = (1,) * pad + tuple(kernel)
        self.dilation = (1,) * pad + tuple(dilation)
        axes = tuple(zip(self.size, self.kernel, self.dilation, (1,) * pad + tuple(stride),
                         (False,) * pad + tuple(causal), (mode,) * 3))
        self.axes = axes
        self.tables = _bounds_on(axes, device)
        groups = tuple(-(-n // d) for n, d in zip(self.size, self.dilation))
        self.tile = _tile_for(self.rank, groups)
        self.n_tiles = math.prod(-(-g // t) for g, t in zip(groups, self.tile))
        self.n_groups = math.prod(self.dilation)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return t.stride()[:5]


def _common(geo: _Geometry, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    heads, kv_heads = q.shape[-2], k.shape[-2]
    return dict(
        H=heads, REP=heads // kv_heads, LX=geo.size[0], LY=geo.size[1], LZ=geo.size[2], DX=geo.dilation[0],
        DY=geo.dilation[1], DZ=geo.dilation[2], TAB_L=geo.tables.shape[-1], KX=geo.kernel[0], KY=geo.kernel[1],
        KZ=geo.kernel[2], D=q.shape[-1], DV=v.shape[-1],
        TX=geo.tile[0], TY=geo.tile[1], TZ=geo.tile[2], BX=geo.tile[0], BY=geo.tile[1], BZ=geo.tile[2],
        BD=max(16, triton.next_power_of_2(q.shape[-1])), BDV=max(16, triton.next_power_of_2(v.shape[-1])),
        IEEE=_dot_mode(q.dtype), ACC=_acc_dtype(q.dtype),
    )


class _TritonNA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpb, geo, scale):  # noqa: ANN001 - autograd signature
        # q [B, X, Y, Z, H, D], k [B, X, Y, Z, Hk, D], v [B, X, Y, Z, Hk, Dv] (contiguous); rpb [H, ...] or None
        batch, heads = q.shape[0], q.shape[-2]
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.empty(q.shape[:-1], dtype=lse_dtype, device=q.device)
        grid = (geo.n_tiles, batch * heads * geo.n_groups)
        _na_forward_kernel[grid](
            q, k, v, out, lse, geo.tables, rpb if rpb is not None else q,
            *_strides(q), *_strides(k), *_strides(v),
            qk_scale=scale * _LOG2E, HAS_RPB=rpb is not None, **_common(geo, q, k, v),
        )
        ctx.save_for_backward(q, k, v, out, lse, rpb)
        ctx.geo, ctx.scale = geo, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # noqa: ANN001
        q, k, v, out, lse, rpb = ctx.saved_tensors
        geo, scale = ctx.geo, ctx.scale
        batch, heads, kv_heads = q.shape[0], q.shape[-2], k.shape[-2]
        acc = lse.dtype
        grad_out = grad_out.contiguous()
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(acc)  # d lse / d logit = p: folds into the softmax backward's row term
        delta = delta.contiguous()
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        need_dbias = rpb is not None and ctx.needs_input_grad[3]
        n = math.prod(geo.size)
        kk = math.prod(geo.kernel)
        ds = torch.zeros(batch, heads, n, kk, dtype=acc, device=q.device) if need_dbias else lse
        common = _common(geo, q, k, v)
        rpb_arg = rpb if rpb is not None else q
        _na_backward_dq_kernel[(geo.n_tiles, batch * heads * geo.n_groups)](
            q, k, v, grad_out, lse, delta, dq, ds, geo.tables, rpb_arg,
            *_strides(q), *_strides(k), *_strides(v),
            qk_scale=scale * _LOG2E, scale=scale, HAS_RPB=rpb is not None, STORE_DS=need_dbias, **common,
        )
        _na_backward_dkv_kernel[(geo.n_tiles, batch * kv_heads * geo.n_groups)](
            q, k, v, grad_out, lse, delta, dk, dv, geo.tables, rpb_arg,
            *_strides(q), *_strides(k), *_strides(v),
            HK=kv_heads, qk_scale=scale * _LOG2E, scale=scale, HAS_RPB=rpb is not None, **common,
        )
        drpb = None
        if need_dbias:
            drpb = _rpb_grad(ds, geo).to(rpb.dtype)
        return dq, dk, dv, drpb, None, None


def _rpb_grad(ds: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """Sum per-slot logit gradients ``[B, H, N, K]`` into the bias table ``[H, 2kx-1, 2ky-1, 2kz-1]``.

    Deterministic: one-hot contractions per axis instead of a scatter-add with atomics.
    """
    heads = ds.shape[1]
    t = ds.sum(0).reshape(heads, *geo.size, *geo.kernel)  # [H, X, Y, Z, kx, ky, kz]
    ox, oy, oz = (rpb_onehot(*axis).to(ds) for axis in geo.axes)  # [L, k, 2k-1]
    t = torch.einsum("hxyzabc,xau->hyzbcu", t, ox)
    t = torch.einsum("hyzbcu,ybv->hzcuv", t, oy)
    return torch.einsum("hzcuv,zcw->huvw", t, oz)


def na_fused_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
    stride: tuple[int, ...], causal: tuple[bool, ...], rpb: torch.Tensor | None, scale: float,
    additional_keys: torch.Tensor | None, additional_values: torch.Tensor | None, return_lse: bool,
    mode: str = "natten",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Heads-last fused neighborhood attention with the Triton kernels; same contract as the reference."""
    batch, *spatial, heads, dim = q.shape
    geo = _Geometry(tuple(spatial), kernel, dilation, stride, causal, mode, q.device)
    pad = (1,) * (3 - len(spatial))

    def as3d(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, *pad, *spatial, *t.shape[-2:]).contiguous()

    rpb3 = None if rpb is None else rpb.reshape(heads, *pad, *rpb.shape[1:]).contiguous()
    out, lse = _TritonNA.apply(as3d(q), as3d(k), as3d(v), rpb3, geo, scale)
    out = out.reshape(*q.shape[:-1], v.shape[-1])
    lse = lse.reshape(q.shape[:-1])
    if additional_keys is not None:
        out, lse = attend_extra_and_merge(q, out, lse, additional_keys, additional_values, scale)
    if return_lse:
        return out, lse.to(q.dtype)
    return out
