// CPU kernel of resgeom_fast::orthonormalize: power-of-two column scaling, then shifted Cholesky
// QR three times, in float64, on BLAS-3 (ATen's gemm, potrf and trsm: MKL or OpenBLAS).
//
// Each problem's block is held in float64, X [n, k] row-major (in the output itself when the
// output is float64; otherwise in a float64 buffer), and swept in chunks of m rows (m * k ~ 64K
// entries, 512 KiB, so a chunk stays in L2 between the two BLAS calls that touch it). A pass:
//   G = X^T X             per-chunk gemm (at::mm_out) into a partial Gram per chunk, the
//                         partials summed in chunk order;
//   zero columns          columns whose squared norm is <= 1e-30 of the largest are refilled
//                         with fixed splitmix64 values (as the CUDA kernel), then G recomputed;
//   G (+ shift I) = R^T R potrf on the k x k matrix (at::linalg_cholesky_ex), shifted on the first
//                         pass (cholqr_shift, orthonormalize.h) or when the plain factor fails,
//                         the shift growing tenfold until it succeeds;
//   X <- X R^{-1}         per-chunk trsm in place (at::linalg_solve_triangular_out, right side),
//                         fused with the next pass's partial Gram of the same chunk, or on the
//                         last pass with the conversion to the output dtype.
// The first pass's Gram is fused with the float64 conversion and the column scaling. Three
// passes (more, up to eight, when a pass refills a column: the refilled columns get two clean
// passes), the former scalar kernel's schedule, except that a float32 output skips the third
// pass when the two before it already left X orthonormal to 2^-40 (kSkipLastPass); the BLAS
// products' summation order differs from the scalar kernel's (rounding).
//
// Memory besides the output: for a float32 output one float64 copy of a block, n * k * 8 bytes
// (rounded up to 2 MiB and advised for huge pages when blocks go one at a time: WorkBuffer),
// per problem in flight (one at a time, or one per thread when b >= the thread count and a block
// has at most 2^20 entries),
// plus the partial Grams, ceil(n / m) * k * k * 8 bytes (at most ~n * k * 4 bytes, as m >= 2 k).
// Float64 outputs are orthonormalised in place in the output: no block-sized extra memory.
//
// Determinism: the chunking depends on (n, k) only and the partial Grams are summed in chunk
// order, so with a fixed thread count the result is identical run to run. Across thread counts
// it is not bitwise identical (unlike the scalar kernel's): the BLAS results depend on the
// library's thread setting (measured with MKL: float64 outputs differ by ~1e-17 between 1 and 2
// threads; the float32 outputs tried were identical).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops/orthonormalize.h"
#include "ops/cpu/simd_clones.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace resgeom_fast {
namespace ops {

namespace {

constexpr int64_t kChunkElems = 1 << 16;        // entries of X per chunk (512 KiB of float64)
constexpr int64_t kSmallBlockElems = 1 << 20;   // blocks up to this many entries: one per thread
constexpr int kMaxPasses = 8;                   // as the CUDA kernel's pass loop
constexpr int kMaxShiftTries = 2000;            // guard: 10^2000 overflows any shift long before
// Float32 outputs: the third (last) pass is skipped when the Gram matrix G = I + E of X before it
// has ||E||_F <= 2^-40 (~9.1e-13). That pass would change X by X (R^{-1} - I) ~ -X E / 2, at most
// 2^-41 of each row's norm, 2^17 times below float32's rounding (2^-24): the float32 result is
// the three-pass result up to rare last-bit rounding differences. Measured |E| (max-abs) after
// two passes: ~1e-15 .. 1e-14 for blocks of condition up to ~1e4 (skipped), ~2e-12 at 1e6 .. 1e8,
// 5e-11 .. 2e-9 at 1e11 .. 1e12, 3e-5 at 7e14 (all run the third pass). Float64 outputs always
// get the three passes.
constexpr double kSkipLastPass = 0x1p-40;

// Rows per chunk: ~kChunkElems entries, at least 2 k rows (bounds the partial Grams by n k / 2
// entries), a multiple of 8 (every chunk starts 64-byte aligned in a 64-byte aligned block).
int64_t chunk_rows(int64_t k) {
  const int64_t m = std::max((kChunkElems + k - 1) / k, 2 * k);
  return (m + 7) / 8 * 8;
}

// The elementwise sweeps (column maxima, scaled widening to float64, narrowing to the output
// dtype) run over flat blocks of kRowBlock rows with per-column arrays repeated kRowBlock times,
// so they vectorise for any k; they are compiled for AVX-512, AVX2 and the baseline and chosen
// at load time (GCC's target_clones; the build targets baseline x86-64). All three are exact
// (max, power-of-two scaling, one rounding to the output dtype): the same result on every path.
constexpr int64_t kRowBlock = 16;

// mx[e] = max(mx[e], |x[e]|), ck[e] += x[e] - x[e] (NaN once an entry is NaN or infinite).
template <typename scalar_t>
inline void scan_block(const scalar_t* __restrict__ x, int64_t len, scalar_t* __restrict__ mx,
                       scalar_t* __restrict__ ck) {
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) {
    const scalar_t v = std::abs(x[e]);
    mx[e] = v > mx[e] ? v : mx[e];
    ck[e] += x[e] - x[e];
  }
}
RG_SIMD_CLONES void scan_f(const float* x, int64_t len, float* mx, float* ck) { scan_block(x, len, mx, ck); }
RG_SIMD_CLONES void scan_d(const double* x, int64_t len, double* mx, double* ck) { scan_block(x, len, mx, ck); }
inline void scan_any(const float* x, int64_t len, float* mx, float* ck) { scan_f(x, len, mx, ck); }
inline void scan_any(const double* x, int64_t len, double* mx, double* ck) { scan_d(x, len, mx, ck); }

// X[e] = x[e] * f1[e] * f2[e] in float64.
template <typename scalar_t>
inline void widen_block(const scalar_t* __restrict__ x, double* __restrict__ X, int64_t len,
                        const double* __restrict__ f1, const double* __restrict__ f2) {
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) X[e] = static_cast<double>(x[e]) * f1[e] * f2[e];
}
RG_SIMD_CLONES void widen_f(const float* x, double* X, int64_t len, const double* f1, const double* f2) {
  widen_block(x, X, len, f1, f2);
}
RG_SIMD_CLONES void widen_d(const double* x, double* X, int64_t len, const double* f1, const double* f2) {
  widen_block(x, X, len, f1, f2);
}
inline void widen_any(const float* x, double* X, int64_t len, const double* f1, const double* f2) {
  widen_f(x, X, len, f1, f2);
}
inline void widen_any(const double* x, double* X, int64_t len, const double* f1, const double* f2) {
  widen_d(x, X, len, f1, f2);
}

