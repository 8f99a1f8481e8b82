// Schema of resgeom_fast::masked_scale.
//
// masked_scale(v [N, K, C, S], mask [N, C, S] bool/uint8, scale [C]) -> out [N, K, C, S]
// out[n, k, c, s] = v[n, k, c, s] * scale[c] * mask[n, c, s]
// The Jacobian of eval-mode BatchNorm (per-channel factor scale) followed by ReLU (mask of the
// active units) applied to K probe vectors of each of N samples; fully-connected layers use S = 1.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resgeom_fast, m) {
  m.def("masked_scale(Tensor v, Tensor mask, Tensor scale) -> Tensor");
}
