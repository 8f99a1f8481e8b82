#pragma once
// Smoothing of quadrature nodes and weights into a spectral density on a grid.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace resgeom_fast {
namespace ops {

inline void check_density_smooth(const at::Tensor& nodes, const at::Tensor& weights,
                                 const at::Tensor& grid, double sigma) {
  TORCH_CHECK(nodes.dim() == 2, "density_smooth: expected nodes of shape [b, m], got ",
              nodes.sizes());
  TORCH_CHECK(weights.sizes() == nodes.sizes(), "density_smooth: expected weights of shape ",
              nodes.sizes(), " (the shape of nodes), got ", weights.sizes());
  TORCH_CHECK(grid.dim() == 1, "density_smooth: expected grid of shape [g], got ", grid.sizes());
  TORCH_CHECK(nodes.scalar_type() == at::kFloat || nodes.scalar_type() == at::kDouble,
              "density_smooth: expected nodes of dtype float32 or float64, got ",
              nodes.scalar_type());
  TORCH_CHECK(weights.scalar_type() == nodes.scalar_type() &&
                  grid.scalar_type() == nodes.scalar_type(),
              "density_smooth: expected weights and grid of the dtype of nodes (",
              nodes.scalar_type(), "), got ", weights.scalar_type(), " and ", grid.scalar_type());
  TORCH_CHECK(weights.device() == nodes.device() && grid.device() == nodes.device(),
              "density_smooth: expected weights and grid on the device of nodes (", nodes.device(),
              "), got ", weights.device(), " and ", grid.device());
  TORCH_CHECK(sigma > 0 && std::isfinite(sigma),
              "density_smooth: expected sigma a positive finite number, got ", sigma);
}

// The C++ entry point of resgeom_fast::density_smooth (defined in density_smooth.cpp), for libtorch
// users: calls the op through the dispatcher, so the kernel of the inputs' device runs (CPU, or
// CUDA in a CUDA build); autograd and the fake kernel are registered from Python only.
// nodes [b, m], weights [b, m], grid [g] (float32/float64, one dtype and device), sigma > 0
// -> density [b, g] in the dtype of nodes.
at::Tensor density_smooth(const at::Tensor& nodes, const at::Tensor& weights,
                          const at::Tensor& grid, double sigma);

}  // namespace ops
}  // namespace resgeom_fast
