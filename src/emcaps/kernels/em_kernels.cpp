// EM routing kernels for capsule convolutions, forward and backward.
//
// The votes of a capsule convolution, v[m, j, i] = P[m, i] @ W[i, j] (4x4 @ 4x4, m a routing problem = image
// position, i a child in its window, j a parent type), are never stored: every pass recomputes them from the
// child poses P (M, I, 16) and the transforms W (I, J, 16), which is cheaper than streaming a votes tensor of
// 30 MB per image through memory. Each vote is used the moment it is made (gathered into its parent's sums, or
// measured against its parent), never stored. The portable passes take the children as their outer loop; the
// AVX-512 forms block the loops where that keeps more in registers (the M-step: four parent types of one problem
// over all children; the E-step: sixteen children of one problem over all parent types).
// The class capsules route through the same kernels (m an image, i a (position, type) child, W repeated over
// positions), with an optional per-child offset O (I, 16) added to every vote: the coordinate addition.
//
// The glue between passes (costs, activations, one factor per child where positions compete) is small and stays in
// PyTorch (emcaps/routing/native.py); these functions do every pass over the votes:
//   mstep:          weighted mean and variance of the votes of each parent, and the weight sums S;
//   estep_assign:   the E-step: every vote's log-likelihood under its parent's Gaussian, normalised over the parent
//                   types of its window (the caller rescales per child where positions compete too);
//   estep_backward: the E-step's gradients with respect to the parent means and inverse variances;
//   mstep_backward: gradients with respect to the child poses and the transforms (through the votes, which it
//                   recomputes), the assignments and the child activations; it also takes the E-step's share
//                   of the vote gradients of the same iteration.
// Every function handles the problems m in [m0, m1); the exported ones split them across `threads` threads of the
// OpenMP runtime where the library is built with it (see `split`), and callers without it split them themselves.
// The same templates serve float (the fast path) and double (what the tests compare against references).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

namespace {

// Child pose P (row-major 4x4) expanded for vote products: A[k][r*4+c] = P[r*4+k].
template <typename T>
inline void expand_pose(const T* p, T* a) {
  for (int k = 0; k < 4; ++k)
    for (int e = 0; e < 16; ++e) a[k * 16 + e] = p[(e >> 2) * 4 + k];
}

// v = P @ W for one child and parent type: v[r*4+c] = sum_k P[r*4+k] W[k*4+c] = sum_k A[k][r*4+c] W[k*4+c].
template <typename T>
inline void vote(const T* a, const T* w, T* v) {
  for (int e = 0; e < 16; ++e) {
    const int c = e & 3;
    v[e] = a[e] * w[c] + a[16 + e] * w[4 + c] + a[32 + e] * w[8 + c] + a[48 + e] * w[12 + c];
  }
}

// v += sum_k A[k] * tile(w[k*4 .. k*4+3]): with B = expand_pose_t(P) and w = g, the transform gradient
// P^T g of one vote.
template <typename T>
inline void vote_add(const T* a, const T* w, T* v) {
  for (int e = 0; e < 16; ++e) {
    const int c = e & 3;
    v[e] += a[e] * w[c] + a[16 + e] * w[4 + c] + a[32 + e] * w[8 + c] + a[48 + e] * w[12 + c];
  }
}

// Child pose P expanded for transform gradients: B[r][k*4+c] = P[r*4+k], so sum_r B[r] * tile(g[r*4 ..]) = P^T g.
template <typename T>
inline void expand_pose_t(const T* p, T* b) {
  for (int r = 0; r < 4; ++r)
    for (int e = 0; e < 16; ++e) b[r * 16 + e] = p[r * 4 + (e >> 2)];
}

// gp += sum_j g_j @ W_j^T over the n votes of one child, from the transposed transforms wt_j = W_j^T:
// gp[r*4+k] += sum_j sum_c g_j[r*4+c] wt_j[c*4+k]. g and wt hold one row of 16 per parent.
template <typename T>
inline void pose_grad(const T* g, const T* wt, i64 n, T* gp) {
  for (i64 j = 0; j < n; ++j, g += 16, wt += 16)
    for (int e = 0; e < 16; ++e) {
      const int r4 = e & ~3, k = e & 3;
      gp[e] += g[r4] * wt[k] + g[r4 + 1] * wt[4 + k] + g[r4 + 2] * wt[8 + k] + g[r4 + 3] * wt[12 + k];
    }
}

#if defined(__AVX512F__)
template <>
inline void vote_add<float>(const float* a, const float* w, float* v) {
  __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(a), _mm512_broadcast_f32x4(_mm_loadu_ps(w)), _mm512_loadu_ps(v));
  x = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 4)), x);
  x = _mm512_fmadd_ps(_mm512_loadu_ps(a + 32), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 8)), x);
  x = _mm512_fmadd_ps(_mm512_loadu_ps(a + 48), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 12)), x);
  _mm512_storeu_ps(v, x);
}

template <>
inline void pose_grad<float>(const float* g, const float* wt, i64 n, float* gp) {
  const __m512i base = _mm512_set_epi32(12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0);
  __m512i idx[4];
  for (int c = 0; c < 4; ++c) idx[c] = _mm512_add_epi32(base, _mm512_set1_epi32(c));
  const auto step = [&](__m512 y, const float* gj, const float* wj) {
    const __m512 x = _mm512_loadu_ps(gj);
    for (int c = 0; c < 4; ++c)
      y = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx[c], x), _mm512_broadcast_f32x4(_mm_loadu_ps(wj + 4 * c)), y);
    return y;
  };
  // Two accumulators, so that consecutive parents' products do not wait on each other (named, not an array
  // indexed by j & 1, which the compiler kept on the stack).
  __m512 even = _mm512_loadu_ps(gp), odd = _mm512_setzero_ps();
  i64 j = 0;
  for (; j + 2 <= n; j += 2, g += 32, wt += 32) {
    even = step(even, g, wt);
    odd = step(odd, g + 16, wt + 16);
  }
  if (j < n) even = step(even, g, wt);
  _mm512_storeu_ps(gp, _mm512_add_ps(even, odd));
}

