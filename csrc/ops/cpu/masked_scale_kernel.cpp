// CPU kernel of resgeom_fast::masked_scale: out = v * scale[c] * mask[n, c, s].
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "ops/masked_scale.h"

namespace resgeom_fast {
namespace ops {

namespace {

// One row per (n, k, c): S contiguous elements sharing scale[c] and the mask row mask[n, c, :].
template <typename scalar_t>
void masked_scale_cpu_impl(const at::Tensor& v, const at::Tensor& mask, const at::Tensor& scale,
                           at::Tensor& out) {
  const int64_t N = v.size(0), K = v.size(1), C = v.size(2), S = v.size(3);
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask.data_ptr());
  const scalar_t* sp = scale.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t rows = N * K * C;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % C;
      const int64_t n = r / (K * C);
      const scalar_t sc = sp[c];
      const scalar_t* vr = vp + r * S;
      const uint8_t* mr = mp + (n * C + c) * S;
      scalar_t* orow = op + r * S;
      for (int64_t s = 0; s < S; ++s) {
        orow[s] = vr[s] * sc * static_cast<scalar_t>(mr[s] != 0);
      }
    }
  });
}

}  // namespace

at::Tensor masked_scale_cpu(const at::Tensor& v, const at::Tensor& mask, const at::Tensor& scale) {
  check_masked_scale(v, mask, scale);
  TORCH_INTERNAL_ASSERT(v.device().is_cpu());
  auto vc = v.contiguous();
  auto mc = mask.contiguous();
  auto sc = scale.contiguous();
  auto out = at::empty_like(vc, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "masked_scale_cpu", [&] {
    masked_scale_cpu_impl<scalar_t>(vc, mc, sc, out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(resgeom_fast, CPU, m) {
  m.impl("masked_scale", &masked_scale_cpu);
}

}  // namespace ops
}  // namespace resgeom_fast
