// C++ tests of resgeom_fast: every op called through its C++ entry point (declared in
// csrc/ops/<op>.h; it goes through the dispatcher), as a libtorch user would, and checked against
// answers known in closed form. Runs on the CPU, and on CUDA too when the library was built with
// RESGEOM_FAST_CUDA=ON and a GPU is visible. Returns non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "ops/density_smooth.h"
#include "ops/lanczos_reorth.h"
#include "ops/masked_scale.h"
#include "ops/orthonormalize.h"
#include "ops/tridiag_eigh.h"

#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

double max_abs(const at::Tensor& t) {
  return t.numel() == 0 ? 0.0 : t.abs().max().item<double>();
}

namespace rops = resgeom_fast::ops;

std::string tag(const char* name, const at::TensorOptions& opt) {
  return std::string(name) + " [" + std::string(opt.dtype().name()) + ", " +
         opt.device().str() + "]";
}

// The [-1, 2, -1] tridiagonal of size m has eigenvalues 2 - 2 cos(k pi / (m + 1)), k = 1..m, and
// eigenvector first components sqrt(2 / (m + 1)) sin(k pi / (m + 1)). Problem 1 adds 1 to the
// diagonal (eigenvalues + 1, same weights).
void test_tridiag_eigh(const at::TensorOptions& opt, double tol) {
  const int64_t m = 12, b = 2;
  auto diag = at::full({b, m}, 2.0, opt);
  diag[1].add_(1.0);
  auto off = at::full({b, m - 1}, -1.0, opt);
  auto [nodes, weights] = rops::tridiag_eigh(diag, off);
  check(nodes.sizes() == diag.sizes() && weights.sizes() == diag.sizes(),
        tag("tridiag_eigh shapes", opt));
  check(nodes.dtype() == opt.dtype(), tag("tridiag_eigh dtype", opt));
  auto k = at::arange(1, m + 1, opt.dtype(at::kDouble).device(at::kCPU));
  auto theta = k * (M_PI / (m + 1));
  auto expect_nodes = 2.0 - 2.0 * at::cos(theta);
  auto expect_w = at::sin(theta).pow(2) * (2.0 / (m + 1));
  auto nc = nodes.to(at::kCPU, at::kDouble), wc = weights.to(at::kCPU, at::kDouble);
  check(max_abs(nc[0] - expect_nodes) < tol, tag("tridiag_eigh nodes (problem 0)", opt));
  check(max_abs(nc[1] - (expect_nodes + 1.0)) < tol, tag("tridiag_eigh nodes (problem 1)", opt));
  check(max_abs(wc[0] - expect_w) < tol && max_abs(wc[1] - expect_w) < tol,
        tag("tridiag_eigh weights", opt));
  check(max_abs(wc.sum(1) - 1.0) < tol, tag("tridiag_eigh weights sum to 1", opt));

  // Empty batch and m = 0.
  auto [n0, w0] = rops::tridiag_eigh(at::empty({0, 5}, opt), at::empty({0, 4}, opt));
  check(n0.sizes() == at::IntArrayRef({0, 5}), tag("tridiag_eigh empty b", opt));
  auto [n1, w1] = rops::tridiag_eigh(at::empty({3, 0}, opt), at::empty({3, 0}, opt));
  check(n1.sizes() == at::IntArrayRef({3, 0}), tag("tridiag_eigh empty m", opt));

  // Non-finite input raises with the shared message.
  auto bad = diag.clone();
  bad[1][3] = std::nan("");
  bool raised = false;
  try {
    rops::tridiag_eigh(bad, off);
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("tridiag_eigh: expected finite diag and offdiag") !=
             std::string::npos &&
             std::string(e.what()).find("problem 1") != std::string::npos;
  }
  check(raised, tag("tridiag_eigh non-finite input raises", opt));
}