template <>
inline void vote<float>(const float* a, const float* w, float* v) {
  __m512 x = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_broadcast_f32x4(_mm_loadu_ps(w)));
  x = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 4)), x);
  x = _mm512_fmadd_ps(_mm512_loadu_ps(a + 32), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 8)), x);
  x = _mm512_fmadd_ps(_mm512_loadu_ps(a + 48), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 12)), x);
  _mm512_storeu_ps(v, x);
}
#endif

// sum_e (v_e - mu_e)^2 iv_e over the 16 entries of one vote.
template <typename T>
inline T scaled_sq_dist(const T* v, const T* mu, const T* iv) {
  T acc = 0;
  for (int e = 0; e < 16; ++e) {
    const T d = v[e] - mu[e];
    acc += d * d * iv[e];
  }
  return acc;
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// The same three products with 256-bit registers, one half (two rows of the 4x4 result) at a time: every
// 128-bit lane holds one row, so a row of W broadcast to both lanes lines up with it.
template <>
inline void vote<float>(const float* a, const float* w, float* v) {
  for (int h = 0; h < 16; h += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a + h), _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w)));
    x = _mm256_fmadd_ps(_mm256_loadu_ps(a + 16 + h), _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 4)), x);
    x = _mm256_fmadd_ps(_mm256_loadu_ps(a + 32 + h), _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 8)), x);
    x = _mm256_fmadd_ps(_mm256_loadu_ps(a + 48 + h), _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 12)), x);
    _mm256_storeu_ps(v + h, x);
  }
}

template <>
inline void vote_add<float>(const float* a, const float* w, float* v) {
  for (int h = 0; h < 16; h += 8) {
    __m256 x = _mm256_fmadd_ps(_mm256_loadu_ps(a + h), _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w)),
                               _mm256_loadu_ps(v + h));
    x = _mm256_fmadd_ps(_mm256_loadu_ps(a + 16 + h), _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 4)), x);
    x = _mm256_fmadd_ps(_mm256_loadu_ps(a + 32 + h), _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 8)), x);
    x = _mm256_fmadd_ps(_mm256_loadu_ps(a + 48 + h), _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 12)), x);
    _mm256_storeu_ps(v + h, x);
  }
}

// gp[r*4+k] += sum_c g[r*4+c] wt[c*4+k]: within a lane (one row r), g[r*4+c] is broadcast by an in-lane permute.
template <>
inline void pose_grad<float>(const float* g, const float* wt, i64 n, float* gp) {
  __m256 lo = _mm256_loadu_ps(gp), hi = _mm256_loadu_ps(gp + 8);
  for (i64 j = 0; j < n; ++j, g += 16, wt += 16) {
    const __m256 x0 = _mm256_loadu_ps(g), x1 = _mm256_loadu_ps(g + 8);
    const __m256 w0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(wt));
    const __m256 w1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(wt + 4));
    const __m256 w2 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(wt + 8));
    const __m256 w3 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(wt + 12));
    lo = _mm256_fmadd_ps(_mm256_permute_ps(x0, 0x00), w0, lo);
    lo = _mm256_fmadd_ps(_mm256_permute_ps(x0, 0x55), w1, lo);
    lo = _mm256_fmadd_ps(_mm256_permute_ps(x0, 0xAA), w2, lo);
    lo = _mm256_fmadd_ps(_mm256_permute_ps(x0, 0xFF), w3, lo);
    hi = _mm256_fmadd_ps(_mm256_permute_ps(x1, 0x00), w0, hi);
    hi = _mm256_fmadd_ps(_mm256_permute_ps(x1, 0x55), w1, hi);
    hi = _mm256_fmadd_ps(_mm256_permute_ps(x1, 0xAA), w2, hi);
    hi = _mm256_fmadd_ps(_mm256_permute_ps(x1, 0xFF), w3, hi);
  }
  _mm256_storeu_ps(gp, lo);
  _mm256_storeu_ps(gp + 8, hi);
}

template <>
inline float scaled_sq_dist<float>(const float* v, const float* mu, const float* iv) {
  const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(mu));
  const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(v + 8), _mm256_loadu_ps(mu + 8));
  const __m256 t = _mm256_fmadd_ps(_mm256_mul_ps(d1, d1), _mm256_loadu_ps(iv + 8),
                                   _mm256_mul_ps(_mm256_mul_ps(d0, d0), _mm256_loadu_ps(iv)));
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
#endif

// The forward passes visit the votes child by child, for MB problems at a time: a child's expanded pose and its
// row of transforms W[i, :] are loaded once for all of them, and what each parent gathers (MB x J x 33 values)
// stays in L1. Every (m, j) still sums its children in order i = 0, 1, ..., so results do not depend on MB or
// on how the problems are split across threads.
constexpr i64 MB = 2;

// visit(b, j, i, a, w, o) for every vote of the problems [mb, mb + nb): children outer, then parent types, then
// problems; a is child i's expanded pose in problem mb + b (made here, in a[b * 64 ...]), w = W[i, j] and o the
// child's offset (null without one).
template <typename T, typename Visit>
inline void each_vote(const T* P, const T* W, const T* O, i64 J, i64 I, i64 mb, i64 nb, T* a, Visit&& visit) {
  for (i64 i = 0; i < I; ++i) {
    for (i64 b = 0; b < nb; ++b) expand_pose(P + ((mb + b) * I + i) * 16, a + b * 64);
    const T* oi = O ? O + i * 16 : nullptr;
    for (i64 j = 0; j < J; ++j) {
      const T* wij = W + (i * J + j) * 16;
      for (i64 b = 0; b < nb; ++b) visit(b, j, i, a + b * 64, wij, oi);
    }
  }
}

