// CUDA kernel of resgeom_fast::lanczos_reorth: fused classical Gram-Schmidt twice, float64 scalars.
//
// Same three passes as the CPU kernel, over chunks of kChunk elements of n (one thread block per
// (problem, chunk)):
//   pass 1: per-chunk partials of h1 = V w;                          reduce -> h1
//   pass 2: w1 = w - V^T h1 on the chunk (kept in a float64 scratch), per-chunk partials of
//           h2 = V w1 on the same chunk;                             reduce -> h2, coeffs = h1 + h2
//   pass 3: w_orth = w1 - V^T h2, per-chunk partials of ||w_orth||^2; reduce -> norm
// Every reduction is deterministic: partials are written per block and summed in a fixed order
// (no floating-point atomics).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "ops/lanczos_reorth.h"

namespace resgeom_fast {
namespace ops {

namespace {

constexpr int kThreads = 256;                    // threads per block (8 warps)
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 1024;                 // elements of n per block
constexpr int kPerThread = kChunk / kThreads;    // elements of the chunk owned by one thread
static_assert(kChunk % kThreads == 0, "kChunk must be a multiple of kThreads");

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // lane 0 holds the sum (fixed order: deterministic)
}

// part[i] = sum_{t < len} V_i[t] * x[t] for i < j, one warp per row i (rows strided by kWarps).
// x is the chunk in shared memory, Vc points at row 0 of the chunk, rows sj apart.
template <typename scalar_t>
__device__ void chunk_dots(const scalar_t* __restrict__ Vc, int64_t sj, int64_t j,
                           const double* x, int64_t len, double* __restrict__ part) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t i = warp; i < j; i += kWarps) {
    const scalar_t* v = Vc + i * sj;
    double acc = 0.0;
    for (int64_t t = lane; t < len; t += 32) acc += static_cast<double>(v[t]) * x[t];
    acc = warp_sum(acc);
    if (lane == 0) part[i] = acc;
  }
}

// Pass 1. grid.x = b * nch; part [b, nch, j].
template <typename scalar_t>
__global__ void pass1_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ V,
                             int64_t sb, int64_t sj, int64_t j, int64_t n, int64_t nch,
                             double* __restrict__ part) {
  __shared__ double x[kChunk];
  const int64_t blk = blockIdx.x;
  const int64_t p = blk / nch, c = blk % nch;
  const int64_t t0 = c * kChunk;
  const int64_t len = n - t0 < kChunk ? n - t0 : kChunk;
  for (int64_t t = threadIdx.x; t < len; t += kThreads)
    x[t] = static_cast<double>(w[p * n + t0 + t]);
  __syncthreads();
  chunk_dots<scalar_t>(V + p * sb + t0, sj, j, x, len, part + blk * j);
}

// Pass 2 (fused). w1 = w - V^T h1 on the chunk (stored to the float64 scratch w1), then the
// partials of h2 = V w1. h1 [b, j]; part [b, nch, j].
template <typename scalar_t>
__global__ void pass2_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ V,
                             int64_t sb, int64_t sj, int64_t j, int64_t n, int64_t nch,
                             const double* __restrict__ h1, double* __restrict__ w1,
                             double* __restrict__ part) {
  __shared__ double x[kChunk];
  const int64_t blk = blockIdx.x;
  const int64_t p = blk / nch, c = blk % nch;
  const int64_t t0 = c * kChunk;
  const int64_t len = n - t0 < kChunk ? n - t0 : kChunk;
  const scalar_t* Vc = V + p * sb + t0;
  const double* h = h1 + p * j;
  double acc[kPerThread];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t t = threadIdx.x + e * kThreads;
    acc[e] = t < len ? static_cast<double>(w[p * n + t0 + t]) : 0.0;
  }
  for (int64_t i = 0; i < j; ++i) {
    const scalar_t* v = Vc + i * sj;
    const double hi = h[i];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t t = threadIdx.x + e * kThreads;
      if (t < len) acc[e] -= hi * static_cast<double>(v[t]);
    }
  }
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t t = threadIdx.x + e * kThreads;
    if (t < len) {
      x[t] = acc[e];
      w1[p * n + t0 + t] = acc[e];
    }
  }
  __syncthreads();
  chunk_dots<scalar_t>(Vc, sj, j, x, len, part + blk * j);
}

// Pass 3. w_orth = w1 - V^T h2 (written in the input dtype) and the partial of its squared norm.
// h2 [b, j]; npart [b, nch].
template <typename scalar_t>
__global__ void pass3_kernel(const scalar_t* __restrict__ V, int64_t sb, int64_t sj, int64_t j,
                             int64_t n, int64_t nch, const double* __restrict__ h2,
                             const double* __restrict__ w1, scalar_t* __restrict__ out,
                             double* __restrict__ npart) {
  __shared__ double wsum[kWarps];
  const int64_t blk = blockIdx.x;
  const int64_t p = blk / nch, c = blk % nch;
  const int64_t t0 = c * kChunk;
  const int64_t len = n - t0 < kChunk ? n - t0 : kChunk;
  const scalar_t* Vc = V + p * sb + t0;
  const double* h = h2 + p * j;
  double acc[kPerThread];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t t = threadIdx.x + e * kThreads;
    acc[e] = t < len ? w1[p * n + t0 + t] : 0.0;
  }
  for (int64_t i = 0; i < j; ++i) {
    const scalar_t* v = Vc + i * sj;
    const double hi = h[i];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t t = threadIdx.x + e * kThreads;
      if (t < len) acc[e] -= hi * static_cast<double>(v[t]);
    }
  }
  double sq = 0.0;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t t = threadIdx.x + e * kThreads;
    if (t < len) {
      sq += acc[e] * acc[e];
      out[p * n + t0 + t] = static_cast<scalar_t>(acc[e]);
    }
  }
  sq = warp_sum(sq);
  if (threadIdx.x % 32 == 0) wsum[threadIdx.x / 32] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int q = 0; q < kWarps; ++q) s += wsum[q];
    npart[blk] = s;
  }
}