// w_orth is orthogonal to an orthonormal basis, coeffs = V w, norm = ||w_orth||,
// w_orth = w - V^T V w. The basis is a transposed (strided) view and a contiguous copy.
void test_lanczos_reorth(const at::TensorOptions& opt, double tol) {
  const int64_t b = 3, n = 2500, j = 7;  // n > 1024: several chunks on the GPU
  auto gen_opt = at::TensorOptions().dtype(at::kDouble);
  auto Q = std::get<0>(at::linalg_qr(at::randn({b, n, j}, gen_opt)));  // [b, n, j]
  auto w64 = at::randn({b, n}, gen_opt);
  auto Vt = Q.to(opt).transpose(1, 2);  // [b, j, n] view, stride(2) != 1
  auto w = w64.to(opt);
  auto V64 = Vt.to(at::kCPU, at::kDouble);
  auto wd = w.to(at::kCPU, at::kDouble);
  auto h = at::matmul(V64, wd.unsqueeze(-1)).squeeze(-1);                 // [b, j]
  auto expect = wd - at::matmul(V64.transpose(1, 2), h.unsqueeze(-1)).squeeze(-1);
  for (int variant = 0; variant < 2; ++variant) {
    auto basis = variant == 0 ? Vt : Vt.contiguous();
    auto [wo, coeffs, norm] = rops::lanczos_reorth(w, basis);
    std::string v = variant == 0 ? " (strided basis)" : " (contiguous basis)";
    check(wo.sizes() == w.sizes() && wo.dtype() == w.dtype(), tag("lanczos_reorth w_orth", opt) + v);
    check(coeffs.dtype() == at::kDouble && coeffs.sizes() == at::IntArrayRef({b, j}) &&
              norm.dtype() == at::kDouble && norm.sizes() == at::IntArrayRef({b}),
          tag("lanczos_reorth coeffs/norm shape and dtype", opt) + v);
    auto woc = wo.to(at::kCPU, at::kDouble);
    auto proj = at::matmul(V64, woc.unsqueeze(-1)).squeeze(-1);
    check(max_abs(proj) < tol * std::sqrt(double(n)), tag("lanczos_reorth orthogonal", opt) + v);
    check(max_abs(coeffs.cpu() - h) < tol * std::sqrt(double(n)),
          tag("lanczos_reorth coeffs", opt) + v);
    check(max_abs(woc - expect) < tol * 10, tag("lanczos_reorth w_orth value", opt) + v);
    check(max_abs(norm.cpu() - expect.pow(2).sum(1).sqrt()) < tol * std::sqrt(double(n)),
          tag("lanczos_reorth norm", opt) + v);
  }
  // The sweep mode (h given): x = w - V^T h, dots = V w, norm = ||x||, on the strided view.
  auto hs = at::randn({b, j}, gen_opt);
  auto [xs, ds, ns] = rops::lanczos_reorth(w, Vt, hs.to(opt.device()));
  auto xe = wd - at::matmul(V64.transpose(1, 2), hs.unsqueeze(-1)).squeeze(-1);
  check(xs.sizes() == w.sizes() && xs.dtype() == w.dtype() && ds.dtype() == at::kDouble &&
            ds.sizes() == at::IntArrayRef({b, j}) && ns.sizes() == at::IntArrayRef({b}),
        tag("lanczos_reorth sweep shapes", opt));
  check(max_abs(xs.to(at::kCPU, at::kDouble) - xe) < tol * 10, tag("lanczos_reorth sweep x", opt));
  check(max_abs(ds.cpu() - h) < 1e-10 * std::sqrt(double(n)), tag("lanczos_reorth sweep dots = V w", opt));
  check(max_abs(ns.cpu() - xe.pow(2).sum(1).sqrt()) < tol * std::sqrt(double(n)),
        tag("lanczos_reorth sweep norm", opt));
  // j = 0: w unchanged, norm = ||w||.
  auto [wo0, c0, n0] = rops::lanczos_reorth(w, at::empty({b, 0, n}, opt));
  check(max_abs(wo0.to(at::kCPU, at::kDouble) - wd) == 0.0 && c0.numel() == 0 &&
            max_abs(n0.cpu() - wd.pow(2).sum(1).sqrt()) < 1e-10 * std::sqrt(double(n)),
        tag("lanczos_reorth j = 0", opt));
  // b = 0.
  auto [wo1, c1, n1] = rops::lanczos_reorth(at::empty({0, n}, opt), at::empty({0, j, n}, opt));
  check(wo1.numel() == 0 && c1.sizes() == at::IntArrayRef({0, j}), tag("lanczos_reorth b = 0", opt));
}

