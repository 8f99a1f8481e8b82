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

}  // namespace ops
}  // namespace resgeom_fast