// The vote of one child for one parent, plus the child's offset o where given.
template <typename T>
inline void offset_vote(const T* a, const T* w, const T* o, T* v) {
  vote(a, w, v);
  if (o)
    for (int e = 0; e < 16; ++e) v[e] += o[e];
}

// s1 += w (v - c), s2 += w (v - c)^2.
template <typename T>
inline void gather(const T* __restrict__ v, const T* __restrict__ c, T w, T* __restrict__ s1, T* __restrict__ s2) {
  for (int e = 0; e < 16; ++e) {
    const T d = v[e] - c[e];
    s1[e] += w * d;
    s2[e] += w * d * d;
  }
}

// One vote, gathered straight away: s1 += w (v - c), s2 += w (v - c)^2 with v = the vote (+ offset o).
template <typename T>
inline void vote_gather(const T* a, const T* w, const T* o, const T* c, T wt, T* s1, T* s2) {
  alignas(64) T v[16];
  offset_vote(a, w, o, v);
  gather(v, c, wt, s1, s2);
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// The same with the vote kept in registers (two halves of two rows each, as vote<float>).
template <>
inline void vote_gather<float>(const float* a, const float* w, const float* o, const float* c, float wt, float* s1,
                               float* s2) {
  const __m256 w0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w));
  const __m256 w1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 4));
  const __m256 w2 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 8));
  const __m256 w3 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 12));
  const __m256 ws = _mm256_set1_ps(wt);
  for (int h = 0; h < 16; h += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a + h), w0);
    x = _mm256_fmadd_ps(_mm256_loadu_ps(a + 16 + h), w1, x);
    x = _mm256_fmadd_ps(_mm256_loadu_ps(a + 32 + h), w2, x);
    x = _mm256_fmadd_ps(_mm256_loadu_ps(a + 48 + h), w3, x);
    if (o) x = _mm256_add_ps(x, _mm256_loadu_ps(o + h));
    const __m256 d = _mm256_sub_ps(x, _mm256_loadu_ps(c + h));
    const __m256 wd = _mm256_mul_ps(ws, d);
    _mm256_storeu_ps(s1 + h, _mm256_add_ps(_mm256_loadu_ps(s1 + h), wd));
    _mm256_storeu_ps(s2 + h, _mm256_fmadd_ps(wd, d, _mm256_loadu_ps(s2 + h)));
  }
}
#endif

#if defined(__AVX512F__)
// The same with the vote kept in one register.
template <>
inline void vote_gather<float>(const float* a, const float* w, const float* o, const float* c, float wt, float* s1,
                               float* s2) {
  __m512 x = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_broadcast_f32x4(_mm_loadu_ps(w)));
  x = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 4)), x);
  x = _mm512_fmadd_ps(_mm512_loadu_ps(a + 32), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 8)), x);
  x = _mm512_fmadd_ps(_mm512_loadu_ps(a + 48), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 12)), x);
  if (o) x = _mm512_add_ps(x, _mm512_loadu_ps(o));
  const __m512 d = _mm512_sub_ps(x, _mm512_loadu_ps(c));
  const __m512 wd = _mm512_mul_ps(_mm512_set1_ps(wt), d);
  _mm512_storeu_ps(s1, _mm512_add_ps(_mm512_loadu_ps(s1), wd));
  _mm512_storeu_ps(s2, _mm512_fmadd_ps(wd, d, _mm512_loadu_ps(s2)));
}
#endif

// The mean and variance of each parent of problems [mb, mb + nb) from the gathered sums around c (mstep).
template <typename T>
inline void finish_mstep(const T* c, const T* s1, const T* s2, const T* sw, i64 mb, i64 nb, i64 J, T eps, T* mean,
                         T* var, T* S) {
  for (i64 b = 0; b < nb; ++b)
    for (i64 j = 0; j < J; ++j) {
      const i64 k = b * J + j, mj = (mb + b) * J + j;
      const T s = sw[k], inv = T(1) / std::max(s, eps), total = s * inv;
      S[mj] = s;
      for (int e = 0; e < 16; ++e) {
        const T ce = c[k * 16 + e], d = s1[k * 16 + e] * inv, q = s2[k * 16 + e] * inv;
        const T off = d + ce * (total - T(1));                       // mean - c
        mean[mj * 16 + e] = ce + off;
        var[mj * 16 + e] = std::max(q - 2 * off * d + total * off * off, T(0));
      }
    }
}

// The centres c (MB x J x 16) of mstep's sums: each parent's vote from child 0.
template <typename T>
inline void mstep_centres(const T* P, const T* W, const T* O, i64 J, i64 I, i64 mb, i64 nb, T* a, T* c) {
  for (i64 b = 0; b < nb; ++b) {
    expand_pose(P + (mb + b) * I * 16, a);
    for (i64 j = 0; j < J; ++j) offset_vote(a, W + j * 16, O, c + (b * J + j) * 16);
  }
}

// Weighted mean and variance in one pass over the votes. Each parent's sums are taken around one of its own
// votes c (child 0's): with w'_i = r_i a_i / max(S, eps), W' = sum_i w'_i (1 unless S < eps), d = sum_i w'_i
// (v_i - c) and q = sum_i w'_i (v_i - c)^2, the mean is c W' + d and, with e = mean - c,
// sum_i w'_i (v_i - mean)^2 = q - 2 e d + W' e^2. Around a vote, q and d are of the size of the variance, so the
// difference loses no precision to votes that sit far from zero (as E[v^2] - mean^2 would).
template <typename T>
void mstep(const T* P, const T* W, const T* O, const T* r, i64 r_sm, i64 r_sj, const T* act, i64 M, i64 J, i64 I, i64 m0,
           i64 m1, T eps, T* mean, T* var, T* S) {
  (void)M;
  std::vector<T> a(MB * 64), c(MB * J * 16), s1(MB * J * 16), s2(MB * J * 16), sw(MB * J);
  for (i64 mb = m0; mb < m1; mb += MB) {
    const i64 nb = std::min(MB, m1 - mb);
    mstep_centres(P, W, O, J, I, mb, nb, a.data(), c.data());
    std::fill(s1.begin(), s1.end(), T(0));
    std::fill(s2.begin(), s2.end(), T(0));
    std::fill(sw.begin(), sw.end(), T(0));
    each_vote(P, W, O, J, I, mb, nb, a.data(), [&](i64 b, i64 j, i64 i, const T* ai, const T* wij, const T* oi) {
      const i64 m = mb + b, k = b * J + j;
      const T w = r[m * r_sm + j * r_sj + i] * act[m * I + i];
      vote_gather(ai, wij, oi, c.data() + k * 16, w, s1.data() + k * 16, s2.data() + k * 16);
      sw[k] += w;
    });
    finish_mstep(c.data(), s1.data(), s2.data(), sw.data(), mb, nb, J, eps, mean, var, S);
  }
}

