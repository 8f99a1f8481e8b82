// CUDA kernel of resgeom_fast::tridiag_eigh: implicit QL, first eigenvector row only.
//
// One thread per problem runs the CPU kernel's algorithm in float64 on global scratch buffers
// laid out [m, b] (element i of problem p at i * b + p), so that neighbouring threads touch
// neighbouring addresses. Non-finite input and non-convergence are recorded in a per-problem
// status (0 ok, 1 non-finite, 2 not converged) that is copied back and reported exactly like
// the CPU kernel does.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "ops/tridiag_eigh.h"

namespace resgeom_fast {
namespace ops {

namespace {

constexpr int kThreads = 128;

// Diagonalises one tridiagonal in place; element i of each array lives at index i * s.
// d (diagonal, becomes the eigenvalues), e (e[i] couples i and i+1; e[m-1] = 0 on entry),
// z (row 0 of the eigenvector matrix, e_1 on entry). Returns false if an eigenvalue needed more
// than max_sweeps sweeps. Line for line the CPU kernel's tql_first_row.
__device__ bool tql_first_row_strided(double* d, double* e, double* z, int64_t m, int64_t s,
                                      int max_sweeps) {
#define D(i) d[(i) * s]
#define E(i) e[(i) * s]
#define Z(i) z[(i) * s]
  for (int64_t l = 0; l < m; ++l) {
    int iter = 0;
    int64_t mm;
    do {
      for (mm = l; mm < m - 1; ++mm) {
        const double dd = fabs(D(mm)) + fabs(D(mm + 1));
        if (fabs(E(mm)) + dd == dd) break;
      }
      if (mm != l) {
        if (iter++ == max_sweeps) return false;
        double g = (D(l + 1) - D(l)) / (2.0 * E(l));
        double r = hypot(g, 1.0);
        g = D(mm) - D(l) + E(l) / (g + copysign(r, g));
        double sn = 1.0, c = 1.0, p = 0.0;
        int64_t i;
        for (i = mm - 1; i >= l; --i) {
          double f = sn * E(i);
          const double bb = c * E(i);
          r = hypot(f, g);
          E(i + 1) = r;
          if (r == 0.0) {
            D(i + 1) -= p;
            E(mm) = 0.0;
            break;
          }
          sn = f / r;
          c = g / r;
          g = D(i + 1) - p;
          r = (D(i) - g) * sn + 2.0 * c * bb;
          p = sn * r;
          D(i + 1) = g + p;
          g = c * r - bb;
          f = Z(i + 1);
          Z(i + 1) = sn * Z(i) + c * f;
          Z(i) = c * Z(i) - sn * f;
        }
        if (r == 0.0 && i >= l) continue;
        D(l) -= p;
        E(l) = g;
        E(mm) = 0.0;
      }
    } while (mm != l);
  }
  return true;
#undef D
#undef E
#undef Z
}

// Sorts eigenvalues ascending, carrying the weights (insertion sort, as on the CPU).
__device__ void sort_pairs_strided(double* d, double* w, int64_t m, int64_t s) {
  for (int64_t i = 1; i < m; ++i) {
    const double di = d[i * s], wi = w[i * s];
    int64_t jj = i - 1;
    while (jj >= 0 && d[jj * s] > di) {
      d[(jj + 1) * s] = d[jj * s];
      w[(jj + 1) * s] = w[jj * s];
      --jj;
    }
    d[(jj + 1) * s] = di;
    w[(jj + 1) * s] = wi;
  }
}

// One thread per problem (grid-stride over b). dp [b, m], ep [b, m-1], np / wp [b, m];
// scratch d, e, z [m, b] float64; status [b].
template <typename scalar_t>
__global__ void tridiag_eigh_kernel(const scalar_t* __restrict__ dp, const scalar_t* __restrict__ ep,
                                    scalar_t* __restrict__ np, scalar_t* __restrict__ wp,
                                    double* __restrict__ d, double* __restrict__ e,
                                    double* __restrict__ z, int8_t* __restrict__ status, int64_t b,
                                    int64_t m, int max_sweeps) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < b;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double* dd = d + p;
    double* ee = e + p;
    double* zz = z + p;
    bool finite = true;
    for (int64_t i = 0; i < m; ++i) {
      dd[i * b] = static_cast<double>(dp[p * m + i]);
      ee[i * b] = i + 1 < m ? static_cast<double>(ep[p * (m - 1) + i]) : 0.0;
      zz[i * b] = i == 0 ? 1.0 : 0.0;
      finite = finite && isfinite(dd[i * b]) && isfinite(ee[i * b]);
    }
    const bool ok = finite && tql_first_row_strided(dd, ee, zz, m, b, max_sweeps);
    status[p] = finite ? (ok ? 0 : 2) : 1;
    for (int64_t i = 0; i < m; ++i) zz[i * b] *= zz[i * b];
    if (ok) sort_pairs_strided(dd, zz, m, b);
    for (int64_t i = 0; i < m; ++i) {
      np[p * m + i] = static_cast<scalar_t>(ok ? dd[i * b] : NAN);
      wp[p * m + i] = static_cast<scalar_t>(ok ? zz[i * b] : NAN);
    }
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

  auto dopt = dc.options().dtype(at::kDouble);
  auto d = at::empty({m, b}, dopt);
  auto e = at::empty({m, b}, dopt);
  auto z = at::empty({m, b}, dopt);
  auto status = at::empty({b}, dc.options().dtype(at::kChar));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks64 = std::min<int64_t>((b + kThreads - 1) / kThreads, 1 << 20);
  const unsigned int blocks = static_cast<unsigned int>(blocks64);
  AT_DISPATCH_FLOATING_TYPES(dc.scalar_type(), "tridiag_eigh_cuda", [&] {
    tridiag_eigh_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        dc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(), nodes.data_ptr<scalar_t>(),
        weights.data_ptr<scalar_t>(), d.data_ptr<double>(), e.data_ptr<double>(),
        z.data_ptr<double>(), status.data_ptr<int8_t>(), b, m, kTridiagMaxSweeps);
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
