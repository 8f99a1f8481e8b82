// CUDA kernel of resgeom_fast::tridiag_eigh: implicit QL, first eigenvector row only.
//
// Implicit QL is a chain of dependent rotations: one problem cannot be spread over many threads,
// and a GPU thread runs that chain several times slower than a CPU core (fp64 latency, slow
// hypot/division, no out-of-order execution). Two paths, chosen by the batch size alone:
//
// * b <= kTridiagHostMaxProblems (32; the ~10 probes of an SLQ run): the CPU kernel, through the
//   dispatcher, on host copies of diag/offdiag (a few KB each way). The op synchronises in any
//   case (its status must reach the host to raise), so this adds two small copies and runs the
//   problems in parallel on the host threads at CPU speed; the results are the CPU kernel's,
//   bit for bit. Estimate for m = 100 (~8500 rotations per problem): ~0.3 ms per problem on a
//   CPU core against ~1.5-3 ms for one GPU lane, so the host wins while b / host threads is small.
// * larger batches: one warp per problem (one problem per 32-thread block, grid-stride), its
//   d, e, z in shared memory (global scratch [b, 3, m] only when 3 m doubles exceed 48 KB). The
//   warp loads, checks (finite), squares and stores in parallel, and finds each sweep's end
//   (the first negligible e[mm]) with a ballot over 32 candidates at a time; lane 0 runs the
//   rotations and the insertion sort in the CPU kernel's order. One problem per warp also keeps
//   problems with different sweep counts from serialising each other (the old one-thread-per-
//   problem kernel ran up to 32 divergent problems in one warp, from global scratch).
// Non-finite input and non-convergence are recorded in a per-problem status (0 ok, 1 non-finite,
// 2 not converged) that is copied back and reported exactly like the CPU kernel does.
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
#include <tuple>

#include "ops/tridiag_eigh.h"

