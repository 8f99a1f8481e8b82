// Schema of resgeom_fast::density_smooth, and its C++ entry point resgeom_fast::ops::density_smooth
// (declared in density_smooth.h).
//
// density_smooth(nodes [b, m], weights [b, m], grid [g], sigma) -> density [b, g]
// density[p, t] = sum_i weights[p, i] * exp(-(grid[t] - nodes[p, i])^2 / (2 sigma^2))
//                 / (sigma * sqrt(2 pi)),  accumulated in float64, returned in the input dtype.
#include "ops/density_smooth.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resgeom_fast, m) {
  m.def("density_smooth(Tensor nodes, Tensor weights, Tensor grid, float sigma) -> Tensor");
}

namespace resgeom_fast {
namespace ops {

at::Tensor density_smooth(const at::Tensor& nodes, const at::Tensor& weights,
                          const at::Tensor& grid, double sigma) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resgeom_fast::density_smooth", "")
                       .typed<decltype(density_smooth)>();
  return op.call(nodes, weights, grid, sigma);
}

}  // namespace ops
}  // namespace resgeom_fast
