// CUDA kernel of resgeom_fast::orthonormalize: shifted Cholesky QR three times, in float64.
//
// The CPU kernel's algorithm, run for all b problems together on a float64 copy X [b, n, k] whose
// columns are scaled by powers of two as on the CPU:
// each pass computes the Gram matrices G = X^T X (cuBLAS batched GEMM through at::bmm; only the
// upper triangle and the diagonal are read afterwards), replaces exactly zero columns by the same
// splitmix64 values as the CPU (then recomputes G), factors G (+ shift) = R^T R with one thread
// block per problem, and solves X <- X R^{-1} by tiles of rows staged in shared memory (coalesced
// loads and stores, one thread per row; solve_tiles_kernel). Per-problem state (passes
// left, active this pass) lives on the device; the host reads back two counters per pass (any
// column refilled, any problem still active) to decide whether to recompute G and whether to
// stop, so the number of passes matches the CPU kernel problem by problem.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/all.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/amin.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "ops/orthonormalize.h"

namespace resgeom_fast {
namespace ops {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxPasses = 8;       // as the CPU kernel's pass loop
constexpr int kMaxShiftTries = 2000;  // guard: 10^2000 overflows any shift to inf long before

// Fixed pseudo-random value in [-1, 1) (splitmix64): the CPU kernel's fill_value.
__device__ __forceinline__ double fill_value(uint64_t key) {
  uint64_t z = key + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

unsigned int grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, 1 << 20));
}

// One thread per problem, at the start of a pass (after G is computed): marks the problem active
// for this pass, and flags its columns whose squared norm is zero relative to the largest (the
// CPU's refill_zero_columns rule). A problem with flagged columns gets at least two more passes
// and is counted in *refilled.
__global__ void flag_zero_columns_kernel(const double* __restrict__ G, int64_t b, int64_t k,
                                         int* __restrict__ left, uint8_t* __restrict__ act,
                                         uint8_t* __restrict__ colflag, int* __restrict__ refilled) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < b;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool active = left[p] > 0;
    act[p] = active ? 1 : 0;
    if (!active) continue;
    const double* Gp = G + p * k * k;
    double maxd = 0.0;
    for (int64_t c = 0; c < k; ++c) maxd = fmax(maxd, Gp[c * k + c]);
    int64_t count = 0;
    for (int64_t c = 0; c < k; ++c) {
      const bool zero = Gp[c * k + c] <= 1e-30 * maxd || !(maxd > 0.0);
      colflag[p * k + c] = zero ? 1 : 0;
      count += zero ? 1 : 0;
    }
    if (count > 0) {
      left[p] = max(left[p], 2);  // the refilled columns need two clean passes
      atomicAdd(refilled, 1);      // an int count: order does not matter
    }
  }
}

// One thread per row (p, t): overwrites the flagged columns of active problems with the fill.
__global__ void refill_kernel(double* __restrict__ X, int64_t b, int64_t n, int64_t k,
                              const uint8_t* __restrict__ act, const uint8_t* __restrict__ colflag,
                              uint64_t salt) {
  const int64_t total = b * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = idx / n, t = idx % n;
    if (!act[p]) continue;
    double* x = X + idx * k;
    for (int64_t c = 0; c < k; ++c) {
      if (colflag[p * k + c])
        x[c] = fill_value((salt * 0x100000001B3ull) ^ (static_cast<uint64_t>(t) * k + c));
    }
  }
}

// Upper Cholesky factor of Gp + shift I into Rp (row-major k x k, upper triangle; the lower
// triangle is left unspecified), by the whole block. Same arithmetic order as the CPU kernel's
// cholesky_upper. Returns false (in every thread) if a pivot is not positive.
__device__ bool block_cholesky(const double* __restrict__ Gp, double* __restrict__ Rp, int64_t k,
                               double shift) {
  __shared__ double s_r;
  __shared__ int s_ok;
  for (int64_t a = 0; a < k; ++a)
    for (int64_t c = a + threadIdx.x; c < k; c += blockDim.x)
      Rp[a * k + c] = c == a ? Gp[a * k + c] + shift : Gp[a * k + c];
  __syncthreads();
  for (int64_t a = 0; a < k; ++a) {
    if (threadIdx.x == 0) {
      double d = Rp[a * k + a];
      for (int64_t q = 0; q < a; ++q) d -= Rp[q * k + a] * Rp[q * k + a];
      const bool ok = d > 0.0;
      if (ok) {
        const double r = sqrt(d);
        Rp[a * k + a] = r;
        s_r = r;
      }
      s_ok = ok ? 1 : 0;
    }
    __syncthreads();
    if (!s_ok) {
      __syncthreads();  // every thread has read s_ok before thread 0 may write it again
      return false;
    }
    const double r = s_r;
    for (int64_t c = a + 1 + threadIdx.x; c < k; c += blockDim.x) {
      double s = Rp[a * k + c];
      for (int64_t q = 0; q < a; ++q) s -= Rp[q * k + a] * Rp[q * k + c];
      Rp[a * k + c] = s / r;
    }
    __syncthreads();
  }
  return true;
}

