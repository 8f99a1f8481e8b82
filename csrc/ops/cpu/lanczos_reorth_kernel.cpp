// CPU kernel of resgeom_fast::lanczos_reorth: local-first Gram-Schmidt, one full pass and a second
// only when needed (DGKS), float64 scalars. (The CUDA kernel runs CGS2.)
//
// Per problem, with x = w in float64:
//   1. local first (j >= 3): x -= <v_j, x> v_j, then x -= <v_{j-1}, x> v_{j-1} (MGS). In Lanczos,
//      w = A v_j lies almost entirely in span(v_j, v_{j-1}), so what is left for the full pass is
//      small and the pass does not shrink it;
//   2. one full pass over all j rows: row-by-row MGS when x and one row fit in cache (the dot and
//      the axpy of a row on the same chunk: one read of the basis; the bound: mgs_bytes), else
//      chunked CGS in two sweeps (h = V x; x -= V^T h; eight rows per read of an x chunk);
//   3. a second full pass only if the first shrank ||x|| below 1/sqrt(2) of its norm before it
//      (Daniel-Gragg-Kaufman-Stewart / Kahan-Parlett "twice is enough"), as under cancellation
//      (w almost inside span V). Either way x ends orthogonal to the rows to working precision.
// coeffs sum the coefficients of all passes; norm = ||x|| before x is rounded into w's dtype.
// The old kernel (CGS2 in three fused sweeps, as the reference) read the basis three times per
// step; this one reads it once (MGS, while w fits in cache) or twice (CGS, four rows per pass
// over a chunk of w) plus two rows on Lanczos steps. The loops are compiled for AVX-512 / AVX2
// as well as the SSE2 baseline (at the baseline the dots are compute-bound). Every
// sum runs over fixed chunks in a fixed order: deterministic on a machine for any thread count.
#include <algorithm>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "ops/lanczos_reorth.h"
#include "ops/cpu/simd_clones.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace resgeom_fast {
namespace ops {

namespace {

// The hot loops, one overload per input dtype, compiled for AVX-512, AVX2 and the baseline and
// chosen once at load time (GCC's target_clones, an ifunc; the build's own flags target the
// baseline x86-64, SSE2). The results are deterministic on a machine; between machines with
// different vector widths they differ at float64 rounding (the order of the partial sums).

// sum_t v[t] x[t] in float64 (v and x in any of float/double).
template <typename scalar_t, typename x_t>
inline double dot(const scalar_t* __restrict__ v, const x_t* __restrict__ x, int64_t len) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t t = 0; t < len; ++t) acc += static_cast<double>(v[t]) * static_cast<double>(x[t]);
  return acc;
}
RG_SIMD_CLONES double dot_f(const float* v, const double* x, int64_t len) { return dot(v, x, len); }
RG_SIMD_CLONES double dot_d(const double* v, const double* x, int64_t len) { return dot(v, x, len); }
inline double dot_any(const float* v, const double* x, int64_t len) { return dot_f(v, x, len); }
inline double dot_any(const double* v, const double* x, int64_t len) { return dot_d(v, x, len); }

// x[t] -= a v[t].
template <typename scalar_t>
inline void sub_scaled(double* __restrict__ x, double a, const scalar_t* __restrict__ v, int64_t len) {
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) x[t] -= a * static_cast<double>(v[t]);
}
RG_SIMD_CLONES void sub_f(double* x, double a, const float* v, int64_t len) { sub_scaled(x, a, v, len); }
RG_SIMD_CLONES void sub_d(double* x, double a, const double* v, int64_t len) { sub_scaled(x, a, v, len); }
inline void sub_any(double* x, double a, const float* v, int64_t len) { sub_f(x, a, v, len); }
inline void sub_any(double* x, double a, const double* v, int64_t len) { sub_d(x, a, v, len); }

// x[t] = w[t] in float64.
template <typename scalar_t>
inline void widen(double* __restrict__ x, const scalar_t* __restrict__ w, int64_t len) {
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) x[t] = static_cast<double>(w[t]);
}
RG_SIMD_CLONES void widen_f(double* x, const float* w, int64_t len) { widen(x, w, len); }
RG_SIMD_CLONES void widen_d(double* x, const double* w, int64_t len) { widen(x, w, len); }
inline void widen_any(double* x, const float* w, int64_t len) { widen_f(x, w, len); }
inline void widen_any(double* x, const double* w, int64_t len) { widen_d(x, w, len); }