// Q^T Q = I; Q Q^T x = x for a full-rank x; a zero column and a repeated column still give an
// orthonormal Q.
void test_orthonormalize(const at::TensorOptions& opt, double tol) {
  const int64_t b = 3, n = 60, k = 6;
  auto x64 = at::randn({b, n, k}, at::TensorOptions().dtype(at::kDouble));
  x64[1].select(1, 2).zero_();                   // problem 1: a zero column
  x64[2].select(1, 4).copy_(x64[2].select(1, 1));  // problem 2: rank deficient
  x64[0].select(1, 3).mul_(1e-6);                // problem 0: badly scaled but full rank
  auto x = x64.to(opt);
  auto q = rops::orthonormalize(x);
  check(q.sizes() == x.sizes() && q.dtype() == x.dtype(), tag("orthonormalize shape/dtype", opt));
  auto qc = q.to(at::kCPU, at::kDouble);
  auto eye = at::eye(k, at::TensorOptions().dtype(at::kDouble));
  auto gram = at::matmul(qc.transpose(1, 2), qc);
  check(max_abs(gram - eye) < tol, tag("orthonormalize Q^T Q = I", opt));
  auto x0 = x.to(at::kCPU, at::kDouble)[0];
  auto q0 = qc[0];
  auto resid = x0 - at::matmul(q0, at::matmul(q0.transpose(0, 1), x0));
  check(max_abs(resid) < tol * (max_abs(x0) + 1.0), tag("orthonormalize spans x", opt));
  // Empty: b = 0 and k = 0.
  check(rops::orthonormalize(at::empty({0, n, k}, opt)).sizes() == at::IntArrayRef({0, n, k}) &&
            rops::orthonormalize(at::empty({2, n, 0}, opt)).sizes() == at::IntArrayRef({2, n, 0}),
        tag("orthonormalize empty", opt));
  bool raised = false;
  try {
    auto bad = x.clone();
    bad[0][0][0] = INFINITY;
    rops::orthonormalize(bad);
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("orthonormalize: expected x with finite entries") !=
             std::string::npos;
  }
  check(raised, tag("orthonormalize non-finite input raises", opt));
}

// The smoothed density of Gauss quadrature nodes/weights integrates to ~1 (weights sum to 1).
void test_density_smooth(const at::TensorOptions& opt, double tol) {
  const int64_t m = 10, b = 2, g = 4001;
  auto nodes = at::linspace(0.0, 4.0, m, opt).repeat({b, 1});
  auto weights = at::full({b, m}, 1.0 / m, opt);
  weights[1] = at::softmax(at::arange(m, opt.dtype(at::kDouble).device(at::kCPU)), 0).to(opt);
  auto grid = at::linspace(-2.0, 6.0, g, opt);
  const double sigma = 0.1;
  auto dens = rops::density_smooth(nodes, weights, grid, sigma);
  check(dens.sizes() == at::IntArrayRef({b, g}) && dens.dtype() == nodes.dtype(),
        tag("density_smooth shape/dtype", opt));
  auto d = dens.to(at::kCPU, at::kDouble);
  const double dx = 8.0 / (g - 1);
  auto integral = (d.sum(1) - 0.5 * (d.select(1, 0) + d.select(1, g - 1))) * dx;
  check(max_abs(integral - 1.0) < tol, tag("density_smooth integrates to 1", opt));
  // Peak of a single node: 1 / (sigma sqrt(2 pi)).
  auto one = rops::density_smooth(at::zeros({1, 1}, opt), at::ones({1, 1}, opt),
                                      at::zeros({1}, opt), sigma);
  check(std::fabs(one.item<double>() - 1.0 / (sigma * std::sqrt(2.0 * M_PI))) < tol * 10,
        tag("density_smooth peak value", opt));
  check(rops::density_smooth(at::empty({0, m}, opt), at::empty({0, m}, opt), grid, sigma)
                .sizes() == at::IntArrayRef({0, g}),
        tag("density_smooth empty", opt));
}

