// CUDA kernel of resgeom_fast::lanczos_reorth: fused classical Gram-Schmidt twice, float64 scalars.
//
// Same three passes as the CPU kernel, over chunks of kChunk elements of n (one thread block per
// (problem, chunk)):
//   pass 1: per-chunk partials of h1 = V w;                          reduce -> h1
//   pass 2: w1 = w - V^T h1 on the chunk (kept in a float64 scratch), per-chunk partials of
//           h2 = V w1 on the same chunk;                             reduce -> h2, coeffs = h1 + h2
//   pass 3: w_orth = w1 - V^T h2, per-chunk partials of ||w_orth||^2; reduce -> norm
// The sweep mode (h given): one pass, the partials of V w, then x = w - V^T h and ||x||^2 on the chunk.
// Every reduction is deterministic: partials are written per block and summed in a fixed order
// (no floating-point atomics); the cross-chunk reductions are block-parallel tree reductions
// (column_sum_kernel below), not one thread per output.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>

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

// The (problem, chunk) a block of the passes owns: grid.x = b * nch, chunk c of problem p covers
// elements t0 .. t0 + len of n.
struct Chunk {
  int64_t blk, p, t0, len;
};
__device__ __forceinline__ Chunk chunk_of(int64_t n, int64_t nch) {
  const int64_t blk = blockIdx.x;
  const int64_t t0 = (blk % nch) * kChunk;
  return {blk, blk / nch, t0, n - t0 < kChunk ? n - t0 : kChunk};
}

// Pass 1. grid.x = b * nch; part [b, nch, j].
template <typename scalar_t>
__global__ void pass1_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ V,
                             int64_t sb, int64_t sj, int64_t j, int64_t n, int64_t nch,
                             double* __restrict__ part) {
  __shared__ double x[kChunk];
  const Chunk ch = chunk_of(n, nch);
  const int64_t blk = ch.blk, p = ch.p, t0 = ch.t0, len = ch.len;
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
  const Chunk ch = chunk_of(n, nch);
  const int64_t blk = ch.blk, p = ch.p, t0 = ch.t0, len = ch.len;
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

// acc (this thread's elements of the chunk) -= V^T h over the j rows; the result stored to out (in
// the input dtype) and the block's partial of its squared norm to *npart (passes 3 and the sweep).
template <typename scalar_t>
__device__ void subtract_store(double (&acc)[kPerThread], const scalar_t* __restrict__ Vc, int64_t sj,
                               int64_t j, const double* __restrict__ h, int64_t len,
                               scalar_t* __restrict__ out, double* __restrict__ npart) {
  __shared__ double wsum[kWarps];
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
      out[t] = static_cast<scalar_t>(acc[e]);
    }
  }
  sq = warp_sum(sq);
  if (threadIdx.x % 32 == 0) wsum[threadIdx.x / 32] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int q = 0; q < kWarps; ++q) s += wsum[q];
    *npart = s;
  }
}

// Pass 3. w_orth = w1 - V^T h2 (written in the input dtype) and the partial of its squared norm.
// h2 [b, j]; npart [b, nch].
template <typename scalar_t>
__global__ void pass3_kernel(const scalar_t* __restrict__ V, int64_t sb, int64_t sj, int64_t j,
                             int64_t n, int64_t nch, const double* __restrict__ h2,
                             const double* __restrict__ w1, scalar_t* __restrict__ out,
                             double* __restrict__ npart) {
  const Chunk ch = chunk_of(n, nch);
  const int64_t blk = ch.blk, p = ch.p, t0 = ch.t0, len = ch.len;
  double acc[kPerThread];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t t = threadIdx.x + e * kThreads;
    acc[e] = t < len ? w1[p * n + t0 + t] : 0.0;
  }
  subtract_store<scalar_t>(acc, V + p * sb + t0, sj, j, h2 + p * j, len, out + p * n + t0, npart + blk);
}