// One block per problem: R from G as the CPU pass does (shifted on the first pass, or when the
// plain factorisation fails, the shift growing tenfold until it succeeds); then one pass used.
__global__ void cholesky_kernel(const double* __restrict__ G, double* __restrict__ R, int64_t k,
                                int* __restrict__ left, const uint8_t* __restrict__ act,
                                double shift_factor, int pass, int* __restrict__ still_active) {
  __shared__ double s_trace;
  const int64_t p = blockIdx.x;
  if (!act[p]) return;  // uniform over the block
  const double* Gp = G + p * k * k;
  double* Rp = R + p * k * k;
  if (threadIdx.x == 0) {
    double trace = 0.0;
    for (int64_t c = 0; c < k; ++c) trace += Gp[c * k + c];
    s_trace = trace;
  }
  __syncthreads();
  bool ok = pass == 0 ? false : block_cholesky(Gp, Rp, k, 0.0);
  if (!ok) {
    // cholqr_shift(n, k, trace) == shift_factor * trace exactly (shift_factor is its value at
    // trace = 1, and the product is evaluated left to right).
    double shift = shift_factor * s_trace;
    for (int tries = 0; tries < kMaxShiftTries; ++tries) {
      if (block_cholesky(Gp, Rp, k, shift)) break;
      shift *= 10.0;
    }
  }
  if (threadIdx.x == 0) {
    left[p] -= 1;
    if (left[p] > 0) atomicAdd(still_active, 1);
  }
}

// One thread per row (p, t) of active problems: x <- x R^{-1} (forward substitution). Used only
// when a tile of 32 rows does not fit in shared memory (k > kMaxTileStride); its loads are
// strided by k (uncoalesced).
__global__ void solve_rows_kernel(double* __restrict__ X, const double* __restrict__ R, int64_t b,
                                  int64_t n, int64_t k, const uint8_t* __restrict__ act) {
  const int64_t total = b * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = idx / n;
    if (!act[p]) continue;
    const double* Rp = R + p * k * k;
    double* x = X + idx * k;
    for (int64_t c = 0; c < k; ++c) {
      double s = x[c];
      for (int64_t a = 0; a < c; ++a) s -= x[a] * Rp[a * k + c];
      x[c] = s / Rp[c * k + c];
    }
  }
}

// Tiled solve x <- x R^{-1}: a block owns a tile of `tile` consecutive rows of one problem (one
// thread per row). The tile is a contiguous run of tile * k doubles of X: it is loaded into
// shared memory and stored back by the whole block with consecutive threads on consecutive
// addresses (coalesced), at a row stride ks = k | 1 (odd, so the per-row accesses of a warp hit
// distinct banks). Each thread then runs the forward substitution of its row in shared memory in
// the CPU kernel's order (s = x_c - sum_{a < c} x_a R[a, c] in increasing a, then / R[c, c]);
// R is read through the read-only cache, every thread of a warp at the same address (broadcast).
constexpr int64_t kTileBytes = 48 * 1024;                    // static shared-memory limit
constexpr int64_t kMaxTileStride = kTileBytes / (32 * 8);    // 192: 32 rows still fit

struct SolvePlan {
  int64_t ks;     // row stride in shared memory (odd)
  int64_t tile;   // rows per block (a multiple of 32, <= 256), 0: use solve_rows_kernel
};

SolvePlan solve_plan(int64_t k) {
  const int64_t ks = k | 1;
  if (ks > kMaxTileStride) return {ks, 0};
  const int64_t rows = kTileBytes / (ks * 8);
  return {ks, std::min<int64_t>(256, rows / 32 * 32)};
}