// out[e] = X[e] rounded to float32.
RG_SIMD_CLONES void narrow_f(const double* __restrict__ X, float* __restrict__ out, int64_t len) {
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) out[e] = static_cast<float>(X[e]);
}

// Fixed pseudo-random value in [-1, 1) (splitmix64), used to replace exactly zero columns.
double fill_value(uint64_t key) {
  uint64_t z = key + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

at::Tensor wrap(double* p, int64_t rows, int64_t cols) {
  return at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(at::kDouble));
}

// One block X [n, k] (float64, row-major) swept in chunks of m rows, with its partial Grams.
struct Block {
  double* X;
  int64_t n, k, m, nch;
  at::Tensor part;  // [nch, k, k] float64: X_c^T X_c of chunk c

  Block(double* X_, int64_t n_, int64_t k_)
      : X(X_), n(n_), k(k_), m(chunk_rows(k_)), nch((n_ + m - 1) / m),
        part(at::empty({nch, k_, k_}, at::TensorOptions().dtype(at::kDouble))) {}

  int64_t rows(int64_t c) const { return std::min(n, (c + 1) * m) - c * m; }
  at::Tensor chunk(int64_t c) const { return wrap(X + c * m * k, rows(c), k); }
  void chunk_gram(int64_t c, const at::Tensor& Xc) {
    at::Tensor Pc = part.select(0, c);
    at::mm_out(Pc, Xc.t(), Xc);
  }