#if defined(__AVX512F__)
// The sums of parents [j0, j0 + JB) of one problem over all its children, kept in registers: A holds every child's
// expanded pose (I x 64), c the centres (J x 16), r and act the problem's rows. Each parent still sums its
// children in order i = 0, 1, ...
template <int JB>
inline void gather_parents(const float* A, const float* W, const float* O, const float* r, i64 r_sj,
                           const float* act, i64 J, i64 I, i64 j0, const float* c, float* s1, float* s2, float* sw) {
  __m512 t1[JB], t2[JB], nc[JB];
  float tw[JB];
  for (int q = 0; q < JB; ++q) {
    t1[q] = t2[q] = _mm512_setzero_ps();
    nc[q] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(c + (j0 + q) * 16));
    tw[q] = 0;
  }
  for (i64 i = 0; i < I; ++i) {
    const float* a = A + i * 64;
    const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16), a2 = _mm512_loadu_ps(a + 32),
                 a3 = _mm512_loadu_ps(a + 48);
    const __m512 o = O ? _mm512_loadu_ps(O + i * 16) : _mm512_setzero_ps();
    const float ai = act[i];
#pragma GCC unroll 8
    for (int q = 0; q < JB; ++q) {
      const float* w = W + (i * J + j0 + q) * 16;
      __m512 d = _mm512_fmadd_ps(a0, _mm512_broadcast_f32x4(_mm_loadu_ps(w)), O ? _mm512_add_ps(o, nc[q]) : nc[q]);
      d = _mm512_fmadd_ps(a1, _mm512_broadcast_f32x4(_mm_loadu_ps(w + 4)), d);
      d = _mm512_fmadd_ps(a2, _mm512_broadcast_f32x4(_mm_loadu_ps(w + 8)), d);
      d = _mm512_fmadd_ps(a3, _mm512_broadcast_f32x4(_mm_loadu_ps(w + 12)), d);        // v - c
      const float wt = r[(j0 + q) * r_sj + i] * ai;
      const __m512 wd = _mm512_mul_ps(_mm512_set1_ps(wt), d);
      t1[q] = _mm512_add_ps(t1[q], wd);
      t2[q] = _mm512_fmadd_ps(wd, d, t2[q]);
      tw[q] += wt;
    }
  }
  for (int q = 0; q < JB; ++q) {
    _mm512_storeu_ps(s1 + (j0 + q) * 16, t1[q]);
    _mm512_storeu_ps(s2 + (j0 + q) * 16, t2[q]);
    sw[j0 + q] = tw[q];
  }
}

// The M-step one problem at a time with its sums in registers, four parent types at a time (the children's
// expanded poses, I x 64, are made once per problem and read once per four parent types).
template <>
void mstep<float>(const float* P, const float* W, const float* O, const float* r, i64 r_sm, i64 r_sj,
                  const float* act, i64 M, i64 J, i64 I, i64 m0, i64 m1, float eps, float* mean, float* var,
                  float* S) {
  (void)M;
  std::vector<float> A(I * 64), c(J * 16), s1(J * 16), s2(J * 16), sw(J);
  for (i64 m = m0; m < m1; ++m) {
    for (i64 i = 0; i < I; ++i) expand_pose(P + (m * I + i) * 16, A.data() + i * 64);
    for (i64 j = 0; j < J; ++j) offset_vote(A.data(), W + j * 16, O, c.data() + j * 16);
    const float* rm = r + m * r_sm;
    const float* am = act + m * I;
    i64 j0 = 0;
    for (; j0 + 4 <= J; j0 += 4)
      gather_parents<4>(A.data(), W, O, rm, r_sj, am, J, I, j0, c.data(), s1.data(), s2.data(), sw.data());
    for (; j0 < J; ++j0)
      gather_parents<1>(A.data(), W, O, rm, r_sj, am, J, I, j0, c.data(), s1.data(), s2.data(), sw.data());
    finish_mstep(c.data(), s1.data(), s2.data(), sw.data(), m, 1, J, eps, mean, var, S);
  }
}
#endif

// The E-step and its normalisation over the parent types of each window in one pass: for child i of problem m,
// l_j = c_j - h maha_ji (c = tau (log a_j - 0.5 sum_d log(2 pi var_jd)) per parent, h = tau / 2),
// r_ji = exp(l_j - lse_i), lse_i = log sum_j exp(l_j); r (M, J, I) and lse (M, I) are written. Where parents at
// other positions compete too, the caller rescales each (m, i) by exp(lse_i - the child's total over positions).
// The log-assignments of one child's J parents are made into `l` (J values), then normalised.
template <typename T>
inline void child_log_assign(const T* a, const T* W, const T* o, const T* mean, const T* inv_var, const T* c, T h,
                             i64 J, T* l) {
  alignas(64) T v[16];
  for (i64 j = 0; j < J; ++j) {
    offset_vote(a, W + j * 16, o, v);
    l[j] = c[j] - h * scaled_sq_dist(v, mean + j * 16, inv_var + j * 16);
  }
}

