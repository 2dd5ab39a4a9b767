"""The native routing kernels written in Triton, for CUDA: the same four passes as em_kernels.cpp, the same
arguments, so `emcaps.routing.native` runs its hand-written backward on either.

Why: with PyTorch ops (or torch.compile) every pass of EM routing reads a votes tensor of about 30 MB per
image; these kernels recompute each vote v = P_i @ W_ij (+ the child's offset) from the 4x4 pose and transform
where it is used, so no votes tensor is ever stored or read. One program handles one routing problem m (an
image position) for the forward passes, and a block of problems and children for the backward pass, whose
transform gradients are summed per block and then across blocks (no atomics: the result does not depend on
scheduling, so runs repeat bit for bit); a second, light kernel turns its per-vote sums into the gradients of
the assignments and activations in one pass over the (M, J, I) tensors.

Tensors are blocks of (children BI, parents BJ, pose entry e = 4 r + c); a vote's entry is
v[i, j, 4r+c] = sum_k P[i, 4r+k] W[i, j, 4k+c], four products of gathered loads. `TRITON_INTERPRET=1` runs the
kernels on CPU tensors (the tests compare them there with the C++ kernels and PyTorch ops); on CUDA Triton
compiles them on first use. `triton_kernels()` is None where the triton package is missing.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

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
    def _votes(P, W, O, m, i, j, I, J, HAS_OFF: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
        """The votes of children i (BI,) of problem m for parents j (BJ,): (BI, BJ, 16), zero where masked."""
        e = tl.arange(0, 16)
        i3, j3, e3 = i[:, None, None], j[None, :, None], e[None, None, :]
        ok = (i3 < I) & (j3 < J)
        v = tl.zeros((BI, BJ, 16), dtype=P.dtype.element_ty)
        for k in tl.static_range(4):
            p = tl.load(P + (m * I + i3) * 16 + (e3 // 4) * 4 + k, mask=i3 < I, other=0.0)     # (BI, 1, 16)
            w = tl.load(W + (i3 * J + j3) * 16 + k * 4 + e3 % 4, mask=ok, other=0.0)          # (BI, BJ, 16)
            v += p * w
        if HAS_OFF:
            v += tl.load(O + i3 * 16 + e3, mask=i3 < I, other=0.0)
        return tl.where(ok, v, 0.0)

    @triton.jit
    def _gather_kernel(P, W, O, wts, w_sm, w_sj, act, centre, M, I, J, eps, out_a, out_b, out_s,
                       MODE: tl.constexpr, HAS_OFF: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
        """Per problem m: sums over children of weight * (v - c) and weight * (v - c)^2 for every parent.

        MODE 0 (mstep): weights r[m, j, i] act[m, i]; centre c = child 0's vote; writes the weighted mean,
        variance (no floor) and weight sums S. MODE 1 (estep_backward): weights g_maha[m, j, i], c = `centre`
        (the parents' means); writes the raw sums, which the caller scales.
        """
        m = tl.program_id(0).to(tl.int64)      # offsets past 2^31 elements at large batches
        j = tl.arange(0, BJ)
        e = tl.arange(0, 16)
        jm = j[:, None] * 16 + e[None, :]                                                   # (BJ, 16)
        ok2 = (j[:, None] < J) & (e[None, :] < 16)
        if MODE == 0:
            c = tl.sum(_votes(P, W, O, m, tl.arange(0, 1), j, I, J, HAS_OFF, 1, BJ), axis=0)   # (BJ, 16)
        else:
            c = tl.load(centre + m * J * 16 + jm, mask=ok2, other=0.0)
        s1 = tl.zeros((BJ, 16), dtype=P.dtype.element_ty)
        s2 = tl.zeros((BJ, 16), dtype=P.dtype.element_ty)
        sw = tl.zeros((BJ,), dtype=P.dtype.element_ty)
        for i0 in range(0, I, BI):
            i = i0 + tl.arange(0, BI)
            ok = (i[:, None] < I) & (j[None, :] < J)
            wt = tl.load(wts + m * w_sm + j[None, :] * w_sj + i[:, None], mask=ok, other=0.0)   # (BI, BJ)
            if MODE == 0:
                wt = wt * tl.load(act + m * I + i, mask=i < I, other=0.0)[:, None]
            d = _votes(P, W, O, m, i, j, I, J, HAS_OFF, BI, BJ) - c[None, :, :]
            wd = wt[:, :, None] * d
            s1 += tl.sum(wd, axis=0)
            s2 += tl.sum(wd * d, axis=0)
            sw += tl.sum(wt, axis=0)
        if MODE == 0:
            inv = 1.0 / tl.maximum(sw, eps)
            total = (sw * inv)[:, None]
            dd = s1 * inv[:, None]
            off = dd + c * (total - 1.0)                                                     # mean - c
            var = tl.maximum(s2 * inv[:, None] - 2.0 * off * dd + total * off * off, 0.0)
            tl.store(out_a + m * J * 16 + jm, c + off, mask=ok2)
            tl.store(out_b + m * J * 16 + jm, var, mask=ok2)
            tl.store(out_s + m * J + j, sw, mask=j < J)
        else:
            tl.store(out_a + m * J * 16 + jm, s1, mask=ok2)
            tl.store(out_b + m * J * 16 + jm, s2, mask=ok2)

    @triton.jit
    def _estep_kernel(P, W, O, mean, inv_var, const, M, I, J, h, r, lse,
                      HAS_OFF: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
        """Children [BI block] of problem m: l_j = const_j - h maha_ji, softmax over j into r, lse per child."""
        m = tl.program_id(0).to(tl.int64)      # offsets past 2^31 elements at large batches
        i = tl.program_id(1) * BI + tl.arange(0, BI)
        j = tl.arange(0, BJ)
        e = tl.arange(0, 16)
        ok2 = (j[:, None] < J) & (e[None, :] < 16)
        jm = m * J * 16 + j[:, None] * 16 + e[None, :]
        mu = tl.load(mean + jm, mask=ok2, other=0.0)
        iv = tl.load(inv_var + jm, mask=ok2, other=0.0)
        d = _votes(P, W, O, m, i, j, I, J, HAS_OFF, BI, BJ) - mu[None, :, :]
        maha = tl.sum(d * d * iv[None, :, :], axis=2)                                        # (BI, BJ)
        ok = (i[:, None] < I) & (j[None, :] < J)
        lg = tl.load(const + m * J + j, mask=j < J, other=0.0)[None, :] - h * maha
        lg = tl.where(ok, lg, -float("inf"))
        top = tl.max(lg, axis=1)
        top = tl.where(i < I, top, 0.0)
        p = tl.exp(lg - top[:, None])
        total = tl.sum(p, axis=1)
        total = tl.where(i < I, total, 1.0)
        tl.store(r + (m * J + j[None, :]) * I + i[:, None], p / total[:, None], mask=ok)
        tl.store(lse + m * I + i, top + tl.log(total), mask=i < I)

    @triton.jit
    def _mstep_backward_kernel(P, W, O, r, r_sm, r_sj, act, inv, mean, g_var, gm, g_maha, inv_var, e_mean,
                               M, I, J, gP, gW_part, gw, gw_sum,
                               HAS_OFF: tl.constexpr, HAS_E: tl.constexpr, BM: tl.constexpr,
                               BI: tl.constexpr, BJ: tl.constexpr):
        """Problems [BM block] x children [BI block]: the vote gradients g of every parent, turned into pose
        gradients (added to gP), transform gradients (this block's sum, into gW_part[block]), the per-vote sums
        gw[m, j, i] = sum_e gm v + g_var (v - mean)^2 from which the weight gradients follow, and this block's
        sum over children of gw r a, gw_sum[m, j, block] (the gradient through the weight sums S needs it)."""
        mb = tl.program_id(0).to(tl.int64)
        ib = tl.program_id(1)
        NB = tl.num_programs(1)
        i = ib * BI + tl.arange(0, BI)
        j = tl.arange(0, BJ)
        e = tl.arange(0, 16)
        i3, j3, e3 = i[:, None, None], j[None, :, None], e[None, None, :]
        ok = (i[:, None] < I) & (j[None, :] < J)
        ok3 = (i3 < I) & (j3 < J)
        ok2 = (j[:, None] < J) & (e[None, :] < 16)
        gw0 = tl.zeros((BI * BJ, 4), dtype=P.dtype.element_ty)
        gw1 = tl.zeros((BI * BJ, 4), dtype=P.dtype.element_ty)
        gw2 = tl.zeros((BI * BJ, 4), dtype=P.dtype.element_ty)
        gw3 = tl.zeros((BI * BJ, 4), dtype=P.dtype.element_ty)
        for mm in range(0, BM):
            m = mb * BM + mm
            if m < M:
                jm = m * J * 16 + j[:, None] * 16 + e[None, :]
                v = _votes(P, W, O, m, i, j, I, J, HAS_OFF, BI, BJ)
                d = v - tl.load(mean + jm, mask=ok2, other=0.0)[None, :, :]
                gv = tl.load(g_var + jm, mask=ok2, other=0.0)[None, :, :]
                gmj = tl.load(gm + jm, mask=ok2, other=0.0)[None, :, :]
                ra = tl.load(r + m * r_sm + j[None, :] * r_sj + i[:, None], mask=ok, other=0.0)
                ra = ra * tl.load(act + m * I + i, mask=i < I, other=0.0)[:, None]                 # (BI, BJ)
                w = ra * tl.load(inv + m * J + j, mask=j < J, other=0.0)[None, :]
                g = w[:, :, None] * (gmj + 2.0 * gv * d)
                if HAS_E:
                    c = 2.0 * tl.load(g_maha + (m * J + j[None, :]) * I + i[:, None], mask=ok, other=0.0)
                    emu = tl.load(e_mean + jm, mask=ok2, other=0.0)[None, :, :]
                    ivr = tl.load(inv_var + jm, mask=ok2, other=0.0)[None, :, :]
                    g += c[:, :, None] * (v - emu) * ivr
                g = tl.where(ok3, g, 0.0)
                acc = tl.sum(gmj * v + gv * d * d, axis=2)                                 # (BI, BJ)
                tl.store(gw + (m * J + j[None, :]) * I + i[:, None], acc, mask=ok)
                tl.store(gw_sum + (m * J + j) * NB + ib, tl.sum(acc * ra, axis=0), mask=j < J)
                # pose gradient gP[i, 4r+k] += sum_j sum_c g[i, j, 4r+c] W[i, j, 4k+c]; transform gradient
                # gW[i, j, 4k+c] += sum_r P[i, 4r+k] g[i, j, 4r+c]
                for k in tl.static_range(4):
                    wk = tl.load(W + (i3 * J + j3) * 16 + k * 4 + e3 % 4, mask=ok3, other=0.0)
                    gp = tl.sum(tl.reshape(tl.sum(g * wk, axis=1), (BI, 4, 4)), axis=2)            # (BI, 4 r)
                    ptr = gP + (m * I + i[:, None]) * 16 + tl.arange(0, 4)[None, :] * 4 + k
                    pm = (i[:, None] < I) & (tl.arange(0, 4)[None, :] < 4)
                    tl.store(ptr, tl.load(ptr, mask=pm, other=0.0) + gp, mask=pm)
                    pk = tl.load(P + (m * I + i3) * 16 + (e3 // 4) * 4 + k, mask=i3 < I, other=0.0)
                    t = tl.sum(tl.reshape(pk * g, (BI * BJ, 4, 4)), axis=1)                        # (BI*BJ, 4 c)
                    if k == 0:
                        gw0 += t
                    elif k == 1:
                        gw1 += t
                    elif k == 2:
                        gw2 += t
                    else:
                        gw3 += t
        ij = (i[:, None] * J + j[None, :])                                                          # (BI, BJ)
        base = gW_part + mb * I * J * 16 + tl.reshape(ij, (BI * BJ,))[:, None] * 16 + tl.arange(0, 4)[None, :]
        okw = tl.reshape(ok, (BI * BJ,))[:, None] & (tl.arange(0, 4)[None, :] < 4)
        tl.store(base, gw0, mask=okw)
        tl.store(base + 4, gw1, mask=okw)
        tl.store(base + 8, gw2, mask=okw)
        tl.store(base + 12, gw3, mask=okw)

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
    """How the kernels cut their work: about `votes` votes (children x parent types) per block of the forward
    passes and `backward_votes` per block of mstep_backward, which keeps more live per vote (both counted in
    float32: half as many in float64, which takes two registers a value); `problems` routing problems per
    mstep_backward program (its transform gradients are summed over them in registers); warps per program of
    each; `weights_votes` per block of mstep_backward's second kernel, a light pass over memory that wants
    large blocks. `benchmarks/triton_blocks.py` reports registers and spills of each choice (any machine) and
    times them (CUDA). Compiled for sm_90 (H100, H200), these defaults spill nothing in any routed layer of the
    paper and small networks, float32 capsule convolutions and float64 class capsules alike; with 4 warps, or
    without the float64 halving, the class layer's passes spill (tests/test_benchmarks.py checks the defaults)."""

    votes: int = 256
    backward_votes: int = 64
    problems: int = 64
    warps: int = 8
    backward_warps: int = 8
    weights_votes: int = 2048

    def forward(self, n_out: int, n_in: int, dtype: torch.dtype) -> tuple[int, int]:
        """(BJ, BI) of the forward passes: every parent type in one block, children up to `votes` votes."""
        return _blocks(n_out, n_in, self.votes * 4 // dtype.itemsize)

    def backward(self, n_out: int, n_in: int, dtype: torch.dtype) -> tuple[int, int]:
        """(BJ, BI) of mstep_backward."""
        return _blocks(n_out, n_in, self.backward_votes * 4 // dtype.itemsize)


def _blocks(n_out: int, n_in: int, votes: int) -> tuple[int, int]:
    """(BJ, BI): every parent type in one block, and as many children as keep a block near `votes` votes."""
    bj = triton.next_power_of_2(n_out)
    bi = max(1, min(triton.next_power_of_2(n_in), votes // bj))
    return bj, bi


class TritonKernels:
    """The four kernels with em_kernels.cpp's arguments (less the thread range), and `call` as `Library.call`."""

    def __init__(self, blocks: TritonBlocks = TritonBlocks()):
        self.blocks = blocks

    def threads(self, n_problems: int) -> int:
        return 1                    # one slot of per-thread transform gradients: the blocks are summed here

    def call(self, name: str, dtype: torch.dtype, args: list, n_problems: int, range_at: int) -> None:
        args = [a.tensor if isinstance(a, PerThread) else a for a in args]    # one slot: threads() is 1
        with torch.profiler.record_function(f"emcaps::{name}"):
            getattr(self, name)(*args)

    def launch(self, kernel, grid: tuple[int, ...], *args, **meta) -> None:
        """Runs `kernel` on `grid`; benchmarks/triton_blocks.py records the launches instead, to compile them."""
        kernel[grid](*args, **meta)

    def mstep(self, P: Tensor, W: Tensor, O: Tensor | None, r: Tensor, r_sm: int, r_sj: int, act: Tensor,
              M: int, J: int, I: int, eps: float, mean: Tensor, var: Tensor, S: Tensor) -> None:
        """mean, var (M, J, 16) (no floor) and weight sums S (M, J) of every parent."""
        bj, bi = self.blocks.forward(J, I, P.dtype)
        self.launch(_gather_kernel, (M,), P, W, O if O is not None else P, r, r_sm, r_sj, act, P, M, I, J, eps,
                    mean, var, S, MODE=0, HAS_OFF=O is not None, BI=bi, BJ=bj, num_warps=self.blocks.warps)

    def estep_assign(self, P: Tensor, W: Tensor, O: Tensor | None, mean: Tensor, inv_var: Tensor, const: Tensor,
                     M: int, J: int, I: int, h: float, r: Tensor, lse: Tensor) -> None:
        """r (M, J, I): the E-step normalised over parent types; lse (M, I), each child's log-normaliser."""
        bj, bi = self.blocks.forward(J, I, P.dtype)
        self.launch(_estep_kernel, (M, triton.cdiv(I, bi)), P, W, O if O is not None else P, mean, inv_var, const,
                    M, I, J, h, r, lse, HAS_OFF=O is not None, BI=bi, BJ=bj, num_warps=self.blocks.warps)

    def estep_backward(self, P: Tensor, W: Tensor, O: Tensor | None, mean: Tensor, inv_var: Tensor,
                       g_maha: Tensor, M: int, J: int, I: int, g_mean: Tensor, g_inv_var: Tensor) -> None:
        """g_mean = -2 inv_var sum_i g_maha (v - mean), g_inv_var = sum_i g_maha (v - mean)^2, (M, J, 16)."""
        bj, bi = self.blocks.forward(J, I, P.dtype)
        self.launch(_gather_kernel, (M,), P, W, O if O is not None else P, g_maha, J * I, I, P, mean, M, I, J, 0.0,
                    g_mean, g_inv_var, P, MODE=1, HAS_OFF=O is not None, BI=bi, BJ=bj, num_warps=self.blocks.warps)
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
        bj, bi = self.blocks.backward(J, I, P.dtype)
        bm = self.blocks.problems
        blocks, n_ib = triton.cdiv(M, bm), triton.cdiv(I, bi)
        part = P.new_empty(blocks, I, J, 16)
        gw_sum = P.new_empty(M, J, n_ib)
        has_e = g_maha is not None
        self.launch(_mstep_backward_kernel, (blocks, n_ib),
                    P, W, O if O is not None else P, r, r_sm, r_sj, act, inv, mean, g_var, gm,
                    g_maha if has_e else P, inv_var if has_e else P, e_mean if has_e else P, M, I, J, gP, part, gw,
                    gw_sum, HAS_OFF=O is not None, HAS_E=has_e, BM=bm, BI=bi, BJ=bj,
                    num_warps=self.blocks.backward_warps)
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
