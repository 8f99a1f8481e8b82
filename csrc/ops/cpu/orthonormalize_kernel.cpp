// CPU kernel of resgeom_fast::orthonormalize: power-of-two column scaling, then shifted Cholesky
// QR three times, in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/all.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/isfinite.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "ops/orthonormalize.h"

namespace resgeom_fast {
namespace ops {

namespace {

constexpr int64_t kRowChunk = 1024;

// Fixed pseudo-random value in [-1, 1) (splitmix64), used to replace exactly zero columns.
double fill_value(uint64_t key) {
  uint64_t z = key + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

// G = X^T X for row-major X [n, k] (upper triangle filled, then mirrored).
void gram(const double* X, int64_t n, int64_t k, std::vector<double>& G) {
  const int64_t nch = (n + kRowChunk - 1) / kRowChunk;
  std::vector<double> part(static_cast<size_t>(nch) * k * k, 0.0);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* P = part.data() + c * k * k;
      const int64_t t1 = std::min(n, (c + 1) * kRowChunk);
      for (int64_t t = c * kRowChunk; t < t1; ++t) {
        const double* x = X + t * k;
        for (int64_t a = 0; a < k; ++a) {
          const double xa = x[a];
          double* Pa = P + a * k;
#pragma omp simd
          for (int64_t b = a; b < k; ++b) Pa[b] += xa * x[b];
        }
      }
    }
  });
  G.assign(k * k, 0.0);
  for (int64_t c = 0; c < nch; ++c)
    for (int64_t i = 0; i < k * k; ++i) G[i] += part[c * k * k + i];
  for (int64_t a = 0; a < k; ++a)
    for (int64_t b = 0; b < a; ++b) G[a * k + b] = G[b * k + a];
}

// Upper Cholesky factor R (G + shift I = R^T R) in place of G; false if a pivot is not positive.
bool cholesky_upper(std::vector<double>& G, int64_t k, double shift) {
  for (int64_t a = 0; a < k; ++a) G[a * k + a] += shift;
  for (int64_t a = 0; a < k; ++a) {
    double d = G[a * k + a];
    for (int64_t p = 0; p < a; ++p) d -= G[p * k + a] * G[p * k + a];
    if (!(d > 0.0)) return false;
    const double r = std::sqrt(d);
    G[a * k + a] = r;
    for (int64_t b = a + 1; b < k; ++b) {
      double s = G[a * k + b];
      for (int64_t p = 0; p < a; ++p) s -= G[p * k + a] * G[p * k + b];
      G[a * k + b] = s / r;
    }
  }
  return true;
}

// X <- X R^{-1} row by row (forward substitution on each row vector).
void solve_rows(double* X, int64_t n, int64_t k, const std::vector<double>& R) {
  at::parallel_for(0, n, kRowChunk, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      double* x = X + t * k;
      for (int64_t c = 0; c < k; ++c) {
        double s = x[c];
        for (int64_t a = 0; a < c; ++a) s -= x[a] * R[a * k + c];
        x[c] = s / R[c * k + c];
      }
    }
  });
}

// Replaces columns whose squared norm is zero relative to the largest by fixed pseudo-random
// values; returns how many were replaced.
int64_t refill_zero_columns(double* X, int64_t n, int64_t k, const std::vector<double>& G,
                            uint64_t salt) {
  double maxd = 0.0;
  for (int64_t c = 0; c < k; ++c) maxd = std::max(maxd, G[c * k + c]);
  int64_t count = 0;
  for (int64_t c = 0; c < k; ++c) {
    if (G[c * k + c] <= 1e-30 * maxd || !(maxd > 0.0)) {
      for (int64_t t = 0; t < n; ++t)
        X[t * k + c] = fill_value((salt * 0x100000001B3ull) ^ (static_cast<uint64_t>(t) * k + c));
      ++count;
    }
  }
  return count;
}

// Orthonormalises one row-major block X [n, k] in place.
void cholqr3_one(double* X, int64_t n, int64_t k) {
  std::vector<double> G;
  int passes_left = 3;
  for (int pass = 0; pass < 8 && passes_left > 0; ++pass) {
    gram(X, n, k, G);
    if (refill_zero_columns(X, n, k, G, pass + 1) > 0) {
      gram(X, n, k, G);
      passes_left = std::max(passes_left, 2);  // the refilled columns need two clean passes
    }
    double trace = 0.0;
    for (int64_t c = 0; c < k; ++c) trace += G[c * k + c];
    std::vector<double> R = G;
    bool ok = pass == 0 ? false : cholesky_upper(R, k, 0.0);
    if (!ok) {
      // The first pass, or a later one that lost positive definiteness: shift it.
      double shift = cholqr_shift(n, k, trace);
      R = G;
      while (!cholesky_upper(R, k, shift)) {
        shift *= 10.0;
        R = G;
      }
    }
    solve_rows(X, n, k, R);
    --passes_left;
  }
}

// Scales each column of the row-major block X [n, k] by a power of two so that its largest
// absolute entry lies in [0.5, 1) (exactly zero columns stay as they are). Without it the float64
// Gram matrix overflows for entries above ~1e154 and underflows below ~1e-154, and every column is
// refilled. A power-of-two column scaling is exact, keeps the column space, and keeps the Q of a
// QR with a positive diagonal of R (X D = Q (R D)), so nothing is undone afterwards; the refill
// rule and the shift then see the scaled norms. The two factors (orthonormalize.h) keep subnormal
// and near-overflow columns representable; the CUDA kernel applies the same two products.
void scale_columns(double* X, int64_t n, int64_t k) {
  std::vector<double> m(static_cast<size_t>(k), 0.0), f1(static_cast<size_t>(k)),
      f2(static_cast<size_t>(k));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < k; ++c) m[c] = std::max(m[c], std::abs(X[t * k + c]));
  for (int64_t c = 0; c < k; ++c) column_scale_factors(m[c], &f1[c], &f2[c]);
  at::parallel_for(0, n, kRowChunk, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t c = 0; c < k; ++c) X[t * k + c] = X[t * k + c] * f1[c] * f2[c];
  });
}

template <typename scalar_t>
void orthonormalize_cpu_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t b = x.size(0), n = x.size(1), k = x.size(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  auto one = [&](int64_t p) {
    std::vector<double> X(static_cast<size_t>(n) * k);
    for (int64_t i = 0; i < n * k; ++i) X[i] = static_cast<double>(xp[p * n * k + i]);
    scale_columns(X.data(), n, k);
    cholqr3_one(X.data(), n, k);
    for (int64_t i = 0; i < n * k; ++i) op[p * n * k + i] = static_cast<scalar_t>(X[i]);
  };
  if (b >= at::get_num_threads()) {
    at::parallel_for(0, b, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) one(p);
    });
  } else {
    for (int64_t p = 0; p < b; ++p) one(p);
  }
}

}  // namespace

at::Tensor orthonormalize_cpu(const at::Tensor& x) {
  check_orthonormalize(x);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  TORCH_CHECK(at::isfinite(xc).all().item<bool>(),
              "orthonormalize: expected x with finite entries, got NaN or infinity");
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "orthonormalize_cpu", [&] {
    orthonormalize_cpu_impl<scalar_t>(xc, out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(resgeom_fast, CPU, m) {
  m.impl("orthonormalize", &orthonormalize_cpu);
}

}  // namespace ops
}  // namespace resgeom_fast
