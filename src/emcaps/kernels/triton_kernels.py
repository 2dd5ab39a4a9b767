"""The native routing kernels written in Triton, for CUDA: the same four passes as em_kernels.cpp, the same
arguments, so `emcaps.routing.native` runs its hand-written backward on either.

Why: with PyTorch ops (or torch.compile) every pass of EM routing reads a votes tensor of about 30 MB per
image; these kernels recompute each vote v = P_i @ W_ij (+ the child's offset) from the 4x4 pose and transform
where it is used, so no votes tensor is ever stored or read. One program handles one routing problem m (an
image position) for the forward passes, and a block of problems and children for the backward pass, whose
transform gradients are summed per block and then across blocks (no atomics: the result does not depend on
scheduling, so runs repeat bit for bit); a second, light kernel turns its per-vote sums into the gradients of
the assignments and activations in one pass over the (M, J, I) tensors.

The forward passes compute a vote one row at a time, in blocks of (children BI, parents BJ, 1, column c):
v[i, j, r, c] = sum_k P[i, r, k] W[i, j, k, c], the pose row P[i, r, :] and each transform row W[i, j, k, :] one
contiguous (vector) load; mstep_backward, which sums over parents for every child, cuts the parents in two
axes (its docstring says why). Blocks past the last child or parent read clamped indices, not masked loads.
`TRITON_INTERPRET=1` runs the kernels on CPU tensors (the tests compare them there with the C++ kernels and
PyTorch ops); on CUDA Triton compiles them on first use. `triton_kernels()` is None where the triton package
is missing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from emcaps.kernels import PerThread

try:                                        # an optional dependency: CUDA wheels of PyTorch bring it
    import triton
    import triton.language as tl
except ImportError:                         # pragma: no cover - depends on the environment
    triton = None


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors), `TRITON_INTERPRET=1`."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device) -> bool:
    """Whether these kernels can run on tensors of `device`: CUDA with triton, or a CPU under the interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreted())


