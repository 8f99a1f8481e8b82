"""The product methods of the curvature operators, one batch at a time, as functions.

Each curvature (:class:`~resgeom_fast.operators.curvature.HessianOperator`,
:class:`~resgeom_fast.operators.curvature.GGNOperator`) supplies its batch product from these; the
data loop, the batch weights and the caching live in :mod:`resgeom_fast.operators.curvature`.
Vectors come as ``vs[j]`` of shape ``[k, *shape of parameter j]`` (k vectors per pass); results
have the same shapes, dtype and device.

- double backward: :func:`hessian_graph` / :func:`ggn_graph` build the batch's gradient graph
  once (``create_graph=True``), :func:`hessian_graph_product` / :func:`ggn_graph_product` apply k
  vectors through it as one batched backward (:func:`batched_grad`).
- forward-over-reverse: :func:`hessian_func_product` / :func:`ggn_func_product`,
  ``vmap(jvp(grad(loss)))`` with torch.func, recomputed per call.
- structured: :func:`structured_primal` checks a batch for the FC R-operator of
  :mod:`resgeom_fast.operators._structured` and computes its primal pass (:class:`NotStructured`
  where it does not apply); the traced-graph engine (Hessian and GGN) has its own,
  :func:`resgeom_fast.operators._structured_conv.graph_primal`.

Attention. Every graph build and product here runs under
:func:`resgeom_fast.core.modules.attention_math`: ``F.scaled_dot_product_attention`` on its math
kernel and ``nn.MultiheadAttention``'s native fast path off, PyTorch's settings restored after
each call (also on an exception). The fused SDPA kernels (flash, memory-efficient, the CPU flash
kernel that a ViT's attention takes by default) have no double backward ("derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented") and no
forward-mode derivative, so without this the Hessian / GGN of any transformer would fail; the
math kernel computes the same attention (to rounding) with differentiable operations. Models
without attention are unaffected. The switches are process-wide while a product runs.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from resgeom_fast.core.modules import attention_math
from resgeom_fast.operators._data import module_mode
from resgeom_fast.operators._mean_contract import LossFn, check_loss
from resgeom_fast.operators._structured import StructuredHVP

__all__ = [
    "GGNGraph", "NotStructured", "accumulate", "batched_grad", "ggn_func_product", "ggn_graph",
    "ggn_graph_product", "hessian_func_product", "hessian_graph", "hessian_graph_product", "rel_diff",
    "structured_primal",
]


class NotStructured(ValueError):
    """The structured path does not apply to these data / this model (found when computing)."""


def rel_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors (float64), read back with one host sync."""
    num2 = torch.stack([(x.double() - y.double()).pow(2).sum() for x, y in zip(a, b)]).sum()
    den2 = torch.stack([y.double().pow(2).sum() for y in b]).sum()
    num, den = (v ** 0.5 for v in torch.stack([num2, den2]).tolist())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def accumulate(acc: Optional[list[Tensor]], res: Sequence[Tensor], w: float) -> list[Tensor]:
    """``acc += w * res`` per parameter (the batch weight of a DataLoader's mean loss). The
    engines' results are fresh tensors: the first is kept as it is when ``w`` is 1 (a copy of
    every parameter's k products costs as much as a layer's convolutions on resnet18), and later
    ones are added into it in place."""
    if acc is None:
        return [r if w == 1.0 else w * r for r in res]
    for a, r in zip(acc, res):
        a.add_(r, alpha=w)
    return acc


