#pragma once
// Batched symmetric tridiagonal eigensolver returning Gauss quadrature nodes and weights.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace resgeom_fast {
namespace ops {

// Checks shared by every kernel of tridiag_eigh.
inline void check_tridiag_eigh(const at::Tensor& diag, const at::Tensor& offdiag) {
  TORCH_CHECK(diag.dim() == 2, "tridiag_eigh: expected diag of shape [b, m], got ", diag.sizes());
  TORCH_CHECK(offdiag.dim() == 2, "tridiag_eigh: expected offdiag of shape [b, m - 1], got ",
              offdiag.sizes());
  const int64_t m = diag.size(1);
  TORCH_CHECK(offdiag.size(0) == diag.size(0) && offdiag.size(1) == std::max<int64_t>(m - 1, 0),
              "tridiag_eigh: expected offdiag of shape [", diag.size(0), ", ",
              std::max<int64_t>(m - 1, 0), "] to match diag ", diag.sizes(), ", got ",
              offdiag.sizes());
  TORCH_CHECK(diag.scalar_type() == at::kFloat || diag.scalar_type() == at::kDouble,
              "tridiag_eigh: expected diag of dtype float32 or float64, got ", diag.scalar_type());
  TORCH_CHECK(offdiag.scalar_type() == diag.scalar_type(),
              "tridiag_eigh: expected offdiag of the same dtype as diag (", diag.scalar_type(),
              "), got ", offdiag.scalar_type());
  TORCH_CHECK(offdiag.device() == diag.device(),
              "tridiag_eigh: expected offdiag on the same device as diag (", diag.device(),
              "), got ", offdiag.device());
}

// Maximum implicit-QL sweeps per eigenvalue before a problem is declared not converged.
constexpr int kTridiagMaxSweeps = 60;

}  // namespace ops
}  // namespace resgeom_fast
