#pragma once
// Batched orthonormalisation of [b, n, k] blocks by shifted Cholesky QR (CholeskyQR3).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace resgeom_fast {
namespace ops {

inline void check_orthonormalize(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "orthonormalize: expected x of shape [b, n, k], got ", x.sizes());
  TORCH_CHECK(x.size(2) <= x.size(1),
              "orthonormalize: expected x with at most as many columns as rows (k <= n), got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "orthonormalize: expected x of dtype float32 or float64, got ", x.scalar_type());
}

// Shift of the first Cholesky QR pass (Fukaya et al. 2020): s = 11 (n k + k (k + 1)) u ||X||^2,
// with ||X||_2^2 bounded by the Frobenius norm squared (trace of the Gram matrix).
inline double cholqr_shift(int64_t n, int64_t k, double gram_trace) {
  const double u = 1.1102230246251565e-16;  // unit roundoff of float64 (the working precision)
  return 11.0 * (static_cast<double>(n) * k + static_cast<double>(k) * (k + 1)) * u * gram_trace;
}

// Power-of-two factors f1, f2 with colmax * f1 * f2 in [0.5, 1) for a finite colmax > 0 (1, 1 for
// colmax == 0): colmax = m 2^e (frexp), f1 = 2^h, f2 = 2^(-e-h) with h = trunc(-e / 2), so both
// are normal numbers (|h|, |e + h| <= 537) even for subnormal or near-overflow columns, and
// (x * f1) * f2 equals x 2^-e exactly unless the result is subnormal. Shared by the CPU and CUDA
// kernels (host and device).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline void column_scale_factors(double colmax, double* f1, double* f2) {
  if (!(colmax > 0.0)) {
    *f1 = 1.0;
    *f2 = 1.0;
    return;
  }
  int e = 0;
  (void)frexp(colmax, &e);
  const int h = -e / 2;
  *f1 = ldexp(1.0, h);
  *f2 = ldexp(1.0, -e - h);
}

// The C++ entry point of resgeom_fast::orthonormalize (defined in orthonormalize.cpp), for libtorch
// users: calls the op through the dispatcher, so the kernel of the inputs' device runs (CPU, or
// CUDA in a CUDA build); autograd and the fake kernel are registered from Python only.
// x [b, n, k] float32/float64 with k <= n, finite -> q [b, n, k] with orthonormal columns
// spanning those of x, in x's dtype.
at::Tensor orthonormalize(const at::Tensor& x);

}  // namespace ops
}  // namespace resgeom_fast