  // G = sum of the partials in chunk order; the upper triangle mirrored to the lower.
  void gram_from_partials(std::vector<double>& G) const {
    const double* P = part.const_data_ptr<double>();
    G.assign(static_cast<size_t>(k * k), 0.0);
    for (int64_t c = 0; c < nch; ++c)
      for (int64_t i = 0; i < k * k; ++i) G[i] += P[c * k * k + i];
    for (int64_t a = 0; a < k; ++a)
      for (int64_t b = 0; b < a; ++b) G[a * k + b] = G[b * k + a];
  }

  void gram(std::vector<double>& G) {
    at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) chunk_gram(c, chunk(c));
    });
    gram_from_partials(G);
  }
};

// Replaces columns whose squared norm is zero relative to the largest by fixed pseudo-random
// values; returns how many were replaced.
int64_t refill_zero_columns(double* X, int64_t n, int64_t k, const std::vector<double>& G,
                            uint64_t salt) {
  double maxd = 0.0;
  for (int64_t c = 0; c < k; ++c) maxd = std::max(maxd, G[c * k + c]);
  int64_t count = 0;
  for (int64_t c = 0; c < k; ++c) {
    if (G[c * k + c] <= 1e-30 * maxd || !(maxd > 0.0)) {
      for (int64_t t = 0; t < n; ++t)
        X[t * k + c] = fill_value((salt * 0x100000001B3ull) ^ (static_cast<uint64_t>(t) * k + c));
      ++count;
    }
  }
  return count;
}

// Upper Cholesky factor R of G + shift I (potrf); an undefined tensor if it is not positive
// definite (a pivot <= 0 or NaN, LAPACK's info > 0).
at::Tensor cholesky_upper(const std::vector<double>& G, int64_t k, double shift) {
  at::Tensor S = at::empty({k, k}, at::TensorOptions().dtype(at::kDouble));
  double* s = S.data_ptr<double>();
  std::copy(G.begin(), G.end(), s);
  for (int64_t a = 0; a < k; ++a) s[a * k + a] += shift;
  auto [R, info] = at::linalg_cholesky_ex(S, /*upper=*/true, /*check_errors=*/false);
  return info.item<int>() == 0 ? R : at::Tensor();
}

// R of one pass: the plain factor after the first pass, unless it fails; shifted otherwise.
at::Tensor pass_factor(const std::vector<double>& G, int64_t n, int64_t k, int pass) {
  at::Tensor R = pass == 0 ? at::Tensor() : cholesky_upper(G, k, 0.0);
  if (R.defined()) return R;
  double trace = 0.0;
  for (int64_t c = 0; c < k; ++c) trace += G[c * k + c];
  double shift = cholqr_shift(n, k, trace);
  for (int tries = 0; tries < kMaxShiftTries; ++tries) {
    R = cholesky_upper(G, k, shift);
    if (R.defined()) return R;
    shift *= 10.0;
  }
  // G is finite with entries <= n after the column scaling: a large enough shift always works.
  TORCH_INTERNAL_ASSERT(false, "orthonormalize: no shift made the Gram matrix positive definite");
  return R;
}

// ||G - I||_F of the k x k Gram matrix.
double gram_deviation(const std::vector<double>& G, int64_t k) {
  double d = 0.0;
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t c = 0; c < k; ++c) {
      const double e = G[a * k + c] - (a == c ? 1.0 : 0.0);
      d += e * e;
    }
  }
  return std::sqrt(d);
}

