// CUDA kernel of resgeom_fast::masked_scale: out = v * scale[c] * mask[n, c, s].
// One thread per element (grid-stride), the same arithmetic as the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "ops/masked_scale.h"

namespace resgeom_fast {
namespace ops {

namespace {

constexpr int kThreads = 256;

// v, out [N, K, C, S]; mask [N, C, S] (bytes); scale [C].
template <typename scalar_t>
__global__ void masked_scale_kernel(const scalar_t* __restrict__ vp, const uint8_t* __restrict__ mp,
                                    const scalar_t* __restrict__ sp, int64_t total, int64_t K,
                                    int64_t C, int64_t S, scalar_t* __restrict__ op) {
  const int64_t cs = C * S;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t rem = idx % cs;  // c * S + s
    const int64_t n = idx / (K * cs);
    const int64_t c = rem / S;
    op[idx] = vp[idx] * sp[c] * static_cast<scalar_t>(mp[n * cs + rem] != 0);
  }
}

}  // namespace

at::Tensor masked_scale_cuda(const at::Tensor& v, const at::Tensor& mask, const at::Tensor& scale) {
  check_masked_scale(v, mask, scale);
  TORCH_INTERNAL_ASSERT(v.device().is_cuda());
  c10::cuda::CUDAGuard guard(v.device());
  auto vc = v.contiguous();
  auto mc = mask.contiguous();
  auto sc = scale.contiguous();
  auto out = at::empty_like(vc, at::MemoryFormat::Contiguous);
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t blocks64 = std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20);
  const unsigned int blocks = static_cast<unsigned int>(blocks64);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "masked_scale_cuda", [&] {
    masked_scale_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        vc.data_ptr<scalar_t>(), reinterpret_cast<const uint8_t*>(mc.data_ptr()),
        sc.data_ptr<scalar_t>(), total, vc.size(1), vc.size(2), vc.size(3),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(resgeom_fast, CUDA, m) {
  m.impl("masked_scale", &masked_scale_cuda);
}

}  // namespace ops
}  // namespace resgeom_fast
