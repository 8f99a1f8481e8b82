#pragma once
// One fused, batched full-reorthogonalisation step of Lanczos (CPU: local-first Gram-Schmidt with a
// second pass only when needed; CUDA: classical Gram-Schmidt twice).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

namespace resgeom_fast {
namespace ops {

inline void check_lanczos_reorth(const at::Tensor& w, const at::Tensor& basis,
                                 const std::optional<at::Tensor>& h = std::nullopt) {
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
  if (h.has_value()) {
    TORCH_CHECK(h->dim() == 2 && h->size(0) == w.size(0) && h->size(1) == basis.size(1),
                "lanczos_reorth: expected h of shape [", w.size(0), ", ", basis.size(1), "] (one coefficient per "
                "basis row), got ", h->sizes());
    TORCH_CHECK(h->scalar_type() == at::kDouble, "lanczos_reorth: expected h of dtype float64, got ",
                h->scalar_type());
    TORCH_CHECK(h->device() == w.device(), "lanczos_reorth: expected h on the device of w (", w.device(),
                "), got ", h->device());
  }
}

// The C++ entry point of resgeom_fast::lanczos_reorth (defined in lanczos_reorth.cpp), for libtorch
// users: calls the op through the dispatcher, so the kernel of the inputs' device runs (CPU, or
// CUDA in a CUDA build); autograd and the fake kernel are registered from Python only.
// w [b, n], basis [b, j, n] (float32/float64, one dtype and device; rows orthonormal)
// -> (w_orth [b, n] in w's dtype, coeffs [b, j] float64, norm [b] float64).
// With h [b, j] float64 (the sweep mode): one pass, no projection computed here:
// -> (x = w - basis^T h in w's dtype, dots = basis w [b, j] float64, ||x|| [b] float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_reorth(const at::Tensor& w, const at::Tensor& basis,
                                                              const std::optional<at::Tensor>& h = std::nullopt);

}  // namespace ops
}  // namespace resgeom_fast