// r_j = exp(l_j - lse) for the J values of l (stride `step` in r), l overwritten; returns lse = log sum_j exp(l_j).
template <typename T>
inline T normalise_assign(T* l, i64 J, T* r, i64 step) {
  T top = l[0];
  for (i64 j = 1; j < J; ++j) top = std::max(top, l[j]);
  T sum = 0;
  for (i64 j = 0; j < J; ++j) sum += (l[j] = std::exp(l[j] - top));
  const T inv = T(1) / sum;
  for (i64 j = 0; j < J; ++j) r[j * step] = l[j] * inv;
  return top + std::log(sum);
}

template <typename T>
void estep_assign(const T* P, const T* W, const T* O, const T* mean, const T* inv_var, const T* c, i64 M, i64 J,
                  i64 I, i64 m0, i64 m1, T h, T* r, T* lse) {
  (void)M;
  alignas(64) T a[64];
  std::vector<T> l(J);
  for (i64 m = m0; m < m1; ++m)
    for (i64 i = 0; i < I; ++i) {
      expand_pose(P + (m * I + i) * 16, a);
      child_log_assign(a, W + i * J * 16, O ? O + i * 16 : nullptr, mean + m * J * 16, inv_var + m * J * 16,
                       c + m * J, h, J, l.data());
      lse[m * I + i] = normalise_assign(l.data(), J, r + m * J * I + i, I);
    }
}

#if defined(__AVX512F__)
// Lane k of the result is the sum of the 16 lanes of x[4 * (k % 4) + k / 4]: four rounds of shuffles and adds
// reduce sixteen vectors at once, where reducing each alone would take four rounds per vector.
inline __m512 sum16(const __m512* x) {
  __m512 u[8], y[4], z[2];
  #pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)         // blocks 0-1: halves of x[2k], blocks 2-3: of x[2k+1]
    u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xEE));
  #pragma GCC unroll 8
  for (int k = 0; k < 4; ++k)         // block c: 4 partial sums of x[4k + c]
    y[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0xDD));
  #pragma GCC unroll 8
  for (int k = 0; k < 2; ++k)         // block c: 2 of x[8k + c], then 2 of x[8k + 4 + c]
    z[k] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * k], y[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(y[2 * k], y[2 * k + 1], 0xEE));
  // block c, lane l: x[c + 4l]
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}

#endif

#if defined(__AVX512F__)
// e^x for 16 floats, within 2 ulp (Cephes' expf: 2^n e^f, n = round(x / ln 2), |f| <= ln 2 / 2); NaN stays NaN.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.5f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));   // NaN: the 2nd operand
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// log x for 16 positive floats, within 2 ulp (Cephes' logf: x = m 2^e, m in [sqrt(1/2), sqrt(2)), a polynomial in
// m - 1); a scalar logf per child, called from this much vector code, measured a tenth of the E-step.
inline __m512 log16(__m512 x) {
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);        // [0.5, 1)
  __m512 e = _mm512_add_ps(_mm512_getexp_ps(x), _mm512_set1_ps(1.f));             // x = m 2^e
  const __mmask16 low = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm512_mask_sub_ps(e, low, e, _mm512_set1_ps(1.f));
  m = _mm512_sub_ps(_mm512_mask_add_ps(m, low, m, m), _mm512_set1_ps(1.f));        // m - 1 in [-0.29, 0.41)
  const __m512 z = _mm512_mul_ps(m, m);
  __m512 y = _mm512_set1_ps(7.0376836292e-2f);
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.1514610310e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.1676998740e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.2420140846e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.4249322787e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.6668057665e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(2.0000714765e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-2.4999993993e-1f));
  y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(3.3333331174e-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fmadd_ps(z, _mm512_set1_ps(-0.5f), y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(m, y));
}

#endif

#if defined(__AVX512F__)
// estep_assign for sixteen children at a time: for each parent type, the distances of the sixteen children's votes
// reduce together (sum16) into one vector whose lanes are the children, so normalising over the parent types is
// lane-parallel (no horizontal work) and each parent's row of assignments is one contiguous store. Where I is not a
// multiple of sixteen, the last block is the last sixteen children (it overlaps the one before and writes the same
// values again); fewer than sixteen children go one by one, through the portable code.
template <>
void estep_assign<float>(const float* P, const float* W, const float* O, const float* mean, const float* inv_var,
                         const float* c, i64 M, i64 J, i64 I, i64 m0, i64 m1, float h, float* r, float* lse) {
  (void)M;
  const i64 blocked = I >= 16 ? I : 0;           // children handled sixteen at a time
  std::vector<float> a(16 * 64), tile(J * 16), l(J);
  const __m512 hv = _mm512_set1_ps(h);
  for (i64 m = m0; m < m1; ++m) {
    const float* mm = mean + m * J * 16;
    const float* im = inv_var + m * J * 16;
    for (i64 next = 0; next < blocked; next += 16) {
      const i64 ib = std::min(next, I - 16);
      for (int k = 0; k < 16; ++k) expand_pose(P + (m * I + ib + k) * 16, a.data() + k * 64);
      for (i64 j = 0; j < J; ++j) {
        const __m512 mu = _mm512_loadu_ps(mm + j * 16), iv = _mm512_loadu_ps(im + j * 16);
        __m512 t[16];
        #pragma GCC unroll 16
        for (int n = 0; n < 16; ++n) {
          const int k = 4 * (n & 3) + (n >> 2);                  // the order sum16 undoes
          const float* ak = a.data() + k * 64;
          const float* w = W + ((ib + k) * J + j) * 16;
          __m512 x = _mm512_mul_ps(_mm512_loadu_ps(ak), _mm512_broadcast_f32x4(_mm_loadu_ps(w)));
          x = _mm512_fmadd_ps(_mm512_loadu_ps(ak + 16), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 4)), x);
          x = _mm512_fmadd_ps(_mm512_loadu_ps(ak + 32), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 8)), x);
          x = _mm512_fmadd_ps(_mm512_loadu_ps(ak + 48), _mm512_broadcast_f32x4(_mm_loadu_ps(w + 12)), x);
          if (O) x = _mm512_add_ps(x, _mm512_loadu_ps(O + (ib + k) * 16));
          const __m512 d = _mm512_sub_ps(x, mu);
          t[n] = _mm512_mul_ps(_mm512_mul_ps(d, d), iv);
        }
        _mm512_storeu_ps(tile.data() + j * 16, _mm512_fnmadd_ps(hv, sum16(t), _mm512_set1_ps(c[m * J + j])));
      }
      __m512 top = _mm512_loadu_ps(tile.data());
      for (i64 j = 1; j < J; ++j) top = _mm512_max_ps(top, _mm512_loadu_ps(tile.data() + j * 16));
      __m512 sum = _mm512_setzero_ps();
      for (i64 j = 0; j < J; ++j) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(tile.data() + j * 16), top));
        _mm512_storeu_ps(tile.data() + j * 16, e);
        sum = _mm512_add_ps(sum, e);
      }
      const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), sum);
      for (i64 j = 0; j < J; ++j)
        _mm512_storeu_ps(r + (m * J + j) * I + ib, _mm512_mul_ps(_mm512_loadu_ps(tile.data() + j * 16), inv));
      _mm512_storeu_ps(lse + m * I + ib, _mm512_add_ps(top, log16(sum)));
    }
    for (i64 i = blocked; i < I; ++i) {
      expand_pose(P + (m * I + i) * 16, a.data());
      child_log_assign(a.data(), W + i * J * 16, O ? O + i * 16 : nullptr, mm, im, c + m * J, h, J, l.data());
      lse[m * I + i] = normalise_assign(l.data(), J, r + m * J * I + i, I);
    }
  }
}
#endif

