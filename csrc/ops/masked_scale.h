#pragma once
// Fused mask-and-scale of probe blocks: the Jacobian of eval-mode BatchNorm -> ReLU.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace resgeom_fast {
namespace ops {

inline void check_masked_scale(const at::Tensor& v, const at::Tensor& mask, const at::Tensor& scale) {
  TORCH_CHECK(v.dim() == 4, "masked_scale: expected v of shape [N, K, C, S], got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble,
              "masked_scale: expected v of dtype float32 or float64, got ", v.scalar_type());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == v.size(0) && mask.size(1) == v.size(2) &&
                  mask.size(2) == v.size(3),
              "masked_scale: expected mask of shape [N, C, S] = [", v.size(0), ", ", v.size(2),
              ", ", v.size(3), "], got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "masked_scale: expected mask of dtype bool or uint8, got ", mask.scalar_type());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == v.size(2),
              "masked_scale: expected scale of shape [C] = [", v.size(2), "], got ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == v.scalar_type(),
              "masked_scale: expected scale of the dtype of v (", v.scalar_type(), "), got ",
              scale.scalar_type());
  TORCH_CHECK(mask.device() == v.device() && scale.device() == v.device(),
              "masked_scale: expected mask and scale on the device of v (", v.device(), "), got ",
              mask.device(), " and ", scale.device());
}

// The C++ entry point of resgeom_fast::masked_scale (defined in masked_scale.cpp), for libtorch
// users: calls the op through the dispatcher, so the kernel of the inputs' device runs (CPU, or
// CUDA in a CUDA build); autograd and the fake kernel are registered from Python only.
// v [N, K, C, S] float32/float64, mask [N, C, S] bool/uint8, scale [C] (v's dtype), one device
// -> out [N, K, C, S] contiguous, out[n, k, c, s] = v[n, k, c, s] * scale[c] * mask[n, c, s].
at::Tensor masked_scale(const at::Tensor& v, const at::Tensor& mask,
                        const at::Tensor& scale);

}  // namespace ops
}  // namespace resgeom_fast