// out[t] = x[t] in the output dtype; returns sum_t x[t]^2.
template <typename scalar_t>
inline double store_norm2(scalar_t* __restrict__ out, const double* __restrict__ x, int64_t len) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t t = 0; t < len; ++t) {
    acc += x[t] * x[t];
    out[t] = static_cast<scalar_t>(x[t]);
  }
  return acc;
}
RG_SIMD_CLONES double store_f(float* out, const double* x, int64_t len) { return store_norm2(out, x, len); }
RG_SIMD_CLONES double store_d(double* out, const double* x, int64_t len) { return store_norm2(out, x, len); }
inline double store_any(float* out, const double* x, int64_t len) { return store_f(out, x, len); }
inline double store_any(double* out, const double* x, int64_t len) { return store_d(out, x, len); }

// sum_t a[t] b[t] in float64, both in the input dtype (the local coefficients of the CGS path).
RG_SIMD_CLONES double dot_ff(const float* a, const float* b, int64_t len) { return dot(a, b, len); }
RG_SIMD_CLONES double dot_dd(const double* a, const double* b, int64_t len) { return dot(a, b, len); }
inline double dot_same_any(const float* a, const float* b, int64_t len) { return dot_ff(a, b, len); }
inline double dot_same_any(const double* a, const double* b, int64_t len) { return dot_dd(a, b, len); }

// sum_t x[t]^2.
RG_SIMD_CLONES double norm2(const double* __restrict__ x, int64_t len) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t t = 0; t < len; ++t) acc += x[t] * x[t];
  return acc;
}

// Four rows at a time (the CGS sweeps): one read of the x chunk serves four rows, so the sweep
// streams the basis from memory instead of re-reading x from L2/L3 for every row (1.5x on a
// 2-core EPYC at n = 11.7M, j = 50). out[q] += sum_t r_q[t] x[t] in float64.
template <typename scalar_t>
inline void dot4(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, const scalar_t* __restrict__ c,
                 const scalar_t* __restrict__ d, const double* __restrict__ x, int64_t len, double* out) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t t = 0; t < len; ++t) {
    const double xv = x[t];
    s0 += static_cast<double>(a[t]) * xv;
    s1 += static_cast<double>(b[t]) * xv;
    s2 += static_cast<double>(c[t]) * xv;
    s3 += static_cast<double>(d[t]) * xv;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}
RG_SIMD_CLONES void dot4_f(const float* a, const float* b, const float* c, const float* d, const double* x,
                           int64_t len, double* out) { dot4(a, b, c, d, x, len, out); }
RG_SIMD_CLONES void dot4_d(const double* a, const double* b, const double* c, const double* d, const double* x,
                           int64_t len, double* out) { dot4(a, b, c, d, x, len, out); }
inline void dot4_any(const float* const* r, const double* x, int64_t len, double* out) {
  dot4_f(r[0], r[1], r[2], r[3], x, len, out);
}
inline void dot4_any(const double* const* r, const double* x, int64_t len, double* out) {
  dot4_d(r[0], r[1], r[2], r[3], x, len, out);
}

// x[t] -= h0 r_0[t] + h1 r_1[t] + h2 r_2[t] + h3 r_3[t].
template <typename scalar_t>
inline void sub4(double* __restrict__ x, const double* h, const scalar_t* __restrict__ a,
                 const scalar_t* __restrict__ b, const scalar_t* __restrict__ c, const scalar_t* __restrict__ d,
                 int64_t len) {
  const double h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3];
#pragma omp simd
  for (int64_t t = 0; t < len; ++t)
    x[t] -= h0 * static_cast<double>(a[t]) + h1 * static_cast<double>(b[t]) + h2 * static_cast<double>(c[t]) +
            h3 * static_cast<double>(d[t]);
}
RG_SIMD_CLONES void sub4_f(double* x, const double* h, const float* a, const float* b, const float* c,
                           const float* d, int64_t len) { sub4(x, h, a, b, c, d, len); }
