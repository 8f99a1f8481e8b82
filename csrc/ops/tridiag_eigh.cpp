// Schema of resgeom_fast::tridiag_eigh.
//
// tridiag_eigh(diag [b, m], offdiag [b, m-1]) -> (nodes [b, m], weights [b, m])
// For each of the b symmetric tridiagonal matrices T (diagonal `diag`, off-diagonal `offdiag`),
// nodes are the eigenvalues of T in ascending order and weights the squared first components of
// the matching unit eigenvectors (Gauss quadrature nodes and weights; they sum to 1).
// Computed in float64 by implicit QL with Wilkinson shifts, tracking only the first row of the
// eigenvector matrix (Golub-Welsch); returned in the input dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resgeom_fast, m) {
  m.def("tridiag_eigh(Tensor diag, Tensor offdiag) -> (Tensor, Tensor)");
}