// The sweep mode (h given): the partials of dots = V w (of the input w, held in shared memory),
// then x = w - V^T h on the chunk (the rows re-read from L2), stored in w's dtype with the partial
// of ||x||^2. h [b, j]; part [b, nch, j]; npart [b, nch].
template <typename scalar_t>
__global__ void sweep_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ V,
                             int64_t sb, int64_t sj, int64_t j, int64_t n, int64_t nch,
                             const double* __restrict__ hh, scalar_t* __restrict__ out,
                             double* __restrict__ part, double* __restrict__ npart) {
  __shared__ double x[kChunk];
  const Chunk ch = chunk_of(n, nch);
  const int64_t blk = ch.blk, p = ch.p, t0 = ch.t0, len = ch.len;
  const scalar_t* Vc = V + p * sb + t0;
  for (int64_t t = threadIdx.x; t < len; t += kThreads)
    x[t] = static_cast<double>(w[p * n + t0 + t]);
  __syncthreads();
  chunk_dots<scalar_t>(Vc, sj, j, x, len, part + blk * j);
  double acc[kPerThread];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t t = threadIdx.x + e * kThreads;
    acc[e] = t < len ? x[t] : 0.0;
  }
  subtract_store<scalar_t>(acc, Vc, sj, j, hh + p * j, len, out + p * n + t0, npart + blk);
}

// Cross-chunk reductions: column sums of part [b, rows, j] over its rows (the per-chunk partials),
// as block-parallel tree reductions in a fixed order (no atomics).
//
// A block is a tile of tx x ty threads (tx * ty = kThreads, tx = min(32, next power of two >= j))
// and owns tx columns i and one segment of seg = ty * kRowsPerThread rows of one problem. Thread
// (x, y) adds the rows s * seg + y + u * ty, u = 0 .. kRowsPerThread - 1, in that order (a warp
// reads whole rows: coalesced); the ty sums of a column are then added by a pairwise tree in
// shared memory (y + off into y for off = ty/2, ty/4, .., 1). The segment sums go to a
// [b, segs, j] buffer and the same kernel runs again on it until one segment is left; that last
// launch applies the epilogue. The grouping depends only on (rows, j), so results are bitwise
// reproducible run to run (they differ from the CPU's sequential order by rounding only).
constexpr int kRowsPerThread = 16;

enum class Epilogue : int { kSegment = 0, kSum = 1, kSumPlusPrev = 2, kSqrt = 3 };

struct ReducePlan {
  int tx, ty;       // block shape
  int64_t seg;      // rows per block
  int64_t tiles;    // column tiles: ceil(j / tx)
};

ReducePlan reduce_plan(int64_t j) {
  int tx = 1;
  while (tx < 32 && tx < j) tx *= 2;
  const int ty = kThreads / tx;
  return {tx, ty, static_cast<int64_t>(ty) * kRowsPerThread, (j + tx - 1) / tx};
}

// in [b, rows, j] -> out [b, ceil(rows / seg), j] (segment sums), or, when rows <= seg, the
// epilogue on the single segment: out[p, i] = sum (kSum), prev[p, i] + sum into out2 as well as
// sum into out (kSumPlusPrev), or out[p] = sqrt(sum) (kSqrt, j == 1).
__global__ void column_sum_kernel(const double* __restrict__ in, int64_t b, int64_t rows,
                                  int64_t j, int64_t seg, int64_t tiles, int64_t nseg,
                                  Epilogue epi, double* __restrict__ out,
                                  const double* __restrict__ prev, double* __restrict__ out2) {
  __shared__ double sm[kThreads];
  const int x = threadIdx.x, y = threadIdx.y, tx = blockDim.x, ty = blockDim.y;
  const int64_t nblocks = b * nseg * tiles;
  for (int64_t blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {  // uniform over the block
    const int64_t tile = blk % tiles, s = (blk / tiles) % nseg, p = blk / (tiles * nseg);
    const int64_t i = tile * tx + x;
    double acc = 0.0;
    if (i < j) {
      const double* col = in + p * rows * j + i;
      const int64_t r0 = s * seg + y;
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) {
        const int64_t r = r0 + static_cast<int64_t>(u) * ty;
        if (r < rows) acc += col[r * j];
      }
    }
    sm[y * tx + x] = acc;
    __syncthreads();
    for (int off = ty / 2; off > 0; off /= 2) {
      if (y < off) sm[y * tx + x] += sm[(y + off) * tx + x];
      __syncthreads();
    }
    if (y == 0 && i < j) {
      const double total = sm[x];
      switch (epi) {
        case Epilogue::kSegment: out[(p * nseg + s) * j + i] = total; break;
        case Epilogue::kSum: out[p * j + i] = total; break;
        case Epilogue::kSumPlusPrev:
          out[p * j + i] = total;
          out2[p * j + i] = prev[p * j + i] + total;
          break;
        case Epilogue::kSqrt: out[p] = sqrt(total); break;
      }
    }
    __syncthreads();  // sm is reused by the next block of the grid-stride loop
  }
}

