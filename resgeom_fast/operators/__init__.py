"""Operators of real models (layer 4): curvature of a loss and residual-branch Jacobians.

- :func:`hessian`, :func:`ggn`: the Hessian / generalised Gauss-Newton matrix of the mean loss
  over a batch or a DataLoader w.r.t. chosen parameters, as symmetric
  :class:`~resgeom_fast.linalg.operator.LinearOperator` s applying k vectors per pass.
- :func:`block_hessians`: the diagonal Hessian block of every residual block, sharing one graph.
- :func:`fixed_sample`: the batches of a DataLoader drawn once (the operators refuse data that
  change between passes with :class:`NonRepeatableDataError`).
- :func:`residual_blocks`, :func:`mark_residual_block`: residual block discovery.
- :func:`residual_jacobians`: batched residual-branch Jacobians J_l(x_b) (generic torch.func path
  and a linearised fast path with fused C++/CUDA masking).

Modules: ``hessian`` (the public constructors and their documentation), ``curvature`` (the
operator classes: :class:`CurvatureOperator` owns the data loop, :class:`HessianOperator` /
:class:`GGNOperator` supply their batch products), ``_products`` (the product methods),
``_autotune`` (the auto-tuner and verifier), ``_mean_contract`` (the loss contract),
``_precision`` (TF32 and oneDNN switches), ``_structured`` (the autograd-free Hessian of this
package's FC ResNets), ``_graph`` (structure recognition from a torch.fx trace) and
``_structured_conv`` (the autograd-free Hessian and GGN over the traced graph: conv ResNets and
users' own models), ``jacobian`` (residual-branch Jacobians), ``blocks`` / ``_data`` (block discovery, the
data contract).

This layer imports torch, resgeom_fast.core, resgeom_fast.ops, resgeom_fast.linalg and the module
types of resgeom_fast.models that its fast paths recognise (never a higher layer).
"""
from resgeom_fast.operators._data import NonRepeatableDataError, fixed_sample
from resgeom_fast.operators.blocks import BlockInfo, mark_residual_block, mark_residual_sublayers, residual_blocks
from resgeom_fast.operators.hessian import (
    CurvatureOperator,
    GGNOperator,
    HessianOperator,
    block_hessians,
    ggn,
    hessian,
)
from resgeom_fast.operators.jacobian import (
    ResidualJacobian,
    block_inputs,
    fast_path_supported,
    residual_jacobians,
)

__all__ = [
    "BlockInfo",
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "NonRepeatableDataError",
    "ResidualJacobian",
    "block_hessians",
    "block_inputs",
    "fast_path_supported",
    "fixed_sample",
    "ggn",
    "hessian",
    "mark_residual_block",
    "mark_residual_sublayers",
    "residual_blocks",
    "residual_jacobians",
]
