// CPU kernel of resgeom_fast::tridiag_eigh: implicit QL, first eigenvector row only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "ops/tridiag_eigh.h"

namespace resgeom_fast {
namespace ops {

namespace {

// Diagonalises one tridiagonal in place: d[m] (diagonal, becomes the eigenvalues), e[m]
// (e[i] couples i and i+1; e[m-1] = 0 on entry), z[m] (row 0 of the eigenvector matrix, e_1 on
// entry). Returns false if an eigenvalue needed more than kTridiagMaxSweeps sweeps.
bool tql_first_row(double* d, double* e, double* z, int64_t m) {
  for (int64_t l = 0; l < m; ++l) {
    int iter = 0;
    int64_t mm;
    do {
      for (mm = l; mm < m - 1; ++mm) {
        const double dd = std::fabs(d[mm]) + std::fabs(d[mm + 1]);
        if (std::fabs(e[mm]) + dd == dd) break;
      }
      if (mm != l) {
        if (iter++ == kTridiagMaxSweeps) return false;
        double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
        double r = std::hypot(g, 1.0);
        g = d[mm] - d[l] + e[l] / (g + std::copysign(r, g));
        double s = 1.0, c = 1.0, p = 0.0;
        int64_t i;
        for (i = mm - 1; i >= l; --i) {
          double f = s * e[i];
          const double b = c * e[i];
          r = std::hypot(f, g);
          e[i + 1] = r;
          if (r == 0.0) {
            d[i + 1] -= p;
            e[mm] = 0.0;
            break;
          }
          s = f / r;
          c = g / r;
          g = d[i + 1] - p;
          r = (d[i] - g) * s + 2.0 * c * b;
          p = s * r;
          d[i + 1] = g + p;
          g = c * r - b;
          f = z[i + 1];
          z[i + 1] = s * z[i] + c * f;
          z[i] = c * z[i] - s * f;
        }
        if (r == 0.0 && i >= l) continue;
        d[l] -= p;
        e[l] = g;
        e[mm] = 0.0;
      }
    } while (mm != l);
  }
  return true;
}

// Sorts eigenvalues ascending, carrying the weights (insertion sort: m is small and the QL
// output is nearly sorted).
void sort_pairs(double* d, double* w, int64_t m) {
  for (int64_t i = 1; i < m; ++i) {
    const double di = d[i], wi = w[i];
    int64_t j = i - 1;
    while (j >= 0 && d[j] > di) {
      d[j + 1] = d[j];
      w[j + 1] = w[j];
      --j;
    }
    d[j + 1] = di;
    w[j + 1] = wi;
  }
}

template <typename scalar_t>
void tridiag_eigh_cpu_impl(const at::Tensor& diag, const at::Tensor& offdiag, at::Tensor& nodes,
                           at::Tensor& weights, std::vector<int8_t>& status) {
  const int64_t b = diag.size(0), m = diag.size(1);
  const scalar_t* dp = diag.data_ptr<scalar_t>();
  const scalar_t* ep = offdiag.data_ptr<scalar_t>();
  scalar_t* np = nodes.data_ptr<scalar_t>();
  scalar_t* wp = weights.data_ptr<scalar_t>();
  // Grain: about 8 m^2 flops per problem; keep tasks above ~1e5 flops.
  const int64_t grain = std::max<int64_t>(1, 12500 / std::max<int64_t>(m * m, 1));
  at::parallel_for(0, b, grain, [&](int64_t p0, int64_t p1) {
    std::vector<double> d(m), e(m), z(m);
    for (int64_t p = p0; p < p1; ++p) {
      bool finite = true;
      for (int64_t i = 0; i < m; ++i) {
        d[i] = static_cast<double>(dp[p * m + i]);
        e[i] = i + 1 < m ? static_cast<double>(ep[p * (m - 1) + i]) : 0.0;
        z[i] = i == 0 ? 1.0 : 0.0;
        finite = finite && std::isfinite(d[i]) && std::isfinite(e[i]);
      }
      bool ok = finite && tql_first_row(d.data(), e.data(), z.data(), m);
      status[p] = finite ? (ok ? 0 : 2) : 1;
      for (int64_t i = 0; i < m; ++i) z[i] *= z[i];
      if (ok) sort_pairs(d.data(), z.data(), m);
      for (int64_t i = 0; i < m; ++i) {
        np[p * m + i] = static_cast<scalar_t>(ok ? d[i] : NAN);
        wp[p * m + i] = static_cast<scalar_t>(ok ? z[i] : NAN);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tridiag_eigh_cpu(const at::Tensor& diag,
                                                    const at::Tensor& offdiag) {
  check_tridiag_eigh(diag, offdiag);
  TORCH_INTERNAL_ASSERT(diag.device().is_cpu());
  auto d = diag.contiguous();
  auto e = offdiag.contiguous();
  auto nodes = at::empty_like(d);
  auto weights = at::empty_like(d);
  std::vector<int8_t> status(d.size(0), 0);
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "tridiag_eigh_cpu", [&] {
    tridiag_eigh_cpu_impl<scalar_t>(d, e, nodes, weights, status);
  });
  for (size_t p = 0; p < status.size(); ++p) {
    TORCH_CHECK(status[p] != 1, "tridiag_eigh: expected finite diag and offdiag, got non-finite ",
                "values in problem ", p);
    TORCH_CHECK(status[p] != 2, "tridiag_eigh: implicit QL did not converge in ",
                kTridiagMaxSweeps, " sweeps for problem ", p);
  }
  return {nodes, weights};
}

TORCH_LIBRARY_IMPL(resgeom_fast, CPU, m) {
  m.impl("tridiag_eigh", &tridiag_eigh_cpu);
}

}  // namespace ops
}  // namespace resgeom_fast
