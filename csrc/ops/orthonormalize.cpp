// Schema of resgeom_fast::orthonormalize, and its C++ entry point resgeom_fast::ops::orthonormalize
// (declared in orthonormalize.h).
//
// orthonormalize(x [b, n, k]) -> q [b, n, k]
// For each of the b blocks, q has orthonormal columns spanning the column space of x (for a
// rank-deficient x, the extra columns complete it with orthonormal directions). Each column is
// first scaled by a power of two to a largest absolute entry in [0.5, 1) (exact, Q unchanged;
// finite entries of any magnitude, 1e-320 .. 1e308, stay representable in the Gram matrix; the
// refill rule below sees the scaled norms, so only exactly zero columns are refilled on the first
// pass). Shifted Cholesky
// QR three times (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020), all in float64: a
// shifted pass, then two plain passes (shifted again if a Cholesky pivot is not positive). Stable
// for condition numbers up to ~1/u(float64); columns that are exactly zero are replaced by a
// fixed pseudo-random vector first. Returned in the input dtype.
#include "ops/orthonormalize.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resgeom_fast, m) {
  m.def("orthonormalize(Tensor x) -> Tensor");
}

namespace resgeom_fast {
namespace ops {

at::Tensor orthonormalize(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resgeom_fast::orthonormalize", "")
                       .typed<decltype(orthonormalize)>();
  return op.call(x);
}

}  // namespace ops
}  // namespace resgeom_fast
