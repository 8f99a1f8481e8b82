"""The loss contract of the curvature operators: ``loss_fn(outputs, y)`` is a floating-point
scalar, the *mean* of per-sample losses (checked once, on the first batch and its two halves).

:func:`check_loss` checks one loss value; :func:`check_mean_contract` the mean-over-samples
contract that the batch weights ``batch size / total`` of :mod:`resgeom_fast.operators.hessian`
rely on (re-exported there).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from resgeom_fast.core.checks import ArgumentValueError, NonFiniteError, value_error
from resgeom_fast.operators._data import module_mode

LossFn = Callable[[Tensor, Any], Tensor]

__all__ = ["LossFn", "check_loss", "check_mean_contract"]


def check_loss(fn: str, loss: Any) -> Tensor:
    """``loss`` if it is a floating-point scalar tensor (what ``loss_fn`` must return), else
    :class:`~resgeom_fast.core.checks.ArgumentValueError` naming ``fn``."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise value_error(fn, "loss_fn", "to return a scalar (the mean loss of the batch)", f"{shape}")
    if not loss.is_floating_point():
        raise value_error(fn, None, "a floating-point loss", f"{loss.dtype}")
    return loss


# relative tolerance of the mean-contract check (values and output gradients of one batch and its
# two halves, all computed from the same outputs: they differ by summation round-off only)
_CONTRACT_TOLERANCE = {torch.float64: 1e-8}