__global__ void solve_tiles_kernel(double* __restrict__ X, const double* __restrict__ R, int64_t b,
                                   int64_t n, int64_t k, int64_t ks, int64_t tile,
                                   const uint8_t* __restrict__ act) {
  extern __shared__ double xs[];  // [tile, ks]
  const int64_t tiles = (n + tile - 1) / tile;
  const int64_t nblocks = b * tiles;
  const unsigned int tid = threadIdx.x, nthr = blockDim.x;  // nthr == tile
  const unsigned int uk = static_cast<unsigned int>(k), uks = static_cast<unsigned int>(ks);
  for (int64_t blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {  // uniform over the block
    const int64_t p = blk / tiles, t0 = (blk % tiles) * tile;
    if (!act[p]) continue;
    const unsigned int rows = static_cast<unsigned int>(n - t0 < tile ? n - t0 : tile);
    const unsigned int len = rows * uk;  // <= 6144
    double* Xt = X + (p * n + t0) * k;
    for (unsigned int e = tid; e < len; e += nthr) xs[(e / uk) * uks + e % uk] = Xt[e];
    __syncthreads();
    if (tid < rows) {
      const double* Rp = R + p * k * k;
      double* x = xs + tid * uks;
      for (unsigned int c = 0; c < uk; ++c) {
        double s = x[c];
        for (unsigned int a = 0; a < c; ++a) s -= x[a] * __ldg(Rp + a * uk + c);
        x[c] = s / __ldg(Rp + c * uk + c);
      }
    }
    __syncthreads();
    for (unsigned int e = tid; e < len; e += nthr) Xt[e] = xs[(e / uk) * uks + e % uk];
    __syncthreads();  // xs is reused by the next tile of the grid-stride loop
  }
}

// One thread per column (p, c): the power-of-two factors f1, f2 of the column from its largest
// absolute entry (the CPU kernel's scale_columns), into f [b, k, 2].
__global__ void column_factors_kernel(const double* __restrict__ colmax, int64_t bk,
                                      double* __restrict__ f) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < bk;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    column_scale_factors(colmax[i], f + 2 * i, f + 2 * i + 1);
}

// X = (x * f1) * f2 in float64 (the CPU kernel's scale_columns, bit for bit). Problems on
// blockIdx.y (stride gridDim.y), the n * k entries of a problem on x (grid-stride); the column of
// entry e is e mod k by ATen's 32-bit IntDivider when n * k <= 2^31 - 1 (index_t = uint32_t),
// else by int64 division (index_t = int64_t).
template <typename scalar_t, typename index_t>
__global__ void scale_columns_kernel(const scalar_t* __restrict__ x, double* __restrict__ X,
                                     const double* __restrict__ f, int64_t b, index_t nk,
                                     at::cuda::detail::IntDivider<index_t> by_k) {
  const index_t e0 = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t estep = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.y; p < b; p += gridDim.y) {
    const scalar_t* xp = x + p * static_cast<int64_t>(nk);
    double* Xp = X + p * static_cast<int64_t>(nk);
    const double* fp = f + 2 * p * static_cast<int64_t>(by_k.divisor);
    for (index_t e = e0; e < nk; e += estep) {
      const index_t c = by_k.mod(e);
      Xp[e] = static_cast<double>(xp[e]) * fp[2 * c] * fp[2 * c + 1];
    }
  }
}

