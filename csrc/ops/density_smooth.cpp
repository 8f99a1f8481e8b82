// Schema of resgeom_fast::density_smooth.
//
// density_smooth(nodes [b, m], weights [b, m], grid [g], sigma) -> density [b, g]
// density[p, t] = sum_i weights[p, i] * exp(-(grid[t] - nodes[p, i])^2 / (2 sigma^2))
//                 / (sigma * sqrt(2 pi)),  accumulated in float64, returned in the input dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resgeom_fast, m) {
  m.def("density_smooth(Tensor nodes, Tensor weights, Tensor grid, float sigma) -> Tensor");
}
