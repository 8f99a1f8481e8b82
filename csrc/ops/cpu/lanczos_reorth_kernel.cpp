// CPU kernel of resgeom_fast::lanczos_reorth: fused classical Gram-Schmidt twice, float64 scalars.
//
// Three sweeps over the basis (h1 = V w; w1 = w - V^T h1 and h2 = V w1 on the same chunk while it
// is in cache; w1 - V^T h2), the minimum for CGS2. The sweeps are compute-bound at the build's
// baseline (SSE2: 3.85 s on w [1, 11.7M] against 100 float32 basis vectors, where one read of
// the basis takes 0.36 s), so the loops are compiled for AVX-512 / AVX2 as well (1.95 s there).
// ATen's gemv in float64 chunks was measured too and is slower: each chunk of the basis must be
// converted to float64 first, and that conversion alone costs ~0.7 s per sweep.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "ops/lanczos_reorth.h"
#include "ops/cpu/simd_clones.h"

namespace resgeom_fast {
namespace ops {

namespace {

// The hot loops, one overload per input dtype, compiled for AVX-512, AVX2 and the baseline and
// chosen once at load time (GCC's target_clones, an ifunc; the build's own flags target the
// baseline x86-64, SSE2). The results are deterministic on a machine; between machines with
// different vector widths they differ at float64 rounding (the order of the partial sums).

// sum_t v[t] x[t] in float64.
template <typename scalar_t>
inline double dot(const scalar_t* __restrict__ v, const double* __restrict__ x, int64_t len) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t t = 0; t < len; ++t) acc += static_cast<double>(v[t]) * x[t];
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

// One problem: w [n], basis rows V + i * sj (i < j), writes out [n], coeffs [j], *norm.
template <typename scalar_t>
void reorth_one(const scalar_t* w, const scalar_t* V, int64_t sj, int64_t j, int64_t n,
                scalar_t* out, double* coeffs, double* norm) {
  const int64_t chunk = lanczos_chunk(j);
  const int64_t nch = (n + chunk - 1) / chunk;
  std::vector<double> w1(n);
  std::vector<double> part(static_cast<size_t>(nch) * std::max<int64_t>(j, 1));
  std::vector<double> h1(j, 0.0), h2(j, 0.0), npart(nch, 0.0);

  // Pass 1: w1 = w in float64, h1 = V w.
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, len = std::min(n, t0 + chunk) - t0;
      double* x = w1.data() + t0;
      widen_any(x, w + t0, len);
      for (int64_t i = 0; i < j; ++i) part[c * j + i] = dot_any(V + i * sj + t0, x, len);
    }
  });
  for (int64_t c = 0; c < nch; ++c)
    for (int64_t i = 0; i < j; ++i) h1[i] += part[c * j + i];

  // Pass 2 (fused): w1 = w - V^T h1, then h2 = V w1 on the same chunk while it is in cache.
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, len = std::min(n, t0 + chunk) - t0;
      double* x = w1.data() + t0;
      for (int64_t i = 0; i < j; ++i) sub_any(x, h1[i], V + i * sj + t0, len);
      for (int64_t i = 0; i < j; ++i) part[c * j + i] = dot_any(V + i * sj + t0, x, len);
    }
  });
  for (int64_t c = 0; c < nch; ++c)
    for (int64_t i = 0; i < j; ++i) h2[i] += part[c * j + i];

  // Pass 3: w_orth = w1 - V^T h2 and its norm.
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, len = std::min(n, t0 + chunk) - t0;
      double* x = w1.data() + t0;
      for (int64_t i = 0; i < j; ++i) sub_any(x, h2[i], V + i * sj + t0, len);
      npart[c] = store_any(out + t0, x, len);
    }
  });
  double nn = 0.0;
  for (int64_t c = 0; c < nch; ++c) nn += npart[c];
  *norm = std::sqrt(nn);
  for (int64_t i = 0; i < j; ++i) coeffs[i] = h1[i] + h2[i];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_reorth_cpu(const at::Tensor& w,
                                                                  const at::Tensor& basis) {
  check_lanczos_reorth(w, basis);
  TORCH_INTERNAL_ASSERT(w.device().is_cpu());
  auto wc = w.contiguous();
  auto V = basis.stride(2) == 1 ? basis : basis.contiguous();
  const int64_t b = wc.size(0), n = wc.size(1), j = V.size(1);
  auto out = at::empty_like(wc);
  auto coeffs = at::empty({b, j}, wc.options().dtype(at::kDouble));
  auto norm = at::empty({b}, wc.options().dtype(at::kDouble));
  if (b == 0) return {out, coeffs, norm};
  AT_DISPATCH_FLOATING_TYPES(wc.scalar_type(), "lanczos_reorth_cpu", [&] {
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const scalar_t* vp = V.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    double* cp = coeffs.data_ptr<double>();
    double* np = norm.data_ptr<double>();
    const int64_t sb = V.stride(0), sj = V.stride(1);
    auto one = [&](int64_t p) {
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