// Per-column power-of-two factors f1, f2 (orthonormalize.h) of every problem from the column
// maxima of x [b, n, k]; false if x has a NaN or infinite entry. One parallel sweep over x in the
// input dtype (scan_block: per column a running max of |x| and a running sum of x - x, which is
// NaN once an entry is NaN or infinite), partial results per chunk (the max is exact in any order).
template <typename scalar_t>
bool scale_factors(const scalar_t* x, int64_t b, int64_t n, int64_t k, std::vector<double>& f1,
                   std::vector<double>& f2) {
  const int64_t m = chunk_rows(k), nch = (n + m - 1) / m;
  std::vector<scalar_t> part(static_cast<size_t>(b * nch * k), scalar_t(0));
  std::vector<scalar_t> check(static_cast<size_t>(b * nch * k), scalar_t(0));
  at::parallel_for(0, b * nch, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i / nch, c = i % nch;
      const int64_t t1 = std::min(n, (c + 1) * m);
      std::vector<scalar_t> mx(static_cast<size_t>(k * kRowBlock), scalar_t(0));
      std::vector<scalar_t> ck(static_cast<size_t>(k * kRowBlock), scalar_t(0));
      for (int64_t t = c * m; t < t1; t += kRowBlock) {
        const int64_t len = std::min(kRowBlock, t1 - t) * k;
        scan_any(x + (p * n + t) * k, len, mx.data(), ck.data());
      }
      for (int64_t r = 0; r < kRowBlock; ++r) {
        for (int64_t a = 0; a < k; ++a) {
          part[i * k + a] = std::max(part[i * k + a], mx[r * k + a]);
          check[i * k + a] += ck[r * k + a];
        }
      }
    }
  });
  for (const scalar_t v : check)
    if (v != scalar_t(0)) return false;
  f1.assign(static_cast<size_t>(b * k), 1.0);
  f2.assign(static_cast<size_t>(b * k), 1.0);
  for (int64_t p = 0; p < b; ++p) {
    for (int64_t a = 0; a < k; ++a) {
      scalar_t colmax = 0;
      for (int64_t c = 0; c < nch; ++c) colmax = std::max(colmax, part[(p * nch + c) * k + a]);
      column_scale_factors(static_cast<double>(colmax), &f1[p * k + a], &f2[p * k + a]);
    }
  }
  return true;
}

// Orthonormalises one problem: x [n, k] (input dtype) -> out [n, k], through X [n, k] float64
// (X == out when scalar_t is double). f1, f2: its k column factors.
template <typename scalar_t>
void orthonormalize_one(const scalar_t* x, scalar_t* out, double* X, int64_t n, int64_t k,
                        const double* f1, const double* f2) {
  Block blk(X, n, k);
  std::vector<double> f1r(static_cast<size_t>(k * kRowBlock)), f2r(f1r.size());
  for (int64_t r = 0; r < kRowBlock; ++r) {
    std::copy(f1, f1 + k, f1r.begin() + r * k);
    std::copy(f2, f2 + k, f2r.begin() + r * k);
  }
  // The column scaling (X = x * f1 * f2, exact) fused with the first Gram.
  at::parallel_for(0, blk.nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t0 = c * blk.m, t1 = t0 + blk.rows(c);
      for (int64_t t = t0; t < t1; t += kRowBlock) {
        const int64_t len = std::min(kRowBlock, t1 - t) * k;
        widen_any(x + t * k, X + t * k, len, f1r.data(), f2r.data());
      }
      blk.chunk_gram(c, blk.chunk(c));
    }
  });
  std::vector<double> G;
  blk.gram_from_partials(G);
  constexpr bool narrow = !std::is_same_v<scalar_t, double>;
  int passes_left = 3;
  for (int pass = 0; pass < kMaxPasses && passes_left > 0; ++pass) {
    if (refill_zero_columns(X, n, k, G, pass + 1) > 0) {
      blk.gram(G);
      passes_left = std::max(passes_left, 2);  // the refilled columns need two clean passes
    }
    // A narrower output already holds this X (written by the previous pass, below): the last
    // pass is skipped if X is orthonormal to kSkipLastPass (see the comment there).
    if (narrow && pass > 0 && passes_left == 1 && gram_deviation(G, k) <= kSkipLastPass) break;
    const at::Tensor R = pass_factor(G, n, k, pass);
    --passes_left;
    const bool next = passes_left > 0 && pass + 1 < kMaxPasses;
    const bool write = narrow && (!next || passes_left == 1);
    at::parallel_for(0, blk.nch, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        at::Tensor Xc = blk.chunk(c);
        at::linalg_solve_triangular_out(Xc, R, Xc, /*upper=*/true, /*left=*/false);
        if (next) blk.chunk_gram(c, Xc);
        if constexpr (narrow) {
          if (write) narrow_f(X + c * blk.m * k, out + c * blk.m * k, blk.rows(c) * k);
        }
      }
    });
    if (next) blk.gram_from_partials(G);
  }
}