template <typename scalar_t, typename index_t>
void launch_scale_columns(const at::Tensor& xc, at::Tensor& X, const at::Tensor& f,
                          cudaStream_t stream) {
  const int64_t b = xc.size(0), nk = xc.size(1) * xc.size(2);
  const int64_t grid_y = std::min<int64_t>(b, 65535);
  const int64_t want_x = std::max<int64_t>(1, ((int64_t{1} << 16) + grid_y - 1) / grid_y);
  // grid_x * kThreads <= 2^31 keeps the 32-bit entry stride from wrapping.
  const int64_t grid_x =
      std::min<int64_t>({(nk + kThreads - 1) / kThreads, want_x, (int64_t{1} << 31) / kThreads});
  const dim3 grid(static_cast<unsigned int>(grid_x), static_cast<unsigned int>(grid_y));
  scale_columns_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
      xc.data_ptr<scalar_t>(), X.data_ptr<double>(), f.data_ptr<double>(), b,
      static_cast<index_t>(nk), at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(xc.size(2))));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int read_counter(const int* dev, cudaStream_t stream) {
  int host = 0;
  C10_CUDA_CHECK(cudaMemcpyAsync(&host, dev, sizeof(int), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

}  // namespace

at::Tensor orthonormalize_cuda(const at::Tensor& x) {
  check_orthonormalize(x);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda());
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  if (xc.numel() == 0) return at::empty_like(xc);
  TORCH_CHECK(at::isfinite(xc).all().item<bool>(),
              "orthonormalize: expected x with finite entries, got NaN or infinity");
  const int64_t b = xc.size(0), n = xc.size(1), k = xc.size(2);
  TORCH_CHECK(b <= std::numeric_limits<int32_t>::max(),
              "orthonormalize: expected at most 2^31 - 1 blocks, got b = ", b);

  // Working copy in float64 (always a fresh buffer: X is modified in place), each column scaled
  // by a power of two to a largest absolute entry in [0.5, 1) (see the CPU kernel's
  // scale_columns: keeps the Gram matrix finite and nonzero for entries up to 1.8e308 and down to
  // subnormals; exact; the Q is unchanged). Column maxima from two ATen reductions, no sync.
  auto colmax = at::maximum(at::amax(xc, {1}), at::neg(at::amin(xc, {1})))
                    .to(at::kDouble)
                    .contiguous();  // [b, k]
  auto X = at::empty({b, n, k}, xc.options().dtype(at::kDouble));
  {
    cudaStream_t s0 = c10::cuda::getCurrentCUDAStream();
    auto factors = at::empty({b, k, 2}, X.options());
    column_factors_kernel<<<grid_for(b * k, kThreads), kThreads, 0, s0>>>(
        colmax.data_ptr<double>(), b * k, factors.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "orthonormalize_scale_columns", [&] {
      if (n * k <= std::numeric_limits<int32_t>::max()) {
        launch_scale_columns<scalar_t, uint32_t>(xc, X, factors, s0);
      } else {
        launch_scale_columns<scalar_t, int64_t>(xc, X, factors, s0);
      }
    });
  }
  auto iopt = xc.options().dtype(at::kInt);
  auto bopt = xc.options().dtype(at::kByte);
  auto left = at::full({b}, 3, iopt);
  auto act = at::empty({b}, bopt);
  auto colflag = at::empty({b, k}, bopt);
  auto counters = at::zeros({2 * kMaxPasses}, iopt);  // [refilled, still active] per pass
  auto R = at::empty({b, k, k}, X.options());
  const double shift_factor = cholqr_shift(n, k, 1.0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int chol_threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (k + 31) / 32 * 32)));

  double* Xp = X.data_ptr<double>();
  double* Rp = R.data_ptr<double>();
  int* leftp = left.data_ptr<int>();
  uint8_t* actp = act.data_ptr<uint8_t>();
  uint8_t* flagp = colflag.data_ptr<uint8_t>();
  int* cnt = counters.data_ptr<int>();
  auto Xt = X.transpose(1, 2);
  const SolvePlan plan = solve_plan(k);
  const unsigned int solve_grid = plan.tile > 0
      ? static_cast<unsigned int>(std::min<int64_t>(b * ((n + plan.tile - 1) / plan.tile), 1 << 20))
      : 0u;

  for (int pass = 0; pass < kMaxPasses; ++pass) {
    auto G = at::bmm(Xt, X).contiguous();  // [b, k, k]
    flag_zero_columns_kernel<<<grid_for(b, kThreads), kThreads, 0, stream>>>(
        G.data_ptr<double>(), b, k, leftp, actp, flagp, cnt + 2 * pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (read_counter(cnt + 2 * pass, stream) > 0) {
      refill_kernel<<<grid_for(b * n, kThreads), kThreads, 0, stream>>>(
          Xp, b, n, k, actp, flagp, static_cast<uint64_t>(pass + 1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // Problems without refilled columns get the same G again.
      G = at::bmm(Xt, X).contiguous();
    }
    cholesky_kernel<<<static_cast<unsigned int>(b), chol_threads, 0, stream>>>(
        G.data_ptr<double>(), Rp, k, leftp, actp, shift_factor, pass, cnt + 2 * pass + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.tile > 0) {
      solve_tiles_kernel<<<solve_grid, static_cast<unsigned int>(plan.tile),
                           static_cast<size_t>(plan.tile * plan.ks) * sizeof(double), stream>>>(
          Xp, Rp, b, n, k, plan.ks, plan.tile, actp);
    } else {
      solve_rows_kernel<<<grid_for(b * n, kThreads), kThreads, 0, stream>>>(Xp, Rp, b, n, k, actp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Every problem does at least three passes; from then on stop once none has passes left.
    if (pass >= 2 && read_counter(cnt + 2 * pass + 1, stream) == 0) break;
  }
  return X.to(xc.scalar_type());
}

TORCH_LIBRARY_IMPL(resgeom_fast, CUDA, m) {
  m.impl("orthonormalize", &orthonormalize_cuda);
}

}  // namespace ops
}  // namespace resgeom_fast