def batched_grad(outputs: Sequence[Optional[Tensor]], inputs: Sequence[Tensor],
                 grad_outputs: Sequence[Tensor], k: int) -> list[Tensor]:
    """Batched ``sum_i d<outputs_i, grad_outputs_i>/d inputs`` (k rows: ``grad_outputs[i]`` is
    ``[k, *outputs[i].shape]``, result j ``[k, *inputs[j].shape]``), zeros where unused; the graph
    is retained."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in inputs]
    if k == 1:  # a plain backward: vmap's overhead buys nothing for one vector
        res = torch.autograd.grad([o for o, _ in pairs], list(inputs), [g[0] for _, g in pairs],
                                  retain_graph=True, allow_unused=True)
        res = tuple(None if r is None else r.unsqueeze(0) for r in res)
    else:
        res = torch.autograd.grad([o for o, _ in pairs], list(inputs), [g for _, g in pairs],
                                  retain_graph=True, is_grads_batched=True, allow_unused=True)
    return [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if r is None else r
            for r, p in zip(res, inputs)]


# -- double backward -------------------------------------------------------------------------------
def hessian_graph(fn: str, model: nn.Module, loss_fn: LossFn, params: Sequence[Tensor], x: Tensor,
                  y: Any) -> tuple[Optional[Tensor], ...]:
    """The loss gradient of one batch in every parameter, with its graph (``create_graph=True``).
    Call under ``torch.enable_grad()`` and the model's mode for the product. Attention runs on the
    math kernel (module docstring) so that the graph can be differentiated again."""
    with attention_math():
        loss = check_loss(fn, loss_fn(model(x), y))
        return torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)


def hessian_graph_product(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor], idx: Sequence[int],
                          vs: Sequence[Tensor], k: int) -> list[Tensor]:
    """H v for the parameters ``idx``: one batched backward of ``<grads, v>`` through the graph."""
    with attention_math():
        return batched_grad([grads[i] for i in idx], [params[i] for i in idx], vs, k)


class GGNGraph(NamedTuple):
    """One batch's GGN graph: the outputs ``out`` with their graph, detached outputs ``outd`` and
    the loss gradient ``gout`` in them (with its graph), and ``jtu = J^T u`` as a graph linear in a
    zero dummy ``u`` of the outputs' shape (so that ``J v = d<J^T u, v>/du``)."""

    out: Tensor
    outd: Tensor
    gout: Tensor
    u: Tensor
    jtu: tuple[Optional[Tensor], ...]


def ggn_graph(fn: str, model: nn.Module, loss_fn: LossFn, params: Sequence[Tensor], x: Tensor,
              y: Any) -> GGNGraph:
    """:class:`GGNGraph` of one batch. Call under ``torch.enable_grad()`` and the model's mode.
    Attention runs on the math kernel (module docstring)."""
    with attention_math():
        out = model(x)
        outd = out.detach().requires_grad_(True)
        loss = check_loss(fn, loss_fn(outd, y))
        (gout,) = torch.autograd.grad(loss, outd, create_graph=True)
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(out, params, u, create_graph=True, allow_unused=True)
        return GGNGraph(out, outd, gout, u, jtu)


def ggn_graph_product(g: GGNGraph, params: Sequence[Tensor], idx: Sequence[int], vs: Sequence[Tensor],
                      k: int) -> list[Tensor]:
    """G v = J^T H_out J v for the parameters ``idx``: three batched backwards through ``g``."""
    with attention_math():
        jv = batched_grad([g.jtu[i] for i in idx], [g.u], vs, k)[0]                 # [k, *out]
        hjv = batched_grad([g.gout], [g.outd], [jv], k)[0]                         # [k, *out]
        return batched_grad([g.out], [params[i] for i in idx], [hjv], k)


# -- forward-over-reverse (torch.func) -------------------------------------------------------------
def _target_as_primal(y: Any) -> tuple[bool, tuple, tuple]:
    """Floating-point targets enter jvp as primals with a zero tangent (which changes nothing):
    without one, PyTorch's forward derivative of mse_loss's backward writes into the implicit
    zero tangent of the target ("ZeroTensors are immutable"). Returns (dual?, primals, tangents)."""
    dual = isinstance(y, Tensor) and y.is_floating_point()
    return dual, ((y,) if dual else ()), ((torch.zeros_like(y),) if dual else ())


