// Schema of resgeom_fast::lanczos_reorth, and its C++ entry point resgeom_fast::ops::lanczos_reorth
// (declared in lanczos_reorth.h).
//
// lanczos_reorth(w [b, n], basis [b, j, n]) -> (w_orth [b, n], coeffs [b, j] float64,
//                                               norm [b] float64)
// For each of the b problems, orthogonalises w against the j rows of basis (assumed orthonormal)
// by classical Gram-Schmidt applied twice (CGS2):
//   h1 = V w;  w1 = w - V^T h1;  h2 = V w1;  w_orth = w1 - V^T h2;
// coeffs = h1 + h2 (coeffs[:, j-1] is the Lanczos alpha when w = A v_{j-1}), norm = ||w_orth||.
// All scalars are accumulated in float64 (w1 is held in float64 too). The second projection is
// fused with the first update, so the basis is read from memory three times, not four.
// With h [b, j] float64 given (the sweep mode, one read of the basis): no projection is computed;
//   x = w - V^T h (float64), returns (x in w's dtype, dots = V w [b, j] float64, ||x|| float64).
// Lanczos (linalg/lanczos.py) predicts h from the recurrence and the measured overlaps.
// basis may be a view with any stride on its first two dimensions (a slice of a larger buffer);
// its last dimension must be contiguous, otherwise it is copied.
#include "ops/lanczos_reorth.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resgeom_fast, m) {
  m.def("lanczos_reorth(Tensor w, Tensor basis, Tensor? h=None) -> (Tensor, Tensor, Tensor)");
}

namespace resgeom_fast {
namespace ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_reorth(const at::Tensor& w, const at::Tensor& basis,
                                                              const std::optional<at::Tensor>& h) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resgeom_fast::lanczos_reorth", "")
                       .typed<decltype(lanczos_reorth)>();
  return op.call(w, basis, h);
}

}  // namespace ops
}  // namespace resgeom_fast