// maha[i] = sum_e (v_i - mu)^2 iv: g_mean = -2 iv sum_i g_maha_i (v_i - mu), g_inv_var = sum_i g_maha_i (v_i - mu)^2,
// the M-step's sums with g_maha for weights and mu for centre.
template <typename T>
void estep_backward(const T* P, const T* W, const T* O, const T* mean, const T* inv_var, const T* g_maha, i64 M,
                    i64 J, i64 I, i64 m0, i64 m1, T* g_mean, T* g_inv_var) {
  (void)M;
  std::vector<T> a(MB * 64), gd(MB * J * 16), gq(MB * J * 16);
  for (i64 mb = m0; mb < m1; mb += MB) {
    const i64 nb = std::min(MB, m1 - mb);
    std::fill(gd.begin(), gd.end(), T(0));
    std::fill(gq.begin(), gq.end(), T(0));
    each_vote(P, W, O, J, I, mb, nb, a.data(), [&](i64 b, i64 j, i64 i, const T* ai, const T* wij, const T* oi) {
      const i64 k = b * J + j, mj = (mb + b) * J + j;
      vote_gather(ai, wij, oi, mean + mj * 16, g_maha[mj * I + i], gd.data() + k * 16, gq.data() + k * 16);
    });
    for (i64 b = 0; b < nb; ++b)
      for (i64 j = 0; j < J; ++j) {
        const i64 k = b * J + j, mj = (mb + b) * J + j;
        for (int e = 0; e < 16; ++e) {
          g_mean[mj * 16 + e] = -2 * gd[k * 16 + e] * inv_var[mj * 16 + e];
          g_inv_var[mj * 16 + e] = gq[k * 16 + e];
        }
      }
  }
}