// h[p, i] = sum_c part[p, c, i] in chunk order; with h_prev, also coeffs = h_prev + h.
// One thread per (p, i), grid-stride over b * j.
__global__ void reduce_partials_kernel(const double* __restrict__ part, int64_t b, int64_t nch,
                                       int64_t j, double* __restrict__ h,
                                       const double* __restrict__ h_prev,
                                       double* __restrict__ coeffs) {
  const int64_t total = b * j;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = idx / j, i = idx % j;
    double s = 0.0;
    for (int64_t c = 0; c < nch; ++c) s += part[(p * nch + c) * j + i];
    h[idx] = s;
    if (h_prev != nullptr) coeffs[idx] = h_prev[idx] + s;
  }
}

// norm[p] = sqrt(sum_c npart[p, c]) in chunk order. One thread per problem.
__global__ void norm_kernel(const double* __restrict__ npart, int64_t b, int64_t nch,
                            double* __restrict__ norm) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < b;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t c = 0; c < nch; ++c) s += npart[p * nch + c];
    norm[p] = sqrt(s);
  }
}

// Blocks for a grid-stride launch over `total` items (total > 0).
unsigned int grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, 1 << 20));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_reorth_cuda(const at::Tensor& w,
                                                                   const at::Tensor& basis) {
  check_lanczos_reorth(w, basis);
  TORCH_INTERNAL_ASSERT(w.device().is_cuda());
  c10::cuda::CUDAGuard guard(w.device());
  auto wc = w.contiguous();
  auto V = basis.stride(2) == 1 ? basis : basis.contiguous();
  const int64_t b = wc.size(0), n = wc.size(1), j = V.size(1);
  auto out = at::empty_like(wc);
  auto dopt = wc.options().dtype(at::kDouble);
  auto coeffs = at::empty({b, j}, dopt);
  auto norm = at::empty({b}, dopt);
  if (b == 0) return {out, coeffs, norm};

  const int64_t nch = (n + kChunk - 1) / kChunk;  // 0 when n == 0
  TORCH_CHECK(b * nch <= std::numeric_limits<int32_t>::max(),
              "lanczos_reorth: expected at most 2^31 - 1 chunks of ", kChunk,
              " elements in all, got b = ", b, ", n = ", n);
  auto h1 = at::empty({b, j}, dopt);
  auto h2 = at::empty({b, j}, dopt);
  auto part = at::empty({b, nch, j}, dopt);
  auto w1 = at::empty({b, n}, dopt);
  auto npart = at::empty({b, nch}, dopt);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(wc.scalar_type(), "lanczos_reorth_cuda", [&] {
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const scalar_t* vp = V.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t sb = V.stride(0), sj = V.stride(1);
    double* h1p = h1.data_ptr<double>();
    double* h2p = h2.data_ptr<double>();
    double* partp = part.data_ptr<double>();
    double* cp = coeffs.data_ptr<double>();
    const unsigned int blocks = static_cast<unsigned int>(b * nch);

    // Pass 1: h1 = V w.
    if (blocks > 0) {
      pass1_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, vp, sb, sj, j, n, nch, partp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (j > 0) {
      reduce_partials_kernel<<<grid_for(b * j, kThreads), kThreads, 0, stream>>>(
          partp, b, nch, j, h1p, nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Pass 2: w1 = w - V^T h1 and the partials of h2 = V w1.
    if (blocks > 0) {
      pass2_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, vp, sb, sj, j, n, nch, h1p,
                                                               w1.data_ptr<double>(), partp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (j > 0) {
      reduce_partials_kernel<<<grid_for(b * j, kThreads), kThreads, 0, stream>>>(
          partp, b, nch, j, h2p, h1p, cp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Pass 3: w_orth = w1 - V^T h2 and the partials of its squared norm.
    if (blocks > 0) {
      pass3_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          vp, sb, sj, j, n, nch, h2p, w1.data_ptr<double>(), op, npart.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    norm_kernel<<<grid_for(b, kThreads), kThreads, 0, stream>>>(npart.data_ptr<double>(), b, nch,
                                                                norm.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, coeffs, norm};
}

TORCH_LIBRARY_IMPL(resgeom_fast, CUDA, m) {
  m.impl("lanczos_reorth", &lanczos_reorth_cuda);
}

}  // namespace ops
}  // namespace resgeom_fast
