// CUDA kernel of resgeom_fast::masked_scale: out = v * scale[c] * mask[n, c, s].
//
// v and out are viewed as N * K slabs of C * S contiguous elements; slab q = n * K + k uses the
// mask slab n. The grid is two-dimensional: blockIdx.y walks the slabs (stride gridDim.y) and
// computes n = q / K once per slab; blockIdx.x / threadIdx.x walk the elements e = c * S + s of a
// slab (grid-stride), so an element needs one division, c = e / S. When C * S <= 2^31 - 1 (every
// practical case) that division is ATen's 32-bit multiply-shift IntDivider (a __umulhi, an add and
// a shift) instead of the ~100-instruction int64 division; larger slabs take an int64 instance of
// the same kernel. Same arithmetic as the CPU kernel: v * scale[c] * (mask != 0).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "ops/masked_scale.h"

namespace resgeom_fast {
namespace ops {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;          // CUDA's limit on gridDim.y
constexpr int64_t kTargetBlocks = int64_t{1} << 16;  // enough to fill any current GPU many times

// v, out [N, K, C, S] viewed as [N * K, cs]; mask [N, C, S] viewed as [N, cs]; scale [C].
// index_t: uint32_t (cs <= 2^31 - 1, IntDivider<unsigned int>) or int64_t (plain division).
template <typename scalar_t, typename index_t>
__global__ void masked_scale_kernel(const scalar_t* __restrict__ vp, const uint8_t* __restrict__ mp,
                                    const scalar_t* __restrict__ sp, int64_t slabs, int64_t K,
                                    index_t cs, at::cuda::detail::IntDivider<index_t> by_s,
                                    scalar_t* __restrict__ op) {
  const index_t e0 = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t estep = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (int64_t q = blockIdx.y; q < slabs; q += gridDim.y) {
    const int64_t n = q / K;  // once per slab and thread
    const scalar_t* vq = vp + q * static_cast<int64_t>(cs);
    const uint8_t* mq = mp + n * static_cast<int64_t>(cs);
    scalar_t* oq = op + q * static_cast<int64_t>(cs);
    // e + estep cannot wrap: e < cs <= 2^31 - 1 and estep <= 2^31 for uint32_t (see the launch).
    for (index_t e = e0; e < cs; e += estep) {
      const index_t c = by_s.div(e);
      oq[e] = vq[e] * sp[c] * static_cast<scalar_t>(mq[e] != 0);
    }
  }
}

template <typename scalar_t, typename index_t>
void launch(const at::Tensor& v, const at::Tensor& mask, const at::Tensor& scale, at::Tensor& out,
            cudaStream_t stream) {
  const int64_t N = v.size(0), K = v.size(1), C = v.size(2), S = v.size(3);
  const int64_t cs = C * S, slabs = N * K;
  const int64_t grid_y = std::min(slabs, kMaxGridY);
  const int64_t want_x = std::max<int64_t>(1, (kTargetBlocks + grid_y - 1) / grid_y);
  // grid_x * kThreads <= 2^31 keeps the 32-bit element stride from wrapping.
  const int64_t grid_x = std::min<int64_t>({(cs + kThreads - 1) / kThreads, want_x,
                                            (int64_t{1} << 31) / kThreads});
  const dim3 grid(static_cast<unsigned int>(grid_x), static_cast<unsigned int>(grid_y));
  masked_scale_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
      v.data_ptr<scalar_t>(), reinterpret_cast<const uint8_t*>(mask.data_ptr()),
      scale.data_ptr<scalar_t>(), slabs, K, static_cast<index_t>(cs),
      at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(S)), out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  if (out.numel() == 0) return out;  // also S == 0: no division by zero below
  const int64_t cs = vc.size(2) * vc.size(3);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "masked_scale_cuda", [&] {
    if (cs <= std::numeric_limits<int32_t>::max()) {
      launch<scalar_t, uint32_t>(vc, mc, sc, out, stream);
    } else {
      launch<scalar_t, int64_t>(vc, mc, sc, out, stream);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(resgeom_fast, CUDA, m) {
  m.impl("masked_scale", &masked_scale_cuda);
}

}  // namespace ops
}  // namespace resgeom_fast