namespace resgeom_fast {
namespace ops {

namespace {

constexpr int kTridiagHostMaxProblems = 32;   // batches up to this size run on the host
constexpr unsigned int kFullMask = 0xffffffffu;
constexpr int64_t kSharedScratchBytes = 48 * 1024;  // d, e, z of one problem in shared memory

// One QL sweep on l..mm by the calling thread (lane 0): line for line the body of the CPU
// kernel's tql_first_row loop after the test for mm (d, e, z as there, contiguous).
__device__ void ql_sweep(double* d, double* e, double* z, int64_t l, int64_t mm) {
  double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
  double r = hypot(g, 1.0);
  g = d[mm] - d[l] + e[l] / (g + copysign(r, g));
  double sn = 1.0, c = 1.0, p = 0.0;
  int64_t i;
  for (i = mm - 1; i >= l; --i) {
    double f = sn * e[i];
    const double bb = c * e[i];
    r = hypot(f, g);
    e[i + 1] = r;
    if (r == 0.0) {
      d[i + 1] -= p;
      e[mm] = 0.0;
      break;
    }
    sn = f / r;
    c = g / r;
    g = d[i + 1] - p;
    r = (d[i] - g) * sn + 2.0 * c * bb;
    p = sn * r;
    d[i + 1] = g + p;
    g = c * r - bb;
    f = z[i + 1];
    z[i + 1] = sn * z[i] + c * f;
    z[i] = c * z[i] - sn * f;
  }
  if (r == 0.0 && i >= l) return;  // the CPU kernel's `continue`: rescan from l
  d[l] -= p;
  e[l] = g;
  e[mm] = 0.0;
}

// The CPU kernel's tql_first_row, run by a whole warp (every lane calls it; control flow is
// uniform). The scan for mm (the first index >= l with |e[mm]| + dd == dd, else m - 1) tests 32
// candidates per ballot; lane 0 runs the sweeps. Returns false (in every lane) if an eigenvalue
// needed more than max_sweeps sweeps.
__device__ bool warp_tql_first_row(double* d, double* e, double* z, int64_t m, int max_sweeps) {
  const int lane = threadIdx.x % 32;
  for (int64_t l = 0; l < m; ++l) {
    int iter = 0;
    while (true) {
      int64_t mm = m - 1;
      for (int64_t base = l; base < m - 1; base += 32) {
        const int64_t idx = base + lane;
        bool hit = false;
        if (idx < m - 1) {
          const double dd = fabs(d[idx]) + fabs(d[idx + 1]);
          hit = fabs(e[idx]) + dd == dd;
        }
        const unsigned int ballot = __ballot_sync(kFullMask, hit);
        if (ballot != 0u) {
          mm = base + __ffs(static_cast<int>(ballot)) - 1;
          break;
        }
      }
      if (mm == l) break;
      if (iter++ == max_sweeps) return false;
      if (lane == 0) ql_sweep(d, e, z, l, mm);
      __syncwarp();  // lane 0's writes are visible to the warp's next scan
    }
  }
  return true;
}

// Sorts eigenvalues ascending, carrying the weights (insertion sort, as on the CPU).
__device__ void sort_pairs(double* d, double* w, int64_t m) {
  for (int64_t i = 1; i < m; ++i) {
    const double di = d[i], wi = w[i];
    int64_t jj = i - 1;
    while (jj >= 0 && d[jj] > di) {
      d[jj + 1] = d[jj];
      w[jj + 1] = w[jj];
      --jj;
    }
    d[jj + 1] = di;
    w[jj + 1] = wi;
  }
}

// One warp (= one block of 32 threads) per problem, grid-stride over b. dp [b, m], ep [b, m-1],
// np / wp [b, m]; scratch: dynamic shared memory [3, m] when shared, else gscratch [b, 3, m];
// status [b].
template <typename scalar_t>
__global__ void tridiag_eigh_warp_kernel(const scalar_t* __restrict__ dp,
                                         const scalar_t* __restrict__ ep, scalar_t* __restrict__ np,
                                         scalar_t* __restrict__ wp, double* __restrict__ gscratch,
                                         bool shared, int8_t* __restrict__ status, int64_t b,
                                         int64_t m, int max_sweeps) {
  extern __shared__ double sh[];
  const int lane = threadIdx.x;
  for (int64_t p = blockIdx.x; p < b; p += gridDim.x) {
    double* d = shared ? sh : gscratch + p * 3 * m;
    double* e = d + m;
    double* z = e + m;
    bool finite = true;
    for (int64_t i = lane; i < m; i += 32) {
      d[i] = static_cast<double>(dp[p * m + i]);
      e[i] = i + 1 < m ? static_cast<double>(ep[p * (m - 1) + i]) : 0.0;
      z[i] = i == 0 ? 1.0 : 0.0;
      finite = finite && isfinite(d[i]) && isfinite(e[i]);
    }
    finite = __all_sync(kFullMask, finite);
    __syncwarp();
    const bool ok = finite && warp_tql_first_row(d, e, z, m, max_sweeps);
    for (int64_t i = lane; i < m; i += 32) z[i] *= z[i];
    __syncwarp();
    if (ok && lane == 0) sort_pairs(d, z, m);
    __syncwarp();
    for (int64_t i = lane; i < m; i += 32) {
      np[p * m + i] = static_cast<scalar_t>(ok ? d[i] : NAN);
      wp[p * m + i] = static_cast<scalar_t>(ok ? z[i] : NAN);
    }
    if (lane == 0) status[p] = finite ? (ok ? 0 : 2) : 1;
    __syncwarp();  // every lane has read the scratch before the next problem overwrites it
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tridiag_eigh_cuda(const at::Tensor& diag,
                                                     const at::Tensor& offdiag) {
  check_tridiag_eigh(diag, offdiag);
  TORCH_INTERNAL_ASSERT(diag.device().is_cuda());
  c10::cuda::CUDAGuard guard(diag.device());
  auto dc = diag.contiguous();
  auto ec = offdiag.contiguous();
  auto nodes = at::empty_like(dc);
  auto weights = at::empty_like(dc);
  const int64_t b = dc.size(0), m = dc.size(1);
  if (b == 0 || m == 0) return {nodes, weights};

  if (b <= kTridiagHostMaxProblems) {
    // Small batch: the CPU kernel (see the top of the file), its results copied back.
    auto host = tridiag_eigh(dc.cpu(), ec.cpu());
    return {std::get<0>(host).to(dc.device()), std::get<1>(host).to(dc.device())};
  }

  const bool shared = 3 * m * static_cast<int64_t>(sizeof(double)) <= kSharedScratchBytes;
  auto gscratch = at::empty({shared ? 0 : b * 3 * m}, dc.options().dtype(at::kDouble));
  auto status = at::empty({b}, dc.options().dtype(at::kChar));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(b, 1 << 20));
  const size_t smem = shared ? static_cast<size_t>(3 * m) * sizeof(double) : 0;
  AT_DISPATCH_FLOATING_TYPES(dc.scalar_type(), "tridiag_eigh_cuda", [&] {
    tridiag_eigh_warp_kernel<scalar_t><<<blocks, 32, smem, stream>>>(
        dc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(), nodes.data_ptr<scalar_t>(),
        weights.data_ptr<scalar_t>(), gscratch.data_ptr<double>(), shared,
        status.data_ptr<int8_t>(), b, m, kTridiagMaxSweeps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Copying the status back synchronises with the kernel.
  auto status_host = status.cpu();
  const int8_t* st = status_host.data_ptr<int8_t>();
  for (int64_t p = 0; p < b; ++p) {
    TORCH_CHECK(st[p] != 1, "tridiag_eigh: expected finite diag and offdiag, got non-finite ",
                "values in problem ", p);
    TORCH_CHECK(st[p] != 2, "tridiag_eigh: implicit QL did not converge in ",
                kTridiagMaxSweeps, " sweeps for problem ", p);
  }
  return {nodes, weights};
}

TORCH_LIBRARY_IMPL(resgeom_fast, CUDA, m) {
  m.impl("tridiag_eigh", &tridiag_eigh_cuda);
}

}  // namespace ops
}  // namespace resgeom_fast