RG_SIMD_CLONES void sub4_d(double* x, const double* h, const double* a, const double* b, const double* c,
                           const double* d, int64_t len) { sub4(x, h, a, b, c, d, len); }
inline void sub4_any(double* x, const double* h, const float* const* r, int64_t len) {
  sub4_f(x, h, r[0], r[1], r[2], r[3], len);
}
inline void sub4_any(double* x, const double* h, const double* const* r, int64_t len) {
  sub4_d(x, h, r[0], r[1], r[2], r[3], len);
}

// Eight rows at a time: half the reads of the x chunk per row of the four-row loops (the CGS
// sweeps stream the basis; x comes from L2).
// The eight row pointers r[0..8) as restrict-qualified locals r0..r7 (the loops vectorise on them).
#define RG_ROWS8(r)                                                                             \
  const scalar_t *__restrict__ r0 = (r)[0], *__restrict__ r1 = (r)[1], *__restrict__ r2 = (r)[2], \
                 *__restrict__ r3 = (r)[3], *__restrict__ r4 = (r)[4], *__restrict__ r5 = (r)[5], \
                 *__restrict__ r6 = (r)[6], *__restrict__ r7 = (r)[7]
template <typename scalar_t>
inline void dot8(const scalar_t* const* r, const double* __restrict__ x, int64_t len, double* out) {
  RG_ROWS8(r);
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, s4 = 0.0, s5 = 0.0, s6 = 0.0, s7 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
  for (int64_t t = 0; t < len; ++t) {
    const double xv = x[t];
    s0 += static_cast<double>(r0[t]) * xv;
    s1 += static_cast<double>(r1[t]) * xv;
    s2 += static_cast<double>(r2[t]) * xv;
    s3 += static_cast<double>(r3[t]) * xv;
    s4 += static_cast<double>(r4[t]) * xv;
    s5 += static_cast<double>(r5[t]) * xv;
    s6 += static_cast<double>(r6[t]) * xv;
    s7 += static_cast<double>(r7[t]) * xv;
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
  out[4] = s4; out[5] = s5; out[6] = s6; out[7] = s7;
}
RG_SIMD_CLONES void dot8_f(const float* const* r, const double* x, int64_t len, double* out) { dot8(r, x, len, out); }
RG_SIMD_CLONES void dot8_d(const double* const* r, const double* x, int64_t len, double* out) { dot8(r, x, len, out); }
inline void dot8_any(const float* const* r, const double* x, int64_t len, double* out) { dot8_f(r, x, len, out); }
inline void dot8_any(const double* const* r, const double* x, int64_t len, double* out) { dot8_d(r, x, len, out); }

// x[t] -= sum_q h[q] r_q[t], q < 8.
template <typename scalar_t>
inline void sub8(double* __restrict__ x, const double* h, const scalar_t* const* r, int64_t len) {
  RG_ROWS8(r);
  const double h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3], h4 = h[4], h5 = h[5], h6 = h[6], h7 = h[7];
#pragma omp simd
  for (int64_t t = 0; t < len; ++t)
    x[t] -= ((h0 * static_cast<double>(r0[t]) + h1 * static_cast<double>(r1[t])) +
             (h2 * static_cast<double>(r2[t]) + h3 * static_cast<double>(r3[t]))) +
            ((h4 * static_cast<double>(r4[t]) + h5 * static_cast<double>(r5[t])) +
             (h6 * static_cast<double>(r6[t]) + h7 * static_cast<double>(r7[t])));
}
RG_SIMD_CLONES void sub8_f(double* x, const double* h, const float* const* r, int64_t len) { sub8(x, h, r, len); }
RG_SIMD_CLONES void sub8_d(double* x, const double* h, const double* const* r, int64_t len) { sub8(x, h, r, len); }
inline void sub8_any(double* x, const double* h, const float* const* r, int64_t len) { sub8_f(x, h, r, len); }
inline void sub8_any(double* x, const double* h, const double* const* r, int64_t len) { sub8_d(x, h, r, len); }

