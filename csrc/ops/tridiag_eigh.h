#pragma once
// Batched symmetric tridiagonal eigensolver returning Gauss quadrature nodes and weights.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <tuple>

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

// The C++ entry point of resgeom_fast::tridiag_eigh (defined in tridiag_eigh.cpp), for libtorch
// users: calls the op through the dispatcher, so the kernel of the inputs' device runs (CPU, or
// CUDA in a CUDA build); autograd and the fake kernel are registered from Python only.
// diag [b, m], offdiag [b, m - 1] (float32/float64, one dtype and device, finite)
// -> (nodes [b, m] ascending, weights [b, m] summing to 1), in diag's dtype.
std::tuple<at::Tensor, at::Tensor> tridiag_eigh(const at::Tensor& diag, const at::Tensor& offdiag);

}  // namespace ops
}  // namespace resgeom_fast
