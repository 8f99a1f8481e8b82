// Schema of resgeom_fast::tridiag_eigh, and its C++ entry point resgeom_fast::ops::tridiag_eigh
// (declared in tridiag_eigh.h).
//
// tridiag_eigh(diag [b, m], offdiag [b, m-1]) -> (nodes [b, m], weights [b, m])
// For each of the b symmetric tridiagonal matrices T (diagonal `diag`, off-diagonal `offdiag`),
// nodes are the eigenvalues of T in ascending order and weights the squared first components of
// the matching unit eigenvectors (Gauss quadrature nodes and weights; they sum to 1).
// Computed in float64 by implicit QL with Wilkinson shifts, tracking only the first row of the
// eigenvector matrix (Golub-Welsch); returned in the input dtype.
#include "ops/tridiag_eigh.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resgeom_fast, m) {
  m.def("tridiag_eigh(Tensor diag, Tensor offdiag) -> (Tensor, Tensor)");
}

namespace resgeom_fast {
namespace ops {

std::tuple<at::Tensor, at::Tensor> tridiag_eigh(const at::Tensor& diag, const at::Tensor& offdiag) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resgeom_fast::tridiag_eigh", "")
                       .typed<decltype(tridiag_eigh)>();
  return op.call(diag, offdiag);
}

}  // namespace ops
}  // namespace resgeom_fast
