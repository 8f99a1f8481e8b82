// CUDA kernel of resgeom_fast::density_smooth: Gaussian smoothing of weighted nodes on a grid.
// One thread per (problem, grid point), float64 accumulation, as the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "ops/density_smooth.h"

namespace resgeom_fast {
namespace ops {

namespace {

constexpr int kThreads = 256;

// out [b, g]; nodes, weights [b, m]; grid [g]. Grid-stride over b * g.
template <typename scalar_t>
__global__ void density_smooth_kernel(const scalar_t* __restrict__ np,
                                      const scalar_t* __restrict__ wp,
                                      const scalar_t* __restrict__ gp, int64_t b, int64_t m,
                                      int64_t g, double inv2s2, double norm,
                                      scalar_t* __restrict__ op) {
  const int64_t total = b * g;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = idx / g, t = idx % g;
    const double x = static_cast<double>(gp[t]);
    double acc = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      const double diff = x - static_cast<double>(np[p * m + i]);
      acc += static_cast<double>(wp[p * m + i]) * exp(-diff * diff * inv2s2);
    }
    op[idx] = static_cast<scalar_t>(acc * norm);
  }
}

}  // namespace

at::Tensor density_smooth_cuda(const at::Tensor& nodes, const at::Tensor& weights,
                               const at::Tensor& grid, double sigma) {
  check_density_smooth(nodes, weights, grid, sigma);
  TORCH_INTERNAL_ASSERT(nodes.device().is_cuda());
  c10::cuda::CUDAGuard guard(nodes.device());
  auto n = nodes.contiguous();
  auto w = weights.contiguous();
  auto gr = grid.contiguous();
  const int64_t b = n.size(0), m = n.size(1), g = gr.size(0);
  auto out = at::empty({b, g}, n.options());
  if (b == 0 || g == 0) return out;
  // The same constants as the CPU kernel, computed on the host.
  const double inv2s2 = 1.0 / (2.0 * sigma * sigma);
  const double norm = 1.0 / (sigma * std::sqrt(2.0 * M_PI));
  const int64_t blocks64 = std::min<int64_t>((b * g + kThreads - 1) / kThreads, 1 << 20);
  const unsigned int blocks = static_cast<unsigned int>(blocks64);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(n.scalar_type(), "density_smooth_cuda", [&] {
    density_smooth_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        n.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), b, m, g, inv2s2,
        norm, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(resgeom_fast, CUDA, m) {
  m.impl("density_smooth", &density_smooth_cuda);
}

}  // namespace ops
}  // namespace resgeom_fast