// Local-first from this many basis rows on: the last two rows (v_j, v_{j-1}) are removed before
// the full pass. Below it the "local" rows are the whole basis: local + one pass reads as many
// rows as the two passes it would save.
constexpr int64_t kLocalMin = 3;
// Row-by-row MGS while w in float64 plus one basis row take fewer bytes than this, the chunked
// two-sweep CGS pass above. Measured on a 2-core EPYC (L2 1 MiB/core, L3 32 MiB shared), one
// thread, j = 50 float32: MGS is 1.3-2x faster at n = 270k-1M (3-12 MB), CGS 1.1x faster at n = 4M
// (48 MB) and 11.7M; half of that L3 leaves room for a second problem on the other core.
// On Intel CPUs the bound is 3/4 of the per-core L2 instead: there x re-read from L3 for every row
// costs more than a second sweep over the basis. Measured 2026-12-04 on a 2-core Xeon KVM guest
// (L2 2 MiB/core), b = 10 problems, j = 50 float32, one thread: n = 100k MGS 30.3 ms / CGS 32.3 ms;
// n = 170k 67.1 / 61.5; n = 274k 124 / 97 (the eight-row CGS loops); n = 1M (b = 3) 136 / 104.
// The environment variable RESGEOM_REORTH_MGS_BYTES (read once) sets the bound in bytes, for
// measuring it on another machine. The choice changes only the rounding (same arithmetic).
constexpr int64_t kMgsBytes = int64_t(16) << 20;

int64_t mgs_bytes() {
  static const int64_t bytes = [] {
    if (const char* e = std::getenv("RESGEOM_REORTH_MGS_BYTES")) return static_cast<int64_t>(std::atoll(e));
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) {
      const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
      return static_cast<int64_t>(l2 > 0 ? l2 : (1L << 20)) * 3 / 4;
    }
#endif
    return kMgsBytes;
  }();
  return bytes;
}
// Elements of n per task in the MGS pass: a chunk of x stays in L1 between the axpy of one row
// and the dot of the next.
constexpr int64_t kMgsChunk = 4096;
// Elements of n per task in the CGS sweeps: the chunk of x (1 MiB in float64) is reused by the j
// rows' dots and axpys, four rows per read of it; each row is read in 131072-element bursts (the
// 1310-8192-element chunks of the old three-sweep kernel made n = 4M, j = 50 1.3x slower).
constexpr int64_t kCgsChunk = 131072;

// A problem: w [n], basis rows V + i * sj (i < j), writes out [n], coeffs [j], *norm; x [n] is
// the float64 work vector.
template <typename scalar_t>
struct Problem {
  const scalar_t* w;
  const scalar_t* V;
  int64_t sj, j, n;
  scalar_t* out;
  double* coeffs;
  double* x;
  const scalar_t* row(int64_t i) const { return V + i * sj; }
};

// Modified Gram-Schmidt over the rows rows[0..m) in that order, chunked over n with a fixed chunk
// (deterministic partial sums): region k subtracts row k-1 (its coefficient known now) and dots
// row k, on each chunk while it is in cache, so a row is read from memory once. Region 0 first
// widens w into x when `widen`; region `norm_at` also returns ||x||^2 (before its dot) in *before.
// The last region stores x into out; returns ||x||^2 after the pass. Coefficients add to coeffs.
template <typename scalar_t>
double mgs_pass(const Problem<scalar_t>& P, const std::vector<int64_t>& rows, bool widen,
                int64_t norm_at, double* before) {
  const int64_t n = P.n, m = static_cast<int64_t>(rows.size());
  const int64_t nch = (n + kMgsChunk - 1) / kMgsChunk;
  std::vector<double> part(nch, 0.0), npart(nch, 0.0);
  double prev = 0.0;
  for (int64_t k = 0; k <= m; ++k) {
    const scalar_t* vp = k > 0 ? P.row(rows[k - 1]) : nullptr;
    const scalar_t* vc = k < m ? P.row(rows[k]) : nullptr;
    const bool wid = widen && k == 0, nrm = k == norm_at;
    at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t t0 = c * kMgsChunk, len = std::min(n, t0 + kMgsChunk) - t0;
        double* x = P.x + t0;
        if (wid) widen_any(x, P.w + t0, len);
        if (vp) sub_any(x, prev, vp + t0, len);
        if (!vc) {
          npart[c] = store_any(P.out + t0, x, len);
          continue;
        }
        if (nrm) npart[c] = norm2(x, len);
        part[c] = dot_any(vc + t0, x, len);
      }
    });
    if (!vc) break;
    if (nrm) {
      double s = 0.0;
      for (int64_t c = 0; c < nch; ++c) s += npart[c];
      *before = s;
    }
    prev = 0.0;
    for (int64_t c = 0; c < nch; ++c) prev += part[c];
    P.coeffs[rows[k]] += prev;
  }
  double s = 0.0;
  for (int64_t c = 0; c < nch; ++c) s += npart[c];
  return s;
}