def check_mean_contract(fn: str, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Any, batchnorm: str,
                        single_batch: bool) -> str:
    """Check once, on one batch, that ``loss_fn`` is the *mean* of per-sample losses.

    The batch's outputs o [n, ...] are computed once; the loss and its gradient in o are
    evaluated on the whole batch (L, g) and on its two halves (L1, g1 on the first n1 samples,
    L2, g2 on the other n2). A mean over samples gives ``L = (n1 L1 + n2 L2) / n`` and
    ``g = (n1/n) g1 + (n2/n) g2`` (``g1``, ``g2`` padded with zeros); a sum over samples gives
    ``L = L1 + L2``, ``g = g1 + g2`` and a curvature n times too large: refused (ValueError).
    A loss that is neither (class weights normalised by their batch sum, losses that couple
    samples) is refused when the data have several batches (their weights ``batch size /
    total`` assume the mean) and accepted for one batch (the operator is then the curvature of
    ``loss_fn`` on that batch as given). A mean over other axes too (``nn.MSELoss()``'s mean over
    every element) passes: it is a mean of per-sample losses. Where the loss and its gradient
    vanish (a perfect fit), the same relations are checked at randomly perturbed outputs (the
    contract is a property of ``loss_fn`` at any outputs). Cost: one forward of the batch.

    Returns:
        what was found: ``"mean"``, ``"neither mean nor sum (one batch: loss_fn as given)"`` or
        ``"not checked: <reason>"`` (batches of one sample, where sum and mean coincide;
        labels that are not a tensor; outputs without a leading batch dimension; a loss and
        output gradient that vanish there and at perturbed outputs).

    Raises:
        ValueError for a sum (or, with several batches, a non-mean); NonFiniteError when the loss
        or its gradient is NaN/Inf on the first batch.
    """
    n = int(x.shape[0])
    if n < 2:
        return "not checked: the first batch has one sample (sum and mean coincide)"
    if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != n:
        return "not checked: the labels are not a tensor with the batch dimension first"
    with torch.no_grad(), module_mode(model, batchnorm):
        out = model(x)
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != n or not out.is_floating_point():
        return "not checked: the model's outputs are not a floating tensor with the batch dimension first"
    n1 = n // 2
    n2 = n - n1
    w1, w2 = n1 / n, n2 / n

    def evaluate(o: Tensor) -> tuple[list[float], list[Tensor]]:
        o = o.detach().requires_grad_(True)
        vals, grads = [], []
        with torch.enable_grad():
            for sl in (slice(0, n), slice(0, n1), slice(n1, n)):
                L = loss_fn(o[sl], y[sl])
                check_loss(fn, L)
                if not L.requires_grad:
                    raise ArgumentValueError(f"{fn}: expected loss_fn(outputs, y) to depend differentiably on the "
                                     f"outputs, got a loss without a gradient (detached?)")
                (g,) = torch.autograd.grad(L, o, allow_unused=True)
                vals.append(float(L.detach().double()))
                grads.append(torch.zeros_like(o, dtype=torch.float64) if g is None else g.double())
        return vals, grads

    def finite(vals: list[float], grads: list[Tensor]) -> bool:
        return all(math.isfinite(v) for v in vals) and all(bool(t.isfinite().all()) for t in grads)

    vals, grads = evaluate(out)
    if not finite(vals, grads):
        raise NonFiniteError(f"{fn}: loss_fn gave a non-finite loss or output gradient on the first batch "
                             f"(loss {vals[0]:g}; on its two halves {vals[1]:g}, {vals[2]:g})")
    # Where the loss and its gradient vanish (a perfect fit of a squared error) mean and sum agree;
    # the contract is a property of loss_fn at any outputs, so it is then checked at perturbed ones.
    gen = torch.Generator().manual_seed(0)
    # drawn on the CPU on purpose (the same perturbation on every device), once, then moved
    noise = torch.randn(out.shape, generator=gen, dtype=torch.float64, device="cpu").to(device=out.device,
                                                                                        dtype=out.dtype)
    points = [None, 0.1 * (float(out.double().std()) + 1.0) * noise]
    for attempt, delta in enumerate(points):
        if delta is not None:
            vals, grads = evaluate(out + delta)
            if not finite(vals, grads):
                return "not checked: the loss and its output gradient vanish on the first batch"
        (L, L1, L2), (g, g1, g2) = vals, grads
        mean_pred, sum_pred = w1 * L1 + w2 * L2, L1 + L2
        r_mean = abs(L - mean_pred) + float((g - w1 * g1 - w2 * g2).norm())
        r_sum = abs(L - sum_pred) + float((g - g1 - g2).norm())
        scale = abs(L) + abs(L1) + abs(L2) + float(g.norm() + g1.norm() + g2.norm())
        tol = _CONTRACT_TOLERANCE.get(out.dtype, 1e-4) * scale
        if scale > 0 and not (r_mean <= tol and r_sum <= tol):
            break
    else:
        return "not checked: the loss and its output gradient vanish on the first batch"
    where = "" if attempt == 0 else " (at perturbed outputs: the loss vanishes at the model's)"
    nums = (f"on a batch of {n} samples{where} L = {L:.6g}; on its halves L1 = {L1:.6g} ({n1} samples), "
            f"L2 = {L2:.6g} ({n2}): a mean gives (n1 L1 + n2 L2)/n = {mean_pred:.6g}, a sum L1 + L2 = {sum_pred:.6g}")
    if r_mean <= tol:
        return "mean"
    if r_sum <= tol:
        raise ArgumentValueError(
            f"{fn}: expected loss_fn to return the mean loss over the batch (reduction='mean'), got a sum over "
            f"the samples ({nums}): the curvature would be {n} times too large; pass a mean-reduced loss (e.g. "
            f"nn.MSELoss() or nn.CrossEntropyLoss() with the default reduction='mean', or divide the sum by "
            f"the batch size)")
    if not single_batch:
        raise ArgumentValueError(
            f"{fn}: expected loss_fn to return the mean of per-sample losses (batches are combined with weights "
            f"batch size / total), got a loss that is neither a mean nor a sum over samples ({nums}; relative "
            f"misfit of the mean {r_mean / scale:.2g}); pass a per-sample mean loss, or one (x, y) batch to take "
            f"the curvature of this loss as it is")
    return "neither mean nor sum (one batch: loss_fn as given)"
