"""resgeom_fast.ops.masked_scale: the fused Jacobian of eval-mode BatchNorm -> ReLU on probe blocks."""
from __future__ import annotations

import torch
from torch import Tensor


def masked_scale(v: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    """Scale K probe vectors per sample by a per-channel factor and a per-sample mask.

    ``out[n, k, c, s] = v[n, k, c, s] * scale[c] * mask[n, c, s]``: the Jacobian of an eval-mode
    BatchNorm (``scale = weight / sqrt(running_var + eps)``, ones without BatchNorm) followed by a
    ReLU (``mask`` = its active units at sample n), applied to K tangent vectors of each sample.
    Fully-connected layers use ``S = 1``.

    Args:
        v: [N, K, C, S] float32/float64 (any strides; read contiguously).
        mask: [N, C, S] bool or uint8 (nonzero = active), on v's device.
        scale: [C], v's dtype and device.

    Returns:
        [N, K, C, S] contiguous, v's dtype. Differentiable in ``v`` and ``scale``.
    """
    return torch.ops.resgeom_fast.masked_scale.default(v, mask, scale)


@torch.library.register_fake("resgeom_fast::masked_scale")
def _masked_scale_fake(v: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
    torch._check(v.dim() == 4, lambda: f"masked_scale: expected v of shape [N, K, C, S], got {tuple(v.shape)}")
    torch._check(mask.dim() == 3, lambda: f"masked_scale: expected mask of shape [N, C, S], got {tuple(mask.shape)}")
    torch._check(scale.dim() == 1, lambda: f"masked_scale: expected scale of shape [C], got {tuple(scale.shape)}")
    torch._check(mask.device == v.device and scale.device == v.device,
                 lambda: f"masked_scale: expected mask and scale on the device of v ({v.device}), "
                 f"got {mask.device} and {scale.device}")
    return torch.empty(v.shape, dtype=v.dtype, device=v.device)


def _setup_context(ctx, inputs, output) -> None:
    v, mask, scale = inputs
    saved_v = v if ctx.needs_input_grad[2] else None
    ctx.save_for_backward(saved_v, mask, scale)


def _backward(ctx, grad: Tensor):
    v, mask, scale = ctx.saved_tensors
    grad_v = grad_scale = None
    if ctx.needs_input_grad[0]:
        grad_v = masked_scale(grad, mask, scale)
    if ctx.needs_input_grad[2]:
        # d out / d scale[c] = v * mask, summed over n, k, s.
        grad_scale = masked_scale(grad * v, mask, torch.ones_like(scale)).sum(dim=(0, 1, 3))
    return grad_v, None, grad_scale


torch.library.register_autograd("resgeom_fast::masked_scale", _backward, setup_context=_setup_context)