// The float64 working copy of a block: 2 MiB aligned and, on Linux, advised for transparent huge
// pages, so first touching it faults once per 2 MiB instead of once per 4 KiB (a [11.7M, 10]
// block is 936 MB: ~230K page faults otherwise, ~20% of the kernel's time).
struct WorkBuffer {
  struct Free {
    void operator()(double* p) const { std::free(p); }
  };
  std::unique_ptr<double, Free> data;
  explicit WorkBuffer(int64_t elems) {
    constexpr size_t kAlign = size_t(1) << 21;
    const size_t bytes = (static_cast<size_t>(elems) * sizeof(double) + kAlign - 1) / kAlign * kAlign;
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kAlign, bytes) == 0 && p != nullptr,
                "orthonormalize: could not allocate ", bytes, " bytes for the float64 working copy");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)madvise(p, bytes, MADV_HUGEPAGE);  // advice only: a refusal leaves 4 KiB pages
#endif
    data.reset(static_cast<double*>(p));
  }
  double* get() const { return data.get(); }
};

template <typename scalar_t>
void orthonormalize_cpu_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t b = x.size(0), n = x.size(1), k = x.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  std::vector<double> f1, f2;
  TORCH_CHECK(scale_factors(xp, b, n, k, f1, f2),
              "orthonormalize: expected x with finite entries, got NaN or infinity");
  constexpr bool in_place = std::is_same_v<scalar_t, double>;
  auto one = [&](int64_t p, double* buffer) {
    double* X = in_place ? reinterpret_cast<double*>(op + p * n * k) : buffer;
    orthonormalize_one<scalar_t>(xp + p * n * k, op + p * n * k, X, n, k, f1.data() + p * k,
                                 f2.data() + p * k);
  };
  const auto dopt = at::TensorOptions().dtype(at::kDouble);
  if (b > 1 && b >= at::get_num_threads() && n * k <= kSmallBlockElems) {
    // Small blocks, one per thread (the chunk loops inside run inline).
    at::parallel_for(0, b, 1, [&](int64_t p0, int64_t p1) {
      at::Tensor buf = in_place ? at::Tensor() : at::empty({n, k}, dopt);
      for (int64_t p = p0; p < p1; ++p) one(p, in_place ? nullptr : buf.data_ptr<double>());
    });
  } else {
    // One block at a time, its chunks in parallel.
    std::unique_ptr<WorkBuffer> buf = in_place ? nullptr : std::make_unique<WorkBuffer>(n * k);
    for (int64_t p = 0; p < b; ++p) one(p, in_place ? nullptr : buf->get());
  }
}

}  // namespace

at::Tensor orthonormalize_cpu(const at::Tensor& x) {
  check_orthonormalize(x);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "orthonormalize_cpu", [&] {
    orthonormalize_cpu_impl<scalar_t>(xc, out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(resgeom_fast, CPU, m) {
  m.impl("orthonormalize", &orthonormalize_cpu);
}

}  // namespace ops
}  // namespace resgeom_fast