// out[n, k, c, s] = v[n, k, c, s] * scale[c] * mask[n, c, s] with v = k + 1, scale[c] = c + 1 and
// mask = (n + c + s) even: (k + 1)(c + 1) or 0, exact in both dtypes. bool and uint8 masks, a
// strided v, empty dimensions and a wrong mask shape.
void test_masked_scale(const at::TensorOptions& opt) {
  const int64_t N = 2, K = 3, C = 4, S = 5;
  auto cpu = at::TensorOptions().dtype(at::kDouble);
  auto v = at::arange(1, K + 1, cpu).view({1, K, 1, 1}).expand({N, K, C, S}).contiguous();
  auto scale = at::arange(1, C + 1, cpu);
  auto n_ = at::arange(N, cpu).view({N, 1, 1}), c_ = at::arange(C, cpu).view({1, C, 1}),
       s_ = at::arange(S, cpu).view({1, 1, S});
  auto mask = at::remainder(n_ + c_ + s_, 2).eq(0);  // [N, C, S] bool
  auto expect = at::empty({N, K, C, S}, cpu);
  auto e = expect.accessor<double, 4>();
  auto mk = mask.accessor<bool, 3>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t s = 0; s < S; ++s) {
          e[n][k][c][s] = mk[n][c][s] ? static_cast<double>((k + 1) * (c + 1)) : 0.0;
        }
  auto vd = v.to(opt), sd = scale.to(opt);
  for (auto mask_dtype : {at::kBool, at::kByte}) {
    auto m = mask.to(opt.device(), mask_dtype);
    std::string md = mask_dtype == at::kBool ? " (bool mask)" : " (uint8 mask)";
    auto out = rops::masked_scale(vd, m, sd);
    check(out.sizes() == vd.sizes() && out.dtype() == vd.dtype() && out.is_contiguous(),
          tag("masked_scale shape/dtype", opt) + md);
    check(max_abs(out.to(at::kCPU, at::kDouble) - expect) == 0.0,
          tag("masked_scale value", opt) + md);
  }
  // A strided v (K innermost in memory) gives the same answer.
  auto vt = vd.permute({0, 2, 3, 1}).contiguous().permute({0, 3, 1, 2});
  check(!vt.is_contiguous() &&
            max_abs(rops::masked_scale(vt, mask.to(opt.device()), sd).to(at::kCPU, at::kDouble) -
                    expect) == 0.0,
        tag("masked_scale strided v", opt));
  // Empty N and S.
  auto bopt = opt.dtype(at::kBool);
  auto empty_n = rops::masked_scale(at::empty({0, K, C, S}, opt), at::empty({0, C, S}, bopt), sd);
  auto empty_s = rops::masked_scale(at::empty({N, K, C, 0}, opt), at::empty({N, C, 0}, bopt), sd);
  check(empty_n.sizes() == at::IntArrayRef({0, K, C, S}) &&
            empty_s.sizes() == at::IntArrayRef({N, K, C, 0}),
        tag("masked_scale empty", opt));
  bool raised = false;
  try {
    rops::masked_scale(vd, mask.to(opt.device()).transpose(1, 2), sd);
  } catch (const c10::Error& err) {
    raised = std::string(err.what()).find("masked_scale: expected mask of shape [N, C, S]") !=
             std::string::npos;
  }
  check(raised, tag("masked_scale wrong mask shape raises", opt));
}

void run_all(const at::Device& dev) {
  for (auto dtype : {at::kDouble, at::kFloat}) {
    auto opt = at::TensorOptions().dtype(dtype).device(dev);
    const bool dbl = dtype == at::kDouble;
    test_tridiag_eigh(opt, dbl ? 1e-12 : 1e-5);
    test_lanczos_reorth(opt, dbl ? 1e-12 : 1e-5);
    test_orthonormalize(opt, dbl ? 1e-12 : 1e-5);
    test_density_smooth(opt, dbl ? 1e-8 : 1e-5);
    test_masked_scale(opt);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  try {
#ifdef RESGEOM_FAST_TEST_EXPECT_CUDA
    // A CUDA build registers a CUDA kernel for every op (checkable without a GPU).
    for (const char* name : {"resgeom_fast::lanczos_reorth", "resgeom_fast::tridiag_eigh",
                             "resgeom_fast::density_smooth", "resgeom_fast::orthonormalize",
                             "resgeom_fast::masked_scale"}) {
      check(c10::Dispatcher::singleton().findSchemaOrThrow(name, "").hasKernelForDispatchKey(
                c10::DispatchKey::CUDA),
            std::string(name) + " has a CUDA kernel");
    }
#endif
    run_all(at::Device(at::kCPU));
    if (at::hasCUDA() &&
        c10::Dispatcher::singleton().findSchemaOrThrow("resgeom_fast::lanczos_reorth", "")
            .hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
      std::printf("CUDA kernels present and a GPU is visible: running the CUDA checks too\n");
      run_all(at::Device(at::kCUDA, 0));
    } else {
      std::printf("CUDA checks skipped (no CUDA kernels in this build or no GPU visible)\n");
    }
  } catch (const std::exception& e) {
    std::printf("FAIL: unexpected exception: %s\n", e.what());
    return 1;
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