// out[i] = sum_c part[c * cols + i] over the nch per-chunk partials, in chunk order (the fixed
// order that keeps the sums deterministic for any thread count).
inline void sum_chunks(const std::vector<double>& part, int64_t nch, int64_t cols, double* out) {
  for (int64_t i = 0; i < cols; ++i) out[i] = 0.0;
  for (int64_t c = 0; c < nch; ++c)
    for (int64_t i = 0; i < cols; ++i) out[i] += part[c * cols + i];
}

// Sweep 1 of a chunked CGS pass: x = w - l1 v_{j-1} - l2 v_{j-2} in float64 when `widen` (the
// local rows only when l1/l2 are given), then h = V x; returns ||x||^2 (before the projection).
template <typename scalar_t>
double cgs_project(const Problem<scalar_t>& P, bool widen, const double* local, double* h) {
  const int64_t n = P.n, j = P.j, chunk = kCgsChunk, nch = (n + chunk - 1) / chunk;
  std::vector<double> part(static_cast<size_t>(nch) * std::max<int64_t>(j, 1)), npart(nch, 0.0);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, len = std::min(n, t0 + chunk) - t0;
      double* x = P.x + t0;
      if (widen) widen_any(x, P.w + t0, len);
      if (local) {
        sub_any(x, local[0], P.row(j - 1) + t0, len);
        sub_any(x, local[1], P.row(j - 2) + t0, len);
      }
      npart[c] = norm2(x, len);
      int64_t i = 0;
      for (; i + 8 <= j; i += 8) {
        const scalar_t* r[8];
        for (int q = 0; q < 8; ++q) r[q] = P.row(i + q) + t0;
        dot8_any(r, x, len, &part[c * j + i]);
      }
      for (; i + 4 <= j; i += 4) {
        const scalar_t* r[4] = {P.row(i) + t0, P.row(i + 1) + t0, P.row(i + 2) + t0, P.row(i + 3) + t0};
        dot4_any(r, x, len, &part[c * j + i]);
      }
      for (; i < j; ++i) part[c * j + i] = dot_any(P.row(i) + t0, x, len);
    }
  });
  double nn = 0.0;
  sum_chunks(npart, nch, 1, &nn);
  sum_chunks(part, nch, j, h);
  return nn;
}

// Sweep 2: x -= V^T h, stored into out; returns ||x||^2.
template <typename scalar_t>
double cgs_subtract(const Problem<scalar_t>& P, const double* h) {
  const int64_t n = P.n, j = P.j, chunk = kCgsChunk, nch = (n + chunk - 1) / chunk;
  std::vector<double> npart(nch, 0.0);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, len = std::min(n, t0 + chunk) - t0;
      double* x = P.x + t0;
      int64_t i = 0;
      for (; i + 8 <= j; i += 8) {
        const scalar_t* r[8];
        for (int q = 0; q < 8; ++q) r[q] = P.row(i + q) + t0;
        sub8_any(x, h + i, r, len);
      }
      for (; i + 4 <= j; i += 4) {
        const scalar_t* r[4] = {P.row(i) + t0, P.row(i + 1) + t0, P.row(i + 2) + t0, P.row(i + 3) + t0};
        sub4_any(x, h + i, r, len);
      }
      for (; i < j; ++i) sub_any(x, h[i], P.row(i) + t0, len);
      npart[c] = store_any(P.out + t0, x, len);
    }
  });
  double nn = 0.0;
  sum_chunks(npart, nch, 1, &nn);
  return nn;
}

