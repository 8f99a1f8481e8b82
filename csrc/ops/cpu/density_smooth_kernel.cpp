// CPU kernel of resgeom_fast::density_smooth: Gaussian smoothing of weighted nodes on a grid.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

#include "ops/density_smooth.h"

namespace resgeom_fast {
namespace ops {

namespace {

template <typename scalar_t>
void density_smooth_cpu_impl(const at::Tensor& nodes, const at::Tensor& weights,
                             const at::Tensor& grid, double sigma, at::Tensor& out) {
  const int64_t b = nodes.size(0), m = nodes.size(1), g = grid.size(0);
  const scalar_t* np = nodes.data_ptr<scalar_t>();
  const scalar_t* wp = weights.data_ptr<scalar_t>();
  const scalar_t* gp = grid.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const double inv2s2 = 1.0 / (2.0 * sigma * sigma);
  const double norm = 1.0 / (sigma * std::sqrt(2.0 * M_PI));
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(m, 1));
  at::parallel_for(0, b * g, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t idx = i0; idx < i1; ++idx) {
      const int64_t p = idx / g, t = idx % g;
      const double x = static_cast<double>(gp[t]);
      double acc = 0.0;
      for (int64_t i = 0; i < m; ++i) {
        const double diff = x - static_cast<double>(np[p * m + i]);
        acc += static_cast<double>(wp[p * m + i]) * std::exp(-diff * diff * inv2s2);
      }
      op[idx] = static_cast<scalar_t>(acc * norm);
    }
  });
}

}  // namespace

at::Tensor density_smooth_cpu(const at::Tensor& nodes, const at::Tensor& weights,
                              const at::Tensor& grid, double sigma) {
  check_density_smooth(nodes, weights, grid, sigma);
  TORCH_INTERNAL_ASSERT(nodes.device().is_cpu());
  auto n = nodes.contiguous();
  auto w = weights.contiguous();
  auto gr = grid.contiguous();
  auto out = at::empty({n.size(0), gr.size(0)}, n.options());
  AT_DISPATCH_FLOATING_TYPES(n.scalar_type(), "density_smooth_cpu", [&] {
    density_smooth_cpu_impl<scalar_t>(n, w, gr, sigma, out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(resgeom_fast, CPU, m) {
  m.impl("density_smooth", &density_smooth_cpu);
}

}  // namespace ops
}  // namespace resgeom_fast