#if defined(__AVX512F__)
// mstep_backward's work for one child i of one problem m and its parent types [0, J16), J16 the largest multiple
// of 16 <= J, sixteen at a time: the vote, its gradient g (into gbuf, for the pose gradient) and the transform
// gradient stay in registers, and the sixteen per-parent sums acc = sum_e gm v + gv d^2 are reduced together
// (sum16). Pointers are offset to the child and problem: W, gW by i J 16; mean, g_var, gm, inv_var, e_mean by
// m J 16 (gm by nothing: it is per problem); r, g_maha, gw by their (m, i) and step r_sj, I, I per parent.
// Returns J16; the caller does the rest one by one.
inline i64 parents_backward16(const float* a, const float* bt, const float* W, const float* o, const float* mean,
                              const float* g_var, const float* gm, const float* r, i64 r_sj, float am,
                              const float* inv, const float* g_maha, const float* inv_var, const float* e_mean,
                              i64 J, i64 I, float* gbuf, float* gW, float* gw, float* g_sp) {
  if (J < 16 || 16 * I >= (i64(1) << 31)) return 0;
  const i64 J16 = J - J % 16;
  const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(I)));
  const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16), a2 = _mm512_loadu_ps(a + 32),
               a3 = _mm512_loadu_ps(a + 48);
  const __m512 b0 = _mm512_loadu_ps(bt), b1 = _mm512_loadu_ps(bt + 16), b2 = _mm512_loadu_ps(bt + 32),
               b3 = _mm512_loadu_ps(bt + 48);
  const __m512 ov = o ? _mm512_loadu_ps(o) : _mm512_setzero_ps();
  alignas(64) float wt[16];
  for (i64 jg = 0; jg < J16; jg += 16) {
    for (int k = 0; k < 16; ++k) wt[k] = r[(jg + k) * r_sj] * am * inv[jg + k];
    __m512 acc[16];
    #pragma GCC unroll 16
    for (int n = 0; n < 16; ++n) {
      const int k = 4 * (n & 3) + (n >> 2);                 // the order sum16 undoes
      const i64 j = jg + k;
      const float* w = W + j * 16;
      __m512 x = _mm512_fmadd_ps(a0, _mm512_broadcast_f32x4(_mm_loadu_ps(w)), ov);
      x = _mm512_fmadd_ps(a1, _mm512_broadcast_f32x4(_mm_loadu_ps(w + 4)), x);
      x = _mm512_fmadd_ps(a2, _mm512_broadcast_f32x4(_mm_loadu_ps(w + 8)), x);
      x = _mm512_fmadd_ps(a3, _mm512_broadcast_f32x4(_mm_loadu_ps(w + 12)), x);
      const __m512 gv = _mm512_loadu_ps(g_var + j * 16), gmj = _mm512_loadu_ps(gm + j * 16);
      const __m512 d = _mm512_sub_ps(x, _mm512_loadu_ps(mean + j * 16));
      __m512 g = _mm512_mul_ps(_mm512_set1_ps(wt[k]), _mm512_fmadd_ps(_mm512_add_ps(gv, gv), d, gmj));
      acc[n] = _mm512_fmadd_ps(gmj, x, _mm512_mul_ps(gv, _mm512_mul_ps(d, d)));
      if (g_maha) {
        const __m512 c = _mm512_set1_ps(2 * g_maha[j * I]);
        const __m512 e = _mm512_sub_ps(x, _mm512_loadu_ps(e_mean + j * 16));
        g = _mm512_fmadd_ps(_mm512_mul_ps(c, e), _mm512_loadu_ps(inv_var + j * 16), g);
      }
      _mm512_storeu_ps(gbuf + j * 16, g);
      // gW_j += P^T g: the transposed expansion times each row of g broadcast across its lanes
      float* gwj = gW + j * 16;
      __m512 y = _mm512_fmadd_ps(b0, _mm512_shuffle_f32x4(g, g, 0x00), _mm512_loadu_ps(gwj));
      y = _mm512_fmadd_ps(b1, _mm512_shuffle_f32x4(g, g, 0x55), y);
      y = _mm512_fmadd_ps(b2, _mm512_shuffle_f32x4(g, g, 0xAA), y);
      y = _mm512_fmadd_ps(b3, _mm512_shuffle_f32x4(g, g, 0xFF), y);
      _mm512_storeu_ps(gwj, y);
    }
    const __m512 s = sum16(acc);                            // lane k: parent jg + k
    _mm512_i32scatter_ps(gw + jg * I, stride, s, 4);
    _mm512_storeu_ps(g_sp + jg, _mm512_fnmadd_ps(s, _mm512_load_ps(wt), _mm512_loadu_ps(g_sp + jg)));
  }
  return J16;
}
#endif

// Backward of mstep (and of the same iteration's estep, with respect to the votes, when g_maha is given).
// mean = sum_i w_i v_i, var = sum_i w_i (v_i - mean)^2, w_i = r_i a_i / max(S, eps), S = sum_i r_i a_i.
// The E-step measures its distances from e_mean (the damped centres, RoutingConfig.centre_damping), which
// may differ from the weighted means `mean`; the caller passes mean itself when they are the same.
// Vote gradients go straight into the pose gradients gP (M, I, 16) and this thread's transform gradients
// gW (I, J, 16), both accumulated (+=); children are the outer loop so a child's pose gradient stays in registers.
template <typename T>
void mstep_backward(const T* P, const T* W, const T* O, const T* WT, const T* r, i64 r_sm, i64 r_sj, const T* act,
                    const T* mean, const T* S, const T* g_mean, const T* g_var, const T* g_S, const T* inv_var,
                    const T* g_maha, const T* e_mean, i64 M, i64 J, i64 I, i64 m0, i64 m1, T eps, T* gP, T* gW,
                    T* g_r, T* g_act) {
  (void)M;
  // Unlike the forward passes, one problem at a time: blocking problems here measured slower (the per-parent
  // rows of MB problems crowd L1), and a child's expanded poses are made where they are used.
  alignas(64) T a[64], bt[64], v[16];
  std::vector<T> gw(J * I), inv(J), gm(J * 16), g_sp(J), gbuf(J * 16);
  for (i64 m = m0; m < m1; ++m) {
    for (i64 j = 0; j < J; ++j) {
      const i64 mj = m * J + j;
      const T s = S[mj];
      inv[j] = T(1) / std::max(s, eps);
      // d var / d mean = -2 sum_i w_i (v_i - mean) = -2 mean (1 - sum_i w_i): zero unless S < eps.
      const T rest = T(1) - s * inv[j];
      for (int e = 0; e < 16; ++e) gm[j * 16 + e] = g_mean[mj * 16 + e] - 2 * g_var[mj * 16 + e] * mean[mj * 16 + e] * rest;
      g_sp[j] = 0;
    }
    const T* am = act + m * I;
    for (i64 i = 0; i < I; ++i) {
      expand_pose(P + (m * I + i) * 16, a);
      expand_pose_t(P + (m * I + i) * 16, bt);
      const T* oi = O ? O + i * 16 : nullptr;
      i64 j0 = 0;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>)
        j0 = parents_backward16(a, bt, W + i * J * 16, oi, mean + m * J * 16, g_var + m * J * 16, gm.data(),
                                r + m * r_sm + i, r_sj, am[i], inv.data(), g_maha ? g_maha + m * J * I + i : nullptr,
                                inv_var ? inv_var + m * J * 16 : nullptr, e_mean ? e_mean + m * J * 16 : nullptr,
                                J, I, gbuf.data(), gW + i * J * 16, gw.data() + i, g_sp.data());
#endif
      for (i64 j = j0; j < J; ++j) {
        const i64 mj = m * J + j;
        const T* mu = mean + mj * 16;
        const T* gv = g_var + mj * 16;
        const T* gmj = gm.data() + j * 16;
        const T w = r[m * r_sm + j * r_sj + i] * am[i] * inv[j];
        T* g = gbuf.data() + j * 16;
        offset_vote(a, W + (i * J + j) * 16, oi, v);
        T acc = 0;
        for (int e = 0; e < 16; ++e) {
          const T d = v[e] - mu[e];
          g[e] = w * (gmj[e] + 2 * gv[e] * d);
          acc += gmj[e] * v[e] + gv[e] * d * d;
        }
        if (g_maha) {
          const T c = 2 * g_maha[mj * I + i];
          const T* iv = inv_var + mj * 16;
          const T* emu = e_mean + mj * 16;
          for (int e = 0; e < 16; ++e) g[e] += c * (v[e] - emu[e]) * iv[e];
        }
        vote_add(bt, g, gW + (i * J + j) * 16);
        gw[j * I + i] = acc;
        g_sp[j] -= acc * w;
      }
      pose_grad(gbuf.data(), WT + i * J * 16, J, gP + (m * I + i) * 16);
    }
    T* gam = g_act + m * I;
    for (i64 j = 0; j < J; ++j) {
      const i64 mj = m * J + j;
      const T* rj = r + m * r_sm + j * r_sj;
      const T g_s = g_S[mj] + (S[mj] > eps ? g_sp[j] * inv[j] : T(0));
      for (i64 i = 0; i < I; ++i) {
        const T g_ra = gw[j * I + i] * inv[j] + g_s;
        if (g_r) g_r[mj * I + i] = g_ra * am[i];
        gam[i] += g_ra * rj[i];
      }
    }
  }
}