// The local coefficients (MGS on v_j then v_{j-1}) from one sweep reading w and the two rows:
// l1 = <v_j, w>, l2 = <v_{j-1}, w - l1 v_j> = <v_{j-1}, w> - l1 <v_{j-1}, v_j>.
template <typename scalar_t>
void cgs_local(const Problem<scalar_t>& P, double* local) {
  const int64_t n = P.n, chunk = kCgsChunk, nch = (n + chunk - 1) / chunk;
  const scalar_t *a = P.row(P.j - 1), *b = P.row(P.j - 2);
  std::vector<double> part(static_cast<size_t>(nch) * 3, 0.0);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, len = std::min(n, t0 + chunk) - t0;
      part[3 * c] = dot_same_any(a + t0, P.w + t0, len);
      part[3 * c + 1] = dot_same_any(b + t0, P.w + t0, len);
      part[3 * c + 2] = dot_same_any(b + t0, a + t0, len);
    }
  });
  double s[3] = {0.0, 0.0, 0.0};
  for (int64_t c = 0; c < nch; ++c)
    for (int k = 0; k < 3; ++k) s[k] += part[3 * c + k];
  local[0] = s[0];
  local[1] = s[1] - s[0] * s[2];
}

// The float64 work vector x of a problem, from a small pool: a fresh allocation of this size is
// an mmap whose pages fault in on first touch, 40 ms per call at n = 11.7M (a third of a
// Lanczos step's reorthogonalisation at j = 8). Buffers are handed back after the problem and
// kept while the pool holds at most kPoolBytes (more concurrent problems allocate and free).
constexpr size_t kPoolBytes = size_t(256) << 20;

// Pool buffers are mapped directly (Linux), not taken from malloc: the pool keeps them for the
// process's life, and a block kept that long in malloc's heap -- where resgeom_fast.core.heap's
// scopes send every allocation, a Lanczos window's included -- splits the freed space around it
// and makes the heap grow (measured: SLQ's peak +4 working vectors at n = 2M, 1 probe).
struct Unmap {
  size_t bytes = 0;   // 0: allocated with new[]
  void operator()(double* p) const {
#if defined(__linux__)
    if (bytes) {
      munmap(p, bytes);
      return;
    }
#endif
    delete[] p;
  }
};

class WorkPool {
 public:
  struct Buffer {
    std::unique_ptr<double[], Unmap> data;
    int64_t size = 0;
  };
  Buffer take(int64_t n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].size >= n) {
          Buffer b = std::move(free_[i]);
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          held_ -= static_cast<size_t>(b.size) * sizeof(double);
          return b;
        }
      }
    }
    Buffer b;
    const size_t bytes = static_cast<size_t>(n) * sizeof(double);   // uninitialised: every entry is written first
#if defined(__linux__)
    if (bytes) {
      void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m != MAP_FAILED) b.data = std::unique_ptr<double[], Unmap>(static_cast<double*>(m), Unmap{bytes});
    }
#endif
    if (!b.data) b.data = std::unique_ptr<double[], Unmap>(new double[static_cast<size_t>(n)], Unmap{0});
    b.size = n;
    return b;
  }
  void give(Buffer b) {
    const size_t bytes = static_cast<size_t>(b.size) * sizeof(double);
    std::lock_guard<std::mutex> lock(mu_);
    if (held_ + bytes > kPoolBytes) {
      // keep the larger buffers: drop smaller ones first, else this one
      std::sort(free_.begin(), free_.end(), [](const Buffer& a, const Buffer& c) { return a.size < c.size; });
      while (!free_.empty() && held_ + bytes > kPoolBytes && free_.front().size < b.size) {
        held_ -= static_cast<size_t>(free_.front().size) * sizeof(double);
        free_.erase(free_.begin());
      }
      if (held_ + bytes > kPoolBytes) return;                 // b is freed here
    }
    held_ += bytes;
    free_.push_back(std::move(b));
  }

 private:
  std::mutex mu_;
  std::vector<Buffer> free_;
  size_t held_ = 0;
};