def hessian_func_product(model: nn.Module, loss_fn: LossFn, names: Sequence[str], primals: tuple[Tensor, ...],
                         x: Tensor, y: Any, vs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """H v of one batch for the parameters ``names`` (values ``primals``): ``vmap(jvp(grad(loss)))``.
    Call in the model's mode for the product. Attention runs on the math kernel (module docstring)."""
    with attention_math():
        return _hessian_func_product(model, loss_fn, names, primals, x, y, vs)


def _hessian_func_product(model: nn.Module, loss_fn: LossFn, names: Sequence[str], primals: tuple[Tensor, ...],
                          x: Tensor, y: Any, vs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    nps = len(primals)
    y_dual, ys, yt = _target_as_primal(y)

    def loss(*a: Any) -> Tensor:
        out = functional_call(model, dict(zip(names, a[:nps])), (x,))
        return loss_fn(out, a[nps] if y_dual else y)

    g = grad(loss, argnums=tuple(range(nps)))
    return vmap(lambda *t: jvp(g, primals + ys, t + yt)[1])(*vs)


def ggn_func_product(model: nn.Module, loss_fn: LossFn, names: Sequence[str], primals: tuple[Tensor, ...],
                     x: Tensor, y: Any, vs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """G v = J^T H_out J v of one batch for the parameters ``names``: jvp for J v, jvp of the loss
    gradient in the outputs for H_out, vjp for J^T. Call in the model's mode for the product.
    Attention runs on the math kernel (module docstring)."""
    with attention_math():
        return _ggn_func_product(model, loss_fn, names, primals, x, y, vs)


def _ggn_func_product(model: nn.Module, loss_fn: LossFn, names: Sequence[str], primals: tuple[Tensor, ...],
                      x: Tensor, y: Any, vs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    y_dual, ys, yt = _target_as_primal(y)

    def outputs(*ps: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, ps)), (x,))

    out, vjp_fn = vjp(outputs, *primals)
    out = out.detach()
    jv = vmap(lambda *t: jvp(outputs, primals, t)[1])(*vs)
    gl = grad(lambda o, *yy: loss_fn(o, yy[0] if y_dual else y))
    hjv = vmap(lambda t: jvp(gl, (out,) + ys, (t,) + yt)[1])(jv)
    return vmap(vjp_fn)(hjv)


# -- structured (the R-operator of _structured.py) -----------------------------------------------
def is_class_labels(y: Any) -> bool:
    """Whether ``y`` is a 1-D tensor of class indices (integer, not complex)."""
    return isinstance(y, Tensor) and y.dim() == 1 and not y.is_floating_point() and not y.is_complex()


def check_primal_logits(model: nn.Module, batchnorm: str, x: Tensor, logits: Tensor, tol: float, what: str,
                        why: str = "") -> None:
    """Raise :class:`NotStructured` ("``what`` model(x)``why``") unless the cached primal
    ``logits`` equal ``model(x)`` (in the ``batchnorm`` mode) to relative ``tol``."""
    with torch.no_grad(), module_mode(model, batchnorm):
        ref = model(x)
    if not (isinstance(ref, Tensor) and ref.shape == logits.shape and rel_diff([logits], [ref]) <= tol):
        raise NotStructured(f"{what} model(x){why}")


def structured_primal(structured: StructuredHVP, model: nn.Module, batchnorm: str, x: Tensor, y: Any, *,
                      check_forward: bool, tol: float) -> Any:
    """The primal pass of the structured path on one batch (``structured.primal``), after checking
    the labels (class indices [N] for cross-entropy, float targets [N, d] of x's dtype for MSE);
    with ``check_forward``, its logits are compared with ``model(x)`` (relative difference <= ``tol``).

    Raises:
        NotStructured: the labels do not fit, or the recognised layers do not reproduce model(x).
    """
    if structured.loss == "mse":
        d = structured.layers[-1].mod.out_features           # the head's outputs
        if not (isinstance(y, Tensor) and tuple(y.shape) == (x.shape[0], d) and y.dtype == x.dtype):
            raise NotStructured(f"the targets are not a float tensor [N, {d}] (the outputs' shape) of the "
                                f"inputs' dtype")
    elif not is_class_labels(y):
        raise NotStructured("the labels are not a 1-D tensor of class indices")
    st = structured.primal(x, y)
    if check_forward:
        check_primal_logits(model, batchnorm, x, st.logits, tol, "the recognised layers do not reproduce",
                            " (the model's forward is not the stem/blocks/head composition)")
    return st