// Runs f(slot, a, b) on `threads` consecutive parts [a, b) of [m0, m1); part t writes slot `slot0 + t` of a
// per-thread output. Built with OpenMP, the parts run on the threads of the process's OpenMP runtime: PyTorch's
// own (emcaps.kernels builds with -fopenmp only where PyTorch's runtime is libgomp and already loaded), so the
// threads that would otherwise spin waiting for PyTorch's next operation do the work, rather than competing
// with threads of our own for the same cores. Without OpenMP the parts run one after another.
template <typename F>
void split(i64 m0, i64 m1, i64 slot0, i64 threads, F&& f) {
#ifdef _OPENMP
  if (threads > 1) {
    #pragma omp parallel num_threads(threads)
    {
      const i64 n = omp_get_num_threads(), t = omp_get_thread_num();
      f(slot0 + t, m0 + (m1 - m0) * t / n, m0 + (m1 - m0) * (t + 1) / n);
    }
    return;
  }
#endif
  for (i64 t = 0; t < threads; ++t) f(slot0 + t, m0 + (m1 - m0) * t / threads, m0 + (m1 - m0) * (t + 1) / threads);
}

}  // namespace

#define EMCAPS_EXPORT extern "C" __attribute__((visibility("default")))

#define EMCAPS_INSTANTIATE(T, suffix)                                                                           \
  EMCAPS_EXPORT void emcaps_mstep_##suffix(const T* P, const T* W, const T* O, const T* r, i64 r_sm, i64 r_sj,   \
                                            const T* act, i64 M, i64 J, i64 I, i64 m0, i64 m1, i64 slot0,       \
                                            i64 threads, double eps, T* mean, T* var, T* S) {                  \
    split(m0, m1, slot0, threads, [&](i64, i64 a, i64 b) {                                                    \
      mstep<T>(P, W, O, r, r_sm, r_sj, act, M, J, I, a, b, T(eps), mean, var, S);                              \
    });                                                                                                        \
  }                                                                                                            \
  EMCAPS_EXPORT void emcaps_estep_assign_##suffix(const T* P, const T* W, const T* O, const T* mean,            \
                                                   const T* inv_var, const T* c, i64 M, i64 J, i64 I, i64 m0,    \
                                                   i64 m1, i64 slot0, i64 threads, double h, T* r, T* lse) {     \
    split(m0, m1, slot0, threads, [&](i64, i64 a, i64 b) {                                                    \
      estep_assign<T>(P, W, O, mean, inv_var, c, M, J, I, a, b, T(h), r, lse);                                 \
    });                                                                                                        \
  }                                                                                                            \
  EMCAPS_EXPORT void emcaps_estep_backward_##suffix(const T* P, const T* W, const T* O, const T* mean,          \
                                                     const T* inv_var, const T* g_maha, i64 M, i64 J, i64 I,   \
                                                     i64 m0, i64 m1, i64 slot0, i64 threads, T* g_mean,        \
                                                     T* g_inv_var) {                                           \
    split(m0, m1, slot0, threads, [&](i64, i64 a, i64 b) {                                                    \
      estep_backward<T>(P, W, O, mean, inv_var, g_maha, M, J, I, a, b, g_mean, g_inv_var);                     \
    });                                                                                                        \
  }                                                                                                            \
  /* gW: (slots, I, J, 16), one slot per thread */                                                             \
  EMCAPS_EXPORT void emcaps_mstep_backward_##suffix(                                                           \
      const T* P, const T* W, const T* O, const T* WT, const T* r, i64 r_sm, i64 r_sj, const T* act,           \
      const T* mean, const T* S, const T* g_mean, const T* g_var, const T* g_S, const T* inv_var,              \
      const T* g_maha, const T* e_mean, i64 M, i64 J, i64 I, i64 m0, i64 m1, i64 slot0, i64 threads,           \
      double eps, T* gP, T* gW, T* g_r, T* g_act) {                                                            \
    split(m0, m1, slot0, threads, [&](i64 slot, i64 a, i64 b) {                                               \
      mstep_backward<T>(P, W, O, WT, r, r_sm, r_sj, act, mean, S, g_mean, g_var, g_S, inv_var, g_maha, e_mean,  \
                        M, J, I, a, b, T(eps), gP, gW + slot * I * J * 16, g_r, g_act);                        \
    });                                                                                                        \
  }

EMCAPS_INSTANTIATE(float, f32)
EMCAPS_INSTANTIATE(double, f64)

EMCAPS_EXPORT int emcaps_kernels_version() { return 6; }

// Whether `threads` > 1 runs in parallel (built with OpenMP), or the caller must split the work itself.
EMCAPS_EXPORT int emcaps_kernels_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}
