// CPU kernel of resgeom_fast::lanczos_reorth: fused classical Gram-Schmidt twice, float64 scalars.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "ops/lanczos_reorth.h"

namespace resgeom_fast {
namespace ops {

namespace {

// One problem: w [n], basis rows V + i * sj (i < j), writes out [n], coeffs [j], *norm.
template <typename scalar_t>
void reorth_one(const scalar_t* w, const scalar_t* V, int64_t sj, int64_t j, int64_t n,
                scalar_t* out, double* coeffs, double* norm) {
  const int64_t chunk = lanczos_chunk(j);
  const int64_t nch = (n + chunk - 1) / chunk;
  std::vector<double> w1(n);
  std::vector<double> part(static_cast<size_t>(nch) * std::max<int64_t>(j, 1));
  std::vector<double> h1(j, 0.0), h2(j, 0.0), npart(nch, 0.0);

  // Pass 1: h1 = V w.
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, t1 = std::min(n, t0 + chunk);
      for (int64_t i = 0; i < j; ++i) {
        const scalar_t* v = V + i * sj;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t t = t0; t < t1; ++t) acc += static_cast<double>(v[t]) * w[t];
        part[c * j + i] = acc;
      }
    }
  });
  for (int64_t c = 0; c < nch; ++c)
    for (int64_t i = 0; i < j; ++i) h1[i] += part[c * j + i];

  // Pass 2 (fused): w1 = w - V^T h1, then h2 = V w1 on the same chunk while it is in cache.
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, t1 = std::min(n, t0 + chunk);
      double* x = w1.data();
      for (int64_t t = t0; t < t1; ++t) x[t] = static_cast<double>(w[t]);
      for (int64_t i = 0; i < j; ++i) {
        const scalar_t* v = V + i * sj;
        const double hi = h1[i];
#pragma omp simd
        for (int64_t t = t0; t < t1; ++t) x[t] -= hi * static_cast<double>(v[t]);
      }
      for (int64_t i = 0; i < j; ++i) {
        const scalar_t* v = V + i * sj;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t t = t0; t < t1; ++t) acc += static_cast<double>(v[t]) * x[t];
        part[c * j + i] = acc;
      }
    }
  });
  for (int64_t c = 0; c < nch; ++c)
    for (int64_t i = 0; i < j; ++i) h2[i] += part[c * j + i];

  // Pass 3: w_orth = w1 - V^T h2 and its norm.
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * chunk, t1 = std::min(n, t0 + chunk);
      double* x = w1.data();
      for (int64_t i = 0; i < j; ++i) {
        const scalar_t* v = V + i * sj;
        const double hi = h2[i];
#pragma omp simd
        for (int64_t t = t0; t < t1; ++t) x[t] -= hi * static_cast<double>(v[t]);
      }
      double acc = 0.0;
      for (int64_t t = t0; t < t1; ++t) {
        acc += x[t] * x[t];
        out[t] = static_cast<scalar_t>(x[t]);
      }
      npart[c] = acc;
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