if triton is not None:

    @triton.jit
    def _load(ptr, mask, EVEN: tl.constexpr):
        """tl.load, masked (zero outside) unless EVEN says the block lies inside the tensors."""
        if EVEN:
            return tl.load(ptr)
        else:
            return tl.load(ptr, mask=mask, other=0.0)

    @triton.jit
    def _store(ptr, value, mask, EVEN: tl.constexpr):
        """tl.store, masked unless EVEN."""
        if EVEN:
            tl.store(ptr, value)
        else:
            tl.store(ptr, value, mask=mask)

    @triton.jit
    def _minus_zero(dtype: tl.constexpr):
        """-0.0 of `dtype`: adding it is exact (NaN included) and folds away. Built from its bits, since
        triton < 3.9 turns a literal -0.0 into +0.0 (its tl.full takes any value equal to 0 for the null value),
        and x + 0.0 is an instruction."""
        if dtype == tl.float64:
            return tl.full((), -(2**63), tl.int64).to(tl.float64, bitcast=True)
        else:
            return tl.full((), -(2**31), tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def _pick(x, lane, k):
        """x[..., k] kept as a last axis of size 1: that axis lies within a thread, so the choice compiles to a
        register (the other entries are -0.0)."""
        return tl.sum(tl.where(lane == k, x, _minus_zero(x.dtype)), axis=len(x.shape) - 1, keep_dims=True)

    @triton.jit
    def _dot_last(a, b, lane, start):
        """start + sum over the last axis of a b (kept, of size 1; start _minus_zero for the sum alone). In float32 that
        axis (one 16-byte vector) lies within a thread, and a chain of multiply-adds from `start` takes fewer
        instructions than products summed apart; in float64 it spans two threads, and a sum is cheaper than
        picking each entry."""
        if a.dtype == tl.float64:
            return start + tl.sum(a * b, axis=len(a.shape) - 1, keep_dims=True)
        out = start
        for c in tl.static_range(4):
            out += _pick(a, lane, c) * _pick(b, lane, c)
        return out

    @triton.jit
    def _load5(ptr, REVERSE: tl.constexpr):
        """tl.load of a 5-D block (JO, BI, JI, row, column); REVERSE loads it with the first four axes reversed and
        reverses them back (TritonBlocks.reverse_axes)."""
        if REVERSE:
            return tl.permute(tl.load(tl.permute(ptr, (3, 2, 1, 0, 4))), (3, 2, 1, 0, 4))
        else:
            return tl.load(ptr)

    @triton.jit
    def _inside(index, n, EVEN: tl.constexpr):
        """`index` clamped into [0, n): a block past the end of the children or parents reads the last one
        instead of masking its loads (a masked load zeroes its registers first). Those votes are finite and
        every caller gives them zero weight or masks them out."""
        if EVEN:
            return index
        else:
            return tl.minimum(index, n - 1)

    @triton.jit
    def _vote_row(P, W, O, m, i4, j4, c4, row, shift, I, J, HAS_OFF: tl.constexpr, EVEN: tl.constexpr):
        """Row `row` of the votes of children i4 (BI, 1, 1, 1) of problem m for parents j4 (1, BJ, 1, 1), less
        `shift` (a centre's row, or 0.0): v[i, j, row, c] - shift = sum_k P[i, row, k] W[i, j, k, c] (+ the child's
        offset) - shift, (BI, BJ, 1, 4); past I or J, another vote's values. The pose row and each transform row
        are one vector load of four values; the pose's entries are picked in registers; the shift starts the
        chain of multiply-adds, where a difference afterwards would take an instruction of its own."""
        i4, j4 = _inside(i4, I, EVEN), _inside(j4, J, EVEN)
        pose = tl.load(P + (m * I + i4) * 16 + row * 4 + c4 + j4 * 0)                    # P[i, row, k] over k
        at = W + (i4 * J + j4) * 16 + c4                                                  # W[i, j, k, c] at + 4 k
        v = _pick(pose, c4, 0) * tl.load(at) - shift
        v += _pick(pose, c4, 1) * tl.load(at + 4)
        v += _pick(pose, c4, 2) * tl.load(at + 8)
        v += _pick(pose, c4, 3) * tl.load(at + 12)
        if HAS_OFF:
            v += tl.load(O + i4 * 16 + row * 4 + c4 + j4 * 0)
        return v

    @triton.jit
    def _parent_row(X, m, i4, j4, c4, row, J, EVEN: tl.constexpr):
        """X[m, j, row, c] broadcast over the children i4: (BI, BJ, 1, 4), past J the last parent's; loaded as
        the transform rows are, so it shares their layout."""
        return tl.load(X + (m * J + _inside(j4, J, EVEN)) * 16 + row * 4 + c4 + i4 * 0)

    @triton.jit
    def _moments(d, w, s1, s2):
        """s1 + w d, s2 + w d^2."""
        wd = w * d
        return s1 + wd, s2 + wd * d

    @triton.jit
    def _finish_row(out_a, out_b, m, J, j4, c4, row, s1, s2, c, inv, total, MODE: tl.constexpr):
        """One row of every parent's outputs from its sums over the children (BI, BJ, 1, 4): MODE 0 the weighted
        mean and variance (no floor) from sums around c, MODE 1 the sums themselves."""
        s1 = tl.sum(s1, axis=0, keep_dims=True)                                             # (1, BJ, 1, 4)
        s2 = tl.sum(s2, axis=0, keep_dims=True)
        at = (m * J + j4) * 16 + row * 4 + c4
        ok = (j4 < J) & (c4 < 4)
        if MODE == 0:
            dd = s1 * inv
            off = dd + c * (total - 1.0)                                                     # mean - c
            tl.store(out_a + at, c + off, mask=ok)
            tl.store(out_b + at, tl.maximum(s2 * inv - 2.0 * off * dd + total * off * off, 0.0), mask=ok)
        else:
            tl.store(out_a + at, s1, mask=ok)
            tl.store(out_b + at, s2, mask=ok)

    @triton.jit
    def _gather_kernel(P, W, O, wts, w_sm, w_sj, act, centre, M, I, J, eps, out_a, out_b, out_s,
                       MODE: tl.constexpr, HAS_OFF: tl.constexpr, EVEN: tl.constexpr, BI: tl.constexpr,
                       BJ: tl.constexpr):
        """Per problem m: sums over children of weight * (v - c) and weight * (v - c)^2 for every parent.

        MODE 0 (mstep): weights r[m, j, i] act[m, i]; centre c = child 0's vote; writes the weighted mean,
        variance (no floor) and weight sums S. MODE 1 (estep_backward): weights g_maha[m, j, i], c = `centre`
        (the parents' means); writes the raw sums, which the caller scales. Each row of the votes has its own
        sums, so that a row is one vector load of the pose (the blocks are (children, parents, 1, column)).
        """
        m = tl.program_id(0).to(tl.int64)      # offsets past 2^31 elements at large batches
        j = tl.arange(0, BJ)
        j4 = j[None, :, None, None]
        c4 = tl.arange(0, 4)[None, None, None, :]
        first = tl.arange(0, 1)[:, None, None, None]                                        # child 0
        if MODE == 0:
            c0 = _vote_row(P, W, O, m, first, j4, c4, 0, 0.0, I, J, HAS_OFF, EVEN)              # (1, BJ, 1, 4)
            c1 = _vote_row(P, W, O, m, first, j4, c4, 1, 0.0, I, J, HAS_OFF, EVEN)
            c2 = _vote_row(P, W, O, m, first, j4, c4, 2, 0.0, I, J, HAS_OFF, EVEN)
            c3 = _vote_row(P, W, O, m, first, j4, c4, 3, 0.0, I, J, HAS_OFF, EVEN)
        else:
            c0 = _parent_row(centre, m, first, j4, c4, 0, J, EVEN)
            c1 = _parent_row(centre, m, first, j4, c4, 1, J, EVEN)
            c2 = _parent_row(centre, m, first, j4, c4, 2, J, EVEN)
            c3 = _parent_row(centre, m, first, j4, c4, 3, J, EVEN)
        # summed over each block's children elementwise, and across them once at the end: the loop then holds
        # no reduction across threads
        a0 = tl.zeros((BI, BJ, 1, 4), dtype=P.dtype.element_ty)         # sums of w (v - c), row by row
        a1 = tl.zeros((BI, BJ, 1, 4), dtype=P.dtype.element_ty)
        a2 = tl.zeros((BI, BJ, 1, 4), dtype=P.dtype.element_ty)
        a3 = tl.zeros((BI, BJ, 1, 4), dtype=P.dtype.element_ty)
        b0 = tl.zeros((BI, BJ, 1, 4), dtype=P.dtype.element_ty)         # sums of w (v - c)^2
        b1 = tl.zeros((BI, BJ, 1, 4), dtype=P.dtype.element_ty)
        b2 = tl.zeros((BI, BJ, 1, 4), dtype=P.dtype.element_ty)
        b3 = tl.zeros((BI, BJ, 1, 4), dtype=P.dtype.element_ty)
        sw = tl.zeros((BI, BJ), dtype=P.dtype.element_ty)
        for i0 in range(0, I, BI):
            i = i0 + tl.arange(0, BI)
            i4 = i[:, None, None, None]
            ok = (i[:, None] < I) & (j[None, :] < J)
            wt = _load(wts + m * w_sm + j[None, :] * w_sj + i[:, None], ok, EVEN)                 # (BI, BJ)
            if MODE == 0:
                wt = wt * _load(act + m * I + i, i < I, EVEN)[:, None]
            w = wt[:, :, None, None]
            a0, b0 = _moments(_vote_row(P, W, O, m, i4, j4, c4, 0, c0, I, J, HAS_OFF, EVEN), w, a0, b0)
            a1, b1 = _moments(_vote_row(P, W, O, m, i4, j4, c4, 1, c1, I, J, HAS_OFF, EVEN), w, a1, b1)
            a2, b2 = _moments(_vote_row(P, W, O, m, i4, j4, c4, 2, c2, I, J, HAS_OFF, EVEN), w, a2, b2)
            a3, b3 = _moments(_vote_row(P, W, O, m, i4, j4, c4, 3, c3, I, J, HAS_OFF, EVEN), w, a3, b3)
            sw += wt
        sw = tl.sum(sw, axis=0)                                                             # (BJ,)
        total = sw[None, :, None, None]                                                     # (1, BJ, 1, 1)
        inv = total                                                         # MODE 1 uses neither
        if MODE == 0:
            inv = 1.0 / tl.maximum(total, eps)
            total = total * inv
        _finish_row(out_a, out_b, m, J, j4, c4, 0, a0, b0, c0, inv, total, MODE)
        _finish_row(out_a, out_b, m, J, j4, c4, 1, a1, b1, c1, inv, total, MODE)
        _finish_row(out_a, out_b, m, J, j4, c4, 2, a2, b2, c2, inv, total, MODE)
        _finish_row(out_a, out_b, m, J, j4, c4, 3, a3, b3, c3, inv, total, MODE)
        if MODE == 0:
            tl.store(out_s + m * J + j, sw, mask=j < J)

    @triton.jit
    def _add_row_maha(maha, P, W, O, mean, inv_var, m, i4, j4, c4, row, I, J, HAS_OFF: tl.constexpr,
                      EVEN: tl.constexpr):
        """maha (BI, BJ, 1, 1) plus one row's share of each vote's Mahalanobis distance, sum_c (v - mean)^2 / var."""
        d = _vote_row(P, W, O, m, i4, j4, c4, row, _parent_row(mean, m, i4, j4, c4, row, J, EVEN), I, J, HAS_OFF,
                      EVEN)
        return _dot_last(d * _parent_row(inv_var, m, i4, j4, c4, row, J, EVEN), d, c4, maha)

    @triton.jit
    def _estep_kernel(P, W, O, mean, inv_var, const, M, I, J, h, r, lse,
                      HAS_OFF: tl.constexpr, EVEN: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
        """Children [BI block] of problem m: l_j = const_j - h maha_ji, softmax over j into r, lse per child."""
        m = tl.program_id(0).to(tl.int64)      # offsets past 2^31 elements at large batches
        i = tl.program_id(1) * BI + tl.arange(0, BI)
        j = tl.arange(0, BJ)
        i4, j4, c4 = i[:, None, None, None], j[None, :, None, None], tl.arange(0, 4)[None, None, None, :]
        # float64: the first row's sum is added to -0.0, which folds away. float32: the chain of multiply-adds
        # starts from a zero block, at no extra instruction; a chain started from a scalar or from its first
        # product takes 132 registers under triton 3.7.1 instead of 104 (one program an SM instead of two)
        if P.dtype.element_ty == tl.float64:
            maha = _minus_zero(tl.float64)
        else:
            maha = tl.zeros((BI, BJ, 1, 1), dtype=tl.float32)
        for row in tl.static_range(4):
            maha = _add_row_maha(maha, P, W, O, mean, inv_var, m, i4, j4, c4, row, I, J, HAS_OFF, EVEN)
        maha = tl.sum(tl.sum(maha, axis=3), axis=2)                                         # (BI, BJ)
        ok = (i[:, None] < I) & (j[None, :] < J)
        lg = _load(const + m * J + j, j < J, EVEN)[None, :] - h * maha
        if not EVEN:
            lg = tl.where(ok, lg, -float("inf"))
        top = tl.max(lg, axis=1)
        if not EVEN:
            top = tl.where(i < I, top, 0.0)
        p = tl.exp(lg - top[:, None])
        total = tl.sum(p, axis=1)
        if not EVEN:
            total = tl.where(i < I, total, 1.0)
        _store(r + (m * J + j[None, :]) * I + i[:, None], p / total[:, None], ok, EVEN)
        _store(lse + m * I + i, top + tl.log(total), i < I, EVEN)

    @triton.jit
    def _mstep_backward_kernel(P, W, O, r, r_sm, r_sj, act, inv, mean, g_var, gm, g_maha, inv_var, e_mean,
                               M, I, J, gP, gW_part, gw, gw_sum,
                               HAS_OFF: tl.constexpr, HAS_E: tl.constexpr, CENTRED: tl.constexpr,
                               EVEN: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                               REVERSE: tl.constexpr):
        """Problems [BM block] x children [BI block]: the vote gradients g of every parent, turned into pose
        gradients (added to gP), transform gradients (this block's sum, into gW_part[block]), the per-vote sums
        gw[m, j, i] = sum_e gm v + g_var (v - mean)^2 from which the weight gradients follow, and this block's
        sum over children of gw r a, gw_sum[m, j, block] (the gradient through the weight sums S needs it).

        Blocks are 5-D, (parent groups JO, children BI, parents in a group JI, row r, column c), j = jo JI + ji:
        Triton then lays the columns in a thread, (ji, r) across a warp's lanes, children across warps and the
        groups in a thread, so the pose gradient's sum over parents is mostly within threads (3 rounds of
        shuffles for 4 values, where a 4-D (children, parents) block takes 5 rounds for 16), and the transform
        gradient is summed over rows once, after the loop. The transforms are loaded once per program."""
        JI: tl.constexpr = 8 if BJ >= 8 else BJ
        JO: tl.constexpr = BJ // JI
        mb = tl.program_id(0).to(tl.int64)
        ib = tl.program_id(1)
        NB = tl.num_programs(1)
        i5 = ib * BI + tl.arange(0, BI)[None, :, None, None, None]
        j5 = tl.arange(0, JO)[:, None, None, None, None] * JI + tl.arange(0, JI)[None, None, :, None, None]
        r5 = tl.arange(0, 4)[None, None, None, :, None]
        c5 = tl.arange(0, 4)[None, None, None, None, :]
        ok5 = (i5 < I) & (j5 < J) & (r5 < 4) & (c5 < 4)                                    # (JO, BI, JI, 4, 4)
        i3 = ib * BI + tl.arange(0, BI)[None, :, None]
        j3 = tl.arange(0, JO)[:, None, None] * JI + tl.arange(0, JI)[None, None, :]
        ok3 = (i3 < I) & (j3 < J)                                                           # (JO, BI, JI)
        j2 = tl.arange(0, JO)[:, None] * JI + tl.arange(0, JI)[None, :]                     # (JO, JI)
        okp = (i5 < I) & (r5 < 4) & (c5 < 4)                                                # (1, BI, 1, 4, 4)
        i5c, j5c = _inside(i5, I, EVEN), _inside(j5, J, EVEN)          # unmasked loads of the votes' inputs
        w_at = W + (i5c * J + j5c) * 16 + r5 * 0 + c5        # W[i, j, k, c] over c, row k at + 4 k
        w0 = _load5(w_at, REVERSE)
        w1 = _load5(w_at + 4, REVERSE)
        w2 = _load5(w_at + 8, REVERSE)
        w3 = _load5(w_at + 12, REVERSE)
        # transform gradients gt_k = sum_m P[i, r, k] g[i, j, r, c], summed over rows r after the loop
        gt0 = tl.zeros((JO, BI, JI, 4, 4), dtype=P.dtype.element_ty)
        gt1 = tl.zeros((JO, BI, JI, 4, 4), dtype=P.dtype.element_ty)
        gt2 = tl.zeros((JO, BI, JI, 4, 4), dtype=P.dtype.element_ty)
        gt3 = tl.zeros((JO, BI, JI, 4, 4), dtype=P.dtype.element_ty)
        for mm in range(0, BM):
            m = mb * BM + mm
            if m < M:
                pose = _load5(P + (m * I + i5c) * 16 + r5 * 4 + c5 + j5 * 0, REVERSE)         # P[i, r, k] over k
                p0, p1 = _pick(pose, c5, 0), _pick(pose, c5, 1)
                p2, p3 = _pick(pose, c5, 2), _pick(pose, c5, 3)
                v = p0 * w0 + p1 * w1 + p2 * w2 + p3 * w3
                if HAS_OFF:
                    v += _load5(O + i5c * 16 + r5 * 4 + c5 + j5 * 0, REVERSE)
                par = (m * J + j5c) * 16 + r5 * 4 + c5 + i5 * 0                           # parents' (j, r, c)
                d = v - _load5(mean + par, REVERSE)
                gv = _load5(g_var + par, REVERSE)
                gmj = _load5(gm + par, REVERSE)
                ra = _load(r + m * r_sm + j3 * r_sj + i3, ok3, EVEN) * _load(act + m * I + i3 + j3 * 0, ok3, EVEN)
                w = (ra * _load(inv + m * J + j3 + i3 * 0, ok3, EVEN))[:, :, :, None, None]
                # g = w (gm + 2 g_var d) + c inv_var (v - centre); where the centre is the mean, d (2 w g_var +
                # c inv_var) + w gm: four operations per entry instead of six
                if HAS_E:
                    c = 2.0 * _load(g_maha + (m * J + j3) * I + i3, ok3, EVEN)[:, :, :, None, None]
                    ci = c * _load5(inv_var + par, REVERSE)
                    if CENTRED:
                        g = d * (2.0 * w * gv + ci) + w * gmj
                    else:
                        g = w * (gmj + 2.0 * gv * d) + ci * (v - _load5(e_mean + par, REVERSE))
                else:
                    g = w * (gmj + 2.0 * gv * d)
                if not EVEN:
                    g = tl.where(ok5, g, 0.0)
                nz = _minus_zero(g.dtype)
                acc = _dot_last(gv * d, d, c5, _dot_last(gmj, v, c5, nz))                    # (JO, BI, JI, 4, 1)
                acc = tl.sum(tl.sum(acc, axis=4), axis=3)                                       # (JO, BI, JI)
                _store(gw + (m * J + j3) * I + i3, acc, ok3, EVEN)
                _store(gw_sum + (m * J + j2) * NB + ib, tl.sum(acc * ra, axis=1), j2 < J, EVEN)
                # sum_c g[i, j, r, c] W[i, j, k, c] for each k, laid along the last axis (k), then over parents
                gk = tl.where(c5 == 0, _dot_last(g, w0, c5, nz), nz)
                gk += tl.where(c5 == 1, _dot_last(g, w1, c5, nz), nz)
                gk += tl.where(c5 == 2, _dot_last(g, w2, c5, nz), nz)
                gk += tl.where(c5 == 3, _dot_last(g, w3, c5, nz), nz)
                gp = tl.sum(tl.sum(gk, axis=0, keep_dims=True), axis=2, keep_dims=True)     # (1, BI, 1, 4, 4)
                at = gP + (m * I + i5) * 16 + r5 * 4 + c5
                _store(at, _load(at, okp, EVEN) + gp, okp, EVEN)
                gt0 += p0 * g
                gt1 += p1 * g
                gt2 += p2 * g
                gt3 += p3 * g
        i4 = ib * BI + tl.arange(0, BI)[None, :, None, None]
        j4 = tl.arange(0, JO)[:, None, None, None] * JI + tl.arange(0, JI)[None, None, :, None]
        c4 = tl.arange(0, 4)[None, None, None, :]
        at = gW_part + mb * I * J * 16 + (i4 * J + j4) * 16 + c4                            # (JO, BI, JI, 4)
        okw = (i4 < I) & (j4 < J)
        tl.store(at, tl.sum(gt0, axis=3), mask=okw)
        tl.store(at + 4, tl.sum(gt1, axis=3), mask=okw)
        tl.store(at + 8, tl.sum(gt2, axis=3), mask=okw)
        tl.store(at + 12, tl.sum(gt3, axis=3), mask=okw)

    @triton.jit
    def _weights_backward_kernel(gw, r, r_sm, r_sj, act, inv, g_s, M, I, J, g_r, g_act,
                                 HAS_GR: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
        """Children [BI block] of problem m: the gradient wrt each weight r_ji a_i, g_ra = gw inv + g_s (through
        the mean/variance and through the weight sums S), into g_r = g_ra a (where wanted) and g_act += sum_j
        g_ra r: one pass over the (M, J, I) tensors."""
        m = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BI + tl.arange(0, BI)
        j = tl.arange(0, BJ)
        ok = (i[:, None] < I) & (j[None, :] < J)
        g_ra = tl.load(gw + (m * J + j[None, :]) * I + i[:, None], mask=ok, other=0.0)            # (BI, BJ)
        g_ra = g_ra * tl.load(inv + m * J + j, mask=j < J, other=0.0)[None, :]
        g_ra = tl.where(ok, g_ra + tl.load(g_s + m * J + j, mask=j < J, other=0.0)[None, :], 0.0)
        a = tl.load(act + m * I + i, mask=i < I, other=0.0)                                       # (BI,)
        if HAS_GR:
            tl.store(g_r + (m * J + j[None, :]) * I + i[:, None], g_ra * a[:, None], mask=ok)
        rr = tl.load(r + m * r_sm + j[None, :] * r_sj + i[:, None], mask=ok, other=0.0)
        ptr = g_act + m * I + i
        tl.store(ptr, tl.load(ptr, mask=i < I, other=0.0) + tl.sum(g_ra * rr, axis=1), mask=i < I)


@dataclass(frozen=True)
class TritonBlocks:
    """How the kernels cut their work: votes (children x parent types) per block of the M-step passes and of
    mstep_backward, in float32 and in float64 (the class capsules' routing dtype: a value takes two registers);
    estep_assign, which keeps no running sums, takes four times the M-step's blocks; `problems` routing problems
    per mstep_backward program (its transform gradients are summed over them in registers); warps per program;
    `weights_votes` per block of mstep_backward's second kernel, a light pass over memory that wants large
    blocks. `benchmarks/triton_blocks.py` reports registers, spills and thread-instructions per vote of each
    choice from the machine code (any machine with triton) and times them (CUDA). Compiled for sm_90 (H100,
    H200), these defaults spill nothing in any routed layer of the paper, small and tiny networks, with the fewest
    instructions per vote among the spill-free choices tried there for the capsule convolutions
    (tests/test_benchmarks.py checks they spill nothing).

    `reverse_axes`: mstep_backward loads its 5-D blocks with the first four axes reversed (and reverses them
    back). Triton lays a block out from the loads' axes, most contiguous first; where axes tie (all but the
    column here), triton 3.7 and later take the last first and triton 3.6 the first, so reversing them gives
    3.6 the layout the others choose (parent types within a thread and a warp, children across warps).
    Default: on for triton 3.6 only (3.4 and 3.5 lose the loads' vectors through the permutation); float32
    blocks only (in float64 a vote's columns span two threads, and the reversal costs instructions)."""

    votes: int = 256
    votes_float64: int = 128
    backward_votes: int = 128
    backward_votes_float64: int = 64
    problems: int = 64
    warps: int = 8
    backward_warps: int = 4
    backward_warps_float64: int = 8
    weights_votes: int = 2048
    reverse_axes: bool = field(default_factory=lambda: _version()[:2] == (3, 6))

    def forward(self, n_out: int, n_in: int, dtype: torch.dtype) -> tuple[int, int]:
        """(BJ, BI) of mstep and estep_backward: every parent type in one block, children up to the block's votes."""
        return _blocks(n_out, n_in, self.votes_float64 if dtype == torch.float64 else self.votes)

    def estep(self, n_out: int, n_in: int, dtype: torch.dtype) -> tuple[int, int]:
        """(BJ, BI) of estep_assign: four times the forward blocks, as it keeps no running sums."""
        return _blocks(n_out, n_in, 4 * (self.votes_float64 if dtype == torch.float64 else self.votes))

    def backward(self, n_out: int, n_in: int, dtype: torch.dtype) -> tuple[int, int, int]:
        """(BJ, BI, warps) of mstep_backward."""
        if dtype == torch.float64:
            return *_blocks(n_out, n_in, self.backward_votes_float64), self.backward_warps_float64
        return *_blocks(n_out, n_in, self.backward_votes), self.backward_warps


def _version() -> tuple[int, ...]:
    """triton's version, e.g. (3, 6, 0); () without triton."""
    return tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:3]) if triton is not None else ()


def _blocks(n_out: int, n_in: int, votes: int) -> tuple[int, int]:
    """(BJ, BI): every parent type in one block, and as many children as keep a block near `votes` votes."""
    bj = triton.next_power_of_2(n_out)
    bi = max(1, min(triton.next_power_of_2(n_in), votes // bj))
    return bj, bi


def _even(n_in: int, n_out: int, bi: int, bj: int) -> bool:
    """Whether blocks of (bi children, bj parent types) tile the problem exactly: the kernels then load and store
    without masks (a masked load also zeroes its registers first)."""
    return n_in % bi == 0 and n_out == bj


class TritonKernels:
    """The four kernels with em_kernels.cpp's arguments (less the thread range), and `call` as `Library.call`."""

    def __init__(self, blocks: TritonBlocks = TritonBlocks()):
        self.blocks = blocks

    def threads(self, n_problems: int) -> int:
        return 1                    # one slot of per-thread transform gradients: the blocks are summed here

    def call(self, name: str, dtype: torch.dtype, args: list, n_problems: int, range_at: int) -> None:
        args = [a.tensor if isinstance(a, PerThread) else a for a in args]    # one slot: threads() is 1
        # Triton launches on the current CUDA device, which need not be the tensors' (a model on cuda:1)
        device = torch.cuda.device(args[0].device) if args[0].is_cuda else contextlib.nullcontext()
        with torch.profiler.record_function(f"emcaps::{name}"), device:
            getattr(self, name)(*args)

    def launch(self, kernel, grid: tuple[int, ...], *args, **meta) -> None:
        """Runs `kernel` on `grid`; benchmarks/triton_blocks.py records the launches instead, to compile them."""
        kernel[grid](*args, **meta)

    def mstep(self, P: Tensor, W: Tensor, O: Tensor | None, r: Tensor, r_sm: int, r_sj: int, act: Tensor,
              M: int, J: int, I: int, eps: float, mean: Tensor, var: Tensor, S: Tensor) -> None:
        """mean, var (M, J, 16) (no floor) and weight sums S (M, J) of every parent."""
        bj, bi = self.blocks.forward(J, I, P.dtype)
        self.launch(_gather_kernel, (M,), P, W, O if O is not None else P, r, r_sm, r_sj, act, P, M, I, J, eps,
                    mean, var, S, MODE=0, HAS_OFF=O is not None, EVEN=_even(I, J, bi, bj), BI=bi, BJ=bj,
                    num_warps=self.blocks.warps)

    def estep_assign(self, P: Tensor, W: Tensor, O: Tensor | None, mean: Tensor, inv_var: Tensor, const: Tensor,
                     M: int, J: int, I: int, h: float, r: Tensor, lse: Tensor) -> None:
        """r (M, J, I): the E-step normalised over parent types; lse (M, I), each child's log-normaliser."""
        bj, bi = self.blocks.estep(J, I, P.dtype)
        self.launch(_estep_kernel, (M, triton.cdiv(I, bi)), P, W, O if O is not None else P, mean, inv_var, const,
                    M, I, J, h, r, lse, HAS_OFF=O is not None, EVEN=_even(I, J, bi, bj), BI=bi, BJ=bj,
                    num_warps=self.blocks.warps)

    def estep_backward(self, P: Tensor, W: Tensor, O: Tensor | None, mean: Tensor, inv_var: Tensor,
                       g_maha: Tensor, M: int, J: int, I: int, g_mean: Tensor, g_inv_var: Tensor) -> None:
        """g_mean = -2 inv_var sum_i g_maha (v - mean), g_inv_var = sum_i g_maha (v - mean)^2, (M, J, 16)."""
        bj, bi = self.blocks.forward(J, I, P.dtype)
        self.launch(_gather_kernel, (M,), P, W, O if O is not None else P, g_maha, J * I, I, P, mean, M, I, J, 0.0,
                    g_mean, g_inv_var, P, MODE=1, HAS_OFF=O is not None, EVEN=_even(I, J, bi, bj), BI=bi, BJ=bj,
                    num_warps=self.blocks.warps)
        g_mean.mul_(inv_var).mul_(-2.0)

    def mstep_backward(self, P: Tensor, W: Tensor, O: Tensor | None, WT: Tensor, r: Tensor, r_sm: int, r_sj: int,
                       act: Tensor, mean: Tensor, S: Tensor, g_mean: Tensor, g_var: Tensor, g_S: Tensor,
                       inv_var: Tensor | None, g_maha: Tensor | None, e_mean: Tensor | None, M: int, J: int,
                       I: int, eps: float, gP: Tensor, gW: Tensor, g_r: Tensor | None, g_act: Tensor) -> None:
        """Backward of mstep (and of the same iteration's E-step through the votes, with g_maha): adds to gP
        (M, I, 16), gW (1, I, J, 16) and g_act (M, I); writes g_r (M, J, I) where given. As the C++ kernel."""
        inv = 1.0 / S.clamp_min(eps)                                                      # (M, J)
        # d var / d mean = -2 sum_i w_i (v_i - mean) = -2 mean (1 - sum_i w_i): zero unless S < eps
        gm = (g_mean - 2 * g_var * mean * (1 - S * inv).unsqueeze(-1)).contiguous()
        gw = P.new_empty(M, J, I)
        bj, bi, warps = self.blocks.backward(J, I, P.dtype)
        bm = self.blocks.problems
        blocks, n_ib = triton.cdiv(M, bm), triton.cdiv(I, bi)
        part = P.new_empty(blocks, I, J, 16)
        gw_sum = P.new_empty(M, J, n_ib)
        has_e = g_maha is not None
        self.launch(_mstep_backward_kernel, (blocks, n_ib),
                    P, W, O if O is not None else P, r, r_sm, r_sj, act, inv, mean, g_var, gm,
                    g_maha if has_e else P, inv_var if has_e else P, e_mean if has_e else P, M, I, J, gP, part, gw,
                    gw_sum, HAS_OFF=O is not None, HAS_E=has_e, CENTRED=e_mean is mean, EVEN=_even(I, J, bi, bj),
                    BM=bm, BI=bi, BJ=bj, REVERSE=self.blocks.reverse_axes and P.dtype == torch.float32,
                    num_warps=warps)
        gW[0] += part.sum(0)
        # the weights w_ji = r_ji a_i / max(S_j, eps): their gradients through S and then r and a
        g_sp = -gw_sum.sum(-1) * inv                                                      # (M, J)
        g_s = g_S + torch.where(S > eps, g_sp * inv, torch.zeros_like(g_sp))
        bj, bi = _blocks(J, I, self.blocks.weights_votes * 4 // P.dtype.itemsize)
        self.launch(_weights_backward_kernel, (M, triton.cdiv(I, bi)), gw, r, r_sm, r_sj, act, inv,
                    g_s.contiguous(), M, I, J, g_r if g_r is not None else gw, g_act, HAS_GR=g_r is not None,
                    BI=bi, BJ=bj, num_warps=self.blocks.warps)


@functools.cache
def triton_kernels() -> TritonKernels | None:
    """The Triton kernels, or None where the triton package is missing."""
    return TritonKernels() if triton is not None else None