WorkPool& work_pool() {
  static WorkPool pool;
  return pool;
}

// One problem: local-first (j >= kLocalMin), one full pass (MGS or chunked CGS by size), and a
// second full pass only when the first shrank x below 1/sqrt(2) of its norm (DGKS).
template <typename scalar_t>
void reorth_one(const scalar_t* w, const scalar_t* V, int64_t sj, int64_t j, int64_t n,
                scalar_t* out, double* coeffs, double* norm) {
  WorkPool::Buffer buf = work_pool().take(n);
  const Problem<scalar_t> P{w, V, sj, j, n, out, coeffs, buf.data.get()};
  for (int64_t i = 0; i < j; ++i) coeffs[i] = 0.0;
  const bool local = j >= kLocalMin;
  double before = 0.0, after = 0.0;
  if (n * static_cast<int64_t>(sizeof(double) + sizeof(scalar_t)) < mgs_bytes()) {
    std::vector<int64_t> rows;
    if (local) rows = {j - 1, j - 2};
    const int64_t norm_at = static_cast<int64_t>(rows.size());
    for (int64_t i = 0; i < j; ++i) rows.push_back(i);
    after = mgs_pass(P, rows, /*widen=*/true, norm_at, &before);
    if (after < 0.5 * before) {
      rows.erase(rows.begin(), rows.begin() + norm_at);
      after = mgs_pass(P, rows, /*widen=*/false, -1, nullptr);
    }
  } else {
    std::vector<double> h(j), l(2, 0.0);
    if (local) {
      cgs_local(P, l.data());
      coeffs[j - 1] += l[0];
      coeffs[j - 2] += l[1];
    }
    before = cgs_project(P, /*widen=*/true, local ? l.data() : nullptr, h.data());
    after = cgs_subtract(P, h.data());
    for (int64_t i = 0; i < j; ++i) coeffs[i] += h[i];
    if (after < 0.5 * before) {
      cgs_project(P, /*widen=*/false, nullptr, h.data());
      after = cgs_subtract(P, h.data());
      for (int64_t i = 0; i < j; ++i) coeffs[i] += h[i];
    }
  }
  *norm = std::sqrt(after);
  work_pool().give(std::move(buf));
}

// The sweep mode (``h`` given), one read of the basis: x = w - V^T h (float64), out = x in w's
// dtype, *norm = ||x||, and dots[i] = <V_i, w> (of the input w, float64) -- the two CGS sweeps
// fused, possible because h is given instead of computed from the dots. Eight rows per read of a
// chunk of w and x: out_q += r_q[t] w[t]; x[t] -= sum_q h_q r_q[t].
template <typename scalar_t>
inline void dotsub8(const scalar_t* const* r, const scalar_t* __restrict__ w, double* __restrict__ x,
                    const double* h, int64_t len, double* out) {
  RG_ROWS8(r);
  const double h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3], h4 = h[4], h5 = h[5], h6 = h[6], h7 = h[7];
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, s4 = 0.0, s5 = 0.0, s6 = 0.0, s7 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
  for (int64_t t = 0; t < len; ++t) {
    const double wv = static_cast<double>(w[t]);
    const double a0 = r0[t], a1 = r1[t], a2 = r2[t], a3 = r3[t], a4 = r4[t], a5 = r5[t], a6 = r6[t], a7 = r7[t];
    s0 += a0 * wv; s1 += a1 * wv; s2 += a2 * wv; s3 += a3 * wv;
    s4 += a4 * wv; s5 += a5 * wv; s6 += a6 * wv; s7 += a7 * wv;
    x[t] -= ((h0 * a0 + h1 * a1) + (h2 * a2 + h3 * a3)) + ((h4 * a4 + h5 * a5) + (h6 * a6 + h7 * a7));
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
  out[4] = s4; out[5] = s5; out[6] = s6; out[7] = s7;
}
RG_SIMD_CLONES void dotsub8_f(const float* const* r, const float* w, double* x, const double* h, int64_t len,
                              double* out) { dotsub8(r, w, x, h, len, out); }