// Column sums of part [b, rows, j] with the epilogue `epi` (see column_sum_kernel), through as
// many segment stages as needed; bufA / bufB hold at least b * stage_rows(1) * j and
// b * stage_rows(2) * j doubles (reduce_scratch).
void column_sums(const double* part, int64_t b, int64_t rows, int64_t j, Epilogue epi,
                 double* out, const double* prev, double* out2, double* bufA, double* bufB,
                 cudaStream_t stream) {
  const ReducePlan plan = reduce_plan(j);
  const dim3 block(plan.tx, plan.ty);
  const double* in = part;
  double* bufs[2] = {bufA, bufB};
  int next = 0;
  while (true) {
    const int64_t nseg = (rows + plan.seg - 1) / plan.seg;
    const bool last = nseg <= 1;
    const int64_t nblocks = b * std::max<int64_t>(nseg, 1) * plan.tiles;
    const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(nblocks, 1 << 20));
    double* dst = last ? out : bufs[next];
    column_sum_kernel<<<grid, block, 0, stream>>>(in, b, rows, j, plan.seg, plan.tiles,
                                                  std::max<int64_t>(nseg, 1),
                                                  last ? epi : Epilogue::kSegment, dst, prev,
                                                  out2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (last) return;
    in = dst;
    rows = nseg;
    next ^= 1;
  }
}

// Sizes (in rows) of the two ping-pong buffers column_sums needs for `rows` rows and j columns.
std::pair<int64_t, int64_t> reduce_scratch(int64_t rows, int64_t j) {
  const int64_t seg = reduce_plan(j).seg;
  const int64_t s1 = (rows + seg - 1) / seg;
  const int64_t s2 = (s1 + seg - 1) / seg;
  return {s1 > 1 ? s1 : 0, s2 > 1 ? s2 : 0};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_reorth_cuda(const at::Tensor& w,
                                                                   const at::Tensor& basis,
                                                                   const std::optional<at::Tensor>& h) {
  check_lanczos_reorth(w, basis, h);
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
  at::Tensor w1 = h.has_value() ? at::Tensor() : at::empty({b, n}, dopt);   // pass 2's float64 scratch
  auto npart = at::empty({b, nch}, dopt);
  // Ping-pong buffers of the multi-stage reductions (empty when one stage suffices).
  const auto hs = reduce_scratch(nch, j), ns = reduce_scratch(nch, 1);
  auto bufA = at::empty({b * std::max(hs.first * j, ns.first)}, dopt);
  auto bufB = at::empty({b * std::max(hs.second * j, ns.second)}, dopt);
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
    double* ap = bufA.data_ptr<double>();
    double* bp = bufB.data_ptr<double>();
    const unsigned int blocks = static_cast<unsigned int>(b * nch);

    if (h.has_value()) {   // the sweep mode: one pass, V w into coeffs
      const at::Tensor hc = h->contiguous();
      if (blocks > 0) {
        sweep_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, vp, sb, sj, j, n, nch, hc.data_ptr<double>(),
                                                                op, partp, npart.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (j > 0) column_sums(partp, b, nch, j, Epilogue::kSum, cp, nullptr, nullptr, ap, bp, stream);
      column_sums(npart.data_ptr<double>(), b, nch, 1, Epilogue::kSqrt, norm.data_ptr<double>(),
                  nullptr, nullptr, ap, bp, stream);
      return;
    }
    // Pass 1: h1 = V w.
    if (blocks > 0) {
      pass1_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, vp, sb, sj, j, n, nch, partp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (j > 0) column_sums(partp, b, nch, j, Epilogue::kSum, h1p, nullptr, nullptr, ap, bp, stream);
    // Pass 2: w1 = w - V^T h1 and the partials of h2 = V w1.
    if (blocks > 0) {
      pass2_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, vp, sb, sj, j, n, nch, h1p,
                                                               w1.data_ptr<double>(), partp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (j > 0) column_sums(partp, b, nch, j, Epilogue::kSumPlusPrev, h2p, h1p, cp, ap, bp, stream);
    // Pass 3: w_orth = w1 - V^T h2 and the partials of its squared norm.
    if (blocks > 0) {
      pass3_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          vp, sb, sj, j, n, nch, h2p, w1.data_ptr<double>(), op, npart.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    column_sums(npart.data_ptr<double>(), b, nch, 1, Epilogue::kSqrt, norm.data_ptr<double>(),
                nullptr, nullptr, ap, bp, stream);
  });
  return {out, coeffs, norm};
}

TORCH_LIBRARY_IMPL(resgeom_fast, CUDA, m) {
  m.impl("lanczos_reorth", &lanczos_reorth_cuda);
}

}  // namespace ops
}  // namespace resgeom_fast
