// Schema of resgeom_fast::masked_scale, and its C++ entry point resgeom_fast::ops::masked_scale
// (declared in masked_scale.h).
//
// masked_scale(v [N, K, C, S], mask [N, C, S] bool/uint8, scale [C]) -> out [N, K, C, S]
// out[n, k, c, s] = v[n, k, c, s] * scale[c] * mask[n, c, s]
// The Jacobian of eval-mode BatchNorm (per-channel factor scale) followed by ReLU (mask of the
// active units) applied to K probe vectors of each of N samples; fully-connected layers use S = 1.
#include "ops/masked_scale.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resgeom_fast, m) {
  m.def("masked_scale(Tensor v, Tensor mask, Tensor scale) -> Tensor");
}

namespace resgeom_fast {
namespace ops {

at::Tensor masked_scale(const at::Tensor& v, const at::Tensor& mask, const at::Tensor& scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resgeom_fast::masked_scale", "")
                       .typed<decltype(masked_scale)>();
  return op.call(v, mask, scale);
}

}  // namespace ops
}  // namespace resgeom_fast