RG_SIMD_CLONES void dotsub8_d(const double* const* r, const double* w, double* x, const double* h, int64_t len,
                              double* out) { dotsub8(r, w, x, h, len, out); }
inline void dotsub8_any(const float* const* r, const float* w, double* x, const double* h, int64_t len,
                        double* out) { dotsub8_f(r, w, x, h, len, out); }
inline void dotsub8_any(const double* const* r, const double* w, double* x, const double* h, int64_t len,
                        double* out) { dotsub8_d(r, w, x, h, len, out); }

template <typename scalar_t>
void sweep_one(const scalar_t* w, const scalar_t* V, int64_t sj, int64_t j, int64_t n, const double* h,
               scalar_t* out, double* dots, double* norm) {
  WorkPool::Buffer buf = work_pool().take(n);
  const Problem<scalar_t> P{w, V, sj, j, n, out, dots, buf.data.get()};
  const int64_t chunk = kCgsChunk, nch = (n + chunk - 1) / chunk;
  std::vector<double> part(static_cast<size_t>(nch) * std::max<int64_t>(j, 1), 0.0), npart(nch, 0.0);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, len = std::min(n, t0 + chunk) - t0;
      double* x = P.x + t0;
      const scalar_t* wc = P.w + t0;
      widen_any(x, wc, len);
      int64_t i = 0;
      for (; i + 8 <= j; i += 8) {
        const scalar_t* r[8];
        for (int q = 0; q < 8; ++q) r[q] = P.row(i + q) + t0;
        dotsub8_any(r, wc, x, h + i, len, &part[c * j + i]);
      }
      for (; i < j; ++i) {
        part[c * j + i] = dot_same_any(P.row(i) + t0, wc, len);
        sub_any(x, h[i], P.row(i) + t0, len);
      }
      npart[c] = store_any(P.out + t0, x, len);
    }
  });
  sum_chunks(part, nch, j, dots);
  double nn = 0.0;
  sum_chunks(npart, nch, 1, &nn);
  *norm = std::sqrt(nn);
  work_pool().give(std::move(buf));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_reorth_cpu(const at::Tensor& w,
                                                                  const at::Tensor& basis,
                                                                  const std::optional<at::Tensor>& h) {
  check_lanczos_reorth(w, basis, h);
  TORCH_INTERNAL_ASSERT(w.device().is_cpu());
  auto wc = w.contiguous();
  auto V = basis.stride(2) == 1 ? basis : basis.contiguous();
  const int64_t b = wc.size(0), n = wc.size(1), j = V.size(1);
  auto out = at::empty_like(wc);
  auto coeffs = at::empty({b, j}, wc.options().dtype(at::kDouble));
  auto norm = at::empty({b}, wc.options().dtype(at::kDouble));
  if (b == 0) return {out, coeffs, norm};
  at::Tensor hc = h.has_value() ? h->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(wc.scalar_type(), "lanczos_reorth_cpu", [&] {
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const scalar_t* vp = V.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    double* cp = coeffs.data_ptr<double>();
    double* np = norm.data_ptr<double>();
    const double* hp = hc.defined() ? hc.data_ptr<double>() : nullptr;
    const int64_t sb = V.stride(0), sj = V.stride(1);
    auto one = [&](int64_t p) {
      if (hp)
        sweep_one<scalar_t>(wp + p * n, vp + p * sb, sj, j, n, hp + p * j, op + p * n, cp + p * j, np + p);
      else
        reorth_one<scalar_t>(wp + p * n, vp + p * sb, sj, j, n, op + p * n, cp + p * j, np + p);
    };
    if (b >= at::get_num_threads()) {
      // Enough problems to occupy every thread: one problem per task (nested loops run inline).
      at::parallel_for(0, b, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) one(p);
      });
    } else {
      for (int64_t p = 0; p < b; ++p) one(p);
    }
  });
  return {out, coeffs, norm};
}

TORCH_LIBRARY_IMPL(resgeom_fast, CPU, m) {
  m.impl("lanczos_reorth", &lanczos_reorth_cpu);
}

}  // namespace ops
}  // namespace resgeom_fast
