#pragma once
// One fused, batched full-reorthogonalisation step of Lanczos (CPU: local-first Gram-Schmidt with a
// second pass only when needed; CUDA: classical Gram-Schmidt twice).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace resgeom_fast {
namespace ops {

inline void check_lanczos_reorth(const at::Tensor& w, const at::Tensor& basis) {
  TORCH_CHECK(w.dim() == 2, "lanczos_reorth: expected w of shape [b, n], got ", w.sizes());
  TORCH_CHECK(basis.dim() == 3, "lanczos_reorth: expected basis of shape [b, j, n], got ",
              basis.sizes());
  TORCH_CHECK(basis.size(0) == w.size(0) && basis.size(2) == w.size(1),
              "lanczos_reorth: expected basis of shape [", w.size(0), ", j, ", w.size(1),
              "] to match w ", w.sizes(), ", got ", basis.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "lanczos_reorth: expected w of dtype float32 or float64, got ", w.scalar_type());
  TORCH_CHECK(basis.scalar_type() == w.scalar_type(),
              "lanczos_reorth: expected basis of the dtype of w (", w.scalar_type(), "), got ",
              basis.scalar_type());
  TORCH_CHECK(basis.device() == w.device(), "lanczos_reorth: expected basis on the device of w (",
              w.device(), "), got ", basis.device());
}

// The C++ entry point of resgeom_fast::lanczos_reorth (defined in lanczos_reorth.cpp), for libtorch
// users: calls the op through the dispatcher, so the kernel of the inputs' device runs (CPU, or
// CUDA in a CUDA build); autograd and the fake kernel are registered from Python only.
// w [b, n], basis [b, j, n] (float32/float64, one dtype and device; rows orthonormal)
// -> (w_orth [b, n] in w's dtype, coeffs [b, j] float64, norm [b] float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_reorth(const at::Tensor& w,
                                                              const at::Tensor& basis);

}  // namespace ops
}  // namespace resgeom_fast
